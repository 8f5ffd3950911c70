"""Exported graphs take each module's `export_form()`: the option-A shortcut as a 0/1 1x1 conv, exactly equal,
so ONNX Runtime keeps the residual stream in its blocked layout (real ResNet-20, real CIFAR-10 images)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import torch

from compress.data import Normalizer, load_dataset
from compress.exportable import exportable
from compress.prune.engine import prune_to_keep
from compress.zoo.resnet_cifar import ShortcutA
from exporters.onnx import export_onnx
from tests.conftest import TEST_LOSSLESS


def test_shortcut_export_form_is_exact_for_any_index():
    sc = ShortcutA(8, 16)
    pruned = ShortcutA(8, 16)
    pruned.index = torch.tensor([5, 8, 0, 8, 3, 3, 7, 1, 8, 2])  # a pruned, reordered gather with zero rows
    pruned.n_in = torch.tensor(8)
    x = torch.randn(3, 8, 9, 9) * 1e3
    for module in (sc, pruned):
        conv = module.export_form()
        assert conv.stride == (2, 2) and not conv.weight.requires_grad
        assert torch.equal(conv(x), module(x))  # bit-exact: each output is 1 * one input, or 0


def test_exportable_swaps_copies_and_leaves_the_model_alone(resnet20):
    model = resnet20.model
    out = exportable(model)
    assert out is not model
    assert not any(isinstance(m, ShortcutA) for m in out.modules())
    assert sum(isinstance(m, ShortcutA) for m in model.modules()) == 2
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    assert exportable(plain) is plain


def _optimized_ops(path, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_resnet20_exports_without_gathers_and_ort_fuses_every_residual_add(resnet20, tmp_path):
    art = export_onnx(resnet20.model, resnet20.spec, tmp_path / "r20.onnx", "fp32")
    assert art.parity["top1_agreement"] == 1.0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r20.onnx")).graph.node]
    assert ops.count("Conv") == 21 and not {"Gather", "Slice", "Concat"} & set(ops)
    # what the export form is for: every residual add and ReLU fused into an NCHWc conv, no layout
    # reorder inside the network (one at the end, before the classifier)
    opt = _optimized_ops(tmp_path / "r20.onnx", tmp_path)
    assert "Add" not in opt and "Relu" not in opt, opt
    assert opt.count("ReorderOutput") == 1, opt


def test_pruned_resnet20_export_matches_torch_on_real_images(resnet20, tmp_path):
    model = copy.deepcopy(resnet20.model).eval()
    example = resnet20.spec.example(1, 0)
    # residual streams of stages 1 and 2 thinned and reordered: both shortcuts' gather indices are remapped
    prune_to_keep(model, example, {"conv1": [0, 2, 4, 6, 8, 10, 12, 14, 15],
                                   "layer2.0.conv2": list(range(0, 32, 4)) + list(range(17, 32))})
    assert [m.in_channels for m in model.modules() if isinstance(m, ShortcutA)] == [9, 20]
    images = load_dataset(f"cifar10:{TEST_LOSSLESS}").images[:64]
    x = Normalizer(resnet20.spec.mean, resnet20.spec.std)(images)
    art = export_onnx(model, resnet20.spec, tmp_path / "p.onnx", "fp32", x)
    assert art.parity["top1_agreement"] == 1.0
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ref, atol=1e-4)
