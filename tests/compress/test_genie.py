"""Genie (zero-shot PTQ): the research note's faithfulness checks (a)-(e) (quant-lowrank-methods.md §1.6),
plus Genie-D's error path, save/reload through the "genie" edit, QDQ export and the CLI. Small budgets:
the whole file runs in about a minute on 2 CPU cores."""
from __future__ import annotations

import copy
from dataclasses import replace
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.data import Normalizer, load_dataset
from compress.errors import UserError
from compress.metrics import evaluate
from compress.quantize.genie import (GenieConfig, GenieWeightQuantizer, LSQActQuantizer, build_structure, find_units,
                                     float_mode, genie_quantize, reconstruct_unit, soft_hard_gap, to_genie_quantizers)
from compress.quantize.genie_data import SwingConv2d, SynthesisConfig, synthesize
from tests.conftest import CALIB1000, RESNET20, TEST_JPEG, TEST_LOSSLESS

# the CLI builds its options from the method registry at import: make sure genie/nncf are registered first
CLI_ENTRY = "import compress.quantize.genie, compress.quantize.nncf_ptq; from compress.cli import main; main()"


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPRESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CLI_ENTRY, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calib(resnet20):
    ds = load_dataset(f"cifar10:{CALIB1000}").subset(64, 0)
    return Normalizer(resnet20.spec.mean, resnet20.spec.std)(ds.images)


def _rtn(w: torch.Tensor, q: GenieWeightQuantizer, scale: torch.Tensor) -> torch.Tensor:
    s = scale.view(-1, *[1] * (w.dim() - 1))
    z = q.zero_point.view(-1, *[1] * (w.dim() - 1)).float()
    return s * (torch.clamp(torch.round(w / s) + z, q.qmin, q.qmax) - z)


# --- (a) at initialization the hard-rounded weight is round-to-nearest on (s0, z) ---------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_a_hard_rounding_is_rtn_at_init(resnet20, bits, symmetric):
    w = resnet20.model.layer2[0].conv1.weight.detach()
    q = GenieWeightQuantizer(w, bits, symmetric)
    assert float((q.hard_weight() - _rtn(w, q, q.scale.detach())).abs().max()) <= 1e-6
    assert isinstance(q.scale, nn.Parameter) and isinstance(q.bit_logit, nn.Parameter)
    if symmetric:
        assert int(q.zero_point.abs().max()) == 0 and q.qmin == -q.qmax


# --- (b) the base integer is frozen: rescaling s rescales W_hat exactly --------------------------------------------
def test_b_rescaling_the_step_keeps_the_base_integer(resnet20):
    w = resnet20.model.layer3[1].conv2.weight.detach()
    q = GenieWeightQuantizer(w, 4, symmetric=False)
    base = q.base.clone()
    before = q.hard_weight()
    inside = (q.integers(False) > q.qmin) & (q.integers(False) < q.qmax)  # where the clip is inactive
    with torch.no_grad():
        q.scale.mul_(1.001)
    after = q.hard_weight()
    assert torch.equal(q.base, base)
    rel = ((after - 1.001 * before).abs() / (1.001 * before).abs().clamp_min(1e-12))[inside & (before != 0)]
    assert float(rel.max()) < 1e-6
    # an implementation that recomputes floor(W / s) from the new step would not pass:
    assert not torch.allclose(_rtn(w, q, q.scale.detach())[inside], (1.001 * before)[inside], rtol=1e-6, atol=0)


# --- (c) after reconstruction the rounding is decided and soft == hard ---------------------------------------------
def _first_block(model, calib, cfg):
    """A genie-quantized copy, its units, and the first block's float / quantized inputs, with the stem's and the
    block's activation steps initialized on `calib` (LSQ init) and then frozen for reconstruction."""
    gm = build_structure(copy.deepcopy(model), cfg.structure())
    to_genie_quantizers(gm, cfg.qdrop)
    units = find_units(gm)
    stem, block = units[0], units[1]
    torch.manual_seed(0)
    for unit in (stem, block):
        for q in unit.activation_quantizers(gm):
            q.mode = "init"
    with torch.no_grad():
        stem.module(calib[:32])
        with float_mode(gm):
            x_fp = stem.module(calib)
        x_q = stem.module(calib)
        block.module(x_q[:32])
    for q in block.activation_quantizers(gm):
        q.mode = "eval"
    return gm, units, block, x_fp, x_q


