"""Offloaded models (quantlab.offload): blocks read from safetensors one at a time, the results of the whole model."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from quantlab.calibrate import quantize_model  # noqa: E402
from quantlab.evaluate import BaselineLogProbs, EvalPlan, evaluate  # noqa: E402
from quantlab.models.hf import load_hf  # noqa: E402
from quantlab.offload import NotSafetensors, TensorStore, checkpoint_files, is_placeholder, read_tensors  # noqa: E402
from quantlab.quant import FloatScheme, Scheme  # noqa: E402
from quantlab.testing import tiny_tokenizer  # noqa: E402

LAYERS = 4
SCHEME = Scheme(bits=4, granularity="group", group_size=32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 4-block Llama saved in two safetensors shards (an index maps tensors to files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    module = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
    path = tmp_path_factory.mktemp("offload-llama")
    module.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 300, (6, 32))


def plan_of(tokens):
    return EvalPlan(tokens.reshape(-1), seq_len=32, batch_size=4)


def test_the_checkpoint_is_sharded(llama_dir):
    files = checkpoint_files(llama_dir)
    assert len(set(files.values())) > 1
    assert (llama_dir / "model.safetensors.index.json").is_file()


def test_read_tensors_gives_what_safetensors_reads(llama_dir):
    from safetensors.torch import load_file

    files = checkpoint_files(llama_dir)
    path = files["model.layers.1.mlp.down_proj.weight"]
    expected = load_file(path)
    got = read_tensors(path, list(expected))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_offloaded_logits_equal_the_whole_model(llama_dir, tokens):
    whole, offloaded = load_hf(llama_dir), load_hf(llama_dir, offload=True)
    assert offloaded.head_names == whole.head_names
    assert torch.equal(offloaded.logits(tokens), whole.logits(tokens))
    # Outside a call, no parameter holds weights: blocks, embeddings and head are read as they compute.
    assert all(is_placeholder(p) for p in offloaded.module.parameters())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_offloaded_quantization_gives_the_same_codes_and_metrics(llama_dir, tokens, tmp_path, method):
    whole, offloaded = load_hf(llama_dir), load_hf(llama_dir, offload=True, scratch=tmp_path)
    calibration = tokens[:4] if method == "gptq" else None
    results = []
    for model in (whole, offloaded):
        quantized = quantize_model(model, SCHEME, calibration, method=method, batch_size=2)
        plan = plan_of(tokens)
        baseline_q = quantize_model(model, FloatScheme("float32"), None)
        baseline = BaselineLogProbs(baseline_q.model, plan, path=tmp_path / f"{id(model)}-{method}.npy")
        results.append((quantized, evaluate(quantized.model, plan, baseline=baseline),
                        evaluate(baseline_q.model, plan, baseline=baseline)))
    (whole_q, whole_m, whole_base), (off_q, off_m, off_base) = results
    assert isinstance(off_q.qtensors, TensorStore)
    assert list(off_q.qtensors) == list(whole_q.qtensors)
    for name in whole_q.qtensors:
        assert torch.equal(off_q.qtensors[name].codes, whole_q.qtensors[name].codes), name
        assert torch.equal(off_q.qtensors[name].scales, whole_q.qtensors[name].scales), name
    assert off_q.replaced.keys() == whole_q.replaced.keys()
    assert all(torch.equal(off_q.replaced[k], whole_q.replaced[k]) for k in whole_q.replaced)
    assert off_q.bytes == whole_q.bytes
    # Block-major evaluation computes each window on the same shapes: the same numbers, not merely close.
    for key in ("ppl", "kld_mean", "top1_agreement", "ppl_gap"):
        assert off_m[key] == pytest.approx(whole_m[key], rel=1e-6), key
    assert off_base["ppl"] == pytest.approx(whole_base["ppl"], rel=1e-6)
    assert whole_m["kld_mean"] > 0   # a quantized model that differs from its baseline: the comparison has teeth
    assert off_m["nan_count"] == 0


def test_at_most_one_block_is_resident_at_a_time(llama_dir, tokens, tmp_path):
    model = load_hf(llama_dir, offload=True, scratch=tmp_path)
    seen = []   # blocks holding real weights at each block call, counted independently of BlockOffload

    def count(*_):
        seen.append(sum(not all(is_placeholder(p) for p in block.parameters()) for block in model.blocks))

    handles = [block.register_forward_pre_hook(count) for block in model.blocks]
    try:
        quantized = quantize_model(model, SCHEME, tokens[:4], method="gptq", batch_size=2)
        plan = plan_of(tokens)
        baseline = BaselineLogProbs(model, plan, path=tmp_path / "base.npy")
        loads_before = model.offload.loads
        evaluate(quantized.model, plan, baseline=baseline)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and max(seen) == 1
    assert model.offload.most_resident == 1
    # Block-major evaluation reads each block once, whatever the number of window batches (here 2).
    assert model.offload.loads - loads_before == LAYERS


def test_a_directory_without_safetensors_is_refused_with_a_fix(llama_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama_dir / name).read_bytes())
    with pytest.raises(NotSafetensors, match="save_pretrained"):
        load_hf(tmp_path, offload=True)


def test_an_offloaded_model_refuses_a_float_scheme_it_would_have_to_read_whole(llama_dir):
    model = load_hf(llama_dir, offload=True)
    with pytest.raises(ValueError, match="offload"):
        quantize_model(model, FloatScheme("float16"), None)


def spec_dict(model_dir, corpus, offload: bool) -> dict:
    return {"model": f"hf:{model_dir}", "offload": offload,
            "calibration": {"dataset": f"text:{corpus}", "samples": 4, "seq_len": 32, "batch_size": 2},
            "evaluation": {"dataset": f"text:{corpus}", "seq_len": 32, "max_tokens": 192, "batch_size": 4},
            "schemes": {"fp32": "fp32", "int4-g32": {"bits": 4, "group_size": 32, "method": "rtn"},
                        "int4-g32-gptq": {"bits": 4, "group_size": 32, "method": "gptq"}}}


def test_a_spec_run_with_offload_gives_the_results_of_one_without(llama_dir, tiny_corpus, tmp_path, one_thread):
    import quantlab

    whole = quantlab.run(spec_dict(llama_dir, tiny_corpus, False), use_cache=False)
    offloaded = quantlab.run(spec_dict(llama_dir, tiny_corpus, True), cache_dir=tmp_path)
    assert (tmp_path / "offload").is_dir()   # the offloaded run kept its codes in files there
    for name, result in whole.results.items():
        for key in ("ppl", "kld_mean", "bytes_total", "mean_rel_loss"):
            assert getattr(offloaded.results[name], key) == pytest.approx(getattr(result, key), rel=1e-6), (name, key)
    assert whole.results["int4-g32-gptq"].kld_mean > 0


def test_the_spec_key_offload_is_validated(llama_dir, tiny_corpus, tmp_path):
    from quantlab.spec import SpecError, parse_spec

    assert parse_spec(spec_dict(llama_dir, tiny_corpus, True)).offload is True
    assert parse_spec(spec_dict(llama_dir, tiny_corpus, False)).offload is False
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    with pytest.raises(SpecError, match="safetensors"):
        parse_spec(spec_dict(tmp_path, tiny_corpus, True))
    with pytest.raises(SpecError, match="hf:PATH"):
        parse_spec({**spec_dict(llama_dir, tiny_corpus, True), "model": "minigpt-shakespeare"})


def test_quantizing_never_materialises_a_placeholder(llama_dir, tokens, tmp_path):
    """A placeholder converted (to float16, say) becomes a full tensor: for the blocks not resident that
    is the whole model in memory again (kept values were once taken over every block's parameters)."""
    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        converted = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and is_placeholder(args[0]):
                Watch.converted += 1
            return func(*args, **(kwargs or {}))

    model = load_hf(llama_dir, offload=True, scratch=tmp_path)
    with Watch():
        quantized = quantize_model(model, SCHEME, tokens[:4], method="gptq", batch_size=2)
    assert Watch.converted == 0
    assert quantized.replaced and all(not is_placeholder(v) for v in quantized.replaced.values())
