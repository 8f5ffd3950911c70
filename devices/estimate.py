"""Predicted latency and memory when no device is reachable: a roofline over the ONNX graph.

    compress profile m.onnx --device estimate:rpi5                 # a catalog entry (devices/catalog.yaml)
    compress profile m.onnx --device estimate:host                 # this machine, calibrated if a fit was saved
    python -m devices.estimate calibrate resnet20.onnx vgg.onnx   # fit this machine's per-op-class efficiency
    python -m devices.estimate list                                # the catalog, with peaks and sources

Model. onnx shape inference gives every node's tensors; per node
    t = max(flops / peak, bytes / bandwidth) / efficiency[class] + overhead[class]
where bandwidth is the last-level cache's when the model's working set (weights + peak activations) fits in it
(it then stays there between inferences), else DRAM's;
summed over the nodes a runtime executes (activations and BatchNormalization right after a Conv/Gemm are fused,
Constants and DequantizeLinear of weights folded), plus a per-session overhead. peak = the fastest `threads` cores
(all cores when threads is unset); classes: conv, conv_dw (depthwise), gemm, elementwise, pool, memory (copies:
Slice, Concat, Pad, ...), meta (Shape, Reshape, ...). Convs / Gemms fed by DequantizeLinear weights use the int8
peak. Memory: weights + the peak of live activations over the topological order.

Calibration (this machine only: it must measure). For each model: ONNX Runtime's per-node profile (kernel time,
op type and tensor shapes of every executed node, the fused ones included; per node the median over the runs)
and the end-to-end latency from the local profiler, taken as the fastest of the timed runs: on a shared machine
a run longer than a scheduler time slice is preempted by other tenants in most samples (VGG-16 at 1 thread on a
2-core machine with load 10: fastest run 4.8 ms, median 13.5 ms), and the fastest run is what an idle machine
approaches (on an idle machine it is within a few % of the median). Per class, a least-squares line
kernel_us = roofline_us / efficiency + overhead over all executed nodes (a class with too little spread keeps
the catalog's efficiency and gets its overhead fitted); then the end-to-end residual (latency - predicted
kernel sum) as s0 + s1 x nodes, signed: ORT's profiler adds its own cost to every kernel it times, the
end-to-end latency (profiler off) does not. The fit is saved as JSON (default
~/.cache/compress/estimate-host.json, or $COMPRESS_CACHE) and used by estimate:host; classes the calibration models lack keep
the catalog defaults. benchmarks/estimate.py reports the error leave-one-model-out.

The profile has the compress.profile/1 shape with target "estimate:NAME": one "sample" (the prediction), notes
that say it is a prediction, `layers` with the per-node predicted times, and `prediction` with the details.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from compress.errors import UserError, first_line
from devices.base import Device, ProfileOptions

CATALOG = Path(__file__).with_name("catalog.yaml")
CLASSES = ("conv", "conv_dw", "gemm", "elementwise", "pool", "memory", "meta")
FIT_SCHEMA = "compress.estimate-fit/1"
# compress.fileio.cache_dir's folder, spelled out: a board runs devices/ with compress.errors and .registry only
DEFAULT_FIT = Path(os.environ.get("COMPRESS_CACHE") or Path("~/.cache/compress").expanduser()) / "estimate-host.json"

_CONV = {"Conv", "FusedConv", "ConvTranspose", "QLinearConv", "ConvInteger", "NhwcFusedConv"}
_GEMM = {"Gemm", "MatMul", "FusedGemm", "FusedMatMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
         "QGemm"}
_POOL = {"GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum",
         "QLinearGlobalAveragePool", "QLinearAveragePool"}
_MEMORY = {"Slice", "Concat", "Gather", "Pad", "Transpose", "Split", "Tile", "Expand", "Resize", "ReorderInput",
           "ReorderOutput", "DepthToSpace", "SpaceToDepth", "Where", "ScatterND", "GatherElements", "Cast"}
_META = {"Shape", "ConstantOfShape", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Constant", "Size",
         "Range", "Dropout"}
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Gelu",
                "Softplus", "Mish", "PRelu"}
_DTYPE_BYTES = {"float": 4, "float32": 4, "double": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def op_class(op: str, weight_shape: list | tuple | None = None) -> str:
    if op in _CONV:
        return "conv_dw" if weight_shape and len(weight_shape) >= 2 and weight_shape[1] == 1 else "conv"
    if op in _GEMM:
        return "gemm"
    if op in _POOL:
        return "pool"
    if op in _MEMORY:
        return "memory"
    if op in _META:
        return "meta"
    return "elementwise"


# ---- the catalog --------------------------------------------------------------------------------------------------

@dataclass
class Entry:
    name: str
    description: str
    kind: str                      # cpu | gpu
    clusters: list[dict]
    bandwidth_gbs: float
    efficiency: dict[str, float]
    overhead_us: dict[str, float]
    session_overhead_us: float
    sources: list[str] = field(default_factory=list)
    estimated: list[str] = field(default_factory=list)
    os: str = "unknown"
    cache_bytes: int | None = None            # the last-level cache a model can stay resident in between runs
    cache_bandwidth_gbs: float | None = None  # what a core streams from it

    def bandwidth_for(self, working_set_bytes: float, params_bw: float | None = None,
                      params_cache_bw: float | None = None) -> float:
        """DRAM bandwidth, or the cache's when weights + peak activations fit in the cache (they then stay there
        from one inference to the next: a batch-1 CNN of a few MB never touches DRAM in steady state)."""
        cache_bw = params_cache_bw or self.cache_bandwidth_gbs
        if self.cache_bytes and cache_bw and working_set_bytes <= self.cache_bytes:
            return cache_bw
        return params_bw or self.bandwidth_gbs

    @property
    def cores(self) -> int:
        return sum(int(c["cores"]) for c in self.clusters)

    def peak_gflops(self, threads: int | None = None, int8: bool = False) -> float:
        """Peak of the fastest `threads` cores (all when None; a GPU always uses all)."""
        key = "int8_ops_per_cycle" if int8 else "fp32_flops_per_cycle"
        per_core = sorted(((c["ghz"] * c.get(key, c["fp32_flops_per_cycle"] * (4 if int8 else 1)), int(c["cores"]))
                           for c in self.clusters), reverse=True)
        left = self.cores if threads is None or self.kind == "gpu" else min(threads, self.cores)
        total = 0.0
        for gflops, n in per_core:
            use = min(n, left)
            total += gflops * use
            left -= use
            if left <= 0:
                break
        return total

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "kind": self.kind, "cores": self.cores,
                "peak_fp32_gflops": round(self.peak_gflops(), 1), "peak_int8_gops": round(self.peak_gflops(int8=True), 1),
                "peak_fp32_gflops_1_core": round(self.peak_gflops(1), 1), "memory_bandwidth_gbs": self.bandwidth_gbs,
                "cache_bytes": self.cache_bytes, "cache_bandwidth_gbs": self.cache_bandwidth_gbs,
                "sources": self.sources, "estimated": self.estimated}


def load_catalog(path: Path = CATALOG) -> dict[str, Entry]:
    import yaml

    data = yaml.safe_load(path.read_text())
    out = {}
    for name, d in data["devices"].items():
        base = data["defaults"][d["kind"]]
        scale = float(d.get("overhead_scale", 1.0))
        out[name] = Entry(name, d["name"], d["kind"], d["clusters"], float(d["memory_bandwidth_gbs"]),
                          dict(base["efficiency"]), {k: v * scale for k, v in base["overhead_us"].items()},
                          float(base["session_overhead_us"]) * scale, list(d.get("sources", [])),
                          list(d.get("estimated", [])), d.get("os", "unknown"),
                          int(d["cache_mb"] * 2**20) if d.get("cache_mb") else None,
                          float(d["cache_bandwidth_gbs"]) if d.get("cache_bandwidth_gbs") else None)
    out["host"] = host_entry(data["defaults"]["cpu"])
    return out


def host_entry(defaults: dict | None = None) -> Entry:
    """This machine, from /proc/cpuinfo: cores we may run on, clock, SIMD width. Bandwidth is measured at calibration."""
    if defaults is None:
        import yaml

        defaults = yaml.safe_load(CATALOG.read_text())["defaults"]["cpu"]
    info = _read("/proc/cpuinfo")
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    mhz = [float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    ghz = int(max_khz) / 1e6 if max_khz.isdigit() else (max(mhz) / 1000 if mhz else 2.5)
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith(("flags", "Features"))), []))
    if "avx512f" in flags:
        fpc, ipc, isa = 64, 256 if "avx512_vnni" in flags else 128, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        fpc, ipc, isa = 32, 128 if "avx_vnni" in flags else 64, "AVX2+FMA"
    elif "asimd" in flags:
        fpc, ipc, isa = 16, 64 if "asimddp" in flags else 32, "NEON"
    else:
        fpc, ipc, isa = 8, 16, "SSE"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cache = _largest_cache_bytes()
    entry = Entry("host", f"this machine: {model} ({cores} cores, {isa})", "cpu",
                 [{"cores": cores, "ghz": round(ghz, 3), "uarch": model, "fp32_flops_per_cycle": fpc,
                   "int8_ops_per_cycle": ipc}], 20.0, dict(defaults["efficiency"]), dict(defaults["overhead_us"]),
                 float(defaults["session_overhead_us"]),
                 ["/proc/cpuinfo (model name, cpu MHz or cpufreq max, SIMD flags)"],
                 [f"peak = {cores} cores x {ghz:.2f} GHz x {fpc} FLOP/cycle ({isa}: 2 FMA units assumed): estimate",
                  "bandwidth 20 GB/s and cache bandwidth 80 GB/s until a calibration measures them: estimate"],
                 platform.system(), cache, 80.0 if cache else None)
    return entry


def _largest_cache_bytes() -> int | None:
    """The last-level cache from sysfs (index*/size of cpu0), e.g. '32768K' -> bytes."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = _read(str(f)).strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or None


