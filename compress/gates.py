"""CI gates on profiles: budgets (hard limits) and a statistical comparison with a baseline profile.

Budgets, as a string (CLI `--budget`) or a mapping (recipe profile stage `budget:`):

    latency.p90=2ms,memory.peak=80MB,size=5MB,accuracy.drop=0.5

    metric              limit is   measured from the compress.profile/1 JSON
    latency.p50|p90|p99|mean|max   upper  latency_ms.<stat>: steady-state runs, one request at a time
    latency.load        upper      load_ms (opening the artifact)
    latency.first       upper      first_inference_ms
    memory.peak         upper      memory.peak_rss_bytes: peak RSS of the fresh process that loaded and ran the
                                   artifact (interpreter + runtime library + model + buffers); the number to hold
                                   against a device's RAM
    memory.model        upper      memory.model_peak_bytes: that peak minus the RSS after importing the runtime and
                                   before loading the model: the model's own share (weights, arena, workspace)
    size                upper      artifact.size_bytes: every file of the artifact (.xml + .bin, ONNX external data)
    accuracy.drop       upper      reference top-1 minus artifact top-1, in percentage points, same data
    accuracy.top1       lower      artifact top-1 in percent

    Units: time us|ms|s; size B, kB|MB|GB (powers of 1000), KiB|MiB|GiB (powers of 1024); accuracy in points
    (a bare number, or `pp`). Time and size need their unit.

Accuracy: the artifact's top-1 on labeled data (`--accuracy-data cifar10:PATH`; a recipe uses its eval sets),
against a reference measured on the same data (fingerprints must match): `--reference MODEL_OR_ARTIFACT`
evaluated here, or the `accuracy` record a `--baseline` profile carries (profiles written with --accuracy-data
carry one). accuracy.drop is the reference minus the artifact, so a negative drop is a gain.

Baseline comparison (`--baseline previous.json`): both profiles carry every timed run (samples_ms). A raw
threshold on two medians would flag noise, so the verdict comes from the runs' spread:
  * the runs are sequential, not independent: a burst of other load or a frequency change shifts many
    neighbouring runs at once, and a test that counts 300 runs as 300 independent draws calls that burst
    "significant". So each profile's runs are cut into contiguous blocks (batch means: up to 20 blocks of at
    least 10 runs; fewer than 50 runs are used as they are; both profiles with the same, smaller block size)
    and the tests work on the block medians;
  * Mann-Whitney U test, two-sided, on the block medians: p-value that the two latency distributions are the
    same; exact (the distribution of U over all orderings) when there are no ties and at most 50 blocks a
    side, else the normal approximation with tie and continuity corrections. With 5 blocks a side only the
    exact test can get below 0.01 at all; run counts whose smallest possible p is not below alpha are refused;
  * the median difference (medians of all runs), absolute and relative, with a 95% bootstrap CI that resamples
    whole blocks (seeded, 2000 resamples);
  * "slower" = p < alpha AND the median is more than `max_slowdown` above the baseline's (minimum effect size,
    default 5%); "faster" symmetric; "within tolerance" when significant but smaller; otherwise "no
    significant change". Only "slower" fails the gate.
  Blocks absorb short bursts, not a machine that is slower for the whole of one profile: compare profiles taken
  on the same machine, back to back (examples/ci re-profiles the baseline artifact in the same job). Profiles
  from different machines, runtimes or thread counts are compared with a warning; a different batch or input
  shape is refused.

Outputs: `to_junit` (one testcase per budget and per comparison; failures as <failure>), `to_markdown` (for
$GITHUB_STEP_SUMMARY), `render` (rich tables). Pure functions over dicts, except `measure_accuracy`, which runs
a model or artifact on labeled data (importing runtimes/ lazily, as the pipeline does).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from xml.etree import ElementTree as ET

import numpy as np

from compress.errors import UserError

SCHEMA = "compress.gates/1"
TIME_UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0}                       # -> ms
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}  # -> bytes
UNIT_NAMES = {"us": "us", "µs": "us", "ms": "ms", "s": "s", "b": "B", "kb": "kB", "mb": "MB", "gb": "GB",
              "kib": "KiB", "mib": "MiB", "gib": "GiB", "pp": "pp", "": "pp"}
DEFAULT_ALPHA = 0.01
DEFAULT_MAX_SLOWDOWN = 0.05
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Metric:
    key: str
    kind: str          # time | bytes | points
    bound: str         # max: the limit is an upper bound; min: a lower bound
    describe: str
    extract: Callable[[dict], float | None]


def _lat(stat: str) -> Callable[[dict], float | None]:
    return lambda p: p["latency_ms"].get(stat)


METRICS: dict[str, Metric] = {m.key: m for m in [
    *(Metric(f"latency.{s}", "time", "max", f"{s} latency (steady state)", _lat(s))
      for s in ("p50", "p90", "p99", "mean", "max")),
    Metric("latency.load", "time", "max", "load time", lambda p: p.get("load_ms")),
    Metric("latency.first", "time", "max", "first inference", lambda p: p.get("first_inference_ms")),
    Metric("memory.peak", "bytes", "max", "peak RSS of the profiling process",
           lambda p: p["memory"].get("peak_rss_bytes")),
    Metric("memory.model", "bytes", "max", "peak RSS minus RSS before loading",
           lambda p: p["memory"].get("model_peak_bytes")),
    Metric("size", "bytes", "max", "artifact size, all files", lambda p: p["artifact"].get("size_bytes")),
    Metric("accuracy.drop", "points", "max", "top-1 drop vs the reference (points)", lambda p: None),
    Metric("accuracy.top1", "points", "min", "top-1 accuracy (%)", lambda p: None),
]}


@dataclass(frozen=True)
class Budget:
    metric: str
    limit: float       # canonical: ms, bytes, or percentage points
    unit: str          # the unit the user wrote, for display
    text: str          # as written

    def to_dict(self) -> dict:
        return asdict(self)


# ---- parsing ---------------------------------------------------------------------------------------------------

_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*$")


def parse_budget(spec: str | dict | list | None) -> list[Budget]:
    """`key=value,...` (CLI) or {key: value} (recipe) -> budgets; UserError naming the first bad item."""
    if spec is None or spec == "" or spec == {}:
        return []
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise UserError(f"budget {part!r}: write metric=limit, e.g. latency.p90=2ms (known: {_known()})")
            items.append((key.strip(), value.strip()))
    elif isinstance(spec, dict):
        items = [(str(k).strip(), v) for k, v in spec.items()]
    elif isinstance(spec, list):  # a recipe may list "key=value" strings
        return parse_budget(",".join(map(str, spec)))
    else:
        raise UserError(f"budget: a string like 'latency.p90=2ms,size=5MB' or a mapping, not {type(spec).__name__}")
    budgets, seen = [], set()
    for key, value in items:
        if key not in METRICS:
            raise UserError(f"budget: unknown metric {key!r}; known: {_known()}")
        if key in seen:
            raise UserError(f"budget: {key} given twice")
        seen.add(key)
        budgets.append(_parse_limit(METRICS[key], value))
    if not budgets:
        raise UserError("budget: empty; e.g. --budget latency.p90=2ms,memory.peak=80MB,size=5MB")
    return budgets


def _known() -> str:
    return ", ".join(METRICS)


def _parse_limit(metric: Metric, value: Any) -> Budget:
    text = str(value).strip()
    m = _VALUE.match(text)
    if not m:
        raise UserError(f"budget {metric.key}={text}: not a number with a unit ({_unit_help(metric)})")
    number, unit = float(m.group(1)), m.group(2)
    u = unit.lower() if unit != "µs" else unit
    if metric.kind == "time":
        if u not in TIME_UNITS:
            raise UserError(f"budget {metric.key}={text}: {'a unit is needed' if not unit else f'unknown unit {unit!r}'} "
                            f"({_unit_help(metric)})")
        limit = number * TIME_UNITS[u]
    elif metric.kind == "bytes":
        if u not in SIZE_UNITS:
            raise UserError(f"budget {metric.key}={text}: {'a unit is needed' if not unit else f'unknown unit {unit!r}'} "
                            f"({_unit_help(metric)})")
        limit = number * SIZE_UNITS[u]
    else:
        if u not in ("", "pp"):
            raise UserError(f"budget {metric.key}={text}: accuracy is in percentage points ({_unit_help(metric)})")
        limit = number
    if not math.isfinite(limit):
        raise UserError(f"budget {metric.key}={text}: not a finite number")
    return Budget(metric.key, limit, UNIT_NAMES.get(u, unit), f"{metric.key}={text}")


def _unit_help(metric: Metric) -> str:
    return {"time": "use us, ms or s, e.g. 2ms", "bytes": "use B, kB, MB, GB, KiB, MiB or GiB, e.g. 80MB",
            "points": "a number of points, e.g. 0.5 or 0.5pp"}[metric.kind]


def parse_fraction(text: str | float, what: str = "max slowdown") -> float:
    """'5%' or '0.05' -> 0.05."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a fraction (e.g. 5% or 0.05)") from None
    if not s.endswith("%") and value >= 1.0:  # '5' is far more likely 5% than 500%
        raise UserError(f"{what}: {text!r} is ambiguous: give a fraction below 1 (0.05) or a percentage (5%)")
    if not 0.0 <= value < 10.0:
        raise UserError(f"{what}: {text!r} is out of range")
    return value


