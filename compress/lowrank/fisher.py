"""Fisher information of layer weights from per-sample gradients (FWSVD, Hsu et al. 2022, §3).

    Î_{W_ij} = (1/|D|) Σ_{d∈D} (∂L(d)/∂W_ij)²

Each sample's own gradient is squared; squaring a batch gradient instead would drop the cross-sample
variance and change the relative weights (research note §4.4). Per-sample weight gradients of a Linear or
Conv2d are outer products of the layer's input and its output gradient, so they come from one forward and
one backward pass per batch: forward hooks keep each layer's input and output, `torch.autograd.grad`
returns the (per-sample, since the loss is a sum over samples) output gradients, and
G_n = Σ_t g_{n,t} a_{n,t}ᵀ is formed per sample. The model is in eval mode throughout (BN running
statistics, no dropout): the Fisher of the network that will be deployed.

Where the gradients come from is a *source* (FISHER_SOURCES): its inputs, and whether the loss uses the
data's labels (empirical Fisher of the task loss, the paper) or labels drawn from the model's own predictive
distribution (the true Fisher: no labels needed). Another stage (e.g. Genie data synthesis) adds a source
by registering one, with no change here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError
from compress.progress import track
from compress.registry import Registry

Batch = tuple[Any, "torch.Tensor | None"]  # (model input: a tensor or a tuple of tensors, labels or None)


@dataclass(frozen=True)
class FisherSource:
    """Where Fisher gradients come from.

    inputs(lm, ctx, n, batch_size) -> (iterable of batches, number of samples)
    labels: "data" uses the batch labels with the task loss (empirical Fisher); "model" samples labels from
            the model's predictive distribution (true Fisher).
    """

    inputs: Callable[..., tuple[Iterable[Batch], int]]
    labels: str
    help: str


FISHER_SOURCES: Registry[FisherSource] = Registry("Fisher source")


def _is_text(model: nn.Module) -> bool:
    return getattr(model, "input_kind", "image") == "tokens"


def _image_inputs(role: str, labeled: bool):
    def inputs(lm, ctx, n: int, batch_size: int):
        from compress.data import batches

        from compress.metrics import check_labels

        ds = ctx.dataset(role, required=True, labeled=labeled).subset(n, seed=ctx.seed)
        check_labels(ds, lm.model, ctx.spec.example(batch=1))
        return batches(ds, ctx.normalizer(), batch_size), len(ds)
    return inputs


def _labeled_inputs(lm, ctx, n: int, batch_size: int):
    if _is_text(lm.model):
        raise UserError("--fisher labels needs labeled task data; this text encoder has no labels here: "
                        "use --fisher model (the true Fisher, from unlabeled sentences)")
    return _image_inputs("train", True)(lm, ctx, n, batch_size)


def _model_inputs(lm, ctx, n: int, batch_size: int):
    if _is_text(lm.model):
        from compress.text import sentences_from_spec, token_batches

        spec = ctx.data.get("calib") or ctx.data.get("train")
        if spec is None:
            raise UserError("FWSVD on a text encoder needs sentences: pass --calib text:builtin:calib "
                            "(the built-in corpus) or text:FILE.txt (one sentence per line)")
        sentences = sentences_from_spec(spec)[:n]
        sentences.sort(key=len)  # batches of similar length: less padding, same Fisher (padding gets no gradient)
        return ((ids_mask, None) for ids_mask in token_batches(sentences, batch_size)), len(sentences)
    return _image_inputs("calib", False)(lm, ctx, n, batch_size)


FISHER_SOURCES.add("labels", FisherSource(_labeled_inputs, "data",
                                          "labeled train data, the task loss on the true labels (empirical Fisher, the paper)"))
FISHER_SOURCES.add("model", FisherSource(_model_inputs, "model",
                                         "unlabeled calib data, labels sampled from the model's own prediction (true Fisher)"))


def _likelihood(model: nn.Module) -> str:
    """categorical for classifiers (logits), gaussian (unit variance) for models that output embeddings."""
    return "gaussian" if getattr(model, "output_kind", "logits") == "embedding" else "categorical"


def _loss(out: torch.Tensor, labels: torch.Tensor | None, mode: str, likelihood: str, gen: torch.Generator) -> torch.Tensor:
    """A loss summed over samples, so that d loss / d output_n is sample n's own gradient."""
    if likelihood == "categorical":
        if mode == "data":
            if labels is None:
                raise UserError("empirical Fisher needs labels")
            return F.cross_entropy(out, labels, reduction="sum")
        with torch.no_grad():
            y = torch.multinomial(F.softmax(out.detach().double(), -1), 1, generator=gen).squeeze(1)
        return F.cross_entropy(out, y, reduction="sum")
    if mode == "data":
        raise UserError("an embedding model has no labels for an empirical Fisher: use labels sampled from the model")
    # y ~ N(f(x), I): -log p = ½‖f - y‖² = -εᵀf + const, so the gradient is -εᵀ ∂f/∂θ with ε ~ N(0, I)
    eps = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return -(eps * out).sum()


