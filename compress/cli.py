"""The `compress` command line. Each verb builds a one-stage recipe and runs the shared pipeline engine.

Method options are generated from the method registries (each method's Config dataclass), so a newly
registered method or option appears here without changes to this file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any

import click

from compress.errors import GateFailed, UserError
from compress.recipe import Recipe
from exporters.base import PRECISIONS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# ---- shared option groups ---------------------------------------------------------------------------------
def model_options(f):
    f = click.option("--arch", help="Architecture of a state dict: a zoo name (resnet20, ...) or package.module:factory.")(f)
    f = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled full module (runs code from the file).")(f)
    f = click.option("--input-shape", help="Input shape without batch, e.g. 3,32,32 (TorchScript and custom archs).")(f)
    return normalization_options(f)


def normalization_options(f):
    f = click.option("--std", help="Per-channel std the model expects, with --mean (default: the model's own).")(f)
    f = click.option("--mean", help="Per-channel mean the model expects, in [0, 1] pixel units: input = "
                                    "(pixel / 255 - mean) / std, e.g. --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 "
                                    "(default: the model's own; for custom archs, .pt2, TorchScript and artifacts "
                                    "that record none, the zoo's: ImageNet's 0.485,0.456,0.406 / 0.229,0.224,0.225).")(f)
    return f


def output_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")(f)
    f = click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the result.")(f)
    return f


def data_options(f):
    f = click.option("--data", "train", help="Training / fine-tuning data, e.g. cifar10:train.npz (labels optional).")(f)
    f = click.option("--calib", help="Calibration data (unlabeled is fine), e.g. cifar10:calib.npz; genie[:N] "
                                     "synthesizes it from the BatchNorm statistics, noise[:N] is Gaussian noise; "
                                     "defaults to --data (for -m genie without --data: genie).")(f)
    f = click.option("--eval-data", "eval_data", multiple=True, help="Labeled data to report accuracy on (repeatable).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--save-recipe", type=click.Path(path_type=Path), help="Also write the recipe this call corresponds to.")(f)
    return f


def method_options(family: str):
    """click options for the union of the family's method config fields (validated per method later)."""
    from compress.pipeline import families

    registry = families()[family]
    seen: dict[str, tuple[Any, dataclasses.Field]] = {}
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}  # option -> the methods that take it
    for name in registry.names():
        cfg_cls = registry.get(name).Config
        hints = typing.get_type_hints(cfg_cls)
        for fld in dataclasses.fields(cfg_cls):
            seen.setdefault(fld.name, (hints[fld.name], fld))
            owners.setdefault(fld.name, []).append((name, fld))

    def deco(f):
        for fname, (hint, fld) in sorted(seen.items(), reverse=True):
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            typ = base[0] if base[0] in (int, float, str, bool) else str
            choices = fld.metadata.get("choices")
            help_text = _shared_help(owners[fname], len(registry.names()))
            flag = "--" + fname.replace("_", "-")
            if typ is bool:
                f = click.option(f"{flag}/--no-{flag[2:]}", fname, default=None, help=help_text)(f)
            else:
                ptype = click.Choice([str(c) for c in choices]) if choices else typ
                f = click.option(flag, fname, type=ptype, default=None, help=help_text)(f)
        return f

    return deco, sorted(seen)


def _shared_help(owners: list[tuple[str, dataclasses.Field]], n_methods: int) -> str:
    """One option's help over the methods that take it: which methods (when not all), and each method's own text
    and default where they differ (minmax calibrates on 512 images by default, nncf on 300). A None default is
    left out: the help says where the value comes from (a preset, another option)."""
    def default(fld: dataclasses.Field) -> Any:
        return fld.default if fld.default is not dataclasses.MISSING else None

    def tag(value: Any) -> str:
        return "" if value is None else f" [default: {value}]"

    helps = list(dict.fromkeys(fld.metadata.get("help", "") for _, fld in owners))
    same_default = len({repr(default(fld)) for _, fld in owners}) == 1
    prefix = "" if len(owners) == n_methods else f"({', '.join(m for m, _ in owners)}) "
    if len(helps) == 1 and same_default:
        return f"{prefix}{helps[0]}{tag(default(owners[0][1]))}"
    if len(helps) == 1:
        return f"{prefix}{helps[0]} [default: {', '.join(f'{m} {default(fld)}' for m, fld in owners)}]"
    body = "; ".join(f"{m}: {fld.metadata.get('help', '')}{'' if same_default else tag(default(fld))}"
                     for m, fld in owners)
    return prefix + body + (tag(default(owners[0][1])) if same_default else "")


