"""quantlab's pytest plugin: every spec under specs/ (or passed on the command line) becomes tests.

Each spec file is a collector whose items are real ``pytest.Function`` objects, so they get fixtures
like any test: its assertions (one item per assertion per scheme), its golden checks (pytest-regressions'
``num_regression``) and its report entry (pytest-html's ``extras``). The expensive run (calibrate,
quantize, evaluate) happens once per spec per session, on the first item that needs it, and is cached
on disk by the pipeline. Heavy imports happen inside functions so ``pytest --help`` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

_RUNS = pytest.StashKey[dict]()
_RAY = pytest.StashKey[dict]()   # --quantlab-ray: the selected specs, then the fan-out's outcome


def pytest_addoption(parser):
    group = parser.getgroup("quantlab", "quantlab quantization specs")
    group.addoption("--quantlab-no-cache", action="store_true", default=False,
                    help="recompute every scheme instead of reusing cached results")
    group.addoption("--quantlab-out", metavar="DIR", default=".quantlab/out",
                    help="directory for each spec's results.json, manifest.json and plots (default: .quantlab/out)")
    group.addoption("--quantlab-progress", action="store_true", default=False,
                    help="show progress bars and log lines while specs run")
    group.addoption("--quantlab-ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="compute the selected specs' uncached schemes and sweep points as tasks on a Ray cluster "
                         "(ADDRESS, e.g. auto; none: a local one) into the shared results cache before the first "
                         "spec runs; needs quantlab[ray]")


# First among the plugins' pytest_configure hooks: pytest-html reads self_contained_html in its own, and
# the order of the rest is the order in which their distributions are found on sys.path.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs the SmolLM2-135M GGUF (pip-fetched into the cache)")
    config.addinivalue_line("markers", "quantlab_spec: a test generated from a quantlab YAML spec")
    config.stash[_RUNS] = {}
    address = config.getoption("quantlab_ray", None)
    if address is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise pytest.UsageError("--quantlab-ray needs the ray package: pip install 'quantlab[ray]'")
        if config.getoption("quantlab_no_cache"):
            raise pytest.UsageError("--quantlab-ray needs the results cache (workers leave their results there): "
                                    "drop --quantlab-no-cache")
        if getattr(config.option, "numprocesses", None):
            raise pytest.UsageError("--quantlab-ray spreads the specs' schemes over the cluster itself: drop -n "
                                    "(each pytest-xdist worker would fan out its own specs)")
        if address != "local" and Path(address).exists():
            raise pytest.UsageError(f"--quantlab-ray took {address} as the cluster's address; put the test paths "
                                    "before it, or write --quantlab-ray=ADDRESS")
        config.stash[_RAY] = {"specs": []}
    if config.pluginmanager.hasplugin("html"):
        from quantlab.report.html_hooks import HtmlHooks

        config.pluginmanager.register(HtmlHooks(config, _RUNS), "quantlab-html")
        if getattr(config.option, "htmlpath", None):
            config.option.self_contained_html = True  # plots are embedded: keep the report one file


@pytest.hookimpl(optionalhook=True)
def pytest_metadata(metadata: dict, config) -> None:
    """pytest-metadata's hook (its Environment table in the HTML report): the quantlab version."""
    import quantlab

    metadata["quantlab"] = quantlab.__version__


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    if "specs" in file_path.parts or parent.session.isinitpath(file_path):
        return SpecFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_finish(session):
    if _RAY in session.config.stash:   # the specs whose items were selected: what the fan-out computes
        specs = {id(item.parent.spec): item.parent.spec for item in session.items if isinstance(item, SpecFunction)}
        session.config.stash[_RAY]["specs"] = list(specs.values())


class SpecCollectionError(Exception):
    """A malformed spec: reported as its one-line, located message, without a traceback."""


