"""export_generic: torch.onnx (TorchScript) graphs with KV cache, checked against HF transformers.

    tiny gpt2 / llama ──export_generic──► model.onnx ──onnxruntime──► logits, presents
        vs the HF model run on the whole sequence, no cache (an independent reference):
            prefill, left padding            fp32 <= 1e-4 at real positions
            3 decode steps through the cache fp32 <= 1e-4
            8 greedy tokens                   == model.generate(do_sample=False)
        int4 / int8: vs PyTorch holding the graph's own dequantized weights (accuracy_level 0:
            <= 1e-4, so the packing is right), and vs fp32 within the measured rounding error
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import edgepeft
from edgepeft.export.generic import (
    CacheContract,
    export_generic,
    matmul_nbits_weights,
    plain_fp32_copy,
    quantize_matmuls,
)
from edgepeft.export.graph_info import DATA_FILE, input_names
from edgepeft.export.weights import mixed_bits
from edgepeft.tiny import TINY_VOCAB, tiny_model

FP32_TOL = 1e-4


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (3, 7): row 0 padded by 3, row 2 by 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_logits(model, ids, mask) -> torch.Tensor:
    """The HF model on the full sequence, no cache, positions counted over real tokens."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def ort_run(sess, info, ids, mask, past):
    feeds = dict(zip(input_names(info.num_layers), [ids.numpy(), mask.numpy(), *past], strict=True))
    logits, *present = sess.run(None, feeds)
    return torch.from_numpy(logits), present


def empty_past(info, batch) -> list[np.ndarray]:
    shape = (batch, info.num_kv_heads, 0, info.head_dim)
    return [np.zeros(shape, np.float32) for _ in range(2 * info.num_layers)]


def real_max_diff(a, b, mask) -> float:
    real = mask[:, -a.shape[1] :].bool()
    return float((a - b).abs()[real].max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_graph_matches_transformers_with_cache(arch, tmp_path):
    model = tiny_model(arch)
    info = export_generic(model, tmp_path, "fp32")
    assert info.path == tmp_path / "model.onnx" and (tmp_path / DATA_FILE).is_file()
    assert onnx.load(str(info.path), load_external_data=False).ir_version == 10
    assert info.vocab_size == TINY_VOCAB and info.num_layers == 2 and info.kv_dtype == "float32"
    sess = session(info.path)
    ids, mask = left_padded()

    logits, past = ort_run(sess, info, ids, mask, empty_past(info, 3))
    assert real_max_diff(logits, hf_logits(model, ids, mask), mask) <= FP32_TOL
    assert past[0].shape == (3, info.num_kv_heads, 7, info.head_dim)

    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # decode: one token per row through the cache
        new = torch.randint(3, TINY_VOCAB, (3, 1), generator=g)
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        logits, past = ort_run(sess, info, new, mask, past)
        want = hf_logits(model, ids, mask)[:, -1:]
        assert float((logits - want).abs().max()) <= FP32_TOL
    assert past[0].shape[2] == 10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_graph_greedy_tokens_equal_generate(arch, tmp_path):
    model = tiny_model(arch)
    info = export_generic(model, tmp_path, "fp32")
    sess = session(info.path)
    ids, mask = left_padded()
    with torch.no_grad():
        want = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )[:, ids.shape[1] :]
    got, feed, past = [], ids, empty_past(info, 3)
    for _ in range(8):
        logits, past = ort_run(sess, info, feed, mask, past)
        feed = logits[:, -1].argmax(-1, keepdim=True)
        got.append(feed)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    assert torch.equal(torch.cat(got, 1), want)


def test_nf4_base_exports_its_dequantized_weights(tiny_dir, tmp_path):
    """A bnb base is exported as what it computes: fp32 copies of its dequantized weights."""
    model, _ = edgepeft.load_base(tiny_dir("gpt2"), quant="nf4")
    before = {n: p.detach().clone() for n, p in model.state_dict().items() if p.is_floating_point()}
    info = export_generic(model, tmp_path, "fp32")
    ids, mask = left_padded()
    logits, _ = ort_run(session(info.path), info, ids, mask, empty_past(info, 3))
    assert real_max_diff(logits, hf_logits(model, ids, mask), mask) <= FP32_TOL
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())  # the caller's model untouched


