"""`edgepeft plan`: planned bytes equal what tiny exports hold, the plan answers for every
shipped profile, verdicts and recipes follow memory, and --train is the training planner."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgepeft import plan as planner
from edgepeft.cli import main
from edgepeft.devices import DEVICES_DIR, list_profiles
from edgepeft.tiny import TINY_CONFIGS, tiny_model

QWEN_05B = dict(  # Qwen2.5-0.5B's config (scripts/bench_export.py), no weights
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32768, tie_word_embeddings=True,
)  # fmt: skip
CASES = [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("gemma3_text", {}), ("phi3", {})]


def _initializer_bytes(model_path: Path) -> int:
    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}["length"])
        else:
            total += len(onnx.numpy_helper.to_array(t).tobytes())
    return total


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(model_type, weights) -> (shape, export folder): tiny fused exports, no verify."""
    from edgepeft.export.api import export

    out, made = tmp_path_factory.mktemp("plan"), {}
    for model_type, overrides in CASES:
        model = tiny_model(model_type, **overrides)
        shape = planner.model_shape(model.config)
        formats = ("int4", "int8", "nf4", "fp16", "fp32") if model_type == "llama" else ("int4", "fp32")
        for fmt in formats:
            folder = out / f"{model_type}-{fmt}"
            export(model, folder, weights=fmt, verify=False, quiet=True)
            made[model_type, fmt] = (shape, folder)
    return made


@pytest.mark.slow
def test_planned_bytes_equal_the_exported_initializers(exports):
    for (model_type, fmt), (shape, folder) in exports.items():
        held = _initializer_bytes(folder / "model.onnx")
        data = (folder / "model.onnx.data").stat().st_size
        # Exact but for a few scalar constants (axes, shapes) the plan does not count.
        assert planner.file_bytes(shape, fmt) == pytest.approx(held, rel=1e-3), (model_type, fmt)
        # The data file: the same tensors at 4 KiB-aligned offsets (last one's padding too).
        assert planner.data_file_bytes(shape, fmt) == pytest.approx(data, rel=0.03), (model_type, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("method, mixed", [("rtn", False), ("search", False), ("rtn", True)])
def test_planned_bytes_follow_the_int4_method_and_mixed_precision(tmp_path, method, mixed):
    """Zero points (search) and int8 tensors (mixed, packed q|k|v at v_proj's bits) are
    sized as the export writes them."""
    from edgepeft.export.api import export
    from edgepeft.export.weights import weight_quantization

    model = tiny_model("llama", num_hidden_layers=9)  # down_proj bits vary by layer
    export(model, tmp_path / "int4", weights="int4", int4_method=method, mixed_precision=mixed,
           verify=False, quiet=True)  # fmt: skip
    recipe = weight_quantization(method, mixed)
    shape = planner.model_shape(model.config)
    held = _initializer_bytes(tmp_path / "int4" / "model.onnx")
    assert planner.file_bytes(shape, "int4", quantization=recipe) == pytest.approx(held, rel=1e-3)
    assert planner.file_bytes(shape, "int4", quantization=recipe) != planner.file_bytes(shape, "int4")


def test_fused_families_match_the_exporter():
    from edgepeft.export import fused, onnx_graph

    assert set(planner.FUSED_ARCHS) == set(fused.FUSED_MODEL_TYPES)
    for name, (qk_norm, gemma) in planner.FUSED_ARCHS.items():
        assert (fused._ARCHS[name].qk_norm, fused._ARCHS[name].gemma) == (qk_norm, gemma)
    assert planner.ROTARY_CACHE_LIMIT == fused.ROTARY_CACHE_LIMIT
    assert (planner.EXTERNAL_THRESHOLD, planner.ALIGNMENT) == (
        onnx_graph.EXTERNAL_THRESHOLD,
        onnx_graph.ALIGNMENT,
    )


def test_shape_from_folder_config_file_and_dict_agree(tiny_dir):
    folder = tiny_dir("llama")
    shapes = {
        planner.model_shape(folder, name="x"),
        planner.model_shape(folder / "config.json", name="x"),
        planner.model_shape(json.loads((folder / "config.json").read_text()), name="x"),
    }
    assert len(shapes) == 1


@pytest.mark.parametrize("model_type", sorted(planner.CONFIG_DEFAULTS))
def test_config_json_reads_as_transformers_fills_it_in(model_type):
    """A config.json read with json alone plans like transformers' config of it: sizes only
    (defaults left out, as older versions saved them), the tiny configs, Gemma 3 wrapped."""
    from transformers import AutoConfig

    sparse = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=8, vocab_size=384)  # fmt: skip
    if model_type == "gpt2":
        sparse = dict(n_embd=64, n_layer=8, n_head=8, vocab_size=384)
    for given in (sparse, TINY_CONFIGS.get(model_type, sparse)):
        expected = planner.model_shape(AutoConfig.for_model(model_type, **given), name="x")
        assert planner.model_shape({"model_type": model_type, **given}, name="x") == expected
    if model_type == "gemma3_text":
        wrapped = {"model_type": "gemma3", "text_config": {"model_type": model_type, **sparse}}
        expected = planner.model_shape(AutoConfig.for_model("gemma3", text_config=sparse), name="x")
        assert planner.model_shape(wrapped, name="x") == expected


