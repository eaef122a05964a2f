"""Separate-mode adapter inputs on traced (torch.onnx) graphs, spliced in after tracing.

generic.py traces every linear layer as one MatMul over an initializer it names:

    x ──► MatMul(x, "model.<path>.weight_t") ──► y0 [──► Add(y0, "model.<path>.bias")] ──► y

`linear_sites` reads (x, y0, y) per adapted module from the fp32 graph, before its weights
are stored: MatMulNBits keeps the tensor names, so the sites hold for every weight format.
`add_adapter_branches` then splices in each slot's branches with exactly the inputs, names,
shapes and identity defaults of the fused graph (adapter_slots.AdapterSlot.inputs), so the
adapter files, the runtime and verify are the same for both builders:

    x ─[× ia3_scale (in,)]─► x' ─► base MatMul(NBits)(x') ─► y0 ─[+ x' @ lora_A @ lora_B]
      ─[× dora_scale (out,)]─► y0' ─[+ bias]─► y ─[× ia3_scale (out,)]
      ─[+ adapter_up(act(adapter_down(·)))]─► the module's output, under its traced name

DoRA scales W x + s B A x but not the bias: its Mul sits before the traced bias Add, as in
PyTorch. Each splice renames the producer's output and re-creates the original name at the
end of the new nodes, so every consumer (and graph output) is left as traced. No packing:
each adapted module (GPT-2's c_attn is already one Conv1D) is one slot. UniPELT's gated slots
are refused: its prefix gate needs the attention bias, which only the fused graph has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepeft.export.adapter_slots import (
    AdapterSlot,
    bottleneck_inputs,
    dora_input,
    ia3_input,
    lora_inputs,
    lora_row_mask_input,
)

MS_DOMAIN = "com.microsoft"
CONTRACT_PREFIX = "model."
"""generic.CacheContract holds the model as `.model`: its parameters are named "model.<path>"."""
GENERIC_ACTIVATIONS = {
    # The generic graph is opset 17, which has no ai.onnx Gelu (opset 20): the exact (erf)
    # GELU comes from onnxruntime's contrib op there.
    "relu": ("Relu", "", {}),
    "gelu": ("Gelu", MS_DOMAIN, {}),
    "silu": ("QuickGelu", MS_DOMAIN, {"alpha": 1.0}),  # x * sigmoid(x)
    "tanh": ("Tanh", "", {}),
}


@dataclass(frozen=True)
class LinearSite:
    """Where one traced linear layer sits in the graph, by tensor name."""

    module: str
    """The PyTorch module path (the prefix of its adapter inputs)."""
    x: str
    """The layer's input (B, T, in)."""
    matmul: str
    """x @ W (B, T, out), before the bias."""
    output: str
    """The layer's output: the bias Add's, or `matmul` when the layer has no bias."""
    in_features: int
    out_features: int


def linear_sites(proto: onnx.ModelProto, modules) -> dict[str, LinearSite]:
    """module -> its LinearSite, for each of `modules` (PyTorch paths) in a traced graph.

    Raises:
        ValueError: A module is not one MatMul over its "model.<path>.weight_t" in the
            graph (e.g. folded into another op), naming it.
    """
    graph = proto.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    matmuls: dict[str, list[onnx.NodeProto]] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            matmuls.setdefault(node.input[1], []).append(node)
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sites = {}
    for module in modules:
        weight = f"{CONTRACT_PREFIX}{module}.weight_t"
        found = matmuls.get(weight, [])
        if len(found) != 1 or len(shapes.get(weight, ())) != 2:
            raise ValueError(
                f"an adapter targets layer {module}, which the traced graph does not hold as one "
                f"MatMul over {weight!r} ({len(found)} found); export that adapter with "
                "mode='merged'"
            )
        node = found[0]
        y0, bias = node.output[0], f"{CONTRACT_PREFIX}{module}.bias"
        adds = [n for n in consumers.get(y0, []) if n.op_type == "Add" and bias in n.input]
        if bias in shapes and len(adds) != 1:
            raise ValueError(
                f"layer {module}: its bias {bias!r} is not added to its MatMul's output in the "
                "traced graph; export that adapter with mode='merged'"
            )
        in_features, out_features = shapes[weight]
        sites[module] = LinearSite(
            module, node.input[0], y0, adds[0].output[0] if adds else y0, in_features, out_features
        )
    return sites


