"""Pruning benchmark: Beta-Rank, HRank, polarization, FTWT against L1 and random at equal FLOPs, on real weights.

    python benchmarks/pruning.py                     # ResNet-20 + ResNet-32 (~25 min for ResNet-20 alone on 2 cores)
    python benchmarks/pruning.py --quick             # smoke run: ResNet-20, one target, a few steps (~5 min)
    python benchmarks/pruning.py --models resnet20 --targets 0.5 --ft-steps 100

For each model (akamaster ResNet-20 / ResNet-32, compress.io.zoo_model) and FLOPs target (fraction of the dense
FLOPs kept; 0.6 and 0.4 = about 40% and 60% reduction), every method prunes the same pretrained model; then:
accuracy before fine-tuning, KD fine-tuning on cifar10_train20k_jpeg (teacher = the dense model), accuracy after,
FLOPs, params, and ORT CPU p50 latency (1 thread, fresh process, devices.profile_artifact) of the exported ONNX.
Accuracy is top-1 on the JPEG CIFAR-10 test set (dense ResNet-20: 81.0% there, not 91.7%); "before" uses the first
--eval-before images, "after" the whole set. One imbalanced experiment: classes 5-9 keep 10% of their training
images; the static criteria rank and fine-tune on that subset, and minority recall is reported.
Latency-target rows (--latency-rows, or --latency-methods, --speedup, --round-to): widths chosen from measured ORT
latency on a grid of channel multiples; they are fine-tuned for --goal-epochs (the equal-FLOPs rows for --epochs).
Fine-tuning recipe: --distill-alpha (KD weight; the rest is cross-entropy on the labels), --temperature, --lr,
--ft-batch. Reference: the dense model fine-tuned with the same recipe (--dense-ft-epochs, default the goal epochs),
so each row's drop is reported against the pretrained model (the issue's bar) and against dense + fine-tuning;
accuracy on the clean cifar10_test_lossless846 images too. --gate-round-to snaps polarization / FTWT widths.
--merge keeps the rows of the existing pruning.json that this run does not redo (each row records its own run),
and reuses its dense + fine-tuning reference when the recipe is the same.
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
from compress.errors import UserError  # noqa: E402
from compress.finetune import FeatureDistill, feature_points, finetune  # noqa: E402
from compress.io import LoadedModel, zoo_model  # noqa: E402
from compress.metrics import count_flops, count_params, predict, top1  # noqa: E402
from compress.progress import set_quiet  # noqa: E402
from compress.prune import METHODS  # noqa: E402
from compress.stages import Context, build_config  # noqa: E402

ALL_METHODS = ["l1", "random", "beta-rank", "hrank", "polarization", "ftwt"]
STATIC = ["l1", "random", "beta-rank", "hrank"]
GATES = ["polarization", "ftwt"]
MINORITY = [5, 6, 7, 8, 9]
# rows measured since exports use compress.exportable (option-A shortcut as a 0/1 1x1 conv) carry this; older rows
# were measured on the Slice/Concat/Gather shortcut graph and are marked in the table
EXPORT_FORM = "shortcut-conv"
# the fine-tuning recipe (chosen on a held-out split of the training images; see the findings in pruning.md)
LR, ALPHA, TEMPERATURE, BATCH = 0.01, 0.2, 4.0, 128


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


def paired_speedup(dense_onnx: Path, row_onnx: Path, rounds: int, iterations: int) -> dict:
    """The row's p50 and speed-up from `rounds` interleaved fresh-process profiles of the dense and the pruned
    export (dense, pruned, dense, pruned ...), each side's median p50: both sides see the same load, instead of a
    dense p50 taken once at the start of the run and a row p50 taken minutes later (the single pair of readings
    that made speed-ups swing +-10-15% between runs). The single-reading values stay in the row
    (p50_single_ms, speedup_single)."""
    from devices import profile_interleaved

    profiles = profile_interleaved([(str(dense_onnx), "onnxruntime"), (str(row_onnx), "onnxruntime")], rounds,
                                   threads=1, warmup=30, iterations=iterations)
    dense_ms, row_ms = ([float(p["latency_ms"]["p50"]) for p in side] for side in profiles)
    return {"latency_rounds": rounds, "dense_p50_rounds_ms": [round(v, 4) for v in dense_ms],
            "p50_rounds_ms": [round(v, 4) for v in row_ms], "dense_p50_paired_ms": round(float(np.median(dense_ms)), 4)}


def method_config(method: str, target: float, args, speedup: float | None = None, round_to: int = 0,
                  widths: str | None = None) -> dict:
    # latency rows ask the allocator for a speed-up over the dense model, which it measures in its own process:
    # an absolute target taken from this script's fresh-process p50 would mix two measurement set-ups
    cfg = {"flops_target": target} if speedup is None else {"speedup_target": speedup}
    if widths:
        cfg = {"widths": widths}  # a stored allocation: no budget search, no latency measured while pruning
    if speedup is not None and round_to:
        cfg["round_to"] = round_to  # else the default grid step (targets.latency_step)
    cfg["bn_recalibration"] = 0  # 'acc before FT' is the raw pruned model; the benchmark recalibrates a copy
    if method in ("beta-rank", "hrank"):
        cfg["rank_batch_size"] = 128
    if method == "polarization":
        cfg.update(max_steps=args.train_steps, calib_images=1000)
    if method == "ftwt":
        cfg.update(max_steps=args.train_steps, calib_images=1000)
    if method in GATES and speedup is None and args.gate_round_to:
        cfg["round_to"] = args.gate_round_to  # their free widths (5, 7, 12 ...) run like the next SIMD block up
    return cfg


def recipe(args) -> dict:
    """The fine-tuning recipe every row (and the dense + fine-tuning reference) uses."""
    return {"lr": args.lr, "batch_size": args.ft_batch, "temperature": args.temperature, "alpha": args.distill_alpha}


def dense_finetuned(lm: LoadedModel, ctx: Context, test: Dataset, clean: Dataset | None, args, epochs: int) -> dict:
    """The unpruned model fine-tuned with exactly the rows' recipe and epochs: fine-tuning on JPEG training images
    adapts any model to the JPEG test domain, so this separates what pruning costs from what that adaptation gains."""
    t0 = time.perf_counter()
    model = copy.deepcopy(lm.model)
    torch.manual_seed(args.seed)
    log: list[dict] = []
    finetune(model, ctx, epochs, teacher=lm.model.eval(), distill=True, max_steps=args.ft_steps or None, log=log,
             **recipe(args))
    out = {"epochs": epochs, "ft_steps": log[-1]["steps"] if log else 0, "acc": accuracy(model, test, ctx)[0]}
    if clean is not None:
        out["acc_clean"] = round(accuracy(model, clean, ctx)[0], 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"  dense + fine-tuning ({epochs} ep): acc {out['acc']:.2f}"
          + (f", clean {out['acc_clean']:.2f}" if clean is not None else "") + f"  [{out['seconds']:.0f}s]", flush=True)
    return out


def run_one(lm: LoadedModel, method: str, target: float, ctx: Context, test: Dataset, before_set: Dataset,
            args, tmp: Path, parity: torch.Tensor, dense: dict, ft_ctx: Context | None = None,
            minority: bool = False, latency_ms: float | None = None, epochs: int | None = None,
            round_to: int = 0, clean: Dataset | None = None, speedup: float | None = None,
            widths: str | None = None) -> dict:
    t0 = time.perf_counter()
    m = METHODS.get(method)
    torch.manual_seed(args.seed)
    cfg = build_config(m, method_config(method, target, args, speedup, round_to, widths))
    out = m.apply(copy.deepcopy(lm), cfg, ctx)
    model = out.model.eval()
    h = out.history[-1]
    t_prune = time.perf_counter() - t0
    row = {"method": method, "flops_target": target, "latency_target_ms": latency_ms,
           "flops": count_flops(model, lm.spec.shape), "params": count_params(model), "seconds_prune": round(t_prune, 1)}
    row["flops_reduction"] = round(1 - row["flops"] / dense["flops"], 4)
    row["acc_before_ft"], logits_b = accuracy(model, before_set, ctx)
    model = bn_recalibrated(model, ctx)  # fine-tuning starts from the recalibrated model
    row["acc_before_ft_bn_recal"], _ = accuracy(model, before_set, ctx)
    row["widths"] = sorted({m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)})
    # per conv, so a row's latency can be measured again from the JSON alone (channel identity does not matter)
    row["conv_widths"] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for key in ("ratio", "round_to", "aligned_to", "aligned_flops_fraction", "rounds", "latency_measured_ms", "latency_dense_ms", "consensus_agreement", "consensus_flops_fraction", "r", "firing_histogram",
                "open_frequency_histogram", "adjusted", "stability"):
        if key in h:
            row[key] = h[key] if key != "stability" else {k: v for k, v in h[key].items() if k != "per_layer"}
    if "dynamic" in h:
        row["ftwt_dynamic"] = {k: v for k, v in h["dynamic"].items() if k != "per_layer"}
    t1 = time.perf_counter()
    teacher = lm.model.eval()
    log: list[dict] = []
    row["ft_epochs"] = epochs or args.epochs
    features = None
    if args.distill_features:  # the stages, mapped to the teacher by the channels the prune kept
        features = FeatureDistill(feature_points(model, h.get("kept_channels", {})), args.distill_features)
        row.update(distill_features=args.distill_features, distill_points=list(features.points))
    torch.manual_seed(args.seed)
    finetune(model, ft_ctx or ctx, row["ft_epochs"], teacher=teacher, distill=True, max_steps=args.ft_steps or None,
             log=log, features=features, **recipe(args))
    row["ft_steps"] = log[-1]["steps"] if log else 0
    row["seconds_ft"] = round(time.perf_counter() - t1, 1)
    row["acc_after_ft"], logits_a = accuracy(model, test, ctx)
    row["drop_after_ft"] = round(dense["acc"] - row["acc_after_ft"], 2)
    ref = (dense.get("ft") or {}).get(str(row["ft_epochs"]))
    if ref:
        row["drop_vs_dense_ft"] = round(ref["acc"] - row["acc_after_ft"], 2)
    if clean is not None:
        row["acc_clean_after_ft"] = round(accuracy(model, clean, ctx)[0], 2)
        if "acc_clean" in dense:
            row["drop_clean"] = round(dense["acc_clean"] - row["acc_clean_after_ft"], 2)
    if minority:
        rb = per_class_recall(logits_b, before_set.labels)
        ra = per_class_recall(logits_a, test.labels)
        row["minority_recall_before_ft"] = round(float(np.mean([rb[c] for c in MINORITY])), 2)
        row["minority_recall_after_ft"] = round(float(np.mean([ra[c] for c in MINORITY])), 2)
    if args.latency:
        row["export_form"] = EXPORT_FORM
        row.update(latency(model, lm, tmp, f"{lm.arch}_{method}_{target}", parity, args.iterations))
        row["speedup"] = round(dense["p50_ms"] / row["p50_ms"], 3)
        if args.latency_rounds > 1:  # the speed-up the goal check reads: paired, interleaved, median of rounds
            paired = paired_speedup(tmp / f"{lm.arch}_dense.onnx", tmp / f"{lm.arch}_{method}_{target}.onnx",
                                    args.latency_rounds, args.iterations)
            row.update(p50_single_ms=row["p50_ms"], speedup_single=row["speedup"], **paired)
            row["p50_ms"] = round(float(np.median(paired["p50_rounds_ms"])), 4)
            row["speedup"] = round(paired["dense_p50_paired_ms"] / row["p50_ms"], 3)
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
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (<= 3) of the equal-FLOPs rows")
    ap.add_argument("--goal-epochs", type=int, default=3, help="fine-tuning epochs (<= 3) of the latency-target rows")
    ap.add_argument("--ft-steps", type=int, default=0, help="cap on fine-tuning optimizer steps per row (0: none)")
    ap.add_argument("--train-steps", type=int, default=80, help="gate / predictor training steps (polarization, ftwt)")
    ap.add_argument("--lr", type=float, default=LR, help="fine-tuning lr (SGD, cosine to 0 over the run)")
    ap.add_argument("--distill-alpha", type=float, default=ALPHA,
                    help="fine-tuning loss: alpha * KD + (1 - alpha) * cross-entropy on the labels")
    ap.add_argument("--temperature", type=float, default=TEMPERATURE, help="KD temperature")
    ap.add_argument("--distill-features", type=float, default=0.0,
                    help="weight of feature distillation at the model's stages while fine-tuning the rows (the "
                         "dense + fine-tuning reference keeps the plain recipe); such rows are kept apart for --merge")
    ap.add_argument("--ft-batch", type=int, default=BATCH, help="fine-tuning batch size")
    ap.add_argument("--dense-ft-epochs", default="goal",
                    help="epochs of the 'dense + same fine-tuning' reference rows, comma-separated ('goal': "
                         "--goal-epochs; 'all': every epoch count of the rows; '' or 0: none)")
    ap.add_argument("--eval-before", type=int, default=2000, help="test images for the accuracy before fine-tuning")
    ap.add_argument("--eval-after", type=int, default=10000, help="test images for the accuracy after fine-tuning")
    ap.add_argument("--iterations", type=int, default=300, help="latency iterations per artifact")
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--latency-rounds", type=int, default=1,
                    help="N > 1: each row's speed-up from N interleaved fresh-process profiles of the dense and the "
                         "pruned export (median p50 of each side; both under the same load); 1: the dense p50 taken "
                         "once per model at the start")
    ap.add_argument("--speedup", type=float, default=1.7,
                    help="also run --latency-methods with this speed-up target over the dense model (0: skip)")
    ap.add_argument("--latency-methods", default="l1,beta-rank")  # with --speedup 1.7 and the default grid (8)
    ap.add_argument("--round-to", type=int, default=0,
                    help="channel multiple of the latency-target rows (0: the default grid step, 8)")
    ap.add_argument("--latency-rows", default="",
                    help="latency rows as METHOD@SPEEDUPxBLOCK,... (e.g. beta-rank@1.6x16,l1@1.7x8); overrides the three above")
    ap.add_argument("--width-rows", default="",
                    help="fixed-allocation rows as METHOD@FILE,... (FILE: a stored {group: width} allocation, e.g. "
                         "benchmarks/allocations/resnet20_*.json; each model takes the files named after it); "
                         "fine-tuned for --goal-epochs")
    ap.add_argument("--gate-round-to", type=int, default=8,
                    help="round_to of the polarization / FTWT equal-FLOPs rows: their learned widths snapped to "
                         "multiples of this (0: free widths)")
    ap.add_argument("--latency-first", action="store_true", help="run the latency rows before the equal-FLOPs rows")
    ap.add_argument("--merge", action="store_true",
                    help="keep the models (and imbalanced experiment) of the existing pruning.json this run does not redo")
    ap.add_argument("--no-imbalanced", dest="imbalanced", action="store_false")
    ap.add_argument("--imbalanced-steps", type=int, default=0, help="fine-tuning step cap there (0: --epochs)")
    ap.add_argument("--notes", type=Path, default=None, help="a findings text (markdown) to put under the tables")
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet20, target 0.5, a few steps, small eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is several times faster than 2 on a CPU other jobs are also using")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.models, args.targets, args.ft_steps, args.train_steps = "resnet20", "0.5", 5, 5
        args.goal_epochs = 1
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
    clean = load_dataset(f"cifar10:{data_path('cifar10_test_lossless846.npz')}")  # the clean (lossless) domain
    before_set = test_full.subset(None, indices=np.arange(min(args.eval_before, len(test_full))))
    methods = [m for m in args.methods.split(",") if m]
    previous = {}
    if args.merge and (args.out / "pruning.json").is_file():
        previous = json.loads((args.out / "pruning.json").read_text())
    targets = [float(t) for t in args.targets.split(",") if t]
    results: dict = {"schema": "compress.bench.pruning/1", "created": started.isoformat(timespec="seconds"),
                     "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "load_avg_start": load_start},
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "data": {"train": "cifar10_train20k_jpeg.npz", "test": "cifar10_test_jpeg.npz",
                              "clean": "cifar10_test_lossless846.npz", "clean_images": len(clean),
                              "eval_before": len(before_set), "eval_after": len(test)},
                     "models": {}, "imbalanced": None}
    run_models = [a for a in args.models.split(",") if a]
    kept_rows: dict[str, list[dict]] = {}  # --merge: rows of other runs keep their own settings and dense baseline
    for arch, entry in previous.get("models", {}).items():
        settings, created = entry.get("settings", previous.get("settings")), entry.get("created", previous.get("created"))
        rows = [{**row, "settings": row.get("settings", settings), "created": row.get("created", created),
                 "dense_p50_ms": row.get("dense_p50_ms", entry["dense"].get("p50_ms"))} for row in entry["rows"]]
        if arch not in run_models:
            results["models"][arch] = {**entry, "rows": rows, "settings": settings, "created": created}
        else:
            kept_rows[arch] = rows
    if previous.get("imbalanced") and not args.imbalanced:
        results["imbalanced"] = previous["imbalanced"]
    if args.notes:
        results["notes"] = args.notes.read_text()
    elif previous.get("notes"):
        results["notes"] = previous["notes"]
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmpdir:
        tmp = Path(tmpdir)
        failures: list[dict] = []
        for arch in run_models:
            lm = zoo_model(arch)
            ctx = Context(spec=lm.spec, data={"train": train_spec}, seed=args.seed)
            parity = ctx.normalizer()(test.images[:16])
            dense = {"flops": count_flops(lm.model, lm.spec.shape), "params": count_params(lm.model)}
            dense["acc"], _ = accuracy(lm.model, test, ctx)
            dense["acc_before_set"], _ = accuracy(lm.model, before_set, ctx)
            dense["acc_clean"] = round(accuracy(lm.model, clean, ctx)[0], 2)
            if args.latency:
                dense.update(latency(lm.model, lm, tmp, f"{arch}_dense", parity, args.iterations))
            print(f"{arch}: dense acc {dense['acc']:.2f} (first {len(before_set)}: {dense['acc_before_set']:.2f}), "
                  f"FLOPs {dense['flops'] / 1e6:.1f}M" + (f", p50 {dense['p50_ms']:.3f} ms" if args.latency else ""),
                  flush=True)
            rows = []
            plan = [(m, t, None, args.epochs, None, 0, None) for t in targets for m in methods]
            if args.latency:
                lat_plan = [(m, 0.0, dense["p50_ms"] / sp, args.goal_epochs, sp, rt, None)
                            for m, sp, rt in latency_rows(args)]
                plan = lat_plan + plan if args.latency_first else plan + lat_plan
            plan += [(m, 0.0, None, args.goal_epochs, None, 0, wf) for m, wf in width_rows(args, arch)]
            # --merge: a reference of the same recipe from the previous run is reused (it does not depend on the rows)
            prev = previous.get("models", {}).get(arch, {})
            same = {k: (prev.get("settings") or {}).get(k) for k in ("lr", "distill_alpha", "temperature", "ft_batch",
                                                                     "ft_steps", "seed")} \
                == {k: getattr(args, k) for k in ("lr", "distill_alpha", "temperature", "ft_batch", "ft_steps", "seed")}
            reuse = (prev.get("dense") or {}).get("ft") or {} if same else {}
            dense["ft"] = {str(ep): reuse[str(ep)] if str(ep) in reuse else dense_finetuned(lm, ctx, test, clean, args, ep)
                           for ep in dense_ft_epochs(args, [p[3] for p in plan])}
            redo = {row_key(m, t, sp, rt, wf, args.distill_features) for m, t, _, _, sp, rt, wf in plan}
            rows = [row for row in kept_rows.get(arch, []) if row_key(row["method"], row["flops_target"],
                    row.get("speedup_target"), row.get("round_to_arg"), row.get("widths_file"),
                    row.get("distill_features")) not in redo]
            for method, target, lat_ms, epochs, sp, rt, wf in plan:
                try:
                    row = run_one(lm, method, target, ctx, test, before_set, args, tmp, parity, dense,
                                  latency_ms=lat_ms, epochs=epochs, round_to=rt, clean=clean, speedup=sp, widths=wf)
                except UserError as e:  # e.g. a latency target out of reach at this channel block: say so, go on
                    print(f"  {method:12s} {'latency' if lat_ms else target}: FAILED: {e}", flush=True)
                    failures.append({"model": arch, "method": method, "flops_target": target,
                                     "latency_target_ms": lat_ms, "round_to": rt or None, "error": str(e)})
                    results["failures"] = failures
                    _write(results, args)
                    continue
                row.update(created=started.isoformat(timespec="seconds"), dense_p50_ms=dense.get("p50_ms"),
                           settings=run_settings(args))
                if lat_ms is not None:
                    row.update(speedup_target=sp, round_to_arg=rt)
                if wf:
                    row["widths_file"] = str(Path(wf).relative_to(ROOT)) if Path(wf).is_relative_to(ROOT) else wf
                rows.append(row)
                rows.sort(key=lambda x: (x.get("latency_target_ms") is not None, -x["flops_target"],
                                         ALL_METHODS.index(x["method"]) if x["method"] in ALL_METHODS else 99,
                                         x.get("round_to") or 0))
                results["models"][arch] = {"dense": dense, "rows": rows, "settings": run_settings(args),
                                           "created": started.isoformat(timespec="seconds")}
                _write(results, args)
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
    sub_args.ft_steps = args.imbalanced_steps  # 0: the --epochs of the equal-FLOPs rows
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
            "flops_target": target, "dense": dense, "rows": rows, "settings": run_settings(args)}


def latency_rows(args) -> list[tuple[str, float, int]]:
    """(method, speed-up goal, channel block) of the latency-target rows: --latency-rows, else every
    --latency-methods at --speedup and --round-to."""
    if args.latency_rows:
        out = []
        for item in args.latency_rows.split(","):
            method, _, rest = item.partition("@")
            sp, _, rt = rest.partition("x")
            out.append((method, float(sp), int(rt or 0)))
        return out
    if not args.speedup:
        return []
    return [(m, args.speedup, args.round_to) for m in args.latency_methods.split(",") if m]


def dense_ft_epochs(args, row_epochs: list[int]) -> list[int]:
    spec = str(args.dense_ft_epochs).strip()
    if spec == "goal":
        return [args.goal_epochs]
    if spec == "all":
        return sorted(set(row_epochs))
    return sorted({int(e) for e in spec.split(",") if e.strip() and int(e) > 0})


def row_key(method: str, flops_target: float, speedup_target, round_to, widths_file=None,
            distill_features: float | None = None) -> tuple:
    """What a row measures (for --merge): method and budget; latency rows by their speed-up goal and channel block,
    fixed-widths rows by their allocation file; rows fine-tuned with feature distillation by its weight."""
    key = (method, round(float(flops_target), 4), speedup_target or None, round_to or None)
    key = key + (Path(widths_file).name,) if widths_file else key
    return key + (("features", float(distill_features)),) if distill_features else key


def width_rows(args, arch: str) -> list[tuple[str, str]]:
    """(method, allocation file) of the fixed-widths rows of `arch`: --width-rows METHOD@FILE,... (files whose
    name starts with the arch's name; relative paths from the repository root)."""
    out = []
    for item in filter(None, args.width_rows.split(",")):
        method, _, path = item.partition("@")
        path = Path(path) if Path(path).is_absolute() else ROOT / path
        if path.name.startswith(f"{arch}_"):
            out.append((method, str(path)))
    return out


def run_settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _write(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "pruning.md").write_text(markdown(results))


def goal_check(r: dict) -> list[str]:
    """The issue's goals, checked on the rows as measured (no row is picked by hand)."""
    out = []
    for arch, m in r["models"].items():
        d, rows = m["dense"], m["rows"]
        big = [x for x in rows if x["flops_reduction"] >= 0.5]
        both = [x for x in big if x["drop_after_ft"] <= 1.0 and x.get("speedup", 0) >= 1.6]
        if big:
            best = min(big, key=lambda x: x["drop_after_ft"])
            fast = max(big, key=lambda x: x.get("speedup", 0))
            out.append(f"- {arch}, >= 50% FLOPs reduction, drop measured against the pretrained dense model "
                       f"({d['acc']:.2f}%, the issue's bar): {'MET' if both else 'MISSED'} "
                       f"(<= 1.0 pt drop and >= 1.6x in one row: {len(both)} of {len(big)} rows"
                       + "".join(f"; {_label(x)}, {_budget(x)}: -{x['flops_reduction']:.1%} FLOPs, drop "
                                 f"{x['drop_after_ft']:+.2f} pt, {x['speedup']}x" for x in both) + "). Smallest drop "
                       f"{best['drop_after_ft']:+.2f} pt ({_label(best)}, {_budget(best)}, "
                       f"-{best['flops_reduction']:.1%} FLOPs, {best.get('speedup', '-')}x); fastest "
                       f"{fast.get('speedup', '-')}x ({_label(fast)}, {_budget(fast)}, drop {fast['drop_after_ft']:+.2f} pt).")
            # rows whose dense + FT reference this model entry holds (a --merge run with other --dense-ft-epochs
            # keeps rows measured against a reference it did not recompute)
            ref = [x for x in big if "drop_vs_dense_ft" in x and str(x.get("ft_epochs")) in (d.get("ft") or {})]
            if ref:
                both_ref = [x for x in ref if x["drop_vs_dense_ft"] <= 1.0 and x.get("speedup", 0) >= 1.6]
                b2 = min(ref, key=lambda x: x["drop_vs_dense_ft"])
                ft = d["ft"][str(b2["ft_epochs"])]
                out.append(f"- {arch}, the same bar against the dense model fine-tuned with the same recipe and epochs "
                           f"({ft['acc']:.2f}% after {ft['epochs']} ep; this separates the cost of pruning from the "
                           f"JPEG-domain gain of fine-tuning): {'met' if both_ref else 'missed'} ({len(both_ref)} of "
                           f"{len(ref)} rows with that reference). Smallest drop {b2['drop_vs_dense_ft']:+.2f} pt "
                           f"({_label(b2)}, {_budget(b2)}, {b2.get('speedup', '-')}x)"
                           + (f"; on the clean lossless846 images that row has {b2['acc_clean_after_ft']:.2f}% vs "
                              f"{d['acc_clean']:.2f}% dense and {ft['acc_clean']:.2f}% dense + fine-tuning"
                              if "acc_clean_after_ft" in b2 and "acc_clean" in ft else "") + ".")
        # the equal-FLOPs rows only (fixed-widths rows carry flops_target 0 and each their own allocation)
        for t in sorted({x["flops_target"] for x in rows if not x.get("latency_target_ms") and not x.get("widths_file")}):
            by = {x["method"]: x for x in rows if x["flops_target"] == t and not x.get("latency_target_ms")
                  and not x.get("distill_features")}
            if "beta-rank" in by and "l1" in by:
                b, l1 = by["beta-rank"], by["l1"]
                out.append(f"- {arch}, FLOPs kept {t}: Beta-Rank vs L1 before fine-tuning: raw {b['acc_before_ft']:.2f} "
                           f"vs {l1['acc_before_ft']:.2f}, after BN recalibration {b['acc_before_ft_bn_recal']:.2f} vs "
                           f"{l1['acc_before_ft_bn_recal']:.2f} ("
                           f"{'at least as good' if b['acc_before_ft_bn_recal'] >= l1['acc_before_ft_bn_recal'] else 'worse'}"
                           f" after recalibration).")
    imb = r.get("imbalanced")
    if imb:
        by = {x["method"]: x for x in imb["rows"]}
        if "beta-rank" in by and "l1" in by:
            b, l1 = by["beta-rank"], by["l1"]
            out.append(f"- imbalanced subset: Beta-Rank vs L1, BN-recalibrated before FT {b['acc_before_ft_bn_recal']:.2f} vs "
                       f"{l1['acc_before_ft_bn_recal']:.2f}; after FT {b['acc_after_ft']:.2f} vs {l1['acc_after_ft']:.2f}, "
                       f"minority recall {b['minority_recall_after_ft']:.2f} vs {l1['minority_recall_after_ft']:.2f}.")
    return out


def _budget(row: dict) -> str:
    if row.get("widths_file"):
        return f"fixed widths {Path(row['widths_file']).name}"
    if row.get("latency_target_ms"):
        goal = f"speed-up {row['speedup_target']:g}x" if row.get("speedup_target") else f"latency {row['latency_target_ms']:.3f} ms"
        return goal + (f", x{row['round_to']}" if row.get("round_to") else "")
    return f"FLOPs {row['flops_target']:.2f}" + (f", x{row['aligned_to']}" if row.get("aligned_to") else "")


def _label(row: dict) -> str:
    """The method column: the method, and feature distillation when its fine-tuning used it."""
    return row["method"] + (f" + feature KD {row['distill_features']:g}" if row.get("distill_features") else "")


def _old_export(row: dict) -> bool:
    """The row's latency was measured on an export form older than EXPORT_FORM (not comparable with the others)."""
    return "p50_ms" in row and row.get("export_form") != EXPORT_FORM


def _runs_of(m: dict) -> str:
    """Which run(s) a model's rows come from (a --merge run keeps the other rows with their own run)."""
    runs = sorted({row["created"] for row in m.get("rows", []) if row.get("created")} or
                  ({m["created"]} if m.get("created") else set()))
    if len(runs) > 1:
        return f"; rows from {len(runs)} runs, {runs[0]} to {runs[-1]} (each row's run is in pruning.json)"
    return f"; rows from the run of {runs[0]}" if runs else ""


def markdown(r: dict) -> str:
    lines = ["# Pruning benchmark", "",
             f"Last run created {r['created']} on {r['host']['platform']} ({r['host']['cpus']} CPUs shared with other jobs; "
             f"load average at start {r['host']['load_avg_start']}, at end {r['host'].get('load_avg_end', '-')}). "
             + (f"This run: {r.get('seconds_total', 0) / 60:.1f} min. " if r["settings"].get("models") else
                "This run only merged the findings text; each model's rows name their own run. ")
             + "Command: `python benchmarks/pruning.py` with the settings in pruning.json (per model).", "",
             "Fine-tuning: KD from the dense model plus cross-entropy on the labels (alpha * KD + (1 - alpha) * CE; "
             "alpha, temperature T, lr and batch per model below) on cifar10_train20k_jpeg, "
             "SGD momentum 0.9, cosine lr to 0, flip/crop augmentation, starting from the BN-recalibrated pruned "
             "model; the 'FT ep' column gives the epochs. 'dense + FT': the unpruned model fine-tuned with exactly "
             "the same recipe and epochs (the reference of 'drop vs dense+FT'). 'clean': top-1 % on the "
             f"{r['data'].get('clean_images', 846)} lossless test images (cifar10_test_lossless846). 'acc before FT' is the raw pruned model (every method alike, no "
             "recalibration); 'BN recal.' re-estimates BatchNorm statistics on 1024 unlabeled training images. "
             "Accuracy: top-1 % on the JPEG CIFAR-10 test set; 'before' columns on the first "
             f"{r['data']['eval_before']} images, 'after FT' on {r['data']['eval_after']}; 'drop' is against the "
             "pretrained dense model (the issue's bar). Fine-tuning on JPEG training images also adapts the model to "
             "the JPEG test domain, which the pretrained dense model never saw; 'drop vs dense+FT' removes that gain. "
             "Latency: ONNX Runtime CPU p50, 1 thread, batch 1, fresh process; speed-up vs the dense export measured "
             "the same way; rows with latency rounds in pruning.json (`--latency-rounds N`) take it from N interleaved "
             "fresh-process profiles of the dense and the pruned export (median p50 of each side, both under the same "
             "load; the single reading is kept as speedup_single). Latency rows: per-group widths chosen greedily "
             f"from a measured per-layer latency table (multiples of the 'x' channel block) until the pruned model, measured by the allocator in its own "
             f"process, is the speed-up goal faster than the dense one (`--speedup-target`, the budget column); 'fixed "
             "widths' rows re-apply a stored allocation from benchmarks/allocations/ (`--widths`: the method's ranking "
             "picks the channels, nothing is measured while pruning); 'FT ep' epochs of fine-tuning."
             + (" † latency measured "
                "before exports took the option-A shortcut as a 0/1 1x1 conv (then Slice/Concat/Gather, which kept "
                "ONNX Runtime from fusing the residual adds): those rows' p50 and speed-up are not comparable with the "
                "unmarked rows (the change made the dense ResNet-20 about 6% and its -57% allocation about 8% faster)."
                if any(_old_export(row) for m in r["models"].values() for row in m["rows"]) else ""), "",
             "## Goals (checked automatically on the rows below)", "", *goal_check(r), ""]
    for arch, m in sorted(r["models"].items()):
        d, s = m["dense"], m.get("settings") or r["settings"]
        lines += [f"## {arch}: dense {d['acc']:.2f}% ({d.get('acc_before_set', 0):.2f}% on the 'before' subset"
                  + (f", {d['acc_clean']:.2f}% clean" if "acc_clean" in d else "") + "), "
                  f"{d['flops'] / 1e6:.1f} MFLOPs, {d['params'] / 1e3:.0f}k params"
                  + (f", p50 {d['p50_ms']:.3f} ms" if "p50_ms" in d else ""), "",
                  f"Fine-tuning lr {s['lr']}, alpha {s.get('distill_alpha', 0.9)} (KD weight), T {s.get('temperature', 4.0)}, "
                  f"batch {s.get('ft_batch', 128)}; polarization / FTWT train {s['train_steps']} steps before extraction"
                  + _runs_of(m) + "."
                  + "".join(f" Dense + FT ({ep} ep, same recipe): {ft['acc']:.2f}%"
                            + (f" ({ft['acc_clean']:.2f}% clean)" if "acc_clean" in ft else "") + "."
                            for ep, ft in sorted((d.get("ft") or {}).items())), "",
                  "| method | budget | FLOPs reduction | params | widths | acc before FT | BN recal. "
                  "| FT ep | acc after FT | drop | drop vs dense+FT | clean after FT | p50 ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in m["rows"]:
            ep = row.get("ft_epochs", "-")
            lines.append(f"| {_label(row)} | {_budget(row)} | {row['flops_reduction']:.1%} | "
                         f"{row['params'] / 1e3:.0f}k | {','.join(map(str, row.get('widths', [])))} | "
                         f"{row['acc_before_ft']:.2f} | {row['acc_before_ft_bn_recal']:.2f} | {ep} | "
                         f"{row['acc_after_ft']:.2f} | {row['drop_after_ft']:+.2f} | "
                         + (f"{row['drop_vs_dense_ft']:+.2f}" if "drop_vs_dense_ft" in row else "-") + " | "
                         + (f"{row['acc_clean_after_ft']:.2f}" if "acc_clean_after_ft" in row else "-")
                         + f" | {row.get('p50_ms', '-')} | {row.get('speedup', '-')}"
                         + (f" (paired x{row['latency_rounds']})" if row.get("latency_rounds") else "")
                         + (" †" if _old_export(row) else "") + " |")
        lines.append("")
    imb = r.get("imbalanced")
    if imb:
        d = imb["dense"]
        steps = imb["rows"][0].get("ft_steps", "-") if imb["rows"] else "-"
        lines += [f"## Imbalanced: ResNet-20, classes {imb['minority_classes']} at {imb['minority_fraction']:.0%} "
                  f"({imb['train_images']} training images), FLOPs kept {imb['flops_target']}",
                  "", f"Dense: {d['acc']:.2f}% overall, minority recall {d['minority_recall']:.2f}%. Ranking, BN "
                  f"recalibration and fine-tuning ({steps} steps) use the imbalanced subset only.", "",
                  "| method | FLOPs reduction | acc before FT | BN recal. | minority recall before | acc after FT "
                  "| minority recall after |",
                  "|---|---|---|---|---|---|---|"]
        for row in imb["rows"]:
            lines.append(f"| {row['method']} | {row['flops_reduction']:.1%} | {row['acc_before_ft']:.2f} | "
                         f"{row['acc_before_ft_bn_recal']:.2f} | {row['minority_recall_before_ft']:.2f} | {row['acc_after_ft']:.2f} | "
                         f"{row['minority_recall_after_ft']:.2f} |")
        lines.append("")
    for f in r.get("failures") or []:
        lines += [f"Failed: {f['model']} {f['method']} "
                  + (f"latency {f['latency_target_ms']:.3f} ms (x{f['round_to'] or 'auto'})" if f.get("latency_target_ms")
                     else f"FLOPs {f['flops_target']}") + f": {f['error']}", ""]
    notes = (r.get("notes") or "").strip()
    if notes:
        lines += ["## Findings", "", notes, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
