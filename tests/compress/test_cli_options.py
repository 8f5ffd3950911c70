"""Global CLI options: --torch-threads sets torch's intra-op pool before any verb runs."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


# a fresh interpreter per case: torch's pool is process-wide. 3 threads is nobody's default here.
CODE = ("import sys, torch; from compress.cli import cli\n"
        "cli.main(sys.argv[1:], standalone_mode=False)\n"
        "print('THREADS', torch.get_num_threads())\n")


def _threads_after(args: list[str], env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", CODE, *args, "info", str(RESNET20), "--arch", "resnet20", "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.rsplit("THREADS", 1)[1].strip()


def test_torch_threads_option_sets_torch_pool():
    assert _threads_after(["--torch-threads", "3"]) == "3"


def test_torch_threads_from_environment():
    assert _threads_after([], {"COMPRESS_TORCH_THREADS": "3"}) == "3"


def test_torch_threads_out_of_range():
    bad = run_cli("--torch-threads", "0", "info", RESNET20, "--arch", "resnet20")
    assert bad.returncode == 2 and "--torch-threads" in bad.stderr


def test_export_path_carries_the_format_suffix():
    """profile, eval and the runtimes tell a format by the suffix: `-o model` must not write a suffix-less file."""
    from pathlib import Path

    from exporters import artifact_path

    assert artifact_path(Path("out/model"), "onnx") == Path("out/model.onnx")
    assert artifact_path(Path("model.v2"), "onnx") == Path("model.v2.onnx")
    assert artifact_path(Path("model.ONNX"), "onnx") == Path("model.ONNX")
    assert artifact_path(Path("model.onnx"), "openvino") == Path("model.xml")
    assert artifact_path(Path("model"), "ort") == Path("model.ort")
    assert artifact_path(Path("model.plan"), "tensorrt") == Path("model.plan")
    assert artifact_path(Path("model.onnx"), "tensorrt") == Path("model.engine")


def test_export_format_follows_the_output_suffix_when_not_given():
    from pathlib import Path

    from exporters import format_of

    assert [format_of(Path(p)) for p in ("m.XML", "m.bin", "m.ort", "m.plan", "m.engine", "m.onnx", "m", "m.v2")] == [
        "openvino", "openvino", "ort", "tensorrt", "tensorrt", "onnx", "onnx", "onnx"]
    assert format_of(None) == "onnx"


def test_quiet_after_the_verb(tmp_path):
    loud = run_cli("export", RESNET20, "--arch", "resnet20", "-o", tmp_path / "a.onnx", "--eval-data",
                   f"cifar10:{TEST_LOSSLESS}")
    quiet = run_cli("export", RESNET20, "--arch", "resnet20", "-o", tmp_path / "b.onnx", "-q")
    assert loud.returncode == quiet.returncode == 0, (loud.stderr, quiet.stderr)
    assert "export resnet20-12fca82f.th -> a.onnx" in loud.stderr
    assert quiet.stderr == "" and "exported" in quiet.stdout  # notes gone, the result table stays
    assert "top-1 cifar10_test_lossless846" in loud.stdout and "91.73" in loud.stdout  # --eval-data is shown


def test_help_of_a_shared_option_names_its_methods_and_each_default():
    """--calib-size belongs to minmax (512 images by default) and nncf (300): the help used to show minmax's alone."""
    import click

    from compress.cli import cli

    ctx = click.Context(cli.commands["quantize"], info_name="quantize")
    helps = {p.name: p.help for p in cli.commands["quantize"].params if isinstance(p, click.Option)}
    assert helps["calib_size"].startswith("(minmax, nncf) minmax: ")
    assert "[default: 512]; nncf: " in helps["calib_size"] and helps["calib_size"].endswith("[default: 300]")
    assert helps["torch_device"].startswith("(genie) ") and "[default: auto]" in helps["torch_device"]
    assert helps["bits"].endswith("[default: w8a8]") and helps["bits"].count("[default:") == 1  # all three: w8a8
    assert "[default: None]" not in " ".join(h or "" for h in helps.values())
    assert "Usage:" in cli.commands["quantize"].get_help(ctx)
