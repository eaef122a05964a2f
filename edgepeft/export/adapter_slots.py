"""Separate-mode adapter inputs of one projection: their names, defaults and graph nodes.

    x ─[× ia3_scale (in,)]──► x' ──► base MatMul(NBits)(x')  (bias left out under DoRA) ──┐
                               └──► MatMul lora_A (in, r) ─[× lora_row_mask]─► MatMul lora_B ─+─► h
    h ─[× dora_scale (out,) + bias]─[× ia3_scale (out,)]──► y
    y ─[+ adapter_up(act(adapter_down(y)))]──► output          (bottleneck)

    h (the FFN block's input, before its norm) ─► adapter_down ─► act ─► adapter_up ─┐
    mlp(x) ────────────────────────────────────────────────────────────────────────+──► y'
                                                                   (parallel, at "…mlp")

    UniPELT (unipelt.py), each branch times a per-token gate g(u) = σ(u · w + b) (B, T, 1):
    h ─[+ g(x) · (x @ gated_lora_A @ gated_lora_B)]          u = x, the projection's input
    y ─[+ g(y) · gated_adapter_up(act(gated_adapter_down(y)))]─► output        u = y
    (their own inputs beside the plain kinds': zero rank / width by default, so a branch adds
    exact zeros while another adapter, or none, runs; the prefix gate is fused.py's)

Inputs are named "<module>.<input>" (module as PyTorch names it, or the packed projection
"qkv_proj" / "gate_up_proj" whose siblings share one slot, see packed_adapters.py), one set
per layer and kind, never fused into a blob. Each is OPTIONAL: an initializer of the same
name is its default, which makes its branch the identity (rank-0 LoRA: zeros of shape
(in, 0) and (0, out); scales of ones; a zero-width bottleneck), so the base graph runs
alone when no adapter is fed. One adapter is active at a time, so whatever an adapter leaves
unfed stays the identity and the order of the branches does not change its output.

Mixed-adapter batches (runtime/mixed.py): K LoRA adapters stacked along the rank, lora_A
(in, R = Σ r_k), lora_B (R, out), and lora_row_mask (B, 1, R) holding 1 where row b's adapter
owns the column, 0 elsewhere (all 0 for a row without adapter): each row then computes its
own adapter's B A x in one forward. Unfed, the mask is ones (1, 1, 1): one adapter as before.

A slot exposes the union of the kinds the exported adapters put on that module:

    kind         inputs                                           default
    lora         lora_A (in, r), lora_B (r, out)   r dynamic      zeros (in, 0), (0, out)
                 lora_row_mask (B, 1, r)                          ones (1, 1, 1)
    dora         + dora_scale (out,)                              ones
    ia3          ia3_scale (out,) output target | (in,) feedforward   ones
    bottleneck   adapter_down.weight (out, w), adapter_down.bias (w,),    zeros, w = 0
                 adapter_up.weight (w, out), adapter_up.bias (out,)
    parallel     the bottleneck's four inputs on the MLP block "model.layers.i.mlp"
                 (in = out = hidden); the scaling is folded into adapter_up (file side)
    gated_lora   gated_lora_A (in, r), gated_lora_B (r, out),     zeros (in, 0), (0, out)
                 lora_gate.weight (in,), lora_gate.bias (1,)      zeros
    gated_bottleneck  gated_adapter_{down,up}.{weight,bias} as the bottleneck's,  w = 0
                 adapter_gate.weight (out,), adapter_gate.bias (1,)               zeros
    prefix gate  model.layers.i.self_attn.prefix_gate.weight (hidden,), .bias (1,)  zeros
                 model.prefix_gate.columns (N,): its length is the prefix's N     (0,)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

BOTTLENECK_ACTIVATIONS = {
    # name -> (op, domain, attributes); "gelu" is the exact (erf) GELU, as torch's F.gelu
    "relu": ("Relu", "", {}),
    "gelu": ("Gelu", "", {}),
    "silu": ("QuickGelu", "com.microsoft", {"alpha": 1.0}),  # x * sigmoid(x)
    "tanh": ("Tanh", "", {}),
}
IA3_SIDES = ("output", "input")


def lora_inputs(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_row_mask_input(module: str) -> str:
    """The (B, 1, R) mask that gives each row of a mixed batch its own adapter's columns."""
    return f"{module}.lora_row_mask"


def dora_input(module: str) -> str:
    return f"{module}.dora_scale"


def ia3_input(module: str) -> str:
    return f"{module}.ia3_scale"


