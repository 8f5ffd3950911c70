"""Bad input: a clear one-line error naming the problem, exit code 2, no traceback, nothing half-written."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


def assert_user_error(proc, *needles: str, after_progress: bool = False) -> None:
    """after_progress: a check that needs the loaded model may follow the run's progress lines (`export x -> y`)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    if after_progress:
        err = err.splitlines()[-1]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
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


def test_corrupted_byte_inside_a_zip_checkpoint(tmp_path):
    """torch.load does not check the archive's CRCs: a flipped byte in a tensor used to load as a wrong weight."""
    import torch

    good = tmp_path / "sd.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, good)
    data = bytearray(good.read_bytes())
    at = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])  # inside the tensor's bytes
    data[at + 100] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    assert_user_error(run_cli("info", bad, "--arch", "resnet20"), "corrupt model file", "does not match its checksum")


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


def _export_archive(tmp_path):
    import torch

    path = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.zeros(1, 3, 8, 8),)), path)
    return path


def _rewrite_zip(src, dst, replace=None, add=None) -> None:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, (replace or {}).get(info.filename.split("/", 1)[1], zin.read(info.filename)))
        for name, data in (add or {}).items():
            zout.writestr(f"{zin.namelist()[0].split('/')[0]}/{name}", data)


@pytest.mark.parametrize("verb", ["info", "profile"])
def test_a_torch_export_archive_with_a_pickle_in_its_sample_inputs_runs_no_code(tmp_path, verb):
    """torch.export.load falls back to full unpickling when the safe load of the example inputs fails."""
    import io

    import torch

    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    buf = io.BytesIO()
    torch.save(((payload,), {}), buf)
    evil = tmp_path / "evil.pt2"
    _rewrite_zip(_export_archive(tmp_path), evil, replace={"data/sample_inputs/model.pt": buf.getvalue()})
    proc = run_cli(verb, evil, *(["--iterations", "3"] if verb == "profile" else []))
    assert_user_error(proc, "pickled Python objects", "run code")
    assert not marker.exists(), "the archive's pickle ran"


def test_a_torch_export_archive_with_an_opaque_object_constant_is_refused(tmp_path):
    evil = tmp_path / "opaque.pt2"
    _rewrite_zip(_export_archive(tmp_path), evil, add={"data/constants/opaque_obj_0": pickle.dumps(_RunsCode)})
    assert_user_error(run_cli("info", evil), "pickled object constant", "opaque_obj_0")


def test_state_dict_of_another_arch(tmp_path):
    assert_user_error(run_cli("info", RESNET20, "--arch", "resnet32"), "does not match --arch resnet32", "missing")


def test_wrong_input_shape(tmp_path):
    assert_user_error(run_cli("info", RESNET20, "--arch", "resnet20", "--input-shape", "1,32,32"),
                      "input shape 1,32,32 does not fit")


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


def test_output_folder_refused_before_the_work(tmp_path):
    # `-o somewhere/` used to prune first and fail when saving (a long fine-tune thrown away)
    r = run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.3", "-o", tmp_path)
    assert_user_error(r, "is a folder")  # one line: no `pruned` progress before it


def test_unreadable_openvino_file_is_one_line(tmp_path):
    # OpenVINO's frontends probe it with TensorFlow's parser, which logged `E0000 ... text_format.cc` lines
    bad = tmp_path / "bad.xml"
    bad.write_text("garbage")
    assert_user_error(run_cli("eval", bad, "--data", f"cifar10:{TEST_LOSSLESS}"), "OpenVINO cannot load")
    assert_user_error(run_cli("eval", RESNET20, "--arch", "resnet20", "--runtime", "openvino", "--data",
                              f"cifar10:{TEST_LOSSLESS}"), "OpenVINO cannot load")


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


