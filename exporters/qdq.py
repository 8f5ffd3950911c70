"""QDQ ONNX post-pass, and an honest report of what ONNX Runtime executes as integer kernels.

torch exports a fake-quantized weight as QuantizeLinear(float weight) -> DequantizeLinear. ORT's QDQ
fusions (DQ -> Conv -> Q into QLinearConv, DQ + DQ -> Add -> Q into QLinearAdd, ...) want the weight as
an int8 initializer feeding the DequantizeLinear, so `fold_weight_quantizers` computes the integers once,
offline, and fixes the other details those fusions check (see its docstring). `integer_kernel_report`
then asks ORT itself: it builds a session, saves the graph ORT optimized, and counts what is left.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.errors import first_line

# ops a weight's exported quantizer chain may hold (the clamp of a narrow grid, exporter Identity copies)
_FOLDABLE = {"Identity", "Max", "Min", "Clip", "Mul", "Div", "Add", "Sub", "Neg", "Cast", "Reshape", "Transpose",
             "Unsqueeze", "Squeeze", "Round", "Floor", "Ceil"}

INTEGER_OPS = {"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
               "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
               "QLinearReduceMean", "QAttention", "MatMulNBits"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "NchwcConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                     "Add", "Sub", "Mul", "Div", "Sum", "GlobalAveragePool", "AveragePool", "NchwcGlobalAveragePool",
                     "NchwcAveragePool", "ReduceMean", "Softmax", "Sigmoid", "Relu", "Clip"}
CONV_INTEGER = {"QLinearConv", "ConvInteger"}
CONV_FLOAT = {"Conv", "FusedConv", "NchwcConv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


class _Consts:
    """Constant values of a graph by tensor name: initializers, Constant nodes, and small foldable chains."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.output and (v := _constant_value(n)) is not None:
                self.values[n.output[0]] = v
        self.producer = {o: n for n in graph.node for o in n.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.graph = graph

    def get(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is None or node.op_type not in _FOLDABLE:
            return None
        inputs = {i: self.get(i) for i in node.input if i}
        if any(v is None for v in inputs.values()):
            return None
        from onnx.reference import ReferenceEvaluator

        g = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for i, v in inputs.items()],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output])
        outs = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])).run(None, inputs)
        for o, v in zip(node.output, outs):
            self.values[o] = np.asarray(v)
        return self.values[name]

    def add(self, name: str, value: np.ndarray) -> str:
        """A new initializer under a fresh name derived from `name`; returns that name."""
        out, i = name, 1
        while out in self.values or out in self.producer:
            out, i = f"{name}_{i}", i + 1
        self.values[out] = value
        self.graph.initializer.append(numpy_helper.from_array(value, out))
        return out

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}


