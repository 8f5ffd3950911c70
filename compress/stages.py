"""The Stage interface every compression method implements, and the Context it runs in.

A method is a small class: a `name`, a `Config` dataclass (defaults from the paper; each field's
`metadata["help"]` becomes a CLI option and a recipe key of the same name), and
`apply(lm, cfg, ctx) -> LoadedModel`. Methods register by name in their family's registry
(`compress.prune.METHODS`, `compress.quantize.METHODS`, `compress.lowrank.METHODS`); the CLI and the
recipe runner build their options from those registries, so a new method needs no CLI change.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compress.data import Dataset, Normalizer, load_dataset
from compress.errors import UserError
from compress.io import InputSpec, LoadedModel


def option(default: Any, help: str, choices: tuple | None = None):  # noqa: A002 - mirrors click's name
    """A config field with its CLI help text (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Context:
    """What a stage may use besides the model: data by role, the seed, where to write, and reporting."""

    spec: InputSpec
    data: dict[str, str | None] = field(default_factory=dict)  # role (train|calib|eval) -> data spec string
    seed: int = 0
    out_dir: Path | None = None
    batch_size: int = 128
    _cache: dict[str, Dataset] = field(default_factory=dict, repr=False)

    def dataset(self, role: str, required: bool = False, labeled: bool = False) -> Dataset | None:
        spec = data_spec(self.data, role)
        if spec is None:
            if required:
                flag = data_flag(role)
                raise UserError(f"this stage needs {role} data: pass {flag} (or `data: {role}:` in the recipe)")
            return None
        if spec not in self._cache:
            self._cache[spec] = load_dataset(spec, self.spec.shape, self.seed)
        ds = self._cache[spec]
        if labeled and ds.labels is None:
            raise UserError(f"{ds.source} has no labels ('y'), and this stage needs labeled {role} data")
        return ds

    def normalizer(self) -> Normalizer:
        return Normalizer(self.spec.mean, self.spec.std)


def data_spec(data: dict, role: str) -> str | None:
    """The data spec a stage reads for `role`: unlabeled calibration may come from the training data."""
    spec = data.get(role)
    if spec is None and role == "calib":
        spec = data.get("train")
    return spec


def data_flag(role: str) -> str:
    """The CLI option that gives `role` data."""
    return "--calib (or --data)" if role == "calib" else "--data" if role == "train" else f"--{role}"


@dataclass
class MethodConfig:
    """Base of every method's config; families extend it with their shared fields."""


class Method:
    name: ClassVar[str]
    family: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    summary: ClassVar[str] = ""
    needs_data: ClassVar[tuple[str, ...]] = ()  # data roles it cannot run without: checked before any stage runs

    def apply(self, lm: LoadedModel, cfg: Any, ctx: Context) -> LoadedModel:
        raise NotImplementedError

    def export_notes(self, entry: dict) -> list[str]:
        """What an export of a model this method made must tell the user (entry: the method's history record)."""
        return []


def config_fields(cfg_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cfg_cls)}


def build_config(method: Method, values: dict[str, Any]) -> Any:
    """Validate user values against the method's Config at the edge: unknown keys and bad types fail here."""
    fields = config_fields(method.Config)
    hints = typing.get_type_hints(method.Config)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"method {method.name!r} has no option {', '.join(unknown)}; "
                        f"it takes: {', '.join(sorted(fields)) or 'none'}")
    coerced = {}
    for key, value in values.items():
        coerced[key] = _coerce(key, value, hints[key], fields[key].metadata.get("choices"))
    try:
        cfg = method.Config(**coerced)
    except (TypeError, ValueError) as e:
        raise UserError(f"{method.name}: {e}") from None
    if hasattr(cfg, "check_given"):  # options that only mean something together with others
        cfg.check_given(set(coerced))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _coerce(key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    if value is None:
        return None
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    target = base[0]
    try:
        if target is bool and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        elif target in (int, float) and (isinstance(value, bool) or (target is int and isinstance(value, float)
                                                                     and not value.is_integer())):
            raise TypeError  # a recipe's `calib_size: true` was 1 image, `16.5` was 16
        elif target in (int, float, str):
            value = target(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key}: expected {target.__name__}, got {value!r}") from None
    if target is float and not math.isfinite(value):  # nan passes every `x <= 0` check, and trains to nan
        raise UserError(f"option {key}: expected a finite number, got {value!r}")
    if choices and value not in choices:
        raise UserError(f"option {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value
