"""A recipe's profile stage as a CI gate against the previous run: `baseline:` (the previous artifacts, profiled
here in the same interleaved rounds, or their recorded profiles), `max_slowdown`/`alpha`, and `junit`/`summary`
files of every artifact's gates: the recipe twins of `compress profile --baseline ... --junit ... --summary`."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from compress.errors import GateFailed, UserError
from compress.pipeline import Pipeline
from compress.recipe import Recipe
from tests.conftest import RESNET20, run_cli

EXPORT = {"stage": "export", "formats": ["onnx"], "eval": False}
FAST = {"stage": "profile", "threads": 1, "warmup": 3, "iterations": 60}
GATED = {**FAST, "budget": {"size": "10MB"}}  # junit/summary need a gate to report


def _recipe(*stages: dict) -> Recipe:
    return Recipe.from_dict({"model": str(RESNET20), "arch": "resnet20", "stages": list(stages)})


def _tiny_onnx(path: Path) -> None:
    """A model with ResNet-20's input and output that does almost nothing: a much faster 'previous version'."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 10], [0.1] * 30)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """The previous run's output folder: ResNet-20 exported and profiled."""
    out = tmp_path_factory.mktemp("prev") / "out"
    Pipeline(_recipe(EXPORT, FAST), out).run()
    return out


def test_same_model_as_baseline_passes_and_writes_junit_and_summary(tmp_path, previous):
    stage = {**FAST, "baseline": str(previous), "max_slowdown": "100%", "junit": "gates.xml", "summary": "gates.md"}
    result = Pipeline(_recipe(EXPORT, stage), tmp_path / "out").run()
    record = result.stages[-1]
    assert record["baseline"]["compared"] == ["original.onnx"] and record["baseline"]["max_slowdown"] == 1.0
    report = json.loads((tmp_path / "out" / "original.onnx.gates.json").read_text())
    assert report["passed"] and report["baseline"]["max_slowdown"] == 1.0
    import hashlib

    assert report["baseline"]["baseline"]["sha256"] == hashlib.sha256((previous / "original.onnx").read_bytes()).hexdigest()
    suites = ET.parse(tmp_path / "out" / "gates.xml").getroot().findall("testsuite")
    assert [tc.get("name") for s in suites for tc in s.findall("testcase")] == ["latency vs baseline (max slowdown 100%)"]
    assert "compress gates: `original.onnx` passed" in (tmp_path / "out" / "gates.md").read_text()
    assert record["junit"] == str(tmp_path / "out" / "gates.xml")


def test_a_much_faster_baseline_fails_the_run_with_its_files_listed(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    _tiny_onnx(base / "original.onnx")
    recipe = tmp_path / "r.yaml"
    stages = [EXPORT, {**FAST, "baseline": "base", "junit": "gates.xml"}]  # relative to the recipe file
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "arch": "resnet20", "stages": stages}))
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert "profile gates failed for 1 artifact(s): original.onnx: latency +" in r.stderr
    failures = ET.parse(tmp_path / "out" / "gates.xml").getroot().findall("testsuite/testcase/failure")
    assert len(failures) == 1 and "slower" in failures[0].get("message")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"].startswith("gate failed") and manifest["stages"][-1]["junit"].endswith("gates.xml")
    # the next run, without junit, removes the stale report the manifest lists
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "arch": "resnet20", "stages": [EXPORT, FAST]}))
    assert run_cli("-q", "run", recipe, "-o", tmp_path / "out").returncode == 0
    assert not (tmp_path / "out" / "gates.xml").exists()


def test_a_recorded_profile_is_the_baseline_when_the_artifact_is_not_there(tmp_path, previous):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(previous / "original.onnx.profile.json", base)
    result = Pipeline(_recipe(EXPORT, {**FAST, "baseline": str(base), "max_slowdown": "100%"}), tmp_path / "out").run()
    report = json.loads((tmp_path / "out" / "original.onnx.gates.json").read_text())
    assert result.stages[-1]["baseline"]["compared"] == ["original.onnx"] and report["baseline"]["status"] == "pass"


@pytest.mark.parametrize("extra, words", [
    ({"baseline": "no/such/folder"}, "baseline folder not found"),
    ({"baseline": "OUT"}, "is this run's output folder"),
    ({"junit": "reports/gates.xml"}, "junit is a file name"),
    ({"alpha": 2}, "alpha must be between 0 and 1"),
    ({"max_slowdown": "fast"}, "max_slowdown"),
])
def test_gate_key_mistakes_are_refused_before_any_stage(tmp_path, extra, words):
    out = tmp_path / "out"
    if extra.get("baseline") == "OUT":
        out.mkdir()
        extra = {"baseline": str(out)}
    with pytest.raises(UserError) as e:
        Pipeline(_recipe(EXPORT, {**FAST, **extra}), out).run()
    assert words in str(e.value)
    assert not (out / "original.onnx").exists()


def test_the_baseline_is_relative_to_the_recipe_and_survives_save(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    r = Recipe.from_dict({"model": str(RESNET20), "stages": [EXPORT, {**FAST, "baseline": "base"}]}, base=tmp_path)
    assert r.stages[-1]["baseline"] == str(tmp_path / "base")
    r.save(tmp_path / "sub" / "again.yaml")
    assert Recipe.load(tmp_path / "sub" / "again.yaml").stages[-1]["baseline"] == str(tmp_path / "base")
    # a recipe the CLI builds holds paths relative to the working directory: saved relative to the recipe's folder
    monkeypatch.chdir(tmp_path)
    Recipe.from_dict({"model": str(RESNET20), "stages": [EXPORT, {**FAST, "baseline": "base"}]}).save(
        tmp_path / "sub" / "cli.yaml")
    assert yaml.safe_load((tmp_path / "sub" / "cli.yaml").read_text())["stages"][-1]["baseline"] == "../base"


def test_the_ci_example_recipe_is_accepted(tmp_path):
    """examples/ci/recipe.yaml with its paths pointed at the shared assets: every key it uses passes validation."""
    from tests.conftest import CALIB1000, ROOT, TEST_LOSSLESS

    d = yaml.safe_load((ROOT / "examples" / "ci" / "recipe.yaml").read_text())
    d.update(model=str(RESNET20), data={"calib": f"cifar10:{CALIB1000}", "eval": [f"cifar10:{TEST_LOSSLESS}"]})
    (tmp_path / "baseline").mkdir()
    d["stages"][-1]["baseline"] = "baseline"
    assert {"budget", "baseline", "max_slowdown", "junit", "summary"} <= set(d["stages"][-1])
    Pipeline(Recipe.from_dict(d, base=tmp_path), tmp_path / "out")._validate()


def test_a_baseline_on_an_estimate_device_is_refused_before_any_stage(tmp_path, previous):
    with pytest.raises(UserError, match=r"this stage's device is a prediction \(estimate:rpi5\)"):
        Pipeline(_recipe(EXPORT, {"stage": "profile", "device": "estimate:rpi5", "baseline": str(previous)}),
                 tmp_path / "out").run()


def test_a_gate_failure_still_runs_the_later_profile_stages(tmp_path):
    """A failed budget in the local stage: the estimate stage after it still runs and writes its files; the run exits 1
    and names both stages' failures. The estimate skips the OpenVINO artifacts (it reads ONNX graphs)."""
    recipe = tmp_path / "r.yaml"
    stages = [{"stage": "export", "formats": ["onnx", "openvino"], "eval": False},
              {**FAST, "budget": {"size": "1kB"}, "junit": "local.xml", "summary": "local.md"},
              {"stage": "profile", "device": "estimate:rpi5", "budget": {"latency.p50": "1us"}, "junit": "rpi5.xml"}]
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "arch": "resnet20", "stages": stages}))
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert "original.onnx: size" in r.stderr and "original.onnx on estimate:rpi5: latency.p50" in r.stderr
    out = tmp_path / "out"
    assert (out / "original.onnx.estimate-rpi5.profile.json").is_file() and (out / "rpi5.xml").is_file()
    assert not (out / "original.xml.estimate-rpi5.profile.json").exists()
    local = ET.parse(out / "local.xml").getroot()  # the ONNX and the OpenVINO artifact, one suite each
    assert local.get("failures") == "2" and len(local.findall("testsuite")) == 2
    assert ET.parse(out / "rpi5.xml").getroot().find("testsuite").get("name") == "compress.gates"
    assert [s["stage"] for s in json.loads((out / "manifest.json").read_text())["stages"]] == ["export", "profile", "profile"]


