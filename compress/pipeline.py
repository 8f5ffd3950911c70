"""The staged pipeline: load -> [prune / quantize / lowrank ...] -> export -> profile, and its manifest.

Every CLI verb is a one-stage recipe run by this engine. A compression stage turns the current model
into a new named variant (saved as `<name>.pt`); export turns variants into artifacts (checked for parity);
profile measures artifacts on a device. The run ends with one table and `manifest.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import __version__
from compress.data import Dataset, has_labels, load_dataset
from compress.errors import GateFailed, UserError
from compress.fileio import atomic_path, ensure_writable_dir, sha256_file
from compress.io import LoadedModel, load_model, save_model
from compress.metrics import count_flops, count_params, evaluate, predict, top1, weight_bytes
from compress.progress import log
from compress.recipe import Recipe, map_spec_path
from compress.stages import Context, build_config, data_flag, data_spec

DEFAULT_NAMES = {"prune": "pruned", "quantize": "quantized", "lowrank": "lowrank"}
STAGE_KEYS = {"stage", "method", "name", "output"}  # stage keys that are not method options


def families() -> dict[str, Any]:
    from compress.lowrank import METHODS as LOWRANK
    from compress.prune import METHODS as PRUNE
    from compress.quantize import METHODS as QUANTIZE

    return {"prune": PRUNE, "quantize": QUANTIZE, "lowrank": LOWRANK}


@dataclass
class Variant:
    name: str
    lm: LoadedModel
    metrics: dict = field(default_factory=dict)
    path: str | None = None


@dataclass
class RunResult:
    variants: dict[str, Variant] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    manifest_path: str | None = None

    @property
    def current(self) -> Variant:
        return list(self.variants.values())[-1]

    def rows(self, eval_names: list[str]) -> list[dict]:
        """One row per artifact (or per variant when nothing was exported), for the table and the manifest."""
        rows = []
        exported = {a["variant"] for a in self.artifacts}
        for v in self.variants.values():
            if v.name not in exported:
                rows.append({"model": v.name, "format": "torch", "precision": v.metrics.get("precision", "fp32"),
                             "accuracy": v.metrics.get("accuracy", {}), "params": v.metrics.get("params"),
                             "flops": v.metrics.get("flops"), "size_bytes": v.metrics.get("size_bytes")})
        for a in self.artifacts:
            v = self.variants[a["variant"]]
            # one row per device it was profiled on (a profile stage each), in stage order
            for prof in [p for p in self.profiles if p["artifact"] == a["path"]] or [None]:
                lat = (prof or {}).get("latency_ms", {})
                rows.append({"model": a["variant"], "format": a["format"], "precision": a["precision"],
                             "accuracy": a.get("accuracy", {}), "params": v.metrics.get("params"),
                             "flops": v.metrics.get("flops"), "size_bytes": a["size_bytes"],
                             "device": (prof or {}).get("device"), "p50_ms": lat.get("p50"),
                             # an estimate is one predicted value: no p90 to show
                             "p90_ms": None if "prediction" in (prof or {}) else lat.get("p90"),
                             "peak_rss_mb": _mib((prof or {}).get("memory", {}).get("peak_rss_bytes"))})
        return rows


EXPORT_KEYS = ("stage", "formats", "format", "precision", "batch", "variants", "output", "eval")


def _check_keys(stage: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(stage) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known[1:])}" if known[1:] else "it takes no other key"
        raise UserError(f"{stage['stage']} stage: unknown key(s) {', '.join(unknown)} ({takes})")


def _export_formats(stage: dict) -> list[str]:
    """`formats: [onnx, openvino]`, `formats: onnx` or `format: onnx` (the CLI's singular)."""
    formats = stage.get("formats", stage.get("format", "onnx"))
    formats = [formats] if isinstance(formats, str) else formats
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise UserError(f"export: formats must be a format or a list of them (onnx, openvino, ort, tensorrt), "
                        f"got {formats!r}")
    return formats


def _export_variants(stage: dict) -> str | list:
    chosen = stage.get("variants", "all")
    return [chosen] if isinstance(chosen, str) and chosen != "all" else chosen


# a profile stage's own keys; every other key is a measuring or device option (ProfileOptions, the device's)
PROFILE_STAGE_KEYS = ("stage", "budget", "rounds", "baseline", "max_slowdown", "alpha", "junit", "summary")


def _profile_options(stage: dict) -> dict:
    """A profile stage's measuring and device options (every key but the stage's own)."""
    return {k: v for k, v in stage.items() if k not in PROFILE_STAGE_KEYS}


def _gate_settings(stage: dict) -> tuple[float, float]:
    """(max_slowdown, alpha) of a profile stage, as `compress profile --max-slowdown/--alpha` (5%, 0.01)."""
    from compress import gates

    slowdown = gates.parse_fraction(stage.get("max_slowdown", gates.DEFAULT_MAX_SLOWDOWN), "profile: max_slowdown")
    alpha = stage.get("alpha", gates.DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UserError(f"profile: alpha must be between 0 and 1, got {alpha!r}")
    return slowdown, float(alpha)


def _unknown_profile_keys(keys: list[str]) -> str:
    import difflib

    from devices.base import ProfileOptions

    known = sorted({*PROFILE_STAGE_KEYS[1:], *(f.name for f in dataclasses.fields(ProfileOptions)), "device"})
    hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in keys]
    return f"profile stage: unknown key(s) {', '.join(hints)}; it takes {', '.join(known)} and the device's options"


def _check_opens(path: Path, runtime: str) -> None:
    from runtimes import open_session

    try:
        with open_session(path, runtime):
            pass
    except UserError as e:
        raise UserError(f"profile: baseline {e}") from None


def _baseline_dir(stage: dict) -> Path | None:
    """A profile stage's `baseline:` folder (a manifest.json in it names the folder too), or None."""
    value = stage.get("baseline")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"profile: baseline is a folder holding the previous run's artifacts, got {value!r}")
    path = Path(os.path.normpath(value))
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    elif path.is_file():
        raise UserError(f"profile: baseline {path} is a file: give the folder that holds the previous artifacts")
    if not path.is_dir():
        raise UserError(f"profile: baseline folder not found: {path}")
    return path


