"""Ray fan-out (quantlab.distributed) on a two-node cluster on this machine: the MiniGPT catalogue as tasks
gives the sequential run's results.json numbers with each scheme computed once, a failing scheme is
reported under its name while the others finish, and a worker killed mid-task is retried by Ray without
leaving a partial cache entry. The catalogue's specs are shrunk (few windows, short sequences, two sweep
values) so the module runs in about a minute; the units and keys are the catalogue's own."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest_plugins = ["pytester"]
# One torch thread in this process, so the sequential runs and every task (which computes on as many
# threads as its submitter) use one: two tasks at a time on this module's two one-CPU nodes.
pytestmark = pytest.mark.usefixtures("one_thread")

from quantlab import distributed  # noqa: E402
from quantlab import pipeline  # noqa: E402
from quantlab.cache import SchemeCache  # noqa: E402
from quantlab.spec import parse_spec  # noqa: E402

CATALOGUE = sorted((Path(__file__).parent.parent / "specs" / "minigpt").glob("*.yaml"))


def timing(key: str) -> bool:
    """Wall-clock fields (seconds, wall_seconds, eval_seconds, tokens_per_second, ...): never reproducible."""
    return key.endswith("seconds") or key.endswith("per_second")


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine, started once for the module and always stopped."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def shrunk(path: Path):
    """A catalogue spec with its schemes, baseline and sweep key as committed, on less data."""
    data = yaml.safe_load(path.read_text())
    data["calibration"].update(samples=min(data["calibration"]["samples"], 8), seq_len=64)
    if "heldout_samples" in data["calibration"]:
        data["calibration"]["heldout_samples"] = 4
    data["evaluation"].update(seq_len=64, max_tokens=1024)
    if data["evaluation"].get("tasks"):
        data["evaluation"]["task_items"] = 40
    if "sweep" in data:
        (key, values), = data["sweep"].items()
        data["sweep"] = {key: values[:2]}
    data.pop("golden", None)
    return parse_spec(data, str(path), name=f"minigpt/{path.stem}")


def numbers(results_json: Path) -> dict:
    """What a run measured (results, sweeps, fingerprint), without the wall-clock timings."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not timing(k)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    data = json.loads(results_json.read_text())
    return strip({k: data[k] for k in ("results", "sweeps", "fingerprint", "schemes", "baseline")})


def test_catalogue_on_ray_gives_the_sequential_numbers_with_each_scheme_computed_once(cluster, tmp_path, monkeypatch):
    specs = [shrunk(p) for p in CATALOGUE]
    for spec in specs:
        pipeline.run(spec, cache_dir=tmp_path / "seq-cache", out_dir=tmp_path / "seq" / spec.name)

    fanned = distributed.fan_out(specs, cache_dir=tmp_path / "ray-cache", progress=False)
    assert fanned.failures == {}
    # The plan is what the sequential run computed: the same keys, each once, each stored by one task.
    sequential_keys = {p.stem for p in (tmp_path / "seq-cache").glob("*.json") if not p.name.startswith("fingerprint-")}
    assert {u.key for u in fanned.units} == sequential_keys
    assert sorted(f.unit.key for f in fanned.finished) == sorted(sequential_keys)
    assert all(f.computed for f in fanned.finished)
    assert len({f.node for f in fanned.finished}) == 2, "both nodes of the cluster ran tasks"
    assert distributed.plan(specs, SchemeCache(tmp_path / "ray-cache")) == []

    def refuse(*args, **kwargs):
        raise AssertionError("computed in the local process, not on the cluster")

    monkeypatch.setattr(pipeline.SpecRun, "_compute", refuse)
    monkeypatch.setattr(pipeline.SpecRun, "fingerprint", refuse)
    for spec in specs:
        pipeline.run(spec, cache_dir=tmp_path / "ray-cache", out_dir=tmp_path / "ray" / spec.name)
        assert numbers(tmp_path / "ray" / spec.name / "results.json") == \
            numbers(tmp_path / "seq" / spec.name / "results.json"), spec.name
    assert sorted(p.name for p in (tmp_path / "ray-cache").glob("*.json")) == \
        sorted(p.name for p in (tmp_path / "seq-cache").glob("*.json"))


SMALL = {
    "model": "minigpt-shakespeare",
    "calibration": {"samples": 4, "seq_len": 64},
    "evaluation": {"seq_len": 64, "max_tokens": 512, "kl_divergence": True},
    "schemes": {"fp32": "fp32", "int4-g64": "int4-g64"},
    "expect": [{"metric": "nan_count", "scheme": "*", "==": 0}],
}


def small_spec(name, **changes):
    return parse_spec({**json.loads(json.dumps(SMALL)), **changes}, f"<{name}>", name=f"test/{name}")


@pytest.fixture
def bad_checkpoint(tmp_path):
    """A checkpoint file that exists (the spec validates) but is no GGUF: reading it fails on the worker."""
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file" * 8)
    return {"checkpoint": f"gguf:{path}"}


