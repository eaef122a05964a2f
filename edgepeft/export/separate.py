"""Separate mode: one base graph, every adapter a switchable `.onnx_adapter` file.

    base model + adapter folders
        │ per adapter: load_adapter (base fingerprint checked) ─► read its tensors as graph
        │ input values (AdapterTensors) ─► delete_adapter: the model is the bare base again
        ▼
    slots: module -> AdapterSlot, the union of the kinds the adapters put there
        │ pack_slots: q/k/v and gate/up share one packed slot (packed_adapters.py)
        ▼
    export_fused(base, adapter_branches=slots, optional_inputs={guard})      out/model.onnx
        (architectures without a fused builder, or graph="generic": export_generic with
         adapter_slots=slots unpacked, one per module, spliced into the traced graph)
        ▼
    per adapter: pack_tensors ─► write_adapter_file (every tensor a graph input)   out/adapters/
        ▼
    edgepeft.json (mode "separate", one AdapterEntry per file), tokenizer files

What a file holds, per kind and module (graph input names in adapter_slots.py; a packed
q/k/v or gate/up projection holds its modules' values side by side, see packed_adapters.py):

    lora        lora_A = A^T (in, r), lora_B = s B^T (r, out)      s = alpha / r (rsLoRA: / √r)
    dora        + dora_scale = m / ||W + s B A||_row (out,), fp32
    ia3         ia3_scale = l (out,) or (in,) for a feedforward target
    bottleneck  adapter_down.weight D^T, .bias, adapter_up.weight U^T, .bias
    unipelt     gated_lora_A = A^T, gated_lora_B = s B^T, lora_gate.weight (in,), .bias (1,)
                gated_adapter_{down,up}.*, adapter_gate.*        on the FFN output projection
                self_attn.prefix_gate.weight (hidden,), .bias (1,) per layer, and
                model.prefix_gate.columns = N ones (export_fused(prefix_gates=True))
                + its prefix as adapters/<name>.kvprefix.safetensors (a hybrid, as MAM)
    selective   <parameter> = original + Δ, under the parameter's own name ("model.norm.weight",
                "...q_proj.bias"): the graph's input for that norm weight or bias, whose
                default is the base's value (fused.py `tuned_parameters`; fused graphs only).
                A masked (sparse) delta is stored dense here: γ and b are vectors, small

DoRA's scale is computed here, once, from the base weights the adapter was trained on (the
bnb layer dequantized to fp32), exactly as PyTorch computes it in every forward. The graph
may hold those weights re-rounded (int4/int8): the scale is then not recomputed from the
rounded weights, so an adapter file means the same thing on every weight format of one
base; the difference is measured in tests/test_export_separate.py.

Prompt and prefix tuning are switchable too, as KV prefixes: kv_prefix.py writes their
per-layer keys/values to adapters/<name>.kvprefix.safetensors, which the runtime seeds into
the cache (no graph input). Not switchable here: modules_to_save (whole heads), and
selective adapters that tune an embedding table, lm_head or a projection's weight (a file
would carry the whole matrix, which the graph holds as quantized codes): export those in
merged mode. GPT-2 and other architectures without a fused builder get the same inputs on
their traced graph (generic_adapters.py), so their files, runtime and verify are the same;
parallel adapters (MAM) and UniPELT, which reach inside whole blocks, need the fused graph.

An adapter trained later over the same base is added to an existing export with
`export_adapter` (no new base graph): it needs the graph to have its inputs, which
`lora_everywhere=True` gives every linear layer (rank-0 LoRA) at export time.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edgepeft.adapters import dora, peft_types
from edgepeft.adapters.inject import delete_adapter, list_adapters
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.parallel import block_name
from edgepeft.adapters.peft_format import load_adapter
from edgepeft.adapters.selective import SelectiveLayer
from edgepeft.adapters.unipelt import GatedBottleneckLayer, GatedLoraLayer, PrefixGate
from edgepeft.base import (
    base_info,
    dequantized_weight,
    fingerprint,
    is_linear_like,
    linear_features,
    load_base,
)
from edgepeft.config import config_to_dict
from edgepeft.export.adapter_files import (
    ADAPTER_DIR,
    AdapterBaseMismatchError,
    fingerprint_input,
    optional_graph_inputs,
    write_adapter_file,
)
from edgepeft.export.adapter_slots import (
    PREFIX_COLUMNS_INPUT,
    AdapterSlot,
    bottleneck_inputs,
    dora_input,
    gated_bottleneck_inputs,
    gated_lora_inputs,
    ia3_input,
    lora_inputs,
    prefix_gate_inputs,
)
from edgepeft.export.channel_scales import calibration_ids
from edgepeft.export.files import record_files
from edgepeft.export.fused import export_fused, unsupported
from edgepeft.export.generic import export_generic
from edgepeft.export.kv_prefix import KV_PREFIX_PEFT_TYPES, export_kv_prefix, has_kv_prefix
from edgepeft.export.manifest import (
    AdapterEntry,
    Manifest,
    graph_fields,
    read_manifest,
    write_manifest,
)
from edgepeft.export.model_facts import token_ids
from edgepeft.export.packed_adapters import graph_layout, pack_slots, pack_tensors, packed_layout
from edgepeft.export.weights import DEFAULT_QUANTIZATION, WeightQuantization
from edgepeft.finite import check_finite
from edgepeft.vocab import BNB4_FORMATS, GRAPHS

if TYPE_CHECKING:  # only a type here: separate mode runs on a stream it is given
    from edgepeft.export.stream import LayerStream

SEPARATE_PEFT_TYPES = peft_types(separate_file="onnx_adapter")
_KINDS = {
    "IA3": "ia3",
    "BOTTLENECK": "bottleneck",
    "PARALLEL_ADAPTER": "parallel",
    "MAM": "mam",
    "UNIPELT": "unipelt",
    "SELECTIVE": "selective",
}
"""peft_type -> the kind an .onnx_adapter's sidecar and the manifest record (else lora/dora)."""
_PART_TYPES = {"MAM": ("PARALLEL_ADAPTER",), "UNIPELT": ("UNIPELT",)}
"""Hybrids (a KV-prefix part besides graph inputs): the module types holding their graph-input
parts (default: the method's own)."""
Progress = Callable[[str], None]


