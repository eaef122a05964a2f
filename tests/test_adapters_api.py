"""Several named adapters on one model: add, switch, disable, delete, count, errors.

    model ── q_proj = LoraLayer(base_layer=Linear)
                          ├─ "a": lora_A/B            active: the last added,
                          └─ "b": lora_A/B (+ magnitude)   or the one set_adapter picked

Each adapter's output must equal a model that holds only that adapter.
"""

from __future__ import annotations

import pytest
import torch

import edgepeft
from edgepeft import LoraConfig
from edgepeft.adapters.inject import (
    active_adapter,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from edgepeft.adapters.layer import AdapterModule, adapter_modules

CONFIG_A = LoraConfig(r=4, alpha=8, init="random", target_modules=("q_proj", "v_proj"))
CONFIG_B = LoraConfig(r=2, alpha=4, init="random", target_modules=("q_proj", "o_proj"))
SEEDS = {"a": 0, "b": 1}


def base(folder):
    model, _ = edgepeft.load_base(folder, quant="none")
    return model


def add(model, config, name: str):
    torch.manual_seed(SEEDS.get(name, 7))  # the same seed gives the same random adapter
    edgepeft.add_adapter(model, config, name)


def only(folder, config, name: str):
    """A fresh model holding just this adapter."""
    model = base(folder)
    add(model, config, name)
    return model


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture
def folder(tiny_dir):
    return tiny_dir("llama")


@pytest.fixture
def two(folder):
    model = base(folder)
    add(model, CONFIG_A, "a")
    add(model, CONFIG_B, "b")
    return model


def test_last_added_is_active_and_set_adapter_switches(two, folder, input_ids):
    assert list(list_adapters(two)) == ["a", "b"] and active_adapter(two) == "b"
    only_a, only_b = only(folder, CONFIG_A, "a"), only(folder, CONFIG_B, "b")
    assert torch.equal(logits(two, input_ids), logits(only_b, input_ids))
    set_adapter(two, "a")
    assert torch.equal(logits(two, input_ids), logits(only_a, input_ids))
    set_adapter(two, "b")
    assert torch.equal(logits(two, input_ids), logits(only_b, input_ids))
    assert not torch.allclose(logits(only_a, input_ids), logits(only_b, input_ids))


def test_only_the_active_adapter_trains(two):
    for active in ("a", "b", "a"):
        set_adapter(two, active)
        trainable = {id(p) for p in two.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter_parameters(two, active)}
    other = {id(p) for p in adapter_parameters(two, "b")}
    assert not other & {id(p) for p in adapter_parameters(two, "a")}


def test_disable_adapters_gives_the_base_and_restores(two, folder, input_ids):
    plain = logits(base(folder), input_ids)
    adapted = logits(two, input_ids)
    with edgepeft.disable_adapters(two):
        assert torch.equal(logits(two, input_ids), plain)
    assert active_adapter(two) == "b"
    assert torch.equal(logits(two, input_ids), adapted)

    with pytest.raises(RuntimeError, match="inside"):
        with edgepeft.disable_adapters(two):
            raise RuntimeError("failure inside the block")
    assert active_adapter(two) == "b"
    assert torch.equal(logits(two, input_ids), adapted)


def test_delete_adapters_gives_back_the_base(two, folder, input_ids):
    reference = base(folder)
    delete_adapter(two, "a")
    assert list(list_adapters(two)) == ["b"] and active_adapter(two) == "b"
    assert torch.equal(logits(two, input_ids), logits(only(folder, CONFIG_B, "b"), input_ids))

    delete_adapter(two, "b")
    assert list_adapters(two) == {} and active_adapter(two) is None
    assert not any(isinstance(m, AdapterModule) for m in two.modules())
    assert repr(two) == repr(reference)  # wrappers unwrapped: the same module tree
    ours, theirs = two.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits(two, input_ids), logits(reference, input_ids))


