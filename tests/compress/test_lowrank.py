"""Low-rank factorization (svd, fwsvd): the math (research note §4.4 checks (a)-(c)), exactness at full rank,
per-sample Fisher, rank rules, the stage, save/load replay and ONNX export."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.errors import UserError
from compress.io import InputSpec, LoadedModel, load_model, save_model
from compress.lowrank import METHODS
from compress.lowrank.factorize import (Factorized, decompose, factorize_layer, layer_matrix, row_importance,
                                        weighted_svd)
from compress.lowrank.fisher import collect_fisher
from compress.lowrank.plan import make_plan, probe
from compress.metrics import count_flops, count_params
from compress.stages import Context, build_config
from tests.conftest import CALIB1000, TEST_LOSSLESS


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _errors(W, A, B, imp):
    d = (W - A @ B) ** 2
    return float((imp[:, None] * d).sum()), float(d.sum())


# ------------------------------------------------------------------------------------ checks (a)-(c)

def test_a_uniform_importance_gives_svd_and_full_rank_is_exact():
    W = _rand(40, 24).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for r in (1, 5, 24):
        A1, B1 = weighted_svd(W, r, torch.ones(40))       # FWSVD with Î ≡ 1
        A0, B0 = weighted_svd(W, r, None)                 # plain SVD
        assert torch.allclose(A1, A0, atol=1e-6) and torch.allclose(B1, B0, atol=1e-6)
        # ... and that is the textbook truncated SVD (A = U_r S_r, B = V_rᵀ; the product is sign-free)
        assert torch.allclose((A0 @ B0).double(), (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5)
    A, B = weighted_svd(W, 24, _rand(40, seed=1).abs() + 0.1)  # any weights: full rank reproduces W
    assert torch.allclose((A @ B).double(), W, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_b_fwsvd_minimizes_weighted_error_and_svd_the_plain_one(seed):
    W = _rand(30, 20, seed=seed)
    imp = _rand(30, seed=100 + seed).exp() ** 2  # strongly non-uniform importance
    for r in (2, 6, 12):
        wf, ff = _errors(W, *weighted_svd(W, r, imp), imp)
        ws, fs = _errors(W, *weighted_svd(W, r, None), imp)
        assert wf <= ws * (1 + 1e-6) and ff >= fs * (1 - 1e-6)
        assert wf < ws * 0.99  # and strictly better where it matters: the weighting is really applied


def test_c_scaling_importance_changes_nothing():
    W, imp = _rand(24, 16), _rand(24, seed=3).abs()
    A, B = weighted_svd(W, 5, imp)
    for c in (1e-9, 3.0, 1e7):
        A2, B2 = weighted_svd(W, 5, c * imp)
        assert torch.allclose(A, A2, atol=1e-6) and torch.allclose(B, B2, atol=1e-6)


def test_importance_weights_input_features_not_output_rows():
    """Orientation: the paper's rows are input features, i.e. the *columns* of PyTorch's (out, in) weight."""
    lin = nn.Linear(32, 16)
    imp = torch.full((32,), 1e-3)
    imp[7] = 1e3  # input feature 7 is all that matters
    fac_w = factorize_layer(lin, 3, "linear", imp)
    fac_s = factorize_layer(lin, 3, "linear", None)
    err = lambda f: (lin.weight - f[1].weight @ f[0].weight)[:, 7].norm()  # noqa: E731
    assert err(fac_w) < 1e-3 * lin.weight[:, 7].norm() and err(fac_s) > 0.1 * lin.weight[:, 7].norm()
    assert row_importance(torch.ones(16, 32), "linear").shape == (32,)
    assert row_importance(torch.ones(8, 4, 3, 3), "channel").shape == (36,)
    assert row_importance(torch.ones(8, 4, 3, 3), "spatial").shape == (12,)


# ------------------------------------------------------------------------------------ exact at full rank

@pytest.mark.parametrize("make,split,x_shape", [
    (lambda: nn.Linear(20, 12), "linear", (4, 20)),
    (lambda: nn.Linear(20, 12), "linear", (2, 7, 20)),                                   # tokens
    (lambda: nn.Conv2d(6, 10, 3, 2, 1, bias=True), "channel", (2, 6, 11, 11)),
    (lambda: nn.Conv2d(6, 10, (3, 5), 1, (1, 2), dilation=(1, 2), bias=False), "channel", (2, 6, 9, 12)),
    (lambda: nn.Conv2d(6, 10, 3, 2, 1, bias=True), "spatial", (2, 6, 11, 11)),
    (lambda: nn.Conv2d(5, 8, 3, 1, 1, padding_mode="reflect"), "spatial", (1, 5, 8, 8)),
    (lambda: nn.Conv2d(6, 10, 1), "channel", (2, 6, 5, 5)),
])
def test_full_rank_reproduces_the_layer(make, split, x_shape):
    torch.manual_seed(0)
    layer = make()
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    n, m = layer_matrix(layer, split).shape
    fac = factorize_layer(layer, min(n, m), split, _rand(n, seed=5).abs() + 0.01)
    assert isinstance(fac, Factorized) and all(type(c) in (nn.Linear, nn.Conv2d) for c in fac)
    assert fac[0].bias is None and (fac[1].bias is not None) == (layer.bias is not None)
    x = _rand(*x_shape, seed=9)
    with torch.no_grad():
        assert torch.allclose(fac(x), layer(x), atol=1e-5)
        if split == "spatial":
            assert fac[0].kernel_size[1] == 1 and fac[1].kernel_size[0] == 1


def test_low_rank_conv_equals_the_truncated_matrix():
    conv = nn.Conv2d(4, 6, 3, 1, 1)
    A, B = weighted_svd(layer_matrix(conv, "channel"), 2)
    ref = nn.Conv2d(4, 6, 3, 1, 1)
    with torch.no_grad():
        ref.weight.copy_((A @ B).t().reshape(6, 4, 3, 3))
        ref.bias.copy_(conv.bias)
        x = _rand(1, 4, 7, 7)
        assert torch.allclose(factorize_layer(conv, 2, "channel")(x), ref(x), atol=1e-5)


# ------------------------------------------------------------------------------------ Fisher

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, 2, 2, dilation=2)  # strided + dilated: the per-sample trick's corner case
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _tiny():
    torch.manual_seed(1)
    m = Tiny()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    return m


def test_fisher_is_mean_of_per_sample_squared_gradients_in_eval_mode():
    model = _tiny().train()  # collect_fisher must switch BN to eval itself
    x, y = _rand(6, 3, 6, 6, seed=2), torch.tensor([0, 1, 2, 3, 4, 0])
    layers = {"conv": model.conv, "conv2": model.conv2, "fc": model.fc}
    fisher, n = collect_fisher(model, layers, [(x[:4], y[:4]), (x[4:], y[4:])], labels="data")
    assert n == 6 and model.training  # mode restored
    ref = {k: torch.zeros_like(m.weight) for k, m in layers.items()}
    batch_grad = {k: torch.zeros_like(m.weight) for k, m in layers.items()}
    model.eval()
    for i in range(6):  # brute force: one sample at a time
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, m in layers.items():
            ref[k] += m.weight.grad ** 2 / 6
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for k, m in layers.items():
        batch_grad[k] = m.weight.grad ** 2 / 6
        assert torch.allclose(fisher[k], ref[k], rtol=1e-4, atol=1e-9)
        assert not torch.allclose(fisher[k], batch_grad[k], rtol=0.1)  # squared batch gradients are another thing


def test_true_fisher_needs_no_labels_and_gaussian_matches_closed_form():
    model = _tiny()
    x = _rand(8, 3, 6, 6, seed=4)
    f1, _ = collect_fisher(model, {"fc": model.fc}, [(x, None)], labels="model", seed=0)
    f2, _ = collect_fisher(model, {"fc": model.fc}, [(x, None)], labels="model", seed=0)
    assert torch.equal(f1["fc"], f2["fc"]) and f1["fc"].abs().sum() > 0  # seeded label sampling
    with pytest.raises(UserError):
        collect_fisher(model, {"fc": model.fc}, [(x, None)], labels="data")
    # embedding model f(x) = Wx, y ~ N(f(x), I): the true Fisher of W_ji is E[x_i²] for every output j
    emb = nn.Linear(6, 3, bias=False)
    emb.output_kind = "embedding"
    xs = _rand(4, 6, seed=6)
    data = [(xs, None)] * 2000
    f, n = collect_fisher(emb, {"": emb}, data, labels="model", seed=0)
    expected = (xs ** 2).mean(0).expand(3, 6)
    assert n == 8000 and torch.allclose(f[""], expected, rtol=0.15)


# ------------------------------------------------------------------------------------ plans and rules

def _resnet(pretrained=False):
    from compress.io import zoo_model

    return zoo_model("resnet20", pretrained=pretrained)


_TOTALS: dict[int, tuple[int, int]] = {}


def _plan(model, rule, **kw):
    infos = probe(model, torch.zeros(1, 3, 32, 32))
    if id(model) not in _TOTALS:
        _TOTALS[id(model)] = count_params(model), count_flops(model, (3, 32, 32))
    params, flops = _TOTALS[id(model)]
    return make_plan(infos, rule, model_params=params, model_flops=flops, **kw)


def test_plan_rules_skips_and_break_even():
    model = _resnet().model
    plan = _plan(model, "ratio", ratio=0.5)
    by = {p.name: p for p in plan.layers}
    assert not by["conv1"].factorized and "input" in by["conv1"].reason    # stem
    assert not by["linear"].factorized and "output" in by["linear"].reason  # classifier
    assert by["layer1.0.conv1"].rank == 8 and by["layer3.2.conv2"].rank == 32
    assert by["layer1.0.conv1"].params == (2304, 8 * (144 + 16))
    assert not _plan(model, "ratio", ratio=0.95).factorized()  # r=15 of 16 saves nothing: left dense
    ex = _plan(model, "ratio", ratio=0.5, exclude="layer1.*", skip_first_last=False)
    assert by["layer1.0.conv1"].factorized and not {p.name: p for p in ex.layers}["layer1.0.conv1"].factorized
    assert {p.name: p for p in ex.layers}["conv1"].factorized
    with pytest.raises(UserError, match="'layr1.*' matches no Linear or Conv2d layer"):  # a typo was a silent no-op
        _plan(model, "ratio", ratio=0.5, exclude="layer2.*,layr1.*")
    # energy: the smallest rank keeping that much of Σσ²
    en = _plan(model, "energy", energy=0.6)
    for p in en.factorized():
        S2 = torch.linalg.svdvals(layer_matrix(model.get_submodule(p.name), p.split).double()) ** 2
        kept = torch.cumsum(S2, 0) / S2.sum()
        assert kept[p.rank - 1] >= 0.6 - 1e-9 and (p.rank == 1 or kept[p.rank - 2] < 0.6)


@pytest.mark.parametrize("rule", ["params", "flops"])
def test_budget_rule_meets_the_budget_and_spends_it(rule):
    model = _resnet(pretrained=True).model
    plan = _plan(model, rule, budget=0.6)
    before, after = plan.params if rule == "params" else plan.flops
    assert 0.55 * before < after <= 0.6 * before
    ranks = {p.rank for p in plan.factorized()}
    assert len(ranks) > 3  # per-layer allocation, not one global ratio
    with pytest.raises(UserError, match="out of reach"):
        _plan(model, rule, budget=0.005)


def test_grouped_and_depthwise_convs_are_skipped_with_a_reason():
    from compress.zoo.mobilenetv2_cifar import InvertedResidual

    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), InvertedResidual(32, 32, 1, 6),  # 1x1 ▸ dw3x3 ▸ 1x1
                          nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(32 * 32 * 32, 10)).eval()
    plan = _plan(model, "ratio", ratio=0.3)
    by = {p.name: p for p in plan.layers}
    assert by["1.conv.1.0"].layer == "dwconv3x3" and "depthwise" in by["1.conv.1.0"].reason
    assert not by["2"].factorized and "grouped" in by["2"].reason
    assert by["1.conv.0.0"].factorized and by["1.conv.2"].factorized  # the 1x1 convs around it are


# ------------------------------------------------------------------------------------ the stage

def _ctx(lm, tmp_path=None, n_train=None):
    data = {"calib": f"cifar10:{CALIB1000}", "train": f"cifar10:{CALIB1000}"}
    if n_train:
        with np.load(CALIB1000) as z:
            np.savez(tmp_path / "tiny.npz", x=z["x"][:n_train], y=z["y"][:n_train])
        data["train"] = f"cifar10:{tmp_path / 'tiny.npz'}"
    return Context(spec=lm.spec, data=data, seed=0)


def test_dry_run_changes_nothing():
    lm = _resnet()
    before = copy.deepcopy(lm.model.state_dict())
    out = METHODS.get("svd").apply(lm, build_config(METHODS.get("svd"), {"dry_run": True}), _ctx(lm))
    assert out.edits == [] and out.history[-1]["dry_run"] is True and out.history[-1]["plan"]["layers"]
    assert all(torch.equal(v, out.model.state_dict()[k]) for k, v in before.items())


def test_svd_stage_save_load_round_trip(tmp_path):
    lm = _resnet()
    method = METHODS.get("svd")
    out = method.apply(lm, build_config(method, {"rank_rule": "flops", "budget": 0.6, "conv_split": "spatial"}), _ctx(lm))
    edit = out.edits[-1]
    assert edit["kind"] == "lowrank" and json.loads(json.dumps(edit)) == edit
    assert {e["split"] for e in edit["layers"]} == {"spatial"}
    h = out.history[-1]
    assert h["flops_after"] <= 0.6 * h["flops_before"] and h["params_after"] == count_params(out.model)
    assert h["flops_after"] == count_flops(out.model, (3, 32, 32))  # the plan's arithmetic is FlopCounterMode's
    path = save_model(out, tmp_path / "m.pt")
    torch.load(path, weights_only=True)
    back = load_model(path)
    x = _rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model(x), out.model(x))
    assert isinstance(back.model.get_submodule(edit["layers"][0]["name"]), Factorized)


def test_fwsvd_stage_on_pretrained_resnet20_beats_svd_at_moderate_rank():
    from compress.data import load_dataset
    from compress.metrics import evaluate

    lm = _resnet(pretrained=True)
    ctx = _ctx(lm)
    test = load_dataset(f"cifar10:{TEST_LOSSLESS}")
    acc = {}
    for name, opts in (("svd", {}), ("fwsvd", {"fisher": "labels", "fisher_samples": 128})):
        m = METHODS.get(name)
        out = m.apply(copy.deepcopy(lm), build_config(m, {"ratio": 0.8, **opts}), ctx)
        acc[name] = evaluate(out.model, test, ctx.normalizer())
    assert out.history[-1]["fisher"]["samples"] == 128
    assert acc["fwsvd"] > acc["svd"] + 1.0, acc


def test_finetune_hook_runs_the_shared_finetune(tmp_path):
    lm = _resnet(pretrained=True)
    m = METHODS.get("svd")
    ctx = _ctx(lm, tmp_path, n_train=64)
    out = m.apply(lm, build_config(m, {"ratio": 0.5, "finetune_epochs": 1, "batch_size": 32}), ctx)
    assert out.history[-1]["finetune"][0]["steps"] == 2


def test_factorized_model_exports_to_onnx_as_plain_layers(tmp_path):
    import onnx
    import onnxruntime as ort

    lm = _resnet(pretrained=True)
    m = METHODS.get("svd")
    out = m.apply(lm, build_config(m, {"ratio": 0.5}), _ctx(lm))
    x = _rand(1, 3, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(out.model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
    graph = onnx.load(str(path)).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)  # standard operators only: no custom kernels
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], out.model(x).numpy(), atol=1e-4)
    n_conv = sum(n.op_type == "Conv" for n in graph.node)
    assert n_conv == 19 + 18  # every block conv became two


def test_bad_options_fail_at_the_edge():
    with pytest.raises(UserError):
        build_config(METHODS.get("svd"), {"ratio": 1.5})
    with pytest.raises(UserError):
        build_config(METHODS.get("fwsvd"), {"fisher": "nowhere"})
    with pytest.raises(UserError):
        build_config(METHODS.get("svd"), {"fisher": "model"})  # svd has no Fisher
    lm = LoadedModel(_resnet().model, InputSpec(), "torchscript", "x.ts")
    with pytest.raises(UserError):
        METHODS.get("svd").apply(lm, build_config(METHODS.get("svd"), {}), _ctx(lm))


def test_decompose_rejects_wrong_importance_shape():
    with pytest.raises(ValueError):
        decompose(torch.ones(4, 3), torch.ones(3))


# ------------------------------------------------------------------------------------ full row Fisher (extension)

def _psd(n, seed=0, rank=None):
    X = _rand(n, rank or 2 * n, seed=seed).double()
    return X @ X.t() / X.shape[1]


def test_full_row_fisher_reduces_to_svd_and_is_exact_at_full_rank_and_scale_free():
    from compress.lowrank.factorize import ROW_FISHER_DAMPING

    W = _rand(24, 10).double()
    A, B = decompose(W, row_fisher=torch.eye(24)).factors(6)      # R ∝ I: plain SVD
    A0, B0 = weighted_svd(W, 6)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-5)
    R = _psd(24, seed=1)
    A, B = decompose(W, row_fisher=R).factors(10)                  # full rank: W itself
    assert torch.allclose((A @ B).double(), W, atol=1e-5)
    A1, B1 = decompose(W, row_fisher=R).factors(4)
    A2, B2 = decompose(W, row_fisher=R * 1e6).factors(4)           # R → cR: the same factors
    assert torch.allclose(A1, A2, atol=1e-6) and torch.allclose(B1, B2, atol=1e-6)
    # a diagonal R is the paper's FWSVD with importance diag(R) (plus the same relative damping)
    d = _rand(24, seed=2).exp()
    Ad, Bd = decompose(W, row_fisher=torch.diag(d)).factors(4)
    Af, Bf = weighted_svd(W, 4, d / d.mean() + ROW_FISHER_DAMPING)
    assert torch.allclose(Ad @ Bd, Af @ Bf, atol=1e-5)
    with pytest.raises(ValueError):
        decompose(W, row_fisher=torch.eye(23))


@pytest.mark.parametrize("seed", range(4))
def test_full_row_fisher_minimizes_the_correlated_error(seed):
    """min tr(ΔWᵀ R ΔW): below both plain SVD and the diagonal-only FWSVD when R has strong correlations."""
    from compress.lowrank.factorize import damped_row_fisher

    W = _rand(30, 12, seed=seed).double()
    R = _psd(30, seed=50 + seed, rank=6) + 1e-3 * torch.eye(30, dtype=torch.float64)  # few strong directions
    Rd = damped_row_fisher(R)
    err = lambda A, B: float(torch.trace((W - A.double() @ B.double()).t() @ Rd @ (W - A.double() @ B.double())))  # noqa: E731
    for r in (2, 5):
        full = err(*decompose(W, row_fisher=R).factors(r))
        assert full <= err(*weighted_svd(W, r)) * (1 + 1e-9)
        assert full < 0.95 * err(*weighted_svd(W, r, R.diagonal()))  # the diagonal alone misses the correlations


@pytest.mark.parametrize("split", ["channel", "spatial"])
def test_collected_row_fisher_is_mean_of_per_sample_gradient_grams(split):
    """R = (1/|D|) Σ_d Γ_d Γ_dᵀ in the split's orientation; its diagonal is the paper's row importance."""
    model = _tiny()
    x, y = _rand(5, 3, 6, 6, seed=2), torch.tensor([0, 1, 2, 3, 4])
    layers = {"conv": model.conv, "conv2": model.conv2, "fc": model.fc}
    rows: dict = {}
    fisher, n = collect_fisher(model, layers, [(x[:3], y[:3]), (x[3:], y[3:])], labels="data",
                               row_splits={"conv": (split,), "conv2": (split,), "fc": ("linear",)}, rows_out=rows)
    model.eval()
    for name, sp in (("conv", split), ("conv2", split), ("fc", "linear")):
        m = layers[name]
        ref = 0
        for i in range(5):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            fake = copy.deepcopy(m)
            fake.weight.data = m.weight.grad.clone()
            G = layer_matrix(fake, sp).double()  # the per-sample gradient as the paper's N×M matrix
            ref = ref + G @ G.t() / 5
        R = rows[(name, sp)]
        assert torch.allclose(R, ref, rtol=1e-4, atol=1e-10)
        assert torch.allclose(R.diagonal().float(), row_importance(fisher[name], sp), rtol=1e-4, atol=1e-10)


def test_fwsvd_full_rows_stage_on_pretrained_resnet20_beats_svd_where_the_diagonal_loses():
    """At rank ratio 0.6 the paper's diagonal FWSVD is below SVD on ResNet-20; the full row Fisher is far above."""
    from compress.data import load_dataset
    from compress.metrics import evaluate

    lm = _resnet(pretrained=True)
    ctx = _ctx(lm)
    test = load_dataset(f"cifar10:{TEST_LOSSLESS}")
    acc = {}
    for name, method, opts in (("svd", "svd", {}), ("full", "fwsvd", {"fisher_rows": "full"})):
        m = METHODS.get(method)
        opts = {"ratio": 0.6, **opts, **({"fisher": "labels", "fisher_samples": 256} if method == "fwsvd" else {})}
        out = m.apply(copy.deepcopy(lm), build_config(m, opts), ctx)
        acc[name] = evaluate(out.model, test, ctx.normalizer())
    assert out.history[-1]["fisher"]["rows"] == "full"
    assert acc["full"] > acc["svd"] + 10.0, acc


