"""The committed MiniGPT checkpoint reproduces what its config.json records, and the training script
behind it is deterministic."""
import json
import math

import pytest
import torch

from quantlab.data import load_task, shakespeare_split
from quantlab.models.minigpt import CHECKPOINT_DIR, MiniGPTConfig, load_checkpoint
from quantlab.models import train_minigpt as tm

CHECKPOINT = CHECKPOINT_DIR / "minigpt-shakespeare"


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(CHECKPOINT, "minigpt-shakespeare")


@pytest.fixture(scope="module")
def recorded():
    return json.loads((CHECKPOINT / "config.json").read_text())


def test_checkpoint_is_small_and_group_sizes_64_and_128_differ(recorded):
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 20 * 2**20
    n_embd = recorded["config"]["n_embd"]
    assert n_embd >= 192 and n_embd % 64 == 0 and n_embd % 128 != 0


def test_recorded_command_has_the_checkpoints_settings(recorded):
    cfg = recorded["config"]
    for flag, value in [("--seed", recorded["seed"]), ("--steps", recorded["steps"]),
                        ("--n-layer", cfg["n_layer"]), ("--n-head", cfg["n_head"]), ("--n-embd", cfg["n_embd"])]:
        assert f"{flag} {value} " in recorded["command"] + " "
    assert recorded["command"].startswith("python -m quantlab.models.train_minigpt --out ")


def test_reproduces_its_recorded_heldout_perplexity(model, recorded):
    # Recomputed here, independently of the training script, with the protocol config.json states.
    heldout = recorded["heldout"]
    assert (heldout["dataset"], heldout["split"]) == ("shakespeare", "test")
    seq_len = heldout["seq_len"]
    tokens = model.encode(shakespeare_split("test"))[: heldout["max_tokens"]]
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)      # (W, T)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model.logits(windows[:, :-1]), dim=-1)       # (W, T-1, V)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).double().mean().item()
    assert math.exp(nll) == pytest.approx(heldout["ppl"], rel=1e-4)
    assert nll / math.log(2) == pytest.approx(heldout["bits_per_byte"], rel=1e-4)


def test_reproduces_its_recorded_verb_tense_accuracy(model, recorded):
    items = load_task("verb_tense")
    pairs = [pair for item in items for pair in item.completions()]
    sequences = [model.encode(prefix + continuation) for prefix, continuation in pairs]
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)         # (B, W), right-padded
    with torch.inference_mode():
        logprobs = torch.log_softmax(model.logits(batch[:, :-1]), dim=-1)         # (B, W-1, V)
    token_logprobs = logprobs.gather(-1, batch[:, 1:, None])[..., 0]              # (B, W-1)
    # Byte tokens: the continuation starts at byte len(prefix); token t is scored by logits at t - 1.
    scores = [float(token_logprobs[row, len(prefix.encode()) - 1: len(seq) - 1].double().sum())
              for row, ((prefix, _), seq) in enumerate(zip(pairs, sequences))]
    n_choices = len(items[0].choices)
    assert all(len(item.choices) == n_choices for item in items)
    correct = sum(max(range(n_choices), key=lambda j: scores[n_choices * i + j]) == item.answer
                  for i, item in enumerate(items))
    acc = correct / len(items)
    # Near-ties may flip between batch shapes; one item either way is float noise, not a regression.
    assert recorded["verb_tense"]["n"] == len(items)
    assert abs(acc - recorded["verb_tense"]["acc"]) <= 1 / len(items)
    assert acc > 0.9   # the FP32 model must do the task well, so quantization damage is measurable


# --- the training script ------------------------------------------------------------------------
def test_learning_rate_warms_up_then_decays_to_its_floor():
    s = tm.TrainSettings(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    rates = [tm.learning_rate(step, s) for step in range(s.steps)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-4)


def test_settings_reject_a_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warmup_steps"):
        tm.TrainSettings(steps=10, warmup_steps=10)


def test_batch_mixes_both_corpora_and_targets_are_inputs_shifted_by_one():
    shakespeare, verbs = torch.arange(0, 1000), torch.arange(5000, 6000)   # disjoint value ranges
    s = tm.TrainSettings(batch_size=10, verb_fraction=0.3)
    inputs, targets = tm.training_batch(shakespeare, verbs, s, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (10, 16)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert int((inputs[:, 0] >= 5000).sum()) == 3


def test_training_is_deterministic_under_a_seed(monkeypatch):
    # A short stand-in corpus: determinism is about the seeded init and batches, not the text.
    monkeypatch.setattr(tm, "shakespeare_split", lambda split: f"{split}: To be, or not to be. " * 50)
    cfg = MiniGPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
    s = tm.TrainSettings(steps=3, warmup_steps=1, batch_size=2, verb_sentences=200)
    threads = torch.get_num_threads()
    try:
        first, _ = tm.train(cfg, s, log_every=1000)
        second, _ = tm.train(cfg, s, log_every=1000)
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