class _Splicer:
    """Inserts nodes into a graph around named tensors, keeping it topologically sorted."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.count = 0

    def node(self, op: str, inputs: list[str], output: str, name: str, domain: str = "", **attrs):
        return helper.make_node(op, inputs, [output], name=name, domain=domain, **attrs)

    def _producer(self, tensor: str) -> tuple[int, onnx.NodeProto]:
        for i, node in enumerate(self.graph.node):
            if tensor in node.output:
                return i, node
        raise ValueError(f"no node of the traced graph produces {tensor!r}")

    def after(self, tensor: str, build: Callable[[str], list[onnx.NodeProto]]) -> None:
        """Recompute `tensor` as build(original value)'s last node: its producer's output is
        renamed, the new nodes follow the producer, every consumer reads the new value."""
        i, producer = self._producer(tensor)
        original = f"{tensor}/before_adapter_{self.count}"
        self.count += 1
        producer.output[list(producer.output).index(tensor)] = original
        nodes = build(original)  # its last node produces `tensor` again
        for offset, node in enumerate(nodes, 1):
            self.graph.node.insert(i + offset, node)

    def before_input(self, tensor: str, consumer: str, node: onnx.NodeProto) -> None:
        """Insert `node` (computing a new tensor from `tensor`) right before the node whose
        output is `consumer`, and make that node read the new tensor instead."""
        i, target = self._producer(consumer)
        target.input[list(target.input).index(tensor)] = node.output[0]
        self.graph.node.insert(i, node)


def _declare(graph: onnx.GraphProto, name: str, shape: list, default: np.ndarray) -> None:
    """A graph input that may be left unfed: the initializer of the same name is its default."""
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(default), name))
    elem = helper.np_dtype_to_tensor_dtype(default.dtype)
    graph.input.append(helper.make_tensor_value_info(name, elem, shape))


def _branch(s: _Splicer, slot: AdapterSlot, site: LinearSite) -> None:
    m = site.module
    x = site.x
    if slot.ia3 == "input":  # scales what both the base MatMul and the LoRA branch read
        scaled = s.node("Mul", [x, ia3_input(m)], f"{m}/ia3/input_scaled", f"{m}/ia3/Mul_input")
        s.before_input(x, site.matmul, scaled)
        x = scaled.output[0]
    if slot.lora or slot.dora:
        a, b = lora_inputs(m)

        def lora(base: str) -> list[onnx.NodeProto]:
            low = s.node("MatMul", [x, a], f"{m}/lora/low", f"{m}/lora/MatMul_A")  # (B, T, r)
            rows = s.node(  # a mixed batch's per-row columns (adapter_slots.py)
                "Mul", [low.output[0], lora_row_mask_input(m)], f"{m}/lora/rows", f"{m}/lora/Mul_rows"
            )
            delta = s.node("MatMul", [rows.output[0], b], f"{m}/lora/delta", f"{m}/lora/MatMul_B")
            out = site.matmul if not slot.dora else f"{m}/lora/sum"
            nodes = [low, rows, delta, s.node("Add", [base, delta.output[0]], out, f"{m}/lora/Add")]
            if slot.dora:  # before the traced bias Add: DoRA leaves the bias unscaled
                nodes.append(s.node("Mul", [out, dora_input(m)], site.matmul, f"{m}/dora/Mul"))
            return nodes

        s.after(site.matmul, lora)
    if slot.ia3 == "output":  # after the bias: PyTorch's IA3 scales it too
        s.after(
            site.output,
            lambda y: [s.node("Mul", [y, ia3_input(m)], site.output, f"{m}/ia3/Mul_output")],
        )
    if slot.bottleneck:
        down_w, down_b, up_w, up_b = bottleneck_inputs(m)
        op, domain, attrs = GENERIC_ACTIVATIONS[slot.bottleneck]

        def bottleneck(y: str) -> list[onnx.NodeProto]:
            p = f"{m}/bottleneck"
            return [
                s.node("MatMul", [y, down_w], f"{p}/down", f"{p}/MatMul_down"),
                s.node("Add", [f"{p}/down", down_b], f"{p}/down_biased", f"{p}/Add_down"),
                s.node(op, [f"{p}/down_biased"], f"{p}/act", f"{p}/{op}", domain, **attrs),
                s.node("MatMul", [f"{p}/act", up_w], f"{p}/up", f"{p}/MatMul_up"),
                s.node("Add", [f"{p}/up", up_b], f"{p}/up_biased", f"{p}/Add_up"),  # (B, T, out)
                s.node("Add", [y, f"{p}/up_biased"], site.output, f"{p}/Add"),
            ]

        s.after(site.output, bottleneck)


def add_adapter_branches(
    proto: onnx.ModelProto,
    slots: Mapping[str, AdapterSlot],
    sites: Mapping[str, LinearSite],
    optional_inputs: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Give each slot's module its adapter inputs and branches, in place; returns the count.

    Args:
        proto: The traced graph (any weight format: sites are tensor names).
        slots: module -> AdapterSlot (unpacked: `members` must be empty).
        sites: module -> LinearSite, from `linear_sites` on the same graph.
        optional_inputs: Extra graph inputs, each defaulting to the array given (the
            base-fingerprint guard).
    """
    graph = proto.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for name, default in (optional_inputs or {}).items():
        if name in taken:
            raise ValueError(f"the graph already has a tensor named {name!r}")
        _declare(graph, name, list(default.shape), default)
    splicer = _Splicer(graph)
    for module, slot in slots.items():
        site = sites[module]
        if slot.members:
            raise ValueError(f"{module}: generic graphs take one slot per module, not packed ones")
        if slot.gated_lora or slot.gated_bottleneck:  # separate.py refuses UniPELT first
            raise ValueError(
                f"{module}: UniPELT's gated branches need the fused graph (their prefix gate "
                "sits inside attention); export with graph='fused'"
            )
        if (slot.in_features, slot.out_features) != (site.in_features, site.out_features):
            raise ValueError(
                f"{module}: the traced weight is (in, out) = {(site.in_features, site.out_features)}, "
                f"its adapter slot expects {(slot.in_features, slot.out_features)}"
            )
        for name, (shape, default) in slot.inputs(np.float32).items():
            if name in taken:
                raise ValueError(f"{module}: the graph already has a tensor named {name!r}")
            _declare(graph, name, shape, default)
        _branch(splicer, slot, site)
    if any(n.domain == MS_DOMAIN for n in graph.node) and not any(
        o.domain == MS_DOMAIN for o in proto.opset_import
    ):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(slots)


__all__ = ["GENERIC_ACTIVATIONS", "LinearSite", "add_adapter_branches", "linear_sites"]
