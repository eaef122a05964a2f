"""Exact NF4/FP4 export: bitsandbytes' own codes through com.microsoft.MatMulBnb4.

    one layer     quantize_linears(nf4|fp4, ±double quant) ─ from_layer ─ MatMulBnb4
                  vs the bnb layer's forward (<= 1e-5) and bnb's dequantize_4bit (exact)
    whole model   NF4/FP4 base (llama, qwen2) ─ export(weights=base's type) ─ ORT
                  vs the PyTorch bnb model: logits <= 1e-3 (measured ~1e-6), greedy equal,
                  the graph's code bytes == the layers' stored bytes
    fallbacks     unquantized base: bnb-quantized at export, same codes load_base stores;
                  no fused builder, partial blocks: clear errors
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import edgepeft
from edgepeft.base import quantize_linears
from edgepeft.export.api import export
from edgepeft.export.bnb4 import dequantize_bnb4, emit_matmul, from_layer, quantize_bnb4
from edgepeft.export.fused import OPSETS
from edgepeft.export.graph_info import input_names
from edgepeft.export.manifest import read_manifest
from edgepeft.export.onnx_graph import GraphBuilder

LAYER_TOL = 1e-5
MODEL_TOL = 1e-3


def _bnb():
    import bitsandbytes as bnb

    return bnb


def quantized_layer(quant: str, double_quant: bool, bias: bool = True, seed: int = 0):
    """A bnb Linear4bit (in 128, out 96) made the way load_base makes them."""
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(128, 96, bias=bias))
    quantize_linears(holder, quant, double_quant=double_quant)
    return holder[0].eval()


def layer_session(packed, bias: np.ndarray | None) -> ort.InferenceSession:
    b = GraphBuilder("one-layer")
    x = b.input("x", np.float32, ["batch", "seq", packed.shape[1]])
    bias_name = b.initializer("layer.bias", bias) if bias is not None else ""
    y = emit_matmul(b, x, "layer", packed, bias_name)
    b.rename(y, "y")
    b.output("y", np.float32, ["batch", "seq", packed.shape[0]])
    return ort.InferenceSession(
        b.model(OPSETS).SerializeToString(), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_one_layer_matches_the_bnb_forward(quant, double_quant):
    layer = quantized_layer(quant, double_quant)
    packed = from_layer(layer, "layer")
    assert packed.exact and packed.quant_type == quant and packed.shape == (96, 128)
    assert packed.codes.dtype == np.uint8 and packed.codes.shape == (96 * 128 // 2,)
    assert packed.absmax.dtype == np.float32 and packed.absmax.shape == (96 * 128 // 64,)

    # The op's decoding (high nibble first, flat blocks) is bnb's own, value for value.
    state = layer.weight.quant_state
    want = _bnb().functional.dequantize_4bit(layer.weight.data, state)
    np.testing.assert_array_equal(dequantize_bnb4(packed), want.numpy())

    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = layer(x).numpy()  # (2, 5, 96), bitsandbytes' CPU kernel
    session = layer_session(packed, layer.bias.detach().numpy())
    (got,) = session.run(None, {"x": x.numpy()})
    assert np.abs(got - reference).max() <= LAYER_TOL


def test_codes_are_read_in_the_standard_layout_after_a_cpu_repack():
    """A layer bnb repacks at its first forward (AVX512-BF16 CPUs) gives the same codes."""
    bnb = _bnb()
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()  # bnb's default: may repack, as transformers' layers do
    before = from_layer(layer)
    with torch.no_grad():
        layer(torch.randn(3, 128))
    after = from_layer(layer)
    np.testing.assert_array_equal(after.codes, before.codes)
    # A repacked layer keeps its absmax in bf16 and computes with that.
    np.testing.assert_allclose(after.absmax, before.absmax, rtol=2**-7)


def test_export_time_quantization_is_what_load_base_stores():
    """An unquantized weight is quantized by bitsandbytes exactly as a nf4 base holds it."""
    layer = quantized_layer("nf4", double_quant=False, bias=False)
    torch.manual_seed(0)
    weight = nn.Linear(128, 96, bias=False).weight.detach()  # the same seed, unquantized
    packed = quantize_bnb4(weight, "nf4")
    stored = from_layer(layer)
    assert not packed.exact
    np.testing.assert_array_equal(packed.codes, stored.codes)
    np.testing.assert_array_equal(packed.absmax, stored.absmax)


def test_partial_blocks_are_refused():
    with pytest.raises(ValueError, match=r"in_features 96 is not a multiple .* 64.*int4"):
        quantize_bnb4(torch.randn(32, 96), "nf4", name="model.layers.0.mlp.down_proj")


# ---------------------------------------------------------------- whole models


def ort_greedy(folder, ids: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits (B, T, V), greedy tokens (B, steps)) from the exported graph."""
    manifest = read_manifest(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    shape = (ids.shape[0], manifest.num_kv_heads, 0, manifest.head_dim)
    past = [np.zeros(shape, np.float32) for _ in range(2 * manifest.num_layers)]
    mask = np.ones_like(ids)
    names = input_names(manifest.num_layers)
    logits, *past = session.run(None, dict(zip(names, [ids, mask, *past], strict=True)))
    prefill, tokens = logits, []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        tokens.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, *past = session.run(None, dict(zip(names, [token, mask, *past], strict=True)))
    return prefill, np.concatenate(tokens, axis=1)


@pytest.mark.parametrize(
    "arch, quant", [("llama", "nf4"), ("qwen2", "nf4"), ("llama", "fp4")]
)
def test_model_from_a_4bit_base_matches_the_bnb_model(tiny_dir, tmp_path, input_ids, arch, quant):
    model, _ = edgepeft.load_base(tiny_dir(arch), quant=quant)
    out = tmp_path / f"{arch}-{quant}"
    result = export(model, out, weights=quant, verify=True, quiet=True)
    manifest = read_manifest(out)
    assert manifest.weights == quant and manifest.graph == "fused"
    assert manifest.op_counts["MatMulBnb4"] == 4 * 2  # qkv, o, gate_up, down per layer
    assert "MatMulNBits" not in manifest.op_counts
    check = result.verify.graphs[0]
    assert check.exact and check.passed and check.max_abs_diff <= MODEL_TOL

    # The very bytes the adapter was trained against, no re-quantization.
    graph = onnx.load(str(out / "model.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        np.testing.assert_array_equal(stored[f"{name}.weight.bnb4"], from_layer(module).codes)

    steps = 8
    ids = input_ids.numpy()
    with torch.no_grad():
        want = model(input_ids=input_ids).logits.numpy()  # the bnb layers' own forward
        want_tokens = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps,
            do_sample=False, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    got, tokens = ort_greedy(out, ids, steps)
    assert np.abs(got - want).max() <= MODEL_TOL
    np.testing.assert_array_equal(tokens, want_tokens)


def test_unquantized_base_is_quantized_like_load_base(tiny_dir, tmp_path):
    out = tmp_path / "from-fp32"
    export(tiny_dir("llama"), out, weights="nf4", quant="none", verify=False, quiet=True)
    nf4, _ = edgepeft.load_base(tiny_dir("llama"), quant="nf4", double_quant=False)
    graph = onnx.load(str(out / "model.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    name = "model.layers.1.self_attn.o_proj"
    np.testing.assert_array_equal(stored[f"{name}.weight.bnb4"], from_layer(nf4.get_submodule(name)).codes)
    np.testing.assert_array_equal(stored[f"{name}.weight.absmax"], from_layer(nf4.get_submodule(name)).absmax)
    assert "lm_head.weight" in stored  # kept in full precision, as load_base keeps it


def test_architectures_without_a_fused_graph_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="needs the fused builder.*gpt2.*int4"):
        export(tiny_dir("gpt2"), tmp_path / "gpt2", weights="nf4", verify=False, quiet=True)
    assert not (tmp_path / "gpt2").exists()