def gated_lora_inputs(module: str) -> tuple[str, str, str, str]:
    """UniPELT's gated LoRA: A (in, r), B (r, out), the gate's weight (in,) and bias (1,)."""
    return (
        f"{module}.gated_lora_A",
        f"{module}.gated_lora_B",
        f"{module}.lora_gate.weight",
        f"{module}.lora_gate.bias",
    )


def gated_bottleneck_inputs(module: str) -> tuple[str, str, str, str, str, str]:
    """UniPELT's gated bottleneck: down, up (as `bottleneck_inputs`), gate weight and bias."""
    return (
        f"{module}.gated_adapter_down.weight",
        f"{module}.gated_adapter_down.bias",
        f"{module}.gated_adapter_up.weight",
        f"{module}.gated_adapter_up.bias",
        f"{module}.adapter_gate.weight",
        f"{module}.adapter_gate.bias",
    )


PREFIX_COLUMNS_INPUT = "model.prefix_gate.columns"
"""(N,): a UniPELT file sets N ones; only the length is read: the prefix's cache columns 0..N-1."""


def prefix_gate_inputs(attention: str) -> tuple[str, str]:
    """UniPELT's prefix gate of one attention layer ("model.layers.i.self_attn"): weight
    (hidden,) and bias (1,)."""
    return f"{attention}.prefix_gate.weight", f"{attention}.prefix_gate.bias"


INPUT_SUFFIXES = (
    "lora_A", "lora_B", "lora_row_mask", "dora_scale", "ia3_scale",
    "adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias",
    "gated_lora_A", "gated_lora_B", "lora_gate.weight", "lora_gate.bias",
    "gated_adapter_down.weight", "gated_adapter_down.bias", "gated_adapter_up.weight",
    "gated_adapter_up.bias", "adapter_gate.weight", "adapter_gate.bias",
    "prefix_gate.weight", "prefix_gate.bias",
)


def split_input(input_name: str) -> tuple[str, str]:
    """(module, suffix) of an adapter input name; suffix "" when it is none of ours."""
    for suffix in INPUT_SUFFIXES:
        if input_name.endswith("." + suffix):
            return input_name[: -len(suffix) - 1], suffix
    return input_name, ""


def bottleneck_inputs(module: str) -> tuple[str, str, str, str]:
    return (
        f"{module}.adapter_down.weight",
        f"{module}.adapter_down.bias",
        f"{module}.adapter_up.weight",
        f"{module}.adapter_up.bias",
    )


