"""Pruning benchmark: Beta-Rank, HRank, polarization, FTWT against L1 and random at equal FLOPs, on real weights.

    python benchmarks/pruning.py                     # the full run (~60 min on 2 shared CPU cores)
    python benchmarks/pruning.py --quick             # smoke run: ResNet-20, one target, a few steps (~5 min)
    python benchmarks/pruning.py --models resnet20 --targets 0.5 --ft-steps 100

For each model (akamaster ResNet-20 / ResNet-32, compress.io.zoo_model) and FLOPs target (fraction of the dense
FLOPs kept; 0.6 and 0.4 = about 40% and 60% reduction), every method prunes the same pretrained model; then:
accuracy before fine-tuning, KD fine-tuning on cifar10_train20k_jpeg (teacher = the dense model), accuracy after,
FLOPs, params, and ORT CPU p50 latency (1 thread, fresh process, devices.profile_artifact) of the exported ONNX.
Accuracy is top-1 on the JPEG CIFAR-10 test set (dense ResNet-20: 81.0% there, not 91.7%); "before" uses the first
--eval-before images, "after" the whole set. One imbalanced experiment: classes 5-9 keep 10% of their training
images; the static criteria rank and fine-tune on that subset, and minority recall is reported.
Writes benchmarks/results/pruning.json and pruning.md (with the load average: the machine is shared).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")

from compress.assets import data_path  # noqa: E402
from compress.data import Dataset, load_dataset  # noqa: E402
from compress.finetune import finetune  # noqa: E402
from compress.io import LoadedModel, zoo_model  # noqa: E402
from compress.metrics import count_flops, count_params, predict, top1  # noqa: E402
from compress.progress import set_quiet  # noqa: E402
from compress.prune import METHODS  # noqa: E402
from compress.stages import Context, build_config  # noqa: E402

ALL_METHODS = ["l1", "random", "beta-rank", "hrank", "polarization", "ftwt"]
STATIC = ["l1", "random", "beta-rank", "hrank"]
MINORITY = [5, 6, 7, 8, 9]


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def accuracy(model: torch.nn.Module, ds: Dataset, ctx: Context) -> tuple[float, np.ndarray]:
    model.eval()
    logits = predict(lambda x: model(x).numpy(), ds, ctx.normalizer(), batch_size=500)
    return top1(logits, ds.labels), logits


@torch.no_grad()
def bn_recalibrated(model: torch.nn.Module, ctx: Context, n: int = 1024) -> torch.nn.Module:
    """A copy whose BatchNorm statistics are re-estimated on n unlabeled training images (no gradient step):
    separates a criterion's choice of channels from the statistics shift every removal causes."""
    from compress.data import batches

    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    ds = ctx.dataset("train").subset(n, seed=ctx.seed + 99)
    for x, _ in batches(ds, ctx.normalizer(), 256):
        model(x)
    return model.eval()