@dataclass(frozen=True)
class AdapterTensors:
    """One adapter as values for the base graph's adapter inputs."""

    name: str
    kind: str
    """"lora", "dora", "ia3", "bottleneck", "parallel", "mam", "unipelt" or "selective"."""
    source: str
    slots: dict[str, AdapterSlot]
    """module -> the inputs this adapter needs there."""
    tensors: dict[str, np.ndarray]
    """graph input name -> fp32 value."""
    ranks: dict[str, int] = field(default_factory=dict)
    """module -> LoRA/DoRA rank or bottleneck width."""
    scaling: dict[str, float] = field(default_factory=dict)
    """module -> LoRA scaling (already folded into lora_B)."""
    config: dict = field(default_factory=dict)
    prefix: dict | None = None
    """A hybrid's (MAM's) KV-prefix part as `export_kv_prefix` wrote it (its manifest fields),
    loaded with the .onnx_adapter as one adapter; None for the other methods."""
    parameters: tuple[str, ...] = ()
    """A selective adapter's tuned base parameters (full names, each a graph input)."""

    def targets(self) -> list[str]:
        """The modules whose graph inputs the file sets."""
        owners = {p.rsplit(".", 1)[0] for p in self.parameters}
        return sorted(set(self.slots) | owners)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def _refuse(name: str, what: str) -> ValueError:
    return ValueError(
        f"adapter {name!r} {what}, which separate mode cannot switch (it feeds only "
        f"projection inputs: {', '.join(SEPARATE_PEFT_TYPES)} adapters); export it with "
        "mode='merged'"
    )


