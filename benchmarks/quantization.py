"""Post-training quantization benchmark: FP32, min-max, NNCF (W8A8) and Genie with synthetic / real / noise
calibration (real: JPEG and lossless training images) at W8A8, W4A8, W4A4 and W2A4, on the real pretrained
CIFAR-10 ResNet-20/32.

    .venv/bin/python benchmarks/quantization.py                       # the committed run (about an hour on 2 cores)
    .venv/bin/python benchmarks/quantization.py --models resnet20 --preset smoke --out /tmp/q   # a quick check
    # rerun only some rows into the committed results (Genie-D images cached: synthesis is deterministic)
    .venv/bin/python benchmarks/quantization.py --models resnet32 --parts genie,diagnose --merge --synth-cache /tmp/genie
    # more Genie-M seeds for some cells (genie and real calibration; the calibration images stay fixed)
    .venv/bin/python benchmarks/quantization.py --parts seeds --seeds 1,2 --seed-bits w4a4,w2a4 --merge --synth-cache /tmp/genie
    # one calibration source only (here the lossless training images), main run then more seeds
    .venv/bin/python benchmarks/quantization.py --parts genie --sources real-clean --merge --synth-cache /tmp/genie
    .venv/bin/python benchmarks/quantization.py --parts seeds --sources real-clean --seed-bits w4a4,w2a4 --merge --synth-cache /tmp/genie
    # other calibration draws (Genie-D seed / real subset), Genie-M seeds 0 and --seeds on each
    .venv/bin/python benchmarks/quantization.py --parts draws --draws 1,2 --seed-bits w4a4,w2a4 --merge --synth-cache /tmp/genie
    # replace the "Reading the results" notes (one per paragraph of a text file) and re-render the markdown
    .venv/bin/python benchmarks/quantization.py --notes notes.txt

Writes benchmarks/results/quantization.json (everything, including per-unit reconstruction statistics) and
quantization.md (the tables). Budgets are per preset (PRESETS below) and recorded with the results, as are the
machine's load averages: the box is a shared 2-core CPU, so wall times carry that load.

Design for a tight CPU budget: one thread per process (on a loaded 2-core box two threads run several times
slower); Genie-D runs once per model and its images are reused by every bit-width; evaluation uses all of
cifar10_test_lossless846 and the first `--jpeg-n` images of cifar10_test_jpeg; every W8A8 model is exported
to QDQ ONNX (parity-checked), its ORT CPU latency measured in a fresh process (compress.profile/1), and what
ONNX Runtime and OpenVINO execute as integer kernels is reported, as it is for one 4/2-bit export per bit-width
(int8 containers, and their int4/uint4 form from exporters.qdq.pack_int4, with what `compress export` picks).
`--parts diagnose` runs the W8A8 diagnosis (one factor at a time: BN folding, weights alone, activation ranges
per calibration source, the network-input grid, reconstruction, soft rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compress.assets import data_path  # noqa: E402
from compress.data import Dataset, Normalizer, load_dataset  # noqa: E402
from compress.io import zoo_model  # noqa: E402
from compress.torch_device import resolve as resolve_torch_device  # noqa: E402
from compress.metrics import evaluate  # noqa: E402

BITS = ("w8a8", "w4a8", "w4a4", "w2a4")
# calibration sources for Genie-M: Genie-D images, real JPEG training images (cifar10_calib1000_jpeg, the same JPEG
# domain as the jpeg test set), real lossless training images (cifar10_train_lossless4660, the domain the model was
# trained on and Genie-D synthesizes from its BN statistics), Gaussian noise
SOURCES = ("genie", "real", "real-clean", "noise")
REAL_FILES = {"real": "cifar10_calib1000_jpeg.npz", "real-clean": "cifar10_train_lossless4660.npz"}
SEED_SOURCES = ("genie", "real")  # what --parts seeds runs unless --sources says otherwise
DRAW_SOURCES = ("genie", "real", "real-clean")  # what --parts draws runs unless --sources says otherwise
# budgets: calibration images (each source), Genie-D iterations / generator width, reconstruction
# iterations per unit (per bit-width), min-max and NNCF calibration images
PRESETS = {
    # bench: 256 images x 400 Genie-D iterations (the reference: 1024 x 4000; 4x the compute of fast's 128 x 200)
    # with the reference generator width 128 (64 scored the same over two synthesis draws, see the notes),
    # the same 256 images for real and noise calibration; all 10000 JPEG test images (2000 left ~0.9 pt of noise)
    "bench": dict(samples=256, distill_iters=400, gen_width=128, recon_iters={"w8a8": 60, "w4a8": 150, "w4a4": 150, "w2a4": 150},
                  minmax_calib=512, nncf_calib=300, jpeg_n=10000),
    "fast": dict(samples=128, distill_iters=200, gen_width=64, recon_iters={b: 200 for b in BITS},
                 minmax_calib=512, nncf_calib=300, jpeg_n=2000),
    "smoke": dict(samples=32, distill_iters=10, gen_width=32, recon_iters={b: 5 for b in BITS},
                  minmax_calib=64, nncf_calib=64, jpeg_n=200),
    # the reference's budgets (GPU-hours at 20000 iterations per unit: with --torch-device cuda, and --recon-iters
    # to trim the reconstruction)
    "paper": dict(samples=1024, distill_iters=4000, gen_width=128, recon_iters={b: 20000 for b in BITS},
                  minmax_calib=512, nncf_calib=300, jpeg_n=10000),
}
GOALS = {"genie_w8a8_vs_fp": 0.3, "genie_w4a4_vs_fp": 3.0, "genie_vs_real": 1.0}
# the genie-vs-real goal against each real calibration source: `real` (JPEG) is the goal as set; `real-clean`
# (lossless training images) is checked beside it, for the domain the model was trained on
GENIE_VS = {"real": "genie data within 1 pt of real data",
            "real-clean": "genie data within 1 pt of real-clean data (lossless training images)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


PARTS = ("fp32", "minmax", "nncf", "genie")


class Bench:
    def __init__(self, arch: str, preset: dict, out: Path, latency: bool, parts: tuple[str, ...] = PARTS,
                 synth_cache: Path | None = None, seeds: tuple[int, ...] = (1, 2), seed_bits: tuple[str, ...] = BITS,
                 sources: tuple[str, ...] | None = None, draws: tuple[int, ...] = (1, 2), torch_device: str = "cpu"):
        self.arch, self.p, self.out, self.latency = arch, preset, out, latency
        self.torch_device = torch_device  # where Genie-D and Genie-M run
        self.parts, self.synth_cache = parts, synth_cache
        self.sources = sources  # None: SOURCES for --parts genie, SEED_SOURCES for --parts seeds
        self.seeds, self.seed_bits, self.seed_rows = seeds, seed_bits, []
        self.draws, self.draw_synthesis = draws, {}
        self.lm = zoo_model(arch)
        self.norm = Normalizer(self.lm.spec.mean, self.lm.spec.std)
        lossless = load_dataset(f"cifar10:{data_path('cifar10_test_lossless846.npz')}")
        jpeg = load_dataset(f"cifar10:{data_path('cifar10_test_jpeg.npz')}")
        jpeg = jpeg.subset(None, indices=np.arange(min(preset["jpeg_n"], len(jpeg))))
        self.eval_sets = {"lossless846": lossless, f"jpeg{len(jpeg)}": jpeg}
        self.rows: list[dict] = []
        self.exports: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"qbench-{arch}-"))

    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        return {name: round(evaluate(model, ds, self.norm), 2) for name, ds in self.eval_sets.items()}

    def add(self, method: str, bits: str, calib: str, model: torch.nn.Module, seconds: float, extra: dict | None = None):
        t = time.perf_counter()
        acc = self.accuracy(model)
        row = {"model": self.arch, "method": method, "bits": bits, "calib": calib, "accuracy": acc,
               "seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t, 1), "loadavg": loadavg(),
               **(extra or {})}
        self.rows.append(row)
        log(f"{self.arch} {method:7s} {bits} {calib:6s} {acc} {seconds:.0f}s")
        return row

    # --- calibration sources ------------------------------------------------------------------------------------
    def calibration(self, draw: int = 0, sources: tuple[str, ...] = SOURCES) -> dict[str, tuple[torch.Tensor, dict]]:
        """Calibration images of each source. draw: the seed of the draw (Genie-D's seed, the real subsets' and the
        noise's); 0 is the main run's, the others only feed --parts draws (their synthesis goes to draw_synthesis)."""
        from compress.quantize.genie_data import SynthesisConfig, noise_dataset, synthesize

        n = self.p["samples"]
        # the same count and subset seed for each real source
        real = {name: load_dataset(f"cifar10:{data_path(f)}").subset(n, draw) for name, f in REAL_FILES.items()}
        noise = noise_dataset(n, self.lm.spec.shape, draw)
        out = {**{name: (self.norm(ds.images), {"source": ds.source, "seconds": 0.0}) for name, ds in real.items()},
               "noise": (self.norm(noise.images, True), {"source": "N(0,1)", "seconds": 0.0})}
        if "genie" not in sources:
            return out
        cfg = SynthesisConfig(samples=n, batch=min(128, n), iters=self.p["distill_iters"], gen_c1=self.p["gen_width"],
                              gen_c2=self.p["gen_width"] // 2, seed=draw, device=self.torch_device)
        on = "" if self.torch_device == "cpu" else f"_{self.torch_device.replace(':', '')}"  # GPU images differ slightly
        cache = (self.synth_cache / f"{self.arch}_genie_n{n}_it{cfg.iters}_w{cfg.gen_c1}_s{cfg.seed}{on}.pt"
                 if self.synth_cache else None)
        from_cache = cache is not None and cache.is_file()
        if from_cache:  # Genie-D is deterministic (seeded, one thread): same images
            saved = torch.load(cache, weights_only=False)
            x, summary, synth_s, load = saved["x"], saved["summary"], saved["seconds"], saved["loadavg"]
            log(f"{self.arch} Genie-D {n} images from {cache} (synthesized in {synth_s:.0f}s)")
        else:
            t = time.perf_counter()
            x, summary = synthesize(self.lm.model, self.lm.spec.shape, cfg)
            synth_s, load = time.perf_counter() - t, loadavg()
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"x": x, "summary": summary, "seconds": synth_s, "loadavg": load}, cache)
        log(f"{self.arch} Genie-D {n} images (seed {draw}) in {synth_s:.0f}s, loss "
            f"{summary['batches'][0]['first']['loss']:.2f} -> {summary['batches'][-1]['last']['loss']:.3f}")
        record = {"seconds": round(synth_s, 1), "images": n, "config": summary["config"],
                  "batches": summary["batches"], "loadavg": load, "cached": from_cache}
        if draw == 0:
            self.synthesis = record
        else:
            self.draw_synthesis[draw] = record
        return {"genie": (x, {"source": "Genie-D", "seconds": synth_s}), **out}

    # --- methods --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        if "fp32" in self.parts:
            self.add("fp32", "-", "-", self.lm.model, 0.0)
            self.export("fp32", "-", "-", self.lm.model)
        calib = self.calibration() if {"genie", "seeds"} & set(self.parts) else {}
        self.calib_cache = calib
        if "minmax" in self.parts:
            self.run_minmax()
        if "nncf" in self.parts:
            self.run_nncf()
        if "genie" in self.parts:
            self.run_genie(calib)
        if "seeds" in self.parts:
            self.run_seeds(calib)
        if "draws" in self.parts:
            self.run_draws()

    def run_minmax(self) -> None:
        from compress.quantize.calibrate import calibrate
        from compress.quantize.insert import prepare
        from compress.quantize.minmax import MinMaxConfig

        minmax_ds = load_dataset(f"cifar10:{data_path('cifar10_calib1000_jpeg.npz')}").subset(self.p["minmax_calib"], 0)
        for bits in BITS:
            t = time.perf_counter()
            cfg = MinMaxConfig(bits=bits)
            gm = prepare(_copy(self.lm.model), cfg.scheme())
            calibrate(gm, minmax_ds, self.norm)
            self.add("minmax", bits, f"real{len(minmax_ds)}", gm.eval(), time.perf_counter() - t)
            if bits == "w8a8":
                self.export("minmax", bits, "real", gm)

    def run_nncf(self) -> None:
        from compress.quantize.nncf_ptq import NNCFConfig, nncf_quantize, to_shared_modules

        nncf_ds = load_dataset(f"cifar10:{data_path('cifar10_calib1000_jpeg.npz')}").subset(self.p["nncf_calib"], 0)
        x = self.norm(nncf_ds.images)
        t = time.perf_counter()
        cfg = NNCFConfig(calib_size=len(x))
        native = nncf_quantize(self.lm.model, x, cfg)
        gm, info = to_shared_modules(self.lm.model, native, x, cfg)
        seconds = time.perf_counter() - t
        info.pop("scheme")
        self.add("nncf", "w8a8", f"real{len(x)}", gm.eval(), seconds,
                 {"nncf_native_accuracy": self.accuracy(native), "nncf_mapping": info})
        self.export("nncf", "w8a8", "real", gm)
        del native

    def run_genie(self, calib: dict) -> None:
        from compress.quantize.genie import GenieConfig, genie_quantize

        exported_low = set()
        for source in self.sources or SOURCES:
            images, meta = calib[source]
            for bits in BITS:
                cfg = GenieConfig(bits=bits, preset="fast", recon_iters=self.p["recon_iters"][bits],
                                      torch_device=self.torch_device)
                t = time.perf_counter()
                gm, summary = genie_quantize(self.lm.model, images, cfg, seed=0, spec=self.lm.spec)
                seconds = time.perf_counter() - t
                resolved = cfg.resolved()
                self.add("genie", bits, source, gm, seconds,
                         {"calib_images": int(len(images)), "recon_iters": resolved.recon_iters,
                          "lr_bit": resolved.lr_bit, "placement": resolved.placement, "input_grid": resolved.input_grid,
                          "symmetric_weights": resolved.symmetric_weights,
                          "undecided_bits_max": summary["undecided_bits_max"], "units": len(summary["units"]),
                          "reconstruction": summary["reconstruction"]})
                if bits == "w8a8":
                    self.export("genie", bits, source, gm)
                elif source == "genie" and bits not in exported_low:
                    exported_low.add(bits)
                    self.export("genie", bits, source, gm, latency=False)

    def run_seeds(self, calib: dict, draw: int = 0, seeds: tuple[int, ...] | None = None,
                  sources: tuple[str, ...] | None = None) -> None:
        """Genie-M again with other seeds (QDrop masks, mini-batch order, activation-grid samples) on the same
        calibration images, genie and real data: the spread of one cell, for goals decided by a few images.
        draw > 0: the calibration images of that draw (run_draws)."""
        from compress.quantize.genie import GenieConfig, genie_quantize

        for bits in self.seed_bits:
            for source in sources or self.sources or SEED_SOURCES:
                for seed in seeds or self.seeds:
                    cfg = GenieConfig(bits=bits, preset="fast", recon_iters=self.p["recon_iters"][bits],
                                      torch_device=self.torch_device)
                    t = time.perf_counter()
                    gm, _ = genie_quantize(self.lm.model, calib[source][0], cfg, seed=seed, spec=self.lm.spec)
                    seconds = time.perf_counter() - t
                    acc = self.accuracy(gm)
                    self.seed_rows.append({"model": self.arch, "method": "genie", "bits": bits, "calib": source,
                                           "seed": seed, **({"draw": draw} if draw else {}), "accuracy": acc,
                                           "seconds": round(seconds, 1), "loadavg": loadavg()})
                    log(f"{self.arch} genie {bits} {source:6s} draw {draw} seed {seed} {acc} {seconds:.0f}s")

    def run_draws(self) -> None:
        """The seeds' runs (Genie-M seed 0 and --seeds) on other calibration draws: Genie-D with another seed, other
        random subsets of the real sets. The main run's cells rest on one draw of 256 images; at 2 bits one Genie-D
        draw scored 2.4 pt (mean over Genie-M seeds) above two others, enough to pass or miss a 1-pt goal."""
        sources = self.sources or DRAW_SOURCES
        for draw in self.draws:
            calib = self.calibration(draw, sources)
            self.run_seeds(calib, draw, (0, *self.seeds), sources)

    # --- diagnosis: where does W8A8 lose accuracy on Genie-D data? ----------------------------------------------------
    def diagnose(self, calib: dict) -> list[dict]:
        """W8A8 only, one factor at a time: BN folding, weights alone, min-max activation ranges from each calibration
        source with the network-input grid fitted to that source or set from the normalization (spec), and Genie-M
        with the input grid fitted (the old default) vs spec, with round-to-nearest (no reconstruction) and with
        learned steps but round-to-nearest (no soft-bit learning)."""
        from compress.quantize.calibrate import calibrate
        from compress.quantize.fakequant import set_quant_enabled
        from compress.quantize.genie import GenieConfig, genie_quantize, pixel_range
        from compress.quantize.genie_data import synthetic_dataset
        from compress.quantize.insert import ACT_CONTAINER, QuantScheme, prepare

        out = []

        def row(what: str, source: str, input_grid: str, model, t0: float, extra: dict | None = None):
            acc = self.accuracy(model)
            out.append({"model": self.arch, "what": what, "calib": source, "input_grid": input_grid, "accuracy": acc,
                        "seconds": round(time.perf_counter() - t0, 1), "loadavg": loadavg(), **(extra or {})})
            log(f"{self.arch} diagnose {what:38s} {source:6s} input {input_grid:5s} {acc}")

        t = time.perf_counter()
        gm = prepare(_copy(self.lm.model), QuantScheme())
        set_quant_enabled(gm, False, False)
        row("BN folded, no quantization", "-", "-", gm.eval(), t)
        t = time.perf_counter()
        set_quant_enabled(gm, True, False)
        row("W8 weights only (min-max)", "-", "-", gm.eval(), t)
        lo, hi = pixel_range(self.lm.spec)
        for source, (images, _) in calib.items():
            ds = synthetic_dataset(images, source)
            gm = prepare(_copy(self.lm.model), QuantScheme())
            t = time.perf_counter()
            calibrate(gm, ds, Normalizer((0.0,), (1.0,)))
            x_q = gm.get_submodule(ACT_CONTAINER)["x"]
            fitted = [round((x_q.qmin - int(x_q.zero_point)) * float(x_q.scale), 3),
                      round((x_q.qmax - int(x_q.zero_point)) * float(x_q.scale), 3)]
            row("min-max W8A8", source, "calib", gm.eval(), t, {"input_range": fitted})
            t = time.perf_counter()
            x_q.set_range(torch.tensor(lo), torch.tensor(hi), False)
            row("min-max W8A8", source, "spec", gm.eval(), t, {"input_range": [round(lo, 3), round(hi, 3)]})
        images = calib["genie"][0]
        variants = [("Genie-M W8A8", "calib", {}), ("Genie-M W8A8, round-to-nearest, no reconstruction", "spec",
                     dict(recon_iters=1, lr_w_scale=0.0, lr_a_scale=0.0, lr_bit=0.0)),
                    ("Genie-M W8A8, steps learned, round-to-nearest", "spec", dict(lr_bit=0.0))]
        for what, grid, kw in variants:
            cfg = GenieConfig(bits="w8a8", preset="fast", recon_iters=self.p["recon_iters"]["w8a8"], input_grid=grid,
                              torch_device=self.torch_device)
            cfg = replace(cfg, **kw)
            t = time.perf_counter()
            gm, summary = genie_quantize(self.lm.model, images, cfg, seed=0, spec=self.lm.spec)
            row(what, "genie", grid, gm, t, {"recon_iters": cfg.recon_iters, "undecided_bits_max": summary["undecided_bits_max"]})
        return out

    # --- deployment -----------------------------------------------------------------------------------------------
    def export(self, method: str, bits: str, calib: str, model: torch.nn.Module, latency: bool = True) -> None:
        from exporters.onnx import export_onnx
        from exporters.qdq import integer_kernel_report

        name = "_".join([self.arch, method] + ["fp32" if p == "-" else p for p in (bits, calib)])
        path = self.tmp / f"{name}.onnx"
        parity_x = self.norm(self.eval_sets["lossless846"].images[:64])
        rec = {"model": self.arch, "method": method, "bits": bits, "calib": calib}
        low = bits not in ("-", "w8a8")
        try:
            if low:  # what `compress export --format onnx` writes by default: int4 where ONNX Runtime runs it
                auto = export_onnx(model.eval(), self.lm.spec, path.with_name(name + "_default.onnx"), parity_images=parity_x)
                rec["compress_export_default"] = {"int4": any(n.startswith("4/2-bit grids stored as") for n in auto.notes),
                                                  "size_bytes": auto.size_bytes, "notes": auto.notes}
            # int8 containers, which the reports below start from
            art = export_onnx(model.eval(), self.lm.spec, path, "int8" if low else "auto", parity_images=parity_x)
            rec.update({"precision": art.precision, "size_bytes": art.size_bytes, "parity": art.parity})
            rep = integer_kernel_report(path)
            rec["ort"] = {"summary": rep["summary"], "all_convs_integer": rep["all_convs_integer"],
                          "convs": rep["convs"], "integer_ops": rep["integer_ops"],
                          "float_compute_ops": rep["float_compute_ops"]}
            rec["openvino"] = openvino_report(path)
            if bits != "-":
                rec["ort_accuracy_lossless846"] = ort_accuracy(path, self.eval_sets["lossless846"], self.norm)
            if bits not in ("-", "w8a8"):
                rec["int4"] = int4_report(path, self.eval_sets["lossless846"], self.norm)
            if latency and self.latency:
                from devices import profile_artifact

                prof = profile_artifact(str(path), runtime="onnxruntime", threads=1, warmup=30, iterations=300)
                lat = prof["latency_ms"]
                rec["ort_latency_ms"] = {k: lat.get(k) for k in ("p50", "p90", "mean", "ci95") if k in lat}
                rec["ort_latency_ms"]["loadavg"] = loadavg()
        except Exception as e:  # noqa: BLE001 - a failed export is a result too; record it and go on
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        self.exports.append(rec)
        log(f"{self.arch} export {name}: {rec.get('ort', {}).get('summary', rec.get('error'))} | OV "
            f"{rec.get('openvino', {}).get('summary', '')} | p50 {rec.get('ort_latency_ms', {}).get('p50')}")


def _copy(model):
    import copy

    return copy.deepcopy(model)


def ort_accuracy(path: Path, ds: Dataset, norm: Normalizer, level: str | None = None) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if level == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif level == "off":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(ds), 256):
        x = norm(ds.images[i:i + 256]).numpy()
        correct += int((sess.run(None, {name: x})[0].argmax(1) == ds.labels[i:i + 256]).sum())
    return round(100.0 * correct / len(ds), 2)


def int4_variant(src: Path, dst: Path) -> dict:
    """The same QDQ graph with 4-bit-or-narrower grids in ONNX int4/uint4 (opset 21): exporters.qdq.pack_int4,
    what `compress export --format onnx` stores for a 4/2-bit model when ONNX Runtime runs it."""
    import onnx

    from exporters.qdq import pack_int4

    model, counts = pack_int4(onnx.load(str(src)))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {**counts, "size_bytes": dst.stat().st_size, "int8_size_bytes": src.stat().st_size}


def int4_report(src: Path, ds: Dataset, norm: Normalizer) -> dict:
    """Convert, then ask each runtime: does it load, does it agree with the int8-container graph, what runs."""
    import onnxruntime as ort

    from exporters.qdq import integer_kernel_report

    dst = src.with_name(src.stem + "_int4.onnx")
    rec = int4_variant(src, dst)
    x = norm(ds.images[:64]).numpy()
    off = ort.SessionOptions()
    off.intra_op_num_threads = 1
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the reference QDQ semantics
    basic = ort.SessionOptions()
    basic.intra_op_num_threads = 1
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no QDQ fusion
    ref = ort.InferenceSession(str(src), off, providers=["CPUExecutionProvider"])
    try:
        integer_kernel_report(dst)  # the default (all optimizations), as users run it
        rec["ort"] = {"loads": True}
    except Exception as e:  # noqa: BLE001 - a runtime refusing the graph is the finding
        rec["ort"] = {"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    try:
        sess = ort.InferenceSession(str(dst), basic, providers=["CPUExecutionProvider"])
        exact = ort.InferenceSession(str(dst), off, providers=["CPUExecutionProvider"])
        a, b, c = ref.run(None, {"input": x})[0], sess.run(None, {"input": x})[0], exact.run(None, {"input": x})[0]
        # optimizations off: the int4 graph must equal the int8-container graph; at ORT's basic level the uint4
        # graph's values change (measured: up to ~4 logits with 4-bit activations), an ORT defect, not ours
        rec["ort"].update({"basic_optimizations_load": True, "max_abs_diff_vs_int8_container": float(np.abs(a - b).max()),
                           "max_abs_diff_vs_int8_container_optimizations_off": float(np.abs(a - c).max())})
        rec["ort"]["summary"] = integer_kernel_report(dst, "all" if rec["ort"]["loads"] else "basic")["summary"]
        # where the default level rejects it: optimizations off (basic-level values are off, see above)
        rec["ort"]["top1_lossless846"] = ort_accuracy(dst, ds, norm, None if rec["ort"]["loads"] else "off")
    except Exception as e:  # noqa: BLE001
        rec["ort"].update({"basic_optimizations_load": False, "basic_error": str(e).splitlines()[0][:200]})
    try:
        rec["openvino"] = openvino_report(dst)
    except Exception as e:  # noqa: BLE001
        rec["openvino"] = {"loads": False, "summary": f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return rec


def openvino_report(path: Path) -> dict:
    """OpenVINO CPU: the runtime precision of each compute layer after compilation (u8/i8 = integer kernels)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
            prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            counts[f"{kind}:{prec}"] += 1
    conv = {k.split(":")[1]: v for k, v in counts.items() if k.startswith("Convolution")}
    integer = sum(v for k, v in conv.items() if k in ("u8", "i8"))
    total = sum(conv.values())
    return {"layers": dict(sorted(counts.items())), "convs_integer": integer, "convs": total,
            "summary": f"{integer}/{total} convs integer ({', '.join(f'{v} {k}' for k, v in sorted(conv.items()))})"}


# --- report ---------------------------------------------------------------------------------------------------------
def goals(rows: list[dict], jpeg_key: str) -> list[dict]:
    out = []
    for arch in sorted({r["model"] for r in rows}):
        get = {(r["method"], r["bits"], r["calib"]): r["accuracy"] for r in rows if r["model"] == arch}
        fp = get.get(("fp32", "-", "-"))
        if not fp:
            continue
        for ds in fp:
            def acc(m, b, c):
                return get.get((m, b, c), {}).get(ds)

            checks = [
                ("Genie W8A8 (genie data) within 0.3 pt of FP", acc("genie", "w8a8", "genie"), fp[ds] - 0.3, "ge"),
                ("Genie W4A4 (zero real data) within 3 pt of FP", acc("genie", "w4a4", "genie"), fp[ds] - 3.0, "ge"),
            ]
            for bits in BITS:
                for source, goal in GENIE_VS.items():
                    real = acc("genie", bits, source)
                    checks.append((f"{goal}, {bits.upper()}", acc("genie", bits, "genie"),
                                   None if real is None else real - 1.0, "ge"))
                noise = acc("genie", bits, "noise")
                checks.append((f"genie data above noise, {bits.upper()}", acc("genie", bits, "genie"), noise, "gt"))
            for bits in ("w4a4", "w2a4"):
                mm = next((v.get(ds) for (m, b, c), v in get.items() if m == "minmax" and b == bits), None)
                checks.append((f"Genie >> minmax at {bits.upper()} (by 5+ pt)", acc("genie", bits, "genie"),
                               None if mm is None else mm + 5.0, "ge"))
            for name, value, bound, op in checks:
                if value is None or bound is None:
                    continue
                ok = value >= bound if op == "ge" else value > bound
                out.append({"model": arch, "dataset": ds, "goal": name, "value": value, "bound": round(bound, 2),
                            "met": bool(ok)})
    return out


def seed_cells(rows: list[dict], seed_rows: list[dict]) -> dict[tuple, dict]:
    """(model, bits, calib) -> {dataset: [accuracy per seed, seed 0 (the main row) first]}, cells with seed rows only."""
    main = {(r["model"], r["bits"], r["calib"]): r for r in rows if r["method"] == "genie"}
    cells: dict[tuple, dict] = {}
    for r in sorted(seed_rows, key=lambda r: r["seed"]):
        key = (r["model"], r["bits"], r["calib"])
        if key not in main or r.get("draw", 0):
            continue
        cell = cells.setdefault(key, {"seeds": [0], **{ds: [v] for ds, v in main[key]["accuracy"].items()}})
        cell["seeds"].append(r["seed"])
        for ds, v in r["accuracy"].items():
            cell[ds].append(v)
    return cells


def draw_cells(rows: list[dict], seed_rows: list[dict]) -> dict[tuple, dict]:
    """(model, bits, calib) -> {"draws": {draw: [seeds]}, dataset: {draw: [accuracy per seed]}} for the cells run
    on more than one calibration draw; draw 0 is the main row (seed 0) and its seed rows."""
    main = {(r["model"], r["bits"], r["calib"]) for r in rows if r["method"] == "genie"}
    runs = [r for r in rows if r["method"] == "genie"] + list(seed_rows)  # a main row is draw 0, seed 0
    cells: dict[tuple, dict] = {}
    for r in sorted(runs, key=lambda r: (r.get("draw", 0), r.get("seed", 0))):
        key, draw = (r["model"], r["bits"], r["calib"]), r.get("draw", 0)
        if key not in main:
            continue
        cell = cells.setdefault(key, {"draws": {}})
        cell["draws"].setdefault(draw, []).append(r.get("seed", 0))
        for ds, v in r["accuracy"].items():
            cell.setdefault(ds, {}).setdefault(draw, []).append(v)
    return {k: c for k, c in cells.items() if len(c["draws"]) > 1}


def draw_goals(rows: list[dict], seed_rows: list[dict]) -> list[dict]:
    """The goals again on the mean over every run of every calibration draw (genie against a real source only where
    both ran the same draws and seeds)."""
    def every(cell: dict, ds: str) -> float:
        return float(np.mean([v for vals in cell[ds].values() for v in vals]))

    return _mean_goals(rows, draw_cells(rows, seed_rows), every, lambda a, b: a["draws"] == b["draws"],
                       lambda c: f"mean of {len(c['draws'])} calibration draws x Genie-M seeds "
                                 f"({sum(len(v) for v in c['draws'].values())} runs)")


def all_goals(rows: list[dict], seed_rows: list[dict]) -> list[dict]:
    return goals(rows, "") + seed_goals(rows, seed_rows) + draw_goals(rows, seed_rows)


def seed_goals(rows: list[dict], seed_rows: list[dict]) -> list[dict]:
    """The goals again on the mean over Genie-M seeds, for the cells that have more than one seed."""
    return _mean_goals(rows, seed_cells(rows, seed_rows), lambda c, ds: float(np.mean(c[ds])),
                       lambda a, b: a["seeds"] == b["seeds"], lambda c: f"mean of {len(c['seeds'])} Genie-M seeds")


def _mean_goals(rows: list[dict], cells: dict[tuple, dict], mean: Callable[[dict, str], float],
                same_runs: Callable[[dict, dict], bool], label: Callable[[dict], str]) -> list[dict]:
    """The goals on each genie cell's mean(cell, dataset); against a real source only when same_runs(real, genie)."""
    out = []
    fp = {r["model"]: r["accuracy"] for r in rows if r["method"] == "fp32"}
    for (arch, bits, calib), cell in sorted(cells.items()):
        if calib != "genie":
            continue
        for ds in fp.get(arch, {}):
            value = mean(cell, ds)
            checks = []  # (goal, bound, strictly above)
            if bits == "w8a8":
                checks.append(("Genie W8A8 (genie data) within 0.3 pt of FP", fp[arch][ds] - 0.3, False))
            if bits == "w4a4":
                checks.append(("Genie W4A4 (zero real data) within 3 pt of FP", fp[arch][ds] - 3.0, False))
            for source, goal in GENIE_VS.items():
                real = cells.get((arch, bits, source))
                if real is not None and same_runs(real, cell):
                    checks.append((f"{goal}, {bits.upper()}", mean(real, ds) - 1.0, False))
            noise = cells.get((arch, bits, "noise"))
            if noise is not None and same_runs(noise, cell):
                checks.append((f"genie data above noise, {bits.upper()}", mean(noise, ds), True))
            for name, bound, strict in checks:
                met = value > bound + 1e-9 if strict else value >= bound - 1e-9
                out.append({"model": arch, "dataset": ds, "goal": f"{name}: {label(cell)}",
                            "value": round(value, 2), "bound": round(bound, 2), "met": bool(met)})
    return out


def markdown(result: dict) -> str:
    rows, exports = result["rows"], result["exports"]
    sets = list(rows[0]["accuracy"]) if rows else []
    lines = ["# Post-training quantization: FP32, min-max, NNCF, Genie (CIFAR-10 ResNets)", "",
             f"Run {result['created']} on {result['environment']['platform']} ({result['environment']['cpus']} CPUs, "
             f"shared), one torch thread"
             f"{'' if result.get('torch_device', 'cpu') == 'cpu' else ', Genie-D and Genie-M on ' + result['torch_device']}"
             f"; load average at start {result['loadavg_start']}, at end "
             f"{result['loadavg_end']}. Total wall time {result['seconds'] / 60:.1f} min. Preset `{result['preset']}`: "
             f"{json.dumps(result['budgets'])}.", "",
             "Accuracy is top-1 % in torch (fake-quant). `lossless846`: the first 846 CIFAR-10 test images, lossless "
             f"(published FP numbers reproduce here); `{sets[-1] if sets else 'jpeg'}`: "
             f"{'all' if result['budgets'].get('jpeg_n', 0) >= 10000 else 'the first'} images of the JPEG (q75) copy of "
             "the CIFAR-10 test set (cifar10_test_jpeg). Calibration: `genie` = Genie-D images synthesized from the model's BN "
             "statistics (zero real data; synthesized once per model, reused by every bit-width), `real` = "
             "cifar10_calib1000_jpeg training images (JPEG q75: the domain of the jpeg test set), `real-clean` = "
             "cifar10_train_lossless4660 training images (lossless: the domain the model was trained on, whose BN "
             "statistics Genie-D matches), each the same count with the same subset seed; `noise` = N(0, 1) in "
             "normalized space. Time is the method's "
             "wall time (Genie-D synthesis is listed once per model, not in the Genie rows).", ""]
    for arch in sorted({r["model"] for r in rows}):
        syn = result["synthesis"].get(arch, {})
        lines += [f"## {arch}", "", f"Genie-D: {syn.get('images')} images, {syn.get('config', {}).get('iters')} "
                  f"iterations, generator width {syn.get('config', {}).get('gen_c1')}: {syn.get('seconds')} s "
                  f"(load {syn.get('loadavg')}){'; synthesized by an earlier process with the same seed and budget, read from the cache' if syn.get('cached') else ''}.", ""]
        lines += ["| method | bits | calib | " + " | ".join(sets) + " | time (s) | notes |",
                  "|---|---|---|" + "---:|" * len(sets) + "---:|---|"]
        for r in rows:
            if r["model"] != arch:
                continue
            notes = []
            if r["method"] == "genie":
                notes.append(f"{r['recon_iters']} it/unit, input grid {r.get('input_grid', 'calib')}, {r['placement']} placement, "
                             f"{'sym' if r['symmetric_weights'] else 'asym'} W, undecided bits {r['undecided_bits_max']:.1%}")
            if r["method"] == "nncf":
                nat = r["nncf_native_accuracy"]
                notes.append("NNCF's own model: " + ", ".join(f"{k} {v:.2f}" for k, v in nat.items()))
                m = r["nncf_mapping"]
                notes.append(f"{m['activation_grids_from_nncf']} grids from NNCF, {m['activation_grids_minmax']} min-max")
            lines.append(f"| {r['method']} | {r['bits']} | {r['calib']} | " + " | ".join(f"{r['accuracy'][s]:.2f}" for s in sets)
                         + f" | {r['seconds']:.0f} | {'; '.join(notes)} |")
        lines += ["", "Exports (QDQ ONNX, parity-checked against torch). `ORT`: what ONNX Runtime's CPU provider runs "
                  "after its graph optimizations; `OpenVINO`: the CPU plugin's runtime precision per conv (u8/i8 = "
                  "integer kernels); latency: ORT CPU, batch 1, 1 thread, fresh process (compress.profile/1), p50.", "",
                  "| method | bits | calib | ORT | OpenVINO | ORT top-1 lossless846 | p50 (ms) |", "|---|---|---|---|---|---:|---:|"]
        for e in exports:
            if e["model"] != arch:
                continue
            if "error" in e:
                lines.append(f"| {e['method']} | {e['bits']} | {e['calib']} | export failed: {e['error']} | | | |")
                continue
            p50 = e.get("ort_latency_ms", {}).get("p50")
            lines.append(f"| {e['method']} | {e['bits']} | {e['calib']} | {e['ort']['summary']} | {e['openvino']['summary']} | "
                         f"{e.get('ort_accuracy_lossless846', '-')} | {'-' if p50 is None else f'{p50:.3f}'} |")
        lines.append("")
        low = [e for e in exports if e["model"] == arch and e.get("int4")]
        if low:
            lines += ["4/2-bit grids in ONNX int4/uint4 (opset 21) instead of int8 containers: weights packed two per "
                      "byte, activation clamps dropped (uint4 QuantizeLinear saturates). Same values; what changes is "
                      "what runtimes accept and run.", "",
                      "| bits | file int8 container → int4 | `compress export` default | ORT (default optimizations) | "
                      "max abs logit diff vs int8 container: ORT basic / optimizations off | ORT top-1 lossless846 | OpenVINO |",
                      "|---|---|---|---|---|---:|---|"]
            for e in low:
                i4, o = e["int4"], e["int4"]["ort"]
                why = ("its QDQ fusion builds a QLinearConv with a uint4 input, then fails the type check"
                       if "QLinearConv" in o.get("error", "") else o.get("error", "")[:120])
                ort_text = o.get("summary", "") if o.get("loads") else (
                    f"**rejected** ({why}); with basic optimizations only: {o.get('summary', 'fails')} (top-1 with optimizations off)")
                default = e.get("compress_export_default")
                chose = "-" if default is None else ("int4" if default["int4"] else "int8 containers (ORT rejects int4)")
                diffs = " / ".join("-" if o.get(k) is None else f"{o[k]:.3g}" for k in
                                   ("max_abs_diff_vs_int8_container", "max_abs_diff_vs_int8_container_optimizations_off"))
                lines.append(f"| {e['bits']} | {i4['int8_size_bytes'] / 1024:.0f} kB → {i4['size_bytes'] / 1024:.0f} kB | "
                             f"{chose} | {ort_text} | {diffs} | {o.get('top1_lossless846', '-')} | {i4['openvino']['summary']} |")
            lines.append("")
    if result.get("reruns"):
        lines += ["## Reruns", "", "Rows replaced after the run above (same budgets unless listed); everything else is "
                  "from the original run.", "", "| when (UTC) | models | parts | rows | exports | wall (min) | load average "
                  "start → end |", "|---|---|---|---:|---:|---:|---|"]
        for r in result["reruns"]:
            seeded = f" + {r['seed_rows']} seed rows" if r.get("seed_rows") else ""
            only = f" (calib {', '.join(r['sources'])})" if r.get("sources") else ""
            changed = {k: v for k, v in (r.get("budgets") or {}).items() if (result.get("budgets") or {}).get(k) != v}
            only += "".join(f"; budget {k} {json.dumps(v)}" for k, v in changed.items())
            lines.append(f"| {r['created']} | {', '.join(r['models'])} | {', '.join(r['parts'])}{only} | {r['rows_replaced']}{seeded} | "
                         f"{r['exports_replaced']} | {r['seconds'] / 60:.1f} | {r['loadavg_start']} → {r['loadavg_end']} |")
        lines.append("")
    cells = seed_cells(rows, result.get("seed_rows", []))
    if cells:
        lines += ["## Seeds", "", "Genie-M run again with other seeds (QDrop masks, mini-batch order, the samples the "
                  "activation grids are searched on) on the same calibration images; seed 0 is the row above. The "
                  "spread is what one cell moves between runs that differ only in the seed. The calibration images "
                  "(Genie-D seed, real subset) stay fixed: the spread from choosing other images is not in it.", "",
                  "| model | bits | calib | seeds | " + " | ".join(f"{s} per seed | {s} mean (min-max)" for s in sets) + " |",
                  "|---|---|---|---|" + "---|---:|" * len(sets)]
        for (arch, bits, calib), cell in sorted(cells.items()):
            lines.append(f"| {arch} | {bits} | {calib} | {', '.join(map(str, cell['seeds']))} | " + " | ".join(
                f"{', '.join(f'{v:.2f}' for v in cell[s])} | {np.mean(cell[s]):.2f} ({min(cell[s]):.2f}-{max(cell[s]):.2f})"
                for s in sets) + " |")
        lines.append("")
    dcells = draw_cells(rows, result.get("seed_rows", []))
    if dcells:
        syn = result.get("draw_synthesis", {})
        lines += ["## Calibration draws", "", "The Seeds table's runs on other calibration images: draw d synthesizes "
                  "with Genie-D seed d (same budget) and takes the real and noise images with subset seed d (draw 0 is "
                  "the main run). Per draw the mean over its Genie-M seeds; then the mean over every run. Between draws "
                  "the images change, not only Genie-M's randomness: this spread is what a user gets from running the "
                  "same command on another day.", ""]
        for arch in sorted(syn):
            lines.append(f"- {arch} Genie-D draws: " + "; ".join(
                f"seed {d}: {v['seconds']} s{' (cached)' if v.get('cached') else ''}, final BN loss per batch "
                f"{', '.join(format(b['last']['loss'], '.3f') for b in v['batches'])}" for d, v in sorted(syn[arch].items())))
        lines += ["",
                  "| model | bits | calib | draws (seeds each) | " + " | ".join(
                      f"{s} mean per draw | {s} mean of all runs (min-max of draw means)" for s in sets) + " |",
                  "|---|---|---|---|" + "---|---:|" * len(sets)]
        for (arch, bits, calib), cell in sorted(dcells.items()):
            seeds_each = ", ".join(f"{d} ({len(v)})" for d, v in sorted(cell["draws"].items()))
            parts = []
            for s_ in sets:
                per = {d: float(np.mean(v)) for d, v in sorted(cell[s_].items())}
                every = [v for vals in cell[s_].values() for v in vals]
                parts.append(f"{', '.join(f'{v:.2f}' for v in per.values())} | {np.mean(every):.2f} "
                             f"({min(per.values()):.2f}-{max(per.values()):.2f})")
            lines.append(f"| {arch} | {bits} | {calib} | {seeds_each} | " + " | ".join(parts) + " |")
        lines.append("")
    if result.get("diagnosis"):
        sets = list(result["diagnosis"][0]["accuracy"])
        lines += ["## Diagnosis: W8A8 on Genie-D data", "", *([result["diagnosis_from"], ""] if result.get("diagnosis_from") else []),
                  "One factor at a time (`input` = the grid of the network input, i.e. the first conv's input: `calib` "
                  "fitted to the calibration images, `spec` the exact normalized [0, 1] pixel range from the model's "
                  "mean/std). Calibration: 128 images of each source.", "",
                  "| model | what | calib | input | input range | " + " | ".join(sets) + " | time (s) |",
                  "|---|---|---|---|---|" + "---:|" * len(sets) + "---:|"]
        for d in result["diagnosis"]:
            rng = d.get("input_range")
            lines.append(f"| {d['model']} | {d['what']} | {d['calib']} | {d['input_grid']} | "
                         f"{'' if rng is None else f'[{rng[0]:.2f}, {rng[1]:.2f}]'} | "
                         + " | ".join(f"{d['accuracy'][k]:.2f}" for k in sets) + f" | {d['seconds']:.0f} |")
        lines.append("")
    if result.get("ablations"):
        lines += ["## Ablation: Genie-D budget", "", *([result["ablations_from"], ""] if result.get("ablations_from") else []),
                  result.get("ablation_note", ""), "",
                  "| model | images | Genie-D iterations | generator width | synthesis (s) | final BN loss | bits | "
                  "lossless846 | jpeg2000 |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for a in result["ablations"]:
            lines.append(f"| {a['model']} | {a['images']} | {a['distill_iters']} | {a['gen_width']} | {a['synthesis_s']} | "
                         f"{max(a['bn_loss_last']):.3f} | {a['bits']} | {a['lossless846']:.2f} | {a['jpeg2000']:.2f} |")
        lines.append("")
    lines += ["## Goals", "", "Rows ending in `mean of N Genie-M seeds` check the same goal on the mean over the seeds "
              "in the Seeds table, rows ending in `calibration draws` on the mean over every run in the Calibration "
              "draws table (the most runs, so the reading to trust where they disagree); the other rows are the "
              "single seed-0 run above. `real data` is the JPEG calibration "
              "set (cifar10_calib1000_jpeg), the goal as set; `real-clean data` (lossless training images) is checked "
              "beside it where measured: the JPEG set shares the jpeg test set's compression domain, which Genie-D "
              "(synthesized from BN statistics of a model trained on clean images) cannot, so the two rows tell the "
              "synthetic-vs-real gap apart from any advantage of calibrating in the test set's domain.", "",
              "| model | dataset | goal | value | bound | met |", "|---|---|---|---:|---:|---|"]
    for g in result["goals"]:
        lines.append(f"| {g['model']} | {g['dataset']} | {g['goal']} | {g['value']:.2f} | {g['bound']:.2f} | "
                     f"{'yes' if g['met'] else '**no**'} |")
    lines.append("")
    if result.get("notes"):
        lines += ["## Reading the results", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet32", help="comma-separated zoo names with real checkpoints")
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--jpeg-n", type=int, help="JPEG test images to evaluate on (default: the preset's)")
    ap.add_argument("--no-latency", action="store_true", help="skip the ORT latency measurements")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--int4-from", type=Path, action="append",
                    help="only add the int4 variants of the 4/2-bit exports found in this folder to an existing "
                         "quantization.json in --out (repeatable)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to run, comma-separated from {', '.join(PARTS)}, diagnose (W8A8 one factor at a time), "
                         "seeds (Genie-M with --seeds on genie and real data at --seed-bits), draws (Genie-M with "
                         "seed 0 and --seeds on the calibration images of --draws, genie and both real sets)")
    ap.add_argument("--seeds", default="1,2", help="Genie-M seeds for --parts seeds (seed 0 is the main run)")
    ap.add_argument("--seed-bits", default=",".join(BITS), help="bit-widths for --parts seeds and draws")
    ap.add_argument("--draws", default="1,2", help="calibration draws for --parts draws: the Genie-D seed and the "
                                                  "real subsets' and noise's seed (draw 0 is the main run)")
    ap.add_argument("--sources", help=f"Genie-M calibration sources for --parts genie, seeds and draws, comma-separated "
                                      f"from {', '.join(SOURCES)} (default: all for genie, {','.join(SEED_SOURCES)} for "
                                      f"seeds, {','.join(DRAW_SOURCES)} for draws)")
    ap.add_argument("--notes", type=Path,
                    help="a text file of notes (one per paragraph): with no --parts given, only replace the notes of "
                         "the existing quantization.json in --out and re-render the markdown; otherwise stored with the run")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the rows (and exports) this run produces in the existing quantization.json in "
                         "--out, keep the rest, recompute the goals, and record the rerun")
    ap.add_argument("--recon-iters", help="override the preset's Genie-M iterations per unit for some bit-widths, e.g. "
                                          "w2a4=1500 (an ablation: not with --merge, the tables keep one budget)")
    ap.add_argument("--torch-device", default="cpu",
                    help="where Genie-D and Genie-M run: cpu (the committed tables) | cuda | cuda:N")
    ap.add_argument("--samples", type=int, help="override the preset's calibration images per source (an ablation: not "
                                                "with --merge)")
    ap.add_argument("--distill-iters", type=int, help="override the preset's Genie-D iterations per batch (an ablation: "
                                                      "not with --merge)")
    ap.add_argument("--synth-cache", type=Path,
                    help="folder for Genie-D images: reused when present (synthesis is seeded and deterministic)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.int4_from:
        add_int4(args.out, args.int4_from)
        return
    notes = None if args.notes is None else [" ".join(para.split()) for para in args.notes.read_text().split("\n\n")
                                             if para.strip()]
    if notes is not None and "--parts" not in sys.argv:
        result = json.loads((args.out / "quantization.json").read_text())
        result["notes"] = notes
        (args.out / "quantization.json").write_text(json.dumps(result, indent=2))
        (args.out / "quantization.md").write_text(markdown(result))
        log(f"notes: {len(notes)} written to {args.out / 'quantization.json'} and quantization.md")
        return
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(PARTS) - {"diagnose", "seeds", "draws"}
    if unknown:
        ap.error(f"unknown --parts {', '.join(sorted(unknown))}")
    preset = dict(PRESETS[args.preset])
    if args.jpeg_n:
        preset["jpeg_n"] = args.jpeg_n
    for name in ("samples", "distill_iters"):
        value = getattr(args, name)
        if value is not None:
            if args.merge or value < 1:
                ap.error(f"--{name.replace('_', '-')}: at least 1, and not with --merge (the tables keep one budget)")
            preset[name] = value
    if args.recon_iters:
        if args.merge:
            ap.error("--recon-iters is for ablations into another --out; --merge would mix budgets in one table")
        try:
            override = {b.strip(): int(n) for b, n in (item.split("=") for item in args.recon_iters.split(","))}
        except ValueError:
            ap.error("--recon-iters takes BITS=N[,BITS=N], e.g. w2a4=1500")
        if set(override) - set(BITS) or min(override.values()) < 1:
            ap.error(f"--recon-iters: bit-widths from {', '.join(BITS)}, iterations >= 1")
        preset["recon_iters"] = {**preset["recon_iters"], **override}
    start, load0 = time.perf_counter(), loadavg()
    rows, exports, synthesis, diagnosis, seed_rows, draw_synthesis = [], [], {}, [], [], {}
    models = [a.strip() for a in args.models.split(",") if a.strip()]
    seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    seed_bits = tuple(b.strip() for b in args.seed_bits.split(",") if b.strip())
    draws = tuple(int(x) for x in args.draws.split(",") if x.strip())
    if set(seed_bits) - set(BITS) or 0 in seeds or 0 in draws:
        ap.error(f"--seed-bits from {', '.join(BITS)}; --seeds and --draws other than 0 (the main run)")
    sources = None if args.sources is None else tuple(x.strip() for x in args.sources.split(",") if x.strip())
    if sources is not None and (not sources or set(sources) - set(SOURCES)):
        ap.error(f"--sources from {', '.join(SOURCES)}")
    for arch in models:
        b = Bench(arch, preset, args.out, not args.no_latency, parts, args.synth_cache, seeds, seed_bits, sources, draws,
                  resolve_torch_device(args.torch_device))
        b.run()
        if "diagnose" in parts:
            diagnosis += b.diagnose(b.calib_cache or b.calibration())
        seed_rows += b.seed_rows
        rows += b.rows
        exports += b.exports
        if hasattr(b, "synthesis") and "genie" in (sources or SOURCES):  # the record of the run with genie rows
            synthesis[arch] = b.synthesis
        if b.draw_synthesis:
            draw_synthesis[arch] = b.draw_synthesis
    if args.merge:
        merge(args.out, preset, parts, models, rows, exports, synthesis, diagnosis, start, load0, seed_rows, sources,
              draw_synthesis)
        return
    previous_path = args.out / "quantization.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    result = {
        "schema": "compress.bench.quantization/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset, "budgets": preset, "seconds": round(time.perf_counter() - start, 1),
        "loadavg_start": load0, "loadavg_end": loadavg(), "torch_threads": torch.get_num_threads(),
        "torch_device": resolve_torch_device(args.torch_device),
        "environment": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "versions": {p: _version(p) for p in ("torch", "onnx", "onnxruntime", "openvino", "nncf")}},
        "synthesis": synthesis, "rows": rows, "exports": exports, "diagnosis": diagnosis, "seed_rows": seed_rows,
        **({"draw_synthesis": {a: {str(d): v for d, v in ds.items()} for a, ds in draw_synthesis.items()}}
           if draw_synthesis else {}),
    }
    # sections this run does not redo (the W8A8 diagnosis, the Genie-D budget ablation) are kept from the previous
    # result, labelled with the run and budgets they come from
    for key, label in (("diagnosis", "diagnosis"), ("ablations", "ablations")):
        if not result.get(key) and previous.get(key):
            result[key] = previous[key]
            if key == "ablations":
                result["ablation_note"] = previous.get("ablation_note", "")
            result[f"{label}_from"] = previous.get(f"{label}_from") or (
                f"Kept from the run of {previous.get('created')} (its reruns included), not redone with this run's "
                f"budgets: preset budgets then {json.dumps(previous.get('budgets'))}; the accuracy columns name the "
                f"evaluation sets it used.")
    if notes is not None:
        result["notes"] = notes
    result["goals"] = all_goals(rows, seed_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(result, indent=2))
    (args.out / "quantization.md").write_text(markdown(result))
    log(f"wrote {args.out / 'quantization.json'} and quantization.md in {result['seconds'] / 60:.1f} min")


def merge(out: Path, preset: dict, parts: tuple[str, ...], models: list[str], rows: list[dict], exports: list[dict],
          synthesis: dict, diagnosis: list[dict], start: float, load0: list[float], seed_rows: list[dict] = (),
          sources: tuple[str, ...] | None = None, draw_synthesis: dict | None = None) -> None:
    """Replace the rows/exports with the same (model, method, bits, calib) in the committed result; keep the rest."""
    result = json.loads((out / "quantization.json").read_text())
    sets = {tuple(r["accuracy"]) for r in result["rows"] + rows + list(seed_rows)}
    if len(sets) > 1:
        raise SystemExit(f"--merge: the eval sets differ ({sorted(sets)}): use the committed run's preset / --jpeg-n")

    def key(r: dict) -> tuple:
        return r["model"], r["method"], r["bits"], r["calib"]

    for name, new in (("rows", rows), ("exports", exports)):
        fresh = {key(r): r for r in new}
        kept = [r for r in result[name] if key(r) not in fresh]
        order = {key(r): i for i, r in enumerate(result[name])}
        result[name] = sorted(kept + new, key=lambda r: (r["model"], order.get(key(r), len(order))))
    if "genie" in parts:  # the seeds part reuses the same (cached) images: keep the main run's synthesis record
        result["synthesis"].update(synthesis)
    if seed_rows:
        def run_key(r: dict) -> tuple:
            return r["model"], r["bits"], r["calib"], r.get("draw", 0), r["seed"]

        fresh = {run_key(r) for r in seed_rows}
        result["seed_rows"] = [r for r in result.get("seed_rows", []) if run_key(r) not in fresh] + list(seed_rows)
    for arch, draws in (draw_synthesis or {}).items():
        result.setdefault("draw_synthesis", {}).setdefault(arch, {}).update({str(d): v for d, v in draws.items()})
    if diagnosis:
        result["diagnosis"] = [d for d in result.get("diagnosis", []) if d["model"] not in models] + diagnosis
    result.setdefault("reruns", []).append({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "parts": list(parts), "models": models,
        **({"sources": list(sources)} if sources else {}),
        "budgets": preset, "seconds": round(time.perf_counter() - start, 1), "loadavg_start": load0,
        "loadavg_end": loadavg(), "rows_replaced": len(rows), "exports_replaced": len(exports),
        "diagnosis_rows": len(diagnosis), "seed_rows": len(seed_rows)})
    result["goals"] = all_goals(result["rows"], result.get("seed_rows", []))
    (out / "quantization.json").write_text(json.dumps(result, indent=2))
    (out / "quantization.md").write_text(markdown(result))
    log(f"merged {len(rows)} rows, {len(exports)} exports, {len(diagnosis)} diagnosis rows into {out / 'quantization.json'}")


def add_int4(out: Path, folders: list[Path]) -> None:
    result = json.loads((out / "quantization.json").read_text())
    ds = load_dataset(f"cifar10:{data_path('cifar10_test_lossless846.npz')}")
    for e in result["exports"]:
        if e["bits"] in ("-", "w8a8") or e.get("int4") or "error" in e:
            continue
        name = f"{e['model']}_{e['method']}_{e['bits']}_{e['calib']}.onnx"
        src = next((f / name for f in folders if (f / name).is_file()), None)
        if src is None:
            log(f"int4: {name} not found")
            continue
        spec = zoo_model(e["model"], pretrained=False).spec
        e["int4"] = int4_report(src, ds, Normalizer(spec.mean, spec.std))
        log(f"int4 {name}: {e['int4']['ort']} | OV {e['int4']['openvino']['summary']}")
    (out / "quantization.json").write_text(json.dumps(result, indent=2))
    (out / "quantization.md").write_text(markdown(result))


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
