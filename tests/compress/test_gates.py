"""CI gates: budget parsing, the statistical baseline comparison, JUnit / markdown outputs, and the real CLI
(`python -m compress.cli profile`) on a real ResNet-20 artifact: exit 0 when budgets hold, 1 when violated or
significantly slower than a baseline, 2 on a bad budget string."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from compress import gates
from compress.cli import cli
from compress.errors import UserError
from devices.profile import build_profile, host_environment
from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


# ---- budgets -----------------------------------------------------------------------------------------------------

def test_budget_string_parses_to_canonical_units():
    b = {x.metric: x for x in gates.parse_budget("latency.p90=2ms, memory.peak=80MB,size=5MiB,accuracy.drop=0.5,"
                                                 "latency.p50=500us,latency.load=1.5s,memory.model=64kB")}
    assert b["latency.p90"].limit == 2.0 and b["latency.p50"].limit == pytest.approx(0.5)
    assert b["latency.load"].limit == 1500.0
    assert b["memory.peak"].limit == 80e6 and b["size"].limit == 5 * 2**20 and b["memory.model"].limit == 64e3
    assert b["accuracy.drop"].limit == 0.5
    # the recipe form: a mapping, numbers allowed where no unit is needed
    r = gates.parse_budget({"latency.p99": "3 ms", "accuracy.drop": 1})
    assert [x.limit for x in r] == [3.0, 1.0]


@pytest.mark.parametrize("bad, words", [
    ("latency.p95=2ms", "unknown metric"),
    ("latency.p90=2", "a unit is needed"),
    ("latency.p90=2MB", "unknown unit"),
    ("size=5ms", "unknown unit"),
    ("memory.peak=lots", "not a number"),
    ("latency.p90", "metric=limit"),
    ("size=1MB,size=2MB", "twice"),
    ("accuracy.drop=0.5%", "percentage points"),
    (",", "empty"),
])
def test_bad_budget_strings(bad, words):
    with pytest.raises(UserError, match=words):
        gates.parse_budget(bad)


def _profile(samples, peak=60e6, size=1_000_000, batch=1) -> dict:
    return build_profile(
        artifact={"path": "m.onnx", "size_bytes": size, "sha256": "0" * 64, "files": []},
        runtime={"name": "onnxruntime", "version": "1.32.0", "threads": 1, "options": {}},
        settings={"warmup": 5, "iterations": len(samples), "batch": batch, "seed": 0,
                  "input": {"name": "input", "shape": [batch, 3, 32, 32], "dtype": "float32"}, "timer": "test"},
        load_ms=10.0, first_inference_ms=2.0, samples_ms=list(samples),
        memory={"rss_before_load_bytes": 50_000_000, "peak_rss_bytes": int(peak), "model_peak_bytes": int(peak) - 50_000_000,
                "method": "test", "isolated_process": True},
        environment={**host_environment(), "load_avg_1m": 0.0})


def _samples(n=200, median=1.0, seed=0) -> np.ndarray:
    return median * np.random.default_rng(seed).lognormal(0.0, 0.08, n)  # ~8% spread, skewed, like real runs


def test_budget_rows_pass_and_fail_in_the_written_units():
    prof = _profile(_samples(), peak=70e6, size=1_200_000)
    rows = gates.check_budgets(gates.parse_budget("latency.p90=2ms,memory.peak=64MiB,size=5MB"), prof)
    by = {r["metric"]: r for r in rows}
    assert by["latency.p90"]["status"] == "pass" and by["latency.p90"]["measured_text"].endswith(" ms")
    assert by["memory.peak"]["status"] == "fail"  # 70e6 B = 66.8 MiB > 64 MiB
    assert by["memory.peak"]["measured_text"] == "66.76 MiB" and by["memory.peak"]["limit_text"] == "64 MiB"
    assert by["size"]["measured_text"] == "1.2 MB" and by["size"]["status"] == "pass"


def test_accuracy_drop_needs_matching_data():
    cur = [gates.accuracy_record(91.0, "test.npz", 846, "abc")]
    ref = [gates.accuracy_record(92.0, "test.npz", 846, "abc")]
    rows = gates.check_budgets(gates.parse_budget("accuracy.drop=0.5,accuracy.top1=90"), _profile(_samples()), cur, ref)
    assert [(r["metric"], r["status"]) for r in rows] == [("accuracy.drop", "fail"), ("accuracy.top1", "pass")]
    assert rows[0]["measured"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="other data"):
        gates.check_budgets(gates.parse_budget("accuracy.drop=0.5"), _profile(_samples()), cur,
                            [gates.accuracy_record(92.0, "train.npz", 20000, "zzz")])


# ---- statistics --------------------------------------------------------------------------------------------------

def test_mann_whitney_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for x, y in [(rng.normal(0, 1, 50), rng.normal(0.4, 1, 70)),
                 (np.round(rng.normal(0, 1, 120), 1), np.round(rng.normal(0.1, 1, 90), 1)),  # many ties
                 (rng.normal(0, 1, 30), rng.normal(0, 1, 30))]:
        u, _, p = gates.mann_whitney_u(x, y)
        ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
        assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)


def test_same_samples_no_change_shifted_slower_or_faster():
    base = _samples()
    same = gates.compare_profiles(_profile(base), _profile(base))
    assert same["verdict"] == "no significant change" and same["p_value"] == 1.0 and same["status"] == "pass"
    # a fresh draw of the same distribution: noise, not a change
    again = gates.compare_profiles(_profile(base), _profile(_samples(seed=7)))
    assert again["verdict"] == "no significant change"
    slow = gates.compare_profiles(_profile(base), _profile(base * 1.2))
    assert slow["verdict"] == "slower" and slow["status"] == "fail" and slow["p_value"] < 1e-6
    assert slow["diff_rel"] == pytest.approx(0.2, abs=1e-5)  # samples are stored rounded to 1 ns
    lo, hi = slow["ci95_diff_rel"]
    assert lo < 0.2 < hi and lo > 0.1
    fast = gates.compare_profiles(_profile(base), _profile(_samples(seed=3) * 0.8))
    assert fast["verdict"] == "faster" and fast["status"] == "pass"


def test_significant_but_tiny_change_is_within_tolerance():
    base = _samples(n=2000)
    small = gates.compare_profiles(_profile(base), _profile(_samples(n=2000, seed=5) * 1.03))
    assert small["p_value"] < 0.01 and small["verdict"] == "within tolerance" and small["status"] == "pass"
    assert "within the 5% tolerance" in small["reason"]
    assert gates.compare_profiles(_profile(base), _profile(_samples(n=2000, seed=5) * 1.03),
                                  max_slowdown=0.01)["verdict"] == "slower"


def test_a_burst_of_load_is_not_a_slowdown():
    """Runs are sequential: 60 neighbouring runs hit by other load must not count as 60 independent slow draws."""
    rng = np.random.default_rng(0)
    base, cur = rng.lognormal(0, 0.08, 300), rng.lognormal(0, 0.08, 300)
    cur[100:160] *= 1.6
    assert gates.mann_whitney_u(cur, base)[2] < 1e-4  # the naive test on single runs says "significant"
    burst = gates.compare_profiles(_profile(base), _profile(cur), max_slowdown=0.01)
    assert burst["verdict"] == "no significant change" and burst["p_value"] > 0.05
    assert burst["baseline"]["blocks"] == burst["current"]["blocks"] == 20
    assert gates.compare_profiles(_profile(base), _profile(base * 1.06))["verdict"] == "slower"  # a real shift


def test_different_batch_is_refused():
    with pytest.raises(UserError, match="batch"):
        gates.compare_profiles(_profile(_samples()), _profile(_samples(), batch=8))


# ---- outputs -----------------------------------------------------------------------------------------------------

def test_junit_and_markdown():
    base = _samples()
    report = gates.evaluate(_profile(base * 1.2, size=6_000_000), gates.parse_budget("latency.p90=10ms,size=5MB"),
                            baseline=_profile(base))
    assert not report["passed"] and len(report["failures"]) == 2
    root = ET.fromstring(gates.to_junit(report))
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    failed = {tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert failed == {"size <= 5 MB", "latency vs baseline (max slowdown 5%)"}
    md = gates.to_markdown(report, _profile(base * 1.2))
    assert "| `size` | <= 5 MB | 6 MB | ❌ fail |" in md and "slower" in md and "FAILED" in md


def test_a_missing_baseline_is_a_skipped_testcase_beside_the_budgets():
    report = gates.evaluate(_profile(_samples(), size=6_000_000), gates.parse_budget("size=5MB"),
                            baseline_missing="no baseline for m.onnx in prev: latency not compared")
    assert report["failures"] == ["size 6 MB (limit <= 5 MB)"]  # the missing baseline is no failure
    suite = ET.fromstring(gates.to_junit(report)).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "1", "1")
    skipped = [tc for tc in suite.iter("testcase") if tc.find("skipped") is not None]
    assert [tc.get("name") for tc in skipped] == ["latency vs baseline (max slowdown 5%)"]
    assert "FAILED" in gates.to_markdown(report)


# ---- the real CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, resnet20) -> Path:
    from exporters.onnx import export_onnx

    d = tmp_path_factory.mktemp("gates")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(export_onnx(resnet20.model, resnet20.spec, d / "resnet20.onnx").path)


@pytest.fixture(scope="module")
def measured(onnx_artifact) -> tuple[Path, object]:
    """One real fresh-process profile through the CLI, with accuracy vs the torch checkpoint: all budgets hold."""
    d = onnx_artifact.parent
    r = run_cli("profile", onnx_artifact, "--threads", "1", "--warmup", "3", "--iterations", "30",
                "--accuracy-data", f"cifar10:{TEST_LOSSLESS}", "--reference", RESNET20, "--reference-arch", "resnet20",
                "--budget", "latency.p90=10s,memory.peak=4GB,size=5MB,accuracy.drop=0.5",
                "-o", d / "profile.json", "--junit", d / "pass.xml", "--summary", d / "pass.md")
    return d, r


def test_cli_budget_pass_exit_0(measured):
    d, r = measured
    assert r.returncode == 0, r.stderr
    assert "Budgets" in r.stdout and "FAIL" not in r.stdout and r.stdout.count("pass") >= 4
    prof = json.loads((d / "profile.json").read_text())
    assert prof["accuracy"]["n"] == 846 and prof["accuracy"]["top1"] > 85  # the real checkpoint, FP32 ONNX
    suite = ET.parse(d / "pass.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "0"
    assert "✅" in (d / "pass.md").read_text()


def test_cli_budget_violation_exit_1_with_table(measured):
    d, _ = measured
    r = run_cli("profile", d / "profile.json", "--budget", "latency.p90=1us,size=5MB", "--junit", d / "fail.xml")
    assert r.returncode == 1, r.stderr
    assert "latency.p90" in r.stdout and "<= 1 us" in r.stdout and "FAIL" in r.stdout and "pass" in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 gate(s) failed: latency.p90")
    suite = ET.parse(d / "fail.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"
    failing = [tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert failing == ["latency.p90 <= 1 us"]  # measured shown in the unit the budget was written in


def test_cli_baseline_same_passes_shifted_fails(tmp_path):
    base = _samples(n=100)
    for name, s in (("base", base), ("same", base), ("slow", base * 1.2)):
        (tmp_path / f"{name}.json").write_text(json.dumps(_profile(s)))
    r = CliRunner().invoke(cli, ["profile", str(tmp_path / "same.json"), "--baseline", str(tmp_path / "base.json"),
                                 "--json"])  # in-process: the same command function, without a second subprocess
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["gates"]["baseline"]["verdict"] == "no significant change"
    r = run_cli("profile", tmp_path / "slow.json", "--baseline", tmp_path / "base.json",
                "--junit", tmp_path / "j.xml", "--summary", tmp_path / "s.md")
    assert r.returncode == 1 and "slower" in r.stdout and "latency +20.0% vs baseline" in r.stderr
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert [tc.get("classname") for tc in suite.iter("testcase") if tc.find("failure") is not None] == ["compress.baseline"]
    assert "❌ slower" in (tmp_path / "s.md").read_text()


def test_max_slowdown_parsing():
    assert gates.parse_fraction("5%") == pytest.approx(0.05) and gates.parse_fraction("0.1") == pytest.approx(0.1)
    with pytest.raises(UserError, match="not a fraction"):
        gates.parse_fraction("lots")


def test_cli_bad_budget_exit_2_one_line(tmp_path):
    art = tmp_path / "m.onnx"
    art.write_bytes(b"never read: the options fail first")
    r = run_cli("profile", art, "--budget", "latency.p90=fast,size=5MB", "--junit", tmp_path / "j.xml")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: budget latency.p90=fast: not a number"), r.stderr
    assert not (tmp_path / "j.xml").exists()


@pytest.mark.parametrize("args, words", [
    (["--budget", "size=5"], "a unit is needed"),
    (["--budget", "accuracy.drop=0.5"], "needs --accuracy-data"),
    (["--budget", "accuracy.drop=0.5", "--accuracy-data", "cifar10:x.npz"], "needs a reference"),
    (["--reference", "m.th"], "give both"),
    (["--alpha", "2"], "--alpha"),
    (["--max-slowdown", "5"], "ambiguous"),
    (["--junit", "j.xml"], "--junit reports the gates, and there are none"),
    (["--baseline", "TMP"], "is a folder: give a profile JSON"),
    (["--baseline", "BIN"], "not a JSON profile (binary data"),
    (["--baseline", "FIFO"], "is not a regular file"),  # reading it blocked forever
])
def test_bad_gate_options_fail_before_measuring(tmp_path, args, words):
    art = tmp_path / "m.onnx"
    art.write_bytes(b"never read: the options fail first")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)))
    os.mkfifo(tmp_path / "fifo.json")
    args = [{"TMP": str(tmp_path), "BIN": str(tmp_path / "b.bin"), "FIFO": str(tmp_path / "fifo.json")}.get(a, a)
            for a in args]
    r = CliRunner().invoke(cli, ["profile", str(art), *args])
    assert isinstance(r.exception, UserError) and words in str(r.exception), r.output


def test_recipe_profile_stage_budget_fails_the_run(tmp_path):
    from compress.errors import GateFailed
    from compress.pipeline import Pipeline
    from compress.recipe import Recipe

    recipe = Recipe.from_dict(yaml.safe_load(
        f"model: {RESNET20}\narch: resnet20\nstages:\n  - stage: export\n    formats: [onnx]\n"
        f"  - stage: profile\n    threads: 1\n    warmup: 1\n    iterations: 5\n"
        f"    budget: {{size: 100kB, latency.p90: 10s}}\n"))
    with warnings.catch_warnings(), pytest.raises(GateFailed) as e:  # GateFailed: exit code 1 from `compress run`
        warnings.simplefilter("ignore")
        Pipeline(recipe, tmp_path / "out").run()
    assert "profile gates failed for 1 artifact(s): original.onnx: size" in str(e.value)
    report = json.loads((tmp_path / "out" / "original.onnx.gates.json").read_text())
    assert [(b["metric"], b["status"]) for b in report["budgets"]] == [("size", "fail"), ("latency.p90", "pass")]
    assert (tmp_path / "out" / "original.onnx.profile.json").is_file()


def test_few_blocks_use_the_exact_test_so_a_real_slowdown_can_fail():
    """50-59 runs make 5 blocks a side; the normal approximation could never get below p = 0.012 there, so a +100%
    slowdown passed at alpha 0.01. The exact distribution of U (tie-free) reaches 2/252 = 0.0079."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n1, n2 in [(5, 5), (3, 9), (20, 20), (49, 40)]:
        x, y = rng.normal(0, 1, n1), rng.normal(0.6, 1, n2)
        u, _, _ = gates.mann_whitney_u(x, y)
        assert gates.exact_p(u, n1, n2) == pytest.approx(
            stats.mannwhitneyu(x, y, alternative="two-sided", method="exact").pvalue, rel=1e-12)
    base = _samples(n=55)
    slow = gates.compare_profiles(_profile(base), _profile(_samples(n=55, seed=4) * 2.0))
    assert slow["baseline"]["blocks"] == 5 and slow["verdict"] == "slower" and "exact" in slow["test"]
    assert slow["p_value"] == pytest.approx(2 / 252)
    with pytest.raises(UserError, match="3 vs 3 timed runs/blocks can never show a difference at alpha 0.01"):
        gates.compare_profiles(_profile(_samples(n=3)), _profile(_samples(n=3, seed=2) * 2))


def test_a_bare_max_slowdown_of_1_or_more_is_ambiguous():
    with pytest.raises(UserError, match="ambiguous"):
        gates.parse_fraction("5")
    assert gates.parse_fraction("150%") == pytest.approx(1.5) and gates.parse_fraction(0.05) == pytest.approx(0.05)


def test_both_sides_use_the_same_block_size():
    """A 300-run baseline (blocks of 15) against a 40-run profile (single runs): both are compared run by run."""
    c = gates.compare_profiles(_profile(_samples(n=300)), _profile(_samples(n=40, seed=3)))
    assert (c["baseline"]["blocks"], c["current"]["blocks"]) == (300, 40)
    c = gates.compare_profiles(_profile(_samples(n=300)), _profile(_samples(n=100, seed=3)))
    assert (c["baseline"]["blocks"], c["current"]["blocks"]) == (30, 10)  # blocks of 10, the smaller side's size
