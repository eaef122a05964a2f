"""The int4 base (int4_base.py, export/int4_codes.py): train over the int4 export's own codes.

one layer    Int4Linear.quantize(W, bits, s) ─ codes == DEFAULT_QUANTIZATION.quantize(W · s)
             forward == (x / s) @ dequantize_packed(codes)^T + b; backward; dtype casts
the base     load_base(quant="int4"): every decoder linear an Int4Linear at stored_bits,
             codes of the fp32 weights times the calibrated s; lm_head the export's int8
             table; nothing but adapters takes gradients, the codes never move; LoRA learns
export       the graph's MatMulNBits initializers == the base's buffers (base alone: packed
             and folded; separate: explicit); onnxruntime at accuracy_level 0 vs PyTorch
             int4 base + adapter <= 1e-4 relative, judged "int4 exact"; level 4 judged int4
bad input    an int4-trained adapter exported over an nf4 base is refused, naming both
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.nn import functional as F

from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import read_adapter, save_adapter
from edgepeft.base import describe_base, is_quantized, load_base
from edgepeft.config import LoraConfig
from edgepeft.export.api import export
from edgepeft.export.manifest import read_manifest
from edgepeft.export.verify.criteria import criteria_key
from edgepeft.export.weights import DEFAULT_QUANTIZATION, dequantize_packed
from edgepeft.int4_base import (
    METADATA_KEY,
    Int4Linear,
    codes_hash,
    estimate_bytes,
    int4_layers,
    member_scale,
    stored_bits,
)
from edgepeft.tiny import TINY_VOCAB

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_TOL = 1e-4


def _layer(bits: int, scaled: bool, seed: int = 0):
    """(Int4Linear of a (48, 96) weight: 3 blocks a row, an odd count, W, bias, s)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=g) * 0.1
    b = torch.randn(48, generator=g) * 0.1
    s = (
        np.exp(np.random.default_rng(seed).normal(0, 0.5, 96)).astype(np.float32)
        if scaled
        else None
    )
    return Int4Linear.quantize(w, b, bits, s), w, b, s


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "channel-scaled"])
def test_layer_holds_the_export_codes_and_computes_with_them(bits, scaled):
    layer, w, b, s = _layer(bits, scaled)
    scaled_w = w.numpy() * (s if scaled else 1)
    want = DEFAULT_QUANTIZATION.quantize(scaled_w, bits, 32)
    got = layer.packed()
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scales, want.scales)
    if want.zero_points is None:
        assert got.zero_points is None and bits == 8
    else:
        np.testing.assert_array_equal(got.zero_points, want.zero_points)

    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
    codes_w = torch.from_numpy(dequantize_packed(want))
    x_in = x * (1 / torch.from_numpy(s)) if scaled else x
    reference = F.linear(x_in, codes_w) + b
    y = layer(x)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    with torch.no_grad():  # the no-grad path decodes the same way
        torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (want_grad,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)

    # The effective weight merges and exports read: dequant(codes) / s, close to W.
    effective = layer.weight
    torch.testing.assert_close(effective * torch.from_numpy(s if scaled else np.ones(96, np.float32)),
                               codes_w, rtol=1e-6, atol=1e-7)  # fmt: skip
    assert (effective - w).norm() / w.norm() < (0.15 if bits == 4 else 0.02)

    layer.to(torch.bfloat16)  # the codes' scales and s stay fp32
    assert layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer.codes.dtype == torch.uint8
    if scaled:
        assert layer.input_scale.dtype == torch.float32


@pytest.fixture(scope="module")
def int4_llama(tiny_dir):
    model, tokenizer = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def fp32_llama(tiny_dir):
    return load_base(tiny_dir("llama"), quant="none", device="cpu")[0]


