"""4/2-bit grids in ONNX int4/uint4 (opset 21): exporters.qdq.pack_int4 keeps every value, and
`compress export --format onnx` stores a 4-bit model that way when ONNX Runtime runs it, keeps int8 containers
(and says why) when it does not, and reports what executes as integer kernels vs simulated float."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from compress.data import Normalizer, load_dataset
from compress.errors import UserError
from compress.quantize.calibrate import calibrate
from compress.quantize.insert import QuantScheme, prepare
from exporters.onnx import export_onnx
from exporters.qdq import fold_weight_quantizers, ort_rejects, pack_int4
from tests.conftest import CALIB1000, RESNET20, TEST_LOSSLESS, run_cli


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def norm(resnet20):
    return Normalizer(resnet20.spec.mean, resnet20.spec.std)


@pytest.fixture(scope="module")
def images(norm):
    return norm(load_dataset(f"cifar10:{TEST_LOSSLESS}").images[:64])


def _minmax(resnet20, bits: tuple[int, int]):
    import copy

    gm = prepare(copy.deepcopy(resnet20.model), QuantScheme(w_bits=bits[0], a_bits=bits[1]))
    calibrate(gm, load_dataset(f"cifar10:{CALIB1000}").subset(64, 0),
              Normalizer(resnet20.spec.mean, resnet20.spec.std))
    return gm.eval()


@pytest.fixture(scope="module")
def w4a8(resnet20):
    return _minmax(resnet20, (4, 8))


@pytest.fixture(scope="module")
def w4a4(resnet20):
    return _minmax(resnet20, (4, 4))


def _int4_inits(path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.initializer if i.data_type in (TensorProto.INT4, TensorProto.UINT4)]


def _run(path, x: torch.Tensor) -> np.ndarray:
    """ORT with graph optimizations off: the reference QDQ semantics (ORT 1.32's basic-level rewrites of a
    uint4 graph change its values, and its default level rejects uint4 activations in front of a conv)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def test_pack_int4_keeps_every_value(w4a4, images, tmp_path):
    """Weights -> INT4 (packed, smaller), 4-bit activation clamps -> uint4 QuantizeLinear; same logits in ORT."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(w4a4, (images[:1],), str(tmp_path / "raw.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    int8 = fold_weight_quantizers(onnx.load(str(tmp_path / "raw.onnx")))
    onnx.save(int8, str(tmp_path / "int8.onnx"))
    packed, counts = pack_int4(int8)
    onnx.checker.check_model(packed)
    onnx.save(packed, str(tmp_path / "int4.onnx"))
    # 18 of the 19 convs hold 4-bit weights (the stem conv and the linear stay W8; the shortcuts are 0/1 grids at
    # 8 bits but their codes fit int4 too), and every 4-bit activation grid loses its clamp
    assert counts["int4_weight_tensors"] >= 18 and counts["uint4_activation_grids"] >= 9, counts
    assert next(o.version for o in packed.opset_import if o.domain in ("", "ai.onnx")) >= 21
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("Max") < [n.op_type for n in int8.graph.node].count("Max")
    assert (tmp_path / "int4.onnx").stat().st_size < 0.7 * (tmp_path / "int8.onnx").stat().st_size
    a, b = _run(tmp_path / "int8.onnx", images), _run(tmp_path / "int4.onnx", images)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))
    with torch.no_grad():
        ref = w4a4(images).numpy()
    assert (ref.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_pack_int4_leaves_8bit_graphs_alone(resnet20, tmp_path):
    gm = _minmax(resnet20, (8, 8))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, (torch.randn(1, 3, 32, 32),), str(tmp_path / "raw.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    int8 = fold_weight_quantizers(onnx.load(str(tmp_path / "raw.onnx")))
    packed, counts = pack_int4(int8)
    # only the exact 0/1 shortcut selections fit int4 in a W8A8 graph; no activation grid is 4-bit
    assert counts["uint4_activation_grids"] == 0
    assert next(o.version for o in packed.opset_import if o.domain in ("", "ai.onnx")) == (21 if counts["int4_weight_tensors"] else 17)


def test_export_w4a8_stores_int4_and_reports_execution(resnet20, w4a8, images, tmp_path):
    art = export_onnx(w4a8, resnet20.spec, tmp_path / "q.onnx", parity_images=images)
    assert art.precision == "int4" and _int4_inits(tmp_path / "q.onnx"), art.notes
    assert any("int4/uint4 (opset 21)" in n for n in art.notes)
    assert any(n.startswith("ONNX Runtime CPU") for n in art.notes), art.notes
    assert art.parity["top1_agreement"] >= 0.95
    # --precision int8: the same values in int8 containers, larger, and every conv an integer kernel in ORT
    art8 = export_onnx(w4a8, resnet20.spec, tmp_path / "q8.onnx", "int8", parity_images=images)
    assert not _int4_inits(tmp_path / "q8.onnx")
    assert art.size_bytes < 0.75 * art8.size_bytes
    assert any("executes integer kernels" in n for n in art8.notes), art8.notes
    a, b = _run(tmp_path / "q.onnx", images), _run(tmp_path / "q8.onnx", images)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_export_w4a4_int4_only_where_ort_runs_it(resnet20, w4a4, images, tmp_path):
    """ORT (1.2x) rejects uint4 activations in front of a conv at its default optimizations: auto falls back to int8
    containers with a note, int4=True is a clear error. If a later ORT runs it, auto must store int4."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(w4a4, (images[:1],), str(tmp_path / "raw.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    packed, _ = pack_int4(fold_weight_quantizers(onnx.load(str(tmp_path / "raw.onnx"))))
    onnx.save(packed, str(tmp_path / "probe.onnx"))
    rejected = ort_rejects(tmp_path / "probe.onnx") is not None
    art = export_onnx(w4a4, resnet20.spec, tmp_path / "q.onnx", parity_images=images)
    assert art.parity["top1_agreement"] >= 0.9
    if rejected:
        assert not _int4_inits(tmp_path / "q.onnx")
        assert any("ONNX Runtime rejects" in n for n in art.notes), art.notes
        assert any("simulated quantization" in n for n in art.notes), art.notes
        with pytest.raises(UserError, match="int8 containers"):
            export_onnx(w4a4, resnet20.spec, tmp_path / "strict.onnx", parity_images=images, int4=True)
        assert not (tmp_path / "strict.onnx").exists()
    else:
        assert _int4_inits(tmp_path / "q.onnx")


def test_cli_export_int4_and_bad_precision(tmp_path):
    q = tmp_path / "w4a8.pt"
    r = run_cli("-q", "quantize", RESNET20, "--arch", "resnet20", "--method", "minmax", "--bits", "w4a8",
                "--calib", f"cifar10:{CALIB1000}", "--calib-size", "32", "-o", q)
    assert r.returncode == 0, r.stderr
    r = run_cli("-q", "export", q, "--format", "onnx", "-o", tmp_path / "w4a8.onnx", "--json")
    assert r.returncode == 0, r.stderr
    (art,) = json.loads(r.stdout)["artifacts"]
    assert art["precision"] == "int4" and _int4_inits(tmp_path / "w4a8.onnx")
    assert any("int4/uint4" in n for n in art["notes"]) and any("ONNX Runtime CPU" in n for n in art["notes"])
    # a float model cannot be exported at int4; an 8-bit model cannot be stored as int4: one line, exit 2
    for model, extra in ((RESNET20, ["--arch", "resnet20"]), (tmp_path / "w4a8.pt", [])):
        r = run_cli("-q", "export", model, *extra, "--format", "onnx", "--precision", "int2", "-o", tmp_path / "x.onnx")
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
