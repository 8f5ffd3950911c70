"""INT8 on ONNX Runtime CPU, ResNet-20 (CIFAR-10): FP32 vs our W8A8 min-max QDQ vs ORT's quantize_static.

One run does everything: quantize (both tools calibrate on the same images of cifar10_calib1000_jpeg),
export, ask ORT which ops run as integer kernels, top-1 through ORT on two test sets, and batch-1 latency
with the models interleaved (every round times each model in turn, so load drift hits all of them alike).

    .venv/bin/python benchmarks/quantization_int8.py [--threads 1] [--rounds 200] [--per-round 20]

Writes benchmarks/results/quantization_int8.{json,md} (or into --out-dir). Bar: ours >= 2.5x faster than FP32 (p50) with
<= 0.3 pt top-1 drop on cifar10_test_lossless846.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.assets import data_path  # noqa: E402
from compress.data import Dataset, load_dataset  # noqa: E402
from compress.io import zoo_model  # noqa: E402
from compress.metrics import top1  # noqa: E402
from compress.progress import track  # noqa: E402
from compress.quantize import METHODS  # noqa: E402
from compress.stages import Context, build_config  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from devices.profile import cpu_model  # noqa: E402
from exporters.qdq import integer_kernel_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CALIB = "cifar10_calib1000_jpeg.npz"
TEST_SETS = ("cifar10_test_lossless846.npz", "cifar10_test_jpeg.npz")
BAR = {"speedup": 2.5, "max_drop_pt": 0.3, "on": "cifar10_test_lossless846"}


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_quantize_static(fp32: Path, out: Path, calib_x: np.ndarray) -> None:
    """onnxruntime.quantization as its docs suggest: pre-process, then static QDQ, per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib_x[i:i + 1]} for i in range(len(calib_x))])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name("ort_pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def accuracy(sess: ort.InferenceSession, ds: Dataset, norm, what: str) -> float:
    logits = []
    for i in track(range(0, len(ds), 250), what, total=(len(ds) + 249) // 250):
        logits.append(sess.run(None, {"input": norm(ds.images[i:i + 250]).numpy()})[0])
    return top1(np.concatenate(logits), ds.labels)


def latency(paths: dict[str, Path], threads: int, rounds: int, per_round: int, warmup: int, batch: int = 1) -> dict:
    """Interleaved timing: each round runs every model `per_round` times, in a rotating order."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sessions = {name: session(p, threads) for name, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"input": x})
    samples = {name: [] for name in sessions}
    round_p50 = {name: [] for name in sessions}
    names = list(sessions)
    for r in track(range(rounds), "latency", total=rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            s, times = sessions[name], []
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                s.run(None, {"input": x})
                times.append((time.perf_counter_ns() - t0) / 1e6)
            samples[name] += times
            round_p50[name].append(float(np.median(times)))
    out = {}
    for name, t in samples.items():
        a = np.asarray(t)
        boot = np.random.default_rng(1).choice(a, (1000, len(a))).astype(np.float32)
        ci = np.percentile(np.median(boot, axis=1), [2.5, 97.5])
        out[name] = {"n": len(a), "p50_ms": float(np.median(a)), "p50_ci95_ms": [float(ci[0]), float(ci[1])],
                     "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
                     "mean_ms": float(a.mean()), "std_ms": float(a.std()), "min_ms": float(a.min())}
    base = np.asarray(round_p50[names[0]])
    for name in names[1:]:
        ratios = base / np.asarray(round_p50[name])  # paired by round: robust to load changing over the run
        out[name]["speedup_p50"] = out[names[0]]["p50_ms"] / out[name]["p50_ms"]
        out[name]["speedup_per_round"] = {"median": float(np.median(ratios)),
                                          "p10": float(np.percentile(ratios, 10)),
                                          "p90": float(np.percentile(ratios, 90))}
    return out


def kernel_profile(path: Path, threads: int, runs: int = 300) -> dict:
    """ORT's own per-node kernel times (10th percentile over runs, robust to preemption), summed by op type."""
    s = session(path, threads, profile=True)
    x = np.zeros((1, 3, 32, 32), np.float32)
    for _ in range(runs):
        s.run(None, {"input": x})
    trace = Path(s.end_profiling())
    per_node, op_of = collections.defaultdict(list), {}
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
    trace.unlink()
    by_op: dict[str, float] = collections.defaultdict(float)
    for node, durs in per_node.items():
        by_op[op_of[node]] += float(np.percentile(durs, 10))
    convs = [[n.removesuffix("_kernel_time"), round(float(np.percentile(d, 10)), 1)]
             for n, d in per_node.items() if "Conv" in op_of[n]]
    return {"total_us": round(sum(by_op.values()), 1),
            "by_op_us": {k: round(v, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "conv_us_in_order": convs}


def conv_macs(model: torch.nn.Module, spec) -> list[int]:
    """Multiply-accumulates of each Conv2d at batch 1, in execution order (the FP32 graph's conv order)."""
    macs, hooks = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, _i, out: macs.append(
                out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])))
    with torch.no_grad():
        model.eval()(spec.example(batch=1))
    for h in hooks:
        h.remove()
    return macs


def gemm_ceiling(threads: int, n: int = 512, runs: int = 30) -> dict:
    """What MLAS itself reaches on this CPU: one n^3 MatMul in FP32 vs u8 x s8 MatMulInteger (GMAC/s)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graphs = {
        "fp32": (helper.make_node("MatMul", ["x", "W"], ["y"]), TensorProto.FLOAT, TensorProto.FLOAT,
                 rng.standard_normal((n, n)).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)),
        "int8": (helper.make_node("MatMulInteger", ["x", "W"], ["y"]), TensorProto.UINT8, TensorProto.INT32,
                 rng.integers(-127, 128, (n, n)).astype(np.int8), rng.integers(0, 256, (n, n)).astype(np.uint8)),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (node, tin, tout, w, x) in graphs.items():
            g = helper.make_graph([node], name, [helper.make_tensor_value_info("x", tin, [n, n])],
                                  [helper.make_tensor_value_info("y", tout, [n, n])], [numpy_helper.from_array(w, "W")])
            path = Path(tmp) / f"{name}.onnx"
            # IR 8 explicitly: a newer onnx writes its own default, which older ORTs refuse (ORT 1.30: IR 14 > 13)
            path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString())
            s = session(path, threads)
            for _ in range(5):
                s.run(None, {"x": x})
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            out[f"{name}_gmacs"] = round(n ** 3 / float(np.median(times)) / 1e9, 1)
    out["ratio"] = round(out["int8_gmacs"] / out["fp32_gmacs"], 2)
    return out


def environment(threads: int) -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "amx_int8": "amx_int8" in flags,
            "onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "intra_op_threads": threads, "inter_op_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL",
            "loadavg_start": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (fixed for every model)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batches", default="8,32", help="extra batch sizes for the sweep (the bar is at batch 1)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false",
                    help="skip the variants tried for the bar (asymmetric / per-tensor weights, static batch, 2 threads)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS,
                    help="where quantization_int8.{json,md} go (another CPU's run beside the committed one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = environment(args.threads)

    lm = zoo_model("resnet20")
    ctx = Context(lm.spec, data={"calib": str(data_path(CALIB))}, seed=0)
    method = METHODS.get("minmax")
    cfg = build_config(method, {})
    norm = ctx.normalizer()
    calib = ctx.dataset("calib").subset(cfg.calib_size, ctx.seed)  # the very images minmax calibrates on
    tests = {Path(t).stem: load_dataset(str(data_path(t))) for t in TEST_SETS}
    parity_x = norm(tests["cifar10_test_lossless846"].images[:64])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"fp32": tmp / "fp32.onnx", "int8_ours": tmp / "int8_minmax.onnx", "int8_ort": tmp / "int8_ort.onnx"}
        t0 = time.perf_counter()
        art_fp32 = export_onnx(lm.model, lm.spec, paths["fp32"], "fp32", parity_x)
        qlm = method.apply(lm, cfg, ctx)
        art_ours = export_onnx(qlm.model, qlm.spec, paths["int8_ours"], "int8", parity_x)
        ort_quantize_static(paths["fp32"], paths["int8_ort"], norm(calib.images).numpy())
        build_s = time.perf_counter() - t0

        models = {}
        for name, path in paths.items():
            sess = session(path, threads=os.cpu_count() or 1)
            models[name] = {
                "file_bytes": path.stat().st_size,
                "top1": {t: accuracy(sess, ds, norm, f"{name} on {t}") for t, ds in tests.items()},
                "ort_graph": integer_kernel_report(path, threads=args.threads),
                "kernel_profile": kernel_profile(path, args.threads),
            }
        models["int8_ours"]["parity_vs_torch"] = art_ours.parity
        models["fp32"]["parity_vs_torch"] = art_fp32.parity
        lat = latency(paths, args.threads, args.rounds, args.per_round, args.warmup)
        for name in models:
            models[name]["latency_b1"] = lat[name]
        sweep = {}
        for b in [int(v) for v in args.batches.split(",") if v]:
            lat_b = latency(paths, args.threads, max(10, args.rounds // 4), max(5, args.per_round // 4), 20, batch=b)
            sweep[b] = {name: {"p50_ms": v["p50_ms"], "p50_ms_per_image": v["p50_ms"] / b,
                               "speedup_p50": v.get("speedup_p50", 1.0)} for name, v in lat_b.items()}

        ablations = []
        if args.ablations:
            # what else was tried for the bar, each timed interleaved against FP32 like the main rows
            variants = {"asymmetric weights (u8 x u8 kernels)": {"symmetric_weights": False},
                        "per-tensor weight scales": {"per_channel": False}}
            for what, over in variants.items():
                vpath = tmp / f"int8_{len(ablations)}.onnx"
                vlm = method.apply(lm, build_config(method, over), ctx)
                export_onnx(vlm.model, vlm.spec, vpath, "int8", parity_x)
                lat_v = latency({"fp32": paths["fp32"], "v": vpath}, args.threads, 40, 10, 50)
                ablations.append({"variant": what, "speedup_p50": round(lat_v["v"]["speedup_p50"], 2)})
            # what `compress export --batch 1` ships: both models exported with a fixed batch of 1
            static = {name: export_onnx(m.model, replace(m.spec, batch=1), tmp / f"{name}_b1.onnx", prec, parity_x).path
                      for name, m, prec in (("fp32", lm, "fp32"), ("v", qlm, "int8"))}
            lat_s = latency({k: Path(v) for k, v in static.items()}, args.threads, 40, 10, 50)
            ablations.append({"variant": "static batch 1 for both models", "speedup_p50": round(lat_s["v"]["speedup_p50"], 2)})
            lat_t = latency({"fp32": paths["fp32"], "v": paths["int8_ours"]}, 2, 40, 10, 50)
            ablations.append({"variant": "2 intra-op threads for both models", "speedup_p50": round(lat_t["v"]["speedup_p50"], 2),
                              "fp32_p50_ms": round(lat_t["fp32"]["p50_ms"], 3)})
        ceiling = gemm_ceiling(args.threads)
        macs = conv_macs(lm.model, lm.spec)

    env["loadavg_end"] = list(os.getloadavg())
    fp = models["fp32"]["top1"][BAR["on"]]
    for name, m in models.items():
        m["top1_drop_pt"] = {t: round(fp_t - m["top1"][t], 2) for t, fp_t in models["fp32"]["top1"].items()}
    ours = models["int8_ours"]
    verdict = {"speedup_p50": round(ours["latency_b1"]["speedup_p50"], 2),
               "drop_pt": round(fp - ours["top1"][BAR["on"]], 2)}
    verdict["speed_ok"] = verdict["speedup_p50"] >= BAR["speedup"]
    verdict["accuracy_ok"] = verdict["drop_pt"] <= BAR["max_drop_pt"]
    verdict["pass"] = verdict["speed_ok"] and verdict["accuracy_ok"]

    result = {"schema": "compress.bench/1", "benchmark": "quantization_int8", "model": "resnet20 (akamaster)",
              "calibration": {"source": CALIB, "images": len(calib), "fingerprint": calib.fingerprint(),
                              "ours": qlm.history[-1]["config"], "ort": "quantize_static QDQ per_channel=True "
                              "QUInt8 activations, QInt8 weights, MinMax calibration, quant_pre_process"},
              "latency_protocol": {"batch": 1, "warmup": args.warmup, "rounds": args.rounds,
                                   "per_round": args.per_round, "interleaved": True},
              "batch_sweep": sweep, "ablations": ablations, "gemm_ceiling": ceiling, "fp32_conv_macs": macs,
              "bar": BAR, "verdict": verdict, "environment": env, "build_seconds": round(build_s, 1),
              "models": models}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quantization_int8.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "quantization_int8.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m, env, v = r["models"], r["environment"], r["verdict"]
    label = {"fp32": "FP32", "int8_ours": "INT8 ours (minmax W8A8)", "int8_ort": "INT8 ORT quantize_static"}
    lines = [
        "# INT8 on ONNX Runtime CPU: ResNet-20 / CIFAR-10",
        "",
        f"{env['cpu']}, {env['cores']} cores, AVX-512 VNNI: {env['avx512_vnni']}"
        + (f", AMX-INT8: {env['amx_int8']}" if "amx_int8" in env else "") + f"; onnxruntime "
        f"{env['onnxruntime']}, {env['intra_op_threads']} intra-op thread, ORT_ENABLE_ALL; batch 1, "
        f"{r['latency_protocol']['rounds']} interleaved rounds x {r['latency_protocol']['per_round']} runs per model "
        f"after {r['latency_protocol']['warmup']} warm-up runs; load average {env['loadavg_start'][0]:.1f} -> "
        f"{env['loadavg_end'][0]:.1f}. Calibration: the same {r['calibration']['images']} images of "
        f"{r['calibration']['source']} for both INT8 models.",
        "",
        "| model | top-1 lossless846 | top-1 test_jpeg (10k) | p50 ms [95% CI] | p90 ms | speedup p50 | integer kernels (ORT optimized graph) | size KB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in m.items():
        lat = x["latency_b1"]
        speed = f"{lat['speedup_p50']:.2f}x" if "speedup_p50" in lat else "1.00x"
        lines.append(f"| {label[name]} | {x['top1']['cifar10_test_lossless846']:.2f} | {x['top1']['cifar10_test_jpeg']:.2f} | "
                     f"{lat['p50_ms']:.3f} [{lat['p50_ci95_ms'][0]:.3f}, {lat['p50_ci95_ms'][1]:.3f}] | {lat['p90_ms']:.3f} | "
                     f"{speed} | {x['ort_graph']['summary']} | {x['file_bytes'] / 1024:.0f} |")
    k = {name: x["kernel_profile"] for name, x in m.items()}
    lines += [
        "",
        f"**Bar** (ours >= {r['bar']['speedup']}x faster than FP32 at p50, <= {r['bar']['max_drop_pt']} pt drop on "
        f"lossless846): speedup {v['speedup_p50']}x ({'met' if v['speed_ok'] else 'MISSED'}), drop {v['drop_pt']} pt "
        f"({'met' if v['accuracy_ok'] else 'MISSED'}).",
        "",
        "ORT kernel time per inference (its profiler, 10th percentile per node, summed; profiling adds overhead):",
        "",
        "| model | total us | by op |",
        "|---|---|---|",
    ]
    for name, p in k.items():
        ops = ", ".join(f"{op} {us:.0f}" for op, us in list(p["by_op_us"].items())[:6])
        lines.append(f"| {label[name]} | {p['total_us']:.0f} | {ops} |")
    lines += ["", "Conv kernels in execution order (us; every graph runs the two option-A shortcuts as 1x1 selection "
              "convs, the small entries where layer2 and layer3 begin):", ""]
    for name, p in k.items():
        lines.append(f"- {label[name]}: {', '.join(f'{us:.0f}' for _, us in p['conv_us_in_order'])}")
    if r.get("batch_sweep"):
        lines += ["", "Batch sweep (same protocol, fewer rounds; the bar above is at batch 1):", "",
                  "| batch | " + " | ".join(f"{label[n]} ms/image" for n in r["models"]) + " | speedup ours | speedup ORT |",
                  "|---|" + "---|" * (len(r["models"]) + 2)]
        for b, row in r["batch_sweep"].items():
            lines.append(f"| {b} | " + " | ".join(f"{row[n]['p50_ms_per_image']:.4f}" for n in r["models"]) +
                         f" | {row['int8_ours']['speedup_p50']:.2f}x | {row['int8_ort']['speedup_p50']:.2f}x |")
    if r.get("ablations"):
        lines += ["", "Variants tried for the bar (each timed interleaved against FP32; ours as shipped is the first row above):",
                  "", "| variant | speedup p50 vs FP32 |", "|---|---|"]
        fp1 = m["fp32"]["latency_b1"]["p50_ms"]
        for a in r["ablations"]:
            note = ""
            if "fp32_p50_ms" in a:  # a ratio of two slower runs is no win: say how FP32 itself fared
                note = (f" (FP32 itself {a['fp32_p50_ms']:.3f} ms vs {fp1:.3f} ms at 1 thread"
                        + ("; 2-thread timings on a shared 2-vCPU machine swing with other processes)"
                           if env["cores"] <= 2 else ")"))
            lines.append(f"| {a['variant']} | {a['speedup_p50']:.2f}x{note} |")
    lines += ["", "## Findings", ""] + findings(r)
    return "\n".join(lines) + "\n"


def findings(r: dict) -> list[str]:
    """What the kernel profile says about the speedup (ResNet-20 layout: stem, 6 convs per stage)."""
    fp, ours = r["models"]["fp32"]["kernel_profile"], r["models"]["int8_ours"]["kernel_profile"]
    # the 19 convs of the network; both exports also run the two option-A shortcuts as 1x1 convs (compress.exportable)
    f = [us for name, us in fp["conv_us_in_order"] if "shortcut" not in name]
    o = [us for name, us in ours["conv_us_in_order"] if "shortcut" not in name]
    all_f = [us for _, us in fp["conv_us_in_order"]]
    all_o = [us for _, us in ours["conv_us_in_order"]]
    static_ops = r["models"]["int8_ort"]["kernel_profile"]["by_op_us"]
    stage = lambda xs, a, b: sum(xs[a:b])  # noqa: E731
    adds = ours["by_op_us"].get("QLinearAdd", 0.0)
    extra = []
    if r.get("fp32_conv_macs") and r.get("gemm_ceiling"):
        mac, c = r["fp32_conv_macs"], r["gemm_ceiling"]
        rate = lambda xs, a, b: sum(mac[a:b]) / sum(xs[a:b]) / 1e3  # noqa: E731 - MACs per us -> GMAC/s
        extra = [
            f"- Kernel ceiling on this CPU (MLAS, one 512^3 MatMul): FP32 {c['fp32_gmacs']} GMAC/s, u8 x s8 "
            f"{c['int8_gmacs']} GMAC/s ({c['ratio']}x). The convs reach, FP32 vs INT8 (GMAC/s): layer1 "
            f"{rate(f, 1, 7):.0f} vs {rate(o, 1, 7):.0f}, layer2 {rate(f, 7, 13):.0f} vs {rate(o, 7, 13):.0f}, layer3 "
            f"{rate(f, 13, 19):.0f} vs {rate(o, 13, 19):.0f}, stem {rate(f, 0, 1):.0f} vs {rate(o, 0, 1):.0f}: FP32 runs "
            "near its ceiling everywhere, INT8 reaches it only where channels are wide, so the end-to-end ratio is "
            "set by the 16-channel layer1 and the stem, which are what ResNet-20 spends most of its time on.",
        ]
    return [
        f"- ORT runs our graph as integer kernels end to end: {r['models']['int8_ours']['ort_graph']['summary']}.",
        f"- All conv kernels: FP32 {sum(all_f):.0f} us vs INT8 {sum(all_o):.0f} us (incl. the two shortcut convs, "
        f"{sum(all_f) - sum(f):.0f} vs {sum(all_o) - sum(o):.0f} us): {sum(all_f) / sum(all_o):.2f}x. By stage: stem {f[0]:.0f} vs {o[0]:.0f} us; "
        f"16-channel layer1 {stage(f, 1, 7):.0f} vs {stage(o, 1, 7):.0f} us ({stage(f, 1, 7) / stage(o, 1, 7):.2f}x); "
        f"32-channel layer2 {stage(f, 7, 13):.0f} vs {stage(o, 7, 13):.0f} us ({stage(f, 7, 13) / stage(o, 7, 13):.2f}x); "
        f"64-channel layer3 {stage(f, 13, 19):.0f} vs {stage(o, 13, 19):.0f} us ({stage(f, 13, 19) / stage(o, 13, 19):.2f}x).",
        "- The narrow layers are where INT8 gains least: MLAS's AVX-512 VNNI symmetric int8 conv computes 64 output "
        "channels x 6 pixels per kernel call, so 16- and 32-channel convs leave lanes idle, while FP32 runs the "
        "well-tuned NCHWc kernels.",
        f"- The 9 residual adds cost {adds:.0f} us as QLinearAdd; FP32 fuses add + ReLU into its convs"
        + (" (the FP32 export keeps the residual stream in ORT's NCHWc layout: the option-A shortcut is an exact 1x1 "
           "selection conv, compress.exportable)." if not {"Add", "Slice"} & set(fp["by_op_us"]) else "."),
        ("- ORT's own quantize_static leaves the option-A shortcut as Slice/Concat/Gather and pays transposes "
         "around it; our export turns the shortcut into an exact 1x1 selection conv." if "Slice" in static_ops else
         "- ORT's quantize_static gets the FP32 export, whose option-A shortcut is already the exact 1x1 selection "
         "conv, so both INT8 graphs run it as a QLinearConv."),
    ] + extra


if __name__ == "__main__":
    main()
