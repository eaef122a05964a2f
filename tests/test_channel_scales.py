"""Activation-aware channel scales (export/channel_scales.py): exact before rounding, folded
where no adapter reads the scaled input, explicit where one does, and a measured gain."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from ort_prefill import prefill

import edgepeft as ep
from edgepeft.adapters.inject import add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig
from edgepeft.export.channel_scales import (
    ALPHAS,
    CALIBRATION_FILE,
    ChannelScales,
    best_scale,
    calibrate,
    calibration_ids,
    layer_groups,
)
from edgepeft.export.fused import export_fused
from edgepeft.export.weights import DEFAULT_QUANTIZATION, dequantize_packed
from edgepeft.tiny import TINY_VOCAB, tiny_model, tiny_tokenizer

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_scales(model, spread: float = 0.7, seed: int = 0) -> ChannelScales:
    """A scale for every group, log-normal: far from 1, as a calibration could choose."""
    rng = np.random.default_rng(seed)
    scales, alphas = {}, {}
    for i in range(model.config.num_hidden_layers):
        for group in layer_groups(i):
            width = model.get_submodule(group.members[0]).in_features
            scales[group.key] = np.exp(rng.normal(0, spread, width)).astype(np.float32)
            alphas[group.key] = 0.5
    return ChannelScales(scales, alphas, tokens=0)


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY_VOCAB, (2, 12)).astype(np.int64)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _kl(reference: np.ndarray, test: np.ndarray) -> float:
    log_p = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(test).double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _ops(path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("targets", [(), ("q_proj", "up_proj")], ids=["folded", "explicit"])
def test_given_scales_keep_an_fp32_graph_exact(arch, targets, tmp_path):
    """Scaling is a change of variables: before rounding the graph computes the same logits,
    whether s is folded into the norms (no adapter) or applied by a Mul (adapter inputs)."""
    model = tiny_model(arch)
    info = export_fused(
        model, tmp_path, "fp32", lora_targets=targets, channel_scales=_random_scales(model)
    )
    ids = _ids()
    reference = _torch_logits(model, ids)
    diff = np.abs(prefill(info.path, ids) - reference).max() / np.abs(reference).max()
    assert diff <= 1e-5, f"{arch} {targets}: relative max |Δlogit| {diff:.2e}"
    scale_muls = [n for n in _ops(info.path) if n.name.endswith("/ScaleMul")]
    if targets:  # q_proj: the q|k|v group; up_proj: gate|up and (its rows feed) down
        assert len(scale_muls) == 3 * model.config.num_hidden_layers
    else:
        assert not scale_muls
        graph = onnx.load(str(info.path)).graph
        norm = next(
            t for t in graph.initializer if t.name == "model.layers.0.input_layernorm.weight"
        )
        original = model.model.layers[0].input_layernorm.weight.detach().numpy()
        assert not np.allclose(onnx.numpy_helper.to_array(norm), original)  # s was folded in


def test_given_scales_are_refused_where_they_cannot_apply(tmp_path):
    model = tiny_model("gemma2")
    with pytest.raises(ValueError, match="gemma2 is not one of"):
        export_fused(model, tmp_path, "fp32", channel_scales=_random_scales(tiny_model()))


def _int4(group, name, w):
    return dequantize_packed(DEFAULT_QUANTIZATION.quantize(w, 4, 32))


def test_chosen_scales_lower_the_output_error_on_held_out_inputs():
    """Inputs with a few channels 20x larger than the rest (the activation outliers of real
    LLMs): the scale chosen on one sample cuts the rounding error of W x on another."""
    rng = np.random.default_rng(0)
    k, n = 256, 192
    spread = np.ones(k, np.float32)
    spread[rng.choice(k, 6, replace=False)] = 20

    def sample(tokens):
        return torch.from_numpy(rng.normal(size=(tokens, k)).astype(np.float32) * spread)

    group = layer_groups(0)[1]  # gate|up
    weights = {m: rng.normal(0, 0.05, (n, k)).astype(np.float32) for m in group.members}
    alpha, s = best_scale(group, weights, sample(512), _int4)
    assert alpha > 0

    def error(x, scale):
        return sum(
            float(((torch.from_numpy(w - _int4(group, m, w * scale) / scale)) @ x.T).pow(2).sum())
            for m, w in weights.items()
        )

    held_out = sample(512)
    assert error(held_out, s) < 0.8 * error(held_out, np.ones(k, np.float32))


def test_calibrated_int4_export_records_its_scales(tmp_path):
    model = tiny_model("llama", seed=1)
    ids = calibration_ids(tiny_tokenizer())
    info = export_fused(model, tmp_path, "int4", calibration_ids=ids)
    record = info.quantization["activation_scales"]
    assert record["method"] == "awq" and record["groups"] == 3 * model.config.num_hidden_layers
    assert record["calibration_tokens"] == ids.shape[1]
    plain = export_fused(model, tmp_path / "plain", "int4").quantization
    assert plain["activation_scales"] == {"skipped": "no tokenizer for the calibration text"}


def test_calibration_picks_the_alpha_of_least_output_error():
    """Each group's alpha is the argmin over ALPHAS of the output error it measures."""
    model = tiny_model("llama", seed=1)
    ids = calibration_ids(tiny_tokenizer())
    rounding_calls = []

    def rounding(group, name, w):
        rounding_calls.append(name)
        return _int4(group, name, w)

    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    scales = calibrate(model, ids, weights.__getitem__, rounding)
    groups = [g for i in range(2) for g in layer_groups(i)]
    assert set(scales.alphas) == {g.key for g in groups}
    assert set(scales.alphas.values()) <= set(ALPHAS)
    members = sum(len(g.members) for g in groups)
    assert len(rounding_calls) == members * len(ALPHAS)
    for key, s in scales.scales.items():
        assert s.dtype == np.float32 and np.isfinite(s).all() and (s > 0).all()
        assert np.isclose(np.sqrt(s.max() * s.min()), 1, rtol=1e-4), key
    assert scales.tokens == ids.shape[1]