def test_junit_and_summary_are_written_when_there_is_nothing_to_check_yet(tmp_path):
    """A first CI run: baseline folder empty, no budget. The reports still exist (a JUnit reader expects one)."""
    (tmp_path / "base").mkdir()
    stage = {**FAST, "baseline": str(tmp_path / "base"), "junit": "gates.xml", "summary": "gates.md"}
    Pipeline(_recipe(EXPORT, stage), tmp_path / "out").run()
    # one skipped testcase: JUnit readers that fail on a report without tests (the default of several) accept it
    root = ET.parse(tmp_path / "out" / "gates.xml").getroot()
    assert (root.get("tests"), root.get("skipped"), root.get("failures")) == ("1", "1", "0")
    skipped = root.find("testsuite/testcase/skipped")
    assert skipped is not None and "no baseline for original.onnx" in skipped.get("message")
    md = (tmp_path / "out" / "gates.md").read_text()
    assert "`original.onnx`: nothing checked" in md and "no baseline for original.onnx" in md


@pytest.mark.parametrize("stages, words", [
    ([EXPORT, {**GATED, "junit": "original.onnx"}], "junit: original.onnx is a file this run writes (the onnx export"),
    ([EXPORT, {**GATED, "summary": "manifest.json"}], "is a file this run writes (the manifest)"),
    ([EXPORT, {**GATED, "junit": "g.xml", "summary": "g.xml"}], "summary: g.xml is a file this run writes (the junit"),
    ([EXPORT, {**GATED, "junit": "a.gates.json"}], "a profile or gate report"),
    ([EXPORT, FAST, {**FAST, "threads": 2}], "two profile stages on local"),
    ([EXPORT, {**FAST, "basline": "x"}], "unknown key(s) basline (did you mean baseline?)"),
    ([EXPORT, {**FAST, "alpha": 0.05}], "alpha set the comparison with a baseline"),
    ([EXPORT, {**FAST, "junit": "g.xml"}], "junit reports the stage's gates, and it has none"),
    ([EXPORT, {**FAST, "baseline": ""}], "baseline is a folder"),
    ([EXPORT, {"stage": "profile", "device": "estimate:nosuch"}], "unknown estimate device 'nosuch'"),
    ([EXPORT, {"stage": "profile", "device": "estimate:rpi5", "budget": {"memory.peak": "80MB"}}],
     "predicts one latency and the model's memory, not memory.peak"),
])
def test_more_gate_mistakes_are_refused_before_any_stage(tmp_path, stages, words):
    with pytest.raises(UserError) as e:
        Pipeline(_recipe(*stages), tmp_path / "out").run()
    assert words in str(e.value)
    assert not (tmp_path / "out" / "original.onnx").exists()


