"""IA3: parity with HF peft both ways, quantized bases, gradients, merging, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgepeft import (
    IA3Config,
    adapter_parameters,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from edgepeft.adapters import ia3
from edgepeft.adapters.ia3 import IA3Layer
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import read_adapter
from edgepeft.architectures import ARCHITECTURES
from edgepeft.base import dequantized_weight, is_quantized, load_base, quantize_linears

ARCHS = ("llama", "qwen2", "gpt2")

PARITY_TOL = 1e-5
ADAPTER_EFFECT_MIN = 1e-2
"""An adapter must move the logits at least this much, so a parity check cannot pass
because the adapter did nothing."""

INT8_TOL = 3e-2
"""LLM.int8 in eval mode also rounds every activation row to int8 (absmax / 127) and
runs the matmul in fp16, which the fp32 reference over dequantized weights does not.
Measured max |logit diff| (logits of size ~1): llama 7.1e-3, qwen2 7.6e-3, gpt2 1.1e-2;
3e-2 leaves ~3x headroom, while the adapter itself moves the logits by ~1.6e-1.
(In training mode bnb dequantizes instead; that path is checked to 1e-5 below.)"""


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def _base(tiny_dir, arch: str, quant: str = "none"):
    model, _ = load_base(tiny_dir(arch), quant=quant)
    return model


def _with_random_ia3(tiny_dir, arch: str, quant: str = "none", **fields):
    model = _base(tiny_dir, arch, quant)
    torch.manual_seed(0)
    add_adapter(model, IA3Config(init="random", **fields))
    return model


def _peft_model(tiny_dir, arch: str, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    return PeftModel.from_pretrained(hf, folder).eval()


# ---------------------------------------------------------------- HF peft parity


@pytest.mark.parametrize(
    "arch, fields",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("gpt2", {}),
        # peft's IA3 ignores layers_to_transform and wraps every layer; the saved folder
        # must still give the same logits there (the extra vectors start at ones).
        ("llama", {"layers_to_transform": (1,), "exclude_modules": ("v_proj",)}),
        ("gpt2", {"target_modules": "all-linear", "feedforward_modules": ("mlp.c_proj",)}),
    ],
)
def test_edgepeft_folder_loads_in_peft_with_same_logits(tiny_dir, input_ids, tmp_path, arch, fields):
    model = _with_random_ia3(tiny_dir, arch, **fields)
    ours = _logits(model, input_ids)
    with disable_adapters(model):
        base = _logits(model, input_ids)
    save_adapter(model, tmp_path / "ia3")

    reference = _logits(_peft_model(tiny_dir, arch, tmp_path / "ia3"), input_ids)
    assert (ours - base).abs().max() > ADAPTER_EFFECT_MIN
    assert (ours - reference).abs().max() <= PARITY_TOL
    document = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert document["fan_in_fan_out"] is (arch == "gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_in_edgepeft_with_same_logits(tiny_dir, input_ids, tmp_path, arch):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    # peft's own defaults for the targets; init False gives random (non-identity) vectors.
    peft_model = get_peft_model(hf, PeftIA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    peft_model.eval()
    reference = _logits(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path / "peft")

    model = _base(tiny_dir, arch)
    base = _logits(model, input_ids)
    load_adapter(model, tmp_path / "peft")
    ours = _logits(model, input_ids)
    assert (reference - base).abs().max() > ADAPTER_EFFECT_MIN
    assert (ours - reference).abs().max() <= PARITY_TOL


@pytest.mark.parametrize(
    "arch, fields",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("gpt2", {}),
        ("llama", {"target_modules": "all-linear", "feedforward_modules": ("down_proj", "up_proj")}),
        ("llama", {"modules_to_save": ("lm_head",)}),
    ],
)
def test_trainable_count_equals_peft(tiny_dir, arch, fields):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = _with_random_ia3(tiny_dir, arch, **fields)
    peft_fields = ia3.to_peft(model.edgepeft_adapters["default"])
    peft_fields["fan_in_fan_out"] = arch == "gpt2"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir(arch)),
        PeftIA3Config(task_type="CAUSAL_LM", **peft_fields),
    )
    assert count_parameters(model) == peft_model.get_nb_trainable_parameters()[0]


# ---------------------------------------------------------------- quantized bases


def _dequantized_reference(tiny_dir, arch: str, quantized: nn.Module) -> nn.Module:
    """An fp32 model whose linear weights are the quantized model's dequantized ones."""
    reference = _base(tiny_dir, arch)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                name = name.replace(".base_layer", "")
                target = reference.get_submodule(name)
                weight = dequantized_weight(module)  # (out, in)
                target.weight.copy_(weight if isinstance(target, nn.Linear) else weight.t())
    return reference


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("quant, tol", [("nf4", PARITY_TOL), ("fp4", PARITY_TOL), ("int8", INT8_TOL)])
def test_quantized_base_equals_dequantized_fp32_base(tiny_dir, input_ids, tmp_path, arch, quant, tol):
    quantized = _with_random_ia3(tiny_dir, arch, quant)
    reference = _dequantized_reference(tiny_dir, arch, quantized)
    save_adapter(quantized, tmp_path / "ia3")
    load_adapter(reference, tmp_path / "ia3")

    ours = _logits(quantized, input_ids)
    with disable_adapters(quantized):
        base = _logits(quantized, input_ids)
    assert (ours - base).abs().max() > ADAPTER_EFFECT_MIN
    assert (ours - _logits(reference, input_ids)).abs().max() <= tol