# ------------------------------------------------------------------------------------ latency-aware plans

class FakeTable:
    """A latency table with a made-up, deterministic cost: overhead per op + MACs × a per-kernel-shape rate."""

    def __init__(self, rate=None, overhead=0.01):
        self.rate = rate or {}
        self.overhead, self.measured, self.path, self.seen = overhead, 0, "fake", []

    def ensure(self, layers):
        self.seen += list(layers)

    def layer_ms(self, layer, c_in, c_out):
        macs = c_in * c_out * layer.kernel[0] * layer.kernel[1] * layer.out_hw[0] * layer.out_hw[1]
        return self.overhead + macs * self.rate.get(layer.kernel, 1e-8)


def _latency(rate=None, overhead=0.01):
    from compress.lowrank.latency import LatencyCosts

    return LatencyCosts(table=FakeTable(rate, overhead))


def test_candidate_layer_shapes_match_the_factorized_halves():
    from compress.lowrank.latency import LatencyCosts

    conv = nn.Conv2d(16, 32, 3, 2, 1)
    x = _rand(1, 16, 32, 32)
    lc = LatencyCosts(table=FakeTable()).add("c", conv, tuple(x.shape), tuple(conv(x).shape), {"channel": 32, "spatial": 48})
    assert lc.dense.kernel == (3, 3) and lc.dense.in_hw == (32, 32) and lc.dense.out_hw == (16, 16)
    for split in ("channel", "spatial"):
        fac = factorize_layer(conv, 8, split)
        h = fac[0](x)
        for half, spec, inp in ((fac[0], lc.parts[split][0], x), (fac[1], lc.parts[split][1], h)):
            rebuilt = nn.Conv2d(spec.c_in if spec.in_group is None else 8, 8 if spec.out_group else spec.c_out,
                                spec.kernel, spec.stride, spec.padding, spec.dilation)
            assert (half.kernel_size, half.stride, half.padding) == (spec.kernel, spec.stride, spec.padding)
            assert tuple(inp.shape[2:]) == spec.in_hw and tuple(rebuilt(inp).shape) == tuple(half(inp).shape)
            assert tuple(half(inp).shape[2:]) == spec.out_hw


