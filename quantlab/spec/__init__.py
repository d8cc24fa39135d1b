"""YAML experiment specs: ``located`` reads YAML with line marks, ``schema`` validates a spec into
dataclasses (``schemes`` its schemes, ``references`` what it names outside itself: model, data, tasks,
folders), ``checks`` is the assertion language. What the rest of quantlab and users import:"""
from quantlab.spec.checks import CHECKS, OPERATORS, Expectation, Outcome, check, metric_value
from quantlab.spec.located import SpecError, read_yaml
from quantlab.spec.schema import (DEFAULT_KEEP, MARKERS, PLOTS, SWEEPABLE, CalibrationConfig, EvaluationConfig,
                                  GoldenConfig, ReportConfig, Spec, as_spec, load_spec, parse_size, parse_spec,
                                  spec_name_for)
from quantlab.spec.schemes import SCHEME_METHODS, SchemeConfig

__all__ = ["CHECKS", "OPERATORS", "Expectation", "Outcome", "check", "metric_value", "SpecError", "read_yaml",
           "DEFAULT_KEEP", "MARKERS", "PLOTS", "SCHEME_METHODS", "SWEEPABLE", "CalibrationConfig",
           "EvaluationConfig", "GoldenConfig", "ReportConfig", "SchemeConfig", "Spec", "as_spec", "load_spec",
           "parse_size", "parse_spec", "spec_name_for"]
