"""Does our profiler agree with the runtimes' own tools? One run, the same artifacts, tools alternated.

    .venv/bin/python benchmarks/profiler.py [--rounds 7] [--iterations 1000] [--cpu 1]

Artifacts: ResNet-20 FP32, exported by the project's own exporters (exporters.EXPORTERS: ONNX, OpenVINO IR).
Tools, all single-threaded, one request at a time, pinned to the same CPU, batch 1:

    ours/onnxruntime   devices.local (fresh-process agent)            on the .onnx
    ort-python-loop    a plain onnxruntime loop written here, perf_counter_ns around InferenceSession.run,
                       in its own process (independent of runtimes/ and devices/)
    ours/openvino      devices.local                                   on the .xml
    ov-python-loop     a plain OpenVINO loop written here: set_input_tensor(shared) + infer() + output copy,
                       perf_counter_ns around it, own process, the same compile config
    benchmark_app      OpenVINO's own tool from the openvino wheel     on the .xml
                       (-hint latency -api sync -niter N -data_shape [1,3,32,32], and -load_config with the CPU
                       properties runtimes/openvino.py uses: NUM_STREAMS 1, INFERENCE_NUM_THREADS 1,
                       INFERENCE_PRECISION_HINT f32)
    benchmark_app-static   the same with -shape (the model reshaped to a static batch of 1): for information

Every round runs every tool once, in an order rotated each round (so drift and other tenants' load spread
over all tools); per tool the report gives the median of the per-round medians and the spread across rounds,
and the relative difference of our profiler against the reference tool for the same runtime. onnxruntime_perf_test
is not in the onnxruntime wheel or Debian's packages, so it is not in the comparison.

Writes benchmarks/results/profiler.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from devices.profile import cpu_model  # noqa: E402

ORT_LOOP = r"""
import os, sys, time, json
import numpy as np
import onnxruntime as ort
path, warmup, iterations, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.sched_setaffinity(0, [cpu])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
for _ in range(warmup + 1):
    sess.run(None, {name: x})
t = []
for _ in range(iterations):
    t0 = time.perf_counter_ns()
    sess.run(None, {name: x})
    t.append((time.perf_counter_ns() - t0) / 1e6)
t.sort()
print(json.dumps({"median_ms": t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2,
                  "mean_ms": sum(t) / len(t), "n": len(t)}))
"""


OV_LOOP = r"""
import os, sys, time, json
import numpy as np
import openvino as ov
path, warmup, iterations, cpu, config = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.sched_setaffinity(0, [cpu])
core = ov.Core()
compiled = core.compile_model(core.read_model(path), "CPU", json.loads(config))
request = compiled.create_infer_request()
x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
def run():
    request.set_input_tensor(ov.Tensor(x, shared_memory=True))
    request.infer()
    return request.get_output_tensor(0).data.copy()
for _ in range(warmup + 1):
    run()
t = []
for _ in range(iterations):
    t0 = time.perf_counter_ns()
    run()
    t.append((time.perf_counter_ns() - t0) / 1e6)
t.sort()
print(json.dumps({"median_ms": t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2,
                  "mean_ms": sum(t) / len(t), "n": len(t)}))
