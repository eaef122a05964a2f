"""NaN / inf adapter values are refused at every entry point, naming adapter, tensor and file.

    LoRA folder, one NaN in a lora_B     load_adapter, export (separate, merged), export_adapter
    prompt-tuning folder with inf        load_adapter, export (separate: the KV prefix)
    in-memory NaN (trained, not loaded)  separate mode's adapter tensors, the KV prefix file
    .onnx_adapter with NaN (AdapterFormat), .kvprefix.safetensors with inf   Engine.load_adapter
    finite values so large the graph overflows   Engine.generate raises, never answers ''
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

import edgepeft as ep
from edgepeft.adapters.inject import add_adapter, list_adapters
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import WEIGHTS_FILE, save_adapter
from edgepeft.config import LoraConfig, PromptTuningConfig
from edgepeft.export.adapter_files import GUARD_PREFIX, optional_graph_inputs, write_adapter_file
from edgepeft.export.files import tensors_sha256
from edgepeft.export.kv_prefix import export_kv_prefix
from edgepeft.export.manifest import read_manifest
from edgepeft.export.separate import adapter_tensors
from edgepeft.finite import NonFiniteError, check_finite, check_finite_logits
from edgepeft.runtime import AdapterLoadError, Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _poison(folder, pick: str, value: float) -> str:
    """Set one element of the first tensor whose key contains `pick`; returns that key."""
    path = folder / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if pick in k)
    tensors[key].view(-1)[3] = value
    save_file(tensors, str(path), metadata=metadata)
    return key


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    """Healthy and poisoned LoRA / prompt-tuning folders over the tiny llama (fp32 base)."""
    root = tmp_path_factory.mktemp("nonfinite")
    model, _ = ep.load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, init="random"), "sql")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "chat")
    out = {name: save_adapter(model, root / name, name) for name in ("sql", "chat")}
    for name, pick, value in (("sql", "lora_B", float("nan")), ("chat", "prompt", float("inf"))):
        bad = root / f"bad_{name}"
        shutil.copytree(out[name], bad)
        out[f"bad_{name}"] = bad
        out[f"{name}_key"] = _poison(bad, pick, value)
    return out


@pytest.fixture(scope="module")
def export_dir(tiny_dir, folders, tmp_path_factory):
    """fp32 separate export of the healthy sql (LoRA) and chat (prompt tuning) adapters."""
    out = tmp_path_factory.mktemp("nonfinite-export") / "separate"
    adapters = {"sql": folders["sql"], "chat": folders["chat"]}
    ep.export(tiny_dir("llama"), out, adapters, weights="fp32", mode="separate", verify=False,
              quiet=True)  # fmt: skip
    return out


def test_the_helpers_count_and_name():
    check_finite({"a": np.ones(3), "ids": np.arange(3)}, adapter="x", file="f")
    with pytest.raises(NonFiniteError, match=r"adapter 'x': tensor 'b' in f holds 1 NaN and 2 inf"):
        check_finite({"a": np.ones(3), "b": np.array([np.nan, np.inf, -np.inf])}, adapter="x", file="f")
    check_finite_logits(np.zeros((2, 5)), adapter=None, step=0)
    with pytest.raises(NonFiniteError, match=r"decode step 2 \(rows \[1\] of 2\) with adapter 'x'"):
        check_finite_logits(np.array([[0.0, 1.0], [np.nan, 0.0]]), adapter="x", step=2)


@pytest.mark.parametrize("name", ["sql", "chat"])
def test_load_adapter_refuses_and_leaves_the_model(tiny_dir, folders, name):
    model, _ = ep.load_base(tiny_dir("llama"), quant="none")
    bad = folders[f"bad_{name}"]
    key = folders[f"{name}_key"]
    with pytest.raises(NonFiniteError, match="NaN" if name == "sql" else "1 inf") as error:
        ep.load_adapter(model, bad, name=name)
    message = str(error.value)
    assert f"adapter {name!r}" in message and repr(key) in message
    assert str(bad / WEIGHTS_FILE) in message and "retrain" in message and "loss" in message
    assert list_adapters(model) == {}  # nothing of it stays on the model


@pytest.mark.parametrize("mode", ["separate", "merged"])
def test_export_refuses_both_modes(tiny_dir, folders, tmp_path, mode):
    for name in ("sql", "chat") if mode == "separate" else ("sql",):
        with pytest.raises(NonFiniteError, match=f"adapter {name!r}.*{folders[f'{name}_key']}"):
            ep.export(tiny_dir("llama"), tmp_path / mode, {name: folders[f"bad_{name}"]},
                      weights="fp32", mode=mode, verify=False, quiet=True)  # fmt: skip
        assert not (tmp_path / mode).exists()


def test_export_adapter_refuses(folders, export_dir):
    before = (export_dir / "edgepeft.json").read_bytes()
    for name in ("sql", "chat"):
        with pytest.raises(NonFiniteError, match=repr(folders[f"{name}_key"])):
            ep.export_adapter(folders[f"bad_{name}"], export_dir, name=f"late_{name}")
    assert (export_dir / "edgepeft.json").read_bytes() == before
    assert not list((export_dir / "adapters").glob("late_*"))


def test_separate_mode_checks_what_it_gathers(tiny_dir, tmp_path):
    """Values that went bad in memory (a run that diverged, never saved) are refused too."""
    model, _ = ep.load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, init="random", use_dora=True), "dora")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "soft")
    path, module = next((p, m) for p, m in adapter_modules(model) if "dora" in m)
    with torch.no_grad():
        module.lora_B["dora"].weight[0, 0] = float("nan")
        next(m for _, m in adapter_modules(model) if "soft" in m).tensors("soft")[
            "prompt_embeddings"
        ].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"adapter 'dora': tensor '{path}.lora_B'"):
        adapter_tensors(model, "dora", source="the trained model")
    with pytest.raises(NonFiniteError, match="adapter 'soft': tensor 'past_key_values.0.key'"):
        export_kv_prefix(model, "soft", tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


def _lora_file(export_dir, folder, name, change) -> str:
    """Write folder/<name>.onnx_adapter (onnxruntime.AdapterFormat, as export writes it) holding
    the sql adapter's values with one lora_B changed; returns that tensor's name."""
    fmt = ort.AdapterFormat.read_adapter(str(export_dir / "adapters/sql.onnx_adapter"))
    values = {k: v.numpy() for k, v in fmt.get_parameters().items() if not k.startswith(GUARD_PREFIX)}
    key = next(k for k in sorted(values) if k.endswith("lora_B"))
    values[key] = change(values[key].copy())
    manifest = read_manifest(export_dir)
    inputs = optional_graph_inputs(export_dir / manifest.model_file)
    write_adapter_file(folder, name, values, graph_inputs=inputs, base_fingerprint=manifest.base_fingerprint)
    return key


def test_engine_refuses_nan_files_and_keeps_serving(export_dir, tmp_path):
    engine = Engine(export_dir)
    before = engine.generate("the quick", adapter="sql", max_new_tokens=4)

    def nan(values):
        values.flat[5] = np.nan
        return values

    key = _lora_file(export_dir, tmp_path, "bad", nan)
    bad = tmp_path / "bad.onnx_adapter"
    with pytest.raises(AdapterLoadError, match=f"adapter 'bad': tensor '{key}' in {bad} holds 1 NaN"):
        engine.load_adapter(bad)

    # A KV prefix file with inf, its checksum that of what it holds (as if written so).
    prefix = export_dir / "adapters/chat.kvprefix.safetensors"
    with safe_open(str(prefix), framework="np") as f:
        metadata = f.metadata()
    tensors = load_np(str(prefix))
    tensors["past_key_values.1.value"][0, 0, 0, 0] = np.inf
    metadata["tensors_sha256"] = tensors_sha256(tensors)
    bad_prefix = tmp_path / "soft.kvprefix.safetensors"
    save_np(tensors, str(bad_prefix), metadata=metadata)
    with pytest.raises(AdapterLoadError, match="adapter 'soft'.*'past_key_values.1.value'.*1 inf"):
        engine.load_adapter(bad_prefix)

    assert set(engine.adapters()) == {"sql", "chat"}
    assert engine.generate("the quick", adapter="sql", max_new_tokens=4) == before


def test_overflowing_logits_raise_instead_of_an_empty_answer(export_dir, tmp_path):
    """Finite values large enough that the graph overflows: the answer is an error, not ''."""
    _lora_file(export_dir, tmp_path, "huge", lambda v: np.full_like(v, 3e38))
    engine = Engine(export_dir)
    engine.load_adapter(tmp_path / "huge.onnx_adapter")  # finite: it loads
    with pytest.raises(NonFiniteError, match="NaN/inf at the prefill.*adapter 'huge'.*retrain"):
        engine.generate(["the quick", "SELECT"], adapter="huge", max_new_tokens=4)
    with pytest.raises(NonFiniteError, match="adapter 'huge'"):
        list(engine.stream("the quick", adapter="huge", max_new_tokens=4))
    assert engine.generate("the quick", adapter="sql", max_new_tokens=4)  # others unaffected


def test_verify_fails_a_nan_adapter_file(tiny_dir, folders, tmp_path):
    """The reported case: int4 separate, NaN in the LoRA file; verify said PASSED (|Δ| 0.00)."""
    out = tmp_path / "int4"
    ep.export(tiny_dir("llama"), out, {"sql": folders["sql"]}, weights="int4", mode="separate",
              verify=False, quiet=True)  # fmt: skip

    def nan(values):
        values[:] = np.nan
        return values

    _lora_file(out, out / "adapters", "sql", nan)  # over the exported file, checksums renewed
    report = ep.verify(out, max_new_tokens=2)
    by_name = {g.name: g for g in report.graphs}
    assert by_name[""].passed and not by_name["sql"].passed and not report.passed
    assert "NaN/inf in onnxruntime's logits at the prefill" in by_name["sql"].failures[0]
    assert "FAILED: sql int4" in str(report)
