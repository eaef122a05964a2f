"""weights.quantize_nbits beyond RTN: fitted scales / zero points, float zero points, importance."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepeft.export import weights
from edgepeft.export.weights import (
    dequantize_nbits,
    dequantize_packed,
    mixed_bits,
    quantize_nbits,
    search_blocks,
)


def heavy_tailed(rows: int, cols: int, seed: int) -> np.ndarray:
    """Student-t (3 degrees of freedom) weights with a few large outliers, like a trained LM's."""
    rng = np.random.default_rng(seed)
    return (0.02 * rng.standard_t(3, (rows, cols))).astype(np.float32)


def relative_error(weight: np.ndarray, packed, importance: np.ndarray | None = None) -> float:
    h = np.ones(weight.shape[1]) if importance is None else importance
    return float((h * (dequantize_packed(packed) - weight) ** 2).sum() / (h * weight**2).sum())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "options",
    [
        dict(symmetric=True),
        dict(symmetric=False),
        dict(symmetric=False, float_zero_points=True),
    ],
    ids=["sym", "asym", "asym-float-zero"],
)
def test_search_has_less_error_than_rtn(bits, options):
    weight = heavy_tailed(96, 200, seed=bits)  # 200: a partial last block
    rtn = quantize_nbits(weight, bits, 32, symmetric=options["symmetric"])
    searched = quantize_nbits(weight, bits, 32, method="search", **options)
    ratio = relative_error(weight, searched) / relative_error(weight, rtn)
    print(f"{bits} bits {options}: search / rtn squared error = {ratio:.3f}")
    assert ratio < 0.97  # never above 1: RTN is one of the grids tried
    per_block = ((dequantize_packed(searched) - weight) ** 2).reshape(96, -1)
    rtn_block = ((dequantize_packed(rtn) - weight) ** 2).reshape(96, -1)
    assert (per_block.sum(1) <= rtn_block.sum(1) * (1 + 1e-5)).all()  # no row gets worse


def test_float_zero_points_fit_better_than_whole_codes():
    weight = heavy_tailed(64, 256, seed=1)
    whole = quantize_nbits(weight, 4, 64, symmetric=False, method="search")
    free = quantize_nbits(weight, 4, 64, symmetric=False, method="search", float_zero_points=True)
    assert relative_error(weight, free) < relative_error(weight, whole)


def test_importance_lowers_the_error_it_weights():
    weight = heavy_tailed(64, 256, seed=2)
    importance = np.exp(2 * np.random.default_rng(3).standard_normal(256)).astype(np.float32)
    plain = quantize_nbits(weight, 4, 32, symmetric=False, method="search")
    weighted = quantize_nbits(weight, 4, 32, symmetric=False, method="search", importance=importance)
    assert relative_error(weight, weighted, importance) < 0.95 * relative_error(
        weight, plain, importance
    )