def needs_accuracy(budgets: list[Budget]) -> bool:
    return any(b.metric.startswith("accuracy.") for b in budgets)


def needs_reference(budgets: list[Budget]) -> bool:
    return any(b.metric == "accuracy.drop" for b in budgets)


# ---- accuracy records --------------------------------------------------------------------------------------------

def accuracy_record(top1: float, data: str, n: int | None = None, fingerprint: str | None = None,
                    model: str | None = None, runtime: str | None = None, normalization: dict | None = None) -> dict:
    """What a profile's `accuracy` key holds (and what a reference measurement yields). `normalization`: the
    mean/std the inputs were normalized with and where they came from (given | artifact | model | default)."""
    record = {"top1": round(float(top1), 4), "data": data, "n": n, "fingerprint": fingerprint, "model": model,
              "runtime": runtime}
    return {**record, "normalization": normalization} if normalization else record


def accuracy_drop(current: list[dict], reference: list[dict]) -> tuple[float, str]:
    """Worst (largest) reference-minus-current top-1 over the data sets both measured (matched by fingerprint)."""
    def key(r: dict) -> str:
        return r.get("fingerprint") or r.get("data") or "?"

    ref = {key(r): r for r in reference}
    pairs = [(c, ref[key(c)]) for c in current if key(c) in ref]
    if not pairs:
        raise UserError(f"accuracy.drop: the reference accuracy was measured on other data "
                        f"({', '.join(r.get('data') or '?' for r in reference)} vs "
                        f"{', '.join(c.get('data') or '?' for c in current)})")
    drop, c, r = max(((r["top1"] - c["top1"], c, r) for c, r in pairs), key=lambda t: t[0])
    return drop, f"{r['top1']:.2f}% -> {c['top1']:.2f}% on {Path(str(c.get('data'))).name}"