# --- the post-pass ---------------------------------------------------------------------------------------------
def fold_weight_quantizers(model: onnx.ModelProto, channel_multiple: int = 4) -> onnx.ModelProto:
    """QuantizeLinear(constant float) -> its integer initializer; dead nodes and initializers removed.

    Integers are computed as torch's fake-quant does (round-half-even of x * (1/scale) in float32), so the
    folded graph holds exactly the torch model's weights. Three more details decide whether ORT fuses:
    per-tensor scales/zero-points must be 0-d (torch exports shape [1]; QLinearAdd then stays float), a
    Gemm's float bias must be int32 on the s_a * s_b grid (else no QGemm), and the stem conv's 3 input
    channels are padded to `channel_multiple` (pad_conv_channels; 0 or 1 skips it).
    """
    model = _copy(model)
    consts = _Consts(model)
    renamed: dict[str, str] = {}
    for node in list(model.graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale = consts.get(node.input[0]), consts.get(node.input[1])
        has_zp = len(node.input) > 2 and bool(node.input[2])
        zp = consts.get(node.input[2]) if has_zp else None
        if x is None or scale is None or x.dtype.kind != "f" or (has_zp and zp is None):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        renamed[node.output[0]] = consts.add(f"{node.input[0]}_quantized", _quantize(x, scale, zp, axis))
        model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    consts.refresh()
    _scalar_qparams(consts)
    _quantize_gemm_bias(consts)
    _remove_dead(model.graph)
    return pad_conv_channels(model, channel_multiple) if channel_multiple > 1 else model


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    scale = scale.astype(np.float32)
    zp_i = np.zeros(scale.shape, np.int64) if zp is None else zp.astype(np.int64)
    if scale.ndim == 1 and scale.size > 1:  # per-axis
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zp_i = scale.reshape(shape), zp_i.reshape(shape)
    else:
        scale, zp_i = scale.reshape(()), zp_i.reshape(())
    q = np.rint(x.astype(np.float32) * (np.float32(1.0) / scale)).astype(np.int64) + zp_i  # as torch: x * (1/s)
    return np.clip(q, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


def _scalar_qparams(consts: _Consts) -> None:
    """One-element scales/zero-points of QuantizeLinear/DequantizeLinear as 0-d tensors."""
    scalar: dict[str, str] = {}
    for node in consts.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in (1, 2):
            name = node.input[i] if i < len(node.input) else ""
            value = consts.get(name)
            if value is None or value.size != 1 or value.ndim == 0:
                continue
            if name not in scalar:
                scalar[name] = consts.add(f"{name}_scalar", value.reshape(()))
            node.input[i] = scalar[name]


def _quantize_gemm_bias(consts: _Consts) -> None:
    """A float Gemm bias behind int8 A and B -> DequantizeLinear(int32, s_a * s_b), as QGemm requires.
    (ORT fuses QLinearConv with a float bias itself, but leaves such a Gemm in float.)"""
    graph = consts.graph
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or consts.get(node.input[2]) is None:
            continue
        a_dq, b_dq = consts.producer.get(node.input[0]), consts.producer.get(node.input[1])
        if not (a_dq and b_dq and a_dq.op_type == b_dq.op_type == "DequantizeLinear"):
            continue
        s_a, s_b, bias = consts.get(a_dq.input[1]), consts.get(b_dq.input[1]), consts.get(node.input[2])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        b_axis = next((a.i for a in b_dq.attribute if a.name == "axis"), 1)
        if s_a is None or s_b is None or s_a.size != 1 or bias.ndim != 1 or s_b.size not in (1, bias.size) \
                or (s_b.size > 1 and b_axis % 2 != (0 if trans_b else 1)):  # B's scales must be per output column
            continue
        scale = np.broadcast_to((s_a.reshape(()) * s_b.astype(np.float32)).reshape(-1), bias.shape).astype(np.float32)
        q = np.rint(bias.astype(np.float64) / scale)
        if not np.all(np.abs(q) < 2**31 - 1):  # a degenerate (near-zero) input scale: keep the float Gemm
            continue
        names = [consts.add(f"{node.input[2]}_{tag}", v)
                 for tag, v in (("int32", q.astype(np.int32)), ("scale", scale), ("zero_point", np.zeros(q.shape, np.int32)))]
        out = f"{node.input[2]}_dequantized"
        graph.node.insert(list(graph.node).index(node), helper.make_node("DequantizeLinear", names, [out], axis=0))
        node.input[2] = out
    consts.refresh()


def pad_conv_channels(model: onnx.ModelProto, multiple: int = 4) -> onnx.ModelProto:
    """Zero-pad the input channels of int8 convs to a multiple of `multiple` (the RGB stem: 3 -> 4).

    ONNX Runtime's fast symmetric int8 conv (indirect convolution, no im2col) needs input channels divisible
    by 4; without it the stem conv runs im2col + GEMM and costs more than in FP32. Exact: the new channel
    holds the zero-point (0.0 after dequantization) and meets an all-zero weight channel.
    """
    model = _copy(model)
    consts = _Consts(model)
    graph = model.graph
    for conv in list(graph.node):
        if conv.op_type != "Conv" or next((a.i for a in conv.attribute if a.name == "group"), 1) != 1:
            continue
        x_dq, w_dq = consts.producer.get(conv.input[0]), consts.producer.get(conv.input[1])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        w, x_scale = consts.get(w_dq.input[0]), consts.get(x_dq.input[1])
        x_zp = consts.get(x_dq.input[2]) if len(x_dq.input) > 2 else None  # its dtype is the pad value's
        if w is None or w.ndim != 4 or w.shape[1] % multiple == 0 or x_scale is None or x_scale.size != 1 or x_zp is None:
            continue
        extra = multiple - w.shape[1] % multiple
        w_name = consts.add(f"{w_dq.input[0]}_padded", np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], 1))
        pads = consts.add(f"{conv.output[0]}_channel_pads", np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64))
        value = consts.add(f"{conv.output[0]}_pad_value", x_zp.reshape(()))
        padded, x_new, w_new = (f"{conv.output[0]}_{tag}" for tag in ("padded_q", "padded_x", "padded_w"))
        at = list(graph.node).index(conv)
        for node in reversed([
                helper.make_node("Pad", [x_dq.input[0], pads, value], [padded]),
                helper.make_node("DequantizeLinear", [padded, *x_dq.input[1:]], [x_new]),
                helper.make_node("DequantizeLinear", [w_name, *w_dq.input[1:]], [w_new],
                                 **{a.name: helper.get_attribute_value(a) for a in w_dq.attribute})]):
            graph.node.insert(at, node)
        conv.input[0], conv.input[1] = x_new, w_new
    _remove_dead(graph)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
    return None


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (until none is left), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


