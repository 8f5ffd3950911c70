"""Fake-quant modules, BN folding, min-max PTQ on the real ResNet-20, save/reload, and the QDQ ONNX in ORT."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.assets import data_path
from compress.data import Dataset, Normalizer, load_dataset
from compress.errors import UserError
from compress.io import load_model, save_model, zoo_model
from compress.metrics import top1
from compress.quantize import METHODS
from compress.quantize.calibrate import calibrate
from compress.quantize.fakequant import ActQuantizer, QuantConv2d, WeightQuantizer, weight_bits
from compress.quantize.insert import QuantScheme, SelectConv, fold_batchnorm, parse_bits, prepare, trace
from compress.stages import Context, build_config
from compress.zoo.resnet_cifar import ShortcutA
from exporters.qdq import fold_weight_quantizers, integer_kernel_report


def _levels(t: torch.Tensor, scale: float) -> set[int]:
    return set(torch.round(t / scale).long().flatten().tolist())


# --- the quantizer modules ---------------------------------------------------------------------------------
def test_weight_quantizer_per_channel_symmetric_grid():
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8).view(-1, 1, 1, 1)
    wq = WeightQuantizer(8, per_channel=True, symmetric=True, channels=8)
    wq.init_minmax(w)
    absmax = w.abs().flatten(1).max(1).values
    assert torch.allclose(wq.scale, absmax / 127)
    assert int(wq.zero_point.abs().max()) == 0
    out = wq(w)
    for c in range(8):
        q = out[c] / wq.scale[c]
        assert torch.allclose(q, q.round(), atol=1e-4)           # on the channel's own grid
        assert q.abs().max() <= 127 + 1e-4
    assert (out - w).abs().max() <= wq.scale.max() / 2 + 1e-6   # round to nearest


def test_four_bit_grids():
    x = torch.linspace(-1.0, 3.0, 1000)
    asym = WeightQuantizer(4, per_channel=False, symmetric=False)
    asym.init_minmax(x)
    q = asym(x)
    assert len(torch.unique(q)) == 16                            # 2^4 levels, all used on a ramp
    assert 0.0 in torch.unique(q).tolist()                       # zero exactly representable
    sym = WeightQuantizer(4, per_channel=False, symmetric=True)
    ramp = torch.linspace(-3.0, 3.0, 1000)
    sym.init_minmax(ramp)
    assert _levels(sym(ramp), float(sym.scale)) == set(range(-7, 8))  # narrow symmetric: [-7, 7]
    act = ActQuantizer(2)
    act.set_range(torch.tensor(0.0), torch.tensor(3.0), symmetric=False)
    assert sorted(torch.unique(act(x)).tolist()) == [0.0, 1.0, 2.0, 3.0]


def test_act_quantizer_symmetric_and_observer():
    act = ActQuantizer(8, symmetric=True)
    act.set_range(torch.tensor(-2.0), torch.tensor(1.0), symmetric=True)
    assert int(act.zero_point) == 128 and torch.isclose(act.scale, torch.tensor(2.0 / 127))
    act.set_range(torch.tensor(0.0), torch.tensor(1.0), symmetric=True)
    assert int(act.zero_point) == 0                               # non-negative data uses the whole grid

    class Count:
        n = 0

        def update(self, x):
            self.n += x.numel()

    act.observer = Count()
    x = torch.randn(5, 3)
    assert torch.equal(act(x), x) and act.observer.n == 15         # observing passes float through


def test_quantizer_gradient_and_learnable_scale():
    wq = WeightQuantizer(8, per_channel=True, symmetric=True, channels=4)
    w = torch.randn(4, 3, requires_grad=True)
    wq.init_minmax(w * 1.01)  # every value strictly inside the grid's range
    wq(w).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))              # straight-through inside the range
    keys = set(wq.state_dict())
    wq.make_learnable("scale")
    assert isinstance(wq.scale, nn.Parameter) and set(wq.state_dict()) == keys


def test_parse_bits_and_config_errors():
    assert parse_bits("w4a8") == (4, 8) and parse_bits("W2A4") == (2, 4)
    with pytest.raises(UserError):
        parse_bits("int8")
    method = METHODS.get("minmax")
    with pytest.raises(UserError):
        build_config(method, {"bits": "w9a8"})
    with pytest.raises(UserError):
        build_config(method, {"observer": "mse"})


# --- preparing a model ----------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.short = ShortcutA(8, 16)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)) + a)
        c = F.relu(self.conv3(b) + self.short(b))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


def _randomized(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.3
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
    return net.eval()


def test_batchnorm_folding_is_exact():
    net = _randomized(_Net())
    x = torch.randn(4, 3, 16, 16)
    gm = trace(net)
    ref = gm(x)
    assert fold_batchnorm(gm) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert torch.allclose(gm(x), ref, atol=1e-5)


def test_prepare_places_shared_quantizers():
    net = _randomized(_Net())
    x = torch.randn(4, 3, 16, 16)
    ref = net(x)
    gm = prepare(net, QuantScheme(w_bits=4, a_bits=4))
    code = gm.code
    # one quantizer per producer: the relu feeding conv2 and the residual add is quantized once
    assert code.count("self.act_quant.relu(") == 1
    assert isinstance(gm.short, SelectConv) and isinstance(gm.conv1, QuantConv2d)
    # the shortcut conv reuses its input's grid (no new quantizer for its output)
    assert "act_quant.short" not in code
    assert gm.conv1.weight_quantizer.bits == 8 and gm.fc.weight_quantizer.bits == 8  # first/last stay 8-bit
    assert gm.conv2.weight_quantizer.bits == 4 and weight_bits(gm) == [4, 8]
    for q in gm.act_quant.values():
        q.enabled = False
    for m in gm.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = False
    assert torch.allclose(gm(x), ref, atol=1e-5)          # quantizers off = the float model (shortcut exact)


# --- the real model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet20_w8a8():
    lm = zoo_model("resnet20")
    ctx = Context(lm.spec, data={"calib": str(data_path("cifar10_calib1000_jpeg.npz"))})
    method = METHODS.get("minmax")
    qlm = method.apply(lm, build_config(method, {"calib_size": 256}), ctx)
    return lm, qlm, ctx


@pytest.fixture(scope="module")
def test846(resnet20_w8a8):
    """The lossless test images (normalized), their labels, and the quantized torch model's logits."""
    _, qlm, ctx = resnet20_w8a8
    ds = load_dataset(str(data_path("cifar10_test_lossless846.npz")))
    x = ctx.normalizer()(ds.images)
    with torch.no_grad():
        logits = torch.cat([qlm.model(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
    return x, ds.labels, logits


def test_minmax_w8a8_keeps_resnet20_accuracy(resnet20_w8a8, test846):
    lm, qlm, _ = resnet20_w8a8
    _, labels, logits = test846
    fp = 91.73  # the FP32 checkpoint on these very images (shared assets/README.md; the CLI tests check it)
    q = top1(logits, labels)
    assert q >= fp - 1.0, q
    assert qlm.kind == "compress" and qlm.edits[-1]["kind"] == "quantize"
    assert qlm.history[-1]["method"] == "minmax" and qlm.history[-1]["calibration"]["images"] == 256
    json.dumps({"edits": qlm.edits, "history": qlm.history})     # manifest-safe
    assert not any(isinstance(m, WeightQuantizer) for m in lm.model.modules())  # float model untouched


def test_weight_bytes_count_the_stored_grid(resnet20_w8a8):
    """The size a quantized model reports is its weights at their bit-width (what the export stores), not the
    float32 tensors fake-quant keeps in torch (which read 1.14 MB for an INT8 ResNet-20)."""
    from compress.metrics import state_dict_bytes, weight_bytes

    lm, qlm, _ = resnet20_w8a8
    float_bytes = weight_bytes(lm.model)
    assert abs(float_bytes - 4 * sum(p.numel() for p in lm.model.parameters())) < 0.05 * float_bytes  # + BN stats
    convs = [m for m in qlm.model.modules() if isinstance(m, QuantConv2d)]
    int8_weights = sum(m.weight.numel() for m in convs)
    assert 0.24 < weight_bytes(qlm.model) / float_bytes < 0.3           # int8 weights, float biases and scales
    assert state_dict_bytes(qlm.model) > 0.9 * float_bytes              # the torch file is still float
    for m in convs:
        m.weight_quantizer.bits = 4
    try:
        four = weight_bytes(qlm.model)
    finally:
        for m in convs:
            m.weight_quantizer.bits = 8
    assert weight_bytes(qlm.model) - four == int8_weights // 2  # two 4-bit weights per byte (even counts)


def test_save_reload_gives_identical_logits(resnet20_w8a8, tmp_path):
    _, qlm, _ = resnet20_w8a8
    path = save_model(qlm, tmp_path / "q.pt")
    torch.load(path, weights_only=True)                          # tensors and plain data only
    back = load_model(path)
    assert back.kind == "compress" and back.edits == qlm.edits
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model(x), qlm.model(x))


def _export(model: nn.Module, path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def test_qdq_onnx_runs_as_integer_kernels_in_ort(resnet20_w8a8, test846, tmp_path):
    import onnxruntime as ort

    _, qlm, _ = resnet20_w8a8
    _export(qlm.model, tmp_path / "raw.onnx")
    raw = onnx.load(str(tmp_path / "raw.onnx"))
    folded = fold_weight_quantizers(raw)
    onnx.checker.check_model(folded)
    onnx.save(folded, str(tmp_path / "q.onnx"))
    # the weights are int8 initializers now: no QuantizeLinear left on a constant
    inits = {i.name for i in folded.graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in folded.graph.node)

    report = integer_kernel_report(tmp_path / "q.onnx")
    assert report["all_convs_integer"] and report["integer_ops"]["QLinearConv"] == 21  # 19 convs + 2 shortcuts
    assert report["integer_ops"].get("QLinearAdd") == 9 and not report["float_compute_ops"], report["summary"]

    x, _, ref = test846
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99


def test_narrow_grids_export_exactly(tmp_path):
    """4-bit weights and activations lower to an 8-bit container with a clamp: ORT reproduces torch."""
    import onnxruntime as ort

    net = _randomized(_Net())
    net.fc.bias = None  # QGemm needs an int32 bias on the (coarse) 4-bit x 4-bit grid: not this test's subject
    net = prepare(net, QuantScheme(w_bits=4, a_bits=4, first_last_bits=0))
    calibrate(net, Dataset(np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32), None,
                           "random", prenormalized=True), Normalizer((0, 0, 0), (1, 1, 1)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(tmp_path / "n.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    model = fold_weight_quantizers(onnx.load(str(tmp_path / "n.onnx")))
    onnx.save(model, str(tmp_path / "n.onnx"))
    x = torch.randn(8, 3, 16, 16)
    so = __import__("onnxruntime").SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # reference float QDQ semantics
    got = ort.InferenceSession(str(tmp_path / "n.onnx"), so).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


class _Relu6Net(nn.Module):
    """Conv -> BN -> ReLU6 -> Conv -> global mean (ReduceMean in ONNX) -> Linear: MobileNetV2's pattern."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.conv2(self.act(self.bn1(self.conv1(x))))
        return self.fc(F.relu(h).mean((2, 3)))


def _calibrated(scheme: QuantScheme) -> nn.Module:
    net = prepare(_randomized(_Relu6Net()), scheme)
    calibrate(net, Dataset(np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32), None,
                           "random", prenormalized=True), Normalizer((0, 0, 0), (1, 1, 1)))
    return net


def test_grid_past_a_relu6_is_capped_and_the_conv_stays_integer(tmp_path):
    """A learned step that puts 255 x step past ReLU6's 6 (Genie drifted to 6.02-6.04 on MobileNetV2) kept ORT from
    folding Conv + Clip into an integer conv; cap_at_ceilings ends the grid at 6."""
    from compress.quantize.insert import ACT_CONTAINER, act_ceilings, cap_at_ceilings

    net = _calibrated(QuantScheme())
    (key, top), = act_ceilings(net).items()
    q = net.get_submodule(ACT_CONTAINER)[key]
    assert top == 6.0 and int(q.zero_point) == 0
    q.scale.data.fill_(6.03 / 255)
    _export(net, tmp_path / "past.onnx")
    onnx.save(fold_weight_quantizers(onnx.load(str(tmp_path / "past.onnx"))), str(tmp_path / "past.onnx"))
    assert not integer_kernel_report(tmp_path / "past.onnx")["all_convs_integer"]  # the failure this guards
    assert cap_at_ceilings(net) == 1 and float(q.scale) * 255 == pytest.approx(6.0) and float(q.scale) * 255 <= 6.0
    assert cap_at_ceilings(net) == 0  # already at the clip
    _export(net, tmp_path / "capped.onnx")
    onnx.save(fold_weight_quantizers(onnx.load(str(tmp_path / "capped.onnx"))), str(tmp_path / "capped.onnx"))
    assert integer_kernel_report(tmp_path / "capped.onnx")["all_convs_integer"]


def test_int4_export_of_a_graph_with_reduce_mean(tmp_path):
    """Storing 4-bit grids as int4 raises the graph to opset 21, where ReduceMean takes its axes as an input: the
    export used to crash in ONNX's checker (MobileNetV2 W4A8)."""
    from compress.io import InputSpec
    from exporters.onnx import export_onnx

    net = _calibrated(QuantScheme(w_bits=4, a_bits=8))
    art = export_onnx(net, InputSpec((3, 32, 32), (0, 0, 0), (1, 1, 1)), tmp_path / "m.onnx")
    assert art.precision == "int4" and any("stored as ONNX int4" in n for n in art.notes), art.notes
    model = onnx.load(str(tmp_path / "m.onnx"))
    means = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert means and all(len(n.input) == 2 and not any(a.name == "axes" for a in n.attribute) for n in means)
    assert art.parity["top1_agreement"] >= 0.9
