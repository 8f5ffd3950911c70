"""Faithfulness checks of the research note (Beta-Rank 1.7, polarization 2.3, FTWT 3.9) and a CLI round trip."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress.io import LoadedModel, load_model, save_model
from compress.metrics import count_flops
from compress.prune import METHODS
from compress.prune.beta_rank import beta_score
from compress.prune.engine import channel_groups, keep_sets, prune_to_keep
from compress.prune.ftwt import DynamicFlops, attach, dynamic_flops, mask_loss, mass_target, set_mode, wrapped
from compress.prune.hrank import feature_map_rank
from compress.prune.polarization import GateSet, gated_and_extracted
from compress.stages import Context, build_config
from tests.conftest import CALIB1000, RESNET20, run_cli


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, c_in = [], 3
    for c in (8, 12, "M", 16):
        if c == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=True), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    with torch.no_grad():  # non-trivial BN statistics, so a BN that is not copied shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _conv_and_batch(c_in: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, 6, 3, padding=1, bias=False)
    x = torch.randn(16, c_in, 8, 8)
    return conv, x


# ---- Beta-Rank (note 1.7) ------------------------------------------------------------------------------------

def test_beta_scale_test():
    conv, x = _conv_and_batch()
    raw = {m: beta_score(conv, x, conv(x), m) for m in ("corrected", "readme", "faithful")}
    with torch.no_grad():
        conv.weight[2] *= 2
    scaled = {m: beta_score(conv, x, conv(x), m) for m in raw}
    others = [i for i in range(6) if i != 2]
    for mode in ("corrected", "faithful"):  # code direction sigma_out / sigma_in: alpha^2
        assert scaled[mode][2] / raw[mode][2] == pytest.approx(4.0, rel=1e-5)
        assert torch.allclose(scaled[mode][others], raw[mode][others], rtol=1e-6)
    assert scaled["readme"][2] / raw["readme"][2] == pytest.approx(1.0, rel=1e-5)  # README direction: invariant


def test_beta_input_scale_invariance():
    conv, x = _conv_and_batch()
    for mode in ("corrected", "readme", "faithful"):
        a = beta_score(conv, x, conv(x), mode)
        b = beta_score(conv, 3 * x, conv(3 * x), mode)
        assert torch.allclose(a, b, rtol=1e-5), mode


def test_beta_axis_test():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(8, 3, 32, 32)
    y = conv(x).detach()
    y2 = y.clone()
    y2[:, :, 3:, :] *= 5  # rows >= 3 give empty slabs in the code's NHWC slicing of an NCHW tensor
    assert torch.allclose(beta_score(conv, x, y, "faithful"), beta_score(conv, x, y2, "faithful"))
    assert not torch.allclose(beta_score(conv, x, y, "corrected"), beta_score(conv, x, y2, "corrected"))


def _beta_keep(model, mode):
    ctx = Context(spec=_spec(), data={"calib": "random:64"})
    method = METHODS.get("beta-rank")
    cfg = build_config(method, {"ratio": 0.4, "beta_mode": mode, "rank_batch_size": 32})
    info: dict = {}
    scores = method.score(model, cfg, ctx, info)
    x = torch.zeros(1, 3, 16, 16)
    return scores, keep_sets(model, x, scores, 0.4), cfg, ctx


def _spec():
    from compress.io import InputSpec

    return InputSpec((3, 16, 16))


@pytest.mark.parametrize("mode", ["corrected", "faithful"])
def test_beta_masking_equivalence(mode):
    """Recommended mode: thin VGG == full VGG with removed channels zeroed after BN+ReLU; faithful mode (BN
    re-initialised) fails this by design."""
    full = _small_vgg()
    scores, keep, cfg, ctx = _beta_keep(full, mode)
    assert keep, "something must be removed"
    thin = prune_to_keep(copy.deepcopy(full), torch.zeros(1, 3, 16, 16), keep)
    METHODS.get("beta-rank").after_prune(thin, keep, scores, cfg, ctx, {})
    mods = dict(full.named_modules())
    hooks = []
    for name, kept in keep.items():
        idx = list(full).index(mods[name])
        relu = full[idx + 2]
        drop = sorted(set(range(mods[name].out_channels)) - set(kept))
        hooks.append(relu.register_forward_hook(lambda m, i, o, d=drop: o.index_fill(1, torch.tensor(d), 0.0)))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, out = full(x), thin(x)
    for h in hooks:
        h.remove()
    same = torch.allclose(ref, out, atol=1e-5)
    assert same if mode == "corrected" else not same


def test_hrank_feature_map_rank():
    maps = torch.zeros(2, 3, 6, 6)
    maps[:, 1] = torch.outer(torch.arange(6.0), torch.ones(6))  # rank 1
    maps[:, 2] = torch.eye(6)                                     # rank 6
    assert feature_map_rank(maps).tolist() == [0.0, 1.0, 6.0]


# ---- polarization (note 2.3) ---------------------------------------------------------------------------------

def test_polarization_extracted_equals_gated_where_gates_agree(resnet20):
    model = copy.deepcopy(resnet20.model).eval()
    x = torch.zeros(1, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    biases = {g.name: torch.where(torch.rand(g.channels, generator=gen) < 0.35, -6.0, 6.0)
              for g in channel_groups(model, x)}
    gated, gates, static = gated_and_extracted(model, x, biases)
    with torch.no_grad():  # input-dependent gates, but small enough that every input agrees with the consensus
        for g in gates.groups:
            gates.weight[gates._key(g)].normal_(0, 0.01, generator=gen)
    xs = torch.randn(6, 3, 32, 32, generator=gen)
    with torch.no_grad():
        a = gated(xs)
        for g, (p, h) in gates.cur.items():
            assert torch.equal(h, (biases[g] > 0).float().expand_as(h))  # all gates agree with the consensus
        b = static(xs)
    assert torch.allclose(a, b, atol=1e-4)
    assert sum(p.numel() for p in static.parameters()) < sum(p.numel() for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in static.modules())  # no gates left


def test_polarization_ste_and_one_pass_extraction(tmp_path):
    model = _small_vgg()
    gates = GateSet(model, torch.zeros(1, 3, 16, 16)).attach(model)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.bias.values())  # straight-through
    gates.detach_hooks()
    lm = LoadedModel(_small_vgg(), _spec(), "compress", "t", "x:y")
    ctx = Context(spec=_spec(), data={"train": "random:96"})
    method = METHODS.get("polarization")
    cfg = build_config(method, {"flops_target": 0.6, "max_steps": 3, "batch_size": 32, "calib_images": 64,
                                "gate_lr": 0.5})
    out = method.apply(lm, cfg, ctx)
    h = out.history[-1]
    assert h["flops_after"] <= 0.6 * h["flops_before"] + 1
    assert "consensus_agreement" in h and "open_frequency_histogram" in h
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in out.model.modules())


# ---- FTWT (note 3.9) -----------------------------------------------------------------------------------------

def test_ftwt_mass_target_poster_vector():
    a = torch.tensor([[5.5, 7.9, 0.3, 8.6, 2.2, 3.1, 0.9]])
    m = mass_target(a, 0.95)[0]
    assert m.sum() == 4 and set(torch.nonzero(m).flatten().tolist()) == {3, 1, 0, 5}
    assert mass_target(a, 1.0).sum() == 7
    assert mass_target(torch.tensor([[1.0, 0.0, 2.0]]), 1.0).tolist() == [[1.0, 0.0, 1.0]]


@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_ftwt_decoupled_mask_loss_reaches_only_predictors(mode):
    model = _small_vgg()
    attach(model, head_init="random")
    set_mode(model, record=True, decoupled=mode == "decoupled")
    model.train()
    model(torch.randn(4, 3, 16, 16))
    mask_loss(model).backward()
    backbone = [p.grad for n, p in model.named_parameters() if "predictor" not in n]
    touched = sum(0.0 if g is None else float(g.abs().sum()) for g in backbone)
    assert (touched == 0.0) if mode == "decoupled" else (touched > 0.0)
    assert all(p.grad is not None for n, p in model.named_parameters() if "predictor" in n)


def test_ftwt_all_on_reproduces_baseline_and_dense_flops(resnet20):
    base = copy.deepcopy(resnet20.model).eval()
    model = copy.deepcopy(base)
    layers = attach(model, head_init="random")
    with torch.no_grad():
        for w in wrapped(model).values():
            w.predictor.fc.bias.fill_(float("inf"))  # every mask 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))
    _, flops, pred = dynamic_flops(model, x, layers, DynamicFlops(model, layers, x))
    assert torch.all(flops == count_flops(base, (3, 32, 32)))
    assert torch.all(pred > 0)


def test_ftwt_r1_targets_change_plain_vgg_negligibly():
    base = _small_vgg()
    model = copy.deepcopy(base)
    attach(model)
    set_mode(model, mode="gt", r=1.0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), base(x), atol=1e-4)


def test_ftwt_static_default_and_masked_dense_reload(tmp_path):
    method = METHODS.get("ftwt")
    ctx = Context(spec=_spec(), data={"train": "random:64"})
    outs = {}
    for dense in (False, True):
        lm = LoadedModel(_small_vgg(), _spec(), "compress", "t", "tests.compress.test_prune_methods:_tiny_arch")
        cfg = build_config(method, {"flops_target": 0.6, "max_steps": 2, "batch_size": 32, "calib_images": 64,
                                    "masked_dense": dense})
        out = method.apply(lm, cfg, ctx)
        path = save_model(out, tmp_path / f"ftwt{int(dense)}.pt")
        back = load_model(path, arch="tests.compress.test_prune_methods:_tiny_arch")  # a custom arch is named
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(back.model(x), out.model.eval()(x), atol=1e-5)
        outs[dense] = out
    assert outs[False].history[-1]["flops_after"] <= 0.6 * outs[False].history[-1]["flops_before"] + 1
    assert "firing_histogram" in outs[False].history[-1]
    assert any(e["kind"] == "ftwt" for e in outs[True].edits)
    # `compress export` says which form it exports and repeats the firing histogram (issue 3's deployment contract)
    for dense, form in ((False, "static model"), (True, "masked-dense graph")):
        r = run_cli("export", tmp_path / f"ftwt{int(dense)}.pt", "--arch", "tests.compress.test_prune_methods:_tiny_arch",
                    "-o", tmp_path / f"art{int(dense)}", "--json", cwd=Path(__file__).resolve().parents[2])
        assert r.returncode == 0, r.stderr
        art = json.loads(r.stdout)["artifacts"][0]
        assert art["path"].endswith(f"art{int(dense)}.onnx")  # the suffix profile and eval tell the format by
        notes = " ".join(art["notes"])
        assert form in notes and "no speed-up" in notes
        hist = outs[dense].history[-1]["firing_histogram"]
        assert f"{hist['never_open(<=1%)']} never on" in notes and f"of {hist['total']}" in notes


def _tiny_arch(num_classes: int = 10) -> nn.Module:
    return _small_vgg()


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_cli_beta_rank_prune_and_info(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out.pt"
    r = run_cli("prune", RESNET20, "--arch", "resnet20", "--method", "beta-rank", "--flops-target", "0.5",
                "--data", f"cifar10:{CALIB1000}", "--rank-batch-size", "64", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    lm = load_model(out)
    assert lm.history[-1]["method"] == "beta-rank"
    assert lm.history[-1]["flops_after"] <= 0.5 * lm.history[-1]["flops_before"]
