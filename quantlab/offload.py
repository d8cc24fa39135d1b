"""Block-by-block onloading of a safetensors checkpoint: a model larger than memory, one block resident at a time.

An offloaded model (``load_hf(path, offload=True)``, a spec's ``offload: true``) is built without
weights: its block parameters are placeholders (one NaN broadcast to their shape, no storage) until a
block is needed,
and its other parameters (embeddings, final norm, head) are read once and stay resident. ``BlockOffload``
reads a block's tensors from the checkpoint files when the block is entered and drops them when it is
left, so at any time only the blocks being computed (one, or two while a hook nests them) hold weights:

- calibration (quantlab.calibrate) quantizes block by block already; it holds each block resident
  (``resident(model, b)``) for the whole of that block's step;
- evaluation (quantlab.evaluate.block_major_logits) runs every window through one block before the next
  is loaded: all windows' hidden states are small beside the weights, and each block is read once per
  evaluation; the head then runs on a few windows at a time, so no whole set's logits exist;
- any other call (``model.logits``, task scoring) still works: each block is loaded as it is called and
  dropped when it returns (a forward pre-hook and hook on every block), at the price of reading the
  checkpoint once per call.

The quantized weights of an offloaded model do not stay in memory either: ``TensorStore`` keeps each
Linear's QTensor in a file and reads it back when the Linear computes.

Checkpoint files are read with plain reads into tensors of their own, not memory-mapped: pages of a
mapped file count in the process's resident memory for as long as the mapping lives. And what a
released block freed is handed back to the system at once (malloc_trim, as quantlab.paused does):
glibc otherwise keeps freed heap memory for reuse, and on the 2B model of
benchmarks/bench_large_model.py a baseline pass then peaked at 2.6-3.8 GB instead of 1.2 GB.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import struct
import tempfile
import weakref
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from quantlab.paused import return_free_memory   # glibc's malloc_trim (see the module docstring)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class NotSafetensors(ValueError):
    """The checkpoint directory holds no safetensors weights, so its blocks cannot be read one at a time."""


# ----------------------------------------------------------------------------------------------
# Reading safetensors files without mapping them


def checkpoint_files(directory: Union[str, Path]) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} for a Hugging Face model directory: from its
    ``model.safetensors.index.json`` (sharded) or its single ``model.safetensors``."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise NotSafetensors(f"{index} has no weight_map; rewrite the checkpoint with save_pretrained")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SAFETENSORS_SINGLE
    if single.is_file():
        return dict.fromkeys(read_header(single)[0], single)
    found = sorted(p.name for p in directory.iterdir() if p.is_file())
    raise NotSafetensors(
        f"{directory} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE} (files: {', '.join(found) or 'none'}); "
        "offload reads a model block by block from safetensors files: save it with "
        "model.save_pretrained(path, safe_serialization=True), or set offload: false to load it whole")


def offload_problem(directory: Union[str, Path]) -> Optional[str]:
    """Why ``directory`` cannot be offloaded (for spec validation), or None when it can."""
    try:
        checkpoint_files(directory)
    except (NotSafetensors, OSError, ValueError) as e:
        return str(e)
    return None


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header ({name: {dtype, shape, data_offsets}}, without __metadata__) and
    the byte offset where its data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensors(path: Path, names) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file, each read into memory of its own."""
    header, data_start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise OSError(f"{path} ends inside tensor {name}; the checkpoint is truncated")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            tensors[name] = (raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)).reshape(entry["shape"])
    return tensors


# ----------------------------------------------------------------------------------------------
# The blocks, loaded on demand