# ---- the graph ----------------------------------------------------------------------------------------------------

@dataclass
class NodeCost:
    name: str
    op: str
    cls: str
    flops: float
    bytes: float
    int8: bool = False
    executed: bool = True      # False: fused into its producer or folded at load


@dataclass
class GraphCost:
    nodes: list[NodeCost]
    weights_bytes: int
    peak_activation_bytes: int
    input_name: str
    input_shape: list[int]
    declared_shape: list

    @property
    def executed(self) -> list[NodeCost]:
        return [n for n in self.nodes if n.executed]


def analyze(path: str | Path, batch: int = 1, sample_shape: tuple[int, ...] | None = None) -> GraphCost:
    """FLOPs, bytes and fusion of every node of an ONNX graph at a concrete input shape."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        raise UserError("the estimate device reads ONNX graphs: pip install onnx") from None
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserError(f"the estimate device reads ONNX graphs (.onnx); got {path.name}: estimate the .onnx it was "
                        f"exported from")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{path.name} has {len(inputs)} inputs; the estimate handles one")
    dims = inputs[0].type.tensor_type.shape.dim
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    if sample_shape:
        concrete = [batch, *sample_shape]
    else:
        if any(not isinstance(d, int) for d in declared[1:]):
            raise UserError(f"input {inputs[0].name!r} has dynamic dimensions {declared}; give one with shape=C,H,W")
        if isinstance(declared[0], int) and declared[0] != batch:
            raise UserError(f"input {inputs[0].name!r} has a fixed batch of {declared[0]}")
        concrete = [batch, *declared[1:]]
    if len(concrete) != len(dims):
        raise UserError(f"shape {concrete} does not match the input's rank {len(dims)}")
    for d, v in zip(dims, concrete):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    for out in graph.output:  # stale symbolic output dims would only confuse the inference
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.ClearField("dim_param")
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path.name}: ONNX shape inference failed ({first_line(e, 160)})") from None

    shapes: dict[str, tuple[list[int], int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = ([d.dim_value for d in tt.shape.dim], _elem_bytes(tt.elem_type))
    for name, init in inits.items():
        shapes[name] = (list(init.dims), _elem_bytes(init.data_type))

    def numel(t: str) -> int:
        return math.prod(shapes[t][0]) if t in shapes else 0

    def nbytes(t: str) -> int:
        return numel(t) * shapes[t][1] if t in shapes else 0

    nodes = list(inferred.graph.node)
    consumers: dict[str, list] = {}
    producer: dict[str, object] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
        for t in n.output:
            producer[t] = n
    # constant-foldable: Constants and every node whose inputs are all constant (weights' Identity, Dequantize...)
    constant: set[str] = set(inits)
    folded: set[int] = set()
    for i, n in enumerate(nodes):
        if n.op_type == "Constant" or (n.input and all(t in constant or not t for t in n.input)):
            constant.update(t for t in n.output if t)
            folded.add(i)
    weight_dq = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input and n.input[0] in constant}
    costs = []
    for i, n in enumerate(nodes):
        op = n.op_type
        out = n.output[0] if n.output else ""
        w_name = n.input[1] if len(n.input) > 1 else None
        w_shape = shapes.get(w_name, (None, 4))[0] if w_name else None
        cls = op_class(op, w_shape)
        int8 = bool(w_name and w_name in weight_dq and cls in ("conv", "conv_dw", "gemm"))
        executed = True
        if i in folded or op in ("Identity", "Dropout") or out in weight_dq:
            executed = False
        elif op in _ACTIVATIONS | {"BatchNormalization"} and n.input and n.input[0] in producer:
            src = producer[n.input[0]]
            if src.op_type in _CONV | _GEMM and len(consumers.get(n.input[0], [])) == 1:
                executed = False  # fused into the Conv / Gemm, as ORT, OpenVINO, TFLite and TensorRT do
        flops = 0.0
        if cls in ("conv", "conv_dw") and w_shape:
            flops = 2.0 * numel(out) * math.prod(w_shape[1:])
        elif cls == "gemm":
            a = shapes.get(n.input[0], ([1], 4))[0]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a and len(a) >= 2 else a[-1]
            flops = 2.0 * numel(out) * k
        elif cls == "pool":
            flops = float(max(numel(n.input[0]), numel(out)))
        elif cls == "elementwise":
            flops = float(numel(out)) * (2 if op == "BatchNormalization" else 1)
        weight_bytes = 1 if int8 else None
        moved = sum((numel(t) * weight_bytes if weight_bytes and t == w_name else nbytes(t)) for t in n.input if t)
        moved += sum(nbytes(t) for t in n.output if t)
        if cls == "meta":
            moved = 0
        costs.append(NodeCost(n.name or f"{op}_{len(costs)}", op, cls, flops, float(moved), int8, executed))

    weights = sum(nbytes(name) for name in inits)
    return GraphCost(costs, int(weights), _peak_activations(nodes, inputs[0].name, graph, inits, nbytes),
                     inputs[0].name, concrete, declared)


def _peak_activations(nodes, input_name, graph, inits, nbytes) -> int:
    """Max over the topological order of the bytes of tensors still needed (produced, some consumer to come)."""
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            last_use[t] = i
    outputs = {o.name for o in graph.output}
    live = {input_name: nbytes(input_name)}
    peak = sum(live.values())
    for i, n in enumerate(nodes):
        for t in n.output:
            if t:
                live[t] = nbytes(t)
        peak = max(peak, sum(live.values()))
        for t in list(live):
            if last_use.get(t, -1) <= i and t not in outputs:
                del live[t]
    return int(peak)


def _elem_bytes(onnx_type: int) -> int:
    return {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}.get(onnx_type, 4)


# ---- the prediction -----------------------------------------------------------------------------------------------

def roofline_us(flops: float, nbytes: float, peak_gflops: float, bandwidth_gbs: float) -> float:
    """Ideal time in µs: the slower of compute at peak and traffic at full bandwidth."""
    compute = flops / (peak_gflops * 1e3) if peak_gflops > 0 else 0.0
    memory = nbytes / (bandwidth_gbs * 1e3) if bandwidth_gbs > 0 else 0.0
    return max(compute, memory)


@dataclass
class Params:
    """What a prediction needs besides the graph: the catalog's defaults, or a calibration fit."""
    efficiency: dict[str, float]
    overhead_us: dict[str, float]
    s0_us: float
    s1_us: float = 0.0
    bandwidth_gbs: float | None = None
    cache_bandwidth_gbs: float | None = None
    source: str = "catalog defaults (uncalibrated)"
    calibrated_classes: tuple[str, ...] = ()
    threads: int | None = None