@pytest.mark.parametrize("weights, bits", [("int4", 4), ("int8", 8)])
def test_quantized_graph_computes_with_its_dequantized_weights(weights, bits, tmp_path):
    model = tiny_model("llama")
    info = export_generic(model, tmp_path, weights, block_size=32, accuracy_level=0)
    proto = onnx.load(str(info.path))
    assert info.op_counts["MatMulNBits"] == 15
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    # int8: every weight; int4 (the default recipe, mixed): int8 where mixed_bits says
    weights_of = [n.input[1].rsplit(".", 1)[0] for n in nodes]
    int8 = set(info.quantization["int8_tensors"])
    if bits == 8:
        assert int8 == set(weights_of) and info.quantization["int4_tensors"] == 0
    else:
        assert int8 == {w for w in weights_of if mixed_bits(w, info.num_layers) == 8}
        assert int8 and info.quantization["int4_tensors"] == len(nodes) - len(int8)
    for n in nodes:
        weight = n.input[1].rsplit(".", 1)[0]
        stored = next(helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
        assert stored == (8 if weight in int8 else 4)
        assert (n.input[3:4] == [f"{weight}.zero_points"]) == (stored == 4)
    ids, mask = left_padded()
    logits, _ = ort_run(session(info.path), info, ids, mask, empty_past(info, 3))

    contract = CacheContract(plain_fp32_copy(model))
    for name, w in matmul_nbits_weights(proto).items():
        path, _, attr = name.rpartition(".")
        setattr(contract.get_submodule(path), attr, torch.nn.Parameter(torch.from_numpy(w)))
    past = [torch.zeros(3, info.num_kv_heads, 0, info.head_dim) for _ in range(2 * info.num_layers)]
    with torch.no_grad():
        exact = contract(ids, mask, *past)[0]
    assert real_max_diff(logits, exact, mask) <= FP32_TOL
    # Rounding error against the fp32 model, measured: int4 ~0.14, int8 ~0.01 on these logits.
    rounding = real_max_diff(logits, hf_logits(model, ids, mask), mask)
    assert 1e-4 < rounding < (0.5 if bits == 4 else 0.05)


def test_int4_with_int8_activations_stays_close(tmp_path):
    model = tiny_model("gpt2")
    info = export_generic(model, tmp_path, "int4")  # accuracy_level 4 by default
    ids, mask = left_padded()
    logits, _ = ort_run(session(info.path), info, ids, mask, empty_past(info, 3))
    assert real_max_diff(logits, hf_logits(model, ids, mask), mask) < 0.5  # measured ~0.15
    assert (tmp_path / DATA_FILE).stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())


def test_fp16_storage_halves_weights_and_stays_close(tmp_path):
    model = tiny_model("llama")
    info = export_generic(model, tmp_path, "fp16")
    proto = onnx.load(str(info.path))
    halves = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 16  # embeddings + 14 projections + lm_head
    ids, mask = left_padded()
    logits, _ = ort_run(session(info.path), info, ids, mask, empty_past(info, 3))
    assert real_max_diff(logits, hf_logits(model, ids, mask), mask) < 5e-3  # measured ~5e-4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, block", [(64, 32), (80, 32), (96, 16)])
def test_matmul_nbits_dequantization_is_what_onnxruntime_computes(bits, k, block):
    rng = np.random.default_rng(k + bits)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    assert quantize_matmuls(proto, bits, block, accuracy_level=0) == 1
    assert [t.name for t in proto.graph.initializer] == [f"w.q{bits}", "w.scales"]
    deq = matmul_nbits_weights(proto)["w"]
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = session_from(proto).run(None, {"x": x})[0]
    assert np.abs(y - x @ deq).max() <= 1e-4
    step = np.abs(w).max() / (7 if bits == 4 else 127)  # one quantization step, at most
    assert 0 < np.abs(deq - w).max() <= step


def session_from(proto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_bad_arguments_are_refused(tmp_path):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="weights must be one of"):
        export_generic(model, tmp_path, "nf4")
    with pytest.raises(ValueError, match="power of two"):
        export_generic(model, tmp_path, "int4", block_size=24)
