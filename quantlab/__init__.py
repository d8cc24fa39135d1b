"""quantlab: a spec-driven test-and-benchmark suite for post-training weight quantization."""

import os

# OpenMP threads that spin while waiting make GPTQ's many small per-column steps dozens of times slower
# on a busy 2-core machine. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def run(spec, **kwargs):
    """Run a spec (a path or a dict) end to end and return its Results. See quantlab.pipeline."""
    from quantlab.pipeline import run as _run

    return _run(spec, **kwargs)
