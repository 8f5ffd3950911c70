"""The low-rank factorizations themselves: (Fisher-)weighted SVD and the layer surgery.

Orientation follows the FWSVD paper (Hsu et al., ICLR 2022, §3): a layer is y = xW + b with
W ∈ R^{N×M}, N input features and M outputs. PyTorch stores Linear.weight = Wᵀ (M×N), so the paper's
*rows* (input features) are PyTorch's *columns*. A rank-r factorization W ≈ AB is two plain layers:
A ∈ R^{N×r} (first layer, no bias) and B ∈ R^{r×M} (second layer, carries the bias).

  Linear(N→M)            → Linear(N→r) ▸ Linear(r→M)
  Conv k×k (C_in→C_out)  → Conv k×k (C_in→r, the original stride/padding) ▸ Conv 1×1 (r→C_out)   split="channel"
                           rows of W are (c_in, kh, kw), columns c_out
  Conv k×k (C_in→C_out)  → Conv k×1 (C_in→r) ▸ Conv 1×k (r→C_out)                                split="spatial"
                           rows of W are (c_in, kh), columns (c_out, kw)  (Jaderberg et al. 2014, scheme 2)

FWSVD: with per-input-feature importance Î_i (summed Fisher of row i), svd(diag(√Î) W) = U S Vᵀ,
A = diag(√Î)⁻¹ U_r S_r, B = V_rᵀ. Uniform Î gives plain SVD; Î → cÎ leaves A and B unchanged.

Full row Fisher (fisher_rows "full", an extension, not the paper): Î_i is the diagonal of the N×N matrix
R = (1/|D|) Σ_d Γ_d Γ_dᵀ, Γ_d = ∂L(d)/∂W (N×M) the per-sample gradient. Keeping R whole,
min ‖R^{1/2}(W − AB)‖²_F has the closed form svd(R^{1/2} W) = U S Vᵀ, A = R^{-1/2} U_r S_r, B = V_rᵀ; a
diagonal R is FWSVD. It keeps the correlations between input features that the diagonal drops (a conv's
(c_in, kh, kw) features are neighbouring pixels of the same maps).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from compress.structure import EDITS

# rows whose importance is below this fraction of the mean importance are floored there (dead inputs):
# relative, so that scaling Î by a constant leaves the factors unchanged (check (c) of the research note)
IMPORTANCE_FLOOR = 1e-6
# the full row Fisher R (fisher_rows full) is damped by this fraction of its mean diagonal before its square
# root is taken: R is a sum of |D| rank-≤M matrices and may be singular; relative, so R → cR changes nothing
ROW_FISHER_DAMPING = 1e-2

SPLITS = ("linear", "channel", "spatial")


class Factorized(nn.Sequential):
    """A layer replaced by two plain layers: `0` maps to the rank-r space (no bias), `1` back out (bias)."""

    def __init__(self, first: nn.Module, second: nn.Module, rank: int, split: str):
        super().__init__(first, second)
        self.rank = rank
        self.split = split

    def extra_repr(self) -> str:
        return f"rank={self.rank}, split={self.split}"


# ---------------------------------------------------------------------------------------------- matrices


def split_for(layer: nn.Module, conv_split: str = "channel") -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    kh, kw = layer.kernel_size
    return "spatial" if conv_split == "spatial" and kh > 1 and kw > 1 else "channel"


def layer_matrix(layer: nn.Module, split: str) -> torch.Tensor:
    """The layer's weight as the paper's W (N input features × M outputs)."""
    w = layer.weight.detach()
    if split == "linear":
        return w.t()
    if split == "channel":
        return w.reshape(w.shape[0], -1).t()
    o, i, kh, kw = w.shape  # spatial: rows (i, kh), columns (o, kw)
    return w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def row_importance(fisher: torch.Tensor, split: str) -> torch.Tensor:
    """Per-input-feature importance Î_i = Σ_j Î_{W_ij}, from the per-weight Fisher (weight-shaped)."""
    if split == "linear":
        return fisher.sum(0)
    if split == "channel":
        return fisher.reshape(fisher.shape[0], -1).sum(0)
    return fisher.sum((0, 3)).reshape(-1)  # (o, i, kh, kw) → (i, kh)


def matrix_grads(G: torch.Tensor, split: str) -> torch.Tensor:
    """Per-sample weight gradients (n, *weight.shape) as the paper's matrices (n, N, M), oriented as layer_matrix."""
    n = G.shape[0]
    if split == "linear":
        return G.transpose(1, 2)
    if split == "channel":
        return G.reshape(n, G.shape[1], -1).transpose(1, 2)
    _, o, i, kh, kw = G.shape
    return G.permute(0, 2, 3, 1, 4).reshape(n, i * kh, o * kw)