def parse_shape(text: str | None, option: str = "--input-shape") -> tuple[int, ...] | None:
    """'3,32,32' -> (3, 32, 32); a clear error for anything else."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UserError(f"{option} {text!r}: give positive integers separated by commas, without the batch, e.g. 3,32,32")
    return shape


def parse_normalization(mean: str | None, std: str | None) -> tuple | None:
    """--mean/--std '0.5,0.5,0.5' -> (mean, std) float tuples, None when neither is given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UserError("--mean and --std go together: give both (one value per input channel, or one for all)")
    values = []
    for option, text in (("--mean", mean), ("--std", std)):
        try:
            values.append(tuple(float(v) for v in text.split(",")))
        except ValueError:
            raise UserError(f"{option} {text!r}: give numbers separated by commas, e.g. 0.5,0.5,0.5") from None
    from compress.io import check_normalization

    return check_normalization(*values, what="--mean/--std")


def _recipe(model: str, kw: dict, stages: list[dict]) -> Recipe:
    data = {"train": kw.get("train"), "calib": kw.get("calib"), "eval": list(kw.get("eval_data") or [])}
    shape = parse_shape(kw.get("input_shape"))
    shape = list(shape) if shape else None
    norm = parse_normalization(kw.get("mean"), kw.get("std"))
    return Recipe(model=model, stages=stages, arch=kw.get("arch"), trust_pickle=kw.get("trust_pickle", False),
                  input_shape=shape, normalization={"mean": list(norm[0]), "std": list(norm[1])} if norm else None,
                  data={k: v for k, v in data.items() if v}, seed=kw.get("seed", 0))


def _run(recipe: Recipe, out_dir: Path | None, save_recipe: Path | None = None, manifest_name: str | None = None):
    from compress.pipeline import Pipeline

    pipe = Pipeline(recipe, out_dir, write_manifest=manifest_name is not None, manifest_name=manifest_name or "manifest.json",
                    save_recipe=save_recipe)
    return pipe, pipe.run()


def _emit(payload: dict, as_json: bool, human) -> None:
    if as_json:
        from compress.pipeline import _jsonable

        click.echo(json.dumps(_jsonable(payload), indent=2))
    else:
        human()


# ---- the CLI ----------------------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.option("--torch-threads", type=click.IntRange(min=1), envvar="COMPRESS_TORCH_THREADS", show_envvar=True,
              help="Threads torch uses for training, calibration and evaluation (default: torch's, one per core). "
                   "On a shared or hyper-threaded machine 1 is often the fastest.")
@click.version_option(package_name="edge-compress")
def cli(quiet: bool, torch_threads: int | None) -> None:
    """Prune, quantize and factorize PyTorch models; export them to edge runtimes; profile them on the target."""
    from compress.progress import set_quiet

    set_quiet(quiet)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model: Path, as_json: bool, **kw) -> None:
    """Architecture summary, parameters, FLOPs, size and input spec of MODEL."""
    from compress.report import model_info, print_info

    lm = _recipe_load(model, kw)
    data = model_info(lm)
    _emit(data, as_json, lambda: print_info(data))


