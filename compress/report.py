"""Human output of the CLI (rich tables) and the small queries behind `info` and `eval`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from compress.errors import UserError
from compress.io import LoadedModel

import sys

# a pipe or CI log is not 80 columns wide: keep tables readable there
console = Console() if sys.stdout.isatty() else Console(width=160)


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):  # powers of 1000, as the labels (and --budget size=) read
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def model_info(lm: LoadedModel) -> dict:
    from compress.metrics import count_flops, count_params, state_dict_bytes, weight_bytes

    layers = {}
    for m in lm.model.modules():
        if not list(m.children()):
            layers[type(m).__name__] = layers.get(type(m).__name__, 0) + 1
    try:
        flops = count_flops(lm.model, lm.spec.shape)
    except Exception:  # noqa: BLE001 - FLOPs are informative here; do not fail `info` on an exotic op
        flops = None
    return {"source": lm.source, "kind": lm.kind, "arch": lm.arch, "sha256": lm.sha256,
            "input": lm.spec.to_dict(), "params": sum(p.numel() for p in lm.model.parameters()),
            "flops": flops, "weight_bytes": weight_bytes(lm.model) if isinstance(lm.model, nn.Module) else None,
            "state_dict_bytes": state_dict_bytes(lm.model) if isinstance(lm.model, nn.Module) else None,
            "layers": layers, "edits": [e.get("kind") for e in lm.edits], "history": lm.history}


def print_info(d: dict) -> None:
    t = Table(title=f"{Path(d['source']).name} ({d['kind']}{', ' + d['arch'] if d['arch'] else ''})", show_header=False)
    t.add_row("input", f"1 x {' x '.join(map(str, d['input']['shape']))}  mean={d['input']['mean']} std={d['input']['std']}")
    t.add_row("parameters", f"{fmt_count(d['params'])} ({d['params']:,})")
    t.add_row("FLOPs (batch 1)", fmt_count(d["flops"]))
    t.add_row("weights", f"{fmt_bytes(d['weight_bytes'])} as exported (quantized weights at their bit-width)")
    t.add_row("torch file", fmt_bytes(d["state_dict_bytes"]))
    t.add_row("layers", ", ".join(f"{k} x{v}" for k, v in sorted(d["layers"].items(), key=lambda kv: -kv[1])))
    if d["history"]:
        t.add_row("history", " -> ".join(f"{h.get('stage')}:{h.get('method')}" for h in d["history"]))
    console.print(t)


def evaluate_any(path: Path, data: list[str], runtime: str | None, batch_size: int, arch: str | None,
                 load_kw: dict) -> dict:
    """Top-1 of a torch model or an artifact (on its runtime) on each labeled data set."""
    from compress.gates import measure_accuracy

    records = [measure_accuracy(path, spec, runtime, arch, batch_size, load_kw) for spec in data]
    return {"model": str(path), "runtime": records[0]["runtime"] if records else None,
            "accuracy": {Path(r["data"]).stem: round(r["top1"], 2) for r in records}}


def print_kv(title: str, d: dict[str, Any]) -> None:
    t = Table(title=title)
    t.add_column("set")
    t.add_column("value", justify="right")
    for k, v in d.items():
        t.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(t)


def print_stage(record: dict, result) -> None:
    before = result.variants["original"].metrics
    after = record["metrics"]
    t = Table(title=f"{record['stage']} {record['method']} -> {record['path'] or 'dry run: nothing written'}")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("params", fmt_count(before.get("params")), fmt_count(after.get("params")))
    t.add_row("FLOPs", fmt_count(before.get("flops")), fmt_count(after.get("flops")))
    t.add_row("weights", fmt_bytes(before.get("size_bytes")), fmt_bytes(after.get("size_bytes")))
    t.add_row("precision", before.get("precision", "-"), after.get("precision", "-"))
    for k, v in after.get("accuracy", {}).items():
        t.add_row(f"top-1 {k}", f"{before.get('accuracy', {}).get(k, float('nan')):.2f}", f"{v:.2f}")
    t.add_row("time", "", f"{record['seconds']:.1f} s")
    console.print(t)


def print_artifacts(artifacts: list[dict]) -> None:
    t = Table(title="exported")
    evals = list(dict.fromkeys(k for a in artifacts for k in a.get("accuracy", {})))  # --eval-data, in order
    for c in ("artifact", "format", "precision", "size", "parity max|err|", "top-1 agree",
              *[f"top-1 {n}" for n in short_names(evals)]):
        t.add_column(c, justify="right" if c not in ("artifact", "format") else "left")
    for a in artifacts:
        p = a.get("parity", {})
        acc = a.get("accuracy", {})
        t.add_row(a["path"], a["format"], a["precision"], fmt_bytes(a["size_bytes"]),
                  f"{p.get('max_abs_err', float('nan')):.2e}" if p else "not checked",
                  f"{p.get('top1_agreement', float('nan')):.1%}" if p else "-",
                  *[f"{acc[n]:.2f}" if n in acc else "-" for n in evals])
    console.print(t)
    for a in artifacts:
        for n in a.get("notes", []):
            console.print(f"  {Path(a['path']).name}: {n}")


def short_names(names: list[str]) -> list[str]:
    """'cifar10_test_jpeg', 'cifar10_test_lossless846' -> 'jpeg', 'lossless846' (drop the shared prefix)."""
    import os

    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind("_") + 1] if "_" in prefix else ""
    return [n[len(prefix):] or n for n in names]


def rows_table(rows: list[dict], eval_names: list[str], title: str = "results") -> Table:
    t = Table(title=title)
    # the device column only once latencies come from somewhere other than this machine
    devices = any(r.get("device") not in (None, "local") for r in rows)
    cols = ["model", "format", "precision", *[f"top-1 {n}" for n in short_names(eval_names)], "params", "FLOPs", "size",
            *(["device"] if devices else []), "p50 ms", "p90 ms", "peak MiB"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "format", "precision", "device") else "right")
    for r in rows:
        acc = [f"{r['accuracy'][n]:.2f}" if n in r.get("accuracy", {}) else "-" for n in eval_names]
        t.add_row(r["model"], r["format"], r["precision"], *acc, fmt_count(r.get("params")), fmt_count(r.get("flops")),
                  fmt_bytes(r.get("size_bytes")), *([r.get("device") or "-"] if devices else []),
                  fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p90_ms")),
                  "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.1f}")
    return t


def print_run(rows: list[dict], result, pipe) -> None:
    console.print(rows_table(rows, list(pipe.eval_sets)))
    if any(r.get("format") == "ort" and r.get("p50_ms") is not None for r in rows):
        import platform

        from exporters.ort import TARGET_PLATFORM

        if TARGET_PLATFORM == "arm" and platform.machine().lower() in ("x86_64", "amd64"):
            console.print("ort: the .ort files are optimized for ARM (phones, boards); on this x86 CPU they run without "
                          "x86 layout optimizations, slower than .onnx: time them on the target (--device adb:...)")
    for p in result.profiles:
        if "gates" in p:
            where = "" if p.get("device") in (None, "local") else f" on {p['device']}"
            where += " (predicted)" if str(p.get("device")).startswith("estimate:") else ""
            verdict = "pass" if p["gates"]["passed"] else "FAIL: " + "; ".join(p["gates"]["failures"])
            console.print(f"gates {Path(p['artifact']).name}{where}: {verdict}")
    if result.manifest_path:
        console.print(f"manifest: {result.manifest_path}")