def test_c_reconstruction_decides_the_rounding(resnet20, calib):
    cfg = GenieConfig(bits="w4a4", preset="smoke", recon_iters=200, recon_batch=16).resolved()
    gm, units, block, x_fp, x_q = _first_block(resnet20.model, calib, cfg)
    assert [u.name for u in units] == ["conv1", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1",
                                       "layer2.2", "layer3.0", "layer3.1", "layer3.2", "linear"]
    for q in block.activation_quantizers(gm):
        assert isinstance(q, LSQActQuantizer) and q.initialized
    with torch.no_grad(), float_mode(gm):
        y = block.module(x_fp)
    with torch.no_grad():
        err_before = float((block.module(x_q) - y).pow(2).sum(1).mean())
    stats = reconstruct_unit(block, gm, x_fp, x_q, y, cfg)
    with torch.no_grad():
        err_after = float((block.module(x_q) - y).pow(2).sum(1).mean())
    assert stats["undecided_bits"] < 0.01, stats
    assert soft_hard_gap(block, gm, x_q) < 0.01
    assert err_after < err_before


# --- (d) swing convolution and the Genie-D loss ----------------------------------------------------------------------
def test_d_swing_conv_is_the_conv_at_zero_jitter():
    conv = nn.Conv2d(8, 16, 3, 2, 1)
    x = torch.randn(4, 8, 17, 17)
    assert torch.equal(SwingConv2d(conv, jitter=0)(x), conv(x))
    shifted = SwingConv2d(conv, jitter=1, generator=torch.Generator().manual_seed(0))(x)
    assert shifted.shape == conv(x).shape


def test_d_genie_d_loss_falls_tenfold(resnet20):
    cfg = SynthesisConfig(samples=16, batch=16, iters=40, gen_c1=32, gen_c2=16, seed=0)
    x, summary = synthesize(resnet20.model, resnet20.spec.shape, cfg)
    first, last = summary["batches"][0]["first"]["loss"], summary["batches"][0]["last"]["loss"]
    assert first / last > 10, (first, last)
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()
    assert summary["bn_layers"] == 19
    assert not any(isinstance(m, SwingConv2d) for m in resnet20.model.modules())  # only in the distillation copy


def test_genie_d_needs_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(UserError, match="BatchNorm"):
        synthesize(model, (3, 32, 32), SynthesisConfig(samples=4, batch=4, iters=1))


# --- (e) W8A8 after reconstruction is within 0.3 points of FP; the result saves, reloads and exports --------------
@pytest.fixture(scope="module")
def w8a8(resnet20, calib):
    cfg = GenieConfig(bits="w8a8", preset="smoke", recon_iters=40, recon_batch=16)
    gm, summary = genie_quantize(resnet20.model, calib[:32], cfg, seed=0)
    return gm, summary


def test_e_w8a8_within_point3_of_fp(resnet20, w8a8):
    gm, summary = w8a8
    norm = Normalizer(resnet20.spec.mean, resnet20.spec.std)
    jpeg = load_dataset(f"cifar10:{TEST_JPEG}")
    for test in (load_dataset(f"cifar10:{TEST_LOSSLESS}"), jpeg.subset(None, indices=np.arange(1000))):
        fp, q = evaluate(resnet20.model, test, norm), evaluate(gm, test, norm)
        assert q >= fp - 0.3, (test.source, fp, q)
    assert summary["structure"]["placement"] == "runtime" and summary["structure"]["scheme"]["symmetric_weights"]


def test_saved_model_reloads_and_exports_int8(resnet20, w8a8, tmp_path):
    from compress.io import LoadedModel, load_model, save_model
    from exporters.onnx import export_onnx
    from exporters.qdq import integer_kernel_report

    gm, summary = w8a8
    lm = LoadedModel(gm, resnet20.spec, "compress", resnet20.source, "resnet20", {}, [summary["structure"]])
    back = load_model(save_model(lm, tmp_path / "q.pt"))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back.model(x), gm(x))
    art = export_onnx(back.model, back.spec, tmp_path / "q.onnx", parity_images=x)
    assert art.precision == "int8" and art.parity["top1_agreement"] >= 0.95
    report = integer_kernel_report(tmp_path / "q.onnx")
    assert report["all_convs_integer"], report["summary"]