"""


def export_artifacts(out: Path) -> tuple[Path, Path]:
    from compress.io import zoo_model
    from exporters import EXPORTERS

    lm = zoo_model("resnet20")
    onnx = EXPORTERS.get("onnx")(lm.model, lm.spec, out / "resnet20.onnx", "fp32")
    ir = EXPORTERS.get("openvino")(lm.model, lm.spec, out / "resnet20.xml", "fp32")
    return Path(onnx.path), Path(ir.path)


def ours(path: Path, runtime: str, warmup: int, iterations: int, cpu: int) -> dict:
    from devices import DEVICES

    p = DEVICES.get("local")().run_profile(path, runtime, {"threads": 1, "warmup": warmup, "iterations": iterations,
                                                           "cpus": [cpu]})
    return {"median_ms": p["latency_ms"]["p50"], "mean_ms": p["latency_ms"]["mean"], "n": p["latency_ms"]["n"]}


def ort_loop(path: Path, warmup: int, iterations: int, cpu: int) -> dict:
    out = subprocess.run([sys.executable, "-c", ORT_LOOP, str(path), str(warmup), str(iterations), str(cpu)],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ov_loop(path: Path, warmup: int, iterations: int, cpu: int) -> dict:
    out = subprocess.run([sys.executable, "-c", OV_LOOP, str(path), str(warmup), str(iterations), str(cpu),
                          json.dumps(OV_CONFIG)], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark_app_cmd(xml: Path, iterations: int, cpu: int, static: bool = False) -> list[str]:
    exe = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    base = [exe] if exe else [sys.executable, "-m", "openvino.tools.benchmark.main"]
    # benchmark_app refuses -nstreams/-nthreads next to -hint ("fine tune options"); -load_config sets them, the
    # same CPU properties runtimes/openvino.py compiles with
    cfg = Path(tempfile.gettempdir()) / "bench-profiler-ov-config.json"
    cfg.write_text(json.dumps({"CPU": OV_CONFIG}))
    return ["taskset", "-c", str(cpu), *base, "-m", str(xml), "-d", "CPU", "-hint", "latency", "-load_config", str(cfg),
            "-api", "sync", "-shape" if static else "-data_shape", "[1,3,32,32]", "-niter", str(iterations)]


OV_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "1",
             "INFERENCE_PRECISION_HINT": "f32"}


def benchmark_app(xml: Path, iterations: int, cpu: int, static: bool = False) -> dict:
    proc = subprocess.run(benchmark_app_cmd(xml, iterations, cpu, static), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark_app failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return parse_benchmark_app(proc.stdout)


def parse_benchmark_app(text: str) -> dict:
    """benchmark_app's summary block: 'Count: N iterations', 'Median: x ms' (or us), 'Average: x ms'."""
    def grab(label: str) -> float:
        m = re.search(rf"^\[ INFO \]\s+{label}:\s+([\d.]+)\s*(ms|us|s|iterations)?", text, re.M)
        if not m:
            raise RuntimeError(f"benchmark_app output has no {label!r} line")
        return float(m.group(1)) * {"us": 1e-3, "s": 1e3}.get(m.group(2) or "", 1.0)

    return {"median_ms": grab("Median"), "mean_ms": grab("Average"), "n": int(grab("Count"))}