def matrix_dims(layer: nn.Module, split: str) -> tuple[int, int]:
    if split == "linear":
        return layer.in_features, layer.out_features
    o, i, kh, kw = layer.weight.shape
    return (i * kh * kw, o) if split == "channel" else (i * kh, o * kw)


# ---------------------------------------------------------------------------------------------- weighted SVD


@dataclass
class Decomposition:
    """svd(diag(s) W) = U S Vᵀ for one layer, kept so that rank selection and factorization share one SVD."""

    U: torch.Tensor      # N × K (float64)
    S: torch.Tensor      # K
    Vh: torch.Tensor     # K × M
    scale: torch.Tensor  # N: the row weights s = √Î (ones for plain SVD)
    left_inv: torch.Tensor | None = None  # N × N: R^{-1/2} for the full row Fisher (then scale is unused)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (N×r) = diag(s)⁻¹ U_r S_r (or R^{-1/2} U_r S_r), B (r×M) = V_rᵀ, as float32."""
        US = self.U[:, :rank] * self.S[:rank]
        A = self.left_inv @ US if self.left_inv is not None else US / self.scale[:, None]
        B = self.Vh[:rank]
        return A.float(), B.float()

    def truncation_error(self) -> torch.Tensor:
        """err[r] = Σ_{i>r} σ_i², the (weighted) squared error of keeping r singular values, r = 0..K."""
        tail = torch.cumsum(self.S.flip(0) ** 2, 0).flip(0)
        return torch.cat([tail, tail.new_zeros(1)])


def decompose(W: torch.Tensor, importance: torch.Tensor | None = None,
              row_fisher: torch.Tensor | None = None) -> Decomposition:
    """(Fisher-)weighted SVD of W (N×M) with per-row importance Î (N), or plain SVD when it is None;
    `row_fisher` (N×N, symmetric PSD) weights with the full row Fisher R instead: svd(R^{1/2} W)."""
    W = W.detach().double()
    n = W.shape[0]
    if row_fisher is not None:
        return _decompose_full(W, row_fisher)
    if importance is None:
        scale = torch.ones(n, dtype=torch.float64)
    else:
        imp = importance.detach().double().clamp_min(0)
        if imp.shape != (n,):
            raise ValueError(f"importance has shape {tuple(imp.shape)}, expected ({n},)")
        mean = imp.mean()
        imp = imp / mean if mean > 0 else torch.ones_like(imp)
        scale = (imp + IMPORTANCE_FLOOR).sqrt()
    with _one_thread():
        U, S, Vh = torch.linalg.svd(scale[:, None] * W, full_matrices=False)
    return _signed(U, S, Vh, scale)


def _signed(U, S, Vh, scale, left_inv=None) -> Decomposition:
    # a deterministic sign per singular pair: the largest-magnitude entry of each right vector is positive
    idx = Vh.abs().argmax(1)
    sign = torch.sign(Vh[torch.arange(Vh.shape[0]), idx])
    sign[sign == 0] = 1
    return Decomposition(U * sign, S, Vh * sign[:, None], scale, left_inv)


def damped_row_fisher(R: torch.Tensor) -> torch.Tensor:
    """R / mean(diag R) + ROW_FISHER_DAMPING · I: scale-free (R → cR gives the same matrix) and positive definite."""
    R = R.detach().double()
    R = (R + R.t()) / 2
    mean = R.diagonal().mean()
    R = R / mean if mean > 0 else torch.eye(R.shape[0], dtype=R.dtype)
    return R + ROW_FISHER_DAMPING * torch.eye(R.shape[0], dtype=R.dtype)


def _decompose_full(W: torch.Tensor, R: torch.Tensor) -> Decomposition:
    n = W.shape[0]
    if R.shape != (n, n):
        raise ValueError(f"row Fisher has shape {tuple(R.shape)}, expected ({n}, {n})")
    with _one_thread():
        e, Q = torch.linalg.eigh(damped_row_fisher(R))
        e = e.clamp_min(ROW_FISHER_DAMPING / 2)  # eigh rounding below the damping floor
        root, inv_root = (Q * e.sqrt()) @ Q.t(), (Q / e.sqrt()) @ Q.t()
        U, S, Vh = torch.linalg.svd(root @ W, full_matrices=False)
    return _signed(U, S, Vh, torch.ones(n, dtype=torch.float64), inv_root)


