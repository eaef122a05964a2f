"""Selective tuning: presets select what they claim, deltas act like direct edits, exact merges."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from safetensors import safe_open

from edgepeft.adapters.inject import (
    adapter_parameters,
    add_adapter,
    count_parameters,
    list_adapters,
    set_adapter,
)
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgepeft.adapters.selective import (
    SelectiveLayer,
    from_peft,
    selected_parameters,
    to_peft,
)
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, SelectiveConfig

LAYERS = 2
BITFIT, NORMS = SelectiveConfig.bitfit(), SelectiveConfig.norms()
GPT2_BLOCK_BIASES = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")

# (architecture, preset, the parameters it must select on the tiny model)
PRESETS = {
    "llama-norms": (
        "llama",
        NORMS,
        {
            f"model.layers.{i}.{n}.weight"
            for i in range(LAYERS)
            for n in ("input_layernorm", "post_attention_layernorm")
        }
        | {"model.norm.weight"},
    ),
    "qwen2-bitfit": (
        "qwen2",
        BITFIT,
        {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(LAYERS) for p in "qkv"},
    ),
    "gpt2-bitfit": (
        "gpt2",
        BITFIT,
        {f"transformer.h.{i}.{m}.bias" for i in range(LAYERS) for m in GPT2_BLOCK_BIASES}
        | {"transformer.ln_f.bias"},
    ),
    "gpt2-norms": (
        "gpt2",
        NORMS,
        {
            f"transformer.h.{i}.{n}.{p}"
            for i in range(LAYERS)
            for n in ("ln_1", "ln_2")
            for p in ("weight", "bias")
        }
        | {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    ),
}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def random(config: SelectiveConfig) -> SelectiveConfig:
    return dataclasses.replace(config, init="random")


def deltas(model, name="default") -> dict[str, torch.Tensor]:
    """Full parameter name -> delta of adapter `name`."""
    return {
        f"{path}.{local}": delta
        for path, module in adapter_modules(model)
        if isinstance(module, SelectiveLayer) and name in module.selective_delta
        for local, delta in module.selective_delta[name].items()
    }


def edited_copy(reference, model, name="default"):
    """`reference` deep-copied with adapter `name`'s deltas added to its parameters directly."""
    edited = copy.deepcopy(reference)
    done = set()
    with torch.no_grad():
        for full, delta in deltas(model, name).items():
            param = edited.get_parameter(full)
            if id(param) not in done:  # a tied parameter is edited once
                param.add_(delta)
                done.add(id(param))
    return edited


@pytest.mark.parametrize("case", sorted(PRESETS))
def test_presets_select_what_they_claim_and_start_at_identity(tiny_dir, input_ids, case):
    arch, config, expected = PRESETS[case]
    model, _ = load_base(tiny_dir(arch), quant="nf4")
    base = logits(model, input_ids)
    add_adapter(model, config)

    assert set(selected_parameters(model, "default")) == expected
    plain, _ = load_base(tiny_dir(arch), quant="none")
    patterns = [re.compile(p) for p in config.patterns]
    n_selected = sum(
        p.numel() for n, p in plain.named_parameters() if any(r.search(n) for r in patterns)
    )
    assert count_parameters(model) == n_selected
    assert torch.equal(logits(model, input_ids), base)


@pytest.mark.parametrize(
    "arch, config",
    [
        ("llama", NORMS),
        ("qwen2", BITFIT),
        ("gpt2", BITFIT),
        ("gpt2", SelectiveConfig(patterns=(r"wte\.weight$",))),  # tied to lm_head.weight
    ],
    ids=["llama-norms", "qwen2-bitfit", "gpt2-bitfit", "gpt2-tied-embedding"],
)
def test_random_deltas_equal_direct_parameter_edits(tiny_dir, input_ids, arch, config):
    model, _ = load_base(tiny_dir(arch), quant="none")
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    add_adapter(model, random(config))

    expected = logits(edited_copy(reference, model), input_ids)
    got = logits(model, input_ids)
    assert (got - logits(reference, input_ids)).abs().max() > 1e-3
    diff = (got - expected).abs().max()
    print(f"{arch} {config.patterns}: max |adapter - edited fp32 copy| = {diff:.2e}")
    assert diff <= 1e-6


def test_tied_parameter_shares_one_delta(tiny_dir):
    model, _ = load_base(tiny_dir("gpt2"), quant="none")
    add_adapter(model, SelectiveConfig(patterns=(r"wte\.weight$",)))
    found = deltas(model)
    assert set(found) == {"transformer.wte.weight", "lm_head.weight"}
    assert found["transformer.wte.weight"] is found["lm_head.weight"]
    # Attribute reads pass through the wrapper to the frozen original.
    original = model.transformer.wte.base_layer.weight
    assert model.transformer.wte.weight is original and model.lm_head.weight is original
    assert count_parameters(model) == original.numel()


@pytest.mark.parametrize(
    "arch, config, quant", [("qwen2", BITFIT, "nf4"), ("llama", NORMS, "none")]
)
def test_merge_update_is_base_plus_delta_exactly(tiny_dir, arch, config, quant):
    model, _ = load_base(tiny_dir(arch), quant=quant)
    torch.manual_seed(0)
    add_adapter(model, random(config))
    assert SelectiveLayer.mergeable is True
    layers = [m for _, m in adapter_modules(model) if isinstance(m, SelectiveLayer)]
    assert layers
    for layer in layers:
        update = layer.merge_update("default")
        own = layer.selective_delta["default"]
        assert set(update) == set(own)  # a quantized linear gives its bias only, never "weight"
        for local, value in update.items():
            original = getattr(layer.innermost(), local)
            assert value.dtype == torch.float32
            assert torch.equal(value, original.float() + own[local].float())
            assert not torch.equal(value, original.float())