def adapter_tensors(model: nn.Module, name: str, source: str = "") -> AdapterTensors:
    """Read adapter `name` (loaded on `model`) as graph input values, per module and kind."""
    config = list_adapters(model)[name]
    if config.peft_type not in SEPARATE_PEFT_TYPES:
        raise _refuse(name, f"is a {config.peft_type} adapter")
    if getattr(config, "modules_to_save", None):
        raise _refuse(name, f"trains whole modules ({', '.join(config.modules_to_save)}: modules_to_save)")
    kind = _KINDS.get(config.peft_type) or ("dora" if config.use_dora else "lora")
    parts = _PART_TYPES.get(config.peft_type, (config.peft_type,))
    slots, tensors, ranks, scaling, parameters = {}, {}, {}, {}, []
    for path, module in adapter_modules(model):
        if name not in module:
            continue
        if module.model_level and has_kv_prefix(model, name) and config.peft_type in _PART_TYPES:
            continue  # a hybrid's prefix part: export_separate writes it as a .kvprefix file
        if module.peft_type not in parts:
            raise _refuse(name, f"holds a {module.peft_type} module at {path}")
        if isinstance(module, SelectiveLayer):  # base parameters, not a projection's input
            values = _tuned_values(model, module, name, path)
            tensors.update(values)
            parameters.extend(values)
            continue
        if isinstance(module, PrefixGate):  # beside attention's bias, not a projection
            weight, bias = prefix_gate_inputs(path.rsplit(".", 1)[0])
            gate = module.gate[name]
            tensors[weight], tensors[bias] = _np(gate.weight).reshape(-1), _np(gate.bias)
            tensors[PREFIX_COLUMNS_INPUT] = np.ones(module.tokens[name], np.float32)  # (N,)
            continue
        if isinstance(module, (GatedLoraLayer, GatedBottleneckLayer)):
            slots[path], values, ranks[path] = _gated_part(module, name, path)
            tensors.update(values)
            if isinstance(module, GatedLoraLayer):
                scaling[path] = module.scaling[name]
            continue
        if module.peft_type == "PARALLEL_ADAPTER":  # beside a whole MLP block, not a projection
            down, up, s = module.adapter_down[name], module.adapter_up[name], module.scaling[name]
            values = (_np(down.weight).T, _np(down.bias), _np(up.weight * s).T, _np(up.bias * s))
            block = block_name(path)  # the fused graph adds the branch beside the whole MLP
            tensors.update(zip(bottleneck_inputs(block), values, strict=True))  # s folded in up
            ranks[block], scaling[block] = down.weight.shape[0], float(s)
            hidden = down.weight.shape[1]
            slots[block] = AdapterSlot(block, hidden, hidden, parallel=module.activation[name])
            continue
        base = module.innermost()
        in_f, out_f = linear_features(base)
        slot = AdapterSlot(path, in_f, out_f)
        if kind in ("lora", "dora"):
            A, B, s = module.lora_A[name], module.lora_B[name], module.scaling[name]
            a_name, b_name = lora_inputs(path)
            tensors[a_name] = _np(A.weight).T  # (in, r)
            tensors[b_name] = _np(B.weight * s).T  # (r, out), the scaling folded in
            ranks[path], scaling[path] = A.weight.shape[0], float(s)
            slot = AdapterSlot(path, in_f, out_f, lora=True, dora=kind == "dora")
            if kind == "dora":
                with torch.no_grad():  # as dora.dora_extra computes it, in fp32
                    weight = dequantized_weight(base)
                    update = dora.lora_weight(A, B).detach().float().to(weight.device)
                    norm = dora.row_norm(weight, update, s)
                    magnitude = module.lora_magnitude_vector[name].detach().float()
                    tensors[dora_input(path)] = _np(magnitude.to(norm.device) / norm)  # (out,)
        elif kind == "ia3":
            side = "input" if module.feedforward[name] else "output"
            tensors[ia3_input(path)] = _np(module.ia3_l[name]).reshape(-1)  # (in,) or (out,)
            slot = AdapterSlot(path, in_f, out_f, ia3=side)
        else:
            down, up = module.adapter_down[name], module.adapter_up[name]
            names = bottleneck_inputs(path)
            values = (_np(down.weight).T, _np(down.bias), _np(up.weight).T, _np(up.bias))
            tensors.update(zip(names, values, strict=True))
            ranks[path] = down.weight.shape[0]
            slot = AdapterSlot(path, in_f, out_f, bottleneck=module.activation[name])
        slots[path] = slot
    if not slots and not parameters:
        raise ValueError(f"adapter {name!r} adapts no module of this model")
    # Values trained to NaN/inf in memory never reached load_adapter's check.
    check_finite(tensors, adapter=name, file=source or "the model's adapter (in memory)")
    return AdapterTensors(
        name=name,
        kind=kind,
        source=source,
        slots=slots,
        tensors=tensors,
        ranks=ranks,
        scaling=scaling,
        config=config_to_dict(config),
        parameters=tuple(parameters),
    )


