"""LoRA / rsLoRA / DoRA parity with HF peft 0.21, both ways, on every tiny architecture.

    edgepeft add_adapter ──save_adapter──► folder ──PeftModel.from_pretrained──► peft logits
    peft get_peft_model ──save_pretrained──► folder ──load_adapter──► edgepeft logits
                                  compare: max |Δ logits| <= 1e-5 (fp32)

Adapters are random and then perturbed (A, B and the DoRA magnitude), so every
term of the math shows up in the logits. Quantized bases are compared with an
fp32 model holding the dequantized weights, and with peft over a transformers-built
bitsandbytes model.
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import ALL_ARCHS
from peft import PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import edgepeft
from edgepeft import LoraConfig
from edgepeft.adapters.inject import adapter_parameters, count_parameters, list_adapters
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.lora import LoraLayer
from edgepeft.architectures import ARCHITECTURES
from edgepeft.base import dequantized_weight, is_quantized, set_submodule

TOL = 1e-5


# ---------------------------------------------------------------- helpers


def hf_model(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(params, seed: int = 1) -> None:
    """Move every adapter tensor off its init so B, A and the magnitude all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def edgepeft_lora(folder, config: LoraConfig, quant: str = "none", seed: int = 0, **base_kwargs):
    model, _ = edgepeft.load_base(folder, quant=quant, **base_kwargs)
    torch.manual_seed(seed)
    edgepeft.add_adapter(model, config)
    perturb(adapter_parameters(model), seed + 1)
    return model


def adapted_names(model) -> set[str]:
    """Module paths carrying LoRA, for both libraries (peft's paths lose its two prefixes)."""
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) or isinstance(module, peft.tuners.lora.LoraLayer):
            names.add(path.replace(".base_layer", "").removeprefix("base_model.model."))
    return names


def peft_lora_kwargs(arch: str) -> dict:
    # peft needs fan_in_fan_out=True for GPT-2's Conv1D; edgepeft writes it itself.
    return {"fan_in_fan_out": arch == "gpt2"}


# ---------------------------------------------------------------- default targets


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_default_targets_agree_with_peft(arch, tiny_dir):
    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(arch)
    ours = ARCHITECTURES[arch].lora_targets
    if peft_default is not None:
        assert set(ours) == set(peft_default)
        return
    # peft 0.21 has no default for phi3 and refuses target_modules=None; edgepeft
    # picks the fused qkv_proj (the llama-like q+v choice) and always writes its
    # targets into adapter_config.json, so peft still loads what edgepeft saves.
    assert arch == "phi3" and ours == ("qkv_proj",)
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(hf_model(tiny_dir(arch)), peft.LoraConfig(r=2))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_default_targets_edgepeft_to_peft(arch, tiny_dir, input_ids, tmp_path):
    folder = tiny_dir(arch)
    ours = edgepeft_lora(folder, LoraConfig(r=4, alpha=8, init="random"))
    edgepeft.save_adapter(ours, tmp_path / "a")
    reference = PeftModel.from_pretrained(hf_model(folder), tmp_path / "a").eval()

    assert adapted_names(ours) == adapted_names(reference)
    assert max_diff(logits(ours, input_ids), logits(reference, input_ids)) <= TOL
    assert max_diff(logits(ours, input_ids), logits(hf_model(folder), input_ids)) > 1e-3


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_default_targets_peft_to_edgepeft(arch, tiny_dir, input_ids, tmp_path):
    folder = tiny_dir(arch)
    targets = None if arch != "phi3" else ["qkv_proj"]  # see test_default_targets_agree_with_peft
    torch.manual_seed(0)
    reference = get_peft_model(
        hf_model(folder),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=targets,
            **peft_lora_kwargs(arch),
        ),
    ).eval()
    reference.save_pretrained(tmp_path / "b")
    ours, _ = edgepeft.load_base(folder, quant="none")
    edgepeft.load_adapter(ours, tmp_path / "b")

    assert adapted_names(ours) == adapted_names(reference)
    assert max_diff(logits(ours, input_ids), logits(reference, input_ids)) <= TOL


# ---------------------------------------------------------------- every math-changing field

_LLAMA_LIKE_NAMES = dict(
    attn="q_proj",
    other="v_proj",
    out="o_proj",
    ffn="down_proj",
    layers="layers",
    regex=r"model\.layers\.\d+\.self_attn\.(q|k)_proj",
)
_NAMES = {
    "llama": _LLAMA_LIKE_NAMES,
    "qwen2": _LLAMA_LIKE_NAMES,
    "gpt2": dict(
        attn="c_attn",
        other="c_fc",
        out="attn.c_proj",
        ffn="mlp.c_proj",
        layers="h",
        regex=r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
    ),
}


