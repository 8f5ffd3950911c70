"""Recipes: the YAML form of a pipeline run. The CLI verbs build the same structure.

    model: path/to/model.th          # any format compress.io reads
    arch: resnet20                   # for state dicts
    normalization: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}  # optional: overrides the model's own
    data:                            # data specs (compress/data.py) by role
      train: cifar10:train.npz       # fine-tuning / training-based methods
      calib: cifar10:calib.npz       # calibration (unlabeled is fine)
      eval: [cifar10:test.npz]       # accuracy after every stage and of every artifact
    seed: 0
    stages:
      - {stage: prune, method: l1, flops_target: 0.5, finetune_epochs: 1}
      - {stage: quantize, method: minmax, bits: w8a8}
      - {stage: export, formats: [onnx, openvino]}
      - {stage: profile, iterations: 200}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from compress.errors import UserError, first_line, is_whole

TOP_KEYS = {"model", "arch", "trust_pickle", "input_shape", "normalization", "data", "seed", "stages", "name"}
DATA_ROLES = {"train", "calib", "eval"}
STAGE_KINDS = ("eval", "prune", "quantize", "lowrank", "export", "profile")


@dataclass
class Recipe:
    model: str
    stages: list[dict]
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: list[int] | None = None
    normalization: dict | None = None  # {mean: [...], std: [...]} in [0, 1] pixel units
    data: dict = field(default_factory=dict)
    seed: int = 0
    name: str | None = None

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "Recipe":
        if not isinstance(d, dict):
            raise UserError("a recipe is a YAML mapping with at least `model:` and `stages:`")
        unknown = set(d) - TOP_KEYS
        if unknown:
            raise UserError(f"recipe: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}")
        if "model" not in d or not d.get("stages"):
            raise UserError("recipe: needs `model:` and a non-empty `stages:` list")
        _check_top_types(d)
        data = dict(d.get("data") or {})
        bad_roles = set(data) - DATA_ROLES
        if bad_roles:
            raise UserError(f"recipe data: unknown role(s) {', '.join(sorted(bad_roles))}; use {', '.join(sorted(DATA_ROLES))}")
        if isinstance(data.get("eval"), str):
            data["eval"] = [data["eval"]]
        for role, val in data.items():
            if not (isinstance(val, str) or (role == "eval" and isinstance(val, list)
                                             and all(isinstance(v, str) for v in val))):
                raise UserError(f"recipe data: {role} is a data spec such as cifar10:PATH.npz"
                                f"{' (or a list of them)' if role == 'eval' else ''}, got {val!r}")
        stages = d["stages"]
        if not isinstance(stages, list) or not all(isinstance(s, dict) and "stage" in s for s in stages):
            raise UserError("recipe: each stage is a mapping with a `stage:` key")
        for s in stages:
            if s["stage"] not in STAGE_KINDS:
                raise UserError(f"recipe: unknown stage {s['stage']!r}; choose one of {', '.join(STAGE_KINDS)}")
        model = str(d["model"])
        stages = [dict(s) for s in stages]
        if base is not None:  # paths in a recipe file are relative to the recipe
            model = _rebase(model, base)
            data = {role: ([_rebase_spec(v, base) for v in val] if isinstance(val, list) else _rebase_spec(val, base))
                    for role, val in data.items()}
            for s in stages:  # a profile stage's baseline folder is an input too (its junit/summary are outputs)
                if s["stage"] == "profile" and isinstance(s.get("baseline"), str) and s["baseline"]:
                    s["baseline"] = _rebase(s["baseline"], base)
        return cls(model=model, stages=stages, arch=d.get("arch"),
                   trust_pickle=bool(d.get("trust_pickle", False)), input_shape=d.get("input_shape"),
                   normalization=_normalization(d.get("normalization")),
                   data=data, seed=int(d.get("seed", 0)), name=d.get("name"))

    @property
    def mean_std(self) -> tuple | None:
        """(mean, std) for compress.io.load_model, or None for the model's own."""
        return (self.normalization["mean"], self.normalization["std"]) if self.normalization else None

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe not found: {path}")
        try:
            d = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a recipe (binary data, not UTF-8 YAML text)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or first_line(e, 160)
            raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
        return cls.from_dict(d, base=path.resolve().parent)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, []) and not (k == "trust_pickle" and not v)}

    def save(self, path: Path) -> None:
        """Write the recipe with relative paths rebased on its own folder (how `Recipe.load` reads them back).

        Explicit per-stage output paths are dropped: a replayed recipe writes into its own output folder.
        """
        from compress.fileio import atomic_path

        path = Path(path)
        base = path.resolve().parent
        d = self.to_dict()
        d["model"] = _relative(d["model"], base)
        d["data"] = {role: ([_relative_spec(v, base) for v in val] if isinstance(val, list) else _relative_spec(val, base))
                     for role, val in d.get("data", {}).items()}
        d["stages"] = [{k: (_relative(v, base) if k == "baseline" and isinstance(v, str) else v)
                        for k, v in s.items() if k != "output"} for s in d["stages"]]
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump({k: v for k, v in d.items() if v not in ({}, None)}, sort_keys=False))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last: `{ratio: 0.3, ratio: 0.5}`
    pruned at 0.5 without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                mark = key_node.start_mark
                raise UserError(f"recipe: key {key!r} appears twice in one mapping (line {mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_top_types(d: dict) -> None:
    """Each top-level value of the kind it must be (a wrong one failed later as an internal error)."""
    if not isinstance(d["model"], str):
        raise UserError(f"recipe: model is a path to the model file, got {d['model']!r}")
    if d.get("arch") is not None and not isinstance(d["arch"], str):
        raise UserError(f"recipe: arch is a zoo name or package.module:factory, got {d['arch']!r}")
    if "seed" in d and not is_whole(d["seed"]):
        raise UserError(f"recipe: seed is a whole number, got {d['seed']!r}")
    if not isinstance(d.get("trust_pickle", False), bool):
        raise UserError(f"recipe: trust_pickle is true or false, got {d['trust_pickle']!r}")
    shape = d.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(is_whole(v) and v > 0 for v in shape)):
        raise UserError(f"recipe: input_shape is a list of positive whole numbers (C, H, W), got {shape!r}")
    if d.get("data") is not None and not isinstance(d["data"], dict):
        raise UserError("recipe: data is a mapping of roles (train, calib, eval) to data specs, "
                        f"e.g. {{calib: cifar10:calib.npz}}; got {d['data']!r}")
    name = d.get("name")  # the default output folder is out/<name>: a path would write outside it
    if name is not None and not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
        raise UserError(f"recipe: name is a plain name (the default output folder is out/<name>), got {name!r}")