def test_files_that_are_not_torch_models(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # the first bytes of an ONNX protobuf
    assert_user_error(run_cli("export", onnx_file, "-o", tmp_path / "x.onnx"), "artifact for onnxruntime, not a torch model",
                      "compress profile")
    garbage = tmp_path / "g.pt"
    garbage.write_text("hello\n")
    assert_user_error(run_cli("info", garbage), "not a PyTorch model file")
    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    assert_user_error(run_cli("info", empty, "--arch", "resnet20"), "corrupt or truncated")
    # a device file is refused before anything reads it (hashing /dev/zero never ended)
    assert_user_error(run_cli("info", "/dev/zero", "--arch", "resnet20", timeout=60), "not a regular file")
    assert no_files(tmp_path / "x.onnx") if (tmp_path / "x.onnx").is_dir() else not (tmp_path / "x.onnx").exists()


def test_export_option_errors(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "--precision", "banana", "-o", out / "m.onnx"),
                      "banana")
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "--input-shape", "abc", "-o", out / "m.onnx"),
                      "--input-shape 'abc'", "e.g. 3,32,32")
    # fp16 .ort: the converter would fold the weights back to FP32 (a bigger file than fp32)
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "--format", "ort", "--precision", "fp16",
                              "-o", out / "m.ort"), "not available for .ort")
    assert not out.exists()  # a failed run leaves not even the folder it created
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "-o", folder), "is a folder")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_on_a_file_system_that_takes_no_files(tmp_path):
    # root passes os.access on /proc; the export used to die in mkstemp with an internal error
    assert_user_error(run_cli("export", RESNET20, "--arch", "resnet20", "-o", "/proc/m.onnx"), "not writable")
    assert_user_error(run_cli("profile", tmp_path / "whatever.onnx", "-o", "/proc/p.json"), "not writable")


def test_an_output_path_that_is_a_device_or_pipe_is_left_alone(tmp_path):
    """-o /dev/null, as root: the finished file was renamed over the device node, replacing /dev/null itself."""
    import stat

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # a device node needs root to make; a pipe takes the same path through the code
    assert_user_error(run_cli("profile", tmp_path / "m.onnx", "-o", pipe), "is not a regular file (a device or a pipe)")
    assert_user_error(run_cli("quantize", RESNET20, "--arch", "resnet20", "-m", "minmax", "--calib", "random:8",
                              "-o", pipe), "is not a regular file")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_what_a_quantized_model_cannot_go_through(tmp_path):
    q = tmp_path / "q.pt"
    proc = run_cli("quantize", RESNET20, "--arch", "resnet20", "-m", "minmax", "--calib", f"cifar10:{TEST_LOSSLESS}",
                   "-o", q)
    assert proc.returncode == 0, proc.stderr
    assert_user_error(run_cli("export", q, "--format", "openvino", "--precision", "fp16", "-o", tmp_path / "q.xml"),
                      "quantized (int8)", "--precision int8", after_progress=True)
    # lowrank used to drop the weight quantizers and still call the result int8 (34% -> 12% top-1); prune crashed
    for verb, method in (("lowrank", "svd"), ("prune", "l1")):
        assert_user_error(run_cli(verb, q, "-m", method, "--ratio", "0.3", "-o", tmp_path / f"{verb}.pt"),
                          "is quantized (int8)", f"{verb} the float model, then quantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.manifest.json", "q.pt"]


def test_fine_tuning_without_labels_or_distillation_is_refused_before_pruning(tmp_path):
    r = run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.3", "--no-distill",
                "--finetune-epochs", "1", "--data", "random:16", "-o", tmp_path / "p.pt")
    assert_user_error(r, "needs labels ('y') or distillation")
    assert "pruned l1" not in r.stderr  # it was found out after pruning


@pytest.mark.parametrize("verb, method, role", [("quantize", "minmax", "calib"),
                                                 ("prune", "polarization, flops_target: 0.5", "train")])
