"""Export folders checked when they are opened: file sizes and hashes, adapter checksums,
the manifest against its graph, and the manifest's old name.

    export (separate: a LoRA file + a KV-prefix file) ─► copy ─► damage one thing
        zero bytes inside model.onnx.data   ─► Engine(verify_files=True), verify --files: named
        truncate model.onnx.data            ─► Engine(): named (not onnxruntime's error)
        flip a bit in an adapter file, no sidecar ─► load_adapter: named
        edit one manifest field             ─► Engine(): the field, both values
        edgepeft.json named manifest.json   ─► Engine() and read_manifest still open it
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.cli import main
from edgepeft.config import LoraConfig, PrefixTuningConfig
from edgepeft.export.api import export
from edgepeft.export.files import FileIntegrityError
from edgepeft.export.manifest import LEGACY_MANIFEST_FILE, MANIFEST_FILE, read_manifest
from edgepeft.runtime import Engine
from edgepeft.runtime.contract import ManifestGraphMismatchError
from edgepeft.runtime.errors import AdapterLoadError

PROMPT = [5, 17, 42, 99, 123, 7]


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    """A separate-mode fp32 export of the tiny llama with a LoRA and a prefix-tuning file."""
    root = tmp_path_factory.mktemp("integrity")
    base = tiny_dir("llama")
    model, _ = load_base(base, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, config in {
        "sql": LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
    }.items():
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / "src" / name, name)
    set_adapter(model, None)
    out = root / "out"
    export(base, out, adapters=folders, weights="fp32", mode="separate", verify=False, quiet=True)
    return out


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def _edit_manifest(folder: Path, **fields) -> None:
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# ---------------------------------------------------------------- files and hashes


def test_the_manifest_records_every_file(exported):
    files = read_manifest(exported).files
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json",
                 "adapters/sql.onnx_adapter", "adapters/sql.json",
                 "adapters/prefix.kvprefix.safetensors"):
        assert files[name]["size"] == (exported / name).stat().st_size
    assert MANIFEST_FILE not in files and "verify.json" not in files
    Engine(exported, verify_files=True)  # the export as written passes


def test_zeroed_bytes_in_the_weights_are_named(copy, capsys):
    data = copy / "model.onnx.data"
    size = data.stat().st_size
    span = min(1 << 20, size // 2)  # 1 MiB, or half the tiny model's weights
    with open(data, "r+b") as f:
        f.seek(size // 4)
        f.write(b"\0" * span)
    assert data.stat().st_size == size
    Engine(copy)  # sizes alone: the same
    with pytest.raises(FileIntegrityError, match=r"model\.onnx\.data has sha256 .*re-export"):
        Engine(copy, verify_files=True)
    assert main(["verify", str(copy), "--files"]) == 1
    assert "model.onnx.data has sha256" in capsys.readouterr().err


def test_verify_files_passes_an_intact_export(exported, capsys):
    assert main(["verify", str(exported), "--files"]) == 0
    assert "match their size and sha256" in capsys.readouterr().out


def test_truncated_weights_are_named_before_onnxruntime_reads_them(copy):
    data = copy / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(FileIntegrityError, match=rf"model\.onnx\.data has {size - 4096} bytes, the export recorded {size}"):
        Engine(copy)


# ---------------------------------------------------------------- adapter files alone


def _flip_inside(path: Path, needle: bytes) -> None:
    """Flip one bit inside `needle`'s bytes in the file (the size stays)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at >= 0, f"tensor bytes not found in {path}"
    raw[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_bit_flipped_onnx_adapter_without_sidecar_is_named(copy, tmp_path):
    import onnxruntime as ort

    source = copy / "adapters" / "sql.onnx_adapter"
    parameters = ort.AdapterFormat.read_adapter(str(source)).get_parameters()
    tensor = next(v.numpy() for k, v in parameters.items() if k.endswith("lora_B"))
    moved = tmp_path / "sql.onnx_adapter"  # copied without its sidecar json
    shutil.copy(source, moved)
    engine = Engine(copy, load_adapters=False)
    engine.load_adapter(moved, "intact")
    _flip_inside(moved, np.ascontiguousarray(tensor).tobytes())
    with pytest.raises(AdapterLoadError, match=r"sql\.onnx_adapter: its tensors have checksum .*re-export"):
        engine.load_adapter(moved, "flipped")


def test_bit_flipped_kv_prefix_file_is_named(copy, tmp_path):
    from safetensors.numpy import load_file

    source = copy / "adapters" / "prefix.kvprefix.safetensors"
    tensor = load_file(str(source))["past_key_values.0.key"]
    moved = tmp_path / "prefix.kvprefix.safetensors"
    shutil.copy(source, moved)
    engine = Engine(copy, load_adapters=False)
    engine.load_adapter(moved, "intact")
    _flip_inside(moved, np.ascontiguousarray(tensor).tobytes())
    with pytest.raises(AdapterLoadError, match=r"prefix\.kvprefix\.safetensors: its tensors have sha256"):
        engine.load_adapter(moved, "flipped")


# ---------------------------------------------------------------- manifest against graph


@pytest.mark.parametrize(
    "field, value",
    [
        ("kv_dtype", "float16"),
        ("num_kv_heads", 4),
        ("head_dim", 8),
        ("num_layers", 3),
        ("vocab_size", 500),
        ("weights", "int4"),
        ("max_context", 4096),
        ("base_fingerprint", "0" * 16),
        ("inputs", ["input_ids", "attention_mask"]),
        ("outputs", ["logits"]),
    ],
)
def test_a_manifest_field_contradicting_the_graph_is_named(copy, field, value):
    graph_value = getattr(read_manifest(copy), field)
    _edit_manifest(copy, **{field: value})
    with pytest.raises(ManifestGraphMismatchError, match=f"field '{field}' is ") as caught:
        Engine(copy)
    message = str(caught.value)
    assert MANIFEST_FILE in message and "re-export" in message
    if not isinstance(value, list):
        assert repr(value) in message and repr(graph_value) in message


def test_a_shorter_max_context_is_allowed(copy):
    _edit_manifest(copy, max_context=64)
    assert Engine(copy).spec.max_context == 64


# ---------------------------------------------------------------- the old manifest name


def test_an_export_with_the_old_manifest_name_still_opens(copy):
    reference = Engine(copy).generate(PROMPT, max_new_tokens=6, return_result=True).token_ids
    (copy / MANIFEST_FILE).rename(copy / LEGACY_MANIFEST_FILE)
    assert read_manifest(copy).mode == "separate"
    engine = Engine(copy, verify_files=True)
    assert engine.generate(PROMPT, max_new_tokens=6, return_result=True).token_ids == reference
    assert sorted(engine.adapters()) == ["prefix", "sql"]


def test_a_listed_adapter_failing_its_hash_is_skipped_and_named(copy):
    path = copy / "adapters" / "sql.onnx_adapter"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    engine = Engine(copy, verify_files=True)  # the base and the other adapter still serve
    assert sorted(engine.adapters()) == ["prefix"]
    assert "sql.onnx_adapter has sha256" in engine.load_errors["sql"]