@cli.command("eval", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", multiple=True, required=True, help="Labeled data, e.g. cifar10:test.npz (repeatable).")
@click.option("--runtime", help="For artifacts: onnxruntime | openvino | tensorrt | torch (default: from the file type).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_(model: Path, data: tuple[str, ...], runtime: str | None, batch_size: int, as_json: bool, **kw) -> None:
    """Top-1 accuracy of MODEL (a torch model or an ONNX / OpenVINO artifact) on labeled data."""
    from compress.report import evaluate_any, print_kv

    result = evaluate_any(model, list(data), runtime, batch_size, kw.get("arch"), _load_kw(kw))
    _emit(result, as_json, lambda: print_kv("accuracy (top-1 %)", result["accuracy"]))


def _load_kw(kw: dict) -> dict:
    """model_options -> compress.io.load_model's keyword arguments (but arch)."""
    return {"trust_pickle": kw.get("trust_pickle", False), "input_shape": parse_shape(kw.get("input_shape")),
            "normalization": parse_normalization(kw.get("mean"), kw.get("std"))}


def _recipe_load(model: Path, kw: dict):
    from compress.io import load_model

    return load_model(model, arch=kw.get("arch"), **_load_kw(kw))


def _option_names(message: str, fields: list[str]) -> str:
    """Recipe keys with an underscore, as whole words in `message`, written as the CLI options they come from;
    one-word keys (ratio, widths) too where they stand in a list with such an option ("one of ratio, --flops-target")."""
    import re

    # "option lr: ..." (compress.stages' checks of any method option) names it as typed, one word or not
    message = re.sub(r"(?<![\w-])option (\w+)(?=:)",
                     lambda m: f"option --{m.group(1).replace('_', '-')}" if m.group(1) in fields else m.group(0), message)
    for f in sorted((f for f in fields if "_" in f), key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(f)}(?![\w])", "--" + f.replace("_", "-"), message)
    words = {f for f in fields if "_" not in f}

    def in_list(m: re.Match) -> str:
        items = re.split(r"(, | or | and )", m.group(0))
        if not any(i.startswith("--") for i in items[::2]):
            return m.group(0)
        return "".join(f"--{i}" if k % 2 == 0 and i in words else i for k, i in enumerate(items))

    return re.sub(r"(?<![\w-])-{0,2}[a-z][\w-]*(?:(?:, | or | and )-{0,2}[a-z][\w-]*)+", in_list, message)


def _compress_verb(family: str, verb_help: str):
    from compress.pipeline import DEFAULT_NAMES, families

    opts, names = method_options(family)
    method_names = ", ".join(families()[family].names())

    @click.argument("model", type=click.Path(path_type=Path))
    @click.option("--method", "-m", required=True, help=f"One of: {method_names}.")
    @opts
    @model_options
    @data_options
    @output_options
    def verb(model: Path, method: str, output: Path | None, as_json: bool, save_recipe: Path | None, **kw) -> None:
        from compress.report import print_stage

        cfg = {k: kw.pop(k) for k in names if kw.get(k) is not None}
        for k in names:
            kw.pop(k, None)
        from compress.fileio import check_output_file

        out = Path(output) if output else Path(f"{model.stem}.{DEFAULT_NAMES[family]}.pt")
        if out.exists() and model.exists() and out.resolve() == model.resolve():
            raise UserError(f"-o {out} is the input model: write the {DEFAULT_NAMES[family]} copy under another name")
        for path in (out, save_recipe):  # a folder or an unwritable place fails now, not after the work
            if path is not None:
                check_output_file(path, create_parent=False)
        stage = {"stage": family, "method": method, "name": out.stem, "output": str(out), **cfg}
        recipe = _recipe(str(model), kw, [stage])
        try:
            _, result = _run(recipe, out.parent, save_recipe, manifest_name=f"{out.stem}.manifest.json")
        except UserError as e:  # the checks speak recipe keys (flops_target); a CLI user typed --flops-target
            raise UserError(_option_names(str(e), names)) from None
        record = result.stages[-1]
        _emit(record, as_json, lambda: print_stage(record, result))

    verb.__doc__ = verb_help
    return cli.command(family, context_settings=CONTEXT)(verb)


prune = _compress_verb("prune", "Remove channels from MODEL (physically smaller layers), optionally fine-tune.")
quantize = _compress_verb("quantize", "Quantize MODEL with fake-quant modules that export to ONNX Q/DQ.")
lowrank = _compress_verb("lowrank", "Factorize MODEL's Linear and Conv layers into low-rank pairs.")


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default=None,
              help="onnx | openvino | ort | tensorrt [default: the one -o's suffix names (.onnx, .xml, .ort, "
                   ".engine/.plan), else onnx].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Bake this batch size into the artifact (default: a dynamic batch axis). A fixed shape lets the "
                   "runtime plan for it: OpenVINO runs batch 1 10-20% faster.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: the model's own (fp32, or the grid it was quantized to). int8/int4/int2 need a quantized "
                   "model; int8 keeps 4/2-bit grids in int8 containers.")
@model_options
@data_options
@output_options
def export(model: Path, fmt: str | None, batch: int | None, precision: str, output: Path | None, as_json: bool,
           save_recipe: Path | None, **kw) -> None:
    """Export MODEL to a runtime format; the artifact is kept only if it matches torch (parity check).

    Parity runs torch and the artifact on the same images: the --calib or --eval-data images when given, else
    seeded random inputs (which exercise the graph but say less about real-data agreement)."""
    from compress.fileio import check_output_file
    from compress.report import print_artifacts
    from exporters import EXPORTERS, artifact_path, format_of

    fmt = fmt or format_of(output)
    EXPORTERS.get(fmt)
    out = artifact_path(Path(output) if output else Path(model.stem), fmt)
    check_output_file(out, create_parent=False)  # before the model loads: a folder or unwritable place fails at once
    stage = {"stage": "export", "formats": [fmt], "precision": precision, "variants": ["original"], "output": str(out)}
    if batch:
        stage["batch"] = batch
    _, result = _run(_recipe(str(model), kw, [stage]), out.parent, save_recipe)
    _emit({"artifacts": result.artifacts}, as_json, lambda: print_artifacts(result.artifacts))


@cli.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runtime", help="onnxruntime | openvino | tensorrt | torch (default: from the file type).")
@click.option("--device", default="local", show_default=True,
              help="Where to run: local | ssh://user@host[:port][?k=v] | adb[:SERIAL][?k=v] | estimate:NAME | cuda[:N].")
@click.option("--threads", type=int, help="Intra-op threads (default: the runtime's).")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--iterations", type=int, default=200, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--budget", help="Fail (exit 1) past these limits, e.g. latency.p90=2ms,memory.peak=80MB,size=5MB,"
                               "accuracy.drop=0.5 (metrics and units: see compress/gates.py).")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="A previous profile JSON: fail if significantly slower (Mann-Whitney U on the runs) by more "
                   "than --max-slowdown; its accuracy record, if any, is the accuracy.drop reference.")