# --- 4/2-bit grids in ONNX int4/uint4 (opset 21) ----------------------------------------------------------------
INT4_OPSET, INT4_IR_VERSION = 21, 10


def pack_int4(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The same QDQ graph with 4-bit-or-narrower grids stored as ONNX INT4/UINT4 (opset 21) instead of int8.

    Input: a graph after `fold_weight_quantizers` (int8 weight initializers read by DequantizeLinear, a
    narrow activation grid as Max -> Min -> QuantizeLinear(uint8)). Weights whose codes and zero-point fit
    [-8, 7] become INT4 initializers (packed two per byte); an activation clamp to exactly [0, 15] codes in
    front of a uint8 QuantizeLinear becomes QuantizeLinear(uint4), which saturates by itself, so the clamp
    goes. Values are unchanged (2-bit grids fit as well: ONNX's int2 needs opset 25). Returns the new model
    and counts; 8-bit tensors (first/last layers, 8-bit activations) stay int8.
    """
    from onnx import TensorProto

    model = _copy(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name: str) -> np.ndarray | None:
        while name not in inits and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def add_init(name: str, dtype: int, arr: np.ndarray) -> str:
        new = f"{name}_{'int4' if dtype == TensorProto.INT4 else 'uint4'}"
        if new not in inits:  # raw little-endian nibbles, the first element in the low half of each byte
            nibbles = (arr.astype(np.int64).reshape(-1) & 0x0F).astype(np.uint8)
            nibbles = np.concatenate([nibbles, np.zeros(len(nibbles) % 2, np.uint8)])
            packed = nibbles[0::2] | (nibbles[1::2] << 4)
            inits[new] = helper.make_tensor(new, dtype, list(arr.shape), packed.tobytes(), raw=True)
            if not np.array_equal(numpy_helper.to_array(inits[new]).astype(np.int64), arr.astype(np.int64)):
                raise AssertionError(f"int4 packing of {name} does not round-trip")  # a bug, not user input
            g.initializer.append(inits[new])
        return new

    weights = acts = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        w = inits.get(dq.input[0])
        if w is None or w.data_type != TensorProto.INT8:
            continue
        arr = numpy_helper.to_array(w)
        zp = const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int8)
        if zp is None or arr.min() < -8 or arr.max() > 7 or zp.min() < -8 or zp.max() > 7:
            continue
        dq.input[0] = add_init(dq.input[0], TensorProto.INT4, arr)
        if len(dq.input) > 2 and dq.input[2]:
            dq.input[2] = add_init(dq.input[2], TensorProto.INT4, zp)
        weights += 1
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        mn = producer.get(q.input[0])
        mx = producer.get(mn.input[0]) if mn is not None and mn.op_type == "Min" else None
        if mx is None or mx.op_type != "Max" or len(q.input) < 3:
            continue
        scale, zp, lo, hi = const(q.input[1]), const(q.input[2]), const(mx.input[1]), const(mn.input[1])
        if any(v is None for v in (scale, zp, lo, hi)) or zp.dtype != np.uint8 or scale.size != 1:
            continue
        s, z = float(scale.reshape(())), int(zp.reshape(()))
        if not (0 <= z <= 15 and np.isclose(float(lo.reshape(())), (0 - z) * s, rtol=1e-5, atol=1e-12)
                and np.isclose(float(hi.reshape(())), (15 - z) * s, rtol=1e-5, atol=1e-12)):
            continue
        if not all(c.op_type == "DequantizeLinear" for c in consumers.get(q.output[0], [])):
            continue
        new_zp = add_init(q.input[2], TensorProto.UINT4, zp)
        q.input[0], q.input[2] = mx.input[0], new_zp
        for dq in consumers[q.output[0]]:
            dq.input[2] = new_zp
        acts += 1
    _remove_dead(g)
    if weights or acts:
        _axes_as_inputs(g)
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, INT4_OPSET)
        model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return model, {"int4_weight_tensors": weights, "uint4_activation_grids": acts}


# reductions whose `axes` moved from an attribute to an input at opset 18 (ReduceSum did at 13)
_REDUCE_AXES_INPUT_AT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _axes_as_inputs(g: onnx.GraphProto) -> None:
    """Raising a graph from opset 17 to 21 (int4): the reductions' `axes` attribute becomes their second input
    (e.g. MobileNetV2's global average pool exports as ReduceMean(axes=[2, 3]))."""
    for n in g.node:
        if n.op_type not in _REDUCE_AXES_INPUT_AT_18:
            continue
        axes = next((a for a in n.attribute if a.name == "axes"), None)
        if axes is None:
            continue
        name = f"{n.name or n.output[0]}_axes"
        g.initializer.append(numpy_helper.from_array(np.asarray(list(axes.ints), np.int64), name))
        n.attribute.remove(axes)
        n.input.append(name)


def ort_rejects(onnx_path: str | Path, level: str = "all") -> str | None:
    """None if ONNX Runtime's CPU provider builds a session for the file at `level`, else its error (one line)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several types; the message is the finding
        return f"{type(e).__name__}: {first_line(e, 300)}"
    return None


# --- what ORT runs ------------------------------------------------------------------------------------------------
def integer_kernel_report(onnx_path: str | Path, level: str = "all", threads: int = 1) -> dict:
    """Which ops ONNX Runtime's CPU provider runs after its graph optimizations (default level: all).

    Returns the op counts of ORT's optimized graph, the integer kernels and the float compute ops among
    them, conv coverage, and a one-line summary such as
    "21/21 convs as integer kernels; 9 QLinearAdd; float compute left: none".
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3  # ORT warns that the saved graph is hardware-specific: expected here
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    ops = Counter(n.op_type for n in optimized.graph.node)
    integer = {op: n for op, n in sorted(ops.items()) if op in INTEGER_OPS}
    float_compute = {op: n for op, n in sorted(ops.items()) if op in FLOAT_COMPUTE_OPS}
    conv_int, conv_float = sum(ops[o] for o in CONV_INTEGER), sum(ops[o] for o in CONV_FLOAT)
    parts = [f"{conv_int}/{conv_int + conv_float} convs as integer kernels"] if conv_int + conv_float else []
    parts += [f"{n} {op}" for op, n in integer.items() if op not in CONV_INTEGER]
    parts.append(f"float compute left: {', '.join(f'{n} {op}' for op, n in float_compute.items()) or 'none'}")
    return {
        "optimization_level": level,
        "ops": dict(sorted(ops.items())),
        "integer_ops": integer,
        "float_compute_ops": float_compute,
        "qdq_ops": {op: ops[op] for op in sorted(QDQ_OPS) if ops[op]},
        "convs": {"integer": conv_int, "float": conv_float},
        "all_convs_integer": conv_int > 0 and conv_float == 0,
        "summary": "; ".join(parts),
    }
