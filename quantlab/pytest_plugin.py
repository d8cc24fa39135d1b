"""quantlab's pytest plugin: turns specs/**/*.yaml into tests. Registered via the pytest11 entry point.

Heavy imports (torch, the engine) happen inside functions so `pytest --help` stays fast.
"""
from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("quantlab", "quantlab quantization specs")
    group.addoption("--quantlab-no-cache", action="store_true", default=False,
                    help="recompute every spec run instead of reusing cached results")
    group.addoption("--quantlab-out", metavar="DIR", default=None,
                    help="directory for results.json, manifest.json and plots (default: .quantlab/out)")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs the SmolLM2-135M GGUF (pip-fetched into the cache)")
    config.addinivalue_line("markers", "quantlab_spec: a test generated from a quantlab YAML spec")