def default_params(entry: Entry) -> Params:
    return Params(dict(entry.efficiency), dict(entry.overhead_us), entry.session_overhead_us)


def predict(graph: GraphCost, entry: Entry, params: Params, threads: int | None = None) -> dict:
    bw = entry.bandwidth_for(graph.weights_bytes + graph.peak_activation_bytes, params.bandwidth_gbs,
                             params.cache_bandwidth_gbs)
    peak, peak8 = entry.peak_gflops(threads), entry.peak_gflops(threads, int8=True)
    layers, total = [], 0.0
    executed = graph.executed
    for n in executed:
        ideal = roofline_us(n.flops, n.bytes, peak8 if n.int8 else peak, bw)
        eff = params.efficiency.get(n.cls, 0.3)
        t = ideal / eff + params.overhead_us.get(n.cls, 2.0)
        total += t
        layers.append({"name": n.name, "op": n.op, "class": n.cls, "flops": n.flops, "bytes": n.bytes,
                       "roofline_us": round(ideal, 4), "predicted_us": round(t, 4), "int8": n.int8})
    # the fitted residual is signed (see fit); it never takes away more than half of the kernels' time
    session = max(params.s0_us + params.s1_us * len(executed), -0.5 * total)
    return {"latency_ms": (total + session) / 1000.0, "kernels_ms": total / 1000.0, "session_overhead_ms": session / 1e3,
            "layers": layers, "peak_gflops": peak, "bandwidth_gbs": bw, "executed_nodes": len(executed),
            "flops": sum(n.flops for n in executed)}


