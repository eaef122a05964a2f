"""Export any HF causal LM through torch.onnx's TorchScript tracer, then store its weights.

    model (bnb 4/8-bit, fp16, merged, ...)
        │ plain_fp32_copy: every linear layer ─► x @ W^T as one MatMul over an fp32 (in, out)
        │ initializer named "<module path>.weight_t"; the caller's model is not touched
        ▼
    CacheContract: flat tensors of the graph contract (graph_info.py) ─► DynamicCache ─► model
        │ torch.onnx.export(dynamo=False), traced with left padding, P > 0 and T > 1 so that
        │ no mask or shape shortcut of that one example is baked into the graph
        ▼
    fp32 graph ──weights──► "fp32"   as traced
                            "fp16"   weight initializers stored fp16, Cast to fp32 at load
                            "int8" / "int4"  MatMul ─► com.microsoft MatMulNBits, symmetric RTN
                                     per `block_size` inputs (weights.py, the fused builder's
                                     format, byte for byte onnxruntime's quantizer)
        │ separate mode: each adapted linear gets optional LoRA/DoRA/IA3/bottleneck inputs
        │ with identity defaults, spliced around its MatMul (generic_adapters.py)
        ▼
    out_dir/model.onnx + out_dir/model.onnx.data

Why TorchScript: the dynamo exporter needs onnxscript, which is not a dependency; the
tracer gives graphs equal to PyTorch within ~1e-6 on every tiny architecture here.
Why not onnxruntime's MatMulNBitsQuantizer class: in onnxruntime 1.31 it imports
onnx_ir (not a dependency); weights.py reproduces its RTN rounding exactly.
"""

from __future__ import annotations

import collections
import copy
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgepeft.base import dequantized_weight, is_conv1d_origin, is_linear_like, is_quantized
from edgepeft.export.adapter_slots import AdapterSlot
from edgepeft.export.fused import GraphInfo
from edgepeft.export.generic_adapters import add_adapter_branches, linear_sites
from edgepeft.export.graph_info import (
    DATA_FILE,
    IR_VERSION,
    MODEL_FILE,
    WEIGHT_FORMATS,
    input_names,
    output_names,
)
from edgepeft.export.weights import (
    DEFAULT_QUANTIZATION,
    RTN,
    WeightQuantization,
    check_block_size,
    dequantize_nbits,
    quantization_record,
)
from edgepeft.kv_cache_keyword import cache_keyword, output_cache
from edgepeft.vocab import NBITS

OPSET = 17
MS_DOMAIN = "com.microsoft"
WEIGHT_SUFFIX = ".weight_t"
# Weights smaller than this stay fp32 under "fp16" (norms, biases: tiny and precision-critical).
_FP16_MIN_ELEMENTS = 1024
# The traced example: batch 2, 3 past and 4 new positions, row 0 left-padded by 2.
_TRACE_BATCH, _TRACE_PAST, _TRACE_NEW, _TRACE_PAD = 2, 3, 4, 2

Progress = Callable[[str], None]


# ---------------------------------------------------------------- PyTorch side


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias: one MatMul over an (in, out) weight in the exported graph."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)  # (in, out)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight_t.shape

    @property
    def weight(self) -> torch.Tensor:
        """(out, in), for model code that reads a projection's weight (dtype, device)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)  # (..., in) -> (..., out)
        return y if self.bias is None else y + self.bias


def _transposed(module: nn.Module) -> TransposedLinear:
    fp32 = module.weight.dtype == torch.float32 and not is_quantized(module)
    if fp32 and isinstance(module, nn.Linear):
        weight_t = module.weight.detach().t()  # a view: shares the caller's storage, read only
    elif fp32 and is_conv1d_origin(module):
        weight_t = module.weight.detach()  # GPT-2 Conv1D already stores (in, out)
    else:
        weight_t = dequantized_weight(module).t()
    bias = None if module.bias is None else module.bias.detach().float()
    return TransposedLinear(weight_t, bias)


def plain_fp32_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` computing in fp32 with every linear layer a TransposedLinear.

    bitsandbytes layers are dequantized (`dequantized_weight`), so the copy computes
    exactly what the quantized model computes, in fp32. fp32 tensors are shared with
    `model`, never written; nothing of `model` changes.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        if is_quantized(module) or is_linear_like(module):
            memo[id(module)] = _transposed(module)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.float32:
            memo[id(tensor)] = tensor  # shared: the export only reads them
    # Copies of non-fp32 tensors are cast here; shared fp32 ones are left as they are.
    return copy.deepcopy(model, memo).float().eval()


class CacheContract(nn.Module):
    """`model` behind the flat tensors of the graph contract (see graph_info.py).

    forward(input_ids (B, T), attention_mask (B, P+T), past k0, v0, k1, v1, ... (B, n_kv, P, d))
        -> (logits (B, T, V) float32, present k0, v0, ... (B, n_kv, P+T, d))
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        # Full (not sliding) layers whatever the config says, so every present is P+T long;
        # sliding-window models still mask by their window.
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
        new = input_ids.shape[1]
        # Left padding shifts positions: a token's position counts the real tokens before it.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]  # (B, T)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **{cache_keyword(self.model): cache},
        )
        presents = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits.float(), *presents)