def _field_cases(n: dict) -> dict[str, tuple[dict, dict]]:
    """case id -> (edgepeft LoraConfig kwargs, peft LoraConfig kwargs), same meaning."""
    two = (n["attn"], n["other"])
    layer1_attn = rf"{n['layers']}\.1\..*{n['attn'].split('.')[-1]}"
    return {
        "plain": (dict(target_modules=two), dict(target_modules=list(two))),
        "rank_pattern": (
            dict(target_modules=two, rank_pattern={layer1_attn: 6, n["other"]: 2}),
            dict(target_modules=list(two), rank_pattern={layer1_attn: 6, n["other"]: 2}),
        ),
        "alpha_pattern": (
            dict(target_modules=two, alpha_pattern={layer1_attn: 32, n["other"]: 3}),
            dict(target_modules=list(two), alpha_pattern={layer1_attn: 32, n["other"]: 3}),
        ),
        "rslora": (
            dict(target_modules=two, use_rslora=True),
            dict(target_modules=list(two), use_rslora=True),
        ),
        "dora": (
            dict(target_modules=two, use_dora=True),
            dict(target_modules=list(two), use_dora=True),
        ),
        "gaussian": (
            dict(target_modules=two, init="gaussian"),
            dict(target_modules=list(two), init_lora_weights="gaussian"),
        ),
        "regex": (dict(target_modules=n["regex"]), dict(target_modules=n["regex"])),
        "all_linear": (dict(target_modules="all-linear"), dict(target_modules="all-linear")),
        "layers_to_transform": (
            dict(
                target_modules=(*two, n["out"]),
                layers_to_transform=(1,),
                layers_pattern=n["layers"],
            ),
            dict(
                target_modules=[*two, n["out"]], layers_to_transform=[1], layers_pattern=n["layers"]
            ),
        ),
        "layers_to_transform_default_pattern": (
            dict(target_modules=two, layers_to_transform=(0,)),
            dict(target_modules=list(two), layers_to_transform=[0]),
        ),
        "exclude_modules": (
            dict(target_modules="all-linear", exclude_modules=(n["out"], n["ffn"])),
            dict(target_modules="all-linear", exclude_modules=[n["out"], n["ffn"]]),
        ),
        "modules_to_save": (
            dict(target_modules=two, modules_to_save=("lm_head",)),
            dict(target_modules=list(two), modules_to_save=["lm_head"]),
        ),
    }


_FIELD_PARAMS = [
    (arch, case) for arch in ("llama", "qwen2", "gpt2") for case in _field_cases(_NAMES[arch])
]


@pytest.mark.parametrize(("arch", "case"), _FIELD_PARAMS)
def test_config_field_parity(arch, case, tiny_dir, input_ids, tmp_path):
    folder = tiny_dir(arch)
    ours_kwargs, peft_kwargs = _field_cases(_NAMES[arch])[case]
    common = dict(r=4, alpha=8)

    # (a) edgepeft -> peft
    init = ours_kwargs.pop("init", "random")
    ours = edgepeft_lora(folder, LoraConfig(**common, init=init, **ours_kwargs))
    edgepeft.save_adapter(ours, tmp_path / "a")
    loaded = PeftModel.from_pretrained(hf_model(folder), tmp_path / "a").eval()
    assert adapted_names(ours) == adapted_names(loaded)
    diff_a = max_diff(logits(ours, input_ids), logits(loaded, input_ids))
    assert diff_a <= TOL, f"edgepeft -> peft: {diff_a}"

    # (b) peft -> edgepeft; also checks that both count the same trainable parameters
    init = peft_kwargs.pop("init_lora_weights", False)
    torch.manual_seed(0)
    reference = get_peft_model(
        hf_model(folder),
        peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=init, **peft_kwargs, **peft_lora_kwargs(arch)
        ),
    ).eval()
    perturb(peft_trainable(reference))
    reference.save_pretrained(tmp_path / "b")
    mine, _ = edgepeft.load_base(folder, quant="none")
    edgepeft.load_adapter(mine, tmp_path / "b")
    assert adapted_names(mine) == adapted_names(reference)
    assert count_parameters(mine) == reference.get_nb_trainable_parameters()[0]
    assert count_parameters(ours) == reference.get_nb_trainable_parameters()[0]
    diff_b = max_diff(logits(mine, input_ids), logits(reference, input_ids))
    assert diff_b <= TOL, f"peft -> edgepeft: {diff_b}"
    assert max_diff(logits(mine, input_ids), logits(hf_model(folder), input_ids)) > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules="all-linear", layers_to_transform=(1,)),
        dict(target_modules=r".*q_proj", layers_pattern="layers", layers_to_transform=(1,)),
        dict(target_modules=("q_proj",), layers_pattern="layers"),
    ],
)
def test_layer_selections_peft_refuses_are_refused(kwargs, tiny_dir):
    """peft cannot read these configs back, so edgepeft must not write them."""
    model, _ = edgepeft.load_base(tiny_dir("llama"), quant="none")
    with pytest.raises(ValueError, match="layers_"):
        edgepeft.add_adapter(model, LoraConfig(**kwargs))
    assert not list_adapters(model)


