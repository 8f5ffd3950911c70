"""Recipes as a CI job runs them: mistakes refused before any stage, one profile stage per device, a failed budget
still reported, a re-run that leaves no stale files, eval sets told apart, SIGTERM cleaning up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from compress.errors import UserError
from compress.pipeline import Pipeline
from compress.recipe import Recipe
from tests.conftest import CALIB1000, RESNET20, ROOT, TEST_LOSSLESS, run_cli

QUANTIZE = {"stage": "quantize", "method": "minmax", "calib_size": 64}
EXPORT = {"stage": "export", "formats": ["onnx"]}


def _recipe(*stages: dict, **top) -> Recipe:
    return Recipe.from_dict({"model": str(RESNET20), "arch": "resnet20", "data": {"calib": f"cifar10:{CALIB1000}"},
                             **top, "stages": list(stages)})


@pytest.mark.parametrize("stages, words", [
    ([QUANTIZE, {"stage": "export", "fromats": ["openvino"]}], "unknown key(s) fromats"),
    ([QUANTIZE, {"stage": "export", "variants": ["quantised"]}], "no variant 'quantised'"),
    ([QUANTIZE, {"stage": "export", "formats": "banana"}], "banana"),
    ([QUANTIZE, EXPORT, {"stage": "profile", "iteration": 5}], "unknown key(s) iteration (did you mean iterations?)"),
    ([QUANTIZE, EXPORT, {"stage": "profile", "device": "sssh://pi@board"}], "sssh"),
    ([QUANTIZE, EXPORT, {"stage": "profile", "iterations": 0}], "iterations must be >= 1"),
    ([QUANTIZE, {"stage": "profile"}], "nothing exported before it"),
    ([QUANTIZE, EXPORT, {"stage": "profile", "budget": {"accuracy.drop": 1}}], "needs eval data"),
])
def test_export_and_profile_mistakes_are_refused_before_any_stage(tmp_path, stages, words):
    with pytest.raises(UserError) as e:
        Pipeline(_recipe(*stages), tmp_path / "out").run()
    assert words in str(e.value)
    assert not (tmp_path / "out").exists()  # refused up front: the quantize stage never ran, nothing written


def test_export_variants_by_name_and_singular_keys(tmp_path):
    result = Pipeline(_recipe(QUANTIZE, {"stage": "export", "format": "onnx", "variants": "quantized"}),
                      tmp_path / "out").run()
    assert [(a["variant"], Path(a["path"]).name) for a in result.artifacts] == [("quantized", "quantized.onnx")]


def test_profile_stages_per_device_and_a_failed_budget_still_reported(tmp_path):
    """A local profile stage and a second one on another device: both kept, on disk and in the table; the second
    one's budget fails, and `run --json` still prints everything before exiting 1."""
    recipe = {"model": str(RESNET20), "arch": "resnet20", "stages": [
        EXPORT, {"stage": "profile", "threads": 1, "warmup": 1, "iterations": 5},
        {"stage": "profile", "device": "estimate:rpi5", "threads": 1, "budget": {"latency.p50": "1us"}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("run", path, "-o", tmp_path / "out", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert [(r["model"], r["device"]) for r in out["table"]] == [("original", "local"), ("original", "estimate:rpi5")]
    assert [(g["device"], g["passed"]) for g in out["gates"]] == [("estimate:rpi5", False)]
    local = json.loads((tmp_path / "out" / "original.onnx.profile.json").read_text())
    board = json.loads((tmp_path / "out" / "original.onnx.estimate-rpi5.profile.json").read_text())
    assert local["target"] == "local" and board["target"] == "estimate:rpi5"
    assert out["table"][0]["p50_ms"] == local["latency_ms"]["p50"]
    assert out["table"][1]["p50_ms"] == board["latency_ms"]["p50"]
    assert (tmp_path / "out" / "original.onnx.estimate-rpi5.gates.json").is_file()
    assert "failed for 1 artifact(s): original.onnx on estimate:rpi5" in proc.stderr


def test_rerun_into_the_same_folder_leaves_no_stale_files(tmp_path):
    first = {"model": str(RESNET20), "arch": "resnet20", "stages": [
        {"stage": "export", "formats": ["onnx", "openvino"]},
        {"stage": "profile", "threads": 1, "warmup": 1, "iterations": 5, "budget": {"size": "10MB"}}]}
    second = {"model": str(RESNET20), "arch": "resnet20", "stages": [EXPORT]}
    for i, recipe in enumerate((first, second)):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(recipe))
        proc = run_cli("run", tmp_path / f"{i}.yaml", "-o", tmp_path / "out")
        assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["manifest.json", "original.onnx"], left  # no .xml/.bin, profiles or gate reports of the first run
    assert "replaced the previous run" in proc.stderr


def test_eval_sets_with_the_same_file_name_are_both_kept(tmp_path):
    with np.load(TEST_LOSSLESS) as d:
        x, y = d["x"], d["y"]
    for folder, n in (("d1", 100), ("d2", 50)):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "test.npz", x=x[:n], y=y[:n])
    recipe = _recipe({"stage": "eval"})
    recipe.data["eval"] = [f"cifar10:{tmp_path / 'd1' / 'test.npz'}", f"cifar10:{tmp_path / 'd2' / 'test.npz'}"]
    pipe = Pipeline(recipe, None)
    pipe.run()
    assert {k: len(v) for k, v in pipe.eval_sets.items()} == {"test": 100, "d2/test": 50}


def test_save_recipe_is_not_written_for_a_refused_call(tmp_path):
    proc = run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.5", "--finetune-epochs", "1",
                   "--save-recipe", tmp_path / "r.yaml", "-o", tmp_path / "p.pt")
    assert proc.returncode == 2 and "needs train data" in proc.stderr
    assert not (tmp_path / "r.yaml").exists()


def _agents(artifact: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "devices.agent" in line and str(artifact) in line]


def test_sigterm_stops_the_profiling_agent(tmp_path):
    """A cancelled CI job sends SIGTERM: the agent measuring the artifact must not be left running."""
    art = tmp_path / "m.onnx"
    assert run_cli("export", RESNET20, "--arch", "resnet20", "-o", art).returncode == 0
    env = {**os.environ, "COMPRESS_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "profile", str(art), "--warmup", "0",
                             "--iterations", "100000000", "--threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _agents(art) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _agents(art), "the agent never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and "terminated" in err
        deadline = time.monotonic() + 10
        while _agents(art) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _agents(art)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        for line in _agents(art):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_a_recipe_error_names_the_recipe_key_not_the_cli_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(RESNET20), "stages": [{"stage": "export"}]}))  # no arch:
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 2 and "the recipe's `arch:` key" in r.stderr and "--arch" not in r.stderr, r.stderr
    from compress.cli import in_recipe_terms

    assert in_recipe_terms("give --reference-arch X or --arch Y; pass --trust-pickle") == \
        "give --reference-arch X or the recipe's `arch:` key Y; pass the recipe's `trust_pickle: true`"