class BlockOffload:
    """Loads a module's parameters from safetensors files while they compute, holding placeholders otherwise:
    each block's while it is resident (``resident``, or for the length of a call of the block), and each
    parameter outside the blocks (embeddings, final norm, head) for the length of a call of the module
    that owns it, or inside ``outside_resident``.

    Parameters outside the blocks are loaded per call rather than kept because a quantized scheme swaps
    its own values in for them (quantlab.swap: float16-stored embeddings and head): the float ones would
    then sit unused beside the scheme's for the whole evaluation. A parameter that holds a swapped-in
    value when its module is called is left alone. (A model that reads such a parameter without calling
    its module would compute with the NaN placeholder: it shows as NaN logits, not as wrong numbers.)

    ``files`` maps checkpoint tensor names to files (``checkpoint_files``). A parameter is read under
    any of its names (a tied head shares the embedding's), converted to ``dtype`` if it is a float.
    ``loads`` counts block loads and ``most_resident`` the most blocks ever resident at once.
    """

    def __init__(self, module: nn.Module, blocks: nn.ModuleList, files: dict, dtype: torch.dtype,
                 device: Union[str, torch.device] = "cpu", scratch: Union[str, Path, None] = None):
        self.module, self.blocks, self.files = module, blocks, files
        self.scratch = scratch   # where quantizations of this model keep their QTensors (TensorStore); None: temp
        self.dtype, self.device = dtype, torch.device(device)
        _replace_meta_parameters(module, self.device)
        names: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
        missing = [aliases[0] for aliases in names.values() if not any(a in files for a in aliases)]
        if missing:
            raise ValueError(f"the checkpoint has no tensor {missing[0]} ({len(missing)} parameters missing); was it "
                             "written by this transformers version's save_pretrained for this config?")
        # Each parameter with the checkpoint name it is read under.
        source = {pid: next(a for a in aliases if a in files) for pid, aliases in names.items()}
        self._block_params = [[(params[id(p)], source[id(p)]) for p in _unique(block.parameters())]
                              for block in blocks]
        in_blocks = {id(p) for block_params in self._block_params for p, _ in block_params}
        self._outside = [(p, source[pid]) for pid, p in params.items() if pid not in in_blocks]
        # The modules outside the blocks that own parameters themselves, with those parameters.
        self._outside_owners = [
            (m, [(p, source[id(p)]) for p in m.parameters(recurse=False) if id(p) not in in_blocks])
            for m in module.modules()]
        self._outside_owners = [(m, owned) for m, owned in self._outside_owners if owned]
        self._outside_depth = {id(p): 0 for p, _ in self._outside}
        self._depth = [0] * len(blocks)
        self.loads = 0
        self.most_resident = 0
        self._handles: list = []

    # --- loading --------------------------------------------------------------------------------
    def _read(self, entries: list) -> None:
        """Give each (parameter, checkpoint name) its tensor, file by file."""
        by_file: dict[Path, list] = {}
        for p, name in entries:
            by_file.setdefault(self.files[name], []).append((p, name))
        for path, items in by_file.items():
            tensors = read_tensors(path, {name for _, name in items})
            for p, name in items:
                tensor = tensors[name]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise ValueError(f"{name} is {tuple(tensor.shape)} in {path} but the model built from config.json "
                                     f"expects {tuple(p.shape)}; the config and the weights do not match")
                if tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                p.data = tensor.to(self.device)

    def _enter_outside(self, entries: list) -> list:
        """Hold the parameters of ``entries`` that are resident or placeholders (not those holding a
        swapped-in value), reading those not yet resident; returns what was held, for ``_exit_outside``."""
        held = [(p, name) for p, name in entries if self._outside_depth[id(p)] > 0 or is_placeholder(p.data)]
        self._read([(p, name) for p, name in held if self._outside_depth[id(p)] == 0])
        for p, _ in held:
            self._outside_depth[id(p)] += 1
        return held

    def _exit_outside(self, held: list) -> None:
        released = False
        for p, _ in held:
            self._outside_depth[id(p)] -= 1
            if self._outside_depth[id(p)] == 0:
                p.data = placeholder(p.shape, p.dtype, self.device)
                released = True
        if released:
            return_free_memory()

    @contextlib.contextmanager
    def outside_resident(self) -> Iterator[None]:
        """Every parameter outside the blocks in memory inside (for code that reads them without calling
        their modules, such as quantlab.accounting's kept values)."""
        held = self._enter_outside(self._outside)
        try:
            yield
        finally:
            self._exit_outside(held)

    def _load(self, block_index: int) -> None:
        self._read(self._block_params[block_index])
        self.loads += 1

    def _release(self, block_index: int) -> None:
        for p, _ in self._block_params[block_index]:
            p.data = placeholder(p.shape, p.dtype, self.device)
        return_free_memory()

    @contextlib.contextmanager
    def resident(self, block_index: int) -> Iterator[None]:
        """Block ``block_index``'s weights in memory inside; nested uses (a block called while its
        calibration step holds it) share one load. Released on the way out, errors included."""
        self.enter(block_index)
        try:
            yield
        finally:
            self.exit(block_index)

    def enter(self, block_index: int) -> None:
        if self._depth[block_index] == 0:
            self._load(block_index)
        self._depth[block_index] += 1
        self.most_resident = max(self.most_resident, self.resident_count())

    def exit(self, block_index: int) -> None:
        self._depth[block_index] -= 1
        if self._depth[block_index] == 0:
            self._release(block_index)

    def resident_count(self) -> int:
        return sum(1 for depth in self._depth if depth > 0)

    def install_hooks(self) -> None:
        """Load each block when it is called and drop it when it returns, so that any forward pass runs.

        A block whose forward is replaced by an instance attribute is skipped: that is
        LanguageModel.block_inputs's (and trace_head's) stand-in, which only hands its input on."""
        def before(index):
            def hook(block, args, kwargs=None):
                if "forward" not in vars(block):
                    self.enter(index)
            return hook

        def after(index):
            def hook(block, args, output):
                if "forward" not in vars(block):
                    self.exit(index)
            return hook

        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(before(i)))
            # always_call: a forward that raises (calibration stops blocks mid-run) still lets go of the block.
            self._handles.append(block.register_forward_hook(after(i), always_call=True))

        held_by_call: list = []   # a stack: calls of outside modules nest (the model's forward calls the embedding)

        def outside_before(owned):
            return lambda module, args: held_by_call.append(self._enter_outside(owned))

        def outside_after(module, args, output):
            self._exit_outside(held_by_call.pop())

        for module, owned in self._outside_owners:
            self._handles.append(module.register_forward_pre_hook(outside_before(owned)))
            self._handles.append(module.register_forward_hook(outside_after, always_call=True))