# ---- calibration --------------------------------------------------------------------------------------------------

def measure_for_calibration(path: str | Path, threads: int = 1, runs: int = 50, iterations: int = 300,
                            cpus: list[int] | None = None) -> dict:
    """ORT per-node kernel times (profiling session) and the local profiler's end-to-end latency for one model."""
    import onnxruntime as ort
    import numpy as np

    from devices.local import LocalDevice

    path = Path(path)
    graph = analyze(path)
    e2e = LocalDevice().run_profile(path, "onnxruntime", {"threads": threads, "warmup": 20, "iterations": iterations,
                                                          "cpus": cpus})
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compress-calib-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(graph.input_shape, dtype=np.float32)
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs + 5):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list] = {}
    meta: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        per_node.setdefault(e["name"], []).append(e["dur"])
        meta[e["name"]] = e["args"]
    kernels = []
    for name, durs in per_node.items():
        args = meta[name]
        ins = [_shape_of(s) for s in args.get("input_type_shape", [])]
        outs = [_shape_of(s) for s in args.get("output_type_shape", [])]
        op = args.get("op_name", "?")
        w = ins[1][0] if len(ins) > 1 else None
        cls = op_class(op, w)
        flops = 0.0
        out_n = math.prod(outs[0][0]) if outs else 0
        if cls in ("conv", "conv_dw") and w:
            flops = 2.0 * out_n * math.prod(w[1:])
        elif cls == "gemm" and ins:
            flops = 2.0 * out_n * ins[0][0][-1]
        elif cls == "pool" and ins:
            flops = float(max(math.prod(ins[0][0]), out_n))
        elif cls == "elementwise":
            flops = float(out_n)
        nbytes = 0 if cls == "meta" else sum(math.prod(s) * b for s, b in ins + outs)
        durs = sorted(durs[5:] or durs)  # the first runs pay for allocation
        kernels.append({"op": op, "class": cls, "flops": flops, "bytes": float(nbytes),
                        "us": float(durs[len(durs) // 2])})
    samples = sorted(e2e["samples_ms"])
    return {"model": path.name, "e2e_ms": samples[0], "e2e_p50_ms": e2e["latency_ms"]["p50"],
            "e2e_p10_ms": samples[len(samples) // 10], "load_avg_1m": e2e["environment"].get("load_avg_1m"),
            "threads": threads,
            "executed_nodes_graph": len(graph.executed), "kernels": kernels,
            "working_set_bytes": graph.weights_bytes + graph.peak_activation_bytes,
            "graph": [n.__dict__ for n in graph.nodes], "environment": e2e["environment"]}


def measure_bandwidth_gbs(size_mb: float = 64, reps: int = 5) -> float:
    """Copy bandwidth of one core (read + write bytes / time), best of `reps` rounds. 64 MB: DRAM; a size that fits
    in the cache (measure_cache_bandwidth_gbs): the cache."""
    import numpy as np

    a = np.ones(int(size_mb * 2**20) // 8)
    b = np.empty_like(a)
    inner = max(1, int(64 / size_mb))  # small arrays: many copies per timing, so the call overhead is amortized
    best = float("inf")
    for _ in range(reps):
        np.copyto(b, a)
        t0 = time.perf_counter()
        for _ in range(inner):
            np.copyto(b, a)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * a.nbytes / best / 1e9


def measure_cache_bandwidth_gbs(cache_bytes: int | None) -> float | None:
    """Copy bandwidth on arrays that stay in the last-level cache (a quarter of it, both arrays included)."""
    if not cache_bytes:
        return None
    return measure_bandwidth_gbs(cache_bytes / 8 / 2**20, reps=7)


def fit(measurements: list[dict], entry: Entry, bandwidth_gbs: float | None = None,
        cache_bandwidth_gbs: float | None = None) -> Params:
    """Per-class efficiency and overhead from executed kernels; session overhead from end-to-end residuals.

    A class gets a fitted efficiency only with enough signal (>= 8 kernels whose roofline times span >= 4x);
    otherwise only its per-node overhead is fitted and the efficiency stays the catalog's."""
    threads = measurements[0]["threads"] if measurements else 1
    peak = entry.peak_gflops(threads)
    eff, ovh, fitted = dict(entry.efficiency), dict(entry.overhead_us), []
    for cls in CLASSES:
        pts = []
        for m in measurements:
            bw = entry.bandwidth_for(m["working_set_bytes"], bandwidth_gbs, cache_bandwidth_gbs)
            pts += [(roofline_us(k["flops"], k["bytes"], peak, bw), k["us"]) for k in m["kernels"] if k["class"] == cls]
        if not pts:
            continue
        fitted.append(cls)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if cls == "meta" or len(pts) < 8 or min(xs) <= 0 or max(xs) / min(xs) < 4:
            ovh[cls] = max(0.0, sorted(y - x / eff.get(cls, 1.0) for x, y in pts)[len(pts) // 2])
            continue
        slope, intercept = _least_squares(xs, ys)
        if slope <= 0:  # no signal in the work term: keep the default efficiency, fit the overhead only
            slope = 1.0 / eff[cls]
            intercept = max(0.0, sum(y - slope * x for x, y in pts) / len(pts))
        elif intercept < 0:  # through the origin instead
            slope = sum(x * y for x, y in pts) / sum(x * x for x in xs)
            intercept = 0.0
        eff[cls], ovh[cls] = 1.0 / slope, intercept
    params = Params(eff, ovh, 0.0, 0.0, bandwidth_gbs, cache_bandwidth_gbs,
                    f"calibrated on {', '.join(m['model'] for m in measurements)}", tuple(fitted), threads)
    residuals = []
    for m in measurements:
        graph = _graph_from(m)
        pred = predict(graph, entry, params, threads)
        residuals.append((pred["executed_nodes"], m["e2e_ms"] * 1000.0 - pred["kernels_ms"] * 1000.0))
    # signed on purpose: per-node kernel times under ORT's profiler carry its own per-event cost, which the
    # end-to-end latency (profiler off) does not; s1 < 0 takes it back out
    if len(residuals) >= 3:
        s1, s0 = _least_squares([r[0] for r in residuals], [r[1] for r in residuals])
    elif residuals:
        s0, s1 = sum(r[1] for r in residuals) / len(residuals), 0.0
    else:
        s0, s1 = entry.session_overhead_us, 0.0
    params.s0_us, params.s1_us = s0, s1
    return params


def calibrate(models: list[str | Path], threads: int = 1, out: str | Path | None = DEFAULT_FIT,
              cpus: list[int] | None = None, runs: int = 50, iterations: int = 300) -> dict:
    """Measure `models` here, fit, save the fit to `out` (estimate:host reads the default location)."""
    entry = load_catalog()["host"]
    measurements = [measure_for_calibration(m, threads, runs, iterations, cpus) for m in models]
    bw, cache_bw = measure_bandwidth_gbs(), measure_cache_bandwidth_gbs(entry.cache_bytes)
    params = fit(measurements, entry, bw, cache_bw)
    in_sample = []  # a fit that cannot reproduce its own models (FP32 and INT8 mixed, too few) must say so
    for m in measurements:
        graph = _graph_from(m)
        predicted = predict(graph, entry, params, threads)["latency_ms"]
        in_sample.append({"model": m["model"], "measured_ms": m["e2e_ms"], "predicted_ms": round(predicted, 4),
                          "error": round(predicted / m["e2e_ms"] - 1.0, 4)})
    doc = {"schema": FIT_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "entry": entry.summary(), "threads": threads, "bandwidth_gbs_measured": bw,
           "cache_bandwidth_gbs_measured": cache_bw,
           "params": params.__dict__ | {"calibrated_classes": list(params.calibrated_classes)},
           "models": [{"model": m["model"], "e2e_ms": m["e2e_ms"]} for m in measurements], "in_sample": in_sample,
           "warnings": fit_warnings(in_sample),
           "environment": measurements[0]["environment"] if measurements else None}
    if out:
        out = Path(out)
        if out.exists() and not out.is_file():  # os.replace would put the fit in place of /dev/null itself
            raise UserError(f"--out {out} is not a regular file: give a file path")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)
    return doc


def fit_warnings(in_sample: list[dict], bound: float = 0.25) -> list[str]:
    """What a user must know before trusting a fit: too few models, or models it does not reproduce."""
    out = []
    if len(in_sample) < 3:
        out.append(f"{len(in_sample)} calibration model(s): the per-model session overhead is fitted from 3 or more "
                   f"(with fewer it is their mean); calibrate on 3-5 FP32 models like the ones you will predict")
    bad = [r for r in in_sample if abs(r["error"]) > bound]
    if bad:
        out.append("the fit misses its own calibration models by more than "
                   f"{bound:.0%}: " + ", ".join(f"{Path(r['model']).name} {r['error']:+.0%}" for r in bad)
                   + "; predictions from it are not to be trusted (INT8 and FP32 kernels share a class "
                     "efficiency: calibrate on models of one precision)")
    return out


def load_fit(path: str | Path) -> Params:
    path = Path(path).expanduser()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"calibration not found: {path} (python -m devices.estimate calibrate MODEL.onnx ...)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a calibration file ({e})") from None
    if doc.get("schema") != FIT_SCHEMA:
        raise UserError(f"{path}: not a {FIT_SCHEMA} calibration")
    p = doc["params"]
    return Params(p["efficiency"], p["overhead_us"], p["s0_us"], p["s1_us"], p.get("bandwidth_gbs"),
                  p.get("cache_bandwidth_gbs"), f"calibrated ({path}, {doc['created']})",
                  tuple(p.get("calibrated_classes", ())), p.get("threads"))


def _graph_from(m: dict) -> GraphCost:
    """A calibration measurement's graph, as predict() takes it: the working set stands in for the weights
    (predict picks the bandwidth level from weights + peak activations)."""
    return GraphCost([NodeCost(**n) for n in m["graph"]], m["working_set_bytes"], 0, "", [], [])


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def _shape_of(d: dict) -> tuple[list[int], int]:
    (dtype, shape), = d.items()
    return [int(v) for v in shape], _DTYPE_BYTES.get(dtype, 4)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# ---- the device ---------------------------------------------------------------------------------------------------

class EstimateDevice(Device):
    name = "estimate"

    def __init__(self, entry: str = "host", calibration: str | None = None):
        catalog = load_catalog()
        if entry not in catalog:  # here, so a recipe's typo fails when its stages are checked, before they run
            raise UserError(f"unknown estimate device {entry!r}; choose one of: {', '.join(sorted(catalog))}")
        self.entry_name = entry
        self.calibration = calibration

    @classmethod
    def from_spec(cls, spec: str, **options) -> "EstimateDevice":
        head, _, query = spec.partition("?")
        opts = {**dict(parse_qsl(query, keep_blank_values=True)), **options}
        unknown = set(opts) - {"calibration"}
        if unknown:
            raise UserError(f"estimate device: unknown option(s) {', '.join(sorted(unknown))} (known: calibration)")
        name = head.partition(":")[2]
        if not name:
            raise UserError(f"estimate needs a device name: estimate:NAME ({', '.join(sorted(load_catalog()))})")
        return cls(name, opts.get("calibration"))

    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        from devices.profile import artifact_record, build_profile, validate_profile
        from runtimes.base import check_artifact

        opts = ProfileOptions.coerce(options)
        path = check_artifact(artifact).resolve()
        entry = load_catalog()[self.entry_name]
        params = default_params(entry)
        if self.calibration:
            params = load_fit(self.calibration)
        elif entry.name == "host" and DEFAULT_FIT.is_file():
            params = load_fit(DEFAULT_FIT)
        graph = analyze(path, opts.batch, opts.shape)
        pred = predict(graph, entry, params, opts.threads)
        ms = pred["latency_ms"]
        notes = [f"PREDICTION, not a measurement: roofline over the ONNX graph for {entry.description}, "
                 f"{params.source}; latency stats are the single predicted value"]
        if not params.calibrated_classes:
            notes.append("uncalibrated: efficiencies and overheads are the catalog's estimates; expect tens of percent "
                         "of error (benchmarks/results/estimate.md)")
        else:
            missing = sorted({n.cls for n in graph.executed} - set(params.calibrated_classes))
            if missing:
                notes.append(f"classes without calibration data use catalog defaults: {', '.join(missing)}")
            if params.threads and opts.threads != params.threads:
                notes.append(f"calibrated at {params.threads} thread(s), predicted for {opts.threads or 'all'}")
        if any(n.int8 for n in graph.executed):
            notes.append("int8 nodes use the int8 peak; their efficiency is not calibrated")
        profile = build_profile(
            artifact=artifact_record(path),
            runtime={"name": runtime or "onnxruntime", "version": "estimate",
                     "threads": opts.threads, "options": {"model": "roofline per ONNX node + per-node overhead",
                                                          "params": params.source}},
            settings={"warmup": 0, "iterations": 1, "batch": opts.batch, "seed": opts.seed,
                      "input": {"name": graph.input_name, "shape": graph.input_shape, "dtype": "float32",
                                "declared_shape": graph.declared_shape},
                      "timer": "none: predicted"},
            load_ms=None, first_inference_ms=ms, samples_ms=[ms],  # a prediction has no load time
            memory={"rss_before_load_bytes": None, "peak_rss_bytes": None,
                    "model_peak_bytes": graph.weights_bytes + graph.peak_activation_bytes,
                    "method": "estimate: weights + peak live activations over the ONNX graph (no runtime overhead)",
                    "isolated_process": False, "weights_bytes": graph.weights_bytes,
                    "peak_activations_bytes": graph.peak_activation_bytes},
            environment={"hostname": f"estimate:{entry.name}", "os": entry.os, "platform": entry.description,
                         "machine": entry.kind, "cpu": entry.description, "cores_logical": entry.cores,
                         "cores_physical": entry.cores, "python": "n/a (prediction)",
                         "peak_gflops_used": round(pred["peak_gflops"], 2), "bandwidth_gbs_used": pred["bandwidth_gbs"]},
            target=f"estimate:{entry.name}", layers=pred["layers"])
        profile["notes"] = notes
        profile["prediction"] = {"latency_ms": ms, "kernels_ms": pred["kernels_ms"],
                                 "session_overhead_ms": pred["session_overhead_ms"], "flops": pred["flops"],
                                 "executed_nodes": pred["executed_nodes"], "params": params.__dict__ |
                                 {"calibrated_classes": list(params.calibrated_classes)},
                                 "device": entry.summary()}
        return validate_profile(profile, "estimate")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m devices.estimate", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="fit this machine's efficiencies on ONNX models (measures them)")
    c.add_argument("models", nargs="+")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default=str(DEFAULT_FIT))
    sub.add_parser("list", help="the catalog with peaks and sources")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "calibrate":
            doc = calibrate(args.models, args.threads, args.out)
            print(json.dumps({k: doc[k] for k in ("threads", "bandwidth_gbs_measured", "params", "in_sample")},
                             indent=1))
            print(f"saved {args.out}")
            for w in doc["warnings"]:
                print(f"warning: {w}", file=__import__("sys").stderr)
        else:
            print(json.dumps([e.summary() for e in load_catalog().values()], indent=1))
    except UserError as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