class SpecFile(pytest.File):
    def collect(self):
        from quantlab.spec import SpecError, load_spec

        try:
            spec = load_spec(self.path, display=self._display_path())
        except SpecError as e:
            raise SpecCollectionError(str(e)) from None
        self.spec = spec
        marks = [pytest.mark.quantlab_spec] + [getattr(pytest.mark, m) for m in spec.markers]
        seen = set()
        for exp in spec.expect:
            name = exp.id.replace(" ", "")
            if name in seen:
                name = f"{name}@line{exp.line}"
            seen.add(name)
            item = SpecFunction.from_parent(self, name=name, callobj=_assertion_test(spec, exp))
            item.spec_line = exp.line
            if exp.xfail:
                item.add_marker(pytest.mark.xfail(strict=True, reason=exp.xfail))
            yield _marked(item, marks)
        if spec.golden is not None:
            yield _marked(SpecFunction.from_parent(self, name="golden-metrics", callobj=_golden_metrics_test(spec)), marks)
            if spec.golden.layers is not None:
                yield _marked(SpecFunction.from_parent(self, name="golden-layers", callobj=_golden_layers_test(spec)), marks)
        yield _marked(SpecFunction.from_parent(self, name="report", callobj=_report_test(spec)), marks)

    def _display_path(self) -> str:
        try:
            return self.path.relative_to(self.config.rootpath).as_posix()
        except ValueError:
            return str(self.path)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SpecCollectionError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def _marked(item, marks):
    for mark in marks:
        item.add_marker(mark)
    return item


class SpecFunction(pytest.Function):
    """A test generated from a spec; it reports the spec file and line as its location."""

    spec_line = None

    def reportinfo(self):
        return self.path, (self.spec_line or 1) - 1, f"{self.parent.spec.name}::{self.name}"


# ---------------------------------------------------------------------------------------------
# The shared run


def spec_results(config, spec):
    """The spec's Results, computed on first use and shared by all its items."""
    __tracebackhide__ = True
    runs = config.stash[_RUNS]
    if spec.source not in runs:
        try:
            runs[spec.source] = _run(config, spec)
        except pytest.exit.Exception:
            raise
        except Exception as e:  # a run that cannot happen fails every item of the spec, once
            runs[spec.source] = e
    outcome = runs[spec.source]
    if isinstance(outcome, Exception):
        from quantlab.spec import SpecError

        if isinstance(outcome, (SpecError, FileNotFoundError, ValueError, RuntimeError)):
            pytest.fail(f"{spec.source}: the spec could not run: {outcome}", pytrace=False)
        raise outcome
    return outcome


def _run(config, spec):
    import logging

    from quantlab.pipeline import run

    from quantlab.pipeline import RunInterrupted

    progress = config.getoption("quantlab_progress")
    if progress:
        logging.getLogger("quantlab").setLevel(logging.INFO)
    if _RAY in config.stash:
        _ray_fan_out(config, spec, progress)
    try:
        return run(spec, use_cache=not config.getoption("quantlab_no_cache"), progress=progress)
    except RunInterrupted as e:
        pytest.exit(str(e), returncode=130)   # one line, no traceback, the shell's code for Ctrl-C


def _ray_fan_out(config, spec, progress: bool) -> None:
    """Before the first spec runs, every selected spec's uncached units run as Ray tasks into the cache
    (quantlab.distributed); a spec with a failed unit fails here, naming the scheme, instead of computing
    it in this process."""
    from quantlab.distributed import failure_message, fan_out

    state = config.stash[_RAY]
    if "outcome" not in state:
        try:
            state["outcome"] = fan_out(state["specs"] or [spec], config.getoption("quantlab_ray"), progress=progress)
        except Exception as e:   # no cluster to connect to, say: every spec fails with it, once each
            state["outcome"] = e
    outcome = state["outcome"]
    if isinstance(outcome, Exception):
        raise outcome
    errors = outcome.errors_for(spec)
    if errors:
        raise RuntimeError(failure_message(spec, errors))


def out_dir(config, spec) -> Path:
    return Path(config.getoption("quantlab_out")) / spec.name


# ---------------------------------------------------------------------------------------------
# Test bodies (closures, so each generated item is an ordinary test function with fixtures)


def _assertion_test(spec, exp):
    def test_assertion(request):
        __tracebackhide__ = True
        from quantlab.cli import verdict
        from quantlab.report import assertion_entry
        from quantlab.spec import check

        outcome = check(exp, spec_results(request.config, spec), spec)
        print(outcome.message)
        # For the report's summary: what was measured, against what, and the verdict as `quantlab run` names it.
        request.node.user_properties.append(("quantlab_assertion", assertion_entry(
            exp, outcome, verdict(outcome.passed, exp.xfail)[0], source=spec.source)))
        if not outcome.passed:
            pytest.fail(outcome.message, pytrace=False)

    return test_assertion