@click.option("--max-slowdown", default="5%", show_default=True, help="Smallest slowdown vs --baseline that fails.")
@click.option("--alpha", type=float, default=0.01, show_default=True, help="Significance level of the comparison.")
@click.option("--accuracy-data", help="Labeled data to measure the artifact's top-1 on, e.g. cifar10:test.npz "
                                      "(stored in the profile as `accuracy`).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Model or artifact whose top-1 on --accuracy-data is the accuracy.drop reference.")
@click.option("--reference-arch", help="Architecture of --reference when it is a state dict (e.g. resnet20).")
@click.option("--trust-pickle", is_flag=True, help="Allow --reference to be a pickled full module (runs code from the file).")
@click.option("--input-shape", help="Input shape without batch, e.g. 3,32,32, for artifacts that do not record one "
                                    "(TorchScript).")
@normalization_options
@click.option("--junit", type=click.Path(path_type=Path), help="Write the gates as JUnit XML (one testcase each).")
@click.option("--summary", type=click.Path(path_type=Path), help="Write a markdown summary (for $GITHUB_STEP_SUMMARY).")
@output_options
def profile(artifact: Path, runtime: str | None, device: str, threads: int | None, warmup: int, iterations: int,
            batch: int, budget: str | None, baseline: Path | None, max_slowdown: str, alpha: float,
            accuracy_data: str | None, reference: Path | None, reference_arch: str | None, trust_pickle: bool,
            input_shape: str | None, mean: str | None, std: str | None, junit: Path | None, summary: Path | None,
            output: Path | None, as_json: bool) -> None:
    """Measure load time, latency (p50/p90/p99, CI) and peak memory of ARTIFACT in a fresh process.

    With --budget and/or --baseline it is a CI gate: exit 1 when a budget is exceeded or the artifact is
    significantly slower than the baseline, 0 otherwise. ARTIFACT may also be a profile JSON written before
    (-o): then it is gated as it is, without measuring again.
    """
    from compress import gates
    from compress.fileio import atomic_path, check_output_file
    from compress.report import console
    from devices.profile import load_profile, render_table

    # everything a typo can break is checked before the (slow) measurement
    shape = parse_shape(input_shape)
    norm = parse_normalization(mean, std)  # for --accuracy-data on the artifact and on --reference
    for path in (output, junit, summary):
        if path is not None:
            check_output_file(path, create_parent=False)
    budgets = gates.parse_budget(budget)
    gates.check_predictable(budgets, device if artifact.suffix.lower() != ".json" else "")
    slowdown = gates.parse_fraction(max_slowdown, "--max-slowdown")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1 (got {alpha})")
    if (junit or summary) and not budgets and not baseline:  # else the file would silently not be written
        raise UserError(f"{'--junit' if junit else '--summary'} reports the gates, and there are none: "
                        f"give --budget and/or --baseline")
    base = load_profile(baseline) if baseline else None
    earlier = None  # ARTIFACT as a profile JSON, read once
    if base is not None:  # before measuring: a prediction on either side has nothing to compare
        gates.check_measured(base, "--baseline")
        earlier = load_profile(artifact) if artifact.suffix.lower() == ".json" else None
        gates.check_measured(earlier or device, "this profile")
    if base is not None and artifact.suffix.lower() != ".json" and base.get("settings", {}).get("batch") != batch:
        raise UserError(f"baseline was measured at batch {base.get('settings', {}).get('batch')}, this profile would "
                        f"be at batch {batch}: not comparable (give --batch {base.get('settings', {}).get('batch')})")
    if reference and not accuracy_data:
        raise UserError("--reference is evaluated on --accuracy-data: give both")
    if gates.needs_accuracy(budgets) and not accuracy_data and not artifact.suffix.lower() == ".json":
        raise UserError("an accuracy budget needs --accuracy-data cifar10:PATH (labeled data to measure top-1 on)")
    if gates.needs_reference(budgets) and not reference and not (base and base.get("accuracy")):
        raise UserError("accuracy.drop needs a reference: --reference MODEL_OR_ARTIFACT, or a --baseline profile "
                        "written with --accuracy-data")
    if not artifact.exists():
        raise UserError(f"artifact not found: {artifact}")

    if artifact.suffix.lower() == ".json":  # an earlier profile: gate it as it is
        prof = earlier or load_profile(artifact)
        if gates.is_prediction(prof):
            gates.check_predictable(budgets, prof["target"])
        measured = Path(prof["artifact"]["path"])
        if accuracy_data:
            if not measured.exists():
                raise UserError(f"--accuracy-data: the profiled artifact {measured} is not here to evaluate")
            prof["accuracy"] = gates.measure_accuracy(measured, accuracy_data, prof["runtime"]["name"],
                                                      load_kw={"normalization": norm})
    else:
        from devices import profile_artifact

        prof = profile_artifact(str(artifact), runtime=runtime, device=device, threads=threads, warmup=warmup,
                                iterations=iterations, batch=batch, shape=shape)
        if accuracy_data:
            prof["accuracy"] = gates.measure_accuracy(artifact, accuracy_data, runtime,
                                                      load_kw={"input_shape": shape, "normalization": norm})
    used = (prof.get("accuracy") or {}).get("normalization") or {}
    if norm is None and used.get("from") == "artifact":  # the reference is the model the artifact came from:
        norm = (tuple(used["mean"]), tuple(used["std"]))  # same input space (a custom arch records none itself)
    try:
        ref = [gates.measure_accuracy(reference, accuracy_data, arch=reference_arch,
                                      load_kw={"trust_pickle": trust_pickle, "normalization": norm})] if reference else None
    except UserError as e:  # the loader speaks of --arch; here the option is --reference-arch
        raise UserError(str(e).replace("--arch", "--reference-arch")) from None
    if output and artifact.resolve() != Path(output).resolve():
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(prof, indent=2))

    report = None
    if budgets or base is not None:
        acc = [prof["accuracy"]] if prof.get("accuracy") else None
        report = gates.evaluate(prof, budgets, base, acc, ref, alpha, slowdown)
        if junit:
            gates.write_text_atomic(junit, gates.to_junit(report))
        if summary:
            gates.write_text_atomic(summary, gates.to_markdown(report, prof))

    def human() -> None:
        console.print(render_table([prof]))
        for note in prof.get("notes") or []:  # what the numbers are (an estimate's caveats, a runtime's fallbacks)
            console.print(f"[yellow]note:[/] {note}")
        if prof.get("accuracy"):
            a = prof["accuracy"]
            ref_text = f" (reference {ref[0]['top1']:.2f}%)" if ref else ""
            console.print(f"top-1 {a['top1']:.2f}% on {Path(a['data']).name} (n={a['n']}){ref_text}")
        for renderable in gates.render(report) if report else []:
            console.print(renderable)

    _emit({**prof, "gates": report} if report else prof, as_json, human)
    if report and not report["passed"]:
        raise GateFailed(gates.failure_line(report))


