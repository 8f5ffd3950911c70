"""Model input and output: every format a user brings, loaded without running untrusted code.

Formats (detected from the file, not its name):
  state dict      torch.save'd tensors (optionally under 'state_dict'/'model', 'module.' prefixes ok) + --arch
  compress model  this toolchain's own saved model (arch + structure edits + state dict): reloadable by every verb
  .pt2            a torch.export program
  TorchScript     torch.jit.save archive (export / profile / eval only: no modules left to compress)
  pickle          a whole pickled nn.Module: refused unless trust_pickle, because unpickling runs code
"""
from __future__ import annotations

import importlib
import pickle
import types
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from compress.errors import UserError, first_line
from compress.fileio import atomic_path, sha256_file
from compress.structure import conform_to_state_dict, replay
from compress.zoo import ARCHS, CIFAR_MEAN, CIFAR_STD
from runtimes.base import ARTIFACT_RUNTIMES

FORMAT = "compress.model/1"


@dataclass
class InputSpec:
    """One input tensor: shape without the batch dimension, and the normalization the model expects."""

    shape: tuple[int, ...] = (3, 32, 32)
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    name: str = "input"
    batch: int | None = None  # exported artifacts: None = dynamic batch axis, N = fixed (`compress export --batch N`)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(tuple(d["shape"]), tuple(d["mean"]), tuple(d["std"]), d.get("name", "input"), d.get("batch"))

    def example(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.randn((batch, *self.shape), generator=torch.Generator().manual_seed(seed))

    def set_normalization(self, mean, std) -> None:
        """The user's own mean/std (pixel units in [0, 1]): one value per input channel, or one for all."""
        self.mean, self.std = check_normalization(mean, std, self.shape[0] if len(self.shape) == 3 else None)


def check_normalization(mean, std, channels: int | None = None,
                        what: str = "mean/std") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) as float tuples, a single value spread over the channels; a UserError for anything unusable."""
    import math

    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise UserError(f"{what}: give lists of numbers (got mean {mean!r}, std {std!r})") from None
    if not mean or not std or not all(map(math.isfinite, mean + std)):
        raise UserError(f"{what}: give finite numbers for both mean and std (got mean {list(mean)}, std {list(std)})")
    if any(v <= 0 for v in std):
        raise UserError(f"{what}: std must be positive (got {list(std)})")
    has = f"{len(mean)} mean and {len(std)} std values"
    if not channels:  # not known yet (checked again when the model is): the counts must agree, or one be single
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise UserError(f"{what}: {has}: give the same number of values each, or one for all")
        return mean, std
    if {len(mean), len(std)} - {1, channels}:
        raise UserError(f"{what}: {has}; the input has {channels} channels: give {channels} values each, or one for all")
    return tuple(v * channels if len(v) == 1 else v for v in (mean, std))


@dataclass
class LoadedModel:
    model: nn.Module
    spec: InputSpec
    kind: str                      # state_dict | compress | export | torchscript | pickle | zoo
    source: str
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    edits: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # stages applied so far, with their metrics
    sha256: str | None = None

    @property
    def compressible(self) -> bool:
        return self.kind in ("state_dict", "compress", "pickle", "zoo")

    def require_compressible(self, verb: str) -> None:
        if not self.compressible:
            kind = {"export": "torch.export (.pt2)", "torchscript": "TorchScript"}.get(self.kind, self.kind)
            raise UserError(f"{self.source} is a {kind} file: `{verb}` needs an nn.Module with its "
                            f"architecture (a state dict with --arch, or a model saved by this toolchain)")

    def require_savable(self, verb: str) -> None:
        """A compressed model is saved as architecture + edits + weights: without an architecture it cannot be."""
        if self.arch is None:
            what = {"pickle": "a pickled module", "export": "a torch.export program",
                    "torchscript": "a TorchScript archive"}.get(self.kind, "a model")
            raise UserError(f"{verb}: {self.source} is {what} with no known architecture, and a compressed model is "
                            f"saved as architecture + edits + weights: load its state dict with --arch")


def build_arch(arch: str, num_classes: int | None = None) -> tuple[nn.Module, InputSpec]:
    """A zoo name, or `package.module:factory` (imports that module: code the user named explicitly)."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if ":" in arch:
        mod_name, _, fn_name = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module: missing, broken, or exits on import
            raise UserError(f"cannot import architecture {arch!r}: {first_line(e)}") from None
        if kwargs and not takes_num_classes(factory):
            raise UserError(f"--arch {arch}: the checkpoint has {num_classes} outputs, but {fn_name}() takes no "
                            f"num_classes argument to build that many")
        try:
            model = factory(**kwargs)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's factory; SystemExit would end with exit 0
            raise UserError(f"--arch {arch}: {fn_name}() failed: {type(e).__name__}: {first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--arch {arch}: {fn_name}() returned a {type(model).__name__}, not a torch.nn.Module")
        return model, InputSpec()
    entry = ARCHS.get(arch)
    return entry.factory(**kwargs), InputSpec(entry.input_shape, entry.mean, entry.std)


