"""--torch-device: where Genie-D and Genie-M run (the machine compressing, not the target).

Everywhere: the spec is checked, `auto` is cpu without a GPU, the manifest records the device that ran, and asking
for CUDA where there is none is one line and exit 2 before any work. With a CUDA GPU: the same seed starts
synthesis from the same generator and latents as on the CPU, Genie-M on the GPU keeps W8A8 within 0.3 pt of FP,
and the model comes back on the CPU, ready to export.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from compress.data import Normalizer, load_dataset
from compress.errors import UserError
from compress.metrics import evaluate
from compress.quantize.genie import GenieConfig, genie_quantize
from compress.quantize.genie_data import SynthesisConfig, synthesize
from compress.torch_device import resolve
from tests.conftest import CALIB1000, RESNET20, TEST_LOSSLESS, run_cli

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: the refusal path does not apply")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_bad_specs_name_the_choices(spec):
    with pytest.raises(UserError, match=r"auto .* \| cpu \| cuda \| cuda:N$"):
        resolve(spec)


def test_auto_is_cuda_0_with_a_gpu_else_cpu():
    assert resolve("cpu") == "cpu"
    assert resolve("auto") == ("cuda:0" if HAS_CUDA else "cpu")


@needs_no_cuda
@pytest.mark.parametrize("verb", ["quantize", "synthesize"])
def test_cuda_without_a_gpu_is_one_line_exit_2_and_no_file(tmp_path, verb):
    out = tmp_path / "out" / ("q.pt" if verb == "quantize" else "c.npz")
    extra = ["--method", "genie"] if verb == "quantize" else []
    r = run_cli(verb, RESNET20, "--arch", "resnet20", *extra, "--torch-device", "cuda", "-o", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --torch-device cuda: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
        f"{'CUDA ' + torch.version.cuda + ' build' if torch.version.cuda else 'a CPU-only build'})"]
    assert not out.exists()


def test_the_saved_model_records_the_device_that_ran(tmp_path):
    out = tmp_path / "q.pt"
    r = run_cli("-q", "quantize", RESNET20, "--arch", "resnet20", "--method", "genie", "--bits", "w8a8",
                "--preset", "smoke", "--samples", "8", "--distill-iters", "2", "--recon-iters", "2", "-o", out)
    assert r.returncode == 0, r.stderr
    from compress.io import load_model

    entry = load_model(out).history[-1]
    assert entry["config"]["torch_device"] == resolve("auto")
    assert entry["calibration"]["synthesis"]["config"]["device"] == resolve("auto")


# --- on a CUDA GPU ----------------------------------------------------------------------------------------------
@needs_cuda
def test_synthesis_on_cuda_starts_where_the_cpu_starts_and_converges(resnet20):
    cfg = SynthesisConfig(samples=16, batch=16, iters=40, gen_c1=32, gen_c2=16, seed=0)
    x_gpu, s_gpu = synthesize(resnet20.model, resnet20.spec.shape, replace(cfg, device="cuda"))
    _, s_cpu = synthesize(resnet20.model, resnet20.spec.shape, replace(cfg, iters=1))
    first_gpu, first_cpu = s_gpu["batches"][0]["first"]["loss"], s_cpu["batches"][0]["first"]["loss"]
    assert first_gpu == pytest.approx(first_cpu, rel=1e-3)  # same generator, latents and shifts: same first loss
    assert first_gpu / s_gpu["batches"][0]["last"]["loss"] > 10
    assert x_gpu.device.type == "cpu" and s_gpu["config"]["device"] == "cuda:0"
    assert next(resnet20.model.parameters()).device.type == "cpu"  # the caller's model never moves


@needs_cuda
def test_genie_m_on_cuda_w8a8_within_point3_and_model_back_on_cpu(resnet20, tmp_path):
    norm = Normalizer(resnet20.spec.mean, resnet20.spec.std)
    calib = norm(load_dataset(f"cifar10:{CALIB1000}").subset(64, 0).images)
    cfg = GenieConfig(bits="w8a8", preset="smoke", recon_iters=40, recon_batch=16, torch_device="cuda")
    gm, summary = genie_quantize(resnet20.model, calib[:32], cfg, seed=0)
    assert {t.device.type for t in [*gm.parameters(), *gm.buffers()]} == {"cpu"}
    assert len(summary["reconstruction"]) == 11 and all(s["last_rec_loss"] >= 0 for s in summary["reconstruction"])
    test = load_dataset(f"cifar10:{TEST_LOSSLESS}")
    assert evaluate(gm, test, norm) >= evaluate(resnet20.model, test, norm) - 0.3


@needs_cuda
def test_cli_genie_on_cuda_then_export_runs_in_onnxruntime(tmp_path):
    out = tmp_path / "q.pt"
    r = run_cli("-q", "quantize", RESNET20, "--arch", "resnet20", "--method", "genie", "--bits", "w8a8",
                "--preset", "smoke", "--samples", "32", "--recon-iters", "20", "--torch-device", "cuda", "-o", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("-q", "export", out, "--format", "onnx", "-o", tmp_path / "q.onnx", "--json")
    assert r.returncode == 0, r.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
