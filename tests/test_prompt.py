"""Prompt and prefix tuning: parity with HF peft both ways, training over NF4, switching."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from edgepeft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter_parameters,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    load_base,
    save_adapter,
    set_adapter,
)
from edgepeft.adapters.prompt import ATTRIBUTE, VirtualTokens
from edgepeft.tiny import tiny_tokenizer

peft = pytest.importorskip("peft")

N = 4
ARCHS = ["llama", "qwen2", "gpt2", "gemma2"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about position ids and fan-in on tiny models
        yield


@pytest.fixture
def mask():
    m = torch.ones(2, 9, dtype=torch.long)
    m[0, :3] = 0  # left padding in the first row
    return m


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _config(method: str, **kw):
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=N, **kw)
    return PrefixTuningConfig(num_virtual_tokens=N, projection=method == "projection", **kw)


def _peft_config(method: str, **kw):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **kw)
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=method == "projection", **kw
    )


def _peft_logits(model, method: str, input_ids, **kw):
    """peft's logits on the caller's positions (prompt tuning returns N more)."""
    logits = model(input_ids=input_ids, **kw).logits
    return logits[:, N:] if method == "prompt" else logits


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- parity with peft


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ARCHS)
def test_edgepeft_folder_loads_in_peft(tiny_dir, input_ids, mask, tmp_path, arch, method):
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir(arch)), _config(method), "a")
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_hf(tiny_dir(arch)), tmp_path / "a").eval()
    with torch.no_grad():
        base = _hf(tiny_dir(arch))(input_ids).logits
        for kw in ({}, {"attention_mask": mask}):
            got = ours(input_ids, **kw).logits
            assert got.shape == (2, 9, 384)
            assert _diff(got, _peft_logits(theirs, method, input_ids, **kw)) <= TOL
        assert _diff(ours(input_ids).logits, base) > 1e-2  # the adapter does something
        got_loss = ours(input_ids, attention_mask=mask, labels=input_ids).loss
        want_loss = theirs(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
    assert abs(got_loss.item() - want_loss.item()) <= TOL


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ARCHS[:3])
def test_peft_folder_loads_in_edgepeft(tiny_dir, input_ids, mask, tmp_path, arch, method):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_hf(tiny_dir(arch)), _peft_config(method)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(_hf(tiny_dir(arch)), tmp_path / "p", "p")
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            want = _peft_logits(theirs, method, input_ids, **kw)
            assert _diff(ours(input_ids, **kw).logits, want) <= TOL
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(("arch", "method"), [("llama", "prefix"), ("gpt2", "prompt")])
def test_greedy_generation_matches_peft(tiny_dir, input_ids, mask, tmp_path, arch, method):
    """Later steps find the virtual tokens in the cache and only extend the mask.

    The reference is greedy decoding over peft's forward with no cache (the whole sequence
    again each step), so it checks our cached generation against peft's math without relying on
    peft's own `generate`, whose cache seeding broke under transformers 5.24 for prefix tuning.
    """
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir(arch)), _config(method), "a")
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_hf(tiny_dir(arch)), tmp_path / "a").eval()
    ids = input_ids.clamp(min=3)  # no end-of-sequence token in the prompt
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    for kw in ({}, {"attention_mask": mask}):
        got = ours.generate(ids, **kw, **settings)
        assert torch.equal(got, _greedy_without_cache(theirs, method, ids, 5, kw.get("attention_mask")))


def _greedy_without_cache(model, method: str, ids, steps: int, mask=None):
    with torch.no_grad():
        for _ in range(steps):
            kw = {} if mask is None else {"attention_mask": mask}
            logits = _peft_logits(model, method, ids, **kw)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


# ---------------------------------------------------------------- prefix projection


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_projection_matches_peft_and_saves_its_output(tiny_dir, input_ids, mask, tmp_path, arch):
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir(arch)), _config("projection", projection_hidden=24), "a")
    theirs = peft.get_peft_model(
        _hf(tiny_dir(arch)), _peft_config("projection", encoder_hidden_size=24)
    ).eval()
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()[0]

    # Same MLP weights in both, then the same prefixes, logits and saved tensor.
    projection = ours.get_submodule(ATTRIBUTE).projections["a"]
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(projection.embedding)
        for i in (0, 2):
            encoder.transform[i].weight.copy_(projection.mlp[i].weight)
            encoder.transform[i].bias.copy_(projection.mlp[i].bias)
        for kw in ({}, {"attention_mask": mask}):
            trained = ours(input_ids, **kw).logits
            assert _diff(trained, theirs(input_ids=input_ids, **kw).logits) <= TOL

    save_adapter(ours, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    with torch.no_grad():
        by_hand = projection.mlp(projection.embedding)  # (N, L*2*token_dim)
    assert torch.equal(saved["prompt_embeddings"], by_hand)
    assert _diff(saved["prompt_embeddings"], theirs.get_prompt_embedding_to_save("default")) <= 1e-6
    document = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert document["prefix_projection"] is True and document["encoder_hidden_size"] == 24

    # Loaded, the prefix is the MLP's output as a plain tensor, in edgepeft and in peft.
    loaded = load_adapter(_hf(tiny_dir(arch)), tmp_path / "a", "a")
    module = loaded.get_submodule(ATTRIBUTE)
    assert "a" not in module.projections
    assert torch.equal(module.embeddings["a"].detach(), saved["prompt_embeddings"])
    in_peft = peft.PeftModel.from_pretrained(_hf(tiny_dir(arch)), tmp_path / "a").eval()
    with torch.no_grad():
        trained = ours(input_ids, attention_mask=mask).logits
        assert _diff(loaded(input_ids, attention_mask=mask).logits, trained) <= TOL
        assert _diff(in_peft(input_ids=input_ids, attention_mask=mask).logits, trained) <= TOL


def test_peft_projection_folder_loads_in_edgepeft(tiny_dir, input_ids, mask, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_hf(tiny_dir("llama")), _peft_config("projection")).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(_hf(tiny_dir("llama")), tmp_path / "p", "p")
    with torch.no_grad():
        want = theirs(input_ids=input_ids, attention_mask=mask).logits
        assert _diff(ours(input_ids, attention_mask=mask).logits, want) <= TOL


# ---------------------------------------------------------------- training over NF4


@pytest.mark.parametrize("method", ["prompt", "prefix", "projection"])
def test_gradients_reach_only_the_adapter_over_nf4(tiny_dir, input_ids, method):
    model, _ = load_base(tiny_dir("llama"), quant="nf4", device="cpu")
    add_adapter(model, _config(method), "a")
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    trained = {id(p) for p in adapter_parameters(model)}
    assert trained
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# ---------------------------------------------------------------- initialisation


def test_vocab_init_copies_vocabulary_rows(tiny_dir):
    model = add_adapter(_hf(tiny_dir("llama")), PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    prompts = model.get_submodule(ATTRIBUTE).embeddings["default"].detach()
    vocab = model.get_input_embeddings().weight.detach()
    for row in prompts:
        assert (vocab == row).all(dim=1).any()


@pytest.mark.parametrize("n", [2, 11])
def test_text_init_matches_peft(tiny_dir, n):
    """Truncated (n=2) or repeated (n=11) embeddings of the tokenized text, as peft makes them."""
    text = "the quick brown fox"
    ours = add_adapter(
        _hf(tiny_dir("llama")),
        PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=text),
        tokenizer=tiny_tokenizer(),
    )
    theirs = peft.get_peft_model(
        _hf(tiny_dir("llama")),
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tiny_dir("llama")),
        ),
    )
    got = ours.get_submodule(ATTRIBUTE).embeddings["default"].detach()
    assert torch.equal(got, theirs.prompt_encoder["default"].embedding.weight.detach())
    ids = tiny_tokenizer()(text)["input_ids"]
    assert torch.equal(got[0], ours.get_input_embeddings().weight[ids[0]].detach())


def test_random_init_is_standard_normal(tiny_dir):
    torch.manual_seed(0)
    model = add_adapter(_hf(tiny_dir("llama")), PromptTuningConfig(num_virtual_tokens=32))
    prompts = model.get_submodule(ATTRIBUTE).embeddings["default"].detach()
    assert prompts.shape == (32, 64)
    assert 0.9 < prompts.std().item() < 1.1 and abs(prompts.mean().item()) < 0.05


def test_text_init_needs_a_tokenizer_and_a_text(tiny_dir):
    model = _hf(tiny_dir("llama"))
    with pytest.raises(ValueError, match="no tokenizer was given"):
        add_adapter(model, PromptTuningConfig(init="text", init_text="hello"), "t")
    with pytest.raises(ValueError, match="needs init_text"):
        add_adapter(model, PromptTuningConfig(init="text"), "t", tokenizer=tiny_tokenizer())
    assert not hasattr(model, ATTRIBUTE) and not model._forward_pre_hooks


def test_text_init_folder_loads_without_tokenizer(tiny_dir, input_ids, tmp_path):
    cfg = PromptTuningConfig(num_virtual_tokens=N, init="text", init_text="hello world")
    ours = add_adapter(_hf(tiny_dir("llama")), cfg, "t", tokenizer=tiny_tokenizer())
    save_adapter(ours, tmp_path / "t")
    document = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert document["prompt_tuning_init"] == "TEXT"
    assert document["tokenizer_name_or_path"] == str(tiny_dir("llama"))
    theirs = peft.PeftModel.from_pretrained(_hf(tiny_dir("llama")), tmp_path / "t").eval()
    loaded = load_adapter(_hf(tiny_dir("llama")), tmp_path / "t", "t")
    with torch.no_grad():
        want = ours(input_ids).logits
        assert _diff(loaded(input_ids).logits, want) <= TOL
        assert _diff(_peft_logits(theirs, "prompt", input_ids), want) <= TOL


# ---------------------------------------------------------------- several adapters


def test_switch_disable_and_delete_beside_lora(tiny_dir, input_ids, mask):
    torch.manual_seed(0)
    model = _hf(tiny_dir("llama"))
    hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with torch.no_grad():
        base = model(input_ids, attention_mask=mask).logits
        add_adapter(model, LoraConfig(init="random"), "lora")
        with_lora = model(input_ids, attention_mask=mask).logits
        add_adapter(model, _config("prompt"), "prompt")
        with_prompt = model(input_ids, attention_mask=mask).logits
        add_adapter(model, _config("prefix"), "prefix")
        with_prefix = model(input_ids, attention_mask=mask).logits
        assert _diff(with_prompt, with_lora) > 1e-2 and _diff(with_prompt, base) > 1e-2
        assert _diff(with_prefix, with_prompt) > 1e-2

        set_adapter(model, "lora")
        assert torch.equal(model(input_ids, attention_mask=mask).logits, with_lora)
        set_adapter(model, "prompt")
        assert count_parameters(model) == N * 64
        assert torch.equal(model(input_ids, attention_mask=mask).logits, with_prompt)
        with disable_adapters(model):
            assert torch.equal(model(input_ids, attention_mask=mask).logits, base)
        assert torch.equal(model(input_ids, attention_mask=mask).logits, with_prompt)

        delete_adapter(model, "prompt")
        assert hasattr(model, ATTRIBUTE)  # still holds "prefix"
        set_adapter(model, "prefix")
        assert torch.equal(model(input_ids, attention_mask=mask).logits, with_prefix)
        delete_adapter(model, "prefix")
        assert not hasattr(model, ATTRIBUTE)
        assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
        set_adapter(model, "lora")
        assert torch.equal(model(input_ids, attention_mask=mask).logits, with_lora)
        delete_adapter(model, "lora")
        assert torch.equal(model(input_ids, attention_mask=mask).logits, base)


def test_cannot_be_merged(tiny_dir):
    model = add_adapter(_hf(tiny_dir("llama")), _config("prompt"), "p")
    module = model.get_submodule(ATTRIBUTE)
    assert isinstance(module, VirtualTokens) and not module.mergeable
    with pytest.raises(TypeError, match="cannot be merged; keep it separate"):
        module.delta_weight("p")


def test_positional_inputs_and_tuple_outputs(tiny_dir, input_ids, mask):
    torch.manual_seed(0)
    model = add_adapter(_hf(tiny_dir("llama")), _config("prompt"), "p")
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids, mask).logits, want)
        as_tuple = model(input_ids, attention_mask=mask, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], want)
        last = model(input_ids, attention_mask=mask, logits_to_keep=1).logits
        assert _diff(last, want[:, -1:]) <= TOL


def test_folder_from_another_architecture_is_refused(tiny_dir, tmp_path):
    save_adapter(add_adapter(_hf(tiny_dir("llama")), _config("prefix"), "a"), tmp_path / "a")
    model = _hf(tiny_dir("gpt2"))
    with pytest.raises(ValueError, match="token_dim=32, but this model needs token_dim=64"):
        load_adapter(model, tmp_path / "a", check_base=False)
    assert not hasattr(model, ATTRIBUTE)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("method", ["prompt", "prefix", "projection"])
def test_save_load_round_trip_is_bit_exact(tiny_dir, input_ids, mask, tmp_path, method):
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir("qwen2")), _config(method), "a")
    save_adapter(ours, tmp_path / "a")
    loaded = load_adapter(_hf(tiny_dir("qwen2")), tmp_path / "a", "a")
    save_adapter(loaded, tmp_path / "b")
    first = load_file(tmp_path / "a" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys() == {"prompt_embeddings"}
    assert torch.equal(first["prompt_embeddings"], second["prompt_embeddings"])
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids, attention_mask=mask).logits, ours(input_ids, attention_mask=mask).logits
        )
    a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert a == b
    if method != "prompt":  # peft's key/value facts under grouped-query attention
        assert (a["token_dim"], a["num_attention_heads"], a["num_layers"]) == (32, 2, 2)
