"""OpenVINO IR on CPU: FP32 vs FP16 vs INT8, ResNet-20 / CIFAR-10 (the real akamaster checkpoint).

    .venv/bin/python benchmarks/openvino_precision.py [--rounds 5 --iterations 200 --warmup 50]

Artifacts (all through this toolchain's exporters, each parity-checked against torch):
  FP32              export --format openvino --precision fp32
  FP16              export --format openvino --precision fp16 (OpenVINO's FP16 weight compression)
  INT8 minmax QDQ   compress quantize --method minmax (W8A8, 512 calibration images), then export --format openvino:
                    the QDQ pairs become FakeQuantize ops, which the CPU plugin runs as u8/i8 kernels
  INT8 NNCF PTQ     nncf.quantize on the FP32 IR with the same 512 calibration images (preset PERFORMANCE)

Accuracy: top-1 on cifar10_test_lossless846.npz through the OpenVINO runtime. Latency: devices.profile_artifact
(a fresh process per measurement, runtimes/openvino.py: 1 thread, LATENCY hint, one stream, FP32 inference
precision), batch 1, `rounds` rounds with the artifacts in rotating order so that drift on this shared machine
hits all of them alike; p50 over the pooled runs with a 95% CI, the gate's comparison vs FP32 (compress/gates.py:
Mann-Whitney on block medians), and the p50 ratio to FP32 within each round (rounds are the independent units).
What runs as integers is read from the compiled model (runtime precision of each Convolution), not implied.

Writes benchmarks/results/openvino_precision.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

ASSETS = Path(os.environ.get("COMPRESS_ASSETS") or ROOT.parent / "shared" / "assets")
MODEL = ASSETS / "models" / "resnet20-12fca82f.th"
TEST = ASSETS / "data" / "cifar10_test_lossless846.npz"
CALIB = ASSETS / "data" / "cifar10_calib1000_jpeg.npz"
CALIB_N = 512


def build(d: Path) -> tuple[dict[str, Path], dict]:
    import nncf
    import openvino as ov

    from compress.data import Normalizer, load_dataset
    from compress.io import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import Recipe
    from exporters.openvino import export_openvino

    lm = load_model(MODEL, arch="resnet20")
    norm = Normalizer(lm.spec.mean, lm.spec.std)
    parity = norm(load_dataset(f"cifar10:{TEST}").images[:64])
    timings, paths = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    paths["FP32"] = Path(timed("FP32", lambda: export_openvino(lm.model, lm.spec, d / "fp32.xml", "fp32", parity)).path)
    paths["FP16"] = Path(timed("FP16", lambda: export_openvino(lm.model, lm.spec, d / "fp16.xml", "fp16", parity)).path)

    def minmax():
        recipe = Recipe(model=str(MODEL), arch="resnet20", data={"calib": f"cifar10:{CALIB}"},
                        stages=[{"stage": "quantize", "method": "minmax", "bits": "w8a8", "calib_size": CALIB_N}])
        qlm = Pipeline(recipe, None, write_manifest=False).run().current.lm
        return export_openvino(qlm.model, qlm.spec, d / "int8_minmax.xml", "auto", parity)

    paths["INT8 minmax QDQ"] = Path(timed("INT8 minmax QDQ", minmax).path)

    def nncf_ptq():
        calib = load_dataset(f"cifar10:{CALIB}").subset(CALIB_N, seed=0)  # the images minmax draws (seed 0)
        x = norm(calib.images).numpy()
        ds = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
        q = nncf.quantize(ov.Core().read_model(str(paths["FP32"])), ds, subset_size=CALIB_N,
                          preset=nncf.QuantizationPreset.PERFORMANCE)
        ov.save_model(q, str(d / "int8_nncf.xml"), compress_to_fp16=False)
        return d / "int8_nncf.xml"

    paths["INT8 NNCF PTQ"] = timed("INT8 NNCF PTQ", nncf_ptq)
    return paths, timings


def executed_precisions(path: Path) -> dict:
    """Runtime precision of the compiled model's compute layers (what the CPU plugin actually runs)."""
    from runtimes import open_session

    with open_session(path, "openvino", threads=1) as s:
        ops = s._compiled.get_runtime_model().get_ordered_ops()
        counts, kernels = Counter(), Counter()
        for op in ops:
            rt = op.get_rt_info()
            layer, prec = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
            if layer in ("Convolution", "FullyConnected", "MatMul", "Eltwise", "Reduce", "Pooling"):
                counts[f"{layer} {prec}"] += 1
            if layer == "Convolution":
                # runtimePrecision is the layer's input precision (f16 for FP16-stored weights); the kernel name
                # (primitiveType, e.g. brgconv_avx512_f32 vs brgconv_avx512_I8) says what arithmetic runs
                kernels[rt["primitiveType"].astype(str)] += 1
    return {"layers": dict(sorted(counts.items())), "conv_kernels": dict(sorted(kernels.items())),
            "conv_total": sum(kernels.values()),
            "conv_integer": sum(v for k, v in kernels.items() if k.lower().endswith(("_i8", "_u8", "int8")))}