def golden_root(spec) -> Path:
    """golden/<spec name>/ beside the specs/ folder the spec lives in (the project root)."""
    parts = (spec.path or Path(spec.source).resolve()).parts
    if "specs" in parts:
        root = Path(*parts[: len(parts) - 1 - parts[::-1].index("specs")])
        return root / "golden" / spec.name
    return Path("golden") / spec.name


def regenerating(config) -> bool:
    """pytest-regressions' --force-regen or --regen-all: golden files are to be re-recorded."""
    return bool(config.getoption("force_regen", False) or config.getoption("regen_all", False))


def _check_fingerprint(request, spec, results) -> None:
    """Refuse to compare against golden files recorded under another evaluation protocol, or whose
    protocol record is missing."""
    __tracebackhide__ = True
    from quantlab.files import write_json

    root = golden_root(spec)
    path = root / "fingerprint.json"
    current = {"fingerprint": results["fingerprint"], "layers": layer_names(results)}
    rows = [label for label, _ in golden_rows(results)]
    if len(rows) > 1:   # a sweep spec: which run each row of a metrics file holds (golden_rows)
        current["rows"] = rows
    current = json.loads(json.dumps(current))
    if regenerating(request.config):
        write_json(path, current)
        return
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != current:
            diffs = _differences(recorded, current)
            pytest.fail(f"{spec.source}: golden files in {path.parent} were recorded under a different evaluation "
                        f"protocol ({'; '.join(diffs[:5])}); these numbers are not comparable, so this is not "
                        f"reported as drift: re-record with --force-regen if the change is intended", pytrace=False)
        return
    recorded_files = sorted(p.name for p in root.glob("*.csv")) if root.is_dir() else []
    if recorded_files:
        pytest.fail(f"{spec.source}: {path} is missing beside the golden files {', '.join(recorded_files)}, so the "
                    "protocol they were recorded under is unknown; restore it (git checkout) or re-record all of "
                    "them with --force-regen", pytrace=False)
    write_json(path, current)


def _differences(old, new, prefix="") -> list:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def golden_regression(request, tmp_path, spec):
    """pytest-regressions' num_regression, built here rather than requested as a fixture: its
    `original_datadir` fixture is module-scoped, and a spec file is not a Python module."""
    from pytest_datadir.plugin import LazyDataDir
    from pytest_regressions.num_regression import NumericRegressionFixture

    return NumericRegressionFixture(LazyDataDir(golden_root(spec), tmp_path), golden_root(spec), request)


def _golden_inputs(request, tmp_path, spec):
    """What both golden checks start from: the regression fixture and the spec's results, once the
    golden files are known to share the current evaluation protocol."""
    __tracebackhide__ = True
    results = spec_results(request.config, spec)
    _check_fingerprint(request, spec, results)
    return golden_regression(request, tmp_path, spec), results


def golden_rows(results) -> list:
    """The runs a golden metrics file gates, one row each: the spec's own run ('spec'), then every point of
    every sweep in order ('calibration.dataset=verbs'), as (label, {scheme: result}). Without a sweep, one row."""
    rows = [("spec", results["results"])]
    for sweep in results.get("sweeps") or []:
        for value, point in zip(sweep["values"], sweep["results"]):
            rows.append((f"{sweep['key']}={value}", point))
    return rows


def layer_names(results) -> list:
    return sorted({n for r in results["results"].values() for n in (r.get("layers") or {})})


def _nan(v):
    return float("nan") if v is None else float(v)


def _recorded_columns(path: Path) -> list:
    """The column names of a golden CSV (pytest-regressions writes an unnamed index column first)."""
    if not path.is_file():
        return []
    header = path.read_text().splitlines()[:1]
    return [c for c in header[0].split(",")[1:]] if header else []


