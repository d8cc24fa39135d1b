"""quantlab: a spec-driven test-and-benchmark suite for post-training weight quantization."""

__version__ = "0.1.0"


def run(spec, **kwargs):
    """Run a spec (a path, a dict or a Spec) end to end and return its RunResult (quantlab.results).
    See quantlab.pipeline.run for the keyword arguments (out_dir, use_cache, cache_dir, progress)."""
    from quantlab.pipeline import run as _run

    return _run(spec, **kwargs)
