"""Bottleneck adapters: identity at init, placement, parameter count, math, quantized bases, I/O."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from edgepeft.adapters.bottleneck import BottleneckLayer, from_peft, to_peft
from edgepeft.adapters.inject import (
    adapter_parameters,
    add_adapter,
    count_parameters,
    disable_adapters,
)
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgepeft.base import dequantized_weight, is_linear_like, is_quantized, load_base
from edgepeft.config import BottleneckConfig

ARCHS = ("llama", "qwen2", "gpt2")
# Output projections per architecture: (attention output, FFN output).
OUTPUTS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}
HIDDEN, LAYERS = 64, 2  # the tiny models' sizes


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def bottlenecks(model, name="default"):
    return {p: m for p, m in adapter_modules(model) if isinstance(m, BottleneckLayer) and name in m}


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_and_random_init_changes_output(tiny_dir, input_ids, arch):
    model, _ = load_base(tiny_dir(arch), quant="none")
    base = logits(model, input_ids)
    add_adapter(model, BottleneckConfig(style="houlsby"), "zero")
    assert torch.equal(logits(model, input_ids), base)

    torch.manual_seed(0)
    add_adapter(model, BottleneckConfig(style="houlsby", init="random"), "random")
    assert (logits(model, input_ids) - base).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_placement_and_analytic_parameter_count(tiny_dir, arch, style):
    model, _ = load_base(tiny_dir(arch), quant="nf4")
    rf = 16
    add_adapter(model, BottleneckConfig(style=style, reduction_factor=rf))

    attn_out, ffn_out = OUTPUTS[arch]
    wanted = (attn_out, ffn_out) if style == "houlsby" else (ffn_out,)
    paths = sorted(bottlenecks(model))
    assert len(paths) == len(wanted) * LAYERS
    for layer in range(LAYERS):
        for suffix in wanted:
            assert sum(p.endswith(f".{layer}.{suffix}") for p in paths) == 1

    d, b = HIDDEN, HIDDEN // rf
    per_adapter = d * b + b + b * d + d  # down weight + bias, up weight + bias
    assert count_parameters(model) == len(wanted) * LAYERS * per_adapter


def test_target_modules_override_and_missing_target(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(model, BottleneckConfig(style="houlsby", target_modules=("v_proj",)))
    assert sorted(bottlenecks(model)) == [f"model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)]
    # v_proj is (64 -> 32) here: the bottleneck is sized by the wrapped layer's output.
    layer = bottlenecks(model)["model.layers.0.self_attn.v_proj"]
    assert layer.adapter_down["default"].weight.shape == (32 // 16, 32)

    with pytest.raises(ValueError, match="no_such_proj"):
        add_adapter(model, BottleneckConfig(target_modules=("no_such_proj",)), "bad")
    with pytest.raises(ValueError, match="reduction_factor"):
        add_adapter(model, BottleneckConfig(reduction_factor=1000), "too_narrow")


def _by_hand(activation: str, h: torch.Tensor) -> torch.Tensor:
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if activation == "silu":
        return h / (1 + torch.exp(-h))
    return (torch.exp(h) - torch.exp(-h)) / (torch.exp(h) + torch.exp(-h))


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_layer_math_matches_hand_written_reference(activation):
    torch.manual_seed(0)
    base = nn.Linear(10, 12)
    layer = BottleneckLayer(base)
    layer.add("a", BottleneckConfig(reduction_factor=3, activation=activation, init="random"))
    layer.set_active("a")
    x = torch.randn(2, 5, 10)

    down, up = layer.adapter_down["a"], layer.adapter_up["a"]
    assert down.weight.shape == (4, 12) and up.weight.shape == (12, 4)
    with torch.no_grad():
        y = x @ base.weight.T + base.bias  # (2, 5, 12)
        hidden = _by_hand(activation, y @ down.weight.T + down.bias)  # (2, 5, 4)
        expected = y + hidden @ up.weight.T + up.bias
        got = layer(x)
    assert (got - expected).abs().max() <= 1e-6
    layer.set_active(None)
    assert torch.equal(layer(x), base(x))


def _dequantized_twin(folder, quant):
    """(quantized model, fp32 model holding the quantized model's dequantized weights)."""
    quantized, _ = load_base(folder, quant=quant)
    reference, _ = load_base(folder, quant="none")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                target = reference.get_submodule(name)
                weight = dequantized_weight(module)  # (out, in)
                conv1d = is_linear_like(target) and not isinstance(target, nn.Linear)
                target.weight.copy_(weight.t() if conv1d else weight)
    return quantized, reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_quantized_base_matches_fp32_with_dequantized_weights(tiny_dir, input_ids, tmp_path, arch, quant):
    quantized, reference = _dequantized_twin(tiny_dir(arch), quant)
    torch.manual_seed(0)
    config = BottleneckConfig(style="houlsby", activation="gelu", init="random")
    add_adapter(quantized, config)
    save_adapter(quantized, tmp_path / "adapter")
    load_adapter(reference, tmp_path / "adapter")

    diff = (logits(quantized, input_ids) - logits(reference, input_ids)).abs().max()
    print(f"{arch} {quant}: max |quantized - dequantized fp32| = {diff:.2e}")
    assert diff <= 1e-5
    with disable_adapters(reference):  # the adapter is really in the compared path
        assert (logits(reference, input_ids) - logits(quantized, input_ids)).abs().max() > 1e-3


def test_gradients_over_nf4_reach_only_adapter_parameters(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("qwen2"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, BottleneckConfig(style="houlsby", init="random"))
    model(input_ids).logits.float().pow(2).mean().backward()

    trainable = {id(p) for p in adapter_parameters(model)}
    assert len(trainable) == 2 * LAYERS * 4
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_save_load_round_trip_is_bit_exact(tiny_dir, input_ids, tmp_path):
    folder = tiny_dir("gpt2")
    model, _ = load_base(folder, quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, BottleneckConfig(style="houlsby", activation="silu", reduction_factor=8, init="random"))
    save_adapter(model, tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.h.0.mlp.c_proj.adapter_down.weight" in keys
    assert "base_model.model.transformer.h.1.attn.c_proj.adapter_up.bias" in keys
    assert len(keys) == 2 * LAYERS * 4

    fresh, _ = load_base(folder, quant="nf4")
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_merging_refuses_with_keep_separate_message(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    add_adapter(model, BottleneckConfig())
    layer = next(iter(bottlenecks(model).values()))
    assert BottleneckLayer.mergeable is False
    with pytest.raises(TypeError, match="keep it separate"):
        layer.merge_update("default")
    with pytest.raises(TypeError, match="keep it separate"):
        layer.delta_weight("default")


def test_config_json_round_trip_and_refusals():
    config = BottleneckConfig(
        style="houlsby", reduction_factor=4, activation="tanh", target_modules=("o_proj",)
    )
    assert from_peft({"peft_type": "BOTTLENECK", **to_peft(config)}) == config
    with pytest.raises(ValueError, match="activation"):
        from_peft({**to_peft(config), "activation": "softplus"})
    with pytest.raises(ValueError, match="LLM-Adapters"):
        from_peft({"peft_type": "BOTTLENECK", "bottleneck_size": 256, "non_linearity": "tanh"})