def _stale_columns(config, spec, path: Path, data: dict, what: str) -> Optional[str]:
    """A golden column no current scheme fills is never compared (pytest-regressions ignores extra
    columns): say so, or drop the file under a regen so it is re-recorded without it."""
    stale = [c for c in _recorded_columns(path) if c not in data]
    if not stale:
        return None
    if regenerating(config):
        path.unlink()
        return None
    gone = [c for c in stale if c not in spec.schemes]
    if gone:
        return (f"{what}: scheme {', '.join(gone)} is in the golden file {path.name} but not in the spec; "
                "re-record with --force-regen")
    return (f"{what}: {', '.join(stale)} recorded a value in {path.name} but measure none now (null); fix the "
            "scheme, or re-record with --force-regen if that is intended")


def _golden_metrics_test(spec):
    def test_golden_metrics(request, tmp_path):
        __tracebackhide__ = True
        from quantlab.spec import metric_value

        num_regression, results = _golden_inputs(request, tmp_path, spec)
        failures = []
        rows = [point for _, point in golden_rows(results)]
        for metric in spec.golden.metrics:
            path = golden_root(spec) / f"{metric}.csv"
            # One row per run (the spec's, then each sweep point: golden_rows), so a sweep's other points are
            # gated too. Only what was measured is recorded: a scheme measured nowhere gets no column (a null
            # would be compared as NaN == NaN, never failing); one missing at some points has NaN there.
            values = {scheme: [metric_value({"results": point}, scheme, metric) if scheme in point else None
                               for point in rows] for scheme in spec.schemes}
            data = {scheme: [_nan(v) for v in column] for scheme, column in values.items()
                    if any(v is not None for v in column)}
            stale = _stale_columns(request.config, spec, path, data, metric)
            if stale:
                failures.append((True, stale))
                continue
            if not data:
                continue
            tolerance = {**spec.golden.default_tolerance, **spec.golden.tolerances.get(metric, {})}
            try:
                num_regression.check(data, fullpath=path, default_tolerance=tolerance)
            except (AssertionError, pytest.fail.Exception) as e:  # drift, or a file (re)written: check them all
                failures.append((isinstance(e, AssertionError), f"{metric} (tolerance {tolerance}):\n{e}"))
        if failures:
            what = "golden drift beyond tolerance" if any(drift for drift, _ in failures) else "golden files written"
            pytest.fail(f"{spec.source}: {what}\n\n" + "\n\n".join(text for _, text in failures), pytrace=False)

    return test_golden_metrics


def _golden_layers_test(spec):
    def test_golden_layers(request, tmp_path):
        __tracebackhide__ = True
        num_regression, results = _golden_inputs(request, tmp_path, spec)
        metric = spec.golden.layers["metric"]
        tolerance = {k: v for k, v in spec.golden.layers.items() if k in ("rtol", "atol")}
        names = layer_names(results)
        path = golden_root(spec) / f"layers_{metric}.csv"
        columns = {scheme: [(r.get("layers") or {}).get(n, {}).get(metric) for n in names]
                   for scheme, r in results["results"].items()}
        # Only schemes that measured the metric get a column (RTN without calibration has no rel_loss):
        # an all-NaN column would be compared with equal_nan and could never fail.
        data = {scheme: [_nan(v) for v in values] for scheme, values in columns.items()
                if any(v is not None for v in values)}
        stale = _stale_columns(request.config, spec, path, data, f"per-layer {metric}")
        if stale:
            pytest.fail(f"{spec.source}: {stale}", pytrace=False)
        try:
            num_regression.check(data, fullpath=path, default_tolerance={**spec.golden.default_tolerance, **tolerance})
        except AssertionError as e:
            rows = "\n".join(f"  row {i}: {n}" for i, n in enumerate(names))
            pytest.fail(f"{spec.source}: per-layer {metric} drifted beyond tolerance\n{e}\nrows:\n{rows}", pytrace=False)

    return test_golden_layers


def _report_test(spec):
    def test_report(request):
        __tracebackhide__ = True
        from quantlab.pipeline import write_outputs

        results = spec_results(request.config, spec)
        paths = write_outputs(results, spec, out_dir(request.config, spec))
        if request.config.pluginmanager.hasplugin("html"):
            from quantlab.report.html_hooks import add_html_section

            add_html_section(request, spec, results, paths)
        missing = [p for p in paths.values() if not Path(p).is_file()]
        assert not missing, f"report files were not written: {missing}"
        written = json.loads(Path(paths["results"]).read_text())
        assert set(written["results"]) == set(spec.schemes), "results.json lacks schemes of the spec"

    return test_report
