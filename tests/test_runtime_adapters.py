"""Adapter files in the runtime: loading, unloading, and every way a file can be wrong.
A bad file is refused with its name (and the fingerprints or tensor involved) while the
engine keeps serving the adapters it has."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from runtime_fixtures import PROMPTS, shared_separate

from edgepeft.export.adapter_files import (
    GUARD_PREFIX,
    GraphInput,
    fingerprint_input,
    optional_graph_inputs,
    write_adapter_file,
)
from edgepeft.export.kv_prefix import read_kv_prefix_file, write_kv_prefix_file
from edgepeft.runtime import (
    AdapterBaseMismatchError,
    AdapterLoadError,
    Engine,
    UnknownAdapterError,
)

OTHER = "0123456789abcdef"


@pytest.fixture(scope="module")
def separate(tiny_dir, tmp_path_factory):
    return shared_separate(tiny_dir, tmp_path_factory)


@pytest.fixture
def engine(separate):
    return Engine(separate.out)


def _tokens(engine, adapter):
    return [
        r.token_ids
        for r in engine.generate(PROMPTS, adapter=adapter, max_new_tokens=8, return_result=True)
    ]


def _lora_tensors(out):
    params = ort.AdapterFormat.read_adapter(
        str(out / "adapters/lora.onnx_adapter")
    ).get_parameters()
    return {k: v.numpy() for k, v in params.items() if not k.startswith(GUARD_PREFIX)}


def test_unload_and_load_again_under_another_name(engine, separate):
    before = _tokens(engine, "lora")
    engine.unload_adapter("lora")
    assert "lora" not in engine.adapters()
    with pytest.raises(
        UnknownAdapterError, match="'lora'.*loaded: bottleneck, dora, ia3, prefix, prompt"
    ):
        engine.generate("x", adapter="lora")
    info = engine.load_adapter(separate.out / "adapters/lora.onnx_adapter", name="sql")
    assert info.name == "sql" and info.kind == "lora"
    assert _tokens(engine, "sql") == before
    with pytest.raises(ValueError, match="named 'sql' is loaded already"):
        engine.load_adapter(separate.out / "adapters/lora.onnx_adapter", name="sql")
    # the file's stem names it by default
    assert engine.load_adapter(separate.out / "adapters/lora.onnx_adapter").name == "lora"
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("nope")


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_file_is_named_and_the_others_keep_serving(damage, engine, separate, tmp_path):
    good = {name: _tokens(engine, name) for name in ("lora", "prefix")}
    for source in ("lora.onnx_adapter", "prefix.kvprefix.safetensors"):
        path = tmp_path / source.replace("lora", "bad").replace("prefix", "badprefix", 1)
        data = bytearray((separate.out / "adapters" / source).read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF  # one byte flipped inside a tensor
        path.write_bytes(bytes(data))
        sidecar = (separate.out / "adapters" / source).with_suffix(".json")
        if sidecar.is_file():
            shutil.copy(sidecar, path.with_suffix(".json"))
        if damage == "altered" and source.endswith(".safetensors"):
            continue  # safetensors has no checksum: a flipped value is a valid (other) prefix
        with pytest.raises(AdapterLoadError, match=str(path)):
            engine.load_adapter(path)
    assert {name: _tokens(engine, name) for name in good} == good
    assert sorted(engine.adapters()) == ["bottleneck", "dora", "ia3", "lora", "prefix", "prompt"]


def test_adapter_for_another_base_names_both_fingerprints(engine, separate, tmp_path):
    mine = engine.manifest.base_fingerprint
    inputs = optional_graph_inputs(separate.out / "model.onnx")
    inputs[fingerprint_input(OTHER)] = GraphInput(np.dtype("float32"), (1,))
    foreign = write_adapter_file(
        tmp_path,
        "foreign",
        _lora_tensors(separate.out),
        graph_inputs=inputs,
        base_fingerprint=OTHER,
    )
    with pytest.raises(AdapterBaseMismatchError, match=f"{OTHER}.*{mine}"):
        engine.load_adapter(foreign.path)
    prefix = read_kv_prefix_file(separate.out / "adapters/prefix.kvprefix.safetensors", mine)
    tensors = {f"past_key_values.{i}.key": k for i, k in enumerate(prefix.keys)}
    tensors.update({f"past_key_values.{i}.value": v for i, v in enumerate(prefix.values)})
    path = write_kv_prefix_file(
        tmp_path / "foreign.kvprefix.safetensors",
        tensors,
        OTHER,
        {"adapter": "x", "method": "prefix"},
    )
    with pytest.raises(AdapterBaseMismatchError, match=f"{OTHER}.*{mine}"):
        engine.load_adapter(path)
    assert "foreign" not in engine.adapters()


def test_tensor_the_graph_lacks_is_named(engine, separate, tmp_path):
    fp = engine.manifest.base_fingerprint
    inputs = optional_graph_inputs(separate.out / "model.onnx")
    inputs["lm_head.lora_A"] = GraphInput(np.dtype("float32"), (64, "r"))
    stray = {**_lora_tensors(separate.out), "lm_head.lora_A": np.zeros((64, 4), np.float32)}
    written = write_adapter_file(tmp_path, "late", stray, graph_inputs=inputs, base_fingerprint=fp)
    with pytest.raises(AdapterLoadError, match="'lm_head.lora_A'.*no input for"):
        engine.load_adapter(written.path)
    with pytest.raises(AdapterLoadError, match="not an adapter file"):
        engine.load_adapter(separate.out / "model.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx_adapter"):
        engine.load_adapter(tmp_path / "missing.onnx_adapter")


def test_broken_manifest_adapter_is_skipped_at_start(separate, tmp_path, caplog):
    folder = tmp_path / "export"
    shutil.copytree(separate.out, folder)
    path = folder / "adapters/dora.onnx_adapter"
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.ERROR, logger="edgepeft.runtime"):
        engine = Engine(folder)
    assert "dora" not in engine.adapters() and "dora.onnx_adapter" in engine.load_errors["dora"]
    assert any("dora" in r.getMessage() for r in caplog.records)
    assert sorted(engine.adapters()) == ["bottleneck", "ia3", "lora", "prefix", "prompt"]
    assert Engine(folder, load_adapters=False).adapters() == {}


def test_missing_provider_falls_back_to_cpu_with_one_log_line(separate, caplog):
    with caplog.at_level(logging.WARNING, logger="edgepeft.runtime"):
        engine = Engine(separate.out, providers=["NoSuchExecutionProvider"], load_adapters=False)
    assert engine.providers == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records if r.name == "edgepeft.runtime"]
    assert len(lines) == 1 and "NoSuchExecutionProvider" in lines[0]


def test_memory_report_parts(engine):
    before = engine.memory()
    assert before.base_bytes > 500_000 and set(before.adapters) == set(engine.adapters())
    engine.generate(PROMPTS, adapter="prefix", max_new_tokens=4)
    after = engine.memory()
    assert after.kv_cache_bytes > before.kv_cache_bytes
    engine.clear_cache()
    assert engine.memory().kv_cache_bytes == 0
