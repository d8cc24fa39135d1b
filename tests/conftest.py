"""Fixtures shared by quantlab's own tests: tiny models built in-process, and one-thread torch."""
import pytest
import torch

from quantlab.testing import torch_threads
from quantlab.models.minigpt import MiniGPT, MiniGPTConfig, wrap


def build_minigpt(seed: int = 0, *, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, block_size: int = 64):
    """A randomly initialised byte-level MiniGPT, wrapped as a quantlab LanguageModel."""
    torch.manual_seed(seed)
    return wrap(MiniGPT(MiniGPTConfig(vocab_size=256, block_size=block_size, n_layer=n_layer, n_head=n_head,
                                      n_embd=n_embd)))


@pytest.fixture(scope="session")
def make_minigpt():
    """The factory ``build_minigpt(seed=0, n_layer=2, n_head=2, n_embd=32, block_size=64)``."""
    return build_minigpt


@pytest.fixture(scope="module")
def minigpt():
    """One tiny random MiniGPT shared by a module's tests (never modified by them)."""
    return build_minigpt()


@pytest.fixture
def one_thread():
    """Tiny models and matrices on one torch thread: work this small does not split, and on a busy
    machine a second OpenMP thread only adds waiting (benchmarks/bench_gptq.py measures the solver)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer, saved as a Hugging Face directory (nothing from a hub)."""
    pytest.importorskip("transformers")
    from quantlab.testing import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 200)
    return corpus