# artifacts a runtime opens; any other model file is loaded by compress.io (state dict + arch, .pt2, TorchScript, ...)
def measure_accuracy(path: str | Path, data: str, runtime: str | None = None, arch: str | None = None,
                     batch_size: int = 256, load_kw: dict | None = None) -> dict:
    """Top-1 of a model or artifact on labeled data -> an accuracy record (with the data's fingerprint).

    Artifacts (.onnx, .ort, .xml, .engine) run on their runtime; anything else loads as a torch model
    (load_kw: trust_pickle / input_shape / normalization, as compress.io.load_model takes them; an artifact
    takes normalization from there too, else from what it records: see artifact_normalization).
    """
    from compress.data import Normalizer, load_dataset
    from compress.metrics import predict, top1
    from runtimes.base import ARTIFACT_RUNTIMES

    path, load_kw = Path(path), load_kw or {}
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    torch_suffixes = (".pt", ".pth", ".th", ".pt2", ".ts")  # the torch runtime is for profiling; accuracy loads the model
    runtime = runtime or (None if path.suffix.lower() in torch_suffixes else ARTIFACT_RUNTIMES.get(path.suffix.lower()))
    if runtime:
        from runtimes import open_session

        session = open_session(path, runtime)
        dims = (session.inputs[0].shape or ())[1:]
        shape = load_kw.get("input_shape") or (
            tuple(dims) if dims and all(isinstance(d, int) for d in dims) else (3, 32, 32))
        channels = shape[0] if len(shape) == 3 else None
        given = load_kw.get("normalization")
        if given and channels:
            from compress.io import check_normalization

            given = check_normalization(*given, channels=channels)
        recorded = None if given else artifact_normalization(path, session)
        origin = "given" if given else "artifact" if recorded else "default"
        mean, std = given or recorded or _default_normalization(path, channels)
        forward = lambda x: session.run(x.numpy())  # noqa: E731
    else:
        from compress.io import load_model

        lm = load_model(path, arch=arch, **load_kw)
        shape, mean, std = lm.spec.shape, lm.spec.mean, lm.spec.std
        origin = "given" if load_kw.get("normalization") else "model"
        lm.model.eval()
        forward = lambda x: lm.model(x).detach().numpy()  # noqa: E731
    ds = load_dataset(data, tuple(shape))
    if ds.labels is None:
        raise UserError(f"{data} has no labels ('y'): accuracy needs labeled data")
    acc = top1(predict(forward, ds, Normalizer(mean, std), batch_size, description=f"accuracy {path.name}"), ds.labels)
    return accuracy_record(acc, ds.source, len(ds), ds.fingerprint(), str(path), runtime or "torch",
                           {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
                            "from": origin})


