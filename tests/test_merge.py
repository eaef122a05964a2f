"""merge / unmerge: merged logits equal the adapted model's, the report measures what it claims.

    adapted model (LoRA, DoRA, IA3, selective, modules_to_save) ──merge──► plain HF model
        quant "none": |logits(merged) - logits(adapted)| <= 1e-4, weight error < 1e-6
        quant "nf4" / "int8": weight error in (0, 0.2), layers re-quantized
        inplace=False: caller untouched; inplace=True + unmerge: bit-exact round trip

Adapters start random and are then perturbed, so every tensor (DoRA's magnitude
included) shows up in the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import edgepeft
from edgepeft.adapters.inject import (
    active_adapter,
    adapter_parameters,
    add_adapter,
    list_adapters,
    set_adapter,
)
from edgepeft.adapters.layer import AdapterModule, adapter_modules
from edgepeft.adapters.lora import LoraLayer
from edgepeft.base import dequantized_weight, is_quantized
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PromptTuningConfig,
    SelectiveConfig,
)
from edgepeft.merge import MergeError, merge, unmerge

FULL_PRECISION_TOL = 1e-4
"""fp32 merged vs adapted: the same products summed in another order (~1e-6 seen here)."""

CONFIGS = {
    "lora": lambda: LoraConfig(init="random"),
    "dora": lambda: LoraConfig(init="random", use_dora=True),
    "ia3": lambda: IA3Config(init="random"),
    "selective": lambda: SelectiveConfig(patterns=SelectiveConfig.norms().patterns, init="random"),
}


# ---------------------------------------------------------------- helpers


def adapted(tiny_dir, arch: str, quant: str, method: str = "lora", name: str = "a", seed: int = 1):
    model, _ = edgepeft.load_base(tiny_dir(arch), quant=quant)
    torch.manual_seed(0)
    add_adapter(model, CONFIGS[method](), name)
    perturb(adapter_parameters(model, name), seed)
    return model


def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def holders(model, name: str) -> list[str]:
    return [path for path, m in adapter_modules(model) if name in m]


# ---------------------------------------------------------------- full precision


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_full_precision_merge_equals_adapted_model(tiny_dir, input_ids, arch, method):
    model = adapted(tiny_dir, arch, "none", method)
    wrapped = holders(model, "a")

    merged, report = merge(model, "a", sample_input_ids=input_ids)

    measured = max_diff(logits(merged, input_ids), logits(model, input_ids))
    assert measured <= FULL_PRECISION_TOL
    assert report.max_abs_logit_delta == pytest.approx(measured, abs=1e-7)
    assert [row.name for row in report.layers] == wrapped
    assert report.max_rel_weight_error < 1e-6
    assert not any(isinstance(m, AdapterModule) for m in merged.modules())
    assert merged.edgepeft_merged == ["a"]
    if arch == "gpt2" and method != "selective":
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # GPT-2 layout kept


def test_modules_to_save_copy_is_swapped_in(tiny_dir, input_ids):
    model, _ = edgepeft.load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random", modules_to_save=("lm_head",)), "a")
    perturb(adapter_parameters(model, "a"), 1)
    trained_head = model.lm_head.copies["a"].weight.detach().clone()

    merged, report = merge(model, "a", sample_input_ids=input_ids)

    assert type(merged.lm_head) is nn.Linear
    assert torch.equal(merged.lm_head.weight, trained_head)
    assert max_diff(logits(merged, input_ids), logits(model, input_ids)) <= FULL_PRECISION_TOL
    assert "lm_head" in [row.name for row in report.layers]


# ---------------------------------------------------------------- quantized


@pytest.mark.parametrize("quant, bound", [("nf4", 0.2), ("int8", 0.02)])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_requantized_merge_reports_plausible_error(tiny_dir, input_ids, method, quant, bound):
    model = adapted(tiny_dir, "llama", "nf4", method)

    merged, report = merge(model, "a", quant=quant, sample_input_ids=input_ids)

    assert report.layers and all(row.storage == quant for row in report.layers)
    assert all(0 < row.rel_weight_error < bound for row in report.layers)
    for row in report.layers:
        assert is_quantized(merged.get_submodule(row.name))
    measured = max_diff(logits(merged, input_ids), logits(model, input_ids))
    assert 0 < measured == pytest.approx(report.max_abs_logit_delta, abs=1e-6)
    assert merged.edgepeft_base.quant == quant


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_merge_over_nf4_is_adapter_over_dequantized_weights(tiny_dir, input_ids, arch):
    model = adapted(tiny_dir, arch, "nf4", "lora")
    expected, untouched = {}, {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            A, B = module.lora_A["a"].weight, module.lora_B["a"].weight
            name = path.replace(".base_layer", "")
            expected[name] = dequantized_weight(module.innermost()) + (B @ A) * module.scaling["a"]
        elif is_quantized(module) and ".base_layer" not in path:
            untouched[path] = dequantized_weight(module)

    merged, _ = merge(model, "a", quant="none", sample_input_ids=input_ids)

    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) in (nn.Linear, Conv1D)
        torch.testing.assert_close(dequantized_weight(layer), weight, rtol=0, atol=1e-6)
    for name, weight in untouched.items():
        assert not is_quantized(merged.get_submodule(name))
        assert torch.equal(dequantized_weight(merged.get_submodule(name)), weight)
    assert max_diff(logits(merged, input_ids), logits(model, input_ids)) <= FULL_PRECISION_TOL


# ---------------------------------------------------------------- state handling


def test_copy_merge_leaves_the_callers_model_untouched(tiny_dir, input_ids):
    model = adapted(tiny_dir, "llama", "nf4", "lora")
    add_adapter(model, IA3Config(init="random"), "b")  # stacks on v_proj
    set_adapter(model, "a")
    before, modules = snapshot(model), dict(model.named_modules())
    before_logits = logits(model, input_ids)

    merged, _ = merge(model, "a", quant="nf4")

    assert merged is not model
    assert_same_state(model, before)
    assert dict(model.named_modules()) == modules  # the very same module objects
    assert list(list_adapters(model)) == ["a", "b"] and active_adapter(model) == "a"
    assert torch.equal(logits(model, input_ids), before_logits)


def test_merging_twice_is_a_no_op(tiny_dir, input_ids):
    merged, _ = merge(adapted(tiny_dir, "qwen2", "nf4"), "a", quant="nf4")
    before = snapshot(merged)

    again, report = merge(merged, "a", quant="nf4")

    assert again is merged and report.already_merged and not report.layers
    assert_same_state(merged, before)
    assert "already merged" in str(report)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_unmerge_restores_inplace_merge_bit_exactly(tiny_dir, input_ids, quant):
    model = adapted(tiny_dir, "llama", "nf4", "dora")
    add_adapter(model, IA3Config(init="random"), "b")  # stacks on v_proj, active after
    before, info = snapshot(model), model.edgepeft_base
    logits_b = logits(model, input_ids)

    merged, report = merge(model, "a", quant=quant, inplace=True)

    assert merged is model and report.dropped_adapters == ("b",)
    assert not any(isinstance(m, AdapterModule) for m in model.modules())
    assert model.edgepeft_merged == ["a"] and model.edgepeft_base.fingerprint != info.fingerprint

    unmerge(model)

    assert_same_state(model, before)
    assert list(list_adapters(model)) == ["a", "b"] and active_adapter(model) == "b"
    assert model.edgepeft_base == info and not hasattr(model, "edgepeft_merged")
    assert torch.equal(logits(model, input_ids), logits_b)
    with pytest.raises(MergeError, match="cannot unmerge"):
        unmerge(model)


def test_copy_merge_cannot_be_unmerged(tiny_dir):
    merged, _ = merge(adapted(tiny_dir, "llama", "none"), "a")
    with pytest.raises(MergeError, match="inplace=True"):
        unmerge(merged)


def test_merged_fingerprint_is_deterministic_and_tells_adapters_apart(tiny_dir):
    first = merge(adapted(tiny_dir, "llama", "nf4", seed=1), "a")[1].fingerprint
    same = merge(adapted(tiny_dir, "llama", "nf4", seed=1), "a")[1].fingerprint
    other = merge(adapted(tiny_dir, "llama", "nf4", seed=2), "a")[1].fingerprint
    base = edgepeft.fingerprint(adapted(tiny_dir, "llama", "nf4"))
    assert first == same and len({first, other, base}) == 3


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "inplace, keep_original", [(False, True), (True, True), (True, False)], ids=["copy", "kept", "freed"]
)
def test_nan_in_adapter_names_the_layer_and_changes_nothing(tiny_dir, inplace, keep_original):
    model = adapted(tiny_dir, "llama", "nf4", "lora")
    with torch.no_grad():  # the last layer, so earlier layers would already be merged
        model.model.layers[1].self_attn.v_proj.lora_B["a"].weight[0, 0] = float("nan")
    before, modules = snapshot(model), dict(model.named_modules())

    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        merge(model, "a", quant="nf4", inplace=inplace, keep_original=keep_original)

    assert_same_state(model, before)
    assert dict(model.named_modules()) == modules
    assert list(list_adapters(model)) == ["a"] and not hasattr(model, "edgepeft_merged")


@pytest.mark.parametrize(
    "config, words",
    [
        (BottleneckConfig(init="random"), "BOTTLENECK"),
        (PromptTuningConfig(num_virtual_tokens=3), "soft prompt or prefix"),
    ],
    ids=["bottleneck", "prompt"],
)
def test_unmergeable_method_is_refused_and_model_unchanged(tiny_dir, config, words):
    model = adapted(tiny_dir, "llama", "nf4", "lora")
    add_adapter(model, config, "x")
    before, modules = snapshot(model), dict(model.named_modules())

    with pytest.raises(MergeError, match=words) as caught:
        merge(model, "x", inplace=True)

    assert "keep the adapter separate" in str(caught.value).lower()
    assert_same_state(model, before)
    assert dict(model.named_modules()) == modules


def test_unknown_adapter_lists_the_adapters(tiny_dir):
    with pytest.raises(MergeError, match=r"no adapter named 'nope'.*\ba\b"):
        merge(adapted(tiny_dir, "llama", "none"), "nope")


def test_other_adapters_and_prompts_are_dropped_from_the_merged_copy(tiny_dir, input_ids):
    model = adapted(tiny_dir, "llama", "none", "lora")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "p")
    set_adapter(model, "a")

    merged, report = merge(model, "a")

    assert report.dropped_adapters == ("p",)
    assert not hasattr(merged, "edgepeft_prompts") and not merged._forward_pre_hooks
    assert max_diff(logits(merged, input_ids), logits(model, input_ids)) <= FULL_PRECISION_TOL


# ---------------------------------------------------------------- the report


def test_report_prints_a_table_and_serialises(tiny_dir):
    model = adapted(tiny_dir, "gpt2", "nf4", "lora")

    _, report = merge(model, "a", quant="nf4")

    data = json.loads(json.dumps(report.to_dict()))
    assert data["adapter"] == "a" and data["quant"] == "nf4"
    assert data["sample_shape"] == [2, 16]  # the default fixed-seed batch
    assert len(data["layers"]) == 2 and data["max_rel_weight_error"] == report.max_rel_weight_error
    text = str(report)
    assert "transformer.h.1.attn.c_attn" in text and "max |delta logit|" in text
