"""Evaluation metrics against closed forms: bigram models whose logits are a fixed table make
perplexity, KL divergence and multiple-choice scores computable by hand."""
import copy
import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from quantlab.data.tasks import MCItem
from quantlab.evaluate import (
    METRIC_KEYS, BaselineLogProbs, EvalPlan, continuation_log_likelihoods, choice_sequences, evaluate,
    kl_divergence, length_batches, make_windows, nan_count, next_token_log_probs, perplexity, task_accuracy,
    top1_agrees,
)
from quantlab.models.base import LanguageModel
from quantlab.models.minigpt import wrap


class BigramModel(LanguageModel):
    """Next-token logits depend only on the current token: row ``token`` of a (V, V) table."""

    def logits(self, tokens):
        return self.module(tokens).float()   # (B, T, V)

    def encode(self, text):
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def bigram(table: torch.Tensor) -> BigramModel:
    vocab = table.shape[0]
    return BigramModel(name="bigram", module=nn.Embedding.from_pretrained(table), blocks=nn.ModuleList(),
                       vocab_size=vocab, max_seq_len=4096, tokenizer={"kind": "bytes"})


def successor_table(vocab: int, logit: float) -> torch.Tensor:
    """``logit`` on token (a + 1) mod V after token a, 0 elsewhere."""
    table = torch.zeros(vocab, vocab)
    table[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = logit
    return table


def successor_prob(vocab: int, logit: float) -> float:
    return math.exp(logit) / (math.exp(logit) + vocab - 1)


def counting_stream(n: int, vocab: int) -> torch.Tensor:
    """0, 1, 2, ..., V-1, 0, 1, ...: every transition is a successor."""
    return torch.arange(n) % vocab


class CountingModel(LanguageModel):
    """Wraps a model and counts its forward passes."""

    def logits(self, tokens):
        self.calls += 1
        return self.inner.logits(tokens)

    def encode(self, text):
        return self.inner.encode(text)


def counting(model: LanguageModel) -> CountingModel:
    wrapper = CountingModel(name=model.name, module=model.module, blocks=model.blocks,
                            vocab_size=model.vocab_size, max_seq_len=model.max_seq_len, tokenizer=model.tokenizer)
    wrapper.inner, wrapper.calls = model, 0
    return wrapper




def perturbed(model, scale: float = 0.5, seed: int = 1):
    module = copy.deepcopy(model.module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lm_head.weight += scale * torch.randn(module.lm_head.weight.shape, generator=generator)
    return wrap(module)


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Perplexity


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    result = perplexity(bigram(torch.zeros(5, 5)), counting_stream(40, 5), seq_len=8)
    assert result["ppl"] == pytest.approx(5.0, rel=1e-6)
    assert result["ppl_stderr"] == pytest.approx(0.0, abs=1e-9)   # every window scores the same
    assert result["bits_per_byte"] == pytest.approx(math.log2(5), rel=1e-6)


def test_successor_model_perplexity_is_the_inverse_of_its_successor_probability():
    vocab, logit = 7, 3.0
    result = perplexity(bigram(successor_table(vocab, logit)), counting_stream(70, vocab), seq_len=10)
    assert result["ppl"] == pytest.approx(1 / successor_prob(vocab, logit), rel=1e-6)
    assert result["nll_mean"] == pytest.approx(-math.log(successor_prob(vocab, logit)), rel=1e-6)


def test_transitions_across_window_boundaries_are_not_scored():
    vocab, logit, seq_len = 7, 3.0, 5
    # Successor runs inside each window, a jump (not a successor) at every boundary.
    tokens = torch.cat([torch.arange(seq_len) + start for start in (0, 1, 2, 0)]) % vocab
    result = perplexity(bigram(successor_table(vocab, logit)), tokens, seq_len=seq_len)
    assert result["ppl"] == pytest.approx(1 / successor_prob(vocab, logit), rel=1e-6)
    assert result["eval_tokens"] == 4 * (seq_len - 1)


def test_perplexity_matches_a_direct_cross_entropy_over_windows_of_a_minigpt(make_minigpt):
    model, tokens, seq_len = make_minigpt(), random_bytes(300), 64
    windows = tokens[: (300 // seq_len) * seq_len].reshape(-1, seq_len)
    with torch.no_grad():
        logits = model.logits(windows)
    direct = F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    result = perplexity(model, tokens, seq_len=seq_len, batch_size=3)
    assert result["ppl"] == pytest.approx(math.exp(float(direct)), rel=1e-5)
    assert result["eval_tokens"] == 4 * 63


def test_incomplete_last_window_is_dropped_and_max_tokens_cuts_the_stream():
    model = bigram(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    tokens = torch.tensor([0, 3, 1, 4, 1, 5, 2, 2, 5, 3])
    full = perplexity(model, tokens, seq_len=4)
    assert full["eval_tokens"] == 6                       # 2 windows of 4; 2 tokens left over
    tail_changed = tokens.clone()
    tail_changed[8:] = torch.tensor([0, 0])
    assert perplexity(model, tail_changed, seq_len=4)["ppl"] == full["ppl"]
    assert perplexity(model, tokens, seq_len=4, max_tokens=7)["eval_tokens"] == 3
    assert perplexity(model, tokens, seq_len=4, max_tokens=7)["ppl"] != full["ppl"]


def test_minigpt_training_protocol_scores_255_positions_of_256_windows():
    tokens = counting_stream(70_000, 5)
    result = perplexity(bigram(torch.zeros(5, 5)), tokens, seq_len=256, max_tokens=65_536, batch_size=64)
    assert result["eval_tokens"] == 256 * 255


def test_ppl_stderr_is_the_spread_of_window_means_by_the_delta_method():
    vocab, logit, seq_len = 7, 3.0, 6
    successor_window = torch.arange(seq_len) % vocab
    jumping_window = (torch.arange(seq_len) * 3) % vocab  # +3 each step: never a successor
    tokens = torch.cat([successor_window, jumping_window])
    p = successor_prob(vocab, logit)
    nll_hit, nll_miss = -math.log(p), -math.log((1 - p) / (vocab - 1))
    ppl = math.exp((nll_hit + nll_miss) / 2)
    # Two window means: std (ddof 1) = |a - b| / sqrt(2), divided by sqrt(2 windows).
    result = perplexity(bigram(successor_table(vocab, logit)), tokens, seq_len=seq_len)
    assert result["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert result["ppl_stderr"] == pytest.approx(ppl * abs(nll_hit - nll_miss) / 2, rel=1e-5)


def test_ppl_stderr_shrinks_with_more_tokens_and_is_none_for_one_window():
    model = bigram(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    tokens = torch.randint(0, 16, (64 * 32,), generator=torch.Generator().manual_seed(1))
    few = perplexity(model, tokens, seq_len=32, max_tokens=4 * 32)["ppl_stderr"]
    many = perplexity(model, tokens, seq_len=32)["ppl_stderr"]
    assert many < few / 2                                  # ~1/sqrt(16) expected
    assert perplexity(model, tokens, seq_len=32, max_tokens=32)["ppl_stderr"] is None


def test_bits_per_byte_only_for_byte_tokenizers():
    model = bigram(torch.zeros(5, 5))
    model.tokenizer = {"kind": "bpe"}
    assert perplexity(model, counting_stream(20, 5), seq_len=5)["bits_per_byte"] is None


@given(n=st.integers(2, 200), seq_len=st.integers(2, 50), max_tokens=st.one_of(st.none(), st.integers(2, 250)))
def test_windows_are_consecutive_full_slices_of_the_capped_stream(n, seq_len, max_tokens):
    tokens = torch.arange(n)
    windows = make_windows(tokens, seq_len, max_tokens)
    usable = min(n, max_tokens) if max_tokens is not None else n
    assert windows.shape == (usable // seq_len, seq_len)
    assert torch.equal(windows.flatten(), tokens[: windows.numel()])


# ---------------------------------------------------------------------------------------------
# KL divergence


def test_identical_models_have_zero_kl_and_full_agreement(make_minigpt):
    model = make_minigpt()
    result = kl_divergence(model, model, random_bytes(256), seq_len=64)
    assert result == {"kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0}


def test_perturbed_model_has_positive_kl(make_minigpt):
    model = make_minigpt()
    result = kl_divergence(perturbed(model), model, random_bytes(256), seq_len=64)
    assert result["kld_mean"] > 0.01
    assert 0 < result["kld_median"] <= result["kld_p99"]
    assert result["top1_agreement"] < 1.0


def test_top1_agreement_is_whether_the_baseline_argmax_is_the_models_argmax():
    g = torch.Generator().manual_seed(0)
    log_probs = F.log_softmax(torch.randn(4, 50, 32, generator=g), dim=-1)
    baseline_top1 = F.log_softmax(log_probs + torch.randn(4, 50, 32, generator=g), dim=-1).argmax(-1)
    agree = top1_agrees(log_probs, baseline_top1)
    assert torch.equal(agree, log_probs.argmax(-1) == baseline_top1)
    assert 0 < agree.float().mean() < 1                 # both outcomes occur above
    tied = torch.zeros(1, 2, 4)                         # every token tied for the top: any one agrees
    assert top1_agrees(tied, torch.tensor([[0, 3]])).all()


def test_kl_between_successor_models_is_the_binary_kl_of_their_successor_probabilities():
    vocab = 9
    p, q = successor_prob(vocab, 2.0), successor_prob(vocab, 4.0)
    # The other V-1 tokens share the rest equally in both, so only the hit/miss split differs.
    binary_kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    result = kl_divergence(bigram(successor_table(vocab, 4.0)), bigram(successor_table(vocab, 2.0)),
                           torch.randint(0, vocab, (60,), generator=torch.Generator().manual_seed(0)), seq_len=12)
    assert result["kld_mean"] == pytest.approx(binary_kl, rel=1e-5)
    assert result["kld_p99"] == pytest.approx(binary_kl, rel=1e-5)
    assert result["top1_agreement"] == 1.0


def test_cached_and_recomputed_baseline_give_the_same_kl(make_minigpt):
    model = make_minigpt()
    plan = EvalPlan(random_bytes(300), seq_len=64, batch_size=2)
    cached = BaselineLogProbs(model, plan)
    recomputed = BaselineLogProbs(model, plan, max_cached_bytes=0)
    assert cached.cached is not None and recomputed.cached is None
    quantized = perturbed(model)
    assert evaluate(quantized, plan, cached)["kld_mean"] == pytest.approx(
        evaluate(quantized, plan, recomputed)["kld_mean"], rel=1e-6)


def test_a_scheme_and_a_recomputed_baseline_sharing_one_float_model_each_compute_with_their_own_weights(
        make_minigpt):
    # Quantized schemes swap their weights into the one float model per call (quantlab.swap): a baseline
    # recomputed between a scheme's batches must still see the float weights, and the scheme its own.
    from quantlab.calibrate import quantize_model
    from quantlab.quant import PRESETS

    model = make_minigpt()
    plan = EvalPlan(random_bytes(300), seq_len=64, batch_size=2)
    baseline = quantize_model(model, PRESETS["fp32"], None)
    int4 = quantize_model(model, PRESETS["int4-g64"], None)
    shared = evaluate(int4.model, plan, BaselineLogProbs(baseline.model, plan, max_cached_bytes=0))
    copied_model = int4.materialize()
    separate = evaluate(copied_model, plan, BaselineLogProbs(make_minigpt(), plan, max_cached_bytes=0))
    assert shared["kld_mean"] > 0
    assert shared["kld_mean"] == pytest.approx(separate["kld_mean"], rel=1e-6)
    assert shared["ppl"] == pytest.approx(separate["ppl"], rel=1e-6)


def test_log_probs_taken_a_window_at_a_time_give_the_numbers_of_the_whole_batch(make_minigpt, monkeypatch,
                                                                                 tmp_path):
    # SmolLM2-sized vocabularies are processed one window at a time (windows_per_chunk): same numbers.
    from quantlab import evaluate as evaluate_module

    model, other = make_minigpt(), perturbed(make_minigpt())
    plan = EvalPlan(random_bytes(600), seq_len=64, batch_size=4)
    whole = evaluate(other, plan, BaselineLogProbs(model, plan, path=tmp_path / "whole.npy"))
    monkeypatch.setattr(evaluate_module, "LOG_PROBS_CHUNK_BYTES", 1)
    assert evaluate_module.windows_per_chunk(64, model.vocab_size) == 1
    windowed = evaluate(other, plan, BaselineLogProbs(model, plan, path=tmp_path / "windowed.npy"))
    for key in ("ppl", "kld_mean", "top1_agreement", "ppl_gap"):
        assert windowed[key] == whole[key], key


def test_baseline_for_other_windows_is_refused(make_minigpt):
    model = make_minigpt()
    baseline = BaselineLogProbs(model, EvalPlan(random_bytes(128, seed=0), seq_len=64))
    with pytest.raises(ValueError, match="same EvalPlan"):
        evaluate(model, EvalPlan(random_bytes(128, seed=1), seq_len=64), baseline)


# ---------------------------------------------------------------------------------------------
# Multiple-choice tasks


def byte_successor_model(logit: float = 5.0) -> BigramModel:
    return bigram(successor_table(256, logit))


def test_mc_scorer_picks_the_continuation_the_model_predicts():
    items = [
        MCItem("ab__", ["x", "c", "m"], answer=1),        # "c" follows "b"
        MCItem("__bcd", ["a", "z"], answer=0),            # empty prefix: "a" then the successor run
        MCItem("ab__ef", ["cd", "xy"], answer=1),         # labelled wrong: the model picks "cd"
    ]
    result = task_accuracy(byte_successor_model(), items)
    assert result == {"acc": pytest.approx(2 / 3), "acc_stderr": pytest.approx(math.sqrt(2 / 9 / 3)), "n": 3}


def test_ties_get_no_credit():
    items = [MCItem("ab__", ["c", "d"], answer=0), MCItem("ab__", ["c", "d"], answer=1)]
    assert task_accuracy(bigram(torch.zeros(256, 256)), items)["acc"] == 0.0


def test_length_normalisation_favours_the_long_likely_continuation():
    # Summed: 9 likely bytes (~ -1 nat each) lose to 1 unlikely byte (~ -6 nats); per byte they win.
    items = [MCItem("a__", ["bcdefghij", "x"], answer=0)]
    assert task_accuracy(byte_successor_model(), items)["acc"] == 0.0
    assert task_accuracy(byte_successor_model(), items, length_normalize=True)["acc"] == 1.0


def test_continuation_scores_do_not_depend_on_batching_and_match_a_direct_sum(make_minigpt):
    model = make_minigpt()
    item = MCItem("Yesterday he __ to the store.", ["walk", "walks", "walked"], answer=2)
    sequences = choice_sequences(model, item)
    batched, _ = continuation_log_likelihoods(model, sequences, batch_tokens=1000)
    one_by_one, _ = continuation_log_likelihoods(model, sequences, batch_tokens=1)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    context, continuation, _ = sequences[2]
    full = torch.cat([context, continuation])
    with torch.no_grad():
        log_probs = F.log_softmax(model.logits(full[None])[0, :-1], dim=-1)   # (L-1, V)
    direct = log_probs[torch.arange(len(full) - 1), full[1:]][len(context) - 1:].sum()
    assert float(batched[2]) == pytest.approx(float(direct), abs=1e-4)


def test_prefix_whitespace_moves_to_the_continuation(make_minigpt):
    model = make_minigpt()
    (context, continuation, n_bytes), _ = choice_sequences(model, MCItem("He __ home.", ["ran", "runs"], 0))
    assert model.decode(context) == "He"
    assert model.decode(continuation) == " ran home."
    assert n_bytes == len(" ran home.")


@given(lengths=st.lists(st.integers(1, 40), max_size=30), batch_tokens=st.integers(1, 120))
def test_length_batches_cover_every_sequence_once_within_the_token_budget(lengths, batch_tokens):
    batches = length_batches(lengths, batch_tokens)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= batch_tokens or len(batch) == 1


def test_no_items_give_no_accuracy(make_minigpt):
    assert task_accuracy(make_minigpt(), []) == {"acc": None, "acc_stderr": None, "n": 0}


# ---------------------------------------------------------------------------------------------
# NaN counting and evaluate()


def test_nan_count_catches_injected_nan_and_inf(make_minigpt):
    model = make_minigpt()
    assert nan_count(model) == 0
    with torch.no_grad():
        model.module.blocks[0].mlp.c_fc.weight[3, 5] = float("nan")
        model.module.ln_f.bias[0] = float("inf")
    assert nan_count(model) == 2


def test_evaluate_reports_nan_logits_as_none_metrics_in_strict_json(make_minigpt):
    baseline = make_minigpt()
    broken = perturbed(baseline, scale=0.0)
    with torch.no_grad():
        broken.module.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    plan = EvalPlan(random_bytes(128), seq_len=64, tasks={"t": [MCItem("ab__", ["c", "d"], 0)]})
    result = evaluate(broken, plan, baseline)
    assert result["nan_count"] > 1                       # the weight plus the logits it poisons
    assert result["ppl"] is None and result["kld_mean"] is None and result["ppl_gap"] is None
    assert result["tasks"]["t"]["acc"] == 0.0
    json.dumps(result, allow_nan=False)                  # raises on NaN or Inf


def test_evaluate_returns_every_metric_key_with_none_for_what_was_not_computed(make_minigpt):
    model = make_minigpt()
    result = evaluate(model, EvalPlan(random_bytes(200), seq_len=64, kl=True))
    assert set(result) == set(METRIC_KEYS)
    assert result["kld_mean"] is None and result["top1_agreement"] is None   # no baseline given
    assert "bytes_total" not in result and result["ppl_gap"] is None   # bytes come from the accountant
    assert result["tasks"] == {}
    assert result["eval_tokens"] == 3 * 63 and result["tokens_per_second"] > 0


def test_evaluate_runs_the_model_once_per_window_batch_and_reuses_cached_baseline(make_minigpt):
    baseline = counting(make_minigpt())
    plan = EvalPlan(random_bytes(64 * 5), seq_len=64, batch_size=2)
    prepared = BaselineLogProbs(baseline, plan)
    assert baseline.calls == 3
    quantized = counting(perturbed(baseline.inner))
    evaluate(quantized, plan, prepared)
    evaluate(quantized, plan, prepared)
    assert quantized.calls == 2 * 3 and baseline.calls == 3


def test_evaluate_ppl_gap_is_relative_to_the_baseline_on_the_same_windows(make_minigpt):
    baseline = make_minigpt()
    quantized = perturbed(baseline)
    tokens = random_bytes(256)
    plan = EvalPlan(tokens, seq_len=64)
    result = evaluate(quantized, plan, baseline)
    expected = result["ppl"] / perplexity(baseline, tokens, seq_len=64)["ppl"] - 1
    assert result["ppl_gap"] == pytest.approx(expected, rel=1e-6)
    assert evaluate(baseline, plan, baseline)["ppl_gap"] == 0.0


def test_evaluate_keeps_per_window_means_per_item_correctness_and_the_paired_statistics(make_minigpt):
    baseline = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 4), seq_len=64, tasks={"t": [MCItem("ab__", ["c", "d"], 0)] * 3})
    result = evaluate(perturbed(baseline), plan, baseline)
    assert len(result["window_nll"]) == len(result["window_kld"]) == len(result["window_top1"]) == 4
    # ppl is exp of the mean of the per-window means (every window scores the same number of tokens)
    assert math.exp(sum(result["window_nll"]) / 4) == pytest.approx(result["ppl"])
    assert math.exp(result["ln_ppl_ratio"]) - 1 == pytest.approx(result["ppl_gap"])
    assert result["ppl_gap_stderr"] == pytest.approx(math.exp(result["ln_ppl_ratio"]) * result["ln_ppl_ratio_stderr"])
    assert result["kld_percentiles"]["median"] == result["kld_median"] and result["kld_percentiles"]["p99"] == result["kld_p99"]
    assert sum(result["window_kld"]) / 4 == pytest.approx(result["kld_mean"])
    assert result["tasks"]["t"]["correct"] in ([0, 0, 0], [1, 1, 1]) and result["tasks"]["t"]["n"] == 3
    json.dumps(result, allow_nan=False)
    alone = evaluate(baseline, plan)                        # no baseline: only window_nll of the new keys
    assert len(alone["window_nll"]) == 4 and alone["ln_ppl_ratio"] is None and alone["kld_percentiles"] is None


# ---------------------------------------------------------------------------------------------
# The baseline's log-probs stored once in a float16 file


def mapped_resident_kb(path: Path) -> int:
    """This process's resident kB of its memory mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_stored_baseline_is_read_a_window_at_a_time_not_kept_resident_through_a_mapping(make_minigpt, tmp_path):
    # Pages of a memory-mapped file count in the resident set once touched: reading the stored log-probs
    # through the mapping left the whole file resident, however few windows were in use at a time.
    baseline = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 5), seq_len=64, batch_size=2, kl=True)
    path = tmp_path / "base.npy"
    prepared = BaselineLogProbs(baseline, plan, path=path)
    result = evaluate(perturbed(baseline, seed=0), plan, prepared)
    assert result["kld_mean"] > 0 and prepared.stored is not None
    assert mapped_resident_kb(path) == 0 and mapped_resident_kb(prepared.top1_path) == 0
    rows = prepared.for_windows(3, plan.windows()[3:5])        # the rows asked for, read from the file
    with torch.inference_mode():
        expected = next_token_log_probs(baseline.logits(plan.windows()[3:5]))
    assert rows.shape == expected.shape and (rows - expected).abs().max() < 1e-2


def test_stored_baseline_runs_the_baseline_once_for_any_number_of_schemes(make_minigpt, tmp_path):
    baseline = counting(make_minigpt())
    plan = EvalPlan(random_bytes(64 * 5), seq_len=64, batch_size=2)
    prepared = BaselineLogProbs(baseline, plan, path=tmp_path / "base.npy")
    assert baseline.calls == 3 and prepared.stored is not None and prepared.cached is None
    for seed in range(4):                                      # N = 4 schemes, one pass each
        quantized = counting(perturbed(baseline.inner, seed=seed))
        evaluate(quantized, plan, prepared)
        assert quantized.calls == 3
    assert baseline.calls == 3
    assert (tmp_path / "base.npy").stat().st_size >= 5 * 63 * 256 * 2   # float16: 2 bytes a logit
    again = counting(baseline.inner)
    BaselineLogProbs(again, plan, path=tmp_path / "base.npy")   # an existing file: no forward at all
    assert again.calls == 0


def test_a_half_written_baseline_file_is_never_read(make_minigpt, tmp_path):
    model = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 4), seq_len=64, batch_size=1)
    path = tmp_path / "base.npy"

    class Interrupted(Exception):
        pass

    failing = counting(model)
    original = failing.logits

    def logits(tokens):
        if failing.calls == 2:
            raise Interrupted
        return original(tokens)

    failing.logits = logits
    with pytest.raises(Interrupted):
        BaselineLogProbs(failing, plan, path=path)
    assert not path.exists() and list(tmp_path.iterdir()) == []    # the temporary file is gone too
    # A file of the wrong shape (another plan's, or truncated by hand) is not read either: rewritten.
    path.write_bytes(b"\x93NUMPY truncated")
    rerun = counting(model)
    stored = BaselineLogProbs(rerun, plan, path=path)
    assert rerun.calls == 4
    exact = BaselineLogProbs(model, plan)
    assert torch.allclose(stored.for_windows(0, plan.windows()), exact.cached, atol=4e-3)


@pytest.mark.parametrize("baseline_kind", ["stored", "cached", "recomputed", "itself"])
def test_positions_scored_in_pieces_give_the_whole_windows_numbers_bit_for_bit(make_minigpt, tmp_path, monkeypatch,
                                                                               baseline_kind):
    from quantlab import evaluate as evaluation

    model = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 12), seq_len=64, batch_size=4)
    baseline = {"stored": lambda: BaselineLogProbs(model, plan, path=tmp_path / "base.npy"),
                "cached": lambda: BaselineLogProbs(model, plan),
                "recomputed": lambda: BaselineLogProbs(model, plan, max_cached_bytes=0),
                "itself": lambda: BaselineLogProbs(model, plan)}[baseline_kind]()
    scheme = model if baseline_kind == "itself" else perturbed(model, scale=0.2)
    whole = evaluation.run_windows(scheme, plan, baseline)
    # 4 windows x 256 logits x 4 bytes x 10 positions: pieces of 10 of the 63 scored positions.
    monkeypatch.setattr(evaluation, "SCORE_PIECE_BYTES", 4 * 256 * 4 * 10)
    seen = []
    log_probs_of = evaluation.next_token_log_probs_of
    monkeypatch.setattr(evaluation, "next_token_log_probs_of", lambda x: seen.append(x.shape[1]) or log_probs_of(x))
    pieces = evaluation.run_windows(scheme, plan, baseline)
    # 63 = 6 x 10 + 3 per chunk of windows; a recomputed baseline's own log-probs are whole windows (63).
    assert set(seen) == ({10, 3, 63} if baseline_kind == "recomputed" else {10, 3})
    for field in ("nll", "baseline_nll", "kld", "top1_agree"):
        assert torch.equal(getattr(pieces, field), getattr(whole, field)), field


def test_float16_storage_moves_kl_and_the_paired_statistics_less_than_their_standard_errors(make_minigpt, tmp_path):
    model = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 16), seq_len=64, batch_size=4)
    exact = BaselineLogProbs(model, plan)
    stored = BaselineLogProbs(model, plan, path=tmp_path / "base.npy")
    for scale in (0.05, 0.5):
        quantized = perturbed(model, scale=scale)
        a, b = evaluate(quantized, plan, exact), evaluate(quantized, plan, stored)
        shifts = {
            "kld_mean": (abs(a["kld_mean"] - b["kld_mean"]), a["kld_stderr"]),
            "top1_agreement": (abs(a["top1_agreement"] - b["top1_agreement"]), a["top1_agreement_stderr"]),
            "ppl_gap": (abs(a["ppl_gap"] - b["ppl_gap"]), a["ppl_gap_stderr"]),
            "ln_ppl_ratio": (abs(a["ln_ppl_ratio"] - b["ln_ppl_ratio"]), a["ln_ppl_ratio_stderr"]),
            "delta_p_mean": (abs(a["delta_p_mean"] - b["delta_p_mean"]), a["delta_p_stderr"]),
            "delta_p_rms": (abs(a["delta_p_rms"] - b["delta_p_rms"]), a["delta_p_rms_stderr"]),
        }
        print(scale, {k: (f"{d:.2e}", f"{se:.2e}") for k, (d, se) in shifts.items()})
        for name, (shift, stderr) in shifts.items():
            assert shift < stderr, name
        # The stated tolerance: float16 rounding (|error| <= 2^-11 relative in log p) moves kld by < 1e-4 + 1%.
        assert b["kld_mean"] == pytest.approx(a["kld_mean"], rel=1e-2, abs=1e-4)
    same = evaluate(model, plan, stored)                  # the baseline against its own stored log-probs
    assert abs(same["kld_mean"]) < 1e-5 and abs(same["ppl_gap"]) < 1e-4 and same["top1_agreement"] > 0.999


def test_a_second_spec_run_on_the_same_cache_reuses_the_stored_baseline(make_minigpt, tmp_path):
    from types import SimpleNamespace

    from quantlab.cache import SchemeCache
    from quantlab.pipeline import SpecRun
    from quantlab.spec import parse_spec

    spec = parse_spec({"model": "minigpt-shakespeare", "evaluation": {"seq_len": 32, "kl_divergence": True},
                       "schemes": {"fp32": "fp32", "rtn": "int4-g64"}}, "<test>", name="test/baseline")
    model = counting(make_minigpt(block_size=32))
    calls = []
    for enabled in (True, True, False):
        runner = SpecRun(spec, SchemeCache(tmp_path / "cache", enabled=enabled))
        runner.__dict__["model"] = model.inner
        runner.__dict__["_eval_tokens"] = {(spec.evaluation.dataset, spec.evaluation.split): random_bytes(32 * 6)}
        runner.__dict__["baseline_quantized"] = lambda spec: SimpleNamespace(model=model)
        before = model.calls
        prepared = runner.baseline_log_probs(spec)
        assert runner.baseline_log_probs(spec) is prepared
        calls.append(model.calls - before)
        assert prepared.stored is not None
        if not enabled:   # no cache: a temporary file outside the cache directory, removed with the run
            assert not prepared.path.is_relative_to(tmp_path)
            temporary = prepared.path.parent
            del runner, prepared
            gc.collect()
            assert not temporary.exists()
    assert calls == [1, 0, 1]     # 6 windows in one batch of 8
    assert len(list((tmp_path / "cache").glob("baseline-*.f16.npy"))) == 1   # and its .top1.npy


def test_baseline_log_probs_too_large_for_the_file_budget_are_not_written(make_minigpt, tmp_path):
    # SmolLM2 on a CI-sized split would write gigabytes into the cache directory: above the budget the
    # baseline is kept in memory or recomputed, as without a file.
    baseline = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 3), seq_len=64)
    prepared = BaselineLogProbs(baseline, plan, path=tmp_path / "base.npy", max_file_bytes=1000)
    assert prepared.path is None and prepared.cached is not None
    assert list(tmp_path.iterdir()) == []


def test_the_baseline_scored_against_its_stored_log_probs_is_exactly_itself(make_minigpt, tmp_path):
    # The float16 file is for the other schemes; the baseline's own row must read KL 0, not the storage floor.
    baseline = make_minigpt()
    plan = EvalPlan(random_bytes(64 * 3), seq_len=64)
    result = evaluate(baseline, plan, BaselineLogProbs(baseline, plan, path=tmp_path / "base.npy"))
    assert result["kld_mean"] == 0.0 and result["ppl_gap"] == 0.0 and result["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------------------------
# A model with a separate head: its logits a few windows at a time


def test_a_model_with_a_head_gets_its_logits_a_chunk_of_windows_at_a_time(monkeypatch, tiny_llama_dir):
    from quantlab import evaluate as evaluation
    from quantlab.models import load_model

    model = load_model(f"hf:{tiny_llama_dir}")
    windows = torch.randint(0, model.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluation, "LOG_PROBS_CHUNK_BYTES", 2 * 15 * model.vocab_size * 4)   # two windows
    parts = list(evaluation.window_logits(model, windows, batch_size=4, device="cpu"))
    assert [(start, len(batch), tuple(logits.shape)) for start, batch, logits in parts] == [
        (0, 2, (2, 16, model.vocab_size)), (2, 2, (2, 16, model.vocab_size)), (4, 1, (1, 16, model.vocab_size))]
    assert torch.equal(torch.cat([batch for _, batch, _ in parts]), windows)
    with torch.inference_mode():
        whole = torch.cat([model.logits(windows[:4]), model.logits(windows[4:])])
    assert torch.allclose(torch.cat([logits for _, _, logits in parts]), whole, rtol=1e-5, atol=1e-5)


def test_a_quantized_model_evaluates_alike_with_its_head_in_chunks(monkeypatch, tiny_llama_dir):
    from quantlab import evaluate as evaluation
    from quantlab.calibrate import quantize_model
    from quantlab.models import load_model
    from quantlab.quant import Scheme

    model = load_model(f"hf:{tiny_llama_dir}")
    before = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    quantized = quantize_model(model, Scheme(4, group_size=16), None).model
    plan = EvalPlan(torch.randint(0, model.vocab_size, (200,), generator=torch.Generator().manual_seed(1)),
                    seq_len=16, batch_size=4, kl=True)
    batched = evaluation.run_windows(quantized, plan, BaselineLogProbs(model, plan))
    monkeypatch.setattr(evaluation, "LOG_PROBS_CHUNK_BYTES", 1)                                # one window
    chunked = evaluation.run_windows(quantized, plan, BaselineLogProbs(model, plan))
    assert torch.allclose(chunked.nll, batched.nll, rtol=1e-5, atol=1e-6)
    assert torch.allclose(chunked.kld, batched.kld, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, before[name]) for name, p in model.module.named_parameters())  # float model kept


def test_a_swapped_model_runs_a_block_with_that_blocks_values_alone(tiny_llama_dir):
    from quantlab.models import load_model
    from quantlab.swap import SwappedModel

    model = load_model(f"hf:{tiny_llama_dir}")
    names = [model.linear_names(0)[0] + ".weight", model.linear_names(1)[0] + ".weight",
             next(name for name, _ in model.module.named_parameters() if "embed" in name)]
    calls = dict.fromkeys(names, 0)

    def counted(name):
        def value(data):
            calls[name] += 1
            return data
        return value

    swapped = SwappedModel(model, {name: counted(name) for name in names})
    with torch.inference_mode():
        hidden, kwargs = swapped.block_inputs(torch.zeros(1, 8, dtype=torch.long))
        assert calls == {names[0]: 0, names[1]: 0, names[2]: 1}
        swapped.run_block(0, hidden, kwargs)
    assert calls == {names[0]: 1, names[1]: 0, names[2]: 1}


def test_task_scoring_gets_a_models_logits_a_chunk_of_sequences_at_a_time(monkeypatch, tiny_llama_dir):
    from quantlab import evaluate as evaluation
    from quantlab.models import load_model

    model = load_model(f"hf:{tiny_llama_dir}")
    generator = torch.Generator().manual_seed(2)
    sequences = [(torch.randint(0, model.vocab_size, (n,), generator=generator),
                  torch.randint(0, model.vocab_size, (3,), generator=generator), 3) for n in (4, 5, 5, 6, 9)]
    whole, _ = evaluation.continuation_log_likelihoods(model, sequences, batch_tokens=64)
    monkeypatch.setattr(evaluation, "LOG_PROBS_CHUNK_BYTES", 1)   # the head on one sequence at a time
    rows_seen = []
    head = model.module.get_submodule(model.head_names[-1])
    handle = head.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        chunked, nonfinite = evaluation.continuation_log_likelihoods(model, sequences, batch_tokens=64)
    finally:
        handle.remove()
    assert rows_seen == [1] * len(sequences) and nonfinite == 0
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_block_major_logits_are_a_batch_by_batch_forwards_to_the_bit(make_minigpt):
    # The same blocks on the same batch shapes: MiniGPT's golden perplexities rest on this.
    from quantlab import evaluate as evaluation
    from quantlab.calibrate import quantize_model
    from quantlab.quant import Scheme

    model = make_minigpt()
    windows = random_bytes(64 * 5).reshape(5, 64)
    for computed in (model, quantize_model(model, Scheme(4, group_size=16), None).model):
        parts = list(evaluation.window_logits(computed, windows, batch_size=2, device="cpu"))
        assert [(start, len(batch)) for start, batch, _ in parts] == [(0, 2), (2, 2), (4, 1)]
        with torch.inference_mode():
            for start, batch, logits in parts:
                assert torch.equal(logits, computed.logits(batch))


def test_an_evaluation_swaps_each_blocks_values_in_once_per_pass(monkeypatch, make_minigpt):
    from quantlab import evaluate as evaluation
    from quantlab.swap import SwappedModel

    model = make_minigpt()
    name = model.linear_names(1)[0] + ".weight"
    calls = []
    swapped = SwappedModel(model, {name: lambda data: calls.append(1) or data * 0.5})
    plan = EvalPlan(random_bytes(64 * 6), seq_len=64, batch_size=2)                   # 6 windows, 3 batches
    once = evaluate(swapped, plan)
    assert len(calls) == 1
    # Passes of two batches' hidden states (each batch's are 2 x 64 x C float32): two passes, two swaps.
    monkeypatch.setattr(evaluation, "BLOCK_STATES_BYTES", 2 * 2 * 64 * model.module.config.n_embd * 4)
    calls.clear()
    twice = evaluate(swapped, plan)
    assert len(calls) == 2 and twice["ppl"] == once["ppl"]
    with torch.inference_mode():                                  # ... and what a swap per call computes
        nll = [F.cross_entropy(swapped.logits(w[None])[0, :-1], w[1:]) for w in plan.windows()]
    assert once["ppl"] == pytest.approx(math.exp(float(torch.stack(nll).mean())), rel=1e-5)
    assert all(not p.is_inference() for p in model.module.parameters())
