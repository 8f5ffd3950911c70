"""`nncf`: NNCF's post-training quantization (nncf.quantize, W8A8) as the peer baseline, in our modules.

NNCF (OpenVINO's compression library) quantizes the float model with its own hooks and quantizers: min-max
style statistics on its quantizer placement, symmetric per-channel weights, symmetric per-tensor
activations (preset "performance"), then Fast Bias Correction (it shifts biases, here the BatchNorm
biases, to undo the mean error quantization causes). We map that result into the shared fake-quant modules
so that it is compared, saved, reloaded and exported exactly like `minmax` and `genie`:

1. the float parameters NNCF corrected (BN biases) are copied into a copy of the float model, which then
   goes through the shared `prepare()` (BN folding, our placement);
2. weights: NNCF's 8-bit symmetric per-channel grid is the absmax grid, which BN folding scales per channel
   exactly; our min-max grid on the folded weights is that grid (checked: `weight_scale_max_rel_diff`);
3. activations: each of our activation quantizers takes the grid of the NNCF quantizer that reads the same
   tensor (matched by value on a probe batch, NNCF's quantizers switched to pass-through). Tensors NNCF
   leaves unquantized (our placement quantizes every input of an integer-runtime op) keep a min-max grid
   from the same calibration images; the summary counts both.

NNCF's overflow fix (7-bit weights in the first layer for pre-VNNI x86) is turned off, so that NNCF's own
model and the mapped one use the same 8-bit grids. The result reloads through the "quantize" edit and
exports to the same QDQ ONNX graph as every other method.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from compress.data import Dataset, Normalizer, batches
from compress.errors import UserError
from compress.io import LoadedModel
from compress.progress import status
from compress.quantize import METHODS
from compress.quantize.calibrate import calibrate
from compress.quantize.fakequant import ActQuantizer, WeightQuantizer
from compress.quantize.insert import QuantScheme, prepare, quantize_edit
from compress.stages import Context, Method, MethodConfig, option

PRESETS = ("performance", "mixed")


def import_nncf():
    # NNCF compiles a small C++ extension on first use; on a slow or busy machine that takes more than its
    # default 60 s timeout, so wait for it unless the user set a limit
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    try:
        import nncf
    except ImportError:
        raise UserError("--method nncf needs NNCF: pip install 'nncf>=3.0' (or pip install 'edge-compress[nncf]')") from None
    return nncf


@dataclass
class NNCFConfig(MethodConfig):
    calib_size: int = option(300, "calibration images drawn from the calib data (NNCF's default subset size: 300)")
    nncf_preset: str = option("performance", "NNCF preset: symmetric (performance) or asymmetric (mixed) activations",
                              PRESETS)
    fast_bias_correction: bool = option(True, "NNCF's Fast Bias Correction after range setting")
    bits: str = option("w8a8", "NNCF's PTQ is 8-bit: w8a8 only (accepted so scripts can always pass --bits)", ("w8a8",))

    def validate(self) -> None:
        if self.calib_size < 1:
            raise UserError(f"calib_size must be at least 1, got {self.calib_size}")


def nncf_quantize(model: nn.Module, images: torch.Tensor, cfg: NNCFConfig, batch: int = 32) -> nn.Module:
    """NNCF's own quantized copy of `model` (the caller's model is untouched)."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    ds = nncf.Dataset([images[i:i + batch] for i in range(0, len(images), batch)])
    preset = nncf.QuantizationPreset.PERFORMANCE if cfg.nncf_preset == "performance" else nncf.QuantizationPreset.MIXED
    params = AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)
    with status("NNCF post-training quantization"), _stdout_to_stderr():
        return nncf.quantize(copy.deepcopy(model).eval(), ds, preset=preset, subset_size=math.ceil(len(images) / batch),
                             fast_bias_correction=cfg.fast_bias_correction, advanced_parameters=params)


@contextmanager
def _stdout_to_stderr():
    """NNCF prints progress bars and INFO logs on stdout: send them to stderr (file-descriptor level, so that
    handlers holding sys.stdout are covered too), or nowhere under -q, and keep stdout for the command's own
    output (--json). NNCF's failures reach us as exceptions, not as these lines."""
    from compress.progress import quiet

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded use): nothing to protect
        yield
        return
    target = os.open(os.devnull, os.O_WRONLY) if quiet() else 2
    try:
        os.dup2(target, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        if target != 2:
            os.close(target)


def _nncf_quantizers(qmodel: nn.Module) -> list[nn.Module]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in qmodel.modules() if isinstance(m, BaseQuantizer)]


def _capture(module_list: list[nn.Module], run) -> dict[nn.Module, torch.Tensor]:
    """First input each module sees during `run()`, with the modules made pass-through meanwhile."""
    seen: dict[nn.Module, torch.Tensor] = {}
    saved = {}
    for m in module_list:
        saved[m] = m.forward

        def passthrough(x, *a, _m=m, **k):
            seen.setdefault(_m, x.detach().clone())
            return x

        m.forward = passthrough
    try:
        with torch.no_grad():
            run()
    finally:
        for m, fwd in saved.items():
            m.forward = fwd
    return seen