def _device_name(spec: str) -> str:
    """A device spec as shown and recorded: without its ?options (key files, interpreters)."""
    return str(spec or "local").strip().split("?", 1)[0] or "local"


def unique_name(base: str, taken) -> str:
    """A variant's name: `base`, or base2, base3 ... when a stage before took it."""
    name, i = base, 2
    while name in taken:
        name, i = f"{base}{i}", i + 1
    return name


def _check_positive_int(value: Any, what: str, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer{meaning}, got {value!r}")


class Pipeline:
    def __init__(self, recipe: Recipe, out_dir: Path | None, write_manifest: bool = True,
                 manifest_name: str = "manifest.json", replace_previous: bool = False, save_recipe: Path | None = None):
        self.manifest_name = manifest_name
        self.save_recipe = save_recipe
        self.replace_previous = replace_previous
        self.recipe = recipe
        self._made_out_dir = out_dir is not None and not Path(out_dir).exists()
        self.out_dir = ensure_writable_dir(Path(out_dir)) if out_dir is not None else None
        self.write_manifest = write_manifest and self.out_dir is not None
        self.result = RunResult()
        self.ctx: Context | None = None
        self.eval_sets: dict[str, Dataset] = {}
        self.started = datetime.now(timezone.utc)

    # ---- set-up --------------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Check every stage's method and options before any work starts: a typo fails in a second."""
        fams = families()
        from compress.data import check_source

        for specs in self.recipe.data.values():  # a missing file fails now, not when its stage comes
            for spec in specs if isinstance(specs, list) else [specs]:
                if not isinstance(spec, str):
                    continue
                # generated sources (genie[:N], noise[:N]: a recipe rebases them into its folder) and text corpora
                if Path(spec).name.partition(":")[0] not in ("genie", "noise") and not spec.startswith("text:"):
                    check_source(spec)
        quantized_by = None
        names, exported = ["original"], False  # the variants each stage will see, named as the stages will
        # files the run writes into the output folder, so a junit/summary name cannot overwrite one of them
        written = {self.manifest_name: "the manifest"}
        profiled_on: set[str] = set()
        exported_formats: set[str] = set()
        for s in self.recipe.stages:
            if s["stage"] in ("prune", "lowrank") and quantized_by is not None:
                raise UserError(f"stage {s['stage']} comes after {quantized_by}: {s['stage']} the float model, then "
                                f"quantize (put the quantize stage last)")
            if s["stage"] == "quantize":
                quantized_by = f"quantize ({s.get('method', '?')})"
            name = s.get("name")
            if name is not None and (not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..")):
                raise UserError(f"stage {s['stage']}: name {name!r} must be a plain file name (no folders): the stage's "
                                f"files go into the output folder")
            if s["stage"] in fams:
                if "method" not in s:
                    raise UserError(f"stage {s['stage']}: needs `method:` (one of {', '.join(fams[s['stage']].names())})")
                method = fams[s["stage"]].get(s["method"])
                cfg = build_config(method, {k: v for k, v in s.items() if k not in STAGE_KEYS})
                for role in method.needs_data:  # found out after loading the model (and the stages before), before
                    if not data_spec(self.recipe.data, role):
                        raise UserError(f"stage {s['stage']}: {method.name} needs {role} data: pass {data_flag(role)} (or "
                                        f"`data: {{{role}: ...}}` in the recipe)")
                if getattr(cfg, "finetune_epochs", 0) and not self.recipe.data.get("train"):
                    raise UserError(f"stage {s['stage']}: finetune_epochs {cfg.finetune_epochs} needs train data: pass "
                                    f"--data (or `data: {{train: ...}}` in the recipe)")
                if getattr(cfg, "finetune_epochs", 0) and getattr(cfg, "distill", True) is False \
                        and has_labels(self.recipe.data["train"]) is False:  # found out after pruning, before
                    raise UserError(f"fine-tuning on {self.recipe.data['train']} needs labels ('y') or distillation "
                                    f"from the original model (the default; it was turned off)")
                names.append(unique_name(name or DEFAULT_NAMES[s["stage"]], names))
                written[f"{names[-1]}.pt"] = f"the {names[-1]} model"
            elif s["stage"] == "export":
                from exporters import EXPORTERS
                from exporters.base import PRECISIONS

                _check_keys(s, EXPORT_KEYS)
                formats = _export_formats(s)
                for f in formats:
                    EXPORTERS.get(f)
                chosen = _export_variants(s)
                if chosen != "all":
                    if not isinstance(chosen, list) or not all(isinstance(n, str) for n in chosen):
                        raise UserError(f"export: variants must be `all` or a list of names, got {chosen!r}")
                    unknown = [n for n in chosen if n not in names]
                    if unknown:
                        raise UserError(f"export: no variant {', '.join(map(repr, unknown))} at this point of the recipe "
                                        f"(there are: {', '.join(names)})")
                exported = True
                exported_formats.update(formats)
                if not s.get("output"):
                    from exporters import SUFFIX

                    from exporters.ort import companion_paths

                    for v in (names if chosen == "all" else chosen):
                        for f in formats:
                            files = {"ort": [p.name for p in companion_paths(Path(v + SUFFIX[f])).values()],
                                     "openvino": [v + SUFFIX[f], v + ".bin"]}.get(f, [v + SUFFIX.get(f, "." + f)])
                            written.update({name: f"the {f} export of {v}" for name in files})
                if "tensorrt" in formats:  # not after the stages before it have run for minutes
                    from exporters.tensorrt import import_tensorrt, require_gpu

                    import_tensorrt()
                    require_gpu()
                if s.get("precision", "auto") not in PRECISIONS:
                    raise UserError(f"export: unknown precision {s['precision']!r} (one of {', '.join(PRECISIONS)})")
                if "ort" in formats and s.get("precision") == "fp16":
                    from exporters.ort import FP16_REFUSAL

                    raise UserError(FP16_REFUSAL)
                if s.get("batch") is not None:
                    _check_positive_int(s["batch"], "export: batch", " (a fixed batch size)")
            elif s["stage"] == "eval":
                _check_keys(s, ("stage",))  # `{stage: eval, method: foo}` was silently the plain eval
                if not self.recipe.data.get("eval"):
                    raise UserError("eval stage: no eval data (data: eval: [cifar10:test.npz] in the recipe, or "
                                    "--eval-data)")
            elif s["stage"] == "profile":
                from compress import gates
                from devices import ProfileOptions, device_kind, get_device, split_options

                if not exported:
                    raise UserError("profile stage: nothing exported before it (add an export stage before it)")
                _check_positive_int(s.get("rounds", 1), "profile: rounds")
                profile_opts, device_opts = split_options(_profile_options(s))
                measuring = ProfileOptions.coerce(profile_opts)
                device = _device_name(device_opts.get("device", "local"))
                if device_opts.keys() - {"device"} and device_kind(device) == "local":  # a typo, not a device option
                    raise UserError(_unknown_profile_keys(sorted(device_opts.keys() - {"device"})))
                get_device(device_opts.pop("device", "local"), **device_opts)  # its options, not a connection
                if device.startswith("estimate:") and "onnx" not in exported_formats:
                    raise UserError(f"profile: {device} predicts from ONNX graphs and nothing before it exports "
                                    f"onnx (add onnx to an export stage's formats)")
                if device in profiled_on:  # same file names: the second stage would overwrite the first's
                    raise UserError(f"profile: two profile stages on {device}; one per device (it writes "
                                    f"<artifact>{'' if device == 'local' else '.<device>'}.profile.json)")
                profiled_on.add(device)
                budgets = gates.parse_budget(s.get("budget"))
                if gates.needs_accuracy(budgets) and not self.recipe.data.get("eval"):
                    raise UserError("profile stage: an accuracy budget needs eval data (data: eval: [...]) in the recipe")
                gates.check_predictable(budgets, device)
                _, alpha = _gate_settings(s)
                base = _baseline_dir(s)
                if base is not None:
                    gates.check_measured(device, "profile: this stage's device")
                    gates.check_attainable(measuring.iterations, alpha)
                elif {"max_slowdown", "alpha"} & s.keys():
                    raise UserError(f"profile: {' and '.join(sorted({'max_slowdown', 'alpha'} & s.keys()))} set the "
                                    f"comparison with a baseline: add `baseline:` (a folder with the previous artifacts)")
                if base is not None and self.out_dir is not None and base.resolve() == self.out_dir.resolve():
                    raise UserError(f"profile: baseline {base} is this run's output folder, whose files this run "
                                    f"replaces: keep the previous run's artifacts in another folder")
                for key in ("junit", "summary"):
                    value = s.get(key)
                    if value is None:
                        continue
                    if not isinstance(value, str) or Path(value).name != value or value in ("", ".", ".."):
                        raise UserError(f"profile: {key} is a file name, written into the output folder; got {value!r}")
                    if value in written or value.endswith((".profile.json", ".gates.json")):
                        raise UserError(f"profile: {key}: {value} is a file this run writes "
                                        f"({written.get(value, 'a profile or gate report')}); choose another name")
                    if not budgets and base is None:
                        raise UserError(f"profile: {key} reports the stage's gates, and it has none: add `budget:` "
                                        f"and/or `baseline:` (a folder with the previous artifacts)")
                    written[value] = f"the {key} of the profile stage on {device}"

    def _load(self) -> None:
        r = self.recipe
        lm = load_model(r.model, arch=r.arch, trust_pickle=r.trust_pickle,
                        input_shape=tuple(r.input_shape) if r.input_shape else None, normalization=r.mean_std)
        compressing = [s["stage"] for s in r.stages if s["stage"] in ("prune", "quantize", "lowrank")]
        if compressing:  # each stage saves its model: refused now, not after the work
            lm.require_savable(compressing[0])
        torch.manual_seed(r.seed)
        self.ctx = Context(spec=lm.spec, data={k: v for k, v in r.data.items() if k != "eval"}, seed=r.seed,
                           out_dir=self.out_dir)
        for spec in r.data.get("eval") or []:
            ds = load_dataset(spec, lm.spec.shape, r.seed)
            if ds.labels is None:
                raise UserError(f"eval data {spec} has no labels ('y')")
            name, i = Path(ds.source).stem, 2
            if name in self.eval_sets:  # d1/test.npz and d2/test.npz: both kept, told apart by their folder
                name = f"{Path(ds.source).parent.name}/{name}"
            while name in self.eval_sets:
                name, i = f"{Path(ds.source).stem}#{i}", i + 1
            self.eval_sets[name] = ds
        self.result.variants["original"] = Variant("original", lm, self._model_metrics(lm, "original"),
                                                   path=lm.source)

    # ---- stages ------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        except BaseException:
            # a run that fails before writing anything leaves no trace: not even the folder it created
            if self._made_out_dir and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()
            raise

    def _run(self) -> RunResult:
        self._validate()
        self._load()
        if self.save_recipe:  # only a recipe that was accepted: a refused call leaves no file behind
            self.recipe.save(self.save_recipe)
        if self.replace_previous:
            self._remove_previous_run()
        gate_failures: list[GateFailed] = []  # a profile stage's failed gates: the later stages still run
        try:
            for i, stage in enumerate(self.recipe.stages):
                t0 = time.perf_counter()
                kind = stage["stage"]
                try:
                    record = getattr(self, f"_stage_{kind}")(stage) or {}
                except GateFailed as failure:
                    if getattr(failure, "stage_record", None) is None:
                        raise
                    record = failure.stage_record  # every artifact was profiled and its files written
                    gate_failures.append(failure)
                record = {"index": i, "stage": kind, **record, "seconds": round(time.perf_counter() - t0, 2)}
                self.result.stages.append(record)
        except GateFailed as failure:  # a gate that stops the run (export parity): record it, then fail
            if self.write_manifest:
                self.result.manifest_path = str(self._write_manifest(status=f"gate failed: {failure}"))
            raise
        except BaseException as failure:
            # stages that finished left their files: the manifest says what they are and where the run stopped
            # (a run that failed in its first stage wrote nothing and leaves nothing); also on Ctrl-C / SIGTERM, so
            # the next run into this folder finds and replaces them
            if self.write_manifest and self.result.stages:
                from compress.errors import first_line

                stage = self.recipe.stages[len(self.result.stages)]
                why = "interrupted" if isinstance(failure, KeyboardInterrupt) else first_line(failure, 200)
                if gate_failures:  # a profile stage before this one failed its gates: keep that on record
                    why += f"; before that, gate failed: {' | '.join(str(f) for f in gate_failures)}"
                self.result.manifest_path = str(self._write_manifest(
                    status=f"failed in stage {len(self.result.stages)} ({stage['stage']}): {why}"))
            raise
        if gate_failures:  # every stage ran: record the run, then fail it (a CI job wants both)
            failure = GateFailed(" | ".join(str(f) for f in gate_failures))
            if self.write_manifest:
                self.result.manifest_path = str(self._write_manifest(status=f"gate failed: {failure}"))
            raise failure
        if self.write_manifest:
            self.result.manifest_path = str(self._write_manifest())
        return self.result

    def _stage_eval(self, stage: dict) -> dict:
        v = self.result.current
        v.metrics["accuracy"] = self._accuracy_torch(v.lm)
        return {"variant": v.name, "accuracy": v.metrics["accuracy"]}

    def _compress(self, stage: dict) -> dict:
        fam = families()[stage["stage"]]
        method = fam.get(stage["method"])
        cfg = build_config(method, {k: v for k, v in stage.items() if k not in STAGE_KEYS})
        src = self.result.current
        src.lm.require_compressible(stage["stage"])
        if stage["stage"] in ("prune", "lowrank"):
            from exporters.onnx import model_precision

            precision = model_precision(src.lm.model)
            if precision != "fp32":  # the fake-quant wrappers would be dropped or break shapes
                raise UserError(f"{src.lm.source} is quantized ({precision}): {stage['stage']} the float model, then "
                                f"quantize")
        if hasattr(cfg, "check_model"):  # options that only make sense for some models: refuse before any work
            cfg.check_model(src.lm)
        source = f" ({Path(src.lm.source).name})" if src.name == "original" and src.lm.source else ""
        log(f"[bold]{stage['stage']}[/] {method.name} on {src.name}{source}")
        lm = method.apply(_clone(src.lm), cfg, self.ctx)
        name = unique_name(stage.get("name") or DEFAULT_NAMES[stage["stage"]], self.result.variants)
        variant = Variant(name, lm, self._model_metrics(lm, name))
        dry_run = bool(lm.history and lm.history[-1].get("dry_run"))
        if dry_run:  # a plan to look at: nothing is written, not even the manifest
            self.write_manifest = False
        elif stage.get("output") or self.out_dir is not None:
            variant.path = str(save_model(lm, Path(stage.get("output") or self.out_dir / f"{name}.pt")))
        self.result.variants[name] = variant
        record = {"method": method.name, "config": _jsonable(cfg.__dict__), "input": src.name, "output": name,
                  "metrics": variant.metrics, "path": variant.path}
        if dry_run:
            record.update(dry_run=True, plan=lm.history[-1].get("plan"))
        return record

    _stage_prune = _stage_quantize = _stage_lowrank = _compress

    def _stage_export(self, stage: dict) -> dict:
        from exporters import EXPORTERS, artifact_path

        if self.out_dir is None:
            raise UserError("export needs an output folder (-o)")
        formats = _export_formats(stage)
        precision = stage.get("precision", "auto")
        batch = stage.get("batch")  # checked in _validate
        names = _export_variants(stage)
        variants = list(self.result.variants.values()) if names == "all" else [self.result.variants[n] for n in names]
        parity_x = self._parity_images()
        made = []
        for v in variants:
            for fmt in formats:
                path = artifact_path(Path(stage["output"]) if stage.get("output") else self.out_dir / v.name, fmt)
                # the input model is the "original" variant: name its file, which is what the user gave (a pruned.pt)
                label = Path(v.lm.source).name if v.name == "original" else v.name
                log(f"[bold]export[/] {label} -> {path.name}")
                # batch None: a dynamic batch axis, unless the model only takes one batch size (a static .pt2)
                spec = replace(v.lm.spec, batch=batch or v.lm.spec.batch)
                art = EXPORTERS.get(fmt)(v.lm.model, spec, path, precision, parity_x).to_dict()
                art["variant"] = v.name
                art["notes"] = [*_method_notes(v.lm), *art["notes"]]
                if stage.get("eval", True) and self.eval_sets:
                    art["accuracy"] = self._accuracy_artifact(art)
                self.result.artifacts.append(art)
                made.append(art)
        return {"artifacts": [{"path": a["path"], "format": a["format"], "precision": a["precision"],
                               "parity": a["parity"]} for a in made]}

    def _stage_profile(self, stage: dict) -> dict:
        """Profile every artifact; with `budget:` ({metric: limit} or "metric=limit,...") and/or `baseline:`, gate each.

        Budgets are those of `compress profile --budget` (compress/gates.py); accuracy.drop compares each artifact's
        top-1 with the original model's on the recipe's eval sets (the worst set counts). `baseline: FOLDER` holds
        the previous run's artifacts under the same file names: each is profiled here, in the same interleaved
        rounds as its new version (a profile from another machine or minute would compare machines), and the new
        one fails when significantly slower by more than `max_slowdown` (5%; `alpha` 0.01), as `compress profile
        --baseline`. Where the folder has no artifact but that artifact's .profile.json, the recorded profile is the
        baseline. `junit:` / `summary:` name a JUnit XML / markdown file of every artifact's gates in the output
        folder. A violated gate fails the run (exit 1) after every artifact was profiled and its files written.
        `rounds: N` profiles every artifact N times, interleaved (round 1 of each artifact, then round 2 ...), each
        in a fresh process, and keeps the round with the median p50: on a shared machine one process can run 20-30%
        slow, and interleaving spreads drift over all artifacts alike. Every round's p50 is recorded.
        """
        from compress import gates
        from devices import profile_interleaved
        from devices.profile import load_profile
        from runtimes import default_runtime_for

        budgets = gates.parse_budget(stage.get("budget"))  # checked in _validate, with the stages before it
        slowdown, alpha = _gate_settings(stage)
        base_dir = _baseline_dir(stage)
        opts = _profile_options(stage)
        rounds = stage.get("rounds", 1)
        device = _device_name(stage.get("device", "local"))
        # a second profile stage on another device must not overwrite this one's files
        tag = "" if device == "local" else "." + re.sub(r"[^A-Za-z0-9._@-]+", "-", device).strip("-")
        where = "" if device == "local" else f" on {device}"
        arts = self.result.artifacts
        if device.startswith("estimate:"):  # it predicts from ONNX graphs: the other formats are not estimated
            skipped = [Path(a["path"]).name for a in arts if Path(a["path"]).suffix.lower() != ".onnx"]
            if skipped:
                log(f"[yellow]profile:[/] {device} reads ONNX graphs; not estimated: {', '.join(skipped)}")
            arts = [a for a in arts if Path(a["path"]).suffix.lower() == ".onnx"]
        runtimes = [{"onnx": "onnxruntime", "openvino": "openvino", "ort": "onnxruntime"}.get(a["format"])
                    or default_runtime_for(a["path"]) for a in arts]
        jobs = [(a["path"], rt, Path(a["path"]).name) for a, rt in zip(arts, runtimes)]
        baselines: dict[int, dict | int] = {}  # artifact index -> recorded profile, or the index of its job
        for i, a in enumerate(arts):
            name = Path(a["path"]).name
            if base_dir is None:
                continue
            if (base_dir / name).is_file():
                _check_opens(base_dir / name, runtimes[i])  # a broken baseline fails now, not after a round
                baselines[i] = len(jobs)
                jobs.append((str(base_dir / name), runtimes[i], f"{name} (baseline)"))
            elif (base_dir / f"{name}{tag}.profile.json").is_file():
                recorded = base_dir / f"{name}{tag}.profile.json"
                baselines[i] = load_profile(recorded)
                gates.check_measured(baselines[i], f"baseline {recorded}")  # before anything is measured
            else:
                log(f"[yellow]profile:[/] no baseline for {name} in {base_dir} (neither the artifact nor its profile)")
        measured = profile_interleaved(
            [(path, rt) for path, rt, _ in jobs], rounds,
            announce=lambda i, r: log(f"[bold]profile[/] {jobs[i][2]} with {jobs[i][1]}{where}"
                                      + (f" (round {r + 1}/{rounds})" if rounds > 1 else "")), **opts)

        def kept(profs: list[dict]) -> dict:
            if rounds == 1:
                return profs[0]
            p50 = lambda p: (p.get("latency_ms") or {}).get("p50", math.inf)  # noqa: E731
            return {**sorted(profs, key=p50)[(rounds - 1) // 2], "rounds_p50_ms": [p50(p) for p in profs]}

        done, failed, reports = [], [], []
        for i, art in enumerate(arts):
            prof = kept(measured[i])
            prof_path = Path(art["path"]).with_name(Path(art["path"]).name + tag + ".profile.json")
            with atomic_path(prof_path) as tmp:
                tmp.write_text(json.dumps(prof, indent=2))
            entry = {**prof, "artifact": art["path"], "path": str(prof_path), "device": device}
            self.result.profiles.append(entry)  # listed in the manifest even if a later step of this stage fails
            done.append(str(prof_path))
            base = baselines.get(i)
            base = kept(measured[base]) if isinstance(base, int) else base
            # no baseline yet (a CI job's first run): a skipped check and a note in the summary, not only in the log
            missing = (f"no baseline for {Path(art['path']).name} in {base_dir}: latency not compared"
                       if base_dir is not None and i not in baselines else None)
            if budgets or base is not None or missing:
                reference = self.result.variants["original"].metrics.get("accuracy", {})
                report = gates.evaluate(prof, budgets, base,
                                        accuracy=[gates.accuracy_record(v, k) for k, v in art.get("accuracy", {}).items()],
                                        reference=[gates.accuracy_record(v, k) for k, v in reference.items()],
                                        alpha=alpha, max_slowdown=slowdown, baseline_missing=missing)
                gates_path = Path(art["path"]).with_name(Path(art["path"]).name + tag + ".gates.json")
                with atomic_path(gates_path) as tmp:
                    tmp.write_text(json.dumps(_jsonable(report), indent=2))
                entry["gates"] = {"passed": report["passed"], "failures": report["failures"], "path": str(gates_path)}
                reports.append((report, prof))
                if not report["passed"]:
                    failed.append(f"{Path(art['path']).name}{where}: {'; '.join(report['failures'])}")
        record: dict[str, Any] = {"profiles": done}
        if budgets:
            record["budget"] = [b.text for b in budgets]
        if base_dir is not None:
            record["baseline"] = {"folder": str(base_dir), "max_slowdown": slowdown, "alpha": alpha,
                                  "compared": [Path(arts[i]["path"]).name for i in baselines]}
        for key, text in (("junit", lambda: gates.to_junit([r for r, _ in reports])),
                          ("summary", lambda: "".join(gates.to_markdown(r, p) for r, p in reports))):
            if stage.get(key):  # every artifact has a report (a missing baseline is a skipped check)
                path = self.out_dir / stage[key]
                gates.write_text_atomic(path, text())
                record[key] = str(path)
        if failed:
            from compress.errors import GateFailed

            failure = GateFailed(f"profile gates failed for {len(failed)} artifact(s): {' | '.join(failed)}")
            failure.stage_record = record  # the manifest still lists this stage's files (a re-run deletes them)
            raise failure
        return record

    # ---- helpers -----------------------------------------------------------------------------------------
    def _remove_previous_run(self) -> None:
        """`compress run` into a folder an earlier run wrote: delete the files its manifest lists, so no stale
        artifact, profile or gate report sits beside the new ones (a CI job uploads *.gates.json). Only files
        inside the folder, never the input model or data of this recipe, never files the manifest doesn't list."""
        old = self.out_dir / self.manifest_name
        try:
            manifest = json.loads(old.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(manifest, dict):  # not one this toolchain wrote: it names nothing to remove
            return
        listed = [v.get("path") for n, v in (manifest.get("variants") or {}).items() if n != "original"]
        listed += [f for a in manifest.get("artifacts") or [] for f in a.get("files") or [a.get("path")]]
        for p in manifest.get("profiles") or []:
            listed += [p.get("path"), (p.get("gates") or {}).get("path")]
        listed += [s.get(k) for s in manifest.get("stages") or [] if isinstance(s, dict) for k in ("junit", "summary")]
        keep = {Path(self.recipe.model).resolve()}

        def kept(p: str) -> str:
            keep.add(Path(p).resolve())
            return p

        for specs in self.recipe.data.values():  # the recipe's data files, found by its own spec parser
            for spec in specs if isinstance(specs, list) else [specs]:
                if isinstance(spec, str):
                    map_spec_path(spec, kept)
        folder, removed = self.out_dir.resolve(), 0
        # by name inside the folder: the manifest's paths are relative to wherever that run was started from
        for f in {(Path(f) if Path(f).is_absolute() else folder / Path(f).name).resolve()
                  for f in listed if isinstance(f, str) and f}:
            if f.parent == folder and f not in keep and f.is_file():
                f.unlink()
                removed += 1
        old.unlink(missing_ok=True)
        log(f"{self.out_dir}: replaced the previous run ({removed} file(s) its manifest listed)")

    def _model_metrics(self, lm: LoadedModel, name: str) -> dict:
        m: dict[str, Any] = {"params": count_params(lm.model)}
        try:
            m["flops"] = count_flops(lm.model, lm.spec.shape)
        except Exception:  # noqa: BLE001 - an exotic module FlopCounterMode cannot trace: say unknown, don't fail
            m["flops"] = None
        if lm.kind != "torchscript":
            m["size_bytes"] = weight_bytes(lm.model)  # as deployed: a quantized model's weights at their bit-width
        from exporters.onnx import model_precision

        m["precision"] = model_precision(lm.model)
        if self.eval_sets:
            m["accuracy"] = self._accuracy_torch(lm)
        return m

    def _accuracy_torch(self, lm: LoadedModel) -> dict[str, float]:
        norm = self.ctx.normalizer()
        return {name: round(evaluate(lm.model, ds, norm), 2) for name, ds in self.eval_sets.items()}

    def _accuracy_artifact(self, art: dict) -> dict[str, float]:
        from runtimes import open_session

        session = open_session(art["path"])  # the runtime follows the artifact's suffix
        norm = self.ctx.normalizer()
        return {name: round(top1(predict(lambda x: session.run(x.numpy()), ds, norm, description=f"evaluate {Path(art['path']).name}"), ds.labels), 2)
                for name, ds in self.eval_sets.items()}

    def _parity_images(self) -> torch.Tensor | None:
        ds = next(iter(self.eval_sets.values()), None) or self.ctx.dataset("calib")
        if ds is None:
            return None
        return self.ctx.normalizer()(ds.images[:256], ds.prenormalized)

    def _fingerprint(self, role: str) -> str | None:
        """Image data sets are hashed; sources a stage generates or reads itself (genie, text:...) are named only."""
        try:
            return self.ctx.dataset(role).fingerprint()
        except UserError:
            return None

    def _write_manifest(self, status: str = "ok") -> Path:
        orig = self.result.variants["original"].lm
        manifest = {
            "schema": "compress.manifest/1",
            "status": status,
            "created": self.started.isoformat(timespec="seconds"),
            "tool": {"name": "edge-compress", "version": __version__},
            "environment": {"python": platform.python_version(), "platform": platform.platform(),
                            "versions": _versions()},
            "seed": self.recipe.seed,
            "input_model": {"path": orig.source, "sha256": orig.sha256, "kind": orig.kind, "arch": orig.arch},
            "recipe": self.recipe.to_dict(),
            "data": {**{role: {"spec": spec, "fingerprint": self._fingerprint(role)}
                        for role, spec in self.ctx.data.items() if spec},
                     "eval": {name: {"source": ds.source, "n": len(ds), "fingerprint": ds.fingerprint()}
                              for name, ds in self.eval_sets.items()}},
            "stages": self.result.stages,
            "variants": {n: {"path": v.path, "sha256": sha256_file(Path(v.path)) if v.path and Path(v.path).is_file() else None,
                             "history": v.lm.history, "metrics": v.metrics} for n, v in self.result.variants.items()},
            "artifacts": self.result.artifacts,
            "profiles": [{"artifact": p["artifact"], "device": p["device"], "path": p["path"],
                          **({"gates": p["gates"]} if "gates" in p else {})} for p in self.result.profiles],
            "table": self.result.rows(list(self.eval_sets)),
        }
        path = self.out_dir / self.manifest_name
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(_jsonable(manifest), indent=2))
        return path


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / (1 << 20), 1)


def _method_notes(lm: LoadedModel) -> list[str]:
    """What the methods that made this model say about exporting it (FTWT: static vs masked-dense)."""
    notes = []
    for entry in lm.history:
        fam = families().get(entry.get("stage"))
        if fam is not None and entry.get("method") in fam:
            notes += fam.get(entry["method"]).export_notes(entry)
    return notes


def _clone(lm: LoadedModel) -> LoadedModel:
    import copy

    return copy.deepcopy(lm)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "openvino", "torch-pruning", "nncf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
