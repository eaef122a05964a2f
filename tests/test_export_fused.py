"""Fused ONNX decoder graphs: onnxruntime vs PyTorch, prefill + KV-cache decode, every format."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgepeft.export.fused import FUSED_MODEL_TYPES, export_fused
from edgepeft.export.graph_info import input_names, output_names
from edgepeft.export.onnx_graph import GraphBuilder
from edgepeft.export.weights import (
    RTN,
    dequantize_nbits,
    dequantize_packed,
    mixed_bits,
    quantize_nbits,
)
from edgepeft.tiny import TINY_VOCAB, tiny_model

ort = pytest.importorskip("onnxruntime")

ARCHS = sorted(FUSED_MODEL_TYPES)
DECODE_STEPS = 3


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batch(seed=0):
    """Two prompts of 9 tokens, the second left padded by 3; then tokens fed one at a time."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY_VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    ids[1, :3] = 0
    steps = [rng.integers(3, TINY_VOCAB, 2).astype(np.int64) for _ in range(DECODE_STEPS)]
    return ids, mask, steps


def _empty_past(info, batch):
    dtype = np.float16 if info.kv_dtype == "float16" else np.float32
    shape = (batch, info.num_kv_heads, 0, info.head_dim)
    return {
        f"past_key_values.{i}.{kind}": np.zeros(shape, dtype)
        for i in range(info.num_layers)
        for kind in ("key", "value")
    }


def _feed_back(out, tokens, mask):
    """Next step's feed: one new token per row, the mask grown by one, presents as pasts."""
    mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
    pasts = {n.replace("present", "past_key_values"): v for n, v in out.items() if n != "logits"}
    return {"input_ids": tokens[:, None].astype(np.int64), "attention_mask": mask, **pasts}


def _run_ort(info, ids, mask, steps):
    """Logits of the prefill (B, T, V), then of each decode step (B, 1, V), presents fed back."""
    session = _session(info.path)
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": mask, **_empty_past(info, len(ids))}
    logits = []
    for step in [*steps, None]:
        out = dict(zip(names, session.run(None, feed), strict=True))
        total = feed["attention_mask"].shape[1]
        assert out["present.0.key"].shape == (len(ids), info.num_kv_heads, total, info.head_dim)
        logits.append(out["logits"])
        if step is not None:
            feed = _feed_back(out, step, feed["attention_mask"])
    return logits


