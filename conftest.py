# Thin on purpose: the quantlab pytest plugin (entry point `pytest11`) registers the spec collector,
# options and markers. This file only selects the Hypothesis profile for the test run.
import os

from hypothesis import HealthCheck, settings

# CI: derandomized (same examples every run), no deadline (machines differ 3x in speed).
settings.register_profile(
    "ci", max_examples=100, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
