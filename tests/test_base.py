"""The frozen base: quantized loading on every architecture, fingerprint, bad input, describe_base."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ALL_ARCHS
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from edgepeft.base import (
    _SAMPLES_PER_TENSOR,
    dequantized_weight,
    describe_base,
    is_linear_like,
    is_quantized,
    load_base,
)
from edgepeft.tiny import save_tiny_model, tiny_model

CASES = [("llama", q) for q in ("none", "nf4", "fp4", "int8")] + [
    (arch, "nf4") for arch in ALL_ARCHS if arch != "llama"
]

# Max |logits - fp32 logits| measured on the tiny models (input_ids fixture):
# nf4 0.12-0.26 (logits up to ~0.95), fp4 0.19, int8 0.008. Random tiny weights
# quantize badly; these bounds catch a broken layer, not a small precision change.
LOGIT_TOLERANCE = {"nf4": 0.4, "fp4": 0.4, "int8": 0.03, "none": 0.0}


@pytest.fixture(scope="module")
def fp32_logits(tiny_dir, input_ids):
    cache = {}

    def get(arch):
        if arch not in cache:
            model, _ = load_base(tiny_dir(arch), quant="none")
            with torch.no_grad():
                cache[arch] = model(input_ids).logits
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def input_ids():
    from edgepeft.tiny import TINY_VOCAB

    return torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("arch", "quant"), CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_load_base_freezes_quantizes_and_runs(arch, quant, tiny_dir, input_ids, fp32_logits):
    import bitsandbytes as bnb

    model, tokenizer = load_base(tiny_dir(arch), quant=quant)
    assert tokenizer is not None
    assert all(not p.requires_grad for p in model.parameters())

    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    assert "lm_head" in linears and type(head) is nn.Linear and not is_quantized(head)
    body = {n: m for n, m in linears.items() if n != "lm_head"}
    assert body
    expected_type = {
        "nf4": bnb.nn.Linear4bit,
        "fp4": bnb.nn.Linear4bit,
        "int8": bnb.nn.Linear8bitLt,
    }
    for name, module in body.items():
        if quant == "none":
            assert not is_quantized(module), name
        else:
            assert isinstance(module, expected_type[quant]), name
            if quant != "int8":
                assert module.weight.quant_type == quant
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding) and embeddings.weight.dtype == torch.float32
    assert head.weight.dtype == torch.float32

    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 9, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    diff = (logits - fp32_logits(arch)).abs().max().item()
    assert diff <= LOGIT_TOLERANCE[quant], f"{arch} {quant}: max |diff| {diff:.4f}"


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_forward_is_fp32_forward_on_dequantized_weights(quant, tiny_dir, input_ids):
    """The only difference from fp32 is the rounding of the weights.

    Measured max |diff|: nf4 0.0 (bit-identical), int8 0.0066.
    """
    quantized, _ = load_base(tiny_dir("llama"), quant=quant)
    reference, _ = load_base(tiny_dir("llama"), quant="none")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                reference.get_submodule(name).weight.copy_(dequantized_weight(module))
        got, want = quantized(input_ids).logits, reference(input_ids).logits
    # int8's matmul rounds activations to int8 too (LLM.int8), so it is looser.
    tolerance = 1e-5 if quant == "nf4" else 0.02
    assert (got - want).abs().max().item() <= tolerance


def test_unknown_quant_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="quant must be one of .*'nf3'"):
        load_base(tiny_dir("llama"), quant="nf3")


# ---------------------------------------------------------------- fingerprint


def _fingerprint(folder, **kwargs) -> str:
    model, _ = load_base(folder, **kwargs)
    return model.edgepeft_base.fingerprint


def _rewrite_weights(folder, edit) -> None:
    """Apply `edit(dict of tensors)` to the folder's model.safetensors, keeping its metadata."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_fingerprint_stable_across_loads_and_quant_types(tiny_dir):
    folder = tiny_dir("llama")
    first = _fingerprint(folder, quant="none")
    assert len(first) == 16
    assert _fingerprint(folder, quant="none") == first
    for quant in ("nf4", "fp4", "int8"):
        assert _fingerprint(folder, quant=quant) == first, quant
    # Recorded from the weights as stored, before the cast to the compute dtype.
    assert _fingerprint(folder, quant="none", compute_dtype=torch.bfloat16) == first