def test_a_failing_scheme_is_reported_under_its_name_and_the_others_finish(cluster, tmp_path, bad_checkpoint):
    one_bad = small_spec("one-bad", schemes={**SMALL["schemes"], "broken": bad_checkpoint})
    bad_baseline = small_spec("bad-baseline", schemes={"broken": bad_checkpoint, "int4-g128": "int4-g128"},
                              baseline="broken")
    fanned = distributed.fan_out([one_bad, bad_baseline], cache_dir=tmp_path / "cache", progress=False)

    errors = fanned.errors_for(one_bad)
    assert len(errors) == 1 and errors[0].startswith("broken: "), errors
    finished = {(f.unit.spec.name, f.unit.scheme) for f in fanned.finished}
    assert {("test/one-bad", "fp32"), ("test/one-bad", "int4-g64")} <= finished
    assert [e.split(":")[0] for e in fanned.errors_for(bad_baseline)] == ["broken", "int4-g128"]
    assert "not run: its baseline broken failed" in fanned.errors_for(bad_baseline)[1]
    cache = SchemeCache(tmp_path / "cache")
    assert all(cache.get(f.unit.key) is not None for f in fanned.finished)


def test_the_cli_names_the_failed_scheme_and_runs_the_other_specs_from_the_cache(cluster, tmp_path, monkeypatch,
                                                                                  capsys, bad_checkpoint):
    from quantlab.cli import main

    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path / "cache"))
    good = {**SMALL, "name": "good"}
    bad = {**SMALL, "schemes": {**SMALL["schemes"], "broken": bad_checkpoint}}
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "specs" / "bad.yaml").write_text(yaml.safe_dump(bad))
    status = main(["run", str(tmp_path / "specs" / "bad.yaml"), str(tmp_path / "specs" / "good.yaml"),
                   "--out", str(tmp_path / "out"), "-q", "--ray"])
    err = capsys.readouterr().err
    assert status == 1
    assert "unit(s) of" in err and "\n  broken: " in err, err
    assert not (tmp_path / "out" / "bad").exists()
    assert (tmp_path / "out" / "good" / "results.json").is_file()


def test_the_cli_refuses_ray_without_the_cache_and_a_path_as_the_address(tmp_path, capsys):
    from quantlab.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    assert main(["run", str(spec), "--no-cache", "--ray"]) == 2
    assert "drop --no-cache" in capsys.readouterr().err
    assert main(["run", "--ray", str(spec), str(spec)]) == 2
    assert "write --ray=ADDRESS" in capsys.readouterr().err


def test_a_worker_that_cannot_see_the_cache_says_so(tmp_path):
    spec = small_spec("unshared")
    (tmp_path / "cache").mkdir()
    with pytest.raises(distributed.CacheNotShared, match="is not visible on node .*shared file system"):
        distributed.compute_unit(spec, "fp32", "k", str(tmp_path / "cache"), ".ray-probe-absent", 1)


def test_pytest_quantlab_ray_runs_the_specs_from_what_the_cluster_stored(cluster, pytester, tmp_path, monkeypatch,
                                                                         bad_checkpoint):
    monkeypatch.setenv("QUANTLAB_RESULTS_CACHE", str(tmp_path / "cache"))
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n    ignore::DeprecationWarning:pytest_html\n")
    pytester.mkdir("specs")
    (pytester.path / "specs" / "small.yaml").write_text(yaml.safe_dump(SMALL))
    bad = {**SMALL, "schemes": {**SMALL["schemes"], "broken": bad_checkpoint}}
    (pytester.path / "specs" / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = pytester.runpytest_inprocess("specs", "--quantlab-ray", "-p", "no:cacheprovider")
    # small: nan_count for two schemes and the report pass; bad: its 4 items fail with the scheme's error.
    result.assert_outcomes(passed=3, failed=4)
    result.stdout.fnmatch_lines(["*1 unit(s) of *bad.yaml failed on the Ray cluster*", "*  broken: *"])
    spec = parse_spec(json.loads(json.dumps(SMALL)), "<x>", name="x")
    assert distributed.plan([spec], SchemeCache(tmp_path / "cache")) == []


def _lock_holder(lock: Path):
    """The pid holding a flock on ``lock`` (from /proc/locks), or None."""
    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
            return int(fields[4])
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc/locks")
def test_a_worker_killed_mid_task_is_retried_and_leaves_no_partial_entry(cluster, tmp_path):
    spec = small_spec("killed", schemes={"fp32": "fp32", "gptq": {"preset": "int4-g64", "method": "gptq"}},
                      calibration={"samples": 16, "seq_len": 128}, evaluation={"seq_len": 128, "max_tokens": 4096})
    cache_dir = tmp_path / "cache"
    target = next(u for u in distributed.plan([spec], SchemeCache(cache_dir)) if u.scheme == "gptq")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(fanned=distributed.fan_out([spec], cache_dir=cache_dir,
                                                                                       progress=False)))
    runner.start()
    killed, deadline = None, time.monotonic() + 90
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        pid = _lock_holder(cache_dir / f"{target.key}.lock")   # held while the worker computes the unit
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.005)
    runner.join(timeout=120)
    assert killed is not None, "the gptq unit finished before it could be killed"
    fanned = outcome["fanned"]
    assert fanned.failures == {}
    retried = next(f for f in fanned.finished if f.unit.key == target.key)
    assert retried.pid != killed and retried.computed
    for entry in cache_dir.glob("*.json"):
        json.loads(entry.read_text())   # every entry whole
    stored = SchemeCache(cache_dir).get(target.key)
    expected = pipeline.SpecRun(spec, SchemeCache(None, enabled=False)).scheme_result(spec, "gptq").to_json()
    assert numbers_of(stored) == numbers_of(expected)


def numbers_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not timing(k) and k != "layers"}
