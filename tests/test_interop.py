"""Artifacts in and out through specs: a scheme listed under ``export:`` is written beside results.json,
and a ``{checkpoint: hf:DIR}`` scheme reads it back and is evaluated beside quantlab's own schemes."""
import json

import pytest

pytest.importorskip("compressed_tensors")

from quantlab.pipeline import run  # noqa: E402
from quantlab.spec import SpecError, parse_spec  # noqa: E402


def spec(model_dir, corpus, extra_schemes=None, export=()):
    schemes = {"fp32": "fp32", "int4-g32-gptq": {"bits": 4, "group_size": 32, "method": "gptq"},
               **(extra_schemes or {})}
    return parse_spec({
        "model": f"hf:{model_dir}",
        "calibration": {"dataset": f"text:{corpus}", "samples": 4, "seq_len": 32, "batch_size": 4},
        "evaluation": {"dataset": f"text:{corpus}", "seq_len": 32, "max_tokens": 128},
        "schemes": schemes, "export": list(export),
        "expect": [{"check": "grid", "scheme": "*", "range": [-7, 7]}],
        "report": {"plots": []},
    }, "<test>", name="tiny/interop")


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = run(spec(tiny_llama_dir, tiny_corpus, export=["int4-g32-gptq"]), out_dir=out,
                  cache_dir=tmp_path_factory.mktemp("cache"))
    return results, out


def test_an_exported_scheme_is_written_beside_results_json_with_its_size(exported):
    _, out = exported
    written = json.loads((out / "results.json").read_text())["exports"]["int4-g32-gptq"]
    assert (out / "export" / "int4-g32-gptq" / "config.json").is_file()
    assert written["format"] == "compressed-tensors" and written["bytes_on_disk"] > 0 and written["bytes_total"] > 0
    assert "Exported checkpoints" in (out / "report.html").read_text()


def test_each_integer_scheme_records_where_it_can_be_served(exported):
    results, _ = exported
    assert results["results"]["int4-g32-gptq"]["servable"]["compressed_tensors"] == [True, ""]
    assert results["results"]["fp32"]["servable"] is None


def test_a_reimported_export_gives_exactly_the_in_process_numbers_and_codes(exported, tiny_llama_dir, tiny_corpus,
                                                                             tmp_path):
    first, out = exported
    checkpoint = f"hf:{out / 'export' / 'int4-g32-gptq'}"
    again = run(spec(tiny_llama_dir, tiny_corpus, {"reimported": {"checkpoint": checkpoint}}),
                cache_dir=tmp_path / "cache")
    ours, theirs = again["results"]["int4-g32-gptq"], again["results"]["reimported"]
    assert ours["ppl"] == first["results"]["int4-g32-gptq"]["ppl"]
    for metric in ("ppl", "kld_mean", "top1_agreement", "nan_count", "bytes_linear"):
        assert theirs[metric] == ours[metric], metric
    assert theirs["codes"] == ours["codes"] == {"min": -7, "max": 7}
    assert again["schemes"]["reimported"] == {"method": "checkpoint", "checkpoint": checkpoint}
    assert theirs["bytes_on_disk"] > 0


def test_a_checkpoint_of_another_model_is_refused_with_the_reason(exported, tiny_corpus, tmp_path):
    from quantlab.testing import tiny_llama, tiny_tokenizer

    other = tmp_path / "wider-llama"
    tiny_llama(hidden_size=96).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    _, out = exported
    checkpoint = f"hf:{out / 'export' / 'int4-g32-gptq'}"
    with pytest.raises(ValueError, match="must quantize the spec's own model"):
        run(spec(other, tiny_corpus, {"theirs": {"checkpoint": checkpoint}}), cache_dir=tmp_path / "cache")


def test_export_lists_only_defined_integer_schemes(tiny_llama_dir, tiny_corpus):
    with pytest.raises(SpecError, match="only integer schemes"):
        spec(tiny_llama_dir, tiny_corpus, export=["fp32"])