def test_load_base_int4_quantizes_the_fp32_weights_like_the_export(int4_llama, fp32_llama):
    model, _ = int4_llama
    layers = dict(int4_layers(model))
    assert len(layers) == 7 * model.config.num_hidden_layers  # every decoder linear
    info = model.edgepeft_int4
    assert info.channel_scales is not None and info.channel_scales.scales  # calibrated
    num_layers = model.config.num_hidden_layers
    for name, layer in layers.items():
        assert layer.bits == stored_bits(name, num_layers)
        s = member_scale(info.channel_scales, name)
        w = fp32_llama.get_submodule(name).weight.detach().numpy()
        want = DEFAULT_QUANTIZATION.quantize(w * s if s is not None else w, layer.bits, 32)
        np.testing.assert_array_equal(layer.codes.numpy(), want.codes, err_msg=name)
        np.testing.assert_array_equal(layer.scales.numpy(), want.scales, err_msg=name)
    # q|k|v hold the packed unit's bits: the tiny model's v_proj is int8, so all three are
    assert {layers[f"model.layers.0.self_attn.{m}_proj"].bits for m in "qkv"} == {8}
    # lm_head holds the int8 table the export stores, in fp32; the untied embedding (fp32
    # in the export) is the checkpoint's
    table = fp32_llama.lm_head.weight.detach().numpy()
    rounded = dequantize_packed(DEFAULT_QUANTIZATION.quantize(table, 8, 32))
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), rounded)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(
        model.get_input_embeddings().weight,
        fp32_llama.get_input_embeddings().weight,
        rtol=0,
        atol=0,
    )
    # frozen: no parameter trains
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(  # no fp32 linear weight is left in the decoder
        ".layers." in n and p.is_floating_point() and p.dim() == 2
        for n, p in model.named_parameters()
    )
    assert all(is_quantized(m) for m in layers.values())
    assert describe_base(model).quant == "int4"
    # the planner's bytes are what the base holds (scales counted for every group: a bound)
    held = describe_base(model).weight_bytes
    unscaled = sum(
        m.in_features * 4
        for n, m in layers.items()
        if member_scale(info.channel_scales, n) is None and not n.endswith("o_proj")
    )
    assert estimate_bytes(fp32_llama, 4) == held + unscaled