@pytest.mark.parametrize("float_zero_points", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_searched_codes_and_zero_points_round_trip(bits, float_zero_points):
    weight = heavy_tailed(40, 100, seed=4)
    weight[3] = 0.5  # a constant row: every block the same value
    weight[4, :32] = np.linspace(0.1, 0.2, 32)  # a block that does not contain 0
    packed = quantize_nbits(
        weight, bits, 32, symmetric=False, method="search", float_zero_points=float_zero_points
    )
    qmax = (1 << bits) - 1
    k_blocks = 4
    blocks = np.zeros((40, k_blocks * 32), np.float32)
    blocks[:, :100] = weight
    columns = np.zeros(k_blocks * 32, np.float32)
    columns[:100] = 1
    scales, zeros, codes = search_blocks(
        blocks.reshape(40, k_blocks, 32),
        columns.reshape(k_blocks, 32),
        bits,
        symmetric=False,
        integer_zeros=not float_zero_points,
    )
    assert codes.min() >= 0 and codes.max() <= qmax and (codes == np.rint(codes)).all()
    if float_zero_points:
        assert packed.zero_points.dtype == np.float32 and packed.zero_points.shape == (40, 4)
        assert np.isfinite(packed.zero_points).all()
    else:
        assert packed.zero_points.dtype == np.uint8
        assert zeros.min() >= 0 and zeros.max() <= qmax and (zeros == np.rint(zeros)).all()
    np.testing.assert_array_equal(packed.scales, scales)
    expected = ((codes - zeros[..., None]) * scales[..., None]).reshape(40, -1)[:, :100]
    restored = dequantize_nbits(packed.codes, packed.scales, packed.zero_points, bits, 32, 100)
    np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(restored[3], 0.5, rtol=1e-6)  # constant rows are exact


def test_chunked_rows_quantize_as_one(monkeypatch):
    weight = heavy_tailed(50, 64, seed=5)
    importance = np.linspace(0.5, 2, 64).astype(np.float32)
    options = dict(symmetric=False, method="search", float_zero_points=True, importance=importance)
    whole = quantize_nbits(weight, 4, 16, **options)
    monkeypatch.setattr(weights, "ROWS_PER_CHUNK", 16)
    chunked = quantize_nbits(weight, 4, 16, **options)
    for a, b in [(whole.codes, chunked.codes), (whole.scales, chunked.scales)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.zero_points, chunked.zero_points)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_is_still_onnxruntimes_byte_for_byte(bits, symmetric, monkeypatch):
    """The default (and method="rtn") is unchanged: onnxruntime's own quantizer's bytes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    monkeypatch.setattr(weights, "ROWS_PER_CHUNK", 16)  # the chunked path too
    n, k, block = 40, 128, 32
    weight = heavy_tailed(n, k, seed=6)
    weight[0, :32] = (np.arange(32) - 16) * 0.01  # exact .5 ties: roundf, not round-half-even
    k_blocks = k // block
    codes = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zeros = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(codes, np.ascontiguousarray(weight.T), scales, zeros, block, n, k, symmetric)
    for packed in (
        quantize_nbits(weight, bits, block, symmetric=symmetric),
        quantize_nbits(weight, bits, block, symmetric=symmetric, method="rtn"),
    ):
        np.testing.assert_array_equal(packed.codes, codes)
        np.testing.assert_array_equal(packed.scales, scales)
        if not symmetric:
            np.testing.assert_array_equal(packed.zero_points, zeros)


def _matmul_nbits(packed, x: np.ndarray) -> np.ndarray:
    """onnxruntime's MatMulNBits over `packed`, as a one-node ONNX graph."""
    n, k = packed.out_features, packed.in_features
    initializers = [
        numpy_helper.from_array(packed.codes, "w_q"),
        numpy_helper.from_array(packed.scales, "w_scales"),
    ]
    if packed.zero_points is not None:
        initializers.append(numpy_helper.from_array(packed.zero_points, "w_zero_points"))
    node = helper.make_node(
        "MatMulNBits",
        ["x", *[t.name for t in initializers]],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=packed.bits,
        block_size=packed.block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "one-matmul-nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize(
    "options",
    [
        dict(symmetric=True),
        dict(symmetric=False),
        dict(symmetric=False, float_zero_points=True),
    ],
    ids=["sym", "asym-uint8-zero", "asym-float-zero"],
)
def test_matmulnbits_computes_the_dequantized_weight(block_size, options):
    weight = heavy_tailed(48, 200, seed=block_size)
    packed = quantize_nbits(weight, 4, block_size, method="search", **options)
    x = np.random.default_rng(7).standard_normal((3, 200)).astype(np.float32)
    expected = x @ dequantize_packed(packed).T  # (3, 48)
    y = _matmul_nbits(packed, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_bad_options_say_what_to_do():
    weight = heavy_tailed(4, 32, seed=8)
    with pytest.raises(ValueError, match="symmetric=False"):
        quantize_nbits(weight, 4, symmetric=True, float_zero_points=True)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_nbits(weight, 4, method="gptq")
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        quantize_nbits(weight, 4, method="search", importance=np.ones(16))


def test_mixed_bits_keeps_the_sensitive_tensors_in_int8():
    layers = 30
    assert mixed_bits("model.embed_tokens.weight", layers) == 8
    assert mixed_bits("model.layers.0.mlp.down_proj.weight", layers) == 8
    assert mixed_bits("model.layers.29.mlp.down_proj.weight", layers) == 8
    assert mixed_bits("model.layers.10.self_attn.v_proj.weight", layers) == 8
    assert mixed_bits("model.layers.10.mlp.down_proj.weight", layers) == 4
    assert mixed_bits("model.layers.10.self_attn.q_proj.weight", layers) == 4
    assert mixed_bits("model.layers.13.mlp.gate_proj.weight", layers) == 4