@torch.no_grad()
def _run_torch(model, ids, mask, steps):
    """The same logits from PyTorch, full recompute with generate's positions (cumsum(mask) - 1)."""
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    logits = []
    for step in [None, *steps]:
        if step is not None:
            ids = torch.cat([ids, torch.from_numpy(step)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
        logits.append(out.float().numpy() if step is None else out[:, -1:].float().numpy())
    return logits


def _max_diff(ort_logits, torch_logits, mask):
    valid = mask.astype(bool)  # padded positions carry no meaning
    prefill = np.abs(ort_logits[0] - torch_logits[0])[valid].max()
    decode = max(np.abs(a - b).max() for a, b in zip(ort_logits[1:], torch_logits[1:], strict=True))
    return float(max(prefill, decode))


def _parity(model, tmp_path, weights="fp32", **kwargs):
    info = export_fused(model, tmp_path, weights, **kwargs)
    ids, mask, steps = _batch()
    return info, _max_diff(
        _run_ort(info, ids, mask, steps), _run_torch(model, ids, mask, steps), mask
    )


def _initializers(info) -> dict[str, np.ndarray]:
    graph = onnx.load(str(info.path)).graph  # reads model.onnx.data beside it
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


# ---------------------------------------------------------------- fp32 parity


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_and_greedy_tokens_match_pytorch(arch, tmp_path):
    model = tiny_model(arch)
    info, diff = _parity(model, tmp_path, "fp32")
    print(f"{arch} fp32: max |ORT - torch| = {diff:.2e}, {info.num_nodes} nodes")
    assert diff <= 1e-4

    ids, mask, _ = _batch(seed=1)
    expected = model.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
    session = _session(info.path)
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": mask, **_empty_past(info, len(ids))}
    tokens = []
    for _ in range(10):
        out = dict(zip(names, session.run(None, feed), strict=True))
        tokens.append(out["logits"][:, -1].argmax(-1))
        feed = _feed_back(out, tokens[-1], feed["attention_mask"])
    np.testing.assert_array_equal(np.stack(tokens, axis=1), expected)


FEATURES = {
    "mistral-sliding-window": ("mistral", dict(sliding_window=4)),
    "qwen2-sliding-layer": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "gemma2-sliding-window": ("gemma2", dict(sliding_window=4)),
    "gemma3-local-global": (
        "gemma3_text",
        dict(sliding_window=4, num_hidden_layers=3, sliding_window_pattern=2),
    ),
    "phi3-partial-rotary": (
        "phi3",
        dict(hidden_size=128, partial_rotary_factor=0.5, sliding_window=5),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            }
        ),
    ),
    "llama-rope-linear": (
        "llama",
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(FEATURES))
def test_fp32_features_match_pytorch(case, tmp_path):
    arch, overrides = FEATURES[case]
    info, diff = _parity(tiny_model(arch, **overrides), tmp_path, "fp32")
    print(f"{case}: max |ORT - torch| = {diff:.2e}")
    assert diff <= 1e-4


def test_sliding_window_is_exercised():
    """The 12-token test sequences reach past a window of 4: the window changes PyTorch's logits."""
    ids, mask, steps = _batch()
    windowed = _run_torch(tiny_model("mistral", sliding_window=4), ids, mask, steps)
    full = _run_torch(tiny_model("mistral"), ids, mask, steps)
    assert np.abs(windowed[-1] - full[-1]).max() > 1e-3


def test_lora_targets_keep_projections_apart(tmp_path):
    model = tiny_model("llama")
    info, diff = _parity(
        model, tmp_path, "fp32", lora_targets=["q_proj", "model.layers.1.mlp.up_proj"]
    )
    assert diff <= 1e-4
    names = set(_initializers(info))
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.weight" in names
    assert "model.layers.0.self_attn.qkv_proj.weight" not in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names  # no target in layer 0's MLP
    assert {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"} <= names


def test_bitsandbytes_base_exports_its_dequantized_weights(tiny_dir, tmp_path):
    from edgepeft.base import load_base

    model, _ = load_base(tiny_dir("llama"), quant="nf4", device="cpu")
    info, diff = _parity(model, tmp_path, "fp32")
    print(f"llama nf4 base, fp32 graph: max |ORT - torch| = {diff:.2e}")
    assert diff <= 1e-4


# ---------------------------------------------------------------- graph shape


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_llama_graph_is_fused(weights, tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    info = export_fused(model, tmp_path, weights)
    graph = onnx.load(str(info.path), load_external_data=False).graph
    per_layer = [sum(n.name.startswith(f"model.layers.{i}.") for n in graph.node) for i in range(4)]
    print(f"llama {weights}: {info.num_nodes} nodes, per layer {per_layer}, {info.op_counts}")
    assert max(per_layer) < 15
    assert info.num_nodes == len(graph.node) < 15 * 4 + 20
    assert info.op_counts["GroupQueryAttention"] == 4
    matmul = "MatMulNBits" if weights == "int4" else "MatMul"
    assert info.op_counts[matmul] == 4 * 4 + 1  # qkv, o, gate_up, down; lm_head
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.vocab_size) == (
        4,
        2,
        16,
        TINY_VOCAB,
    )
    assert info.path.with_name("model.onnx.data").exists()
    assert [i.name for i in graph.input] == input_names(4)
    assert [o.name for o in graph.output] == output_names(4)


def test_refuses_what_it_cannot_fuse(tmp_path):
    with pytest.raises(NotImplementedError, match="generic exporter"):
        export_fused(tiny_model("gpt2"), tmp_path)
    with pytest.raises(ValueError, match="weights must be one of"):
        export_fused(tiny_model("llama"), tmp_path, "int3")
    with pytest.raises(ValueError, match="block_size"):
        export_fused(tiny_model("llama"), tmp_path, "int4", block_size=24)
    dynamic = tiny_model(
        "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    with pytest.raises(NotImplementedError, match="rescales with the sequence length"):
        export_fused(dynamic, tmp_path, "fp32")
    assert not (tmp_path / "model.onnx").exists()


# ---------------------------------------------------------------- quantized and fp16


def _with_onnx_weights(model, info):
    """A copy of `model` whose linear layers hold the dequantized MatMulNBits initializers."""
    ref = copy.deepcopy(model)
    inits = _initializers(info)
    graph = onnx.load(str(info.path), load_external_data=False).graph
    with torch.no_grad():
        for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: a.i for a in node.attribute}
            name = node.input[1].rsplit(".weight.q", 1)[0]  # "<module>.weight.q4" -> "<module>"
            assert node.input[2] == f"{name}.weight.scales"
            zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
            w = torch.from_numpy(
                dequantize_nbits(
                    inits[node.input[1]],
                    inits[node.input[2]],
                    inits[zero_points] if zero_points else None,
                    attrs["bits"],
                    attrs["block_size"],
                    attrs["K"],
                )
            )
            parent_name, _, leaf = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            if leaf in ("qkv_proj", "gate_up_proj") and not hasattr(
                parent, leaf
            ):  # packed siblings
                parts = (
                    ("q_proj", "k_proj", "v_proj")
                    if leaf == "qkv_proj"
                    else ("gate_proj", "up_proj")
                )
                rows = [getattr(parent, part).out_features for part in parts]
                for part, chunk in zip(parts, torch.split(w, rows), strict=True):
                    getattr(parent, part).weight.copy_(chunk)
            elif name == "lm_head":
                if ref.lm_head.weight is ref.get_input_embeddings().weight:
                    # Tied: the graph looks rows up in the same int4 table as the head.
                    ref.get_input_embeddings().weight.copy_(w)
                else:
                    ref.lm_head.weight = torch.nn.Parameter(w)
            else:
                getattr(parent, leaf).weight.copy_(w)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_matches_pytorch_on_the_packed_weights(arch, tmp_path):
    model = tiny_model(arch)
    info = export_fused(model, tmp_path, "int4", block_size=32, accuracy_level=0)
    ref = _with_onnx_weights(model, info)
    ids, mask, steps = _batch()
    diff = _max_diff(_run_ort(info, ids, mask, steps), _run_torch(ref, ids, mask, steps), mask)
    print(f"{arch} int4 (accuracy_level 0): max |ORT - torch(dequantized)| = {diff:.2e}")
    assert diff <= 1e-3


def _module_weight(model, name: str) -> np.ndarray:
    """The fp32 (out, in) weight the graph's projection `name` holds (packed: concatenated)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf in ("qkv_proj", "gate_up_proj") and not hasattr(parent, leaf):
        parts = ("q_proj", "k_proj", "v_proj") if leaf == "qkv_proj" else ("gate_proj", "up_proj")
        return torch.cat([getattr(parent, p).weight for p in parts]).detach().numpy()
    return model.get_submodule(name).weight.detach().numpy()


def _nbits_nodes(info) -> dict[str, onnx.NodeProto]:
    """module name -> its MatMulNBits node."""
    graph = onnx.load(str(info.path), load_external_data=False).graph
    return {
        n.input[1].rsplit(".weight.q", 1)[0]: n for n in graph.node if n.op_type == "MatMulNBits"
    }


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_default_int4_has_zero_points_and_int8_where_mixed_bits_says(arch, tmp_path):
    """The default recipe: int4 "search" with uint8 zero points, int8 (symmetric, no zero
    points) for the tensors `mixed_bits` names (a packed q|k|v: int8 when v_proj is); ORT
    equals PyTorch on the graph's own dequantized weights. Three layers: layer 2's
    down_proj is one of mixed_bits' int8."""
    model = tiny_model(arch, num_hidden_layers=3)
    info = export_fused(model, tmp_path, "int4", accuracy_level=0)
    nodes = _nbits_nodes(info)
    bits = {name: {a.name: a.i for a in n.attribute}["bits"] for name, n in nodes.items()}
    for name, node in nodes.items():
        parent, _, leaf = name.rpartition(".")
        members = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        expected = max(mixed_bits(f"{parent}.{m}", 3) for m in members.get(leaf, (leaf,)))
        assert bits[name] == expected, name
        has_zero_points = len(node.input) > 3 and node.input[3] == f"{name}.weight.zero_points"
        assert has_zero_points == (expected == 4), name
    assert bits["model.layers.2.mlp.down_proj"] == 8 and bits["model.layers.1.mlp.down_proj"] == 4
    assert len(nodes) == 3 * 4 + 1  # packing as in every format
    assert info.quantization["int8_tensors"] == sorted(n for n, b in bits.items() if b == 8)
    assert info.quantization["int4_tensors"] == sum(b == 4 for b in bits.values())
    ref = _with_onnx_weights(model, info)
    ids, mask, steps = _batch()
    diff = _max_diff(_run_ort(info, ids, mask, steps), _run_torch(ref, ids, mask, steps), mask)
    print(f"{arch} int4 default recipe: max |ORT - torch(dequantized)| = {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_rtn_recipe_is_the_symmetric_rtn_format(tied, tmp_path):
    """weights.RTN (--int4-method rtn --no-mixed-precision) stores what the exporter always
    stored: every projection packed, int4, symmetric RTN bytes, no zero points."""
    model = tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=tied)
    info = export_fused(model, tmp_path, "int4", quantization=RTN)
    inits = _initializers(info)
    nodes = _nbits_nodes(info)
    assert len(nodes) == 3 * 4 + 1
    for name, node in nodes.items():
        assert len(node.input) == 3 and {a.name: a.i for a in node.attribute}["bits"] == 4
        expected = quantize_nbits(_module_weight(model, name), 4, 32, symmetric=True)
        np.testing.assert_array_equal(inits[f"{name}.weight.q4"], expected.codes)
        np.testing.assert_array_equal(inits[f"{name}.weight.scales"], expected.scales)
    assert info.quantization == {
        "method": "rtn",
        "symmetric": True,
        "mixed": False,
        "float_zero_points": False,
        "activation_aware": False,
        "int8_tensors": [],
        "int4_tensors": len(nodes),
    }


@pytest.mark.parametrize(("weights", "block_size"), [("int8", 32), ("int4", 64)])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_nbits_accuracy_levels(weights, block_size, accuracy_level, tmp_path):
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: a looser, measured bound."""
    model = tiny_model("qwen2")  # q/k/v biases ride in MatMulNBits' bias input
    info = export_fused(
        model, tmp_path, weights, block_size=block_size, accuracy_level=accuracy_level
    )
    assert info.op_counts["MatMulNBits"] == 2 * 4 + 1
    ref = _with_onnx_weights(model, info)
    ids, mask, steps = _batch()
    diff = _max_diff(_run_ort(info, ids, mask, steps), _run_torch(ref, ids, mask, steps), mask)
    print(
        f"qwen2 {weights} accuracy_level {accuracy_level}: max |ORT - torch(dequantized)| = {diff:.2e}"
    )
    assert diff <= (1e-3 if accuracy_level == 0 else 3e-2)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fp16_is_close_to_fp32_pytorch(arch, tmp_path):
    model = tiny_model(arch)
    info, diff = _parity(model, tmp_path, "fp16")
    print(f"{arch} fp16: max |ORT fp16 - torch fp32| = {diff:.2e}")
    assert info.kv_dtype == "float16"
    assert diff <= 2e-2


# ---------------------------------------------------------------- weight packing


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_is_onnxruntimes_byte_for_byte(bits, symmetric):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rng = np.random.default_rng(bits)
    # k fills no whole block. (For odd k onnxruntime fills the unused half of the last byte
    # with an arbitrary code that MatMulNBits never reads; ours is 0 there.)
    k, n, block = 80, 24, 32
    weight = rng.standard_normal((n, k)).astype(np.float32)
    weight[0, :32] = np.arange(32) - 16  # exact .5 ties after scaling: roundf, not round-half-even
    weight[1, :32] = 0  # an all-zero block
    ours = quantize_nbits(weight, bits, block, symmetric=symmetric)

    k_blocks = 3
    codes = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zeros = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    padded = np.zeros((k_blocks * block, n), np.float32)
    padded[:k] = weight.T
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    # called as MatMulNBitsQuantizer's default RTN calls it (qbits_block_quant)
    quantize(codes, padded, scales, zeros, block, n, k, symmetric)

    np.testing.assert_array_equal(ours.codes, codes)
    np.testing.assert_array_equal(ours.scales, scales)
    if symmetric:
        assert ours.zero_points is None
    else:
        np.testing.assert_array_equal(ours.zero_points, zeros)
    error = np.abs(dequantize_packed(ours) - weight)[:, 32:].max()
    assert 0 < error <= np.abs(weight).max() / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_nbits_is_what_matmulnbits_computes(symmetric):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 80)).astype(np.float32)
    packed = quantize_nbits(weight, 4, 16, symmetric=symmetric)
    b = GraphBuilder("one-matmul")
    b.input("x", np.float32, [3, 80])
    inputs = ["x", b.initializer("w_Q4", packed.codes), b.initializer("w_scales", packed.scales)]
    if not symmetric:
        inputs.append(b.initializer("w_zero_points", packed.zero_points))
    b.node(
        "MatMulNBits",
        inputs,
        name="m",
        domain="com.microsoft",
        K=80,
        N=24,
        bits=4,
        block_size=16,
        accuracy_level=0,
        output_names=["y"],
    )
    b.output("y", np.float32, [3, 24])
    session = ort.InferenceSession(
        b.model({"": 21, "com.microsoft": 1}).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    x = rng.standard_normal((3, 80)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_packed(packed).T, atol=1e-5)


def test_chunked_prefill_continues_a_cache(tmp_path):
    """A prompt fed in two chunks over the cache gives the one-shot logits (batch size 1)."""
    model = tiny_model("qwen3")
    info = export_fused(model, tmp_path, "fp32")
    session = _session(info.path)
    names = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, (1, 10)).astype(np.int64)
    feed = {"input_ids": ids[:, :6], "attention_mask": np.ones((1, 6), np.int64)}
    first = dict(zip(names, session.run(None, {**feed, **_empty_past(info, 1)}), strict=True))
    pasts = {n.replace("present", "past_key_values"): v for n, v in first.items() if n != "logits"}
    feed = {"input_ids": ids[:, 6:], "attention_mask": np.ones((1, 10), np.int64), **pasts}
    second = dict(zip(names, session.run(None, feed), strict=True))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(second["logits"] - expected[:, 6:]).max() <= 1e-4