def test_an_interrupted_run_records_its_files_so_the_next_run_replaces_them(tmp_path, monkeypatch):
    def cancelled(self, stage):
        raise KeyboardInterrupt  # what SIGTERM (a cancelled CI job) becomes in compress.cli

    monkeypatch.setattr(Pipeline, "_stage_profile", cancelled)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(_recipe(EXPORT, {"stage": "profile"}), tmp_path / "out", replace_previous=True).run()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed in stage 1 (profile): interrupted"
    assert [Path(a["path"]).name for a in manifest["artifacts"]] == ["original.onnx"]
    monkeypatch.undo()
    Pipeline(_recipe(QUANTIZE, {"stage": "export", "formats": ["onnx"], "variants": ["quantized"]}),
             tmp_path / "out", replace_previous=True).run()
    assert not (tmp_path / "out" / "original.onnx").exists() and (tmp_path / "out" / "quantized.onnx").is_file()


@pytest.mark.parametrize("text, words", [
    ("seed: abc", "seed is a whole number, got 'abc'"),  # each of these was an internal error
    ("data: [1, 2]", "data is a mapping of roles"),
    ("data: {train: 5}", "train is a data spec such as cifar10:PATH.npz, got 5"),
    ("arch: 42", "arch is a zoo name or package.module:factory, got 42"),
    ("name: ../../escaped", "name is a plain name"),  # out/../../escaped: written outside out/
    ("input_shape: [3, 32]\narch: resnet20\narch: resnet32", "key 'arch' appears twice"),  # YAML kept the last
    ("stages: [{stage: prune, method: l1, ratio: 0.3, ratio: 0.5}]", "key 'ratio' appears twice"),
    ("stages: [{stage: export}, {stage: profile, iterations: ten}]", "iterations must be a whole number, got 'ten'"),
    ("stages: [{stage: eval, method: l1}]", "eval stage: unknown key(s) method (it takes no other key)"),
])
def test_recipe_values_of_the_wrong_kind_are_refused(tmp_path, text, words):
    recipe = tmp_path / "r.yaml"
    lines = {"model": f"model: {RESNET20}", "stages": "stages: [{stage: eval}]"}
    head = "".join(f"{v}\n" for k, v in lines.items() if not text.startswith(k + ":"))
    recipe.write_text(head + text + "\n")
    proc = run_cli("run", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert words in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_binary_file_as_the_recipe(tmp_path):
    recipe = tmp_path / "model.yaml"
    recipe.write_bytes(bytes(range(256)))
    proc = run_cli("run", recipe)
    assert proc.returncode == 2 and "not a recipe (binary data" in proc.stderr, proc.stderr