@contextmanager
def _one_thread():
    """LAPACK's SVD of these small matrices is 10-50x slower multi-threaded on a busy CPU (OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def weighted_svd(W: torch.Tensor, rank: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The FWSVD factors (A: N×r, B: r×M) of W (N×M); plain SVD (A = U_r S_r, B = V_rᵀ) without importance."""
    return decompose(W, importance).factors(rank)


# ---------------------------------------------------------------------------------------------- layer surgery


def build_factorized(layer: nn.Module, rank: int, split: str) -> Factorized:
    """The two-layer replacement for `layer` at rank `rank`, weights uninitialized (used by replay too)."""
    bias = layer.bias is not None
    if split == "linear":
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=bias)
    else:
        if layer.groups != 1:
            raise ValueError("grouped convolutions are not factorized")
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        dh, dw = layer.dilation
        pad = layer.padding
        common = dict(padding_mode=layer.padding_mode)
        if split == "channel":
            first = nn.Conv2d(layer.in_channels, rank, (kh, kw), (sh, sw), pad, (dh, dw), bias=False, **common)
            second = nn.Conv2d(rank, layer.out_channels, 1, bias=bias)
        elif split == "spatial":
            ph, pw = (pad, pad) if isinstance(pad, str) else pad
            first = nn.Conv2d(layer.in_channels, rank, (kh, 1), (sh, 1), ph if isinstance(ph, str) else (ph, 0),
                              (dh, 1), bias=False, **common)
            second = nn.Conv2d(rank, layer.out_channels, (1, kw), (1, sw), pw if isinstance(pw, str) else (0, pw),
                               (1, dw), bias=bias, **common)
        else:
            raise ValueError(f"unknown split {split!r}")
    ref = layer.weight
    return Factorized(first, second, rank, split).to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def factorize_layer(layer: nn.Module, rank: int, split: str, importance: torch.Tensor | None = None,
                    decomposition: Decomposition | None = None) -> Factorized:
    """Replace-ready factorized copy of `layer` (rank r; `importance` per input feature for FWSVD)."""
    dec = decomposition if decomposition is not None else decompose(layer_matrix(layer, split), importance)
    A, B = dec.factors(rank)  # N×r, r×M
    fac = build_factorized(layer, rank, split)
    first, second = fac[0], fac[1]
    if split == "linear":
        first.weight.copy_(A.t())
        second.weight.copy_(B.t())
    elif split == "channel":
        o, i, kh, kw = layer.weight.shape
        first.weight.copy_(A.t().reshape(rank, i, kh, kw))
        second.weight.copy_(B.t().reshape(o, rank, 1, 1))
    else:
        o, i, kh, kw = layer.weight.shape
        first.weight.copy_(A.t().reshape(rank, i, kh, 1))
        second.weight.copy_(B.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2))
    if layer.bias is not None:
        second.bias.copy_(layer.bias)
    return fac


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------------------------------- costs


def dense_cost(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, FLOPs at batch 1) of the unfactorized layer; FLOPs = 2 × multiply-accumulates, as FlopCounterMode."""
    params = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    if isinstance(layer, nn.Linear):
        tokens = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
        return params, 2 * tokens * layer.in_features * layer.out_features
    positions = math.prod(out_shape[2:])
    return params, 2 * positions * layer.weight[0].numel() * layer.out_channels


def factorized_cost(layer: nn.Module, split: str, rank: int, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, FLOPs at batch 1) of the two-layer form at `rank`."""
    bias = layer.bias.numel() if layer.bias is not None else 0
    if split == "linear":
        n, m = layer.in_features, layer.out_features
        tokens = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
        return rank * (n + m) + bias, 2 * tokens * rank * (n + m)
    o, i, kh, kw = layer.weight.shape
    ho, wo = out_shape[2], out_shape[3]
    if split == "channel":
        return rank * (i * kh * kw + o) + bias, 2 * ho * wo * rank * (i * kh * kw + o)
    w_mid = in_shape[3]  # the k×1 conv keeps the input width (its padding/stride act on height only)
    return rank * kh * i + o * rank * kw + bias, 2 * (ho * w_mid * rank * i * kh + ho * wo * o * rank * kw)


# ---------------------------------------------------------------------------------------------- replay


def replay_lowrank(model: nn.Module, edit: dict) -> nn.Module:
    """Rebuild the factorized structure recorded by a lowrank stage (weights come from the state dict)."""
    for entry in edit["layers"]:
        layer = model.get_submodule(entry["name"])
        set_submodule(model, entry["name"], build_factorized(layer, int(entry["rank"]), entry["split"]))
    return model


EDITS.add("lowrank", replay_lowrank)