def artifact_normalization(path: Path, session=None) -> tuple[tuple, tuple] | None:
    """The mean/std an artifact's inputs expect: recorded in the artifact itself (`compress export` writes it into
    ONNX metadata and OpenVINO rt_info, read through `session`), else in a sidecar (the .ort export's <stem>.json,
    a model.json) or the manifest.json of the run that exported it; None when nothing records it."""
    import json

    from compress.progress import log
    from runtimes.base import INPUT_METADATA_KEY

    recorded = getattr(session, "metadata", {}).get(INPUT_METADATA_KEY)
    if recorded:
        try:
            d = json.loads(recorded)
            return tuple(d["mean"]), tuple(d["std"])
        except (ValueError, KeyError, TypeError):
            log(f"{path.name}: unreadable {INPUT_METADATA_KEY} metadata; looking beside the file")
    for side in (path.with_suffix(".json"), path.with_name("model.json"), Path(f"{path}.json")):
        try:
            d = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        for key in ("normalization", "input"):
            if isinstance(d.get(key), dict) and "mean" in d[key] and "std" in d[key]:
                return tuple(d[key]["mean"]), tuple(d[key]["std"])
    try:
        for art in json.loads(path.with_name("manifest.json").read_text()).get("artifacts", []):
            if Path(art.get("path", "")).resolve() == path.resolve():
                return tuple(art["input"]["mean"]), tuple(art["input"]["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _default_normalization(path: Path, channels: int | None) -> tuple[tuple, tuple]:
    from compress.io import default_normalization
    from compress.progress import log

    mean, std = default_normalization(channels)
    log(f"{path.name}: no normalization recorded in or beside it; using the default mean {mean} / std {std} "
        f"(ImageNet statistics, what the zoo's CIFAR checkpoints expect; give the model's own with --mean/--std)")
    return mean, std


# ---- budgets ---------------------------------------------------------------------------------------------------

def check_budgets(budgets: list[Budget], profile: dict, accuracy: list[dict] | None = None,
                  reference: list[dict] | None = None) -> list[dict]:
    """One row per budget: metric, limit, measured, status (pass | fail), in the units the budget was written in."""
    rows = []
    for b in budgets:
        metric = METRICS[b.metric]
        detail = metric.describe
        if b.metric == "accuracy.drop":
            if not accuracy or not reference:
                raise UserError("accuracy.drop needs the artifact's accuracy (--accuracy-data, or a recipe's eval data) "
                                "and a reference "
                                "(--reference MODEL, or a --baseline profile that carries accuracy)")
            measured, detail = accuracy_drop(accuracy, reference)
        elif b.metric == "accuracy.top1":
            if not accuracy:
                raise UserError("accuracy.top1 needs the artifact's accuracy: --accuracy-data cifar10:PATH")
            measured = min(a["top1"] for a in accuracy)
        else:
            measured = metric.extract(profile)
            if is_prediction(profile):  # the JUnit/markdown reader must not take it for a measurement
                detail = f"{metric.describe}, PREDICTED by {profile.get('target')} (not measured)"
        if measured is None:
            status = "fail"
            detail = f"{metric.describe}: not measured on this target"
        else:
            ok = measured <= b.limit if metric.bound == "max" else measured >= b.limit
            status = "pass" if ok else "fail"
        rows.append({"metric": b.metric, "bound": "<=" if metric.bound == "max" else ">=", "limit": b.limit,
                     "limit_text": fmt_value(b.limit, metric.kind, b.unit), "measured": measured,
                     "measured_text": "not measured" if measured is None else fmt_value(measured, metric.kind, b.unit),
                     "status": status, "detail": detail, "budget": b.text})
    return rows


def fmt_value(value: float, kind: str, unit: str) -> str:
    if kind == "time":
        v = value / TIME_UNITS[unit if unit in TIME_UNITS else "ms"]
    elif kind == "bytes":
        v = value / SIZE_UNITS[unit.lower()]
        if unit == "B":
            return f"{int(round(v))} B"
    else:
        return f"{value:.2f} pp" if unit == "pp" else f"{value:.2f}"
    return f"{v:.4g} {unit}" if abs(v) < 1000 else f"{v:,.0f} {unit}"


# ---- baseline comparison -------------------------------------------------------------------------------------

def mann_whitney_u(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(U of x, z, two-sided p) with the normal approximation, tie correction and continuity correction.

    Matches scipy.stats.mannwhitneyu(x, y, method="asymptotic", use_continuity=True); numpy only.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("empty sample")
    both = np.concatenate([x, y])
    ranks = _average_ranks(both)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    _, counts = np.unique(both, return_counts=True)
    tie = float((counts.astype(np.float64) ** 3 - counts).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return u1, 0.0, 1.0
    diff = u1 - n1 * n2 / 2.0
    z = math.copysign(max(abs(diff) - 0.5, 0.0), diff) / math.sqrt(var)  # continuity-corrected toward 0
    return u1, z, min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


EXACT_MAX = 50  # block counts up to this (both sides, no ties) get the exact distribution of U


def u_counts(n1: int, n2: int) -> list[int]:
    """How many of the C(n1 + n2, n1) orderings of two tie-free samples give U = 0 .. n1 * n2: the coefficients of
    the Gaussian binomial [n1 + n2 choose n1]_q, built as prod_i (1 - q^(n2 + i)) / (1 - q^i) in exact integers."""
    poly = [1]
    for i in range(1, n1 + 1):
        m = n2 + i
        new = poly + [0] * m
        for k in range(len(new) - 1, m - 1, -1):  # times (1 - q^m)
            new[k] -= new[k - m]
        for k in range(i, len(new)):  # divided by (1 - q^i): exact, the quotient is [n2 + i choose i]_q
            new[k] += new[k - i]
        poly = new[:i * n2 + 1]
    return poly


def exact_p(u: float, n1: int, n2: int) -> float:
    """Two-sided exact p of Mann-Whitney U (no ties): 2 x the smaller tail, as scipy's method="exact"."""
    counts = u_counts(n1, n2)
    k = int(round(u))
    total = sum(counts)
    tail = min(sum(counts[:k + 1]), sum(counts[k:]))
    return min(1.0, 2.0 * tail / total)


def check_attainable(iterations: int, alpha: float) -> None:
    """Refuse, before measuring, a run count whose blocks can never show a difference at alpha (both sides alike)."""
    n = len(blocks(np.zeros(iterations)))
    _refuse_unattainable(n, n, alpha, f"{iterations} timed runs ({n} blocks a side)")


def _refuse_unattainable(n1: int, n2: int, alpha: float, what: str) -> None:
    if smallest_p(n1, n2) >= alpha:
        raise UserError(f"{what} can never show a difference at alpha {alpha:g} (the smallest p they can give is "
                        f"{smallest_p(n1, n2):.3g}): profile with more iterations")


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p any two tie-free samples of these sizes can give (all of one below all of the other)."""
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    # ranks 1..n; ties share the mean of their positions
    boundaries = np.flatnonzero(np.diff(sorted_a)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(a)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


MAX_BLOCKS, MIN_BLOCK = 20, 10


def blocks(x: np.ndarray, size: int | None = None) -> np.ndarray:
    """Contiguous blocks of runs, shape (k, size): up to MAX_BLOCKS of at least MIN_BLOCK runs; (n, 1) below 50 runs.
    With `size`, blocks of exactly that many runs (both sides of a comparison use the same size).

    A trailing remainder (fewer than one block) is dropped from the block statistics.
    """
    if size is None:
        k = min(MAX_BLOCKS, len(x) // MIN_BLOCK)
        if k < 5:
            return x.reshape(-1, 1)
        size = len(x) // k
    k = len(x) // size
    return x[:k * size].reshape(k, size)


def bootstrap_median_diff(base: np.ndarray, new: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0,
                          level: float = 0.95, size: int | None = None) -> tuple[list[float], list[float]]:
    """95% bootstrap CIs of median(new) - median(base), in ms and relative to median(base), resampling blocks."""
    rng = np.random.default_rng(seed)

    def medians(x: np.ndarray) -> np.ndarray:
        bl = blocks(x, size)
        pick = bl[rng.integers(0, len(bl), (n_boot, len(bl)))]  # (n_boot, k, size): whole blocks
        return np.median(pick.reshape(n_boot, -1), axis=1)

    b, n = medians(base), medians(new)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    d = n - b
    r = n / b - 1.0
    return ([float(np.percentile(d, lo)), float(np.percentile(d, hi))],
            [float(np.percentile(r, lo)), float(np.percentile(r, hi))])


def compare_profiles(baseline: dict, current: dict, alpha: float = DEFAULT_ALPHA,
                     max_slowdown: float = DEFAULT_MAX_SLOWDOWN, seed: int = 0) -> dict:
    """Latency of `current` vs `baseline` from their samples: verdict faster | slower | within tolerance | no
    significant change."""
    check_measured(baseline, "baseline")
    check_measured(current, "this profile")
    _check_comparable(baseline, current)
    base = np.asarray(baseline["samples_ms"], dtype=np.float64)
    new = np.asarray(current["samples_ms"], dtype=np.float64)
    if len(base) < 2 or len(new) < 2:
        raise UserError("baseline comparison needs at least 2 timed runs in each profile (use --iterations >= 20)")
    # one block size for both sides (the smaller): medians of 15 runs against single runs would compare spreads too
    size = min(blocks(base).shape[1], blocks(new).shape[1])
    bb, bn = blocks(base, size), blocks(new, size)
    med_b, med_n = np.median(bb, axis=1), np.median(bn, axis=1)
    u, z, p = mann_whitney_u(med_n, med_b)
    # few blocks: the normal approximation is too coarse (5 vs 5 can never get below p = 0.012 with it, so the gate
    # could never fail at alpha 0.01); without ties the exact distribution of U is cheap and right
    exact = len(np.unique(np.concatenate([med_n, med_b]))) == len(med_n) + len(med_b) and max(len(bb), len(bn)) <= EXACT_MAX
    if exact:
        p = exact_p(u, len(bn), len(bb))
        _refuse_unattainable(len(bn), len(bb), alpha, f"{len(bn)} vs {len(bb)} timed runs/blocks")
    mb, mn = float(np.median(base)), float(np.median(new))
    rel = mn / mb - 1.0 if mb > 0 else float("inf")
    ci_ms, ci_rel = bootstrap_median_diff(base, new, seed=seed, size=size)
    significant = p < alpha
    if significant and rel > max_slowdown:
        verdict = "slower"
    elif significant and rel < -max_slowdown:
        verdict = "faster"
    elif significant:  # real, but smaller than the effect size that matters
        verdict = "within tolerance"
    else:
        verdict = "no significant change"
    why = (f"p = {_p(p)} {'<' if significant else '>='} alpha {alpha:g}" +
           ("" if not significant or abs(rel) > max_slowdown else
            f"; significant, but |{rel:+.1%}| is within the {max_slowdown:.0%} tolerance"))
    notes = list(_warnings(baseline, current))
    if min(len(bb), len(bn)) < 8:
        notes.append(f"only {min(len(bb), len(bn))} runs/blocks in a profile: little power to see a slowdown; "
                     f"profile with 100 or more iterations")
    return {
        "metric": "latency",
        "test": f"Mann-Whitney U on block medians (two-sided, {'exact' if exact else 'normal approximation'}) + "
                "block-bootstrap CI of the median diff",
        "baseline": {"n": len(base), "blocks": len(bb), "median_ms": mb,
                     "path": baseline.get("artifact", {}).get("path"), "sha256": baseline.get("artifact", {}).get("sha256"),
                     "created": baseline.get("created")},
        "current": {"n": len(new), "blocks": len(bn), "median_ms": mn, "path": current.get("artifact", {}).get("path"),
                    "sha256": current.get("artifact", {}).get("sha256")},
        "diff_ms": mn - mb, "diff_rel": rel, "ci95_diff_ms": ci_ms, "ci95_diff_rel": ci_rel,
        "u": u, "z": z, "p_value": p, "prob_slower": u / (len(bb) * len(bn)),
        "alpha": alpha, "max_slowdown": max_slowdown, "verdict": verdict,
        "status": "fail" if verdict == "slower" else "pass", "reason": why, "notes": notes,
    }


def is_prediction(profile: dict) -> bool:
    """A profile from `--device estimate:NAME`: one predicted latency, no timed runs."""
    return "prediction" in profile or str(profile.get("target", "")).startswith("estimate:")


# what an estimate (one predicted latency, weights + live activations) can stand for; the rest are measurements
PREDICTED_METRICS = ("latency.p50", "latency.mean", "memory.model", "size", "accuracy.drop", "accuracy.top1")


def check_predictable(budgets: list[Budget], target: str) -> None:
    """Refuse budgets an estimate cannot answer (before anything runs), instead of failing them as not measured."""
    if not str(target).startswith("estimate:"):
        return
    bad = [b.metric for b in budgets if b.metric not in PREDICTED_METRICS]
    if bad:
        raise UserError(f"{target} predicts one latency and the model's memory, not {', '.join(bad)}: budget "
                        f"{', '.join(PREDICTED_METRICS[:4])} there (the others need a measurement on the device)")


def check_measured(profile: dict | str, what: str) -> None:
    """Refuse a prediction (a profile, or the device spec that would make one) where a comparison needs timed runs."""
    target = profile if isinstance(profile, str) else (profile.get("target") if is_prediction(profile) else None)
    if target is not None and str(target).startswith("estimate:"):  # one predicted value: no difference to test
        raise UserError(f"{what} is a prediction ({target}), not a measurement: a baseline comparison needs timed "
                        f"runs on both sides (profile on the device itself, or gate the estimate with a budget)")


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _check_comparable(a: dict, b: dict) -> None:
    sa, sb = a.get("settings", {}), b.get("settings", {})
    if sa.get("batch") != sb.get("batch"):
        raise UserError(f"baseline was measured at batch {sa.get('batch')}, this profile at batch {sb.get('batch')}: "
                        f"not comparable")
    shape_a, shape_b = sa.get("input", {}).get("shape"), sb.get("input", {}).get("shape")
    if shape_a and shape_b and shape_a != shape_b:
        raise UserError(f"baseline input shape {shape_a} differs from this profile's {shape_b}: not comparable")


def _warnings(a: dict, b: dict):
    ea, eb = a.get("environment", {}), b.get("environment", {})
    if ea.get("cpu") != eb.get("cpu") or ea.get("hostname") != eb.get("hostname"):
        yield (f"different machines ({ea.get('hostname')}: {ea.get('cpu')} vs {eb.get('hostname')}: {eb.get('cpu')}): "
               f"the difference includes the machines")
    ra, rb = a.get("runtime", {}), b.get("runtime", {})
    for k in ("name", "version", "threads"):
        if ra.get(k) != rb.get(k):
            yield f"runtime {k} differs: {ra.get(k)} vs {rb.get(k)}"
    la, lb = ea.get("load_avg_1m"), eb.get("load_avg_1m")
    cores = eb.get("cores_logical") or 1
    if isinstance(lb, (int, float)) and lb > 0.5 * cores:
        yield f"this machine was busy while profiling (load average {lb:.1f} on {cores} cores)"


# ---- the whole gate ----------------------------------------------------------------------------------------------

def evaluate(profile: dict, budgets: list[Budget] | None = None, baseline: dict | None = None,
             accuracy: list[dict] | None = None, reference: list[dict] | None = None,
             alpha: float = DEFAULT_ALPHA, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
             baseline_missing: str | None = None) -> dict:
    """Budgets and the baseline comparison for one profile -> a report dict (`passed`, `failures`, rows).

    `baseline_missing`: why a comparison that was asked for could not run (a CI job's first run has no previous
    artifact); it becomes a skipped JUnit testcase and a note of the summary, not a failure."""
    if reference is None and baseline is not None and baseline.get("accuracy"):
        reference = [baseline["accuracy"]]
    rows = check_budgets(budgets or [], profile, accuracy, reference)
    comparison = compare_profiles(baseline, profile, alpha, max_slowdown) if baseline is not None else None
    failures = [f"{r['metric']} {r['measured_text']} (limit {r['bound']} {r['limit_text']})"
                for r in rows if r["status"] != "pass"]
    if comparison and comparison["status"] != "pass":
        failures.append(f"latency {comparison['diff_rel']:+.1%} vs baseline "
                        f"(median {comparison['baseline']['median_ms']:.3f} "
                        f"-> {comparison['current']['median_ms']:.3f} ms, p = {_p(comparison['p_value'])})")
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "artifact": profile.get("artifact", {}).get("path"), "target": profile.get("target"),
            "budgets": rows, "baseline": comparison, "accuracy": accuracy, "reference_accuracy": reference,
            "passed": not failures, "failures": failures,
            **({"baseline_missing": baseline_missing, "max_slowdown": max_slowdown, "notes": [baseline_missing]}
               if baseline_missing else {})}


def failure_line(report: dict) -> str:
    return f"{len(report['failures'])} gate(s) failed: " + "; ".join(report["failures"])


# ---- outputs -----------------------------------------------------------------------------------------------------

def to_junit(report: dict | list[dict], suite: str = "compress.gates") -> str:
    """A JUnit XML document: one testsuite per report (artifact), one testcase per budget and one for the baseline
    comparison. A list of reports (a recipe's profile stage, one per artifact) names each suite after its artifact."""
    reports = report if isinstance(report, list) else [report]

    def suite_name(r: dict) -> str:
        if len(reports) == 1:
            return suite
        where = "" if r.get("target") in (None, "local") else f" on {r['target']}"
        return f"{suite} {Path(str(r.get('artifact'))).name}{where}"

    suites = [(_junit_cases(r), r, suite_name(r)) for r in reports]
    def counts(cases: list) -> dict[str, str]:
        statuses = [case[2] for case in cases]
        skipped = statuses.count("skipped")
        return {"tests": str(len(cases)), "failures": str(len(cases) - statuses.count("pass") - skipped),
                "errors": "0", "skipped": str(skipped)}

    root = ET.Element("testsuites", name="compress", **counts([c for cases, _, _ in suites for c in cases]))
    for cases, r, name in suites:
        ts = ET.SubElement(root, "testsuite", name=name, **counts(cases), timestamp=r.get("created", ""),
                           hostname=str(r.get("target") or ""))
        props = ET.SubElement(ts, "properties")
        ET.SubElement(props, "property", name="artifact", value=str(r.get("artifact")))
        for classname, case_name, status, msg, detail in cases:
            tc = ET.SubElement(ts, "testcase", classname=classname, name=case_name, time="0")
            if status == "skipped":  # a JUnit reader shows it as skipped, and a report with only these is not empty
                ET.SubElement(tc, "skipped", message=msg)
            elif status != "pass":
                f = ET.SubElement(tc, "failure", message=msg, type="GateFailed")
                f.text = detail
            else:
                ET.SubElement(tc, "system-out").text = msg
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _junit_cases(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(classname, name, status, message, detail) per budget, and one for the baseline comparison."""
    cases = []
    for r in report["budgets"]:
        msg = f"{r['metric']} = {r['measured_text']}, limit {r['bound']} {r['limit_text']}"
        cases.append(("compress.budget", f"{r['metric']} {r['bound']} {r['limit_text']}", r["status"], msg, r["detail"]))
    c = report.get("baseline")
    if c:
        msg = (f"median {c['baseline']['median_ms']:.4g} -> {c['current']['median_ms']:.4g} ms ({c['diff_rel']:+.1%}, "
               f"95% CI {c['ci95_diff_rel'][0]:+.1%}..{c['ci95_diff_rel'][1]:+.1%}), p = {_p(c['p_value'])}: {c['verdict']}")
        cases.append(("compress.baseline", f"latency vs baseline (max slowdown {c['max_slowdown']:.0%})",
                      c["status"], msg, "; ".join([c["reason"], *c["notes"]])))
    elif report.get("baseline_missing"):
        cases.append(("compress.baseline", f"latency vs baseline (max slowdown {report['max_slowdown']:.0%})",
                      "skipped", report["baseline_missing"], ""))
    return cases


def to_markdown(report: dict, profile: dict | None = None) -> str:
    ok = report["passed"]
    name = Path(str(report.get("artifact"))).name
    if ok and not report["budgets"] and not report.get("baseline"):  # only a skipped comparison (no baseline yet)
        lines = [f"### ➖ compress gates: `{name}`: nothing checked", ""]
    else:
        lines = [f"### {'✅' if ok else '❌'} compress gates: `{name}` {'passed' if ok else 'FAILED'}", ""]
    if profile and is_prediction(profile):
        lines += [f"**Predicted** by `{profile.get('target')}` (roofline over the ONNX graph), not measured: "
                  f"latency ~{profile['latency_ms']['p50']:.3f} ms at batch {profile['settings']['batch']}", ""]
    elif profile:
        lat, rt, env = profile["latency_ms"], profile["runtime"], profile.get("environment", {})
        lines += [f"{rt['name']} {rt['version']}, threads {rt.get('threads') or 'default'}, batch "
                  f"{profile['settings']['batch']}, {lat['n']} runs on {env.get('cpu', '?')} ({profile.get('target')}): "
                  f"p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, p99 {lat['p99']:.3f} ms", ""]
    if report["budgets"]:
        lines += ["| metric | limit | measured | result |", "|---|---|---|---|"]
        for r in report["budgets"]:
            lines.append(f"| `{r['metric']}` | {r['bound']} {r['limit_text']} | {r['measured_text']} | "
                         f"{'✅ pass' if r['status'] == 'pass' else '❌ fail'} |")
        lines.append("")
    c = report.get("baseline")
    if c:
        mark = {"slower": "❌ slower", "faster": "🚀 faster"}.get(c["verdict"], "➖ " + c["verdict"])
        lines += ["| vs baseline | baseline p50 | current p50 | Δ median (95% CI) | p-value | verdict |",
                  "|---|---|---|---|---|---|",
                  f"| latency | {c['baseline']['median_ms']:.3f} ms (n={c['baseline']['n']}) | "
                  f"{c['current']['median_ms']:.3f} ms (n={c['current']['n']}) | {c['diff_rel']:+.1%} "
                  f"({c['ci95_diff_rel'][0]:+.1%} .. {c['ci95_diff_rel'][1]:+.1%}) | {_p(c['p_value'])} | {mark} |", "",
                  f"Mann-Whitney U on block medians ({c['baseline']['blocks']} vs {c['current']['blocks']} blocks), "
                  f"alpha {c['alpha']:g}; a slowdown fails only if significant and over "
                  f"{c['max_slowdown']:.0%}.", ""]
        lines += [f"> ⚠️ {n}" for n in c["notes"]] + ([""] if c["notes"] else [])
    lines += [f"> {n}" for n in report.get("notes") or []] + ([""] if report.get("notes") else [])
    if report["failures"]:
        lines += ["**Failed:** " + "; ".join(report["failures"]), ""]
    return "\n".join(lines) + "\n"


def render(report: dict):
    """Rich renderables: the budget table and the baseline table (whichever exist)."""
    from rich.table import Table

    out = []
    if report["budgets"]:
        t = Table(title="Budgets", title_justify="left")
        for col, just in (("metric", "left"), ("limit", "right"), ("measured", "right"), ("result", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for r in report["budgets"]:
            t.add_row(r["metric"], f"{r['bound']} {r['limit_text']}", r["measured_text"],
                      "[green]pass[/]" if r["status"] == "pass" else "[bold red]FAIL[/]")
        out.append(t)
    c = report.get("baseline")
    if c:
        t = Table(title=f"Latency vs baseline ({c['baseline']['blocks']} vs {c['current']['blocks']} blocks of runs)",
                  title_justify="left",
                  caption=f"{c['reason']}; fails when significant (alpha {c['alpha']:g}) and slower by more than "
                          f"{c['max_slowdown']:.0%}", caption_justify="left")
        for col in ("baseline p50", "current p50", "Δ median", "95% CI", "p-value", "P(slower)", "verdict"):
            t.add_column(col, justify="right" if col != "verdict" else "left")
        colour = {"slower": "bold red", "faster": "green"}.get(c["verdict"], "")
        t.add_row(f"{c['baseline']['median_ms']:.3f} ms", f"{c['current']['median_ms']:.3f} ms",
                  f"{c['diff_ms']:+.3f} ms ({c['diff_rel']:+.1%})",
                  f"{c['ci95_diff_rel'][0]:+.1%} .. {c['ci95_diff_rel'][1]:+.1%}", _p(c["p_value"]),
                  f"{c['prob_slower']:.2f}", f"[{colour}]{c['verdict']}[/]" if colour else c["verdict"])
        out.append(t)
        out += [f"[yellow]note:[/] {n}" for n in c["notes"]]
    return out


def write_text_atomic(path: Path, text: str) -> None:
    from compress.fileio import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)