def measure(paths: dict[str, Path], rounds: int, iterations: int, warmup: int) -> dict[str, dict]:
    from devices import profile_artifact

    names = list(paths)
    runs = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            prof = profile_artifact(str(paths[n]), runtime="openvino", threads=1, warmup=warmup, iterations=iterations)
            runs[n].append(prof)
            print(f"  round {r + 1}/{rounds} {n:16s} p50 {prof['latency_ms']['p50']:.3f} ms", file=sys.stderr)
    return runs


def pooled(profiles: list[dict]) -> dict:
    from devices.profile import latency_stats

    samples = [s for p in profiles for s in p["samples_ms"]]
    stats = latency_stats(samples)
    first = profiles[0]
    return {"samples_ms": samples, "latency_ms": stats, "settings": first["settings"], "runtime": first["runtime"],
            "environment": first["environment"], "artifact": first["artifact"],
            "round_p50_ms": [round(p["latency_ms"]["p50"], 4) for p in profiles],
            "peak_rss_mb": round(max(p["memory"]["peak_rss_bytes"] or 0 for p in profiles) / 2**20, 1),
            "load_ms": round(float(np.median([p["load_ms"] for p in profiles])), 2)}


def cpu_flags() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
              "amx_fp16", "f16c"]
    return {f: f in flags for f in wanted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")

    import openvino as ov

    from compress import gates
    from compress.io import load_model
    from devices.profile import host_environment, median_ci95

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ov-precision-") as tmp:
        d = Path(tmp)
        print("building artifacts ...", file=sys.stderr)
        paths, build_s = build(d)
        print("accuracy and executed precisions ...", file=sys.stderr)
        torch_acc = gates.measure_accuracy(MODEL, f"cifar10:{TEST}", arch="resnet20")["top1"]
        rows = {}
        for n, p in paths.items():
            acc = gates.measure_accuracy(p, f"cifar10:{TEST}", "openvino")
            files = [p, p.with_suffix(".bin")]
            rows[n] = {"top1": round(acc["top1"], 2), "size_bytes": sum(f.stat().st_size for f in files),
                       "executed": executed_precisions(p)}
        print("latency ...", file=sys.stderr)
        runs = measure(paths, args.rounds, args.iterations, args.warmup)
    load_after = os.getloadavg()[0]

    base = pooled(runs["FP32"])
    for n in paths:
        pr = pooled(runs[n])
        lat = pr["latency_ms"]
        ci = median_ci95(np.sort(np.asarray(pr["samples_ms"])))
        cmp = gates.compare_profiles(base, pr) if n != "FP32" else None
        rows[n].update({
            "p50_ms": round(lat["p50"], 4), "p50_ci95_ms": [round(c, 4) for c in ci] if ci else None,
            "p90_ms": round(lat["p90"], 4), "n": lat["n"], "round_p50_ms": pr["round_p50_ms"],
            "speedup_p50": round(base["latency_ms"]["p50"] / lat["p50"], 3),
            "vs_fp32": None if cmp is None else {k: cmp[k] for k in ("verdict", "p_value", "diff_rel", "ci95_diff_rel")},
            # rounds are the independent units (each pairs the artifacts within a few seconds of each other)
            "round_ratio_vs_fp32": [round(a / b, 3) for a, b in zip(pr["round_p50_ms"], base["round_p50_ms"])],
            "peak_rss_mb": pr["peak_rss_mb"], "load_ms": pr["load_ms"],
            "drop_vs_torch_pt": round(torch_acc - rows[n]["top1"], 2) + 0.0,  # + 0.0: no "-0.00"
        })
    env = host_environment()
    result = {
        "schema": "compress.benchmark/1", "benchmark": "openvino_precision",
        "model": {"path": MODEL.name, "arch": "resnet20", "torch_top1": round(torch_acc, 2)},
        "data": {"accuracy": TEST.name, "calibration": f"{CALIB.name} ({CALIB_N} images, seed 0)"},
        "latency_protocol": {"runner": "devices.profile_artifact (fresh process each)", "runtime": "openvino",
                             "threads": 1, "batch": 1, "rounds": args.rounds, "iterations": args.iterations,
                             "warmup": args.warmup, "order": "rotating per round",
                             "session": base["runtime"]["options"]},
        "environment": {**env, "openvino": ov.__version__, "cpu_flags": cpu_flags(),
                        "load_avg_before": round(load_before, 2), "load_avg_after": round(load_after, 2)},
        "build_seconds": build_s, "models": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openvino_precision.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "openvino_precision.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    env, proto, rows = r["environment"], r["latency_protocol"], r["models"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["cpu_flags"].items()
                      if k in ("avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_fp16"))
    lines = [
        "# OpenVINO IR precision on CPU: ResNet-20 / CIFAR-10",
        "",
        f"{env['cpu']}, {env['cores_logical']} logical cores (shared with other jobs), {flags}; OpenVINO "
        f"{env['openvino']} CPU plugin, {proto['threads']} thread, LATENCY hint, 1 stream, inference precision "
        f"{proto['session'].get('inference_precision')}; batch 1; {proto['rounds']} rounds x {proto['iterations']} runs "
        f"per model (after {proto['warmup']} warm-up runs, fresh process each, rotating order); load average "
        f"{env['load_avg_before']} -> {env['load_avg_after']}. Top-1 on {r['data']['accuracy']} (torch FP32: "
        f"{r['model']['torch_top1']:.2f}). Calibration: {r['data']['calibration']}.",
        "",
        "| IR | top-1 | drop vs torch (pt) | p50 ms [95% CI] | p90 ms | speedup p50 | vs FP32: gate verdict "
        "| p50 / FP32 per round | conv kernels (compiled model) | size KB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        ci = m["p50_ci95_ms"]
        vs = m["vs_fp32"]
        vs_text = "-" if vs is None else f"{vs['verdict']} ({vs['diff_rel']:+.1%}, p={vs['p_value']:.2g})"
        conv_text = ", ".join(f"{v} {k}" for k, v in m["executed"]["conv_kernels"].items())
        ratios = m["round_ratio_vs_fp32"]
        ratio_text = "-" if name == "FP32" else (f"{np.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}; "
                                                 f"slower in {sum(r > 1 for r in ratios)}/{len(ratios)})")
        lines.append(f"| {name} | {m['top1']:.2f} | {m['drop_vs_torch_pt']:+.2f} | {m['p50_ms']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | {m['p90_ms']:.3f} | {m['speedup_p50']:.2f}x | {vs_text} | "
                     f"{ratio_text} | {conv_text} | {m['size_bytes'] / 1024:.0f} |")
    fp16, i8, n8 = rows.get("FP16", {}), rows.get("INT8 minmax QDQ", {}), rows.get("INT8 NNCF PTQ", {})
    lines += ["", "Per-round p50 (ms): " + "; ".join(f"{n} {', '.join(f'{v:.3f}' for v in m['round_p50_ms'])}"
                                                      for n, m in rows.items()), "", "## Findings", ""]
    if fp16:
        r16 = fp16["round_ratio_vs_fp32"]
        lines.append(f"- FP16 IR: half the file ({fp16['size_bytes'] / 1024:.0f} vs {rows['FP32']['size_bytes'] / 1024:.0f} KB), "
                     f"same accuracy ({fp16['top1']:.2f}), and no faster: {fp16['speedup_p50']:.2f}x at the pooled p50, "
                     f"gate verdict \"{fp16['vs_fp32']['verdict']}\" (p={fp16['vs_fp32']['p_value']:.2g}), per-round "
                     f"p50 ratio {np.median(r16):.2f} (slower in {sum(r > 1 for r in r16)}/{len(r16)} rounds). "
                     f"Expected: FP16 here is a storage format. The session computes in "
                     f"FP32 (inference precision f32, and this CPU has no native FP16 arithmetic: avx512_fp16 "
                     f"{'yes' if env['cpu_flags'].get('avx512_fp16') else 'no'}, amx_fp16 "
                     f"{'yes' if env['cpu_flags'].get('amx_fp16') else 'no'}): the compiled model keeps the weights "
                     f"as FP16 constants but runs the same FP32 conv kernels "
                     f"({', '.join(fp16['executed']['conv_kernels'])}); load time {fp16['load_ms']:.0f} vs "
                     f"{rows['FP32']['load_ms']:.0f} ms, peak RSS {fp16['peak_rss_mb']} vs {rows['FP32']['peak_rss_mb']} MiB.")
    for name, m in (("INT8 minmax QDQ", i8), ("INT8 NNCF PTQ", n8)):
        if m:
            ex = m["executed"]
            lines.append(f"- {name}: {ex['conv_integer']}/{ex['conv_total']} convolutions run as int8 kernels "
                         f"({', '.join(ex['conv_kernels'])}); "
                         f"{m['speedup_p50']:.2f}x at p50 ({m['vs_fp32']['verdict']}, p={m['vs_fp32']['p_value']:.2g}), "
                         f"top-1 {m['top1']:.2f} ({m['drop_vs_torch_pt']:+.2f} pt vs torch), "
                         f"{m['size_bytes'] / 1024:.0f} KB.")
    lines += ["- Latency on this machine is measured while other jobs run (see load average): the CIs and the "
              "rotating order are there so that the comparison, not the absolute number, is what to read.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