def test_reference_placement_and_bit_exceptions(resnet20):
    cfg = GenieConfig(bits="w2a4").resolved()
    assert cfg.placement == "reference" and cfg.symmetric_weights is False and cfg.recon_iters == 20000
    gm = build_structure(copy.deepcopy(resnet20.model), cfg.structure())
    acts = gm.act_quant
    assert acts["relu"].bits == 8                      # the second layer's input (BRECQ setting)
    assert acts["x"].bits == 8 and acts["adaptive_avg_pool2d"].bits == 8  # first conv / last linear inputs
    assert not acts["layer1_0_conv2"].enabled          # a residual-add input: float in the reference placement
    assert gm.conv1.weight_quantizer.bits == 8 and gm.linear.weight_quantizer.bits == 8
    assert gm.get_submodule("layer1.0.conv1").weight_quantizer.bits == 2


def test_cli_synthesize_then_quantize(tmp_path):
    npz = tmp_path / "calib.npz"
    r = run_cli("synthesize", RESNET20, "--arch", "resnet20", "-n", "8", "--preset", "smoke", "--iters", "3",
                "-o", npz, "--json")
    assert r.returncode == 0, r.stderr
    with np.load(npz) as z:
        assert z["x"].shape == (8, 32, 32, 3) and z["x"].dtype == np.uint8
        assert z["x_normalized"].shape == (8, 3, 32, 32)
    out = tmp_path / "q.pt"
    r = run_cli("quantize", RESNET20, "--arch", "resnet20", "--method", "genie", "--bits", "w4a4",
                "--preset", "smoke", "--recon-iters", "2", "--calib", npz, "-o", out)
    assert r.returncode == 0, r.stderr
    from compress.io import load_model

    lm = load_model(out)
    assert lm.edits[-1]["kind"] == "genie" and lm.history[-1]["calibration"]["images"] == 8
    assert lm.edits[-1]["placement"] == "reference" and not lm.model.act_quant["layer1_0_conv2"].enabled
    assert lm.model.get_submodule("layer1.0.conv1").weight_quantizer.bits == 4


def test_cli_synthesize_needs_an_npz_output(tmp_path):
    r = run_cli("synthesize", RESNET20, "--arch", "resnet20", "-o", tmp_path / "c.txt")
    assert r.returncode == 2 and "npz" in r.stderr


@pytest.mark.parametrize("spec, source, n", [("noise:8", "noise", 8), ("/recipe/dir/genie:4", "genie", 4),
                                             (f"cifar10:{CALIB1000}", str(CALIB1000), 8)])
def test_calibration_sources(resnet20, spec, source, n):
    from compress.quantize.genie import calibration_images
    from compress.stages import Context

    cfg = GenieConfig(preset="smoke", samples=8, distill_iters=2).resolved()
    ctx = Context(spec=resnet20.spec, data={"calib": spec})
    images, info = calibration_images(resnet20, cfg, ctx)
    assert images.shape == (n, 3, 32, 32) and info["images"] == n and info["source"].startswith(source)
    if source in ("noise", "genie"):  # synthesized data is what the pipeline's manifest fingerprints
        assert ctx.dataset("calib").fingerprint() == info["fingerprint"]


# --- the network-input grid: the exact normalized pixel range, not a fit to (synthetic) calibration images ----------
def _input_grid_range(gm) -> tuple[float, float]:
    q = gm.act_quant["x"]
    s, z = float(q.scale), int(q.zero_point)
    return (q.qmin - z) * s, (q.qmax - z) * s