def test_gaussian_init_matches_peft_distribution(tiny_dir):
    model, _ = edgepeft.load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    edgepeft.add_adapter(model, LoraConfig(r=4, init="gaussian", target_modules="all-linear"))
    a = torch.cat([m.lora_A["default"].weight.flatten() for _, m in adapter_modules(model)])
    b = torch.cat([m.lora_B["default"].weight.flatten() for _, m in adapter_modules(model)])
    assert abs(a.std().item() - 1 / 4) < 0.01  # peft: normal, std 1/r
    assert torch.count_nonzero(b) == 0


def test_dropout_in_train_mode_matches_peft(tiny_dir, input_ids, tmp_path):
    """Same seed, same dropout masks: one dropout call per adapted module, in model order."""
    folder = tiny_dir("llama")
    for use_dora in (False, True):
        ours = edgepeft_lora(
            folder,
            LoraConfig(
                r=4, init="random", dropout=0.3, use_dora=use_dora, target_modules="all-linear"
            ),
        )
        edgepeft.save_adapter(ours, tmp_path / str(use_dora))
        reference = PeftModel.from_pretrained(hf_model(folder), tmp_path / str(use_dora))
        ours.train(), reference.train()
        torch.manual_seed(5)
        mine = logits(ours, input_ids)
        torch.manual_seed(5)
        theirs = logits(reference, input_ids)
        assert max_diff(mine, theirs) <= TOL
        ours.eval()
        assert max_diff(mine, logits(ours, input_ids)) > 1e-4  # dropout was really on


# ---------------------------------------------------------------- quantized bases


def dequantized_twin(folder, quantized) -> torch.nn.Module:
    """An fp32 model whose quantized linears are replaced by their dequantized weights."""
    twin, _ = edgepeft.load_base(folder, quant="none")
    for name, module in quantized.named_modules():
        if not is_quantized(module):
            continue
        name = name.replace(".base_layer", "")  # the quantized model already wears adapters
        plain = twin.get_submodule(name)
        linear = torch.nn.Linear(
            *dequantized_weight(module).shape[::-1], bias=module.bias is not None
        )
        with torch.no_grad():
            linear.weight.copy_(dequantized_weight(module))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        assert plain.weight.numel() == linear.weight.numel()
        set_submodule(twin, name, linear)
    return twin


# int8 (LLM.int8) also quantizes activations, row-wise to 8 bits, so it cannot equal
# an fp32 matmul with the dequantized weight. Measured here (llama, all-linear, logits
# of max |.| ~0.9): the base alone differs by 6.7e-3; with the random, perturbed r=4
# adapter by 3.2e-2 (LoRA; its larger activations carry larger absolute int8 error)
# and 5.2e-3 (DoRA). 0.06 is ~2x the worst. The adapter's own path is exact fp32,
# which `test_lora_path_over_int8_is_exact_fp32` checks layer by layer at 1e-5.
INT8_TOL = 0.06


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_over_quantized_base_equals_dequantized_fp32(
    quant, use_dora, tiny_dir, input_ids, tmp_path
):
    folder = tiny_dir("llama")
    config = LoraConfig(r=4, alpha=8, init="random", use_dora=use_dora, target_modules="all-linear")
    quantized = edgepeft_lora(folder, config, quant=quant)
    quantized.eval()  # an eval forward must not switch bnb to another kernel
    edgepeft.save_adapter(quantized, tmp_path / "adapter")
    twin = dequantized_twin(folder, quantized)
    with edgepeft.disable_adapters(quantized):
        base_gap = max_diff(logits(twin, input_ids), logits(quantized, input_ids))
    edgepeft.load_adapter(twin, tmp_path / "adapter")

    diff = max_diff(logits(quantized, input_ids), logits(twin, input_ids))
    if quant == "int8":
        assert 0 < base_gap <= INT8_TOL and diff <= INT8_TOL, (diff, base_gap)
    else:
        assert diff <= TOL and base_gap == 0, (diff, base_gap)
    assert max_diff(logits(twin, input_ids), logits(hf_model(folder), input_ids)) > 1e-3