def test_config_without_a_size_names_the_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=f"{path}: config has no num_attention_heads or n_head"):
        planner.model_shape(path)


def test_lora_count_matches_the_inspector():
    from edgepeft.config import LoraConfig
    from edgepeft.inspect_model import adapter_cost

    for model_type, overrides in CASES:
        model = tiny_model(model_type, **overrides)
        shape = planner.model_shape(model.config)
        expected = adapter_cost(model, LoraConfig(r=8, target_modules="all-linear"))
        assert shape.lora_parameters(8) == expected, model_type


@pytest.mark.parametrize("device", list_profiles())
def test_plan_answers_for_every_profile(device):
    result = planner.plan(QWEN_05B, device, context=1024, adapters=2)
    assert set(result.formats) == set(planner.FORMATS)
    for f in result.formats.values():
        parts = f.runtime + f.weights_resident + f.adapters + max(f.kv_cache + f.activations, f.load_peak)
        assert f.total == parts and f.fits == (f.total <= f.budget)
        assert f.tok_s_start >= f.tok_s_full > 0
    rec = result.recommendation
    assert rec.recipe is not None and rec.plan.fits and rec.max_context >= 1024
    assert rec.recipe.accelerator == result.device.accelerator
    assert "recommended: " in str(result)
    json.dumps(result.to_dict())


def test_formats_order_memory_and_speed():
    result = planner.plan(QWEN_05B, "raspberry-pi-5-8gb", context=2048)
    f = result.formats
    assert f["int4"].file_bytes < f["int8"].file_bytes < f["fp16"].file_bytes < f["fp32"].file_bytes
    assert f["int4"].tok_s_start > f["int8"].tok_s_start > f["fp32"].tok_s_start
    half = planner.plan(QWEN_05B, "raspberry-pi-5-8gb", context=1024).formats["int4"]
    assert f["int4"].kv_cache == 2 * half.kv_cache == 2048 * 2 * 24 * 2 * 64 * 4
    assert result.recommendation.recipe.name == "cpu-int4"  # the Pi prefers int4


def test_gpu_prefers_fp16_and_falls_back_when_memory_is_short(tmp_path):
    assert planner.plan(QWEN_05B, "rtx-4060-8gb").recommendation.recipe.name == "cuda-fp16"
    small = (DEVICES_DIR / "rtx-4060-8gb.toml").read_text()
    small = small.replace('memory = "8GiB"', 'memory = "1536MiB"').replace('reserved = "512MiB"', 'reserved = "0"')
    path = tmp_path / "gpu-1536mb.toml"
    path.write_text(small)
    result = planner.plan(QWEN_05B, path, context=2048)
    assert not result.formats["fp16"].fits and result.formats["int4"].fits
    assert result.recommendation.recipe.weights in ("nf4", "int4")


def test_context_that_does_not_fit_is_shortened(tmp_path):
    profile = (DEVICES_DIR / "raspberry-pi-5-8gb.toml").read_text()
    path = tmp_path / "tight.toml"
    path.write_text(profile.replace('memory = "8GiB"', 'memory = "1300MiB"').replace('"1GiB"', '"0"'))
    result = planner.plan(QWEN_05B, path, context=32768)
    rec = result.recommendation
    assert not result.formats["int4"].fits
    assert rec.recipe is not None and 0 < rec.max_context < 32768 and rec.plan.fits
    assert "does not fit" in rec.reason
    longer = planner.plan_format(result.model, result.device, rec.recipe.weights,
                                 context=rec.max_context + planner.KV_STEP)  # fmt: skip
    assert not longer.fits


def test_cli_table_json_and_errors(tiny_dir, capsys):
    folder = str(tiny_dir("llama"))
    assert main(["plan", "--model", folder, "--device", "raspberry-pi-5-8gb", "--context", "128"]) == 0
    text = capsys.readouterr().out
    assert "weights in memory" in text and "recommended: " in text and "cpu-int4" in text
    assert main(["plan", "--model", folder, "--device", "local", "--weights", "int4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["formats"]) == ["int4"] and data["device"]["name"] == "local"
    assert main(["plan", "--model", folder, "--device", "nope"]) == 2
    assert "no device profile 'nope'" in capsys.readouterr().err
    assert main(["plan", "--model", folder, "--device", "local", "--context", "100000"]) == 2
    assert "exceeds the model's 2048 positions" in capsys.readouterr().err


def test_train_switches_to_the_training_planner(tiny_dir, capsys):
    from edgepeft.config import LoraConfig
    from edgepeft.train.memory import estimate_memory

    folder = str(tiny_dir("llama"))
    argv = ["plan", "--model", folder, "--device", "rtx-4060-8gb", "--train", "--context", "64",
            "--batch", "2", "--checkpointing", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory(
        planner.load_config(folder), quant="nf4", batch_size=2, seq_len=64, device="cuda",
        adapter_config=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
        gradient_checkpointing=True, precision="auto",
    )  # fmt: skip
    assert data["estimate"]["total"] == expected.total and data["fits"]
    assert data["torch_device"] == "cuda" and data["largest_batch_size"] >= 2