def test_calibration_text_is_shipped_and_long_enough():
    assert CALIBRATION_FILE.is_file()
    assert calibration_ids(tiny_tokenizer()).shape[1] >= 256
    assert calibration_ids(None) is None


def test_export_records_the_scales_and_its_switches(tiny_dir, tmp_path):
    base = tiny_dir("llama")

    def record(**options):
        out = tmp_path / ("-".join(f"{k}{v}" for k, v in options.items()) or "default")
        ep.export(base, out, weights="int4", quiet=True, verify=False, **options)
        return json.loads((out / "edgepeft.json").read_text())["quantization"]

    default = record()
    assert default["activation_aware"] is True
    assert default["activation_scales"]["groups"] == 6
    assert default["activation_scales"]["calibration"] == CALIBRATION_FILE.name
    off = record(activation_aware=False)
    assert off["activation_aware"] is False and "activation_scales" not in off
    rtn = record(int4_method="rtn")
    assert rtn["activation_aware"] is False and "activation_scales" not in rtn


def test_unsupported_family_says_why(tiny_dir, tmp_path):
    ep.export(tiny_dir("phi3"), tmp_path / "phi3", weights="int4", quiet=True, verify=False)
    record = json.loads((tmp_path / "phi3" / "edgepeft.json").read_text())["quantization"]
    assert "phi3 is not one of" in record["activation_scales"]["skipped"]


def test_separate_int4_keeps_the_adapter_on_the_unscaled_input(tiny_dir, tmp_path):
    """LoRA on q/v and up: those groups are scaled by a Mul before the base matmul only, the
    adapter file is unchanged by the scales, and the graph passes verify with the adapter."""
    base = tiny_dir("llama")
    model, _ = load_base(base, quant="none")
    torch.manual_seed(0)
    config = LoraConfig(r=4, alpha=8, init="random", target_modules=["q_proj", "v_proj", "up_proj"])
    add_adapter(model, config, "x")
    folder = save_adapter(model, tmp_path / "x", "x")
    result = ep.export(
        base, tmp_path / "out", {"x": folder}, weights="int4", mode="separate", quiet=True
    )
    assert result.verify.passed, str(result.verify)
    graph_ops = _ops(tmp_path / "out" / "model.onnx")
    assert sum(n.name.endswith("/ScaleMul") for n in graph_ops) == 3 * 2  # every group explicit
    plain = ep.export(
        base, tmp_path / "plain", {"x": folder}, weights="int4", mode="separate", quiet=True,
        activation_aware=False, verify=False,
    )  # fmt: skip
    adapter = "adapters/x.onnx_adapter"
    assert (tmp_path / "out" / adapter).read_bytes() == (tmp_path / "plain" / adapter).read_bytes()
    assert plain.out_dir.is_dir()