def cache_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(num_layers, n_kv_heads, head_dim, vocab) read from one forward of `model`."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = output_cache(out).layers
    _, n_kv, _, head_dim = layers[0].keys.shape
    return len(layers), n_kv, head_dim, out.logits.shape[-1]


def _trace_example(num_layers: int, n_kv: int, head_dim: int, vocab: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    b, p, t = _TRACE_BATCH, _TRACE_PAST, _TRACE_NEW
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.long)
    mask[0, :_TRACE_PAD] = 0
    past = [torch.randn(b, n_kv, p, head_dim, generator=g) for _ in range(2 * num_layers)]
    return (ids, mask, *past)


def _dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in input_names(num_layers)[2:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names(num_layers)[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    return axes


# ---------------------------------------------------------------- weight storage


def dequantize_matmul_nbits(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The fp32 (K, N) weight a MatMulNBits node computes with."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    zero_points = initializers[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    codes = initializers[node.input[1]]  # (N, k_blocks, blob)
    w = dequantize_nbits(
        codes,
        initializers[node.input[2]].reshape(codes.shape[:2]),
        None if zero_points is None else zero_points.reshape(codes.shape[0], -1),
        attrs["bits"],
        attrs["block_size"],
        attrs["K"],
    )  # (N, K)
    return np.ascontiguousarray(w.T)


def matmul_nbits_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Original weight name -> dequantized fp32 (K, N) for every MatMulNBits of `proto`.

    The name is the fp32 initializer the node replaced (see `quantize_matmuls`), i.e.
    for generic graphs the CacheContract parameter name "model.<path>.weight_t".
    """
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            out[node.input[1].rsplit(".", 1)[0]] = dequantize_matmul_nbits(node, initializers)
    return out


def quantize_matmuls(
    proto: onnx.ModelProto,
    bits: int,
    block_size: int,
    accuracy_level: int,
    progress: Progress | None = None,
    *,
    quantization: WeightQuantization = RTN,
    num_layers: int = 0,
    record: dict[str, int] | None = None,
) -> int:
    """Replace every MatMul over a 2-D fp32 initializer by MatMulNBits, in place.

    `quantization` (weights.py, as the fused builder) chooses each weight's bits (`bits`
    4 is an int4 export, mixed precision may store some tensors int8) and rounding: the
    quantized tensors are named "<weight>.q<bits>", "<weight>.scales" and, asymmetric,
    "<weight>.zero_points". Returns the number of MatMuls replaced.

    Args:
        num_layers: The model's decoder layers (mixed precision's rule needs them).
        record: Filled with weight name -> the bits it was stored in.
    """
    check_block_size(block_size)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    users = collections.Counter(name for node in graph.node for name in node.input)
    targets = [
        i
        for i, node in enumerate(graph.node)
        if node.op_type == "MatMul"
        and node.input[1] in initializers
        and len(initializers[node.input[1]].dims) == 2
        and initializers[node.input[1]].data_type == TensorProto.FLOAT
    ]
    for count, i in enumerate(targets, 1):
        node = graph.node[i]
        weight = node.input[1]
        w = numpy_helper.to_array(initializers[weight])  # (K, N)
        own_bits = quantization.bits("int4" if bits == 4 else "int8", weight, num_layers)
        packed = quantization.quantize(w.T, own_bits, block_size)
        if record is not None:
            record[weight] = own_bits
        arrays = {f"{weight}.q{own_bits}": packed.codes, f"{weight}.scales": packed.scales}
        if packed.zero_points is not None:
            arrays[f"{weight}.zero_points"] = packed.zero_points
        names = list(arrays)
        for name, array in arrays.items():
            graph.initializer.append(numpy_helper.from_array(array, name))
        attrs = dict(K=w.shape[0], N=w.shape[1], bits=own_bits, block_size=block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level  # 0 (fp32 compute) is the op's default
        graph.node[i].CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *names],
                list(node.output),
                name=f"{node.name or weight}/MatMulNBits",
                domain=MS_DOMAIN,
                **attrs,
            )
        )
        users[weight] -= 1
        if users[weight] == 0:
            graph.initializer.remove(initializers.pop(weight))
        if progress and (count % 50 == 0 or count == len(targets)):
            progress(f"quantized {count}/{len(targets)} MatMul weights")
    if targets and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(targets)


def store_fp16(proto: onnx.ModelProto, names: set[str]) -> int:
    """Store the fp32 initializers in `names` (large ones) as fp16, each Cast back to fp32.

    The graph still computes in fp32 (onnxruntime folds the casts when it loads the
    model); the files are half the size. Returns the number of tensors converted.
    """
    graph = proto.graph
    casts = []
    for tensor in list(graph.initializer):
        if tensor.name not in names or tensor.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < _FP16_MIN_ELEMENTS:
            continue
        half = numpy_helper.from_array(array.astype(np.float16), f"{tensor.name}.fp16")
        graph.initializer.remove(tensor)
        graph.initializer.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [tensor.name], name=f"{tensor.name}/Cast", to=TensorProto.FLOAT
            )
        )
    for node in reversed(casts):
        graph.node.insert(0, node)
    return len(casts)


def save_with_external_data(proto: onnx.ModelProto, out_dir: Path) -> Path:
    """Write out_dir/model.onnx with every tensor over 1 KiB in out_dir/model.onnx.data."""
    for name in (MODEL_FILE, DATA_FILE):
        (out_dir / name).unlink(missing_ok=True)  # onnx appends to an existing data file
    proto.ir_version = IR_VERSION
    onnx.save_model(
        proto,
        out_dir / MODEL_FILE,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return out_dir / MODEL_FILE


# ---------------------------------------------------------------- export


def export_generic(
    model: nn.Module,
    out_dir: str | Path,
    weights: str = "fp32",
    *,
    block_size: int = 32,
    accuracy_level: int = 4,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
    progress: Progress | None = None,
    adapter_slots: Mapping[str, AdapterSlot] | None = None,
    optional_inputs: Mapping[str, np.ndarray] | None = None,
) -> GraphInfo:
    """Export `model` (any HF causal LM) as a decoder graph with KV cache.

    Args:
        model: A causal LM; bitsandbytes layers are dequantized to fp32 first. Merge
            adapters before exporting (unmerged adapters are traced as they compute).
        out_dir: Folder for model.onnx and model.onnx.data (created if missing).
        weights: "fp32", "fp16" (fp16 storage, fp32 compute), "int8" or "int4"
            (MatMulNBits; embeddings and norms stay fp32).
        block_size: Inputs sharing one scale and zero point (int8/int4).
        quantization: How int4/int8 weights are quantized, as in the fused builder.
        accuracy_level: MatMulNBits compute type: 0 = fp32, 4 = int8 activations
            (fastest on CPUs with int8 dot products).
        progress: Called with one line per stage.
        adapter_slots: Separate mode: module path -> AdapterSlot whose adapter inputs the
            graph gets, with identity defaults (generic_adapters.py; one slot per module).
        optional_inputs: Extra graph inputs, each defaulting to the array given.

    Returns:
        GraphInfo of the written graph.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights in NBITS:
        check_block_size(block_size)
    say = progress or (lambda line: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plain = plain_fp32_copy(model)
    # Eager attention traces to plain ops; sdpa's mask shortcuts depend on the example.
    plain.set_attn_implementation("eager")
    num_layers, n_kv, head_dim, vocab = cache_shape(plain)
    contract = CacheContract(plain).eval()
    say(f"tracing {type(model).__name__} ({num_layers} layers) with torch.onnx (TorchScript)")
    trace_dir = Path(tempfile.mkdtemp(prefix=".trace-", dir=out_dir))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on every python-side shape check
            torch.onnx.export(
                contract,
                _trace_example(num_layers, n_kv, head_dim, vocab),
                str(trace_dir / MODEL_FILE),
                dynamo=False,
                input_names=input_names(num_layers),
                output_names=output_names(num_layers),
                dynamic_axes=_dynamic_axes(num_layers),
                opset_version=OPSET,
                do_constant_folding=True,
            )
        proto = onnx.load(str(trace_dir / MODEL_FILE))  # external data, if any, loaded too
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    del contract, plain
    slots = dict(adapter_slots or {})
    # Found in the fp32 graph: storing the weights keeps these tensor names.
    sites = linear_sites(proto, slots)
    stored_bits: dict[str, int] = {}

    if weights in NBITS:
        bits = NBITS[weights]
        say(f"quantizing MatMul weights to int{bits} ({quantization.method}, block {block_size})")
        quantize_matmuls(
            proto,
            bits,
            block_size,
            accuracy_level,
            progress=say,
            quantization=quantization,
            num_layers=num_layers,
            record=stored_bits,
        )
    elif weights == "fp16":
        names = {t.name for t in proto.graph.initializer if len(t.dims) >= 2}
        store_fp16(proto, names)
    if slots or optional_inputs:
        say(f"adding adapter inputs on {len(slots)} layers")
        add_adapter_branches(proto, slots, sites, optional_inputs)
    path = save_with_external_data(proto, out_dir)
    say(f"graph saved: {len(proto.graph.node)} nodes, {weights} weights")
    return GraphInfo(
        path=path,
        num_nodes=len(proto.graph.node),
        num_layers=num_layers,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        kv_dtype="float32",
        weights=weights,
        op_counts=dict(collections.Counter(n.op_type for n in proto.graph.node)),
        quantization=quantization_record(quantization, stored_bits) if stored_bits else None,
    )


__all__ = [
    "CacheContract",
    "TransposedLinear",
    "dequantize_matmul_nbits",
    "export_generic",
    "matmul_nbits_weights",
    "plain_fp32_copy",
    "quantize_matmuls",
    "store_fp16",
]
