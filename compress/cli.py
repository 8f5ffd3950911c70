"""The `compress` command line. Each verb builds a one-stage recipe and runs the shared pipeline engine.

Method options are generated from the method registries (each method's Config dataclass), so a newly
registered method or option appears here without changes to this file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import click

from compress.errors import GateFailed, UserError
from compress.recipe import Recipe

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# ---- shared option groups ---------------------------------------------------------------------------------
def model_options(f):
    f = click.option("--arch", help="Architecture of a state dict: a zoo name (resnet20, ...) or package.module:factory.")(f)
    f = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled full module (runs code from the file).")(f)
    f = click.option("--input-shape", help="Input shape without batch, e.g. 3,32,32 (TorchScript and custom archs).")(f)
    return f


def output_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")(f)
    f = click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the result.")(f)
    return f


def data_options(f):
    f = click.option("--data", "train", help="Training / fine-tuning data, e.g. cifar10:train.npz (labels optional).")(f)
    f = click.option("--calib", help="Calibration data (unlabeled is fine); defaults to --data.")(f)
    f = click.option("--eval-data", "eval_data", multiple=True, help="Labeled data to report accuracy on (repeatable).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--save-recipe", type=click.Path(path_type=Path), help="Also write the recipe this call corresponds to.")(f)
    return f


def method_options(family: str):
    """click options for the union of the family's method config fields (validated per method later)."""
    from compress.pipeline import families

    registry = families()[family]
    seen: dict[str, tuple[Any, dataclasses.Field]] = {}
    for name in registry.names():
        cfg_cls = registry.get(name).Config
        hints = typing.get_type_hints(cfg_cls)
        for fld in dataclasses.fields(cfg_cls):
            seen.setdefault(fld.name, (hints[fld.name], fld))

    def deco(f):
        for fname, (hint, fld) in sorted(seen.items(), reverse=True):
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            typ = base[0] if base[0] in (int, float, str, bool) else str
            choices = fld.metadata.get("choices")
            default = fld.default if fld.default is not dataclasses.MISSING else None
            help_text = f"{fld.metadata.get('help', '')} [default: {default}]"
            flag = "--" + fname.replace("_", "-")
            if typ is bool:
                f = click.option(f"{flag}/--no-{flag[2:]}", fname, default=None, help=help_text)(f)
            else:
                ptype = click.Choice([str(c) for c in choices]) if choices else typ
                f = click.option(flag, fname, type=ptype, default=None, help=help_text)(f)
        return f

    return deco, sorted(seen)


def _recipe(model: str, kw: dict, stages: list[dict]) -> Recipe:
    data = {"train": kw.get("train"), "calib": kw.get("calib"), "eval": list(kw.get("eval_data") or [])}
    shape = [int(s) for s in kw["input_shape"].split(",")] if kw.get("input_shape") else None
    return Recipe(model=model, stages=stages, arch=kw.get("arch"), trust_pickle=kw.get("trust_pickle", False),
                  input_shape=shape, data={k: v for k, v in data.items() if v}, seed=kw.get("seed", 0))