def test_latency_aware_plan_only_factorizes_where_predicted_faster_and_meets_the_flops_budget():
    from compress.lowrank.latency import LATENCY_GAIN

    model = _resnet(pretrained=True).model
    # 1x1 convs are dear, 3x1/1x3 cheap: every factorized conv must take the spatial split
    plan = _plan(model, "flops", budget=0.7, latency=_latency({(1, 1): 1e-6}))
    assert plan.factorized() and {p.split for p in plan.factorized()} == {"spatial"}
    assert plan.flops[1] <= 0.7 * plan.flops[0] and plan.ms[1] < plan.ms[0]
    assert all(p.ms[1] <= LATENCY_GAIN * p.ms[0] + 1e-12 for p in plan.factorized())
    # k×1 and 1×k dear instead: the channel split everywhere
    plan = _plan(model, "flops", budget=0.7, latency=_latency({(3, 1): 1e-6, (1, 3): 1e-6}))
    assert {p.split for p in plan.factorized()} == {"channel"}
    # a second op costs more than any saving: nothing can be factorized, with the reason said
    slow = _latency(overhead=1.0)
    plan = _plan(model, "ratio", ratio=0.3, latency=slow)
    assert not plan.factorized()
    assert all("no time saved" in p.reason for p in plan.layers if p.split)
    with pytest.raises(UserError, match="out of reach"):
        _plan(model, "flops", budget=0.7, latency=slow)
    # the same ratio without latency awareness factorizes every block conv
    assert len(_plan(model, "ratio", ratio=0.3).factorized()) == 18