def test_a_recorded_estimate_baseline_is_refused_before_measuring(tmp_path, previous):
    from compress.pipeline import Pipeline as P

    base = tmp_path / "base"
    base.mkdir()
    est = run_cli("-q", "profile", previous / "original.onnx", "--device", "estimate:rpi5", "-o",
                  base / "original.onnx.profile.json")
    assert est.returncode == 0, est.stderr
    with pytest.raises(UserError, match=r"baseline .*original.onnx.profile.json is a prediction \(estimate:rpi5\)"):
        P(_recipe(EXPORT, {**FAST, "iterations": 100000, "baseline": str(base)}), tmp_path / "out").run()


def test_a_baseline_artifact_that_does_not_load_is_refused_before_measuring(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "original.onnx").write_bytes(b"a truncated upload")
    with pytest.raises(UserError, match=r"profile: baseline .*original.onnx: onnxruntime cannot load it"):
        Pipeline(_recipe(EXPORT, {**FAST, "iterations": 100000, "baseline": str(base)}), tmp_path / "out").run()
    assert not (tmp_path / "out" / "original.onnx.profile.json").exists()


@pytest.mark.parametrize("stages, words", [
    ([EXPORT, {**FAST, "iterations": 55, "baseline": "BASE", "alpha": 0.001}], "can never show a difference at alpha"),
    ([EXPORT, {"stage": "profile", "device": "ssh://pi@board", "basline": "x"}], "ssh device: unknown option(s) basline"),
    ([{"stage": "export", "formats": ["openvino"]}, {"stage": "profile", "device": "estimate:rpi5"}],
     "nothing before it exports onnx"),
    ([{"stage": "export", "formats": ["ort"]}, {**FAST, "summary": "original.json"}], "the ort export of original"),
])
def test_review2_mistakes_are_refused_before_any_stage(tmp_path, stages, words):
    (tmp_path / "base").mkdir()
    stages = [{k: (str(tmp_path / "base") if v == "BASE" else v) for k, v in s.items()} for s in stages]
    with pytest.raises(UserError) as e:
        Pipeline(_recipe(*stages), tmp_path / "out").run()
    assert words in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_rerun_from_another_folder_still_replaces_the_previous_files(tmp_path):
    """The manifest's paths are relative to where that run started: the next run finds them by name in the folder."""
    recipe = tmp_path / "r.yaml"
    stages = [{"stage": "export", "formats": ["onnx", "openvino"], "eval": False}, {**GATED, "junit": "a.xml"}]
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "arch": "resnet20", "stages": stages}))
    assert run_cli("-q", "run", recipe, "-o", "out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / "original.xml").is_file() and (tmp_path / "out" / "a.xml").is_file()
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "arch": "resnet20", "stages": [EXPORT]}))
    assert run_cli("-q", "run", recipe, "-o", tmp_path / "out", cwd=tmp_path.parent).returncode == 0
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["manifest.json", "original.onnx"], left


def test_the_summary_says_when_an_artifact_had_no_baseline(tmp_path):
    (tmp_path / "base").mkdir()
    stage = {**FAST, "budget": {"size": "10MB"}, "baseline": str(tmp_path / "base"), "summary": "s.md"}
    Pipeline(_recipe(EXPORT, stage), tmp_path / "out").run()
    assert "> no baseline for original.onnx in" in (tmp_path / "out" / "s.md").read_text()