def placeholder(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """What a parameter holds while its block is not resident: one element broadcast to its shape, so it
    costs no memory, on the model's device, so that ``module.to(device)`` and swapping data work. NaN,
    so that computing with a block that was not loaded shows in every result rather than passing
    for zeros."""
    fill = float("nan") if dtype.is_floating_point else 0
    return torch.full((), fill, dtype=dtype, device=device).expand(shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an offloaded parameter's stand-in (less storage than its elements need)."""
    return tensor.numel() > 1 and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size()


def _replace_meta_parameters(module: nn.Module, device) -> None:
    """Give every meta parameter of ``module`` a placeholder on ``device`` instead, a new Parameter
    shared by all the modules that shared the old one (a tied head). A meta parameter cannot be given
    real data later (set_data refuses to change the device type), a placeholder can."""
    replaced: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(placeholder(p.shape, p.dtype, device), requires_grad=False)
                m._parameters[key] = replaced[id(p)]


def _unique(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def offload_of(model) -> Optional[BlockOffload]:
    """The model's BlockOffload, or None for a model held whole (a SwappedModel answers for its base)."""
    return getattr(model, "offload", None)


def resident(model, block_index: int):
    """A context holding block ``block_index`` of ``model`` in memory; nothing to do for a model held whole."""
    offload = offload_of(model)
    return offload.resident(block_index) if offload is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Quantized weights on disk


class TensorStore(MutableMapping):
    """A dict whose values (QTensors, tensors) live in files of ``directory``, one per key, read back on
    every access: an offloaded model's quantized weights, which would not fit in memory either.

    The files are this process's own (torch.save), removed with the store; ``directory`` is created
    inside ``parent`` (a temporary directory when None)."""

    def __init__(self, parent: Union[str, Path, None] = None):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="quantlab-qtensors-", dir=parent))
        self._files: dict[str, Path] = {}
        self._numbers = itertools.count()
        weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)

    def __setitem__(self, key: str, value) -> None:
        path = self._files.get(key) or self.directory / f"{next(self._numbers):06d}.pt"
        torch.save(value, path)
        self._files[key] = path

    def __getitem__(self, key: str):
        # weights_only=False: QTensor is a dataclass holding a Scheme, and these files are the ones
        # this process wrote into its own temporary directory.
        return torch.load(self._files[key], weights_only=False)

    def __delitem__(self, key: str) -> None:
        self._files.pop(key).unlink(missing_ok=True)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