def test_a_method_without_the_data_it_needs_is_refused_before_any_stage(tmp_path, verb, method, role):
    recipe = tmp_path / "r.yaml"  # the prune stage before it used to run first
    recipe.write_text(f"model: {RESNET20}\narch: resnet20\nstages:\n  - {{stage: prune, method: l1, ratio: 0.3}}\n"
                      f"  - {{stage: {verb}, method: {method}}}\n")
    assert_user_error(run_cli("run", recipe, "-o", tmp_path / "out"), f"{method.split(',')[0]} needs {role} data")
    assert not (tmp_path / "out").exists()


def test_a_factorized_model_is_not_factorized_again(tmp_path):
    lr = tmp_path / "lr.pt"  # it split every factor pair again (36 layers) without a word
    assert run_cli("lowrank", RESNET20, "--arch", "resnet20", "-m", "svd", "--ratio", "0.5", "-o", lr).returncode == 0
    assert_user_error(run_cli("lowrank", lr, "-m", "svd", "--ratio", "0.5", "-o", tmp_path / "again.pt"),
                      "is already factorized (lowrank svd)")
    assert not (tmp_path / "again.pt").exists()


def test_recipe_order_and_stage_names_are_checked_before_any_work(tmp_path):
    base = f"model: {RESNET20}\narch: resnet20\ndata: {{calib: cifar10:{TEST_LOSSLESS}}}\n"
    (tmp_path / "order.yaml").write_text(base + "stages:\n  - {stage: quantize, method: minmax}\n"
                                         "  - {stage: prune, method: l1, ratio: 0.3}\n")
    assert_user_error(run_cli("run", tmp_path / "order.yaml", "-o", tmp_path / "o1"), "comes after quantize")
    (tmp_path / "name.yaml").write_text(base + "stages:\n  - {stage: prune, method: l1, ratio: 0.3, name: ../escape}\n")
    assert_user_error(run_cli("run", tmp_path / "name.yaml", "-o", tmp_path / "o2"), "must be a plain file name")
    assert no_files(tmp_path / "o1") and no_files(tmp_path / "o2") and not (tmp_path / "escape.pt").exists()


def test_lowrank_dry_run_writes_nothing(tmp_path):
    import json

    proc = run_cli("lowrank", RESNET20, "--arch", "resnet20", "-m", "svd", "--ratio", "0.5", "--dry-run",
                   "-o", tmp_path / "d.pt", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["dry_run"] and record["path"] is None and record["plan"]["layers"]
    assert list(tmp_path.iterdir()) == []


def test_bad_data(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    cases = {"empty.npz": dict(x=x[:0], y=np.zeros(0, np.int64)),
             "float.npz": dict(x=x.astype(np.float32), y=np.zeros(4, np.int64)),
             "negative.npz": dict(x=x, y=-np.ones(4, np.int64)),
             "eleven.npz": dict(x=x, y=np.full(4, 11)),
             "strings.npz": dict(x=x, y=np.array(list("abcd")))}  # an internal UFuncTypeError
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "text.npz").write_text("x,y\n")  # numpy calls it a pickle
    expect = {"empty.npz": "holds no images", "float.npz": "must be uint8", "negative.npz": "class indices",
              "eleven.npz": "labels go up to 11 but the model has 10 outputs", "strings.npz": "got <U1 values",
              "text.npz": "not an .npz archive", "": "'cifar10:' names no file", ".": "is a folder: cifar10: takes an .npz"}
    for name, message in expect.items():
        spec = f"cifar10:{tmp_path / name}" if name not in ("", ".") else f"cifar10:{name}"
        assert_user_error(run_cli("eval", RESNET20, "--arch", "resnet20", "--data", spec), message)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "x.png").write_text("not a png")  # an internal UnidentifiedImageError
    for spec, message in (("folder:/nonexistent", "data folder not found"), ("random:abc", "positive count"),
                          (f"folder:{tmp_path / 'imgs'}", "x.png: not a readable image"),
                          (f"folder:{tmp_path / 'text.npz'}", "is a file: folder: takes a folder"),
                          ("imagenet:train.npz", "unknown source 'imagenet'")):
        assert_user_error(run_cli("eval", RESNET20, "--arch", "resnet20", "--data", spec), message)
    assert_user_error(run_cli("eval", RESNET20, "--arch", "resnet20", "--data", f"cifar10:{TEST_LOSSLESS}",
                              "--batch-size", "0"), "--batch-size")
    assert_user_error(run_cli("synthesize", RESNET20, "--arch", "resnet20", "-n", "0", "-o", tmp_path / "s.npz"),
                      "--samples")


