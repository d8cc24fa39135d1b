"""`quantlab export SPEC --scheme NAME --out DIR`: a tiny random Llama saved to tmp_path (nothing from a hub),
quantized as the pipeline does, written, and loaded back with transformers."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM  # noqa: E402

from quantlab import export  # noqa: E402
from quantlab.cli import main  # noqa: E402
from quantlab.cache import SchemeCache  # noqa: E402
from quantlab.pipeline import SpecRun  # noqa: E402
from quantlab.spec import load_spec  # noqa: E402

VOCAB = 300   # conftest's tiny Llama
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def spec_path(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    corpus = folder / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 200)
    spec = folder / "tiny.yaml"
    spec.write_text(f"""
name: tiny/export
model: "hf:{llama_dir}"
calibration: {{dataset: "text:{corpus}", samples: 4, seq_len: 32, batch_size: 4}}
evaluation: {{dataset: "text:{corpus}", seq_len: 32, max_tokens: 64}}
schemes:
  fp32: fp32
  int4-g32: {{bits: 4, group_size: 32, method: rtn}}
  int4-g32-gptq: {{bits: 4, group_size: 32, method: gptq}}
  int4-g32-gptq-ao: {{bits: 4, group_size: 32, method: gptq, act_order: true}}
  int3-g32: {{bits: 3, group_size: 32, method: rtn}}
""")
    return spec


def test_export_writes_a_compressed_tensors_directory_that_transformers_loads(spec_path, tmp_path, capsys, one_thread):
    out = tmp_path / "int4-g32"
    assert main(["export", str(spec_path), "--scheme", "int4-g32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "on disk" in printed and "bytes_total" in printed
    loaded = AutoModelForCausalLM.from_pretrained(out)
    spec = load_spec(spec_path)
    quantized = SpecRun(spec, SchemeCache(None, enabled=False)).quantize(spec, spec.schemes["int4-g32"])
    with torch.no_grad():
        got = loaded(input_ids=TOKENS).logits.float()
    # The same codes and scales the pipeline evaluates: symmetric pack-quantized dequantizes exactly.
    assert float((got - quantized.model.logits(TOKENS)).abs().max()) <= 1e-5
    # A second export into the same place is refused unless asked for.
    assert main(["export", str(spec_path), "--scheme", "int4-g32", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(spec_path), "--scheme", "int4-g32", "--out", str(out), "--overwrite"]) == 0


def test_export_of_a_gptq_scheme_calibrates_as_the_pipeline_does(spec_path, tmp_path, one_thread):
    out = tmp_path / "gptq"
    assert main(["export", str(spec_path), "--scheme", "int4-g32-gptq", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config is not None


def test_export_as_gguf_writes_scheme_gguf_that_transformers_loads(spec_path, tmp_path, capsys, one_thread):
    assert main(["export", str(spec_path), "--scheme", "int4-g32", "--out", str(tmp_path), "--format", "gguf"]) == 0
    assert "int4-g32.gguf" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="int4-g32.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=TOKENS).logits).all()


@pytest.mark.parametrize("scheme, fmt, reason", [
    ("int3-g32", "compressed-tensors", "INT3 has no compressed-tensors weight-only kernel"),
    ("fp32", "compressed-tensors", "float scheme"),
    ("int4-g32-gptq-ao", "gguf", "act-order groups (g_idx) cannot be stored"),
])
def test_a_scheme_that_cannot_be_served_is_refused_before_anything_is_written(spec_path, tmp_path, capsys, scheme,
                                                                              fmt, reason):
    out = tmp_path / "never"
    assert main(["export", str(spec_path), "--scheme", scheme, "--out", str(out), "--format", fmt]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and reason in errors[0]   # one line (transformers' load progress bar aside)
    assert not out.exists()


def test_an_unknown_scheme_is_refused_with_the_defined_ones(spec_path, tmp_path, capsys):
    assert main(["export", str(spec_path), "--scheme", "int8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no scheme 'int8'" in err and "defined: fp32, int4-g32, int4-g32-gptq, int4-g32-gptq-ao, int3-g32" in err
    assert len(err.splitlines()) == 1


def test_minigpt_is_refused_with_the_reason(tmp_path, capsys):
    spec = tmp_path / "minigpt.yaml"
    spec.write_text("model: minigpt-shakespeare\nschemes: {int4-g64: int4-g64}\n")
    assert main(["export", str(spec), "--scheme", "int4-g64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a transformers architecture" in err and "use an hf: model" in err
    assert not (tmp_path / "out").exists()


def test_servability_table_records_both_formats_for_every_scheme(spec_path):
    spec = load_spec(spec_path)
    runner = SpecRun(spec, SchemeCache(None, enabled=False))
    table = export.servability_table(runner.model, spec.schemes)
    assert list(table) == list(spec.schemes)
    assert table["int4-g32"] == {"compressed_tensors": (True, ""), "gguf": (True, "")}
    assert table["fp32"]["gguf"][0] is False and "float scheme" in table["fp32"]["gguf"][1]
    assert table["int3-g32"]["compressed_tensors"][0] is False
    assert table["int3-g32"]["gguf"][0] is False
    # GPTQ with act-order and dynamic groups writes g_idx: GGUF refuses it, symmetric compressed-tensors takes it.
    assert table["int4-g32-gptq-ao"]["compressed_tensors"] == (True, "")
    assert table["int4-g32-gptq-ao"]["gguf"][0] is False