def per_class_recall(logits: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    pred = logits.argmax(1)
    return {c: float((pred[labels == c] == c).mean() * 100) for c in np.unique(labels)}


def latency(model: torch.nn.Module, lm: LoadedModel, tmp: Path, name: str, parity: torch.Tensor,
            iterations: int) -> dict:
    from devices import profile_artifact
    from exporters.onnx import export_onnx

    path = tmp / f"{name}.onnx"
    art = export_onnx(model.eval(), lm.spec, path, "fp32", parity)
    prof = profile_artifact(str(path), runtime="onnxruntime", threads=1, warmup=30, iterations=iterations)
    lat = prof["latency_ms"]
    return {"p50_ms": round(lat["p50"], 4), "p90_ms": round(lat.get("p90", float("nan")), 4),
            "parity_max_abs_err": art.parity.get("max_abs_err")}


def method_config(method: str, target: float, args, latency_ms: float | None = None) -> dict:
    cfg = {"flops_target": target} if latency_ms is None else {"latency_target": round(latency_ms, 4)}
    if method in ("beta-rank", "hrank"):
        cfg["rank_batch_size"] = 128
    if method == "polarization":
        cfg.update(max_steps=args.train_steps, calib_images=1000)
    if method == "ftwt":
        cfg.update(max_steps=args.train_steps, calib_images=1000)
    return cfg


def run_one(lm: LoadedModel, method: str, target: float, ctx: Context, test: Dataset, before_set: Dataset,
            args, tmp: Path, parity: torch.Tensor, dense: dict, ft_ctx: Context | None = None,
            minority: bool = False, latency_ms: float | None = None) -> dict:
    t0 = time.perf_counter()
    m = METHODS.get(method)
    torch.manual_seed(args.seed)
    cfg = build_config(m, method_config(method, target, args, latency_ms))
    out = m.apply(copy.deepcopy(lm), cfg, ctx)
    model = out.model.eval()
    h = out.history[-1]
    t_prune = time.perf_counter() - t0
    row = {"method": method, "flops_target": target, "latency_target_ms": latency_ms,
           "flops": count_flops(model, lm.spec.shape), "params": count_params(model), "seconds_prune": round(t_prune, 1)}
    row["flops_reduction"] = round(1 - row["flops"] / dense["flops"], 4)
    row["acc_before_ft"], logits_b = accuracy(model, before_set, ctx)
    row["acc_before_ft_bn_recal"], _ = accuracy(bn_recalibrated(model, ctx), before_set, ctx)
    for key in ("ratio", "latency_measured_ms", "latency_dense_ms", "consensus_agreement", "consensus_flops_fraction", "r", "firing_histogram",
                "open_frequency_histogram", "adjusted", "stability"):
        if key in h:
            row[key] = h[key] if key != "stability" else {k: v for k, v in h[key].items() if k != "per_layer"}
    if "dynamic" in h:
        row["ftwt_dynamic"] = {k: v for k, v in h["dynamic"].items() if k != "per_layer"}
    t1 = time.perf_counter()
    teacher = lm.model.eval()
    log: list[dict] = []
    finetune(model, ft_ctx or ctx, args.epochs, lr=args.lr, batch_size=128, teacher=teacher, distill=True,
             max_steps=args.ft_steps, log=log)
    row["ft_steps"] = log[-1]["steps"] if log else 0
    row["seconds_ft"] = round(time.perf_counter() - t1, 1)
    row["acc_after_ft"], logits_a = accuracy(model, test, ctx)
    row["drop_after_ft"] = round(dense["acc"] - row["acc_after_ft"], 2)
    if minority:
        rb = per_class_recall(logits_b, before_set.labels)
        ra = per_class_recall(logits_a, test.labels)
        row["minority_recall_before_ft"] = round(float(np.mean([rb[c] for c in MINORITY])), 2)
        row["minority_recall_after_ft"] = round(float(np.mean([ra[c] for c in MINORITY])), 2)
    if args.latency:
        row.update(latency(model, lm, tmp, f"{lm.arch}_{method}_{target}", parity, args.iterations))
        row["speedup"] = round(dense["p50_ms"] / row["p50_ms"], 3)
    row["load_avg"] = load_avg()
    row["seconds_total"] = round(time.perf_counter() - t0, 1)
    what = f"target {target:.2f}" if latency_ms is None else f"latency {latency_ms:.3f} ms"
    print(f"  {method:12s} {what}: FLOPs -{row['flops_reduction']:.1%}, acc {row['acc_before_ft']:.2f} "
          f"(BN recal. {row['acc_before_ft_bn_recal']:.2f}) -> "
          f"{row['acc_after_ft']:.2f} (dense {dense['acc']:.2f})"
          + (f", p50 {row['p50_ms']:.3f} ms ({row['speedup']:.2f}x)" if args.latency else "")
          + f"  [{row['seconds_total']:.0f}s, load {row['load_avg']}]", flush=True)
    return row


def imbalanced(ds: Dataset, fraction: float, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(ds.labels):
        members = np.flatnonzero(ds.labels == c)
        if c in MINORITY:
            members = rng.choice(members, max(1, int(len(members) * fraction)), replace=False)
        idx.append(members)
    return ds.subset(None, indices=np.sort(np.concatenate(idx)))


def save_npz(ds: Dataset, path: Path) -> str:
    np.savez(path, x=ds.images, y=ds.labels)
    return f"cifar10:{path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet32")
    ap.add_argument("--targets", default="0.6,0.4", help="FLOPs fractions kept (0.6 = 40%% reduction)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (<= 3), capped by --ft-steps")
    ap.add_argument("--ft-steps", type=int, default=80, help="fine-tuning optimizer steps (batch 128) per model")
    ap.add_argument("--train-steps", type=int, default=80, help="gate / predictor training steps (polarization, ftwt)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--eval-before", type=int, default=2000, help="test images for the accuracy before fine-tuning")
    ap.add_argument("--eval-after", type=int, default=10000, help="test images for the accuracy after fine-tuning")
    ap.add_argument("--iterations", type=int, default=300, help="latency iterations per artifact")
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--speedup", type=float, default=1.7,
                    help="also run --latency-methods with latency_target = dense p50 / this (0: skip)")
    ap.add_argument("--latency-methods", default="beta-rank,polarization")
    ap.add_argument("--no-imbalanced", dest="imbalanced", action="store_false")
    ap.add_argument("--imbalanced-steps", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet20, target 0.5, a few steps, small eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is several times faster than 2 on a CPU other jobs are also using")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.models, args.targets, args.ft_steps, args.train_steps = "resnet20", "0.5", 5, 5
        args.eval_before, args.eval_after, args.iterations, args.imbalanced_steps = 300, 500, 50, 5
    set_quiet(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started, t_start, load_start = datetime.now(timezone.utc), time.perf_counter(), load_avg()
    print(f"pruning benchmark: load average at start {load_start}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    train_spec = f"cifar10:{data_path('cifar10_train20k_jpeg.npz')}"
    test_full = load_dataset(f"cifar10:{data_path('cifar10_test_jpeg.npz')}")
    test = test_full.subset(None, indices=np.arange(min(args.eval_after, len(test_full))))
    before_set = test_full.subset(None, indices=np.arange(min(args.eval_before, len(test_full))))
    methods = [m for m in args.methods.split(",") if m]
    targets = [float(t) for t in args.targets.split(",") if t]
    results: dict = {"schema": "compress.bench.pruning/1", "created": started.isoformat(timespec="seconds"),
                     "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "load_avg_start": load_start},
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "data": {"train": "cifar10_train20k_jpeg.npz", "test": "cifar10_test_jpeg.npz",
                              "eval_before": len(before_set), "eval_after": len(test)},
                     "models": {}, "imbalanced": None}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmpdir:
        tmp = Path(tmpdir)
        for arch in [a for a in args.models.split(",") if a]:
            lm = zoo_model(arch)
            ctx = Context(spec=lm.spec, data={"train": train_spec}, seed=args.seed)
            parity = ctx.normalizer()(test.images[:16])
            dense = {"flops": count_flops(lm.model, lm.spec.shape), "params": count_params(lm.model)}
            dense["acc"], _ = accuracy(lm.model, test, ctx)
            dense["acc_before_set"], _ = accuracy(lm.model, before_set, ctx)
            if args.latency:
                dense.update(latency(lm.model, lm, tmp, f"{arch}_dense", parity, args.iterations))
            print(f"{arch}: dense acc {dense['acc']:.2f} (first {len(before_set)}: {dense['acc_before_set']:.2f}), "
                  f"FLOPs {dense['flops'] / 1e6:.1f}M" + (f", p50 {dense['p50_ms']:.3f} ms" if args.latency else ""),
                  flush=True)
            rows = []
            plan = [(m, t, None) for t in targets for m in methods]
            if args.latency and args.speedup:
                ms = dense["p50_ms"] / args.speedup
                plan += [(m, 0.0, ms) for m in args.latency_methods.split(",") if m in methods]
            for method, target, lat_ms in plan:
                rows.append(run_one(lm, method, target, ctx, test, before_set, args, tmp, parity, dense,
                                    latency_ms=lat_ms))
                _write(results | {"models": {**results["models"], arch: {"dense": dense, "rows": rows}}}, args)
            results["models"][arch] = {"dense": dense, "rows": rows}
        if args.imbalanced:
            results["imbalanced"] = run_imbalanced(args, tmp, test, before_set, train_spec)
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    results["host"]["load_avg_end"] = load_avg()
    _write(results, args)
    print(f"done in {results['seconds_total'] / 60:.1f} min; load average at end {results['host']['load_avg_end']}")


def run_imbalanced(args, tmp: Path, test: Dataset, before_set: Dataset, train_spec: str) -> dict:
    """ResNet-20, 5 classes at 10% of their training images: rank and fine-tune on that subset."""
    lm = zoo_model("resnet20")
    full = load_dataset(train_spec)
    sub = imbalanced(full, 0.1, args.seed)
    spec = save_npz(sub, tmp / "imbalanced.npz")
    ctx = Context(spec=lm.spec, data={"train": spec}, seed=args.seed)
    sub_args = copy.copy(args)
    sub_args.ft_steps = args.imbalanced_steps
    sub_args.latency = False
    dense = {"flops": count_flops(lm.model, lm.spec.shape)}
    dense["acc"], logits = accuracy(lm.model, test, ctx)
    rec = per_class_recall(logits, test.labels)
    dense["minority_recall"] = round(float(np.mean([rec[c] for c in MINORITY])), 2)
    print(f"imbalanced subset: {len(sub)} training images (classes {MINORITY} at 10%); dense acc {dense['acc']:.2f}, "
          f"minority recall {dense['minority_recall']:.2f}", flush=True)
    target = float(args.targets.split(",")[0])
    rows = [run_one(lm, m, target, ctx, test, before_set, sub_args, tmp, None, dense, minority=True)
            for m in STATIC if m in args.methods.split(",")]
    return {"train_images": len(sub), "minority_classes": MINORITY, "minority_fraction": 0.1,
            "flops_target": target, "dense": dense, "rows": rows}


def _write(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "pruning.md").write_text(markdown(results))


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Pruning benchmark", "",
             f"Created {r['created']} on {r['host']['platform']} ({r['host']['cpus']} CPUs shared with other jobs; "
             f"load average at start {r['host']['load_avg_start']}, at end {r['host'].get('load_avg_end', '-')}). "
             f"Total {r.get('seconds_total', 0) / 60:.1f} min.", "",
             f"Fine-tuning: KD from the dense model on cifar10_train20k_jpeg, {s['ft_steps']} steps of batch 128 "
             f"(lr {s['lr']}, cosine); polarization / FTWT train {s['train_steps']} steps before extraction. "
             f"Accuracy: top-1 % on the JPEG CIFAR-10 test set; 'before FT' on the first {r['data']['eval_before']} "
             f"images, 'after FT' on {r['data']['eval_after']}. Latency: ONNX Runtime CPU p50, 1 thread, batch 1, "
             f"fresh process; speed-up vs the dense export measured the same way. Load average per row in the JSON.", ""]
    for arch, m in r["models"].items():
        d = m["dense"]
        lines += [f"## {arch}: dense {d['acc']:.2f}% ({d.get('acc_before_set', 0):.2f}% on the 'before' subset), "
                  f"{d['flops'] / 1e6:.1f} MFLOPs, {d['params'] / 1e3:.0f}k params"
                  + (f", p50 {d['p50_ms']:.3f} ms" if "p50_ms" in d else ""), "",
                  "| method | budget (FLOPs kept / latency) | FLOPs reduction | params | acc before FT | before FT, BN recal. "
                  "| acc after FT | drop | p50 ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in m["rows"]:
            budget = (f"{row['flops_target']:.2f}" if not row.get("latency_target_ms")
                      else f"latency {row['latency_target_ms']:.3f} ms")
            lines.append(f"| {row['method']} | {budget} | {row['flops_reduction']:.1%} | "
                         f"{row['params'] / 1e3:.0f}k | {row['acc_before_ft']:.2f} | {row['acc_before_ft_bn_recal']:.2f} | "
                         f"{row['acc_after_ft']:.2f} | "
                         f"{row['drop_after_ft']:+.2f} | {row.get('p50_ms', '-')} | {row.get('speedup', '-')} |")
        lines.append("")
    imb = r.get("imbalanced")
    if imb:
        d = imb["dense"]
        lines += [f"## Imbalanced: ResNet-20, classes {imb['minority_classes']} at {imb['minority_fraction']:.0%} "
                  f"({imb['train_images']} training images), FLOPs kept {imb['flops_target']}",
                  "", f"Dense: {d['acc']:.2f}% overall, minority recall {d['minority_recall']:.2f}%. Ranking and "
                  f"fine-tuning ({s['imbalanced_steps']} steps) use the imbalanced subset only.", "",
                  "| method | FLOPs reduction | acc before FT | BN recal. | minority recall before | acc after FT "
                  "| minority recall after |",
                  "|---|---|---|---|---|---|---|"]
        for row in imb["rows"]:
            lines.append(f"| {row['method']} | {row['flops_reduction']:.1%} | {row['acc_before_ft']:.2f} | "
                         f"{row['acc_before_ft_bn_recal']:.2f} | {row['minority_recall_before_ft']:.2f} | {row['acc_after_ft']:.2f} | "
                         f"{row['minority_recall_after_ft']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