@dataclass(frozen=True)
class AdapterSlot:
    """The adapter inputs one projection exposes; called by the fused emitter to emit it."""

    module: str
    in_features: int
    out_features: int
    lora: bool = False
    dora: bool = False
    ia3: str | None = None
    """"output" (scales W x + b) or "input" (scales x: a feedforward target), or None."""
    bottleneck: str | None = None
    """The bottleneck activation (a key of BOTTLENECK_ACTIVATIONS), or None."""
    parallel: str | None = None
    """A parallel adapter's activation on an MLP block (emitted by `block`, not `__call__`)."""
    gated_lora: bool = False
    """UniPELT's gated LoRA (its own inputs; never packed with sibling projections)."""
    gated_bottleneck: str | None = None
    """UniPELT's gated bottleneck activation, or None."""
    members: tuple[tuple[str, int], ...] = ()
    """A packed projection (packed_adapters.py): its modules and their out_features, in
    row order; empty for one module."""

    def union(self, other: AdapterSlot) -> AdapterSlot:
        """A slot exposing what either exposes; conflicting kinds raise, naming the module."""
        if (self.in_features, self.out_features) != (other.in_features, other.out_features):
            raise ValueError(f"{self.module}: two adapters disagree on its shape")
        kinds = (
            ("ia3", "IA3 side (input / output)"),
            ("bottleneck", "activation"),
            ("parallel", "activation"),
            ("gated_bottleneck", "activation"),
        )
        for field, what in kinds:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine and theirs and mine != theirs:
                raise ValueError(
                    f"the exported adapters put different {field} {what}s on {self.module} "
                    f"({mine!r} and {theirs!r}); one graph has one {field} input there: "
                    "export them into separate folders"
                )
        return replace(
            self,
            lora=self.lora or other.lora,
            dora=self.dora or other.dora,
            ia3=self.ia3 or other.ia3,
            bottleneck=self.bottleneck or other.bottleneck,
            parallel=self.parallel or other.parallel,
            gated_lora=self.gated_lora or other.gated_lora,
            gated_bottleneck=self.gated_bottleneck or other.gated_bottleneck,
        )

    def inputs(self, dtype) -> dict[str, tuple[list[int | str], np.ndarray]]:
        """Graph input name -> (shape with dynamic dims named, identity default)."""
        m, n_in, n_out = self.module, self.in_features, self.out_features
        out: dict[str, tuple[list[int | str], np.ndarray]] = {}
        if self.ia3 == "input":
            out[ia3_input(m)] = ([n_in], np.ones(n_in, dtype))
        if self.lora or self.dora:
            a, b = lora_inputs(m)
            rank = f"{m}.lora_rank"
            out[a] = ([n_in, rank], np.zeros((n_in, 0), dtype))
            out[b] = ([rank, n_out], np.zeros((0, n_out), dtype))
            out[lora_row_mask_input(m)] = ([None, 1, None], np.ones((1, 1, 1), dtype))
        if self.dora:
            out[dora_input(m)] = ([n_out], np.ones(n_out, dtype))
        if self.ia3 == "output":
            out[ia3_input(m)] = ([n_out], np.ones(n_out, dtype))
        if self.bottleneck or self.parallel:
            down_w, down_b, up_w, up_b = bottleneck_inputs(m)
            width = f"{m}.bottleneck_width"
            out[down_w] = ([n_out, width], np.zeros((n_out, 0), dtype))
            out[down_b] = ([width], np.zeros(0, dtype))
            out[up_w] = ([width, n_out], np.zeros((0, n_out), dtype))
            out[up_b] = ([n_out], np.zeros(n_out, dtype))
        if self.gated_lora:
            a, b, gate_w, gate_b = gated_lora_inputs(m)
            rank = f"{m}.gated_lora_rank"
            out[a] = ([n_in, rank], np.zeros((n_in, 0), dtype))
            out[b] = ([rank, n_out], np.zeros((0, n_out), dtype))
            out[gate_w] = ([n_in], np.zeros(n_in, dtype))
            out[gate_b] = ([1], np.zeros(1, dtype))
        if self.gated_bottleneck:
            down_w, down_b, up_w, up_b, gate_w, gate_b = gated_bottleneck_inputs(m)
            width = f"{m}.gated_bottleneck_width"
            out[down_w] = ([n_out, width], np.zeros((n_out, 0), dtype))
            out[down_b] = ([width], np.zeros(0, dtype))
            out[up_w] = ([width, n_out], np.zeros((0, n_out), dtype))
            out[up_b] = ([n_out], np.zeros(n_out, dtype))
            out[gate_w] = ([n_out], np.zeros(n_out, dtype))
            out[gate_b] = ([1], np.zeros(1, dtype))
        return out

    def __call__(self, e, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        """Emit the projection `name` with this slot's inputs (fused.AdapterBranch)."""
        b = e.b
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{name}: the graph's weight is {tuple(weight.shape)}, its adapter slot expects "
                f"{(self.out_features, self.in_features)} (out, in)"
            )
        inputs = {
            k: b.optional_input(k, default, shape)
            for k, (shape, default) in self.inputs(e.dtype).items()
        }
        if self.ia3 == "input":
            x = b.node("Mul", [x, inputs[ia3_input(name)]], name=f"{name}/ia3/Mul_input")
        # DoRA scales W x + s B A x but not the bias, so the bias is added after the scale.
        y = e.linear(x, name, weight, None if self.dora else bias, branch=False)  # (B, T, out)
        if self.lora or self.dora:
            a, lora_b = lora_inputs(name)
            low = b.node("MatMul", [x, inputs[a]], name=f"{name}/lora/MatMul_A")  # (B, T, r)
            low = b.node(
                "Mul", [low, inputs[lora_row_mask_input(name)]], name=f"{name}/lora/Mul_rows"
            )
            delta = b.node("MatMul", [low, inputs[lora_b]], name=f"{name}/lora/MatMul_B")
            y = b.node("Add", [y, delta], name=f"{name}/lora/Add")
        if self.gated_lora:  # before DoRA's scale and the bias: both are identities then
            a, lora_b, gate_w, gate_b = gated_lora_inputs(name)
            low = b.node("MatMul", [x, inputs[a]], name=f"{name}/gated_lora/MatMul_A")
            delta = b.node("MatMul", [low, inputs[lora_b]], name=f"{name}/gated_lora/MatMul_B")
            gate = _gate(b, inputs, x, gate_w, gate_b, f"{name}/gated_lora")  # (B, T, 1)
            delta = b.node("Mul", [delta, gate], name=f"{name}/gated_lora/Mul_gate")
            y = b.node("Add", [y, delta], name=f"{name}/gated_lora/Add")
        if self.dora:
            y = b.node("Mul", [y, inputs[dora_input(name)]], name=f"{name}/dora/Mul")
            if bias is not None:
                y = b.node("Add", [y, e.bias(name, bias)], name=f"{name}/dora/Add_bias")
        if self.ia3 == "output":  # scales the bias too, as PyTorch's IA3 does
            y = b.node("Mul", [y, inputs[ia3_input(name)]], name=f"{name}/ia3/Mul_output")
        if self.bottleneck:
            y = _bottleneck(b, inputs, y, y, name, self.bottleneck, "bottleneck")
        if self.gated_bottleneck:
            y = _gated_bottleneck(b, inputs, y, name, self.gated_bottleneck)
        return y

    def block(self, e, h: str, y: str) -> str:
        """y + up(act(down(h))) for the MLP block `self.module` (fused._mlp's block branch):
        h (B, T, hidden) is the block's input before its norm, y (B, T, hidden) its output."""
        inputs = {
            k: e.b.optional_input(k, default, shape)
            for k, (shape, default) in self.inputs(e.dtype).items()
        }
        return _bottleneck(e.b, inputs, h, y, self.module, self.parallel, "parallel")