def test_fingerprint_of_a_bf16_copy(tiny_dir, tmp_path):
    """Sampled values are hashed as fp32: a bf16 save rounds them, so the id changes;
    the same bf16-rounded values saved in fp32 give the bf16 folder's id."""
    fp32_id = _fingerprint(tiny_dir("llama"), quant="none")
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    model.to(torch.float32).save_pretrained(tmp_path / "rounded_fp32", safe_serialization=True)
    bf16_id = _fingerprint(tmp_path / "bf16", quant="none")
    assert bf16_id != fp32_id
    assert _fingerprint(tmp_path / "rounded_fp32", quant="none") == bf16_id


def test_fingerprint_differs_for_another_seed(tiny_dir, tmp_path):
    other = save_tiny_model(tmp_path / "seed1", "llama", seed=1)
    assert _fingerprint(other, quant="none") != _fingerprint(tiny_dir("llama"), quant="none")


@pytest.mark.parametrize(
    ("key", "index"),
    [
        ("model.norm.weight", 7),  # 64 values: hashed in full
        ("model.embed_tokens.weight", 0),  # 384 * 64 values: index 0 is always sampled
    ],
)
def test_fingerprint_follows_weight_edits(key, index, tiny_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir("llama"), folder)

    def edit(tensors):
        tensors[key].view(-1)[index] += 0.5

    _rewrite_weights(folder, edit)
    assert _fingerprint(folder, quant="none") != _fingerprint(tiny_dir("llama"), quant="none")


def test_fingerprint_misses_unsampled_values(tiny_dir, tmp_path):
    """Documented limit: large tensors are hashed through 4096 evenly spaced samples,
    so an edit between two samples leaves the id unchanged."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir("llama"), folder)
    numel = 384 * 64
    step = (numel - 1) / (_SAMPLES_PER_TENSOR - 1)
    unsampled = int(step) // 2 + 1  # strictly between samples 0 and 1
    assert step > 2 and 0 < unsampled < int(step)

    def edit(tensors):
        tensors["model.embed_tokens.weight"].view(-1)[unsampled] += 0.5

    _rewrite_weights(folder, edit)
    assert _fingerprint(folder, quant="none") == _fingerprint(tiny_dir("llama"), quant="none")


# ---------------------------------------------------------------- bad input


def test_folder_with_only_pickled_weights_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_dir("llama") / "config.json", folder)
    torch.save(tiny_model("llama").state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_base(folder, quant="none")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "never unpickles" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_names_the_file(damage, tiny_dir, tmp_path):
    folder = tmp_path / damage
    shutil.copytree(tiny_dir("llama"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ValueError) as err:
        load_base(folder, quant="none")
    assert str(weights) in str(err.value)


def test_hub_id_offline_asks_for_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # the id must not resolve to a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set the value it uses too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError) as err:
        load_base("edgepeft-tests/no-such-model", quant="none")
    message = str(err.value)
    assert "edgepeft-tests/no-such-model" in message and "local folder" in message


# ---------------------------------------------------------------- describe_base


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_describe_base_counts_and_bytes(arch, tiny_dir):
    reference = tiny_model(arch)
    unique_params = sum(p.numel() for p in reference.parameters())  # a tied weight once
    n_linear = sum(1 for m in reference.modules() if is_linear_like(m))
    reports = {
        q: describe_base(load_base(tiny_dir(arch), quant=q)[0]) for q in ("none", "nf4", "int8")
    }
    fp32 = reports["none"]
    assert (fp32.total_params, fp32.linear_layers, fp32.quantized_layers) == (
        unique_params,
        n_linear,
        0,
    )
    assert fp32.weight_bytes >= 4 * unique_params
    for quant in ("nf4", "int8"):
        report = reports[quant]
        assert report.quant == quant
        assert report.total_params == unique_params  # logical, not packed, parameters
        assert (report.linear_layers, report.quantized_layers) == (n_linear, n_linear - 1)
        assert report.weight_bytes < fp32.weight_bytes
    assert reports["nf4"].weight_bytes < reports["int8"].weight_bytes
    assert "nf4" in str(reports["nf4"])