def _tuned_values(
    model: nn.Module, module: SelectiveLayer, name: str, path: str
) -> dict[str, np.ndarray]:
    """A selective adapter's part at `path`: {full parameter name: original + Δ} in fp32.

    Only the vectors a graph holds as plain values can be inputs: norm weights and
    projection biases. An embedding table, lm_head or a linear weight would put a whole
    matrix in every file, over codes the graph stores quantized: those are refused.
    """
    base = module.innermost()
    out = {}
    for param, value in module.merge_update(name).items():
        full = f"{path}.{param}"
        embedding = base is model.get_input_embeddings() or base is model.get_output_embeddings()
        matrix = value.dim() != 1 or (is_linear_like(base) and param != "bias")
        if embedding or matrix:
            raise _refuse(
                name,
                f"tunes {full} ({list(value.shape)}): a switchable file holds norm weights and "
                "projection biases only, not whole matrices (narrow its patterns to "
                r"'norm\.weight$' / '\.bias$' to switch it)",
            )
        out[full] = _np(value)
    return out


def _gated_part(module, name: str, path: str) -> tuple[AdapterSlot, dict[str, np.ndarray], int]:
    """(slot, graph input values, rank or width) of a UniPELT gated LoRA or bottleneck."""
    in_f, out_f = linear_features(module.innermost())
    if isinstance(module, GatedLoraLayer):
        A, B, gate = module.lora_A[name], module.lora_B[name], module.lora_gate[name]
        values = (  # A^T (in, r), s B^T (r, out): the scaling folded in, as for LoRA
            _np(A.weight).T, _np(B.weight * module.scaling[name]).T,
            _np(gate.weight).reshape(-1), _np(gate.bias),
        )  # fmt: skip
        slot = AdapterSlot(path, in_f, out_f, gated_lora=True)
        return slot, dict(zip(gated_lora_inputs(path), values, strict=True)), A.weight.shape[0]
    down, up, gate = module.adapter_down[name], module.adapter_up[name], module.adapter_gate[name]
    values = (
        _np(down.weight).T, _np(down.bias), _np(up.weight).T, _np(up.bias),
        _np(gate.weight).reshape(-1), _np(gate.bias),
    )  # fmt: skip
    slot = AdapterSlot(path, in_f, out_f, gated_bottleneck=module.activation[name])
    return slot, dict(zip(gated_bottleneck_inputs(path), values, strict=True)), down.weight.shape[0]


def _with_prefix(adapter: AdapterTensors, model: nn.Module, out_dir: Path) -> AdapterTensors:
    """A hybrid adapter (MAM) with its KV-prefix part written beside its graph inputs."""
    if not has_kv_prefix(model, adapter.name):
        return adapter
    entry = export_kv_prefix(model, adapter.name, out_dir, source=adapter.source)
    return replace(adapter, prefix=entry)


def union_slots(
    model: nn.Module, adapters: list[AdapterTensors], lora_everywhere: bool = False
) -> dict[str, AdapterSlot]:
    """module -> slot exposing every kind any adapter puts there (plus LoRA everywhere)."""
    slots: dict[str, AdapterSlot] = {}
    if lora_everywhere:
        head = model.get_output_embeddings()
        for path, module in model.named_modules():
            if is_linear_like(module) and module is not head:
                slots[path] = AdapterSlot(path, *linear_features(module), lora=True)
    activations = {a.name: s.bottleneck for a in adapters for s in a.slots.values() if s.bottleneck}
    if len(set(activations.values())) > 1:
        raise ValueError(
            f"the bottleneck adapters use different activations ({activations}); one graph "
            "applies one: export them into separate folders"
        )
    for adapter in adapters:
        for path, slot in adapter.slots.items():
            slots[path] = slots[path].union(slot) if path in slots else slot
    return slots


def _description(adapter: AdapterTensors, layout) -> dict:
    return {
        "kind": adapter.kind,
        "peft_type": adapter.config["peft_type"],
        "source": adapter.source,
        "targets": adapter.targets(),
        "ranks": adapter.ranks,
        "scaling": adapter.scaling,
        "activation": next(
            (a for s in adapter.slots.values() if (a := s.bottleneck or s.gated_bottleneck)), None
        ),
        "config": adapter.config,
        # a hybrid's prefix part, beside this file: the runtime loads both as one adapter
        "kv_prefix": Path(adapter.prefix["file"]).name if adapter.prefix else None,
        # which graph inputs hold several modules, in row order: the file's layout
        "packed": {
            packed: [m for m, _ in members]
            for packed, members in layout.items()
            if any(m in adapter.slots for m, _ in members)
        },
    }