def _match(ours: torch.Tensor, candidates: dict[nn.Module, torch.Tensor]) -> nn.Module | None:
    best, best_err = None, None
    scale = float(ours.abs().max()) or 1.0
    for m, t in candidates.items():
        if t.shape != ours.shape:
            continue
        err = float((t - ours).abs().max()) / scale
        if err < 1e-3 and (best_err is None or err < best_err):
            best, best_err = m, err
    return best


def map_into(gm: nn.Module, qmodel: nn.Module, probe: torch.Tensor) -> dict:
    """Copy NNCF's activation grids into our ActQuantizers that read the same tensors; returns counts."""
    ours = [m for m in gm.modules() if isinstance(m, ActQuantizer)]
    weight_quantizers = [m for m in gm.modules() if isinstance(m, WeightQuantizer)]
    theirs = _nncf_quantizers(qmodel)  # all pass-through: both networks run in float while we look
    for m in weight_quantizers:
        m.enabled = False
    try:
        our_inputs = _capture(ours, lambda: gm(probe))
    finally:
        for m in weight_quantizers:
            m.enabled = True
    their_inputs = _capture(theirs, lambda: qmodel(probe))
    their_inputs = {m: t for m, t in their_inputs.items() if not m.per_channel}  # per-tensor: the activations
    mapped, unmapped = 0, []
    for q in ours:
        if q not in our_inputs:
            continue
        src = _match(our_inputs[q], their_inputs)
        if src is None:
            unmapped.append(q)
            continue
        lo, hi, scale, zp = src.get_parameters_for_torch_fq()
        if int(hi) - int(lo) != (q.qmax - q.qmin) or scale.numel() != 1:
            unmapped.append(q)
            continue
        q.set_qparams(scale.reshape(1).float(), (zp.reshape(1) - int(lo)).float())  # into the uint8 container
        mapped += 1
    return {"activation_grids_from_nncf": mapped, "activation_grids_minmax": len(unmapped),
            "nncf_quantizers": len(_nncf_quantizers(qmodel))}


class NNCFPTQ(Method):
    name = "nncf"
    needs_data = ("calib",)
    family = "quantize"
    Config = NNCFConfig
    summary = "NNCF post-training quantization (W8A8), mapped into the shared fake-quant modules (peer baseline)"

    def apply(self, lm: LoadedModel, cfg: NNCFConfig, ctx: Context) -> LoadedModel:
        lm.require_compressible("quantize")
        start = time.perf_counter()
        data = ctx.dataset("calib", required=True).subset(cfg.calib_size, ctx.seed)
        norm = ctx.normalizer()
        images = torch.cat([x for x, _ in batches(data, norm, 256)])
        qmodel = nncf_quantize(lm.model, images, cfg)
        gm, info = to_shared_modules(lm.model, qmodel, images, cfg)
        scheme = info.pop("scheme")
        entry = {"stage": "quantize", "method": self.name, "config": asdict(cfg), "scheme": scheme.to_dict(),
                 "calibration": {"images": len(data), "source": data.source, "fingerprint": data.fingerprint()},
                 "nncf": info, "seconds": round(time.perf_counter() - start, 3)}
        return LoadedModel(gm.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           [*lm.edits, quantize_edit(scheme)], [*lm.history, entry], lm.sha256)


def to_shared_modules(model: nn.Module, qmodel: nn.Module, images: torch.Tensor, cfg: NNCFConfig) -> tuple[nn.Module, dict]:
    """Our W8A8 structure with NNCF's corrected float parameters and activation grids."""
    nncf_version = import_nncf().__version__
    corrected = {k: v for k, v in qmodel.state_dict().items() if "__nncf" not in k}
    float_copy = copy.deepcopy(model).eval()
    before = float_copy.state_dict()
    changed = [k for k, v in corrected.items() if k in before and not torch.equal(before[k], v)]
    _, unexpected = float_copy.load_state_dict(corrected, strict=False)
    if unexpected:
        raise UserError(f"internal: NNCF added parameters we cannot map ({', '.join(unexpected[:3])})")
    scheme = QuantScheme(w_bits=8, a_bits=8, per_channel=True, symmetric_weights=True,
                         symmetric_acts=cfg.nncf_preset == "performance", first_last_bits=8)
    gm = prepare(float_copy, scheme)  # weights: min-max per channel on the folded weights = NNCF's absmax grid
    calib = Dataset(images.numpy(), None, "nncf-calibration", prenormalized=True)
    calibrate(gm, calib, Normalizer((0.0,), (1.0,)))  # grids for tensors NNCF leaves unquantized (overwritten where NNCF has one)
    counts = map_into(gm, qmodel, images[:64])
    counts.update({"nncf_version": nncf_version, "float_tensors_corrected": changed,
                   "scheme": scheme})
    return gm, counts


METHODS.add(NNCFPTQ.name, NNCFPTQ())