def _per_sample_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G[n] = ∂L_n/∂W for one call of `layer` (input a, output gradient g), shape (n, *weight.shape)."""
    n = a.shape[0]
    if isinstance(layer, nn.Linear):
        a = a.reshape(n, -1, a.shape[-1])
        g = g.reshape(n, -1, g.shape[-1])
        return torch.bmm(g.transpose(1, 2), a)
    pad = layer._reversed_padding_repeated_twice if not isinstance(layer.padding, str) else _same_pad(layer)
    if any(pad):
        a = F.pad(a, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    # the weight gradient is a correlation of the input with the output gradient; one group per sample keeps
    # the samples apart: input (i, n, H, W), kernel (n·o, 1, Ho, Wo), the layer's stride as dilation and its
    # dilation as stride. About twice as fast as unfold + bmm on CPU.
    o, kh, kw = g.shape[1], *layer.kernel_size
    out = F.conv2d(a.transpose(0, 1), g.reshape(n * o, 1, *g.shape[2:]), stride=layer.dilation,
                   dilation=layer.stride, groups=n)                                # i × (n·o) × ≥kh × ≥kw
    return out[:, :, :kh, :kw].reshape(a.shape[1], n, o, kh, kw).permute(1, 2, 0, 3, 4)


def _same_pad(layer: nn.Conv2d) -> list[int]:
    if layer.padding == "valid":
        return [0, 0, 0, 0]
    pads = []
    for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def collect_fisher(model: nn.Module, layers: dict[str, nn.Module], data: Iterable[Batch], labels: str = "model",
                   likelihood: str | None = None, seed: int = 0, total: int | None = None,
                   description: str = "Fisher (per-sample gradients)",
                   row_splits: dict[str, tuple[str, ...]] | None = None,
                   rows_out: dict[tuple[str, str], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Per-weight empirical/true Fisher of every layer in `layers` (name -> module), averaged over samples.

    labels: "data" (task loss on the batch labels) or "model" (labels sampled from the model's prediction).
    row_splits (name -> splits), with rows_out: also the full row Fisher R = (1/|D|) Σ_d Γ_d Γ_dᵀ (N×N) of each
    named layer, Γ_d its per-sample gradient as the paper's N×M matrix in that split's orientation (the
    diagonal of R is the FWSVD row importance); written into rows_out[(name, split)].
    Returns ({name: Fisher with the weight's shape}, number of samples).
    """
    from compress.lowrank.factorize import matrix_grads

    row_splits = row_splits or {}
    rows: dict[str, torch.Tensor] = {}
    if labels not in ("data", "model"):
        raise ValueError(f"labels must be 'data' or 'model', not {labels!r}")
    likelihood = likelihood or _likelihood(model)
    gen = torch.Generator().manual_seed(seed)
    fisher = {name: torch.zeros_like(m.weight, dtype=torch.float64) for name, m in layers.items()}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def fn(module, inputs, output):
            out = output if output.requires_grad else output.detach().requires_grad_()
            calls.append((name, inputs[0].detach(), out))
            return out
        return fn

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    seen = 0
    try:
        for x, y in track(data, description, total=total):
            calls.clear()
            with torch.enable_grad():
                out = model(*x) if isinstance(x, (tuple, list)) else model(x)
                loss = _loss(out, y, labels, likelihood, gen)
                grads = torch.autograd.grad(loss, [c[2] for c in calls], allow_unused=True)
            per_layer: dict[str, torch.Tensor] = {}
            for (name, a, _), g in zip(calls, grads):
                if g is None:
                    continue
                G = _per_sample_grads(layers[name], a, g)
                per_layer[name] = per_layer[name] + G if name in per_layer else G  # a layer called twice: sum first
            for name, G in per_layer.items():
                for split in row_splits.get(name, ()):
                    Gm = matrix_grads(G, split).double()
                    R = torch.einsum("nab,ncb->ac", Gm, Gm)
                    rows[(name, split)] = rows[(name, split)] + R if (name, split) in rows else R
                fisher[name] += G.square_().sum(0)  # float32 over one batch, float64 across batches
            seen += out.shape[0]
    finally:
        for h in handles:
            h.remove()
        calls.clear()
        model.train(was_training)
    if seen == 0:
        raise UserError("no data for the Fisher information")
    if rows_out is not None:
        rows_out.update({name: R / seen for name, R in rows.items()})
    return {name: (f / seen).float() for name, f in fisher.items()}, seen


def fisher_from_source(lm, ctx, source: str, layers: dict[str, nn.Module], n: int, batch_size: int,
                       row_splits: dict[str, tuple[str, ...]] | None = None,
                       rows_out: dict[tuple[str, str], torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], int]:
    src = FISHER_SOURCES.get(source)
    data, count = src.inputs(lm, ctx, n, batch_size)
    steps = (count + batch_size - 1) // batch_size
    return collect_fisher(lm.model, layers, data, src.labels, seed=ctx.seed, total=steps, row_splits=row_splits,
                          rows_out=rows_out)