def takes_num_classes(factory) -> bool:
    """Whether a model factory accepts num_classes= (the zoo's do; a user's may not)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False,
               input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
               normalization: tuple | None = None) -> LoadedModel:
    """`normalization`: (mean, std) the model expects, overriding its own (zoo entry or saved spec; for custom archs,
    .pt2 and TorchScript, which record none, `default_normalization`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a model file")
    if not path.is_file():  # a device or a FIFO: hashing it would never end
        raise UserError(f"{path} is not a regular file")
    kind = _sniff(path)
    digest = sha256_file(path)
    if kind == "export":
        lm = _load_export(path)
    elif kind == "torchscript":
        lm = _load_torchscript(path, input_shape)
    else:
        obj = _torch_load_safe(path, trust_pickle)
        if isinstance(obj, nn.Module):
            lm = LoadedModel(obj, InputSpec(), "pickle", str(path))
        elif isinstance(obj, dict) and obj.get("format") == FORMAT:
            recorded = obj.get("arch")
            # a custom architecture is code: the file must not pick a module to import and run (a zoo name is safe)
            if isinstance(recorded, str) and ":" in recorded and arch != recorded and not trust_pickle:
                raise UserError(f"{path} is a saved model of the custom architecture {recorded}: rebuilding it imports "
                                f"and runs that module's code; confirm with --arch {recorded} (or --trust-pickle)")
            lm = _from_saved(obj, str(path))
            if arch is not None and arch != lm.arch:  # it records its own architecture: a different one is a mix-up
                raise UserError(f"{path} is a saved {lm.arch} model; --arch {arch} does not apply to it (drop --arch)")
        elif isinstance(obj, dict):
            lm = _from_state_dict(obj, str(path), arch, num_classes)
        else:
            raise UserError(f"{path}: holds a {type(obj).__name__}, not a model or state dict")
    if input_shape is not None:
        lm.spec.shape = tuple(input_shape)
        _check_input_shape(lm)
    elif lm.arch is not None and ":" in lm.arch or lm.kind == "pickle":
        _check_input_shape(lm, hint=True)  # nothing records a custom model's input: the default is a guess
    if normalization is not None:
        lm.spec.set_normalization(*normalization)
    elif len(lm.spec.shape) == 3 and lm.spec.mean and len(lm.spec.mean) != lm.spec.shape[0]:
        _default_normalization_for(lm)
    lm.sha256 = digest
    lm.model.eval()
    return lm


def _check_input_shape(lm: LoadedModel, hint: bool = False) -> None:
    """`hint`: the shape is the default guess, not the user's: say how to give the real one."""
    try:
        with torch.no_grad():
            lm.model.eval()(lm.spec.example(batch=1))
    except Exception as e:  # noqa: BLE001 - any failure means the shape does not fit
        shape = ",".join(map(str, lm.spec.shape))
        if hint:
            raise UserError(f"{lm.source}: the default input shape {shape} does not fit this model "
                            f"({first_line(e, 120)}); give its shape with --input-shape C,H,W") from None
        raise UserError(f"input shape {shape} does not fit {lm.source}: {first_line(e, 160)}") from None


def default_normalization(channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The zoo's mean/std (ImageNet's, one value per RGB channel); for another channel count, their average on
    every channel (only the user knows what such a model was trained with: callers say so aloud)."""
    if channels in (None, len(CIFAR_MEAN)):
        return CIFAR_MEAN, CIFAR_STD
    mean, std = sum(CIFAR_MEAN) / len(CIFAR_MEAN), sum(CIFAR_STD) / len(CIFAR_STD)
    return (round(mean, 4),) * channels, (round(std, 4),) * channels


def _default_normalization_for(lm: LoadedModel) -> None:
    """A model whose input is not RGB and that records no normalization of its own gets the default's average."""
    from compress.progress import log

    c = lm.spec.shape[0]
    lm.spec.mean, lm.spec.std = default_normalization(c)
    log(f"{Path(lm.source).name}: {c}-channel input and no normalization given: using mean {lm.spec.mean[0]:.3f}, "
        f"std {lm.spec.std[0]:.3f} per channel (give the model's own with --mean/--std)")


def _sniff(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a pickle protocol 2+ header: torch.save's legacy format, or a pickled object
            return "torch"
        if head == b"PK" or not head:  # a zip archive's first bytes without its directory at the end: cut short
            raise UserError(f"{path}: corrupt or truncated model file")
        runtime = ARTIFACT_RUNTIMES.get(path.suffix.lower())  # an artifact passed to a torch verb by mistake
        if runtime not in (None, "torch"):
            raise UserError(f"{path} is an artifact for {runtime}, not a torch model: this verb needs the torch model it "
                            f"was exported from (`compress profile` and `compress eval` take artifacts)")
        raise UserError(f"{path} is not a PyTorch model file (not a torch.save, torch.export or TorchScript archive)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            # torch reads tensors without checking the archive's CRCs: a flipped byte would load as a wrong weight
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path}: corrupt archive ({first_line(e, 120)})") from None
    if damaged is not None:
        raise UserError(f"{path}: corrupt model file ({damaged.split('/', 1)[-1]} does not match its checksum)")
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") for n in names):
        return "export"
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "torch"


def _torch_load_safe(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or "truncated" in str(e).lower():
            raise UserError(f"{path}: corrupt or truncated model file") from None
        if not trust_pickle:
            raise UserError(f"{path} is a pickled Python object (e.g. a whole nn.Module); loading it would run code "
                            f"from the file. Save model.state_dict() instead, or pass --trust-pickle if you trust its source") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: corrupt or truncated model file ({first_line(e, 120)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - the user opted into running the file's code; report what broke
        raise UserError(f"{path}: unpickling failed ({type(e).__name__}: {first_line(e, 120)})") from None


def _unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError("the file holds no tensors: not a state dict")
    return state


def _structural_keys(model: nn.Module) -> set[str]:
    keys = set()
    for prefix, m in model.named_modules():
        for b in getattr(m, "structural_buffers", ()):
            keys.add(f"{prefix}.{b}" if prefix else b)
    return keys


def _from_state_dict(obj: dict, source: str, arch: str | None, num_classes: int | None) -> LoadedModel:
    if arch is None:
        raise UserError(f"{source} is a state dict: say which architecture it belongs to with --arch "
                        f"(one of {', '.join(ARCHS.names())}, or package.module:factory)")
    state = _unwrap_state_dict(obj)
    model, spec = build_arch(arch, num_classes)
    if num_classes is None:
        num_classes = _output_count(model, state)
        if num_classes is not None:
            model, spec = build_arch(arch, num_classes)
    expected = model.state_dict()
    # buffers an older or foreign checkpoint may lack without losing anything: taken from the fresh model
    structural = _structural_keys(model) | {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in structural]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise UserError(f"{source} does not match --arch {arch}: " + "; ".join(parts))
    model.load_state_dict({**{k: expected[k] for k in structural}, **state}, strict=True)
    return LoadedModel(model, spec, "state_dict", source, arch=arch,
                       arch_kwargs={} if num_classes is None else {"num_classes": num_classes})


def _output_count(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count a checkpoint was trained with, when it differs from the freshly built model's: the one
    layer whose shapes differ only in their output dimension (read from the shapes, not guessed from key order)."""
    expected = model.state_dict()
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    owners = {k.rsplit(".", 1)[0] for k in wrong}
    if len(owners) != 1:
        return None
    weight = f"{owners.pop()}.weight"
    if weight not in wrong:
        return None
    w_new, w_old = state[weight].shape, expected[weight].shape
    if len(w_new) != len(w_old) or w_new[1:] != w_old[1:]:
        return None
    return int(w_new[0])


def _from_saved(obj: dict, source: str) -> LoadedModel:
    try:
        arch, kwargs, edits, state = obj["arch"], obj.get("arch_kwargs", {}), obj.get("edits", []), obj["state_dict"]
        spec = InputSpec.from_dict(obj["input_spec"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{source}: damaged compress model file (missing {e})") from None
    if not isinstance(arch, str) or not isinstance(kwargs, dict):
        raise UserError(f"{source}: damaged compress model file (arch {arch!r})")
    model, _ = build_arch(arch, kwargs.get("num_classes"))
    model = replay(model, edits)
    conform_to_state_dict(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not fit the recorded structure ({first_line(e, 160)})") from None
    return LoadedModel(model, spec, "compress", source, arch, dict(kwargs), list(edits), list(obj.get("history", [])))


def _load_export(path: Path) -> LoadedModel:
    from runtimes.torch import load_export_program

    ep = load_export_program(path, torch)
    args = ep.example_inputs[0] if ep.example_inputs else ()
    shape = tuple(args[0].shape[1:]) if args else (3, 32, 32)
    module = ep.module()
    # an exported program's train/eval behaviour was fixed when it was exported, and torch refuses .eval() on it
    # ("not supported yet"); every verb calls .eval(), so here it is a no-op
    module.train = types.MethodType(lambda self, mode=True: self, module)
    module.eval = types.MethodType(lambda self: self, module)
    batch = _static_batch(ep)
    if batch is not None:  # exported without a dynamic batch: evaluation and parity batches go through in slices
        module = _FixedBatch(module, batch)
    return LoadedModel(module, InputSpec(shape, batch=batch), "export", str(path))


def _static_batch(ep) -> int | None:
    """The batch size an exported program was traced at, if its batch dimension is not dynamic."""
    names = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            return int(val.shape[0]) if val is not None and val.ndim and isinstance(val.shape[0], int) else None
    return None


class _FixedBatch(nn.Module):
    """A program that only takes batches of `batch`: larger batches run in slices of it (the last one padded)."""

    def __init__(self, inner: nn.Module, batch: int):
        super().__init__()
        self.inner, self.batch = inner, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch:
            return self.inner(x)
        outs = []
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i:i + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - n, *chunk.shape[1:])])
            outs.append(self.inner(chunk)[:n])
        return torch.cat(outs)


def _load_torchscript(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot load TorchScript archive ({type(e).__name__})") from None
    return LoadedModel(module, InputSpec(tuple(input_shape) if input_shape else (3, 32, 32)), "torchscript", str(path))


def save_model(lm: LoadedModel, path: str | Path) -> Path:
    """Save in the toolchain's own format (tensors and plain data only: reloads with weights_only=True)."""
    path = Path(path)
    lm.require_savable("save")
    payload = {
        "format": FORMAT,
        "arch": lm.arch,
        "arch_kwargs": lm.arch_kwargs,
        "edits": lm.edits,
        "input_spec": lm.spec.to_dict(),
        "history": lm.history,
        "state_dict": {k: v.detach().clone() for k, v in lm.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def zoo_model(arch: str, pretrained: bool = True) -> LoadedModel:
    """A zoo model, with its real checkpoint from the shared assets when one exists."""
    from compress.assets import model_path

    entry = ARCHS.get(arch)
    if pretrained and entry.checkpoint:
        return load_model(model_path(entry.checkpoint), arch=arch)
    model, spec = build_arch(arch)
    return LoadedModel(model.eval(), spec, "zoo", f"zoo:{arch}", arch=arch)
