"""MiniGPT: a small byte-level GPT (nanoGPT-style), trained by quantlab's own script on Shakespeare
plus the verb-tense corpus. Each projection is its own nn.Linear so each can be quantized."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from quantlab.models.base import LanguageModel


@dataclass
class MiniGPTConfig:
    vocab_size: int = 256   # bytes
    block_size: int = 256   # longest context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                        # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class MiniGPT(nn.Module):
    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds MiniGPT's block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)   # (B, T, C)
        for block in self.blocks:
            x = block(x)                     # (B, T, C)
        return self.lm_head(self.ln_f(x))    # (B, T, vocab)


class MiniGPTModel(LanguageModel):
    """MiniGPT behind the LanguageModel interface: bytes in, logits out."""

    def logits(self, tokens):
        return self.module(tokens).float()

    def encode(self, text):
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def wrap(module: MiniGPT, name: str = "minigpt", source: dict | None = None) -> MiniGPTModel:
    module.eval()
    return MiniGPTModel(
        name=name, module=module, blocks=module.blocks, vocab_size=module.config.vocab_size,
        max_seq_len=module.config.block_size,
        tokenizer={"kind": "bytes", "encoding": "utf-8", "bos": None}, source=source or {},
        head_names=("ln_f", "lm_head"),
    )


def save_checkpoint(module: MiniGPT, directory: Path, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
    tmp.replace(directory / "model.safetensors")
    cfg_tmp = directory / "config.json.tmp"
    cfg_tmp.write_text(json.dumps({"config": asdict(module.config), **(extra or {})}, indent=2) + "\n")
    cfg_tmp.replace(directory / "config.json")


def load_checkpoint(directory: Path, name: str = "minigpt") -> MiniGPTModel:
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config = directory / "model.safetensors", directory / "config.json"
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"MiniGPT checkpoint file {f} is missing; train it with "
                                    "`python -m quantlab.models.train_minigpt` (see README)")
    meta = json.loads(config.read_text())
    module = MiniGPT(MiniGPTConfig(**meta["config"]))
    module.load_state_dict(load_file(str(weights)))
    return wrap(module, name, source={"path": str(directory), **{k: v for k, v in meta.items() if k != "config"}})