@cli.command(context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path))
@output_options
def run(recipe: Path, output: Path | None, as_json: bool) -> None:
    """Run a YAML recipe (stages: eval, prune, quantize, lowrank, export, profile) into one output folder
    (-o; default out/NAME, NAME being the recipe's `name:` or its file name)."""
    from compress.pipeline import Pipeline

    r = Recipe.load(recipe)
    out = Path(output) if output else Path("out") / (r.name or recipe.stem)
    pipe = Pipeline(r, out, manifest_name="manifest.json", replace_previous=True)
    try:
        result = pipe.run()
    except GateFailed:  # a failed budget still reports everything it measured (a CI job reads it), then exits 1
        _report_run(pipe, as_json)
        raise
    except UserError as e:  # the model loader speaks of CLI flags; a recipe sets them as top-level keys
        raise UserError(in_recipe_terms(str(e))) from None
    _report_run(pipe, as_json)


# CLI flags of the model loader -> the recipe keys that set the same thing
RECIPE_KEYS = {"--arch": "the recipe's `arch:` key", "--trust-pickle": "the recipe's `trust_pickle: true`",
               "--input-shape": "the recipe's `input_shape:` key", "--mean/--std": "the recipe's `normalization:` key"}


# flags without a same-named recipe key (data roles live under `data:`; the profile verb's reference options)
NOT_RECIPE_KEYS = {"--data", "--calib", "--eval-data", "--reference", "--reference-arch", "--accuracy-data", "--output"}