def test_only_adapters_learn_and_the_codes_never_move(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), "task")
    before = {n: t.clone() for n, t in [*model.named_buffers(), *model.named_parameters()]}
    trainable = adapter_parameters(model, "task")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert grads and all("lora_" in n for n in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < losses[0] - 0.05, losses
    for n, t in [*model.named_buffers(), *model.named_parameters()]:
        if "lora_" not in n:
            assert torch.equal(t, before[n]), n


def _lora(model, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _initializers(folder) -> dict[str, np.ndarray]:
    graph = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def _assert_codes_are_the_base(stored: dict, model, packed: bool) -> None:
    groups = {"self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": ("gate", "up")}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}"
        units = {
            f"{p}.self_attn.o_proj": ["self_attn.o_proj"],
            f"{p}.mlp.down_proj": ["mlp.down_proj"],
        }
        for unit, members in groups.items():
            names = [unit.split(".")[0] + f".{m}_proj" for m in members]
            if packed:
                units[f"{p}.{unit}"] = names
            else:
                units.update({f"{p}.{n}": [n] for n in names})
        for unit, members in units.items():
            layers = [model.get_submodule(f"{p}.{m}") for m in members]
            layers = [getattr(m, "base_layer", m) for m in layers]
            bits = layers[0].bits
            for field, key in (
                ("codes", f"q{bits}"),
                ("scales", "scales"),
                ("zero_points", "zero_points"),
            ):
                held = [getattr(m, field) for m in layers]
                if held[0] is None:
                    assert f"{unit}.weight.{key}" not in stored
                    continue
                want = np.concatenate([t.numpy() for t in held])
                np.testing.assert_array_equal(stored[f"{unit}.weight.{key}"], want, err_msg=unit)


def test_export_writes_the_base_codes_bit_for_bit(int4_llama, tmp_path):
    model, tokenizer = int4_llama
    out = tmp_path / "base"
    result = export(model, out, weights="int4", accuracy_level=1, tokenizer=tokenizer, quiet=True)
    _assert_codes_are_the_base(_initializers(out), model, packed=True)
    manifest = read_manifest(out)
    assert manifest.base_quant == "int4"
    check = result.verify.graphs[0]
    assert check.criteria == "int4 exact" and check.passed, result.verify
    assert check.relative_max_diff <= REL_TOL


def test_separate_adapter_runs_on_the_training_base(tiny_dir, int4_llama, tmp_path):
    model, _ = int4_llama
    trained, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    assert codes_hash(trained) == codes_hash(model)  # loading is deterministic
    _lora(trained, "task", seed=1)
    folder = save_adapter(trained, tmp_path / "task", "task")
    recorded = json.loads(read_adapter(folder)[2][METADATA_KEY])
    assert recorded == {
        "block_size": 32, "method": "search", "symmetric": False, "mixed": True,
        "float_zero_points": False, "activation_aware": True, "codes_sha256": codes_hash(model),
    }  # fmt: skip

    # From the folder: the adapter's record loads the base int4 again (never streamed).
    out = tmp_path / "separate"
    result = export(
        tiny_dir("llama"), out, {"task": folder}, weights="int4", mode="separate",
        accuracy_level=0, quiet=True,
    )  # fmt: skip
    adapted = [m for m in trained.modules() if hasattr(m, "base_layer")]
    assert adapted
    _assert_codes_are_the_base(_initializers(out), model, packed=True)  # packed LoRA slots
    checks = result.verify.graphs
    assert {c.criteria for c in checks} == {"int4 exact"}
    assert all(c.passed and c.relative_max_diff <= REL_TOL for c in checks), result.verify

    # onnxruntime with the adapter file vs the training model itself (Int4Linear forward)
    manifest = read_manifest(out)
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, (2, 11)).astype(np.int64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(out / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    adapter = ort.LoraAdapter()
    adapter.Load(str(out / manifest.adapters[0].file))
    run = ort.RunOptions()
    run.add_active_adapter(adapter)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((2, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
    got = session.run(["logits"], feed, run)[0]
    with torch.no_grad():
        want = trained(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()


def test_int4_adapter_over_another_quantization_is_refused(tiny_dir, tmp_path):
    trained, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    _lora(trained, "task", seed=2)
    folder = save_adapter(trained, tmp_path / "task", "task")
    with pytest.raises(ValueError, match=r"trained over an int4 .* quantized 'nf4'.*quant='int4'"):
        export(tiny_dir("llama"), tmp_path / "out", {"task": folder}, mode="separate",
               quant="nf4", verify=False, quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_int4_exact_only_with_fp32_activations_and_the_base_codes(tiny_dir, int4_llama, tmp_path):
    model, tokenizer = int4_llama
    manifest = read_manifest(
        export(
            model, tmp_path / "l4", weights="int4", tokenizer=tokenizer, verify=False, quiet=True
        ).out_dir
    )
    assert manifest.accuracy_level == 4 and criteria_key(manifest) == "int4"  # int8 activations
    from dataclasses import replace

    assert criteria_key(replace(manifest, accuracy_level=1)) == "int4 exact"
    assert manifest.quantization["codes"] == "base"
    assert criteria_key(replace(manifest, quantization=None, accuracy_level=0)) == "int4"
    with pytest.raises(ValueError, match="blocks of 32"):
        export(model, tmp_path / "b64", weights="int4", block_size=64, verify=False, quiet=True)


def test_planner_estimate_within_20_percent_of_a_measured_int4_step():
    from transformers import AutoConfig

    from edgepeft.base import quantize_int4
    from edgepeft.tiny import tiny_model
    from edgepeft.train.data import Batch
    from edgepeft.train.loop import accumulate_gradients
    from edgepeft.train.memory import estimate_memory, measure_peak

    shape = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)  # fmt: skip
    model = tiny_model("llama", **shape)
    quantize_int4(model, tokenizer=None)  # no tokenizer: no channel scales (the bound's slack)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=8)
    add_adapter(model, lora, "task")
    optimizer = torch.optim.AdamW(adapter_parameters(model, "task"), lr=1e-4)
    ids = torch.randint(3, 2048, (2, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 64:] = 0
    batch = Batch(ids, mask, ids.masked_fill(mask == 0, -100))
    model.train()

    def step():
        accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state then lives through the measured step
    measured = measure_peak(step)
    estimate = estimate_memory(
        AutoConfig.for_model("llama", **shape), quant="int4", adapter_config=lora,
        batch_size=2, seq_len=128,
    )  # fmt: skip
    assert 0.8 <= estimate.total / measured <= 1.2, f"{estimate.total} vs {measured}\n{estimate}"


def test_train_configs_and_the_cli_take_int4():
    from edgepeft.cli.common import QUANT_CHOICES
    from edgepeft.train.run_config import from_dict

    config = {"model": "m", "data": {"train": "t.jsonl"}, "output_dir": "o", "quant": "int4",
              "method": {"type": "lora"}}  # fmt: skip
    assert from_dict(config).quant == "int4"
    assert "int4" in QUANT_CHOICES


@pytest.mark.gpu
def test_cuda_computes_with_the_same_codes(tiny_dir, int4_llama):
    model, _ = int4_llama
    cuda, _ = load_base(tiny_dir("llama"), quant="int4", device="cuda", compute_dtype=torch.float32)
    assert codes_hash(cuda) == codes_hash(model)  # quantized on the CPU whatever the device
    ids = torch.randint(3, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        got = cuda(ids.cuda()).logits.cpu()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    _lora(cuda, "task", seed=3)
    cuda.train()
    loss = cuda(input_ids=ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(cuda, "task"))


def test_a_generic_graph_rounds_again_and_is_judged_so(tiny_dir, tmp_path):
    model, tokenizer = load_base(tiny_dir("gpt2"), quant="int4", device="cpu")
    assert model.edgepeft_int4.channel_scales is None  # gpt2: no channel scales
    result = export(model, tmp_path / "gpt2", weights="int4", accuracy_level=1,
                    tokenizer=tokenizer, quiet=True)  # fmt: skip
    check = result.verify.graphs[0]
    assert read_manifest(tmp_path / "gpt2").graph == "generic"
    assert check.criteria == "int4" and check.passed  # the traced graph re-rounds W / s