def test_int8_training_path_equals_dequantized_fp32_base(tiny_dir, input_ids, tmp_path):
    # In training mode bnb's CPU int8 matmul dequantizes the weight and keeps activations
    # in fp32, so there the adapter must match to fp32 precision (llama has no dropout).
    quantized = _with_random_ia3(tiny_dir, "llama", "int8").train()
    reference = _dequantized_reference(tiny_dir, "llama", quantized).train()
    save_adapter(quantized, tmp_path / "ia3")
    load_adapter(reference, tmp_path / "ia3")
    assert (_logits(quantized, input_ids) - _logits(reference, input_ids)).abs().max() <= PARITY_TOL


def test_gradients_reach_only_ia3_vectors_over_nf4(tiny_dir, input_ids):
    model = _with_random_ia3(tiny_dir, "llama", "nf4")
    logits = model(input_ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()

    trained = adapter_parameters(model)
    assert len(trained) == 2 * 3  # 2 layers x (k_proj, v_proj, down_proj)
    for p in trained:
        assert p.grad is not None and p.grad.abs().max() > 0
    trained_ids = {id(p) for p in trained}
    for name, p in model.named_parameters():
        if id(p) not in trained_ids:
            assert p.grad is None, name


# ---------------------------------------------------------------- merging


def _layer(kind: str, quant: str) -> nn.Module:
    """A lone linear-like layer with a bias: nn.Linear or GPT-2 Conv1D, maybe quantized."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    layer = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts with a zero bias
    holder = nn.Sequential(layer)
    if quant != "none":
        quantize_linears(holder, quant, skip_modules=())
    return holder[0].requires_grad_(False)


@pytest.mark.parametrize("feedforward", [False, True], ids=["normal", "feedforward"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merge_update_gives_a_plain_linear_with_the_adapted_output(quant, kind, feedforward):
    base = _layer(kind, quant)
    original_weight = dequantized_weight(base)  # (out, in)
    original_bias = base.bias.detach().float().clone()
    wrapped = IA3Layer(base)
    torch.manual_seed(2)
    wrapped.add("a", feedforward=feedforward, init="random")
    wrapped.set_active("a")
    scale = wrapped.ia3_l["a"].detach()
    assert scale.shape == ((1, 32) if feedforward else (24, 1))

    update = wrapped.merge_update("a")
    merged = nn.Linear(32, 24)
    with torch.no_grad():
        merged.weight.copy_(update["weight"])
        merged.bias.copy_(update.get("bias", original_bias))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert (merged(x) - wrapped(x)).abs().max() <= 1e-6
        assert (merged(x) - base(x)).abs().max() > ADAPTER_EFFECT_MIN

    # Exact values: (out, in) * (out, 1) scales rows, * (1, in) columns; the bias only
    # follows the output.
    assert torch.equal(update["weight"], original_weight * scale)
    if feedforward:
        assert "bias" not in update
    else:
        assert torch.equal(update["bias"], original_bias * scale.flatten())
    delta = wrapped.delta_weight("a")
    assert (original_weight + delta - update["weight"]).abs().max() <= 1e-6


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch, quant", [("llama", "nf4"), ("gpt2", "none")])
def test_save_load_round_trip_is_bit_exact(tiny_dir, input_ids, tmp_path, arch, quant):
    model = _with_random_ia3(tiny_dir, arch, quant)
    save_adapter(model, tmp_path / "ia3")
    again = _base(tiny_dir, arch, quant)
    load_adapter(again, tmp_path / "ia3")

    saved = {path: m.tensors("default") for path, m in adapter_modules(model)}
    loaded = {path: m.tensors("default") for path, m in adapter_modules(again)}
    assert saved.keys() == loaded.keys() and saved
    for path, tensors in saved.items():
        assert tensors.keys() == loaded[path].keys() == {"ia3_l"}
        assert torch.equal(tensors["ia3_l"], loaded[path]["ia3_l"]), path
    assert torch.equal(_logits(model, input_ids), _logits(again, input_ids))
    config, _, _ = read_adapter(tmp_path / "ia3")
    assert config.target_modules == model.edgepeft_adapters["default"].target_modules
    assert config.feedforward_modules == model.edgepeft_adapters["default"].feedforward_modules


def test_switching_and_deleting_adapters(tiny_dir, input_ids):
    model = _base(tiny_dir, "llama")
    base = _logits(model, input_ids)
    torch.manual_seed(0)
    add_adapter(model, IA3Config(init="random"), "first")
    first = _logits(model, input_ids)
    # A second adapter on the same modules, rescaling down_proj's output this time.
    add_adapter(model, IA3Config(init="random", feedforward_modules=()), "second")
    second = _logits(model, input_ids)
    assert (first - second).abs().max() > ADAPTER_EFFECT_MIN

    set_adapter(model, "first")
    assert torch.equal(_logits(model, input_ids), first)
    delete_adapter(model, "first")
    delete_adapter(model, "second")
    assert not list(adapter_modules(model))
    assert torch.equal(_logits(model, input_ids), base)


# ---------------------------------------------------------------- errors


def test_feedforward_outside_targets_is_a_clear_error(tiny_dir):
    model = _base(tiny_dir, "llama")
    config = IA3Config(target_modules=("k_proj", "v_proj"), feedforward_modules=("down_proj",))
    with pytest.raises(ValueError, match=r"'down_proj' is not among the targets"):
        add_adapter(model, config)
    assert not list(adapter_modules(model))


def test_unknown_target_lists_close_names(tiny_dir):
    model = _base(tiny_dir, "llama")
    with pytest.raises(ValueError, match=r"'k_prj'.*closest names: .*k_proj"):
        add_adapter(model, IA3Config(target_modules=("k_prj",), feedforward_modules=()))
    assert not list(adapter_modules(model))


def test_regex_exclude_from_peft_is_refused():
    with pytest.raises(ValueError, match="exclude_modules as a list"):
        ia3.from_peft({"target_modules": ["k_proj"], "exclude_modules": ".*layers.0.*"})


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_targets_agree_with_peft(arch):
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    ours = ARCHITECTURES[arch]
    if arch not in PEFT_TARGETS:
        # peft has no IA3 default for phi3; edgepeft writes its targets into every folder.
        assert arch == "phi3"
        return
    assert set(ours.ia3_targets) == set(PEFT_TARGETS[arch])
    assert set(ours.ia3_feedforward) == set(PEFT_FEEDFORWARD[arch])
