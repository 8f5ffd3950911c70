"""Where the Genie W2A4 gap to lossless real images lives (ResNet-20 unless --arch): a diagnostic, not a benchmark table.

Issue 4 misses "genie data within 1 pt of real data" at W2A4 on the JPEG test set against lossless real training
images (real-clean). This script asks which part of Genie-M's result the calibration images change:

    # one synthesis, Genie-M per seed on each calibration set; `--swap` also moves the activation grids across
    .venv/bin/python benchmarks/genie_gap.py --sources genie,real-clean --seeds 0,1,2 --swap --torch-device cuda
    # the paper's Genie-D iterations, with and without its per-image input-statistics terms
    .venv/bin/python benchmarks/genie_gap.py --sources genie --distill-iters 4000 --torch-device cuda
    .venv/bin/python benchmarks/genie_gap.py --sources genie --distill-iters 4000 --no-input-stats --torch-device cuda

Sources: `genie` (Genie-D images, 256 x --distill-iters, generator width 128, seed 0), `real-clean` / `real` (256
images of cifar10_train_lossless4660 / cifar10_calib1000_jpeg, subset seed 0), `genie-shift` (the Genie-D images
plus a random per-image, per-channel offset with the spread real images have: a probe, not a method). Genie-M:
W2A4, `fast` preset, --recon-iters per unit. Prints per-run top-1 on cifar10_test_lossless846 and all of
cifar10_test_jpeg, the mean per source, and statistics of each calibration set in normalized space.

`--workers N`: a GPU runs one launch-bound ResNet-20 process at a fraction of its speed, so N processes share
it: Genie-D in shards of 128 images (shard k synthesized with seed k, so not the images of the one-process run,
which draws all batches from seed 0), and the Genie-M runs (one per source and seed) side by side. Not with --swap.

`--swap`: for each seed, Genie-M runs on genie and real-clean images, then each model is evaluated again with the
other's activation grids (every activation quantizer's step and zero-point) and with only the last one swapped.
If the grids carried the gap, genie weights with real-clean grids would score like real-clean.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compress.assets import data_path  # noqa: E402
from compress.data import Normalizer, load_dataset  # noqa: E402
from compress.io import zoo_model  # noqa: E402
from compress.metrics import evaluate  # noqa: E402
from compress.quantize.fakequant import ActQuantizer  # noqa: E402
from compress.quantize.genie import GenieConfig, genie_quantize  # noqa: E402
from compress.quantize.genie_data import SynthesisConfig, synthesize  # noqa: E402

REAL = {"real": "cifar10_calib1000_jpeg.npz", "real-clean": "cifar10_train_lossless4660.npz"}
SOURCES = ("genie", "genie-shift", *REAL)


def image_stats(x: torch.Tensor) -> dict:
    """Per-channel mean/std, the mean per-image std, the spread of per-image means, range, 99.9th pct of |x|."""
    x = x.float()
    return {"channel_mean": [round(v, 2) for v in x.mean((0, 2, 3)).tolist()],
            "channel_std": [round(v, 2) for v in x.std((0, 2, 3)).tolist()],
            "image_std": round(x.std((2, 3)).mean().item(), 2), "image_mean_spread": round(x.mean((2, 3)).std().item(), 2),
            "min": round(x.min().item(), 2), "max": round(x.max().item(), 2),
            "abs_p99.9": round(x.abs().flatten().kthvalue(int(x.numel() * 0.999)).values.item(), 2)}


def with_offsets(x: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + torch.randn(len(x), x.shape[1], 1, 1, generator=g) * spread


def act_quantizers(gm: torch.nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, ActQuantizer) and m.enabled]


def with_grids_of(dst: torch.nn.Module, src: torch.nn.Module, which) -> torch.nn.Module:
    out = copy.deepcopy(dst)
    a, b = act_quantizers(out), act_quantizers(src)
    assert [n for n, _ in a] == [n for n, _ in b]
    for i in which:
        a[i][1].set_qparams(b[i][1].scale.clone(), b[i][1].zero_point.clone())
    return out


def synthesis_config(args: argparse.Namespace, samples: int, seed: int) -> SynthesisConfig:
    return SynthesisConfig(samples=samples, batch=128, iters=args.distill_iters, gen_c1=128, gen_c2=64, seed=seed,
                           device=args.torch_device, input_stats=args.input_stats)


def worker_threads(workers: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def synthesize_shard(arch: str, cfg: SynthesisConfig, workers: int) -> torch.Tensor:
    worker_threads(workers)
    lm = zoo_model(arch)
    return synthesize(lm.model, lm.spec.shape, cfg)[0]


def test_sets() -> dict:
    return {"lossless846": load_dataset(f"cifar10:{data_path('cifar10_test_lossless846.npz')}"),
            "jpeg10000": load_dataset(f"cifar10:{data_path('cifar10_test_jpeg.npz')}")}


def genie_m(lm, images: torch.Tensor, seed: int, recon_iters: int, device: str) -> torch.nn.Module:
    cfg = GenieConfig(bits="w2a4", preset="fast", recon_iters=recon_iters, torch_device=device)
    return genie_quantize(lm.model, images, cfg, seed=seed, spec=lm.spec)[0]


def scores(gm: torch.nn.Module, lm, tests: dict) -> dict[str, float]:
    """Top-1 on each test set."""
    norm = Normalizer(lm.spec.mean, lm.spec.std)
    return {k: round(evaluate(gm, d, norm), 2) for k, d in tests.items()}


def genie_m_run(arch: str, images: torch.Tensor, seed: int, recon_iters: int, device: str, workers: int) -> dict:
    """One W2A4 Genie-M run in a worker process: its top-1 on both test sets and its wall time."""
    worker_threads(workers)
    lm = zoo_model(arch)
    t = time.perf_counter()
    gm = genie_m(lm, images, seed, recon_iters, device)
    seconds = round(time.perf_counter() - t)
    return {**scores(gm, lm, test_sets()), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20", help="a CIFAR zoo model with its shared pretrained weights")
    ap.add_argument("--sources", default="genie,real-clean")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--distill-iters", type=int, default=400)
    ap.add_argument("--no-input-stats", dest="input_stats", action="store_false",
                    help="Genie-D without its per-image mean-0 / std-1 input terms")
    ap.add_argument("--recon-iters", type=int, default=150)
    ap.add_argument("--swap", action="store_true", help="also swap activation grids between genie and real-clean")
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the device (see the docstring)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    sources = args.sources.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if unknown := set(sources) - set(SOURCES):
        ap.error(f"unknown sources {sorted(unknown)}; choose from {SOURCES}")
    if args.workers > 1 and args.swap:
        ap.error("--swap needs the models in one process: leave out --workers")
    if args.swap:
        sources = list(dict.fromkeys(["genie", "real-clean", *sources]))

    lm = zoo_model(args.arch)
    norm = Normalizer(lm.spec.mean, lm.spec.std)
    tests = test_sets()
    pool = (ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) if args.workers > 1 else None)
    calib: dict[str, torch.Tensor] = {}
    meta: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if {"genie", "genie-shift"} & set(sources):
        t = time.perf_counter()
        if pool:
            shards = [min(128, args.samples - k) for k in range(0, args.samples, 128)]
            calib["genie"] = torch.cat(list(pool.map(
                synthesize_shard, [args.arch] * len(shards),
                [synthesis_config(args, n, k) for k, n in enumerate(shards)], [args.workers] * len(shards))))
        else:
            calib["genie"], _ = synthesize(lm.model, lm.spec.shape, synthesis_config(args, args.samples, 0))
        meta["synthesis_seconds"] = round(time.perf_counter() - t, 1)
        calib["genie-shift"] = with_offsets(calib["genie"], 0.6, 0)  # 0.6: real images' spread of per-image means
    for name, file in REAL.items():
        if name in sources:
            calib[name] = norm(load_dataset(f"cifar10:{data_path(file)}").subset(args.samples, 0).images)
    meta["calibration_stats"] = {name: image_stats(x) for name, x in calib.items() if name in sources}
    for name, st in meta["calibration_stats"].items():
        print(f"{name:12s} {st}", flush=True)

    runs: dict[str, list[dict]] = {}
    if pool:
        jobs = [(name, seed, pool.submit(genie_m_run, args.arch, calib[name], seed, args.recon_iters,
                                         args.torch_device, args.workers)) for seed in seeds for name in sources]
        for name, seed, job in jobs:
            result = job.result()
            print(f"{name:12s} seed {seed}: {result}", flush=True)
            runs.setdefault(name, []).append(result)
        pool.shutdown()
    else:
        for seed in seeds:
            models = {}
            for name in sources:
                t = time.perf_counter()
                models[name] = genie_m(lm, calib[name], seed, args.recon_iters, args.torch_device)
                runs.setdefault(name, []).append(scores(models[name], lm, tests))
                print(f"{name:12s} seed {seed}: {runs[name][-1]} {time.perf_counter() - t:.0f}s", flush=True)
            if args.swap:
                g, r = models["genie"], models["real-clean"]
                k = len(act_quantizers(g))
                for label, model in (("genie, last grid from real-clean", with_grids_of(g, r, [k - 1])),
                                     ("genie, all grids from real-clean", with_grids_of(g, r, range(k))),
                                     ("real-clean, all grids from genie", with_grids_of(r, g, range(k)))):
                    runs.setdefault(label, []).append(scores(model, lm, tests))
                    print(f"{label}, seed {seed}: {runs[label][-1]}", flush=True)
    means = {name: {k: round(float(np.mean([r[k] for r in rs])), 2) for k in tests} for name, rs in runs.items()}
    for name, m in means.items():
        print(f"mean {name:34s} {m}")
    if args.out:
        args.out.write_text(json.dumps({**meta, "runs": runs, "means": means}, indent=1) + "\n")


if __name__ == "__main__":
    main()