def test_latency_rule_meets_the_predicted_time_budget():
    model = _resnet(pretrained=True).model
    plan = _plan(model, "latency", budget=0.8, latency=_latency())
    assert plan.ms[1] <= 0.8 * plan.ms[0] and plan.ms[1] > 0.7 * plan.ms[0]  # met and spent
    assert plan.to_dict()["predicted_conv_ms"][1] == round(plan.ms[1], 4)
    with pytest.raises(UserError, match="latency table"):
        _plan(model, "latency", budget=0.8)
    with pytest.raises(UserError, match="convolutions only"):
        _plan(model, "latency", budget=0.8, latency=_latency(), skip_first_last=False)


def test_cli_latency_aware_measures_caches_and_plans(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import RESNET20

    env = {**os.environ, "COMPRESS_CACHE": str(tmp_path / "cache"), "COMPRESS_NO_PROGRESS": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "compress")
    base = [exe, "lowrank", str(RESNET20), "--arch", "resnet20", "-m", "svd"]
    r = subprocess.run(base + ["--ratio", "0.25", "--latency-aware", "--exclude", "layer1.*,layer2.*", "-o",
                               str(tmp_path / "m.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tables = list((tmp_path / "cache").glob("latency-table-*.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["entries"]) >= 2 * (1 + 2)
    back = load_model(tmp_path / "m.pt")
    plan = back.history[-1]["plan"]
    # (which convs get factorized depends on this machine's timings; the rule does not)
    assert plan["predicted_conv_ms"][1] <= plan["predicted_conv_ms"][0]
    rows = [p for p in plan["layers"] if p["ms"]]
    assert {p["name"].split(".")[0] for p in rows} == {"layer3"} and len(rows) == 6
    assert all(p["ms"][1] <= 0.9 * p["ms"][0] + 1e-6 if p["rank"] else p["reason"] for p in rows)
    for bad in (["--latency-threads", "0"], ["--rank-rule", "latency", "--no-skip-first-last"]):
        r = subprocess.run(base + bad + ["--dry-run", "-o", str(tmp_path / "x.pt")], env=env, capture_output=True,
                           text=True, timeout=300)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