def test_fine_tuning_without_train_data_fails_before_pruning(tmp_path):
    # it used to prune first (minutes with a latency target), then fail
    assert_user_error(run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.3",
                              "--finetune-epochs", "1", "--calib", f"cifar10:{TEST_LOSSLESS}", "-o", tmp_path / "o" / "p.pt"),
                      "needs train data: pass --data")
    assert not (tmp_path / "o").exists()


def test_errors_name_what_the_user_typed(tmp_path):
    # the checks speak recipe keys; through the CLI they name the options
    assert_user_error(run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--flops-target", "1.5",
                              "-o", tmp_path / "p.pt"), "--flops-target is the fraction")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m.pt\nstages: [ {stage: prune\n")
    assert_user_error(run_cli("run", bad), "not valid YAML at line 3, column 1")


@pytest.mark.parametrize("args, words", [
    (["prune", "-m", "l1", "--ratio", "0.3", "--lr", "nan", "--finetune-epochs", "1", "--data", "random:8"],
     "option --lr: expected a finite number, got nan"),  # it fine-tuned to nan and saved a 10% model, exit 0
    (["prune", "-m", "l1", "--speedup-target", "nan"], "option --speedup-target: expected a finite number"),
    (["quantize", "-m", "genie", "--lr-bit", "inf"], "option --lr-bit: expected a finite number, got inf"),
])
def test_non_finite_numbers_are_refused_before_the_work(tmp_path, args, words):
    assert_user_error(run_cli(args[0], RESNET20, "--arch", "resnet20", *args[1:], "-o", tmp_path / "m.pt"), words)
    assert no_files(tmp_path)


def test_recipe_numbers_of_the_wrong_kind(tmp_path):
    recipe = tmp_path / "r.yaml"
    for value, words in (("true", "option calib_size: expected int, got True"),  # was 1 image
                         ("16.5", "option calib_size: expected int, got 16.5")):  # was 16
        recipe.write_text(f"model: {RESNET20}\narch: resnet20\ndata: {{calib: 'random:8'}}\n"
                          f"stages:\n  - {{stage: quantize, method: minmax, calib_size: {value}}}\n")
        assert_user_error(run_cli("run", recipe, "-o", tmp_path / "out"), words)
        assert not (tmp_path / "out").exists()


def test_options_a_rule_would_ignore(tmp_path):
    # lowrank's ratio / energy / budget each belong to rank rules: they used to be ignored silently under another
    for args, message in ((["--rank-rule", "flops", "--energy", "0.8"], "energy applies to --rank-rule energy, not flops"),
                          (["--budget", "0.5"], "add --rank-rule params, flops or latency"),
                          (["--ratio", "0.5", "--energy", "0.9"], "belong to different rank rules")):
        assert_user_error(run_cli("lowrank", RESNET20, "--arch", "resnet20", "-m", "svd", *args, "--dry-run"), message)
    # energy alone picks its rule
    import json

    proc = run_cli("lowrank", RESNET20, "--arch", "resnet20", "-m", "svd", "--energy", "0.8", "--dry-run", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["plan"]["rule"] == "energy", proc.stderr
    # prune's round_to leaves groups of at most round_to channels whole: said aloud, not a silent 0% prune
    proc = run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.5", "--round-to", "64",
                   "-o", tmp_path / "p.pt")
    assert proc.returncode == 0 and "12 of 12 channel groups stay whole" in proc.stderr, proc.stderr
    # one-word keys in a list of options read as options too (was "give one of ratio, --flops-target, ...")
    assert_user_error(run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "-o", tmp_path / "q.pt"),
                      "give one of --ratio, --flops-target, --latency-target, --speedup-target, --widths")


def test_a_run_that_fails_midway_records_what_it_left(tmp_path):
    """Stages that finished left files: the manifest lists them and says where the run stopped (it used to leave
    the files and no manifest)."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {RESNET20}\narch: resnet20\ndata: {{calib: cifar10:{TEST_LOSSLESS}}}\n"
                      "stages:\n  - {stage: quantize, method: minmax, calib_size: 64}\n"
                      "  - {stage: export, formats: [onnx], precision: int4, variants: [quantized]}\n")
    assert_user_error(run_cli("run", recipe, "-o", tmp_path / "out"), "needs a model quantized to 4 bits or fewer",
                      after_progress=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"].startswith("failed in stage 1 (export): --precision int4 needs"), manifest["status"]
    assert (tmp_path / "out" / "quantized.pt").is_file()


def test_saved_model_with_another_arch(tmp_path):
    # a saved model records its architecture: a different --arch was ignored silently
    assert run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.3", "-o", tmp_path / "p.pt").returncode == 0
    assert_user_error(run_cli("info", tmp_path / "p.pt", "--arch", "resnet32"), "is a saved resnet20 model; --arch resnet32")
    assert run_cli("info", tmp_path / "p.pt", "--arch", "resnet20").returncode == 0


def test_what_cannot_be_saved_is_refused_before_the_work(tmp_path):
    import torch

    from compress.zoo.resnet_cifar import resnet20

    whole = tmp_path / "whole.pt"
    torch.save(resnet20(), whole)  # a pickled module: it loads with --trust-pickle, but has no architecture to save
    r = run_cli("prune", whole, "--trust-pickle", "-m", "l1", "--ratio", "0.3", "-o", tmp_path / "p.pt")
    assert_user_error(r, "prune: ", "is a pickled module with no known architecture")
    assert "pruned l1" not in r.stderr  # refused before pruning, not after
    saved = tmp_path / "saved.pt"
    assert run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.3", "-o", saved).returncode == 0
    before = saved.read_bytes()
    assert_user_error(run_cli("prune", saved, "-m", "l1", "--ratio", "0.3", "-o", saved), "is the input model")
    assert saved.read_bytes() == before


def test_synthesize_makes_no_folder_before_it_has_images(tmp_path):
    r = run_cli("synthesize", RESNET20, "--arch", "resnet32", "-n", "4", "-o", tmp_path / "new" / "s.npz")
    assert_user_error(r, "does not match --arch resnet32")
    assert not (tmp_path / "new").exists()  # an empty folder was left behind


@pytest.mark.parametrize("free", [0, 10 << 30])
def test_a_cpp_writer_failing_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch, free):
    """torch's zip writer and OpenVINO's serializer fail on a full disk with opaque RuntimeErrors ('unexpected pos',
    'iostream error'): with no room left that becomes ENOSPC; with room, the writer's own error stands. Either
    way no partial file is left."""
    import errno
    import shutil
    from collections import namedtuple

    from compress.fileio import atomic_path

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 40, (1 << 40) - free, free))
    with pytest.raises((OSError, RuntimeError)) as e:
        with atomic_path(tmp_path / "m.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 176832 vs 176720")
    if free:
        assert type(e.value) is RuntimeError
    else:
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
        assert e.value.filename == str(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_one_line_error(monkeypatch, capsys):
    import errno
    import signal

    from compress import cli as cli_module

    def full(**_):
        raise OSError(errno.ENOSPC, "No space left on device", "out/m.onnx")

    monkeypatch.setattr(cli_module.cli, "main", full)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main() installs a SIGTERM handler
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: no space left on the device writing out/m.onnx: free some, "
                                               "or write elsewhere with -o")
