"""Low-rank factorization benchmark: SVD vs FWSVD on ResNet-20 (CIFAR-10) and all-MiniLM-L6-v2 (sentences).

    .venv/bin/python benchmarks/lowrank.py            # writes benchmarks/results/lowrank.json + lowrank.md

ResNet-20: the real akamaster checkpoint; accuracy on all 10 000 CIFAR-10 test images (JPEG copies, relative
comparisons) and on the 846 lossless ones (absolute); the FWSVD Fisher from 1000 labeled training images
(empirical Fisher, the paper's); the short recovery fine-tune distills from the original on a fixed subset of
the JPEG training images (compress.finetune, the one pruning uses).
MiniLM: the packaged all-MiniLM-L6-v2; quality = agreement with the original's sentence embeddings on the 400
`eval` sentences of compress.text's built-in corpus (mean cosine, and Spearman of the pairwise similarities);
the FWSVD Fisher is the true Fisher (labels drawn from the model's Gaussian output) on `calib` sentences.
No MiniLM fine-tune: compress.finetune trains classifiers (cross-entropy / logit distillation) and a sentence
encoder has no task here, so there is no recovery loss to run.
Latency: torch.onnx.export (opset 17, dynamo=False), ONNX Runtime CPU, batch 1, 1 intra-op thread,
warm-up, then rounds that alternate between the models (so load from other processes hits all alike); p50.
SVD and FWSVD at one rank ratio give the same graph (same layer shapes), so latency is measured per ratio.
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")

from compress.assets import data_path  # noqa: E402
from compress.data import load_dataset  # noqa: E402
from compress.io import zoo_model  # noqa: E402
from compress.lowrank import METHODS  # noqa: E402
from compress.lowrank.methods import FWSVD, recover  # noqa: E402
from compress.metrics import evaluate  # noqa: E402
from compress.progress import set_quiet  # noqa: E402
from compress.stages import Context, build_config  # noqa: E402
from compress.text import corpus_digest, embedding_agreement, encode, sentences_from_spec, tokenize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class CachedFWSVD(FWSVD):
    """FWSVD whose Fisher pass runs once per (source, samples, layers): every ratio factorizes the same original."""

    def __init__(self):
        self._cache: dict = {}

    def fisher(self, lm, layers, cfg, ctx):
        key = (cfg.fisher, cfg.fisher_samples, cfg.fisher_batch, tuple(layers))
        if key not in self._cache:
            self._cache[key] = super().fisher(lm, layers, cfg, ctx)
        return self._cache[key]


# ------------------------------------------------------------------------------------------- latency


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str) -> Path:
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), opset_version=17, dynamo=False, input_names=[input_name],
                          output_names=["output"])
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int, warmup: int, rounds: int,
                    per_round: int) -> dict[str, dict]:
    """p50/p90/mean (ms) per model; models alternate round by round so background load hits them alike."""
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(None, feed)
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)),
                "mean_ms": float(np.mean(v)), "n": len(v)} for k, v in samples.items()}


def onnx_parity(path: Path, model: torch.nn.Module, x: torch.Tensor, input_name: str) -> float:
    sess = ort_session(path, 1)
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(sess.run(None, {input_name: x.numpy()})[0] - ref).max())


def openvino_parity(path: Path, model: torch.nn.Module, x: torch.Tensor) -> float | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    # f32 explicitly: on CPUs with bf16 units OpenVINO otherwise picks bf16 and parity means nothing
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(compiled([x.numpy()])[0] - ref).max())


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


# ------------------------------------------------------------------------------------------- ResNet-20

LATENCY_PROBES = [
    ("channel split, ratio 0.25", {"ratio": 0.25}),
    ("spatial split (3x1 + 1x3), ratio 0.25", {"ratio": 0.25, "conv_split": "spatial"}),
    ("channel split, ratio 0.4, layer3 only (8x8 maps)", {"ratio": 0.4, "exclude": "layer1.*,layer2.*"}),
    ("channel split, ratio 0.4, layer1 only (32x32 maps)", {"ratio": 0.4, "exclude": "layer2.*,layer3.*"}),
]


def bench_resnet(args, tmp: Path, log) -> dict:
    lm = zoo_model("resnet20")
    train = f"cifar10:{data_path('cifar10_train20k_jpeg.npz')}"
    ft_ds = load_dataset(train).subset(args.ft_images, seed=0)
    ft_path = tmp / "ft_subset.npz"
    np.savez(ft_path, x=ft_ds.images, y=ft_ds.labels)
    # Fisher from the labeled training data (train role); fine-tuning on the fixed subset (same role, swapped in)
    ctx_fisher = Context(spec=lm.spec, data={"train": train}, seed=0)
    ctx_ft = Context(spec=lm.spec, data={"train": f"cifar10:{ft_path}"}, seed=0)
    tests = {"test_jpeg": load_dataset(f"cifar10:{data_path('cifar10_test_jpeg.npz')}"),
             "test_lossless846": load_dataset(f"cifar10:{data_path('cifar10_test_lossless846.npz')}")}
    if args.test_images:
        tests["test_jpeg"] = tests["test_jpeg"].subset(args.test_images, seed=0)
    norm = ctx_fisher.normalizer()

    def acc(model):
        return {k: round(evaluate(model, ds, norm), 2) for k, ds in tests.items()}

    methods = {"svd": METHODS.get("svd"), "fwsvd": CachedFWSVD()}
    rows, onnx_paths, structures = [], {}, {}
    t0 = time.perf_counter()
    base = {"model": "resnet20", "method": "original", "ratio": 1.0, "finetune": False, **acc(lm.model),
            "params": sum(p.numel() for p in lm.model.parameters()),
            "flops": None}
    from compress.metrics import count_flops

    base["flops"] = count_flops(lm.model, lm.spec.shape)
    rows.append(base)
    structures["1.0"] = lm.model
    log(f"resnet20 original: {base}")
    for ratio in args.resnet_ratios:
        for name, method in methods.items():
            opts = {"ratio": ratio}
            if name == "fwsvd":
                opts.update(fisher="labels", fisher_samples=args.fisher_images)
            cfg = build_config(method, opts)
            t1 = time.perf_counter()
            out = method.apply(copy.deepcopy(lm), cfg, ctx_fisher)
            h = out.history[-1]
            row = {"model": "resnet20", "method": name, "ratio": ratio, "finetune": False, **acc(out.model),
                   "params": h["params_after"], "flops": h["flops_after"], "layers": h["layers_factorized"],
                   "seconds": round(time.perf_counter() - t1, 1)}
            if "fisher" in h:
                row["fisher"] = h["fisher"]
            rows.append(row)
            log(f"resnet20 {name} {ratio}: {row}")
            structures.setdefault(str(ratio), out.model)
            if args.ft_epochs:
                t1 = time.perf_counter()
                ft_cfg = build_config(method, {**opts, "finetune_epochs": args.ft_epochs, "lr": args.ft_lr})
                model = copy.deepcopy(out.model)
                epochs = recover(model, ctx_ft, ft_cfg, teacher=copy.deepcopy(lm.model).eval())
                ft_row = {**row, "finetune": True, **acc(model), "seconds": round(time.perf_counter() - t1, 1),
                          "finetune_log": epochs}
                ft_row.pop("fisher", None)
                rows.append(ft_row)
                log(f"resnet20 {name} {ratio} +ft: {ft_row}")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    parity = {}
    for key, model in structures.items():
        onnx_paths[key] = export_onnx(model, x, tmp / f"resnet20_{key}.onnx", "input")
        parity[key] = {"ort_max_abs": onnx_parity(onnx_paths[key], model, x, "input"),
                       "openvino_max_abs": openvino_parity(onnx_paths[key], model, x),
                       "onnx_ops": onnx_ops(onnx_paths[key])}
    # latency only (no accuracy): where the FLOPs go vs where the time goes, for other splits and scopes
    probes = []
    for label, opts in LATENCY_PROBES:
        svd = METHODS.get("svd")
        out = svd.apply(copy.deepcopy(lm), build_config(svd, opts), ctx_fisher)
        key = f"probe:{label}"
        onnx_paths[key] = export_onnx(out.model, x, tmp / f"resnet20_probe{len(probes)}.onnx", "input")
        probes.append({"label": label, "options": opts, "flops": out.history[-1]["flops_after"],
                       "params": out.history[-1]["params_after"], "key": key})
    lat = measure_latency(onnx_paths, {"input": x.numpy()}, args.threads, args.warmup, args.rounds, args.per_round_resnet)
    for r in rows:
        r["latency"] = lat[str(r["ratio"])]
    for p in probes:
        p["latency"] = lat[p.pop("key")]
    return {"rows": rows, "latency_probes": probes, "export": parity, "seconds": round(time.perf_counter() - t0, 1),
            "data": {"fisher": f"{args.fisher_images} images of cifar10_train20k_jpeg (labels, empirical Fisher)",
                     "finetune": f"{args.ft_epochs} epoch(s) on {args.ft_images} images of cifar10_train20k_jpeg, "
                                 f"distillation from the original (T=4, alpha=0.9 with labels), SGD lr {args.ft_lr}",
                     "eval": {k: len(v) for k, v in tests.items()}}}


# ------------------------------------------------------------------------------------------- MiniLM


def bench_minilm(args, tmp: Path, log) -> dict:
    lm = zoo_model("minilm_l6")
    ev = sentences_from_spec("text:builtin:eval")
    ref = encode(lm.model, ev)
    ctx = Context(spec=lm.spec, data={"calib": "text:builtin:calib"}, seed=0)
    methods = {"svd": METHODS.get("svd"), "fwsvd": CachedFWSVD()}
    from compress.metrics import count_flops

    t0 = time.perf_counter()
    rows = [{"model": "minilm_l6", "method": "original", "ratio": 1.0, "finetune": False, "cosine_mean": 1.0,
             "cosine_min": 1.0, "spearman_pairwise": 1.0, "params": sum(p.numel() for p in lm.model.parameters()),
             "flops": count_flops(lm.model, lm.spec.shape)}]
    structures = {"1.0": lm.model}
    for ratio in args.minilm_ratios:
        for name, method in methods.items():
            opts = {"ratio": ratio}
            if name == "fwsvd":
                opts.update(fisher="model", fisher_samples=args.fisher_sentences, fisher_batch=32)
            t1 = time.perf_counter()
            out = method.apply(copy.deepcopy(lm), build_config(method, opts), ctx)
            h = out.history[-1]
            row = {"model": "minilm_l6", "method": name, "ratio": ratio, "finetune": False,
                   **{k: round(v, 4) for k, v in embedding_agreement(ref, encode(out.model, ev)).items()},
                   "params": h["params_after"], "flops": h["flops_after"], "layers": h["layers_factorized"],
                   "seconds": round(time.perf_counter() - t1, 1)}
            if "fisher" in h:
                row["fisher"] = h["fisher"]
            rows.append(row)
            log(f"minilm {name} {ratio}: {row}")
            structures.setdefault(str(ratio), out.model)
    ids, _ = tokenize([ev[0]], pad_to=lm.spec.shape[0])
    paths, parity = {}, {}
    for key, model in structures.items():
        paths[key] = export_onnx(model, ids, tmp / f"minilm_{key}.onnx", "input_ids")
        parity[key] = {"ort_max_abs": onnx_parity(paths[key], model, ids, "input_ids"),
                       "onnx_ops": onnx_ops(paths[key])}
    lat = measure_latency(paths, {"input_ids": ids.numpy()}, args.threads, max(3, args.warmup // 10), args.rounds,
                          args.per_round_minilm)
    for r in rows:
        r["latency"] = lat[str(r["ratio"])]
    return {"rows": rows, "export": parity, "seconds": round(time.perf_counter() - t0, 1),
            "data": {"eval_sentences": len(ev), "corpus_digest": corpus_digest(ev),
                     "fisher": f"{args.fisher_sentences} calib sentences, labels sampled from the model (true Fisher)",
                     "latency_input": f"one sentence padded to {lm.spec.shape[0]} tokens"}}


# ------------------------------------------------------------------------------------------- report


def _m(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def markdown(res: dict) -> str:
    env = res["environment"]
    out = ["# Low-rank factorization: SVD vs FWSVD", "",
           f"Generated by `benchmarks/lowrank.py` on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
           f"onnxruntime {env['onnxruntime']}; ORT latency: batch 1, {env['threads']} intra-op thread(s), "
           f"opset 17. Total run time {res['seconds']:.0f} s.", ""]
    if "resnet20" in res:
        r = res["resnet20"]
        out += ["## ResNet-20, CIFAR-10 (rank ratio r / min(N, M) on the 18 block convs; stem and head dense)", "",
                "| method | ratio | fine-tune | top-1 test JPEG | top-1 lossless 846 | params | FLOPs | ORT p50 ms |",
                "|---|---|---|---|---|---|---|---|"]
        base = r["rows"][0]
        for row in r["rows"]:
            out.append(f"| {row['method']} | {row['ratio']} | {'yes' if row['finetune'] else 'no'} | "
                       f"{row['test_jpeg']:.2f} | {row['test_lossless846']:.2f} | {_m(row['params'])} "
                       f"({row['params'] / base['params']:.0%}) | {_m(row['flops'])} ({row['flops'] / base['flops']:.0%}) | "
                       f"{row['latency']['p50_ms']:.3f} |")
        out += ["", f"Data: Fisher {r['data']['fisher']}; fine-tune {r['data']['finetune']}; "
                f"test images: {r['data']['eval']}.", ""]
        if r.get("latency_probes"):
            out += ["Latency probes (SVD weights, no accuracy measured: where FLOPs and time part ways):", "",
                    "| factorization | params | FLOPs | ORT p50 ms |", "|---|---|---|---|",
                    f"| original | {_m(base['params'])} | {_m(base['flops'])} | {base['latency']['p50_ms']:.3f} |"]
            for p in r["latency_probes"]:
                out.append(f"| {p['label']} | {_m(p['params'])} ({p['params'] / base['params']:.0%}) | "
                           f"{_m(p['flops'])} ({p['flops'] / base['flops']:.0%}) | {p['latency']['p50_ms']:.3f} |")
            out.append("")
    if "minilm" in res:
        r = res["minilm"]
        out += ["## all-MiniLM-L6-v2 (rank ratio on all 36 Linear layers of the 6 blocks; embeddings dense)", "",
                "| method | ratio | mean cosine to original | worst cosine | Spearman of pairwise sims | params | FLOPs | ORT p50 ms |",
                "|---|---|---|---|---|---|---|---|"]
        base = r["rows"][0]
        for row in r["rows"]:
            out.append(f"| {row['method']} | {row['ratio']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | "
                       f"{row['spearman_pairwise']:.4f} | {_m(row['params'])} ({row['params'] / base['params']:.0%}) | "
                       f"{row['flops'] / 1e9:.2f}G ({row['flops'] / base['flops']:.0%}) | {row['latency']['p50_ms']:.2f} |")
        out += ["", f"Data: {r['data']['eval_sentences']} eval sentences of the built-in corpus (digest "
                f"{r['data']['corpus_digest']}); Fisher: {r['data']['fisher']}; latency input: "
                f"{r['data']['latency_input']}. FLOPs at 128 tokens.", ""]
    out += ["## Goals (computed from this run)", ""] + [f"- {g}" for g in goals(res)] + [""]
    out += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    out += ["## Export", ""]
    for model in ("resnet20", "minilm"):
        if model in res:
            for key, p in res[model]["export"].items():
                ov = p.get("openvino_max_abs")
                out.append(f"- {model} ratio {key}: ORT max |Δ| vs torch {p['ort_max_abs']:.1e}"
                           + (f", OpenVINO {ov:.1e}" if ov is not None else "") + f"; ops: {', '.join(p['onnx_ops'])}")
    return "\n".join(out) + "\n"


NOTES = [
    "FWSVD (Hsu et al. 2022) is built for the regime of the MiniLM rows: transformer Linear layers, one global rank "
    "ratio, no fine-tuning. There it keeps the embeddings much closer to the original than SVD at every ratio, with "
    "the true Fisher (labels drawn from the model's own Gaussian output), i.e. without any labels.",
    "On ResNet-20's 3x3 convs FWSVD helps only at a mild ratio (0.8), is clearly worse than SVD at 0.6, and both "
    "collapse at 0.4, as in the research note's pilot (§4.5: +3.3 points at 0.8, a tie at 0.7, mixed below). After "
    "the short fine-tune the two are within noise at 0.8 and 0.6 (the paper also finds the gap shrinks with "
    "fine-tuning). The row weighting assumes the "
    "errors of different input features reach the loss independently, weighted by their diagonal Fisher; a conv's "
    "input features (c_in, kh, kw) are strongly correlated neighbouring pixels and their Fisher is concentrated on "
    "few rows, so at strong truncation the rows FWSVD gives up still carry signal to the output. The gap is the same "
    "with 1000 or 4000 Fisher images and with the true instead of the empirical Fisher (checked while writing this; "
    "not rerun here). A data-aware factorization that uses the input covariance (whitening) is the usual remedy and "
    "is not implemented.",
    "Budget allocation (rank_rule params|flops) uses each layer's relative truncated energy. Allocating with the "
    "absolute Fisher estimate of the loss increase (½ Σ F ΔW²) was tried and dropped: that second-order estimate "
    "sent whole ResNet-20 layers to rank 1 and lost about 30 points against the relative rule at the same FLOPs.",
    "Latency: at batch 1 ResNet-20 in ONNX Runtime is bound by per-layer overhead and memory traffic, not MACs. The "
    "channel split adds a second conv and an r-channel intermediate map per layer; on the 32x32 maps of layer1 that "
    "costs more time than the saved MACs, so a 32% FLOP cut is slower (the probe table: layer1-only factorization "
    "is slower, layer3-only and the spatial 3x1+1x3 split are faster). FLOPs are not latency here; MiniLM, "
    "whose time is in large MatMuls, turns its FLOP cut into a real speed-up.",
    "MiniLM has no fine-tune rows: compress.finetune trains classifiers (cross-entropy, logit distillation) and a "
    "sentence encoder has no task here. Recovery would need an embedding-distillation loss (PELA-style), not written.",
    "Latency numbers come from a 2-core machine shared with other jobs; models alternate in rounds so the load "
    "hits them alike, and p50 is reported. SVD and FWSVD at one ratio have identical graphs and share one number.",
]


def goals(res: dict) -> list[str]:
    """The two stated goals, checked against this run's numbers (no hand-written verdicts)."""
    lines = []
    for model, metric in (("resnet20", "test_jpeg"), ("minilm", "cosine_mean")):
        if model not in res:
            continue
        rows = [r for r in res[model]["rows"] if not r["finetune"] and r["method"] != "original"]
        for ratio in sorted({r["ratio"] for r in rows}, reverse=True):
            s = next(r for r in rows if r["ratio"] == ratio and r["method"] == "svd")
            f = next(r for r in rows if r["ratio"] == ratio and r["method"] == "fwsvd")
            d = f[metric] - s[metric]
            verdict = "FWSVD better" if d > 0 else "FWSVD WORSE"
            lines.append(f"{model} ratio {ratio}, no fine-tune: SVD {s[metric]:.4g} vs FWSVD {f[metric]:.4g} "
                         f"({metric}, Δ {d:+.4g}): {verdict}")
        ft = [r for r in res[model]["rows"] if r["finetune"]]
        for ratio in sorted({r["ratio"] for r in ft}, reverse=True):
            s = next(r for r in ft if r["ratio"] == ratio and r["method"] == "svd")
            f = next(r for r in ft if r["ratio"] == ratio and r["method"] == "fwsvd")
            lines.append(f"{model} ratio {ratio}, after fine-tune: SVD {s[metric]:.4g} vs FWSVD {f[metric]:.4g} "
                         f"(Δ {f[metric] - s[metric]:+.4g})")
        base = res[model]["rows"][0]
        seen = set()
        for r in res[model]["rows"][1:]:
            if r["ratio"] in seen:
                continue
            seen.add(r["ratio"])
            drop = 1 - r["flops"] / base["flops"]
            speed = base["latency"]["p50_ms"] / r["latency"]["p50_ms"]
            tag = "" if drop < 0.3 else (" — real latency reduction" if speed >= 1.10 else
                                         " — marginal latency reduction (<10%)" if speed > 1.0 else
                                         " — NO latency reduction")
            lines.append(f"{model} ratio {r['ratio']}: FLOPs −{drop:.0%}, ORT p50 {base['latency']['p50_ms']:.3g} → "
                         f"{r['latency']['p50_ms']:.3g} ms (×{speed:.2f}){tag}")
    return lines


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", choices=("resnet20", "minilm"))
    ap.add_argument("--resnet-ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--minilm-ratios", type=float, nargs="+", default=[0.45, 0.33, 0.2])
    ap.add_argument("--fisher-images", type=int, default=1000)
    ap.add_argument("--fisher-sentences", type=int, default=512)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-images", type=int, default=5000)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--test-images", type=int, default=5000, help="subset of the 10k JPEG test set (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round-resnet", type=int, default=100)
    ap.add_argument("--per-round-minilm", type=int, default=20)
    ap.add_argument("--render-only", action="store_true", help="rewrite lowrank.md from an existing lowrank.json")
    args = ap.parse_args()
    if args.render_only:
        res = json.loads((args.out / "lowrank.json").read_text())
        (args.out / "lowrank.md").write_text(markdown(res))
        print(markdown(res))
        return
    torch.manual_seed(0)
    set_quiet(True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    import onnxruntime

    res: dict = {"schema": "compress.bench.lowrank/1", "args": {k: v if not isinstance(v, Path) else str(v)
                                                                for k, v in vars(args).items()},
                 "environment": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "onnxruntime": onnxruntime.__version__, "threads": args.threads,
                                 "torch_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "resnet20"):
            res["resnet20"] = bench_resnet(args, Path(d), log)
        if args.only in (None, "minilm"):
            res["minilm"] = bench_minilm(args, Path(d), log)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank.json").write_text(json.dumps(res, indent=2))
    (args.out / "lowrank.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
