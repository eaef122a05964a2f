"""Packed adapter branches (q|k|v, gate|up) in separate mode, lora_everywhere, export_adapter.

    packing      pack_tensors: x A_packed B_blockdiag == each module's own x A B, side by side
    graph        separate int4 keeps the fused graph's packed MatMulNBits: one branch per group
    parity       qwen3 (q/k norms after the packed split), ranks differing per module and
                 per adapter, DoRA: ORT fp32 == PyTorch; unpackable kinds keep a group apart
    later        export(lora_everywhere=True) ─► a LoRA trained afterwards ─► export_adapter
                 ─► loads in the same base graph, == PyTorch; its refusals
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export_separate import _activate, _diff, _manifest, _run_ort, _run_torch, _session

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.cli import main
from edgepeft.config import BottleneckConfig, IA3Config, LoraConfig, PromptTuningConfig
from edgepeft.export import api
from edgepeft.export.adapter_files import (
    AdapterBaseMismatchError,
    optional_graph_inputs,
    write_adapter_file,
)
from edgepeft.export.adapter_slots import AdapterSlot
from edgepeft.export.packed_adapters import pack_tensors
from edgepeft.export.separate import export_adapter

ort = pytest.importorskip("onnxruntime")

QKV = "model.layers.0.self_attn.qkv_proj"
Q, K, V = (f"model.layers.0.self_attn.{m}_proj" for m in "qkv")


def _export(base_dir, out, folders, **kwargs):
    kwargs = {"weights": "fp32", "mode": "separate", "verify": False, "quiet": True, **kwargs}
    return api.export(base_dir, out, adapters=folders, **kwargs)


def _adapters(base_dir, root, configs, quant="nf4", seed=0):
    model, _ = load_base(base_dir, quant=quant)
    torch.manual_seed(seed)
    folders = {}
    for name, config in configs.items():
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / name, name)
    return model, folders


def _check_parity(model, out, names, tolerance=1e-4):
    session, manifest = _session(out / "model.onnx"), _manifest(out)
    diffs = {}
    for name in names:
        options, adapter = _activate(out / "adapters" / f"{name}.onnx_adapter", out)
        set_adapter(model, name)
        diffs[name] = _diff(_run_ort(session, manifest, options), _run_torch(model))
    set_adapter(model, None)
    return diffs


# ---------------------------------------------------------------- packing, numerically


def test_packed_tensors_give_each_module_its_own_update():
    rng = np.random.default_rng(0)
    n_in, sizes, ranks = 8, {Q: 8, K: 4, V: 4}, {Q: 3, V: 2}  # k_proj not adapted
    tensors, slots = {}, {}
    for module, r in ranks.items():
        tensors[f"{module}.lora_A"] = rng.standard_normal((n_in, r)).astype(np.float32)
        tensors[f"{module}.lora_B"] = rng.standard_normal((r, sizes[module])).astype(np.float32)
        tensors[f"{module}.dora_scale"] = rng.uniform(0.5, 1.5, sizes[module]).astype(np.float32)
        slots[module] = AdapterSlot(module, n_in, sizes[module], lora=True, dora=True)
    tensors["model.layers.0.self_attn.o_proj.lora_A"] = np.ones((8, 1), np.float32)  # not packed
    layout = {QKV: tuple(sizes.items())}
    packed = pack_tensors(tensors, slots, layout)
    assert sorted(packed) == sorted(
        [f"{QKV}.lora_A", f"{QKV}.lora_B", f"{QKV}.dora_scale", "model.layers.0.self_attn.o_proj.lora_A"]
    )
    assert packed[f"{QKV}.lora_A"].shape == (8, 5) and packed[f"{QKV}.lora_B"].shape == (5, 16)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    got = x @ packed[f"{QKV}.lora_A"] @ packed[f"{QKV}.lora_B"]  # (3, q+k+v)
    want = np.concatenate(
        [x @ tensors[f"{Q}.lora_A"] @ tensors[f"{Q}.lora_B"], np.zeros((3, 4), np.float32),
         x @ tensors[f"{V}.lora_A"] @ tensors[f"{V}.lora_B"]], axis=1,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    scale = packed[f"{QKV}.dora_scale"]
    assert np.array_equal(scale[8:12], np.ones(4, np.float32))  # k_proj: identity
    assert np.array_equal(scale[12:], tensors[f"{V}.dora_scale"])

    side = {Q: AdapterSlot(Q, n_in, 8, ia3="input")}
    with pytest.raises(ValueError, match="packs .*q_proj into .*qkv_proj.*input-side IA3"):
        pack_tensors({f"{Q}.ia3_scale": np.ones(8, np.float32)}, side, layout)


# ---------------------------------------------------------------- the graph


def test_separate_int4_keeps_the_base_packed(tiny_dir, tmp_path):
    base_dir = tiny_dir("llama")
    _, folders = _adapters(base_dir, tmp_path, {
        "all": LoraConfig(r=4, init="random", target_modules="all-linear"),
    }, quant="none")
    fused = api.export(base_dir, tmp_path / "fused", weights="int4", verify=False, quiet=True)
    separate = _export(base_dir, tmp_path / "sep", folders, weights="int4")
    base_ops, ops = fused.manifest.op_counts, separate.manifest.op_counts
    layers = separate.manifest.num_layers
    # every projection's base matmul as in the fused graph: qkv and gate_up stay one each
    assert ops["MatMulNBits"] == base_ops["MatMulNBits"] == 4 * layers + 1
    # one LoRA branch (2 MatMul, the row-mask Mul, Add) per packed or single projection: 4
    # per layer; and where an adapter reads a channel-scaled input (q|k|v, gate|up, down),
    # the base matmul gets Mul(x, 1/s) instead of the norm folding the fused graph does
    assert ops["MatMul"] - base_ops.get("MatMul", 0) == 2 * 4 * layers
    assert ops["Mul"] - base_ops["Mul"] == 4 * layers + 3 * layers
    assert separate.manifest.num_nodes - fused.manifest.num_nodes == 4 * 4 * layers + 3 * layers
    inputs = optional_graph_inputs(tmp_path / "sep" / "model.onnx")
    assert {f"{QKV}.lora_A", "model.layers.0.mlp.gate_up_proj.lora_B"} <= set(inputs)
    assert f"{Q}.lora_A" not in inputs
    sidecar = json.loads((tmp_path / "sep/adapters/all.json").read_text())
    assert sidecar["format_version"] == 2
    assert sidecar["packed"][QKV] == [Q, K, V]
    assert sidecar["ranks"][Q] == 4 and Q in sidecar["targets"]


def test_qwen3_packed_lora_and_dora_match_pytorch(tiny_dir, tmp_path):
    """q/k norms read the packed output through a Split; ranks differ per module and adapter."""
    model, folders = _adapters(tiny_dir("qwen3"), tmp_path / "src", {
        "lora": LoraConfig(r=6, alpha=12, init="random", target_modules="all-linear",
                           rank_pattern={"k_proj": 2, "up_proj": 3}),
        "dora": LoraConfig(r=2, alpha=4, init="random", use_dora=True, target_modules=("k_proj", "v_proj", "gate_proj")),
        "ia3": IA3Config(init="random", target_modules=("q_proj", "up_proj"), feedforward_modules=()),
    })
    with torch.no_grad():  # random init leaves DoRA's m = ||W + sBA||: move it
        for module in model.modules():
            if "dora" in getattr(module, "lora_magnitude_vector", {}):
                module.lora_magnitude_vector["dora"].mul_(1.2)
    folders["dora"] = save_adapter(model, tmp_path / "src" / "dora2", "dora")
    out = tmp_path / "out"
    _export(tiny_dir("qwen3"), out, folders)
    inputs = optional_graph_inputs(out / "model.onnx")
    assert "model.layers.1.self_attn.qkv_proj.dora_scale" in inputs
    assert "model.layers.1.mlp.gate_up_proj.ia3_scale" in inputs
    diffs = _check_parity(model, out, folders)
    print("qwen3 packed separate fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-4


def test_unpackable_kinds_keep_their_group_apart(tiny_dir, tmp_path):
    """A bottleneck on q_proj and IA3 on up_proj's input need those modules alone."""
    model, folders = _adapters(tiny_dir("llama"), tmp_path / "src", {
        "lora": LoraConfig(r=4, init="random", target_modules="all-linear"),
        "bottleneck": BottleneckConfig(target_modules=("q_proj",), activation="relu", init="random"),
        "ia3": IA3Config(init="random", target_modules=("up_proj", "k_proj"), feedforward_modules=("up_proj",)),
    })
    out = tmp_path / "out"
    _export(tiny_dir("llama"), out, folders)
    inputs = optional_graph_inputs(out / "model.onnx")
    assert {f"{Q}.lora_A", f"{K}.ia3_scale", "model.layers.0.mlp.up_proj.ia3_scale"} <= set(inputs)
    assert not any(".qkv_proj." in k or ".gate_up_proj." in k for k in inputs)
    diffs = _check_parity(model, out, folders)
    print("llama unpacked groups fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-4


# ---------------------------------------------------------------- adapters trained later


@pytest.fixture(scope="module")
def everywhere(tiny_dir, tmp_path_factory):
    """An NF4 llama base exported alone with lora_everywhere, through the CLI."""
    out = tmp_path_factory.mktemp("everywhere") / "out"
    assert main(["export", "--base", str(tiny_dir("llama")), "--out", str(out), "--quant", "nf4",
                 "--weights", "fp32", "--mode", "separate", "--lora-everywhere", "--quiet"]) == 0
    return out


def test_lora_everywhere_then_export_adapter_matches_pytorch(everywhere, tiny_dir, tmp_path):
    manifest = _manifest(everywhere)
    assert manifest["mode"] == "separate" and manifest["adapters"] == []
    inputs = optional_graph_inputs(everywhere / "model.onnx")
    assert f"{QKV}.lora_A" in inputs and "model.layers.1.mlp.down_proj.lora_B" in inputs
    assert not any(k.startswith("lm_head.") for k in inputs)

    # trained after the export, over the same NF4 base, ranks differing per module
    model, folders = _adapters(tiny_dir("llama"), tmp_path, {
        "late": LoraConfig(r=3, init="random", target_modules=("v_proj", "up_proj", "o_proj"),
                           rank_pattern={"up_proj": 5}),
    }, seed=3)
    entry = export_adapter(folders["late"], everywhere)
    assert (entry.name, entry.kind, entry.rank, entry.file) == ("late", "lora", 5, "adapters/late.onnx_adapter")
    assert [a["name"] for a in _manifest(everywhere)["adapters"]] == ["late"]
    diffs = _check_parity(model, everywhere, ["late"])
    print(f"llama LoRA trained after a lora_everywhere export, export_adapter: {diffs['late']:.1e}")
    assert diffs["late"] <= 1e-4
    session, no_adapter = _session(everywhere / "model.onnx"), _run_torch(model)
    assert _diff(_run_ort(session, manifest), no_adapter) <= 1e-4  # nothing fed: the base

    with pytest.raises(FileExistsError, match="already has an adapter named 'late'"):
        export_adapter(folders["late"], everywhere)
    export_adapter(folders["late"], everywhere, overwrite=True, model=model)  # loaded base
    assert len(_manifest(everywhere)["adapters"]) == 1
    # a soft prompt needs no graph input: a KV-prefix file beside the others
    _, soft = _adapters(tiny_dir("llama"), tmp_path, {"soft": PromptTuningConfig(num_virtual_tokens=3)})
    entry = export_adapter(soft["soft"], everywhere, model=model)
    assert entry.kind == "kv_prefix" and (everywhere / entry.file).is_file()
    assert [a["name"] for a in _manifest(everywhere)["adapters"]] == ["late", "soft"]


def test_export_adapter_refusals(everywhere, tiny_dir, tmp_path):
    model, folders = _adapters(tiny_dir("llama"), tmp_path / "src", {
        "dora": LoraConfig(r=2, init="random", use_dora=True),
    })
    before = _manifest(everywhere)
    with pytest.raises(ValueError, match="dora_scale"):  # the graph has LoRA inputs only
        export_adapter(folders["dora"], everywhere)
    other, _ = load_base(tiny_dir("qwen2"))
    with pytest.raises(AdapterBaseMismatchError, match=before["base_fingerprint"]):
        export_adapter(folders["dora"], everywhere, model=other)
    merged = api.export(tiny_dir("llama"), tmp_path / "plain", weights="fp32", verify=False, quiet=True)
    with pytest.raises(ValueError, match="not a separate-mode export.*lora_everywhere"):
        export_adapter(folders["dora"], merged.out_dir)
    with pytest.raises(ValueError, match="lora_everywhere=True needs mode='separate'"):
        api.export(tiny_dir("llama"), tmp_path / "x", weights="fp32", mode="merged", lora_everywhere=True)
    assert _manifest(everywhere) == before and not (everywhere / "adapters" / "dora.onnx_adapter").exists()
    # per-module tensors on a packed graph: the error says how to pack them
    q = {f"{Q}.lora_A": np.zeros((64, 2), np.float32), f"{Q}.lora_B": np.zeros((2, 64), np.float32)}
    with pytest.raises(ValueError, match="packs .*q_proj into .*qkv_proj.*pack_tensors"):
        write_adapter_file(tmp_path, "q", q, graph_inputs=optional_graph_inputs(everywhere / "model.onnx"),
                           base_fingerprint=before["base_fingerprint"])
