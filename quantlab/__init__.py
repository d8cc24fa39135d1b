"""quantlab: a spec-driven test-and-benchmark suite for post-training weight quantization."""

__version__ = "0.1.0"


def run(spec, **kwargs):
    """Run a spec (a path or a dict) end to end and return its Results. See quantlab.pipeline."""
    from quantlab.pipeline import run as _run

    return _run(spec, **kwargs)