def test_lora_path_over_int8_is_exact_fp32(tiny_dir):
    """Whatever int8 does to the base matmul, LoRA adds exactly s * B A x on top of it."""
    model = edgepeft_lora(
        tiny_dir("llama"), LoraConfig(r=4, init="random", target_modules="all-linear"), quant="int8"
    )
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    checked = 0
    for _, layer in adapter_modules(model):
        if layer.innermost().in_features != 64:
            continue
        with torch.no_grad():
            added = layer(x) - layer.base_layer(x)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            expected = x @ A.T @ B.T * layer.scaling["default"]  # (2, 5, out)
        assert max_diff(added, expected) <= TOL
        checked += 1
    assert checked >= 10


def transformers_nf4(folder) -> torch.nn.Module:
    """llama quantized by transformers' own bitsandbytes integration, on CPU, fp32 compute."""
    import bitsandbytes as bnb

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map="cpu", dtype=torch.float32
    ).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16 bnb would repack the weight at the first eval
            # forward and compute in bf16 from then on, ignoring the fp32 compute dtype;
            # edgepeft's own layers opt out the same way.
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_nf4_matches_peft_over_transformers_bnb(use_dora, tiny_dir, input_ids, tmp_path):
    folder = tiny_dir("llama")
    # transformers quantizes without double quantization unless asked: match it.
    base_kwargs = dict(double_quant=False)

    torch.manual_seed(0)
    reference = get_peft_model(
        transformers_nf4(folder),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            use_dora=use_dora,
            target_modules="all-linear",
        ),
    ).eval()
    perturb(peft_trainable(reference))
    reference.save_pretrained(tmp_path / "b")
    ours, _ = edgepeft.load_base(folder, quant="nf4", **base_kwargs)
    edgepeft.load_adapter(ours, tmp_path / "b")
    assert max_diff(logits(ours, input_ids), logits(reference, input_ids)) <= TOL

    mine = edgepeft_lora(
        folder,
        LoraConfig(r=4, init="random", use_dora=use_dora, target_modules="all-linear"),
        quant="nf4",
        **base_kwargs,
    )
    edgepeft.save_adapter(mine, tmp_path / "a")
    loaded = PeftModel.from_pretrained(transformers_nf4(folder), tmp_path / "a").eval()
    assert max_diff(logits(mine, input_ids), logits(loaded, input_ids)) <= TOL


def test_dequantized_weight_reads_a_layer_bnb_repacked_for_cpu(tiny_dir, input_ids):
    """DoRA and merges read the base through dequantized_weight, also after bnb's CPU repack."""
    import bitsandbytes as bnb

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), quantization_config=quant, device_map="cpu", dtype=torch.float32
    ).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [dequantized_weight(m) for m in layers]
    logits(model, input_ids)
    if not getattr(layers[0].weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack for the CPU bf16 kernel on this machine")
    after = [dequantized_weight(m) for m in layers]
    for b, a in zip(before, after, strict=True):
        # the repack rounds the block scales to bf16: relative error <= 2^-8
        assert ((a - b).abs() <= b.abs() * 2**-8 + 1e-7).all()
    packed = layers[0].weight.data.clone()
    dequantized_weight(layers[0])
    assert torch.equal(layers[0].weight.data, packed)  # the layer was left as it was


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gradients_over_nf4_reach_only_the_adapter(use_dora, tiny_dir, input_ids):
    model = edgepeft_lora(
        tiny_dir("llama"),
        LoraConfig(r=4, init="random", use_dora=use_dora, dropout=0.2, target_modules="all-linear"),
        quant="nf4",
    )
    model.train()
    first = model(input_ids).logits
    first.float().pow(2).mean().backward()
    trained = {id(p) for p in adapter_parameters(model)}
    assert trained
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    with torch.no_grad():
        second = model(input_ids).logits
    assert max_diff(first.detach(), second) > 1e-4  # dropout draws new masks in train mode
    model.eval()
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_save_load_round_trip_is_bit_exact(quant, use_dora, tiny_dir, input_ids, tmp_path):
    folder = tiny_dir("qwen2")
    config = LoraConfig(
        r=4,
        init="random",
        use_dora=use_dora,
        target_modules="all-linear",
        rank_pattern={"o_proj": 2},
        modules_to_save=("lm_head",),
    )
    model = edgepeft_lora(folder, config, quant=quant)
    edgepeft.save_adapter(model, tmp_path / "adapter")
    again, _ = edgepeft.load_base(folder, quant=quant)
    edgepeft.load_adapter(again, tmp_path / "adapter")

    assert list_adapters(again)["default"] == list_adapters(model)["default"]
    saved, loaded = adapter_parameters(model), adapter_parameters(again)
    assert len(saved) == len(loaded)
    for a, b in zip(saved, loaded, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(logits(model, input_ids), logits(again, input_ids))