def _rebase(p: str, base: Path) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else (base / path))


def _rebase_spec(spec: str | None, base: Path) -> str | None:
    return None if spec is None else map_spec_path(spec, lambda p: _rebase(p, base))


def map_spec_path(spec: str, fn) -> str:
    """Apply `fn` to the path inside a data spec (cifar10:PATH, folder:PATH, PATH); random:N has none."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "npz", "folder"):
        return f"{kind}:{fn(rest)}"
    if kind in ("random", "genie", "noise") or (kind == "text" and rest.startswith("builtin")):
        return spec  # generated or built-in data (random:N, genie[:N], noise[:N], text:builtin...): no path
    if kind == "text":
        return f"text:{fn(rest)}"
    return fn(spec)


def _relative(p: str, base: Path) -> str:
    """An absolute path stays absolute (the recipe can move); a relative one (to the caller's folder) is rebased on
    the recipe's folder, where `Recipe.load` resolves it."""
    import os

    return p if Path(p).is_absolute() else os.path.relpath(Path(p).resolve(), base)


def _relative_spec(spec: str, base: Path) -> str:
    return map_spec_path(spec, lambda p: _relative(p, base))


def _normalization(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise UserError("recipe: normalization is a mapping with `mean:` and `std:` lists, e.g. "
                        "{mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}")
    from compress.io import check_normalization

    mean, std = (list(v if isinstance(v, (list, tuple)) else [v]) for v in (value["mean"], value["std"]))
    mean, std = check_normalization(mean, std, what="recipe normalization")
    return {"mean": list(mean), "std": list(std)}
