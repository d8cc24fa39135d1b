"""load_model / list_models / model_checksum: names, errors, caching and checksums, without real models.

MiniGPT is replaced by a tiny random checkpoint in a temp directory (the committed one is tested with
the data and training code); `hf:` uses a tiny Llama saved with save_pretrained.
"""
import shutil

import pytest
import torch

from quantlab.models import list_models, load_model, model_checksum, registry
from quantlab.models import minigpt


@pytest.fixture
def tiny_minigpt_checkpoint(tmp_path, monkeypatch):
    """A random 1-layer MiniGPT saved where the registry looks for 'minigpt-shakespeare', and an
    empty in-process cache so the real model is neither used nor polluted."""
    torch.manual_seed(0)
    module = minigpt.MiniGPT(minigpt.MiniGPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    minigpt.save_checkpoint(module, tmp_path / "minigpt-shakespeare")
    monkeypatch.setattr(minigpt, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(registry, "_loaded", {})
    return tmp_path / "minigpt-shakespeare"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_models_hf import tiny_model, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_list_models_describes_every_accepted_name_in_one_line():
    names = list_models()
    assert {"minigpt-shakespeare", "smollm2-135m", "hf:PATH"} <= set(names)
    assert all(description and "\n" not in description for description in names.values())


def test_unknown_model_error_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_model("gpt-5")
    for name in list_models():
        assert name in str(error.value)


def test_builtin_model_is_loaded_once_per_process(tiny_minigpt_checkpoint):
    first = load_model("minigpt-shakespeare")
    assert first.name == "minigpt-shakespeare"
    assert first.module.config.n_layer == 1  # the temp checkpoint, not the committed one
    assert load_model("minigpt-shakespeare") is first


def test_hf_uri_loads_a_local_directory(hf_dir):
    model = load_model(f"hf:{hf_dir}")
    assert model.name == f"hf:{hf_dir}"
    assert len(model.blocks) == 2
    assert model.logits(model.encode("To be")[None]).shape[-1] == model.vocab_size


def test_hf_uri_to_a_missing_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face model directory"):
        load_model(f"hf:{tmp_path / 'nowhere'}")


def test_hf_checksum_depends_on_file_contents_not_on_where_they_are(hf_dir, tmp_path):
    copied = shutil.copytree(hf_dir, tmp_path / "elsewhere")
    assert model_checksum(f"hf:{copied}") == model_checksum(f"hf:{hf_dir}")
    config = copied / "config.json"
    config.write_text(config.read_text() + " ")  # same JSON, different bytes: still a different file
    assert model_checksum(f"hf:{copied}") != model_checksum(f"hf:{hf_dir}")


def test_minigpt_checksum_follows_its_checkpoint_files(tiny_minigpt_checkpoint):
    before = model_checksum("minigpt-shakespeare")
    assert before == model_checksum("minigpt-shakespeare")
    config = tiny_minigpt_checkpoint / "config.json"
    config.write_text(config.read_text() + " ")
    assert model_checksum("minigpt-shakespeare") != before


def test_smollm2_checksum_is_its_pinned_gguf_hash_and_needs_no_download(monkeypatch):
    from quantlab.models import gguf

    def no_fetching(*args, **kwargs):
        raise AssertionError("model_checksum must not fetch anything")

    monkeypatch.setattr(gguf, "fetch_package", no_fetching)
    assert model_checksum("smollm2-135m") == gguf.SMOLLM2_135M.sha256


def test_checksum_of_an_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="minigpt-shakespeare"):
        model_checksum("nope")