def test_merge_update_gives_a_conv1d_weight_as_out_by_in(tiny_dir):
    model, _ = load_base(tiny_dir("gpt2"), quant="none")
    torch.manual_seed(0)
    add_adapter(
        model, SelectiveConfig(patterns=(r"h\.0\.mlp\.c_fc\.(weight|bias)$",), init="random")
    )
    layer = model.transformer.h[0].mlp.c_fc
    stored = layer.base_layer.weight  # Conv1D keeps (in, out) = (64, 256)
    update = layer.merge_update("default")
    assert update["weight"].shape == (256, 64)
    assert torch.equal(update["weight"], (stored + layer.selective_delta["default"]["weight"]).t())
    assert torch.equal(
        update["bias"], layer.base_layer.bias + layer.selective_delta["default"]["bias"]
    )


def test_two_adapters_switch_with_their_own_outputs(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("qwen2"), quant="none")
    reference = copy.deepcopy(model)
    base = logits(model, input_ids)
    torch.manual_seed(0)
    add_adapter(model, random(BITFIT), "a")
    # Overlaps "a" on the q/k/v biases: one wrapper holds both adapters' deltas.
    add_adapter(model, random(SelectiveConfig(patterns=(r"\.bias$", r"norm\.weight$"))), "b")

    expected = {n: logits(edited_copy(reference, model, n), input_ids) for n in ("a", "b")}
    assert (expected["a"] - expected["b"]).abs().max() > 1e-3
    for name in ("a", "b", "a"):
        set_adapter(model, name)
        assert (logits(model, input_ids) - expected[name]).abs().max() <= 1e-6
    set_adapter(model, None)
    assert torch.equal(logits(model, input_ids), base)


def test_stacked_over_a_lora_wrapper_gives_the_same_output(tiny_dir, input_ids):
    alone, _ = load_base(tiny_dir("qwen2"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(alone, random(BITFIT), "s")

    stacked, _ = load_base(tiny_dir("qwen2"), quant="nf4")
    add_adapter(stacked, LoraConfig(init="random", target_modules=("q_proj",)), "lora")
    torch.manual_seed(0)
    add_adapter(stacked, random(BITFIT), "s")  # wraps the LoRA wrapper on q_proj
    assert type(stacked.model.layers[0].self_attn.q_proj.base_layer).__name__ == "LoraLayer"
    assert torch.equal(logits(stacked, input_ids), logits(alone, input_ids))


def test_gradients_over_nf4_reach_only_the_deltas(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("qwen2"), quant="nf4")
    add_adapter(model, SelectiveConfig(patterns=(r"\.bias$", r"norm\.weight$")))
    model(input_ids).logits.float().pow(2).mean().backward()

    trainable = {id(p) for p in adapter_parameters(model)}
    assert len(trainable) == 3 * LAYERS + 2 * LAYERS + 1
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert name.startswith("model.") and "selective_delta.default." in name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_save_load_round_trip_is_bit_exact(tiny_dir, input_ids, tmp_path):
    folder = tiny_dir("gpt2")
    model, _ = load_base(folder, quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, random(SelectiveConfig(patterns=(r"\.bias$", r"wte\.weight$"))))
    save_adapter(model, tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.ln_f.bias_delta" in keys
    assert "base_model.model.transformer.h.1.mlp.c_fc.bias_delta" in keys
    assert "base_model.model.lm_head.weight_delta" in keys

    fresh, _ = load_base(folder, quant="nf4")
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_quantized_weight_is_refused_with_the_way_out(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight") as err:
        add_adapter(model, SelectiveConfig(patterns=(r"q_proj\.weight$",)))
    assert "biases, norms, embeddings, lm_head" in str(err.value)
    assert 'quant="none"' in str(err.value)
    assert not list_adapters(model) and not list(adapter_modules(model))  # left untouched

    plain, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(plain, SelectiveConfig(patterns=(r"layers\.0\.self_attn\.q_proj\.weight$",)))
    assert count_parameters(plain) == 64 * 64


def test_pattern_matching_nothing_lists_parameter_names(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    with pytest.raises(ValueError, match=r"no_such_param.*model\.embed_tokens\.weight"):
        add_adapter(model, SelectiveConfig(patterns=(r"norm\.weight$", "no_such_param")))
    with pytest.raises(ValueError, match="matches no parameter"):
        add_adapter(model, BITFIT)  # llama has no biases
    with pytest.raises(ValueError, match="not a valid regex"):
        add_adapter(model, SelectiveConfig(patterns=("(",)))
    assert not list(adapter_modules(model))


def test_config_json_round_trip():
    config = SelectiveConfig(patterns=(r"\.bias$", r"norm\.weight$"), init="random")
    assert from_peft({"peft_type": "SELECTIVE", **to_peft(config)}) == config
    assert set(to_peft(config)) == {"patterns", "init"}  # no mask: the JSON is as it always was
    with pytest.raises(ValueError, match="patterns"):
        from_peft({"peft_type": "SELECTIVE"})
    masked = SelectiveConfig(mask="importance", budget=0.1, selected={"lm_head.weight": 3})
    assert from_peft({"peft_type": "SELECTIVE", **to_peft(masked)}) == masked
    with pytest.raises(ValueError, match="no 'selected' layout"):
        from_peft({"peft_type": "SELECTIVE", **to_peft(dataclasses.replace(masked, selected={}))})