TOOLS = {
    "ours/onnxruntime": lambda a, w, n, c: ours(a["onnx"], "onnxruntime", w, n, c),
    "ort-python-loop": lambda a, w, n, c: ort_loop(a["onnx"], w, n, c),
    "ours/openvino": lambda a, w, n, c: ours(a["xml"], "openvino", w, n, c),
    "ov-python-loop": lambda a, w, n, c: ov_loop(a["xml"], w, n, c),
    "benchmark_app": lambda a, w, n, c: benchmark_app(a["xml"], n, c),
    "benchmark_app-static": lambda a, w, n, c: benchmark_app(a["xml"], n, c, static=True),
}
PAIRS = [("ours/onnxruntime", "ort-python-loop", "onnxruntime"), ("ours/openvino", "benchmark_app", "openvino"),
         ("ours/openvino", "ov-python-loop", "openvino"), ("ov-python-loop", "benchmark_app", "openvino")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cpu", type=int, default=1, help="the CPU every tool is pinned to")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        onnx, xml = export_artifacts(Path(tmp))
        arts = {"onnx": onnx, "xml": xml}
        names = list(TOOLS)
        per_round: dict[str, list[dict]] = {k: [] for k in names}
        orders = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            orders.append(order)
            for name in order:
                res = TOOLS[name](arts, args.warmup, args.iterations, args.cpu)
                res["load_avg_1m"] = os.getloadavg()[0]
                per_round[name].append(res)
                print(f"round {r + 1}/{args.rounds} {name:18s} median {res['median_ms']:.4f} ms", flush=True)
        import openvino
        import onnxruntime

        versions = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}

    summary = {}
    for name in names:
        med = [r["median_ms"] for r in per_round[name]]
        summary[name] = {"median_of_round_medians_ms": statistics.median(med), "min_round_ms": min(med),
                         "max_round_ms": max(med), "round_medians_ms": med}
    comparisons = []
    for ours_name, ref_name, runtime in PAIRS:
        a, b = summary[ours_name]["median_of_round_medians_ms"], summary[ref_name]["median_of_round_medians_ms"]
        paired = [x["median_ms"] / y["median_ms"] - 1 for x, y in zip(per_round[ours_name], per_round[ref_name])]
        comparisons.append({"runtime": runtime, "ours": ours_name, "reference": ref_name, "ours_ms": a, "reference_ms": b,
                            "relative_difference": a / b - 1, "paired_round_differences": paired,
                            "median_paired_difference": statistics.median(paired),
                            "within_5_percent": abs(a / b - 1) <= 0.05})
    result = {
        "benchmark": "profiler agreement", "model": "resnet20 fp32 (CIFAR-10, 1x3x32x32)",
        "rounds": args.rounds, "iterations_per_run": args.iterations, "warmup": args.warmup, "threads": 1,
        "pinned_cpu": args.cpu, "orders": orders, "versions": versions,
        "benchmark_app_command": " ".join(benchmark_app_cmd(Path("resnet20.xml"), args.iterations, args.cpu)[3:]),
        "benchmark_app_static_command": " ".join(benchmark_app_cmd(Path("resnet20.xml"), args.iterations, args.cpu,
                                                                   static=True)[3:]),
        "benchmark_app_config": {"CPU": OV_CONFIG},
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "note": "shared 2-core machine: other tenants' load is recorded per run (load_avg_1m)"},
        "per_round": per_round, "summary": summary, "comparisons": comparisons,
        "wall_s": round(time.time() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profiler.json").write_text(json.dumps(result, indent=1))
    (args.out / "profiler.md").write_text(render_md(result))
    print(render_md(result))
    return 0


def render_md(r: dict) -> str:
    lines = [f"# Profiler agreement: ResNet-20 FP32, batch 1, 1 thread, pinned to CPU {r['pinned_cpu']}", "",
             f"{r['rounds']} rounds x {r['iterations_per_run']} timed runs per tool (warm-up {r['warmup']}), tools "
             f"alternated (order rotated each round). onnxruntime {r['versions']['onnxruntime']}, "
             f"OpenVINO {r['versions']['openvino'].split('-')[0]}; host: {r['host']['cpu']}, {r['host']['cores']} cores "
             f"(shared). Wall time {r['wall_s']:.0f} s. `python benchmarks/profiler.py` regenerates this.", "",
             "| tool | median of round medians (ms) | round medians min - max (ms) |", "|---|---:|---:|"]
    for name, s in r["summary"].items():
        lines.append(f"| {name} | {s['median_of_round_medians_ms']:.4f} | {s['min_round_ms']:.4f} - {s['max_round_ms']:.4f} |")
    lines += ["", "| runtime | ours vs reference | ours (ms) | reference (ms) | difference | median paired round difference | within 5% |",
              "|---|---|---:|---:|---:|---:|---|"]
    for c in r["comparisons"]:
        lines.append(f"| {c['runtime']} | {c['ours']} vs {c['reference']} | {c['ours_ms']:.4f} | {c['reference_ms']:.4f} | "
                     f"{c['relative_difference']:+.1%} | {c['median_paired_difference']:+.1%} | "
                     f"{'yes' if c['within_5_percent'] else 'no'} |")
    lines += ["", f"benchmark_app: `{r['benchmark_app_command']}` with config `{json.dumps(r['benchmark_app_config'])}` "
              "(benchmark_app rejects -nstreams/-nthreads next to -hint, so they go through -load_config). "
              "`-data_shape` keeps the artifact's dynamic batch dimension, as every other tool here runs it; "
              "`benchmark_app-static` is the same with `-shape [1,3,32,32]`, which reshapes the model to a static "
              "batch of 1 before compiling: not the same artifact any more, shown to size what the dynamic batch "
              "costs OpenVINO at batch 1. benchmark_app prints latencies with 2 decimals (0.01 ms = ~2% here).", "",
              "The ORT reference is a plain `InferenceSession.run` loop written in the benchmark (same session options "
              "as runtimes/onnxruntime.py: 1 intra-op thread, sequential, all graph optimizations). "
              "The OV reference loop binds the input with set_input_tensor(Tensor(x, shared_memory=True)), calls infer() and "
              "copies the output; benchmark_app reports the C++-side latency of infer() on pre-filled inputs. "
              "`onnxruntime_perf_test` (C++) is not shipped in the onnxruntime wheel nor packaged by Debian, so it "
              "is not compared here.", ""]
    loads = [x["load_avg_1m"] for rows in r["per_round"].values() for x in rows if x.get("load_avg_1m") is not None]
    if loads:
        lines += [f"Load average during the runs: {min(loads):.1f} - {max(loads):.1f} on {r['host']['cores']} cores "
                  "(other tenants of the machine), which is why every tool's round medians spread by several %.", ""]
    lines += ["History: a first run (load average ~10) had ours/openvino 12.3% above benchmark_app. About half was our "
              "session calling `InferRequest.infer([x], share_inputs=True)[output]`, whose Python-side input wrapping "
              "and OVDict output cost ~6%; runtimes/openvino.py now binds a shared Tensor, calls `infer()` and copies "
              "the output, like the ov-python-loop reference. The rest of that gap did not reappear on this quieter "
              "run; benchmark_app reports the request's C++-side latency, so a Python-timed tool can read slightly "
              "higher on a busy machine.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