def test_name_errors_list_the_adapters(two):
    with pytest.raises(ValueError, match=r"'a'.*adapters: a, b"):
        edgepeft.add_adapter(two, CONFIG_A, "a")
    with pytest.raises(KeyError, match=r"'c'.*adapters: a, b"):
        set_adapter(two, "c")
    with pytest.raises(KeyError, match=r"'c'.*adapters: a, b"):
        delete_adapter(two, "c")
    with pytest.raises(KeyError, match=r"'c'.*adapters: a, b"):
        adapter_parameters(two, "c")
    assert list(list_adapters(two)) == ["a", "b"] and active_adapter(two) == "b"


def test_parameter_counts(two):
    # llama tiny: hidden 64, 4 heads x 16 -> q/o (64 -> 64), 2 kv heads -> v (64 -> 32); 2 layers
    expected_a = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    expected_b = 2 * (2 * (64 + 64) + 2 * (64 + 64))
    assert count_parameters(two, "a") == expected_a
    assert count_parameters(two, "b") == expected_b
    assert count_parameters(two) == expected_b  # the active one
    assert sum(p.numel() for p in adapter_parameters(two, "a")) == expected_a
    assert len(adapter_parameters(two, "a")) == 2 * 2 * 2  # A and B, 2 modules, 2 layers


def test_lora_and_dora_on_the_same_module(folder, input_ids, tmp_path):
    lora = LoraConfig(r=4, init="random", target_modules=("q_proj",))
    dora = LoraConfig(r=4, init="random", target_modules=("q_proj",), use_dora=True)
    model = base(folder)
    add(model, lora, "lora")
    add(model, dora, "dora")
    wrappers = [m for _, m in adapter_modules(model)]
    assert len(wrappers) == 2 and all(m.names() == ["lora", "dora"] for m in wrappers)
    with torch.no_grad():  # move the magnitude off its init so DoRA differs from LoRA
        for m in wrappers:
            m.lora_magnitude_vector["dora"].mul_(1.5)

    set_adapter(model, "lora")
    assert torch.equal(logits(model, input_ids), logits(only(folder, lora, "lora"), input_ids))
    set_adapter(model, "dora")
    only_dora = only(folder, dora, "dora")
    with torch.no_grad():
        for _, m in adapter_modules(only_dora):
            m.lora_magnitude_vector["dora"].mul_(1.5)
    assert torch.equal(logits(model, input_ids), logits(only_dora, input_ids))
    assert count_parameters(model, "dora") == count_parameters(model, "lora") + 2 * 64

    edgepeft.save_adapter(model, tmp_path / "lora", name="lora")
    edgepeft.save_adapter(model, tmp_path / "dora", name="dora")
    again = base(folder)
    edgepeft.load_adapter(again, tmp_path / "lora", name="lora")
    edgepeft.load_adapter(again, tmp_path / "dora", name="dora")
    assert torch.equal(logits(again, input_ids), logits(model, input_ids))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(target_modules=("q_prj",)), r"'q_prj'.*closest names: q_proj"),
        (LoraConfig(target_modules=r"model\.nothing\..*"), r"matched no module"),
        (LoraConfig(target_modules=("q_proj",), layers_to_transform=(7,)), r"selects no module"),
    ],
    ids=["misspelt_name", "regex_matching_nothing", "layers_selecting_nothing"],
)
def test_targets_that_select_nothing_are_refused(config, message, two, folder, input_ids):
    before = logits(two, input_ids)
    params_before = [n for n, _ in two.named_parameters()]
    with pytest.raises(ValueError, match=message):
        edgepeft.add_adapter(two, config, "c")
    assert list(list_adapters(two)) == ["a", "b"] and active_adapter(two) == "b"
    assert [n for n, _ in two.named_parameters()] == params_before
    assert torch.equal(logits(two, input_ids), before)

    fresh = base(folder)
    with pytest.raises(ValueError, match=message):
        edgepeft.add_adapter(fresh, config)
    assert not any(isinstance(m, AdapterModule) for m in fresh.modules())