def _bottleneck(b, inputs: dict, x: str, y: str, name: str, activation: str, tag: str) -> str:
    """y + up(act(down(x))) from the four bottleneck inputs of `name`."""
    down_w, down_b, up_w, up_b = bottleneck_inputs(name)
    op, domain, attrs = BOTTLENECK_ACTIVATIONS[activation]
    h = b.node("MatMul", [x, inputs[down_w]], name=f"{name}/{tag}/MatMul_down")
    h = b.node("Add", [h, inputs[down_b]], name=f"{name}/{tag}/Add_down")  # (B, T, w)
    h = b.node(op, [h], name=f"{name}/{tag}/{op}", domain=domain, **attrs)
    h = b.node("MatMul", [h, inputs[up_w]], name=f"{name}/{tag}/MatMul_up")
    h = b.node("Add", [h, inputs[up_b]], name=f"{name}/{tag}/Add_up")  # (B, T, out)
    return b.node("Add", [y, h], name=f"{name}/{tag}/Add")


def _gate(b, inputs: dict, u: str, weight: str, bias: str, tag: str) -> str:
    """σ(u · w + b) (B, T, 1) from u (B, T, in), w (in,), b (1,)."""
    z = b.node("MatMul", [u, inputs[weight]], name=f"{tag}/gate/MatMul")  # (B, T)
    z = b.node("Add", [z, inputs[bias]], name=f"{tag}/gate/Add")
    g = b.node("Sigmoid", [z], name=f"{tag}/gate/Sigmoid")
    axes = b.initializer(f"{tag.replace('/', '.')}.gate_axes", np.array([-1], np.int64))
    return b.node("Unsqueeze", [g, axes], name=f"{tag}/gate/Unsqueeze")  # (B, T, 1)


def _gated_bottleneck(b, inputs: dict, y: str, name: str, activation: str) -> str:
    """y + σ(y · w + b) · up(act(down(y))) from the six gated-bottleneck inputs of `name`."""
    down_w, down_b, up_w, up_b, gate_w, gate_b = gated_bottleneck_inputs(name)
    tag = f"{name}/gated_bottleneck"
    op, domain, attrs = BOTTLENECK_ACTIVATIONS[activation]
    h = b.node("MatMul", [y, inputs[down_w]], name=f"{tag}/MatMul_down")
    h = b.node("Add", [h, inputs[down_b]], name=f"{tag}/Add_down")  # (B, T, w)
    h = b.node(op, [h], name=f"{tag}/{op}", domain=domain, **attrs)
    h = b.node("MatMul", [h, inputs[up_w]], name=f"{tag}/MatMul_up")
    h = b.node("Add", [h, inputs[up_b]], name=f"{tag}/Add_up")  # (B, T, out)
    h = b.node("Mul", [h, _gate(b, inputs, y, gate_w, gate_b, tag)], name=f"{tag}/Mul_gate")
    return b.node("Add", [y, h], name=f"{tag}/Add")