def test_input_grid_covers_the_pixel_range_and_is_not_learned(resnet20, calib):
    """Genie-D images span about +-1.3 where real normalized CIFAR pixels span [-2.1, 2.6]: a grid fitted on them
    clips every real image (ResNet-32 W8A8 lost 1.9 pt). `input_grid=spec` (the default) sets it from mean/std."""
    from compress.quantize.genie import pixel_range

    lo, hi = pixel_range(resnet20.spec)
    assert lo < -2.0 and hi > 2.5
    narrow = calib[:16] * 0.5  # calibration images that, like Genie-D's, do not reach the pixel extremes
    cfg = GenieConfig(bits="w8a8", preset="smoke", recon_iters=3, lr_a_scale=0.5)  # a huge step lr: must not move it
    gm, summary = genie_quantize(resnet20.model, narrow, cfg, seed=0, spec=resnet20.spec)
    q_lo, q_hi = _input_grid_range(gm)
    step = float(gm.act_quant["x"].scale)
    assert q_lo <= lo + step and q_hi >= hi - step and step <= (hi - lo) / 255 * 1.01, (q_lo, q_hi, step)
    assert summary["input_grids"] and summary["input_grids"][0]["quantizer"].endswith("x")
    # the pixel extremes come back through the grid (no clipping) ...
    x = torch.tensor([lo, hi]).view(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()
    assert float((gm.act_quant["x"](x) - x).abs().max()) <= step / 2 + 1e-6
    # ... where the grid fitted to the calibration images (input_grid=calib) clips them
    gm_c, summary_c = genie_quantize(resnet20.model, narrow, replace(cfg, input_grid="calib", lr_a_scale=4e-5), seed=0)
    c_lo, c_hi = _input_grid_range(gm_c)
    assert not summary_c["input_grids"] and (c_hi < 0.8 * hi or c_lo > 0.8 * lo), (c_lo, c_hi)


def test_cli_rejects_a_bad_input_grid(tmp_path):
    r = run_cli("quantize", RESNET20, "--arch", "resnet20", "--method", "genie", "--input-grid", "pixels",
                "-o", tmp_path / "q.pt")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_learned_weight_steps_stay_positive_on_a_collapsing_target(resnet20, calib):
    """Reconstruction toward an all-zero output (what noise calibration approximates for some channels) pulls
    steps to zero and past it; a step <= 0 flips or erases a channel, and a near-zero one overflows ORT's int32
    bias in the exported QLinearConv. Steps keep a floor relative to their initial value."""
    from compress.quantize.genie import STEP_FLOOR

    cfg = GenieConfig(bits="w8a8", preset="smoke", recon_iters=150, recon_batch=16, lr_w_scale=0.05).resolved()
    gm, _, block, x_fp, x_q = _first_block(resnet20.model, calib, cfg)
    init = [q.scale.detach().clone() for q in block.weight_quantizers(gm)]
    with torch.no_grad():
        y = torch.zeros_like(block.module(x_fp))
    reconstruct_unit(block, gm, x_fp, x_q, y, cfg)
    for q, s0 in zip(block.weight_quantizers(gm), init):
        assert bool((q.scale.detach() >= s0 * STEP_FLOOR * (1 - 1e-6)).all()), (q.scale.min(), s0.min())


# --- reconstruction units: BRECQ-style blocks found on the graph ----------------------------------------------------
def _units(model: nn.Module) -> list[list[str]]:
    cfg = GenieConfig(bits="w4a4", preset="smoke").resolved()
    gm = build_structure(copy.deepcopy(model).eval(), cfg.structure())
    to_genie_quantizers(gm, cfg.qdrop)
    return [u.layers for u in find_units(gm)]


def test_units_are_the_stem_each_residual_block_and_the_head(resnet20):
    units = _units(resnet20.model)
    blocks = [[f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"] for s in (1, 2, 3) for b in range(3)]
    assert units == [["conv1"], *blocks, ["linear"]]


def test_units_of_mobilenet_v2_are_its_inverted_residuals():
    from compress.zoo import mobilenetv2_cifar

    model = mobilenetv2_cifar.mobilenet_v2()
    units = _units(model)
    blocks = [n for n, m in model.named_modules() if isinstance(m, mobilenetv2_cifar.InvertedResidual)]
    assert len(units) == 1 + len(blocks) + 2  # stem, 17 blocks, last 1x1 conv, classifier
    assert units[0] == ["features.0.0"] and units[-2:] == [["features.18.0"], ["classifier"]]
    for block, unit in zip(blocks, units[1:-2]):  # expand (if t > 1), depthwise, project: one unit per block
        convs = [n for n, m in model.named_modules() if n.startswith(block + ".") and isinstance(m, nn.Conv2d)]
        assert unit == convs and len(convs) in (2, 3)


class _Skip(nn.Module):  # a residual block of no known name
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.b(torch.relu(self.bn(self.a(x))))


def test_an_unnamed_residual_is_one_unit_and_a_plain_chain_is_not():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Skip(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    assert _units(model) == [["0"], ["2.a", "2.b"], ["3"], ["5"], ["7"]]