def in_recipe_terms(message: str) -> str:
    """A message that names CLI flags, as a recipe writer reads it: --arch -> the recipe's `arch:` key, a method or
    profile option --torch-device -> `torch_device:`."""
    import re

    for flag, key in RECIPE_KEYS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w/-])", key, message)
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w/-])",
                  lambda m: m.group(0) if m.group(0) in NOT_RECIPE_KEYS else f"`{m.group(1).replace('-', '_')}:`",
                  message)


def _report_run(pipe, as_json: bool) -> None:
    from compress.report import print_run

    result = pipe.result
    rows = result.rows(list(pipe.eval_sets))
    gates = [{"artifact": p["artifact"], "device": p["device"], **p["gates"]} for p in result.profiles if "gates" in p]
    _emit({"manifest": result.manifest_path, "table": rows, **({"gates": gates} if gates else {})}, as_json,
          lambda: print_run(rows, result, pipe))


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-n", "--samples", type=click.IntRange(min=1), default=1024, show_default=True, help="Images to synthesize.")
@click.option("--preset", type=click.Choice(["paper", "fast", "smoke"]), default="paper", show_default=True,
              help="Genie-D budget: paper (4000 iterations per batch of 128, generator width 128: "
                   "about 12 min for ResNet-20 on an H100, hours on a CPU), "
                   "fast (200 iterations, width 64: minutes per 128 images on a CPU), smoke.")
@click.option("--iters", "--distill-iters", "iters", type=click.IntRange(min=1),
              help="Iterations per batch (overrides the preset; --distill-iters as in quantize -m genie).")
@click.option("--batch", "--distill-batch", "batch", type=click.IntRange(min=1),
              help="Images per generator batch (overrides the preset; --distill-batch as in quantize -m genie).")
@click.option("--gen-width", type=click.IntRange(min=2), help="Generator width c1; c2 = c1 / 2 (overrides the preset).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--torch-device", default="auto", show_default=True,
              help="Where torch runs the synthesis (this machine, not the target): auto (a CUDA GPU when torch sees "
                   "one, else cpu) | cpu | cuda | cuda:N.")
