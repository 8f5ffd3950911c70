"""How far is `--device estimate:host` from measured latency on this machine? Leave-one-model-out, so honest.

    .venv/bin/python benchmarks/estimate.py [--iterations 300] [--runs 40]

Models: the zoo's resnet20/32/44/56, vgg16_bn, mobilenet_v2, exported to FP32 ONNX by exporters.EXPORTERS, batch 1,
1 thread, ONNX Runtime on this CPU. For each model M:

    measured     the local profiler (fresh process) — reference = the fastest of N timed runs (see below),
                 the median is reported too
    uncalibrated the catalog's default efficiencies for a CPU with this machine's peak (estimate:host, no fit)
    calibrated   the fit from the OTHER five models only (per-node ORT profiles + their end-to-end latencies),
                 predicting M; a class M has and the others lack (depthwise conv for mobilenet_v2) keeps defaults

Why the fastest run: this is a 2-core machine shared with other tenants (load average ~10 during the runs);
a run longer than a scheduler time slice is preempted in most samples, so the median of VGG-16 (4.8 ms of work)
comes out near 13 ms and says more about the neighbours than the model. The fastest of N runs is what an idle
machine approaches (on an idle machine it sits within a few % of the median); both are in the JSON.

Peer anchor: nn-Meter (MobiSys'21) reports ~±10% accuracy for most models with per-kernel predictors trained on
the device; here: how many of the six are within ±10% leave-one-out. Writes benchmarks/results/estimate.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "vgg16_bn", "mobilenet_v2"]


def export(out: Path) -> dict[str, Path]:
    from compress.io import zoo_model
    from exporters import EXPORTERS

    paths = {}
    for arch in MODELS:
        lm = zoo_model(arch)
        paths[arch] = Path(EXPORTERS.get("onnx")(lm.model, lm.spec, out / f"{arch}.onnx", "fp32").path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from devices.estimate import (analyze, default_params, fit, load_catalog, measure_bandwidth_gbs,
                                  measure_cache_bandwidth_gbs, measure_for_calibration, predict)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--runs", type=int, default=40, help="ORT profiling runs per model (per-node medians)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.time()
    entry = load_catalog()["host"]
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        paths = export(Path(tmp))
        bw, cache_bw = measure_bandwidth_gbs(), measure_cache_bandwidth_gbs(entry.cache_bytes)
        meas = {}
        for arch in MODELS:
            meas[arch] = measure_for_calibration(paths[arch], threads=1, runs=args.runs, iterations=args.iterations)
            print(f"measured {arch}: fastest {meas[arch]['e2e_ms']:.3f} ms, median {meas[arch]['e2e_p50_ms']:.3f} ms",
                  flush=True)
        graphs = {arch: analyze(paths[arch]) for arch in MODELS}
    rows = []
    for arch in MODELS:
        params = fit([meas[o] for o in MODELS if o != arch], entry, bw, cache_bw)
        cal = predict(graphs[arch], entry, params, 1)["latency_ms"]
        uncal = predict(graphs[arch], entry, default_params(entry), 1)["latency_ms"]
        ref, p50 = meas[arch]["e2e_ms"], meas[arch]["e2e_p50_ms"]
        rows.append({"model": arch, "mflops": round(sum(n.flops for n in graphs[arch].executed) / 1e6, 1),
                     "measured_fastest_ms": ref, "measured_p10_ms": meas[arch]["e2e_p10_ms"], "measured_p50_ms": p50,
                     "load_avg_1m": meas[arch]["load_avg_1m"],
                     "calibrated_loo_ms": cal, "calibrated_loo_error": cal / ref - 1,
                     "calibrated_loo_error_vs_p50": cal / p50 - 1,
                     "uncalibrated_ms": uncal, "uncalibrated_error": uncal / ref - 1,
                     "fit_classes": list(params.calibrated_classes),
                     "fit": {"efficiency": params.efficiency, "overhead_us": params.overhead_us,
                             "s0_us": params.s0_us, "s1_us": params.s1_us}})
        print(f"{arch}: calibrated {cal:.3f} ms ({cal / ref - 1:+.1%}), uncalibrated {uncal:.3f} ms "
              f"({uncal / ref - 1:+.1%})", flush=True)
    full = fit(list(meas.values()), entry, bw, cache_bw)
    within = sum(abs(r["calibrated_loo_error"]) <= 0.10 for r in rows)
    result = {"benchmark": "estimate:host vs measured, leave-one-model-out", "threads": 1, "batch": 1,
              "runtime": "onnxruntime (CPU EP, sequential, all optimizations)", "iterations": args.iterations,
              "ort_profile_runs": args.runs, "host": entry.summary(), "bandwidth_gbs_measured": bw,
              "cache_bandwidth_gbs_measured": cache_bw,
              "rows": rows, "within_10_percent_calibrated": f"{within}/{len(rows)}",
              "median_abs_error_calibrated": sorted(abs(r["calibrated_loo_error"]) for r in rows)[len(rows) // 2],
              "fit_on_all_six": {"efficiency": full.efficiency, "overhead_us": full.overhead_us, "s0_us": full.s0_us,
                                 "s1_us": full.s1_us},
              "wall_s": round(time.time() - t_start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimate.json").write_text(json.dumps(result, indent=1))
    (args.out / "estimate.md").write_text(render_md(result))
    print(render_md(result))
    return 0


def render_md(r: dict) -> str:
    h = r["host"]
    lines = [
        "# estimate:host vs measured latency (leave-one-model-out)", "",
        f"FP32 ONNX, batch 1, 1 thread, ONNX Runtime CPU; host: {h['description']}, peak "
        f"{h['peak_fp32_gflops_1_core']} GFLOP/s per core (estimate from /proc/cpuinfo), copy bandwidth "
        f"{r['bandwidth_gbs_measured']:.1f} GB/s DRAM / {r['cache_bandwidth_gbs_measured'] or 0:.1f} GB/s last-level "
        f"cache ({(h['cache_bytes'] or 0) / 2**20:.0f} MiB) (measured, one core). Calibrated = fit on the other five models only. "
        f"Measured = fastest of {r['iterations']} runs in a fresh process (median beside it: the machine is shared, "
        f"see below). `python benchmarks/estimate.py` regenerates this ({r['wall_s']:.0f} s).", "",
        "| model | MFLOP | measured fastest (ms) | measured median (ms) | calibrated LOO (ms) | error | uncalibrated (ms) | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['mflops']} | {row['measured_fastest_ms']:.3f} | {row['measured_p50_ms']:.3f} | "
                     f"{row['calibrated_loo_ms']:.3f} | {row['calibrated_loo_error']:+.1%} | {row['uncalibrated_ms']:.3f} | "
                     f"{row['uncalibrated_error']:+.1%} |")
    lines += ["", f"Within ±10% (calibrated, leave-one-out): **{r['within_10_percent_calibrated']}**; median |error| "
              f"{r['median_abs_error_calibrated']:.1%}. Peer anchor: nn-Meter reports most predictions within ±10% "
              "with kernel-level predictors trained on the target device.", "",
              "Reading it: mobilenet_v2 is the only model with depthwise convolutions, so leaving it out leaves that "
              "class uncalibrated (catalog default efficiency); vgg16_bn is the only model with large (256-512) channel "
              "counts. The uncalibrated column is the catalog's generic CPU efficiencies on this machine's estimated "
              "peak: what `estimate:rpi5` and the other catalog entries do for devices nobody has measured, so expect "
              "errors of that size there.", "",
              "The machine is a 2-core VM shared with other tenants (load average during the runs in the JSON): the "
              "median of a run longer than a scheduler time slice is inflated by preemption, so the reference is the "
              "fastest run; the per-node kernel times the fit uses are per-node medians (short nodes, rarely preempted).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