def _run(recipe: Recipe, out_dir: Path | None, save_recipe: Path | None = None, manifest_name: str | None = None):
    from compress.pipeline import Pipeline

    if save_recipe:
        recipe.save(save_recipe)
    pipe = Pipeline(recipe, out_dir, write_manifest=manifest_name is not None, manifest_name=manifest_name or "manifest.json")
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
@click.version_option(package_name="edge-compress")
def cli(quiet: bool) -> None:
    """Prune, quantize and factorize PyTorch models; export them to edge runtimes; profile them on the target."""
    from compress.progress import set_quiet

    set_quiet(quiet)


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
@click.option("--runtime", help="For artifacts: onnxruntime | openvino (default: from the file type).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_(model: Path, data: tuple[str, ...], runtime: str | None, batch_size: int, as_json: bool, **kw) -> None:
    """Top-1 accuracy of MODEL (a torch model or an ONNX / OpenVINO artifact) on labeled data."""
    from compress.report import evaluate_any, print_kv

    result = evaluate_any(model, list(data), runtime, batch_size, kw, _recipe_load)
    _emit(result, as_json, lambda: print_kv("accuracy (top-1 %)", result["accuracy"]))


def _recipe_load(model: Path, kw: dict):
    from compress.io import load_model

    shape = tuple(int(s) for s in kw["input_shape"].split(",")) if kw.get("input_shape") else None
    return load_model(model, arch=kw.get("arch"), trust_pickle=kw.get("trust_pickle", False), input_shape=shape)


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
        out = Path(output) if output else Path(f"{model.stem}.{DEFAULT_NAMES[family]}.pt")
        stage = {"stage": family, "method": method, "name": out.stem, "output": str(out), **cfg}
        recipe = _recipe(str(model), kw, [stage])
        _, result = _run(recipe, out.parent, save_recipe, manifest_name=f"{out.stem}.manifest.json")
        record = result.stages[-1]
        _emit(record, as_json, lambda: print_stage(record, result))

    verb.__doc__ = verb_help
    return cli.command(family, context_settings=CONTEXT)(verb)


prune = _compress_verb("prune", "Remove channels from MODEL (physically smaller layers), optionally fine-tune.")
quantize = _compress_verb("quantize", "Quantize MODEL with fake-quant modules that export to ONNX Q/DQ.")
lowrank = _compress_verb("lowrank", "Factorize MODEL's Linear and Conv layers into low-rank pairs.")


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="onnx", show_default=True, help="onnx | openvino (see `compress export --help`).")
@click.option("--precision", default="auto", show_default=True,
              help="auto (the model's own) | fp32 | fp16 | int8 (needs a quantized model).")
@model_options
@data_options
@output_options
def export(model: Path, fmt: str, precision: str, output: Path | None, as_json: bool, save_recipe: Path | None, **kw) -> None:
    """Export MODEL to a runtime format; the artifact is kept only if it matches torch (parity check)."""
    from compress.report import print_artifacts
    from exporters import EXPORTERS, SUFFIX

    EXPORTERS.get(fmt)
    out = Path(output) if output else Path(model.stem + SUFFIX.get(fmt, "." + fmt))
    stage = {"stage": "export", "formats": [fmt], "precision": precision, "variants": ["original"], "output": str(out)}
    _, result = _run(_recipe(str(model), kw, [stage]), out.parent, save_recipe)
    _emit({"artifacts": result.artifacts}, as_json, lambda: print_artifacts(result.artifacts))


@cli.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runtime", help="onnxruntime | openvino | torch (default: from the file type).")
@click.option("--device", default="local", show_default=True, help="Where to run: local.")
@click.option("--threads", type=int, help="Intra-op threads (default: the runtime's).")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--iterations", type=int, default=200, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@output_options
def profile(artifact: Path, runtime: str | None, device: str, threads: int | None, warmup: int, iterations: int,
            batch: int, output: Path | None, as_json: bool) -> None:
    """Measure load time, latency (p50/p90/p99, CI) and peak memory of ARTIFACT in a fresh process."""
    from compress.fileio import atomic_path
    from devices import profile_artifact
    from devices.profile import render_table

    if not artifact.exists():
        raise UserError(f"artifact not found: {artifact}")
    prof = profile_artifact(str(artifact), runtime=runtime, device=device, threads=threads, warmup=warmup,
                            iterations=iterations, batch=batch)
    if output:
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(prof, indent=2))
    _emit(prof, as_json, lambda: render_table([prof]))


@cli.command(context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(path_type=Path))
@output_options
def run(recipe: Path, output: Path | None, as_json: bool) -> None:
    """Run a YAML recipe (stages: eval, prune, quantize, lowrank, export, profile) into one output folder."""
    from compress.report import print_run

    r = Recipe.load(recipe)
    out = Path(output) if output else Path("out") / (r.name or recipe.stem)
    pipe, result = _run(r, out, manifest_name="manifest.json")
    rows = result.rows(list(pipe.eval_sets))
    _emit({"manifest": result.manifest_path, "table": rows}, as_json, lambda: print_run(rows, result, pipe))


def main() -> None:
    if not os.environ.get("COMPRESS_DEBUG"):
        # library warnings (pickle protocol notes, exporter deprecations) are noise to a CLI user
        import warnings

        warnings.filterwarnings("ignore")
    try:
        rc = cli.main(standalone_mode=False)  # returns the exit code for --help / --version
        sys.exit(rc if isinstance(rc, int) else 0)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except (UserError, GateFailed) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line unless debugging
        if os.environ.get("COMPRESS_DEBUG"):
            raise
        click.echo(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   f"(set COMPRESS_DEBUG=1 for the traceback)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
