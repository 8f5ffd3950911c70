"""Bad input: a clear one-line error naming the problem, exit code 2, no traceback, nothing half-written."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def no_files(folder) -> bool:
    return not any(p.is_file() for p in folder.rglob("*"))


def test_missing_model_file(tmp_path):
    assert_user_error(run_cli("info", tmp_path / "nope.pt", "--arch", "resnet20"), "not found", "nope.pt")


def test_truncated_checkpoint(tmp_path):
    bad = tmp_path / "trunc.th"
    bad.write_bytes(RESNET20.read_bytes()[:20000])
    out = tmp_path / "out"
    assert_user_error(run_cli("export", bad, "--arch", "resnet20", "-o", out / "m.onnx"), "corrupt or truncated")
    assert not out.exists() or no_files(out)


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": payload}))
    proc = run_cli("info", evil)
    assert_user_error(proc, "--trust-pickle", "run code")
    assert not marker.exists(), "the pickle's code ran"


def test_state_dict_of_another_arch(tmp_path):
    assert_user_error(run_cli("info", RESNET20, "--arch", "resnet32"), "does not match --arch resnet32", "missing")


def test_wrong_input_shape(tmp_path):
    assert_user_error(run_cli("info", RESNET20, "--arch", "resnet20", "--input-shape", "1,32,32"),
                      "input shape (1, 32, 32) does not fit")


def test_unknown_method_and_format(tmp_path):
    assert_user_error(run_cli("prune", RESNET20, "--arch", "resnet20", "--method", "magic", "-o", tmp_path / "p.pt"),
                      "unknown pruning method 'magic'")
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "--format", "tflite", "-o", tmp_path / "m"),
                      "unknown export format 'tflite'")
    assert no_files(tmp_path)


def test_output_path_not_writable(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "-o", blocker / "m.onnx"), "cannot create output folder")


def test_npz_with_wrong_keys(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4))
    assert_user_error(run_cli("eval", RESNET20, "--arch", "resnet20", "--data", f"cifar10:{bad}"), "needs key 'x'")


def test_state_dict_without_arch():
    assert_user_error(run_cli("info", RESNET20), "--arch")


def test_recipe_with_unknown_stage(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {RESNET20}\narch: resnet20\nstages:\n  - stage: distill\n")
    assert_user_error(run_cli("run", r, "-o", tmp_path / "out"), "unknown stage 'distill'")


def test_recipe_with_bad_profile_rounds(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {RESNET20}\narch: resnet20\nstages:\n  - stage: export\n  - stage: profile\n    rounds: 0\n")
    assert_user_error(run_cli("run", r, "-o", tmp_path / "out"), "rounds must be a positive integer")
    assert not (tmp_path / "out").exists() or no_files(tmp_path / "out")


@pytest.mark.parametrize("verb", ["info", "eval", "prune", "quantize", "lowrank", "export", "profile", "run"])
def test_every_verb_has_help(verb):
    proc = run_cli(verb, "--help")
    assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_eval_real_model_matches_published_accuracy():
    proc = run_cli("eval", RESNET20, "--arch", "resnet20", "--data", f"cifar10:{TEST_LOSSLESS}", "--json")
    assert proc.returncode == 0, proc.stderr
    import json
    assert abs(json.loads(proc.stdout)["accuracy"]["cifar10_test_lossless846"] - 91.73) < 0.01
