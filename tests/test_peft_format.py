"""Adapter folders that do not fit: wrong base, wrong shapes, damaged or unsupported files.

Every refused load must leave the model exactly as it was: same adapters, same
active adapter, same state_dict, same output. Saving must never leave a
half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import edgepeft
from edgepeft import AdapterMismatchError, LoraConfig, load_adapter, load_base, save_adapter
from edgepeft.adapters.inject import active_adapter, list_adapters
from edgepeft.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from edgepeft.tiny import save_tiny_model, tiny_model

Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def base_b(tmp_path_factory):
    """Same architecture and shapes as tiny_dir("llama"), other weights (seed 1)."""
    return save_tiny_model(tmp_path_factory.mktemp("llama_seed1"), "llama", seed=1)


def _model(folder, quant="none", adapter: str | None = "first"):
    """A base with one random (non-identity) LoRA adapter `adapter`, active."""
    model, _ = load_base(folder, quant=quant)
    if adapter:
        torch.manual_seed(1)
        edgepeft.add_adapter(model, LoraConfig(r=4, init="random"), adapter)
    return model


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """An r=8 LoRA adapter folder saved from base A (tiny llama, seed 0)."""
    model = _model(tiny_dir("llama"), adapter=None)
    torch.manual_seed(2)
    edgepeft.add_adapter(model, LoraConfig(r=8, init="random"), "sql")
    return save_adapter(model, tmp_path_factory.mktemp("saved") / "sql")


@pytest.fixture
def copy_of(saved, tmp_path):
    def make() -> Path:
        target = tmp_path / "adapter"
        shutil.copytree(saved, target)
        return target

    return make


def _snapshot(model, input_ids) -> dict:
    with torch.no_grad():
        logits = model(input_ids).logits.clone()
    return {
        "adapters": dict(list_adapters(model)),
        "active": active_adapter(model),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
        "logits": logits,
    }


def _assert_unchanged(model, before: dict, input_ids) -> None:
    after = _snapshot(model, input_ids)
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["trainable"] == before["trainable"]
    assert torch.equal(after["logits"], before["logits"])


def _edit_config(folder: Path, **changes) -> None:
    document = json.loads((folder / CONFIG_FILE).read_text())
    document.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(document))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------- wrong base


def test_adapter_from_another_base_is_refused(saved, tiny_dir, base_b, input_ids):
    model = _model(base_b)
    before = _snapshot(model, input_ids)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(model, saved, "sql")
    message = str(err.value)
    saved_fp = safe_open(str(saved / WEIGHTS_FILE), framework="pt").metadata()[
        "edgepeft_base_fingerprint"
    ]
    own_fp = model.edgepeft_base.fingerprint
    assert saved_fp != own_fp
    assert saved_fp in message and own_fp in message
    assert str(tiny_dir("llama")) in message and str(base_b) in message
    assert "check_base=False" in message
    _assert_unchanged(model, before, input_ids)

    load_adapter(model, saved, "sql", check_base=False)
    assert active_adapter(model) == "sql"
    assert set(list_adapters(model)) == {"first", "sql"}
    reference = _model(tiny_dir("llama"), adapter=None)
    load_adapter(reference, saved, "sql")
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if ".lora_" in name:
            assert torch.equal(ours[name], param), name  # the file's values, bit for bit


# ---------------------------------------------------------------- wrong shapes


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_rank_edited_in_config_names_first_tensor_and_leaves_model_as_it_was(
    quant, copy_of, tiny_dir, input_ids
):
    folder = copy_of()
    _edit_config(folder, r=4)  # the tensors still have rank 8
    model = _model(tiny_dir("llama"), quant=quant)
    before = _snapshot(model, input_ids)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(model, folder, "sql")
    message = str(err.value)
    assert Q_PROJ_A in message and "(8, 64)" in message and "(4, 64)" in message
    _assert_unchanged(model, before, input_ids)


def test_adapter_for_another_hidden_size_is_refused(tiny_dir, tmp_path, input_ids):
    narrow = tiny_model("llama", hidden_size=32)
    edgepeft.add_adapter(narrow, LoraConfig(r=8, init="random"), "narrow")
    folder = save_adapter(narrow, tmp_path / "narrow")
    model = _model(tiny_dir("llama"))
    before = _snapshot(model, input_ids)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_adapter(model, folder, "narrow")
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(model, folder, "narrow", check_base=False)
    assert Q_PROJ_A in str(err.value) and "(8, 32)" in str(err.value)
    _assert_unchanged(model, before, input_ids)


def test_missing_tensor_is_named(copy_of, tiny_dir, input_ids):
    folder = copy_of()
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(folder, lambda tensors: tensors.pop(gone))
    model = _model(tiny_dir("llama"))
    before = _snapshot(model, input_ids)
    with pytest.raises(AdapterMismatchError, match="missing") as err:
        load_adapter(model, folder, "sql")
    assert gone in str(err.value)
    _assert_unchanged(model, before, input_ids)


def test_unexpected_tensor_is_named(copy_of, tiny_dir, input_ids):
    folder = copy_of()
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(folder, lambda tensors: tensors.__setitem__(extra, torch.zeros(8, 64)))
    model = _model(tiny_dir("llama"))
    before = _snapshot(model, input_ids)
    with pytest.raises(AdapterMismatchError, match="no place") as err:
        load_adapter(model, folder, "sql")
    assert extra in str(err.value)
    _assert_unchanged(model, before, input_ids)


# ---------------------------------------------------------------- damaged or unsupported folders


def test_corrupt_safetensors_names_the_file(copy_of, tiny_dir, input_ids):
    folder = copy_of()
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    model = _model(tiny_dir("llama"))
    before = _snapshot(model, input_ids)
    with pytest.raises(ValueError) as err:
        load_adapter(model, folder, "sql")
    assert str(weights) in str(err.value)
    _assert_unchanged(model, before, input_ids)


def test_pickled_adapter_weights_are_refused(copy_of, tiny_dir):
    folder = copy_of()
    tensors = load_file(str(folder / WEIGHTS_FILE))
    (folder / WEIGHTS_FILE).unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_adapter(_model(tiny_dir("llama")), folder, "sql")
    message = str(err.value)
    assert "adapter_model.bin" in message and "pickled" in message and "never loads" in message


def test_missing_config_is_named(copy_of, tiny_dir):
    folder = copy_of()
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_adapter(_model(tiny_dir("llama")), folder, "sql")


def test_unknown_peft_type_is_named(copy_of, tiny_dir):
    folder = copy_of()
    _edit_config(folder, peft_type="NOT_A_METHOD")
    with pytest.raises(ValueError, match="'NOT_A_METHOD'"):
        load_adapter(_model(tiny_dir("llama")), folder, "sql")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_bias", True),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
        ("layer_replication", [[0, 2]]),
    ],
)
def test_unsupported_lora_fields_are_named(field, value, copy_of, tiny_dir, input_ids):
    folder = copy_of()
    _edit_config(folder, **{field: value})
    model = _model(tiny_dir("llama"))
    before = _snapshot(model, input_ids)
    with pytest.raises(ValueError, match=field) as err:
        load_adapter(model, folder, "sql")
    assert str(folder / CONFIG_FILE) in str(err.value)
    _assert_unchanged(model, before, input_ids)


# ---------------------------------------------------------------- saving


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_over_an_existing_folder_replaces_it(tiny_dir, tmp_path):
    parent = tmp_path / "adapters"
    model = _model(tiny_dir("llama"))
    target = save_adapter(model, parent / "a")
    (target / "stale.txt").write_text("left over from an older save")
    torch.manual_seed(3)
    edgepeft.add_adapter(model, LoraConfig(r=2, init="random"), "second")
    save_adapter(model, target, "second")
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((target / CONFIG_FILE).read_text())["r"] == 2
    assert [p.name for p in parent.iterdir()] == ["a"]  # no staging folder left


def test_failed_write_keeps_the_old_folder(tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch

    parent = tmp_path / "adapters"
    model = _model(tiny_dir("llama"))
    target = save_adapter(model, parent / "a")
    original = _folder_files(target)

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="injected"):
        save_adapter(model, target)
    assert _folder_files(target) == original
    assert [p.name for p in parent.iterdir()] == ["a"]


def test_failed_move_into_place_keeps_the_old_folder(tiny_dir, tmp_path, monkeypatch):
    """The last step (new folder -> its name) failing must not lose the old adapter."""
    parent = tmp_path / "adapters"
    model = _model(tiny_dir("llama"))
    target = save_adapter(model, parent / "a")
    original = _folder_files(target)
    real_replace = os.replace
    calls = {"into_target": 0}

    def replace(src, dst):
        if Path(dst) == target:
            calls["into_target"] += 1
            if calls["into_target"] == 1:
                raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        save_adapter(model, target)
    assert _folder_files(target) == original
    assert [p.name for p in parent.iterdir()] == ["a"]


def test_saved_file_records_base_fingerprint_and_quant(tiny_dir, tmp_path):
    model = _model(tiny_dir("llama"), quant="nf4")
    folder = save_adapter(model, tmp_path / "nf4")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["edgepeft_base_fingerprint"] == model.edgepeft_base.fingerprint
    assert metadata["edgepeft_base_quant"] == "nf4"
    fp32_model, _ = load_base(tiny_dir("llama"), quant="none")
    assert metadata["edgepeft_base_fingerprint"] == fp32_model.edgepeft_base.fingerprint