def _write(adapter: AdapterTensors, out_dir: Path, layout, graph_inputs, base_fingerprint: str):
    """Write the adapter's file into out_dir/adapters; returns its manifest entry."""
    written = write_adapter_file(
        out_dir / ADAPTER_DIR,
        adapter.name,
        pack_tensors(adapter.tensors, adapter.slots, layout),
        graph_inputs=graph_inputs,
        base_fingerprint=base_fingerprint,
        description=_description(adapter, layout),
    )
    return AdapterEntry(
        name=adapter.name,
        peft_type=adapter.config["peft_type"],
        source=adapter.source,
        fingerprint=base_fingerprint,
        kind=adapter.kind,
        rank=max(adapter.ranks.values(), default=None),
        targets=adapter.targets(),
        file=os.path.relpath(written.path, out_dir),
        sha256=written.sha256,
        prefix_file=adapter.prefix["file"] if adapter.prefix else None,
        num_virtual_tokens=adapter.prefix["num_virtual_tokens"] if adapter.prefix else None,
    )


def _builder(model: nn.Module, graph: str, weights: str, accuracy_level: int) -> str:
    """"fused" or "generic": the builder of the separate-mode base graph for `model`."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be 'auto', 'fused' or 'generic', got {graph!r}")
    if graph != "generic":
        declined = unsupported(model, weights, accuracy_level)
        if declined is None:
            return "fused"
        if graph == "fused":
            raise ValueError(f"no fused graph for this model: {declined}")
    if weights in BNB4_FORMATS:
        model_type = getattr(model.config, "model_type", None)
        raise ValueError(
            f"weights={weights!r} (exact bitsandbytes 4-bit, MatMulBnb4) needs the fused builder, "
            f"which {model_type!r} has not; export with weights='int4' instead"
        )
    return "generic"


@torch.no_grad()
def export_separate(
    model: nn.Module,
    adapters: Mapping[str, Path],
    out_dir: Path,
    *,
    weights: str,
    block_size: int,
    accuracy_level: int,
    max_context: int | None,
    tokenizer,
    base_fingerprint: str,
    progress: Progress | None = None,
    lora_everywhere: bool = False,
    graph: str = "auto",
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
    stream: LayerStream | None = None,
) -> None:
    """Write the base graph, one .onnx_adapter (+ sidecar) per adapter, and edgepeft.json.

    Args:
        model: The base (loaded, no adapters); adapters are loaded onto it one at a time
            and removed again, so it ends as it came.
        adapters: name -> adapter folder (edgepeft or HF peft).
        out_dir: The folder to fill (the caller's staging folder).
        weights, block_size, accuracy_level: As `export_fused`.
        max_context: Recorded in the manifest.
        tokenizer: Saved beside the graph when given.
        base_fingerprint: `edgepeft.fingerprint` of the base; bound into every file.
        progress: Called with one line per step.
        lora_everywhere: Also give every linear layer (not lm_head) rank-0 LoRA inputs, so
            LoRA adapters trained later over the same base load without a new base graph.
        graph: "auto" (fused where the architecture has a fused builder, else generic),
            "fused" or "generic" (the traced graph, any architecture).
        quantization: How int4/int8 weights are quantized (`export_fused`).
        stream: The LayerStream of a streamed `model` (`stream.skeleton`), for the fused builder.
    """
    say = progress or (lambda line: None)
    model_type = getattr(model.config, "model_type", None)
    builder = _builder(model, graph, weights, accuracy_level)
    out_dir = Path(out_dir)
    read: list[AdapterTensors] = []
    kv_prefixes: list[AdapterEntry] = []
    for i, (name, folder) in enumerate(adapters.items(), 1):
        say(f"[{i}/{len(adapters)}] reading adapter {name!r} from {folder}")
        load_adapter(model, folder, name=name)
        source = str(Path(folder).resolve())
        try:
            if list_adapters(model)[name].peft_type in KV_PREFIX_PEFT_TYPES:
                # Soft prompts and prefixes seed the KV cache: a file, no graph input.
                entry = export_kv_prefix(model, name, out_dir, source=source)
                fields = AdapterEntry.__dataclass_fields__
                kv_prefixes.append(AdapterEntry(**{k: v for k, v in entry.items() if k in fields}))
            else:
                read.append(_with_prefix(adapter_tensors(model, name, source), model, out_dir))
        finally:
            delete_adapter(model, name)
    slots = union_slots(model, read, lora_everywhere)
    blocks = {path: slot for path, slot in slots.items() if slot.parallel}
    if blocks and builder != "fused":
        raise ValueError(
            f"adapter(s) {sorted({a.name for a in read if set(a.slots) & set(blocks)})} put a "
            f"parallel adapter beside whole MLP blocks, which only the fused graph exposes; the "
            f"{model_type} export here is the traced (generic) graph: export with graph='fused' "
            "on an architecture that has it (llama, qwen, mistral, gemma, phi3)"
        )
    slots = {path: slot for path, slot in slots.items() if not slot.parallel}
    gated = sorted(a.name for a in read if a.kind == "unipelt")
    if gated and builder != "fused":
        raise ValueError(
            f"UniPELT adapter(s) {gated} gate their prefix inside every attention layer, which "
            f"only the fused graph exposes; the {model_type} export here is the traced (generic) "
            "graph: export them with graph='fused' on an architecture that has it (llama, qwen, "
            "mistral, gemma, phi3)"
        )
    tuned = sorted({p for a in read for p in a.parameters})
    if tuned and builder != "fused":
        raise ValueError(
            f"selective adapter(s) {sorted(a.name for a in read if a.parameters)} tune norm "
            f"weights and biases, which only the fused graph takes as inputs; the {model_type} "
            "export here is the traced (generic) graph: export them with mode='merged', or "
            "graph='fused' on an architecture that has it (llama, qwen, mistral, gemma, phi3)"
        )
    guard = {fingerprint_input(base_fingerprint): np.zeros(1, np.float32)}
    kwargs = dict(
        block_size=block_size,
        accuracy_level=accuracy_level,
        quantization=quantization,
        optional_inputs=guard,
    )
    if builder == "fused":
        slots = pack_slots(model, slots)
        say(f"building the {model_type} base graph ({weights}) with adapter inputs on {len(slots)} layers")
        info = export_fused(
            model,
            out_dir,
            weights,
            adapter_branches=slots,
            block_branches={path: slot.block for path, slot in blocks.items()},
            prefix_gates=bool(gated),
            tuned_parameters=tuned,
            stream=stream,
            calibration_ids=calibration_ids(tokenizer) if weights == "int4" else None,
            **kwargs,
        )
    else:  # traced: one slot per module, no packing
        say(f"tracing the {model_type} base graph ({weights}) with adapter inputs on {len(slots)} layers")
        info = export_generic(model, out_dir, weights, adapter_slots=slots, progress=say, **kwargs)
    slots.update(blocks)
    layout = packed_layout(slots)
    graph_inputs = optional_graph_inputs(info.path)
    entries = []
    for adapter in read:
        say(f"writing {ADAPTER_DIR}/{adapter.name}.onnx_adapter ({adapter.kind})")
        entries.append(_write(adapter, out_dir, layout, graph_inputs, base_fingerprint))
    entries.extend(kv_prefixes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    base = base_info(model)
    manifest = Manifest(
        base=base.name_or_path,
        base_fingerprint=base_fingerprint,
        base_quant=base.quant,
        model_type=model_type,
        graph=builder,
        block_size=block_size,
        accuracy_level=accuracy_level,
        max_context=max_context,
        mode="separate",
        adapters=entries,
        **graph_fields(info),
        **token_ids(model, tokenizer),
    )
    write_manifest(out_dir, manifest)
    say(f"separate export: base graph + {len(entries)} adapter file(s)")


@torch.no_grad()
def export_adapter(
    adapter_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    name: str | None = None,
    *,
    model: nn.Module | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
):
    """Add an adapter to an existing separate-mode export, without a new base graph.

        export_dir/edgepeft.json ─► base (folder + quant) ─► load_base, fingerprint checked
        adapter_dir ─► load_adapter (its recorded base checked) ─► tensors, packed as the
        graph packs them ─► adapters/<name>.onnx_adapter + .json ─► manifest entry

    Each file is written atomically, the manifest last, so it never lists a missing file.
    The graph must already have the adapter's inputs: export the base with
    `lora_everywhere=True` to take any LoRA trained later; DoRA, IA3 and bottleneck inputs
    exist only where an adapter of that kind was exported with the base. Prompt and prefix
    tuning adapters need no input (a KV-prefix file).

    Args:
        adapter_dir: The adapter folder (edgepeft or HF peft), trained on the export's base.
        export_dir: A folder written by `export(..., mode="separate")`.
        name: The adapter's name in the export (default: the folder's name).
        model: The base, already loaded (not changed); default: loaded from the manifest's
            `base` with its `base_quant`.
        overwrite: Replace an adapter of the same name.
        progress: Called with one line per step.

    Returns:
        The manifest's new AdapterEntry.
    """
    say = progress or (lambda line: None)
    adapter_dir, export_dir = Path(adapter_dir).expanduser(), Path(export_dir).expanduser()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist")
    name = name or adapter_dir.resolve().name
    if not name or "." in name or "/" in name:
        raise ValueError(f"adapter name {name!r} must be non-empty, without '.' or '/'")
    manifest = read_manifest(export_dir)
    if not isinstance(manifest, Manifest) or manifest.mode != "separate":
        raise ValueError(
            f"{export_dir} is not a separate-mode export (its graph has no adapter inputs); "
            "export the base with mode='separate' (and lora_everywhere=True for LoRA trained later)"
        )
    if any(a.name == name for a in manifest.adapters) and not overwrite:
        raise FileExistsError(
            f"{export_dir} already has an adapter named {name!r}; pass another name, or "
            "overwrite=True to replace it"
        )
    if model is None:
        say(f"loading base {manifest.base} (quant {manifest.base_quant})")
        try:
            model, _ = load_base(manifest.base, quant=manifest.base_quant)
        except OSError as e:
            raise FileNotFoundError(
                f"cannot load the base {manifest.base!r} that {export_dir} was exported from "
                f"({e}); pass it loaded as model="
            ) from e
    else:
        model = copy.deepcopy(model)  # the caller's model never gets the adapter
        for other in list(list_adapters(model)):  # the bare base: its own adapters stay out
            delete_adapter(model, other)
    found = fingerprint(model)
    if found != manifest.base_fingerprint:
        raise AdapterBaseMismatchError(
            f"{export_dir} was exported from base fingerprint {manifest.base_fingerprint}; the "
            f"base loaded now is {found}. Load it as at export time (quant {manifest.base_quant!r})"
        )
    say(f"reading adapter {name!r} from {adapter_dir}")
    load_adapter(model, adapter_dir, name=name)
    source = str(adapter_dir.resolve())
    try:
        if list_adapters(model)[name].peft_type in KV_PREFIX_PEFT_TYPES:
            fields = AdapterEntry.__dataclass_fields__
            entry = export_kv_prefix(model, name, export_dir, source=source)
            entry = AdapterEntry(**{k: v for k, v in entry.items() if k in fields})
        else:
            adapter = _with_prefix(adapter_tensors(model, name, source), model, export_dir)
            graph_inputs = optional_graph_inputs(export_dir / manifest.model_file)
            say(f"writing {ADAPTER_DIR}/{name}.onnx_adapter ({adapter.kind})")
            layout = graph_layout(model, graph_inputs)
            entry = _write(adapter, export_dir, layout, graph_inputs, manifest.base_fingerprint)
    finally:
        delete_adapter(model, name)
    others = [a for a in manifest.adapters if a.name != name]
    write_manifest(export_dir, replace(manifest, adapters=[*others, entry]))
    for old in manifest.adapters:  # replaced by a file of another kind: the old one goes
        if old.name == name and old.file and old.file != entry.file:
            stale = export_dir / old.file
            for path in (stale, stale.with_suffix(".json")):
                path.unlink(missing_ok=True)
    if manifest.files is not None:  # the new file's size and sha256 (and the stale gone)
        record_files(export_dir)
    say(f"added adapter {name!r} to {export_dir}")
    return entry


__all__ = ["AdapterTensors", "adapter_tensors", "export_adapter", "export_separate", "union_slots"]