@model_options
@output_options
def synthesize(model: Path, samples: int, preset: str, iters: int | None, batch: int | None, gen_width: int | None,
               seed: int, torch_device: str, output: Path | None, as_json: bool, **kw) -> None:
    """Synthesize calibration images from MODEL's BatchNorm statistics (Genie-D): no real data needed.

    Writes an .npz with `x` (uint8 NHWC, de-normalized and clipped: any data loader reads it) and
    `x_normalized` (float32 NCHW in the model's normalized input space: lossless; `--method genie` prefers it).
    """
    from compress.fileio import check_output_file
    from compress.quantize.genie import PRESETS
    from compress.quantize.genie_data import SynthesisConfig, save_npz
    from compress.quantize.genie_data import synthesize as run_synthesis
    from compress.report import print_kv

    from compress.torch_device import resolve as resolve_torch_device

    out = Path(output) if output else Path(f"{model.stem}.genie{samples}.npz")
    if out.suffix != ".npz":
        raise UserError(f"-o {out}: synthetic data is written as .npz")
    device = resolve_torch_device(torch_device)
    check_output_file(out, create_parent=False)  # a new folder is made when the images are written, not before
    lm = _recipe_load(model, kw)
    lm.require_compressible("synthesize")
    p = PRESETS[preset]
    width = gen_width or p["gen_width"]
    cfg = SynthesisConfig(samples=samples, batch=min(batch or p["distill_batch"], samples),
                          iters=iters or p["distill_iters"], gen_c1=width, gen_c2=max(1, width // 2), seed=seed,
                          device=device)
    from compress.progress import log

    batches = -(-cfg.samples // cfg.batch)
    slow = preset == "paper" and not iters and device == "cpu"
    log(f"Genie-D on {device}: {batches} batch(es) of {cfg.batch} images x {cfg.iters} iterations"
        + (" (the paper's budget: hours on a CPU; --preset fast there)" if slow else ""))
    x, summary = run_synthesis(lm.model, lm.spec.shape, cfg)
    info = save_npz(out, x, lm.spec.mean, lm.spec.std, f"genie-d:{Path(lm.source).name}")
    last = [b["last"]["loss"] for b in summary["batches"]]
    first = [b["first"]["loss"] for b in summary["batches"]]
    payload = {**info, "seconds": summary["seconds"], "device": device, "iters": cfg.iters, "batch": cfg.batch,
               "gen_width": width,
               "bn_layers": summary["bn_layers"], "loss_first": max(first), "loss_last": max(last)}
    _emit(payload, as_json, lambda: print_kv(f"Genie-D -> {out}", payload))


def _quiet_after_verb(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        from compress.progress import set_quiet

        set_quiet(True)


for _verb in cli.commands.values():  # `compress export m.pt -q` as well as `compress -q export m.pt`
    _verb.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_quiet_after_verb,
                                     help="No progress bars or notes (same as `compress -q`)."))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every cleanup written for Ctrl-C runs."""


def _terminate(_signum, _frame) -> None:
    raise Terminated()


def main() -> None:
    if not os.environ.get("COMPRESS_DEBUG"):
        # library warnings (pickle protocol notes, exporter deprecations) are noise to a CLI user
        import warnings

        warnings.filterwarnings("ignore")
    # SIGTERM (a cancelled CI job) unwinds like Ctrl-C: profiling agents are stopped, temp files removed
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = cli.main(standalone_mode=False)  # returns the exit code for --help / --version
        sys.exit(rc if isinstance(rc, int) else 0)
    except click.exceptions.Abort as e:  # click turns a KeyboardInterrupt inside a command into Abort
        if isinstance(e.__context__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(143)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # one line, like every other error; the usage text is one --help away
        ctx = e.ctx
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except (UserError, GateFailed) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        from compress.fileio import is_disk_full

        if os.environ.get("COMPRESS_DEBUG") or not is_disk_full(e):
            _internal_error(e)
        click.echo(f"error: no space left on the device{f' writing {e.filename}' if e.filename else ''}: "
                   f"free some, or write elsewhere with -o", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        _internal_error(e)


def _internal_error(e: Exception) -> None:
    """A bug of ours: one line, unless COMPRESS_DEBUG asks for the traceback."""
    if os.environ.get("COMPRESS_DEBUG"):
        raise e
    click.echo(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
               f"(set COMPRESS_DEBUG=1 for the traceback)", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
