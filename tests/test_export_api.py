"""export(): base alone, merged adapters over an NF4 base, manifest, recipes, atomic writes, CLI.

    tiny folder ──export(...)──► out/ model.onnx(.data), tokenizer, edgepeft.json, verify.json
    LoRA (init="random") over NF4 ──merged──► out/sql/ ... ; out/edgepeft.json lists the graphs
        ORT logits vs merge(model, "sql", quant="none") in PyTorch: <= 1e-4
    a failing adapter half way: no out/, no staging folder left
    `edgepeft export` then `edgepeft verify`: exit 0, table printed, verify.json written
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edgepeft
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.cli import main
from edgepeft.config import LoraConfig
from edgepeft.export.api import export, load_recipe
from edgepeft.export.graph_info import input_names
from edgepeft.export.manifest import ExportIndex, Manifest, read_manifest
from edgepeft.merge import merge

FP32_TOL = 1e-4


def lora_folder(tiny_dir, tmp_path, arch="gpt2", name="sql", seed=1):
    """An adapter folder: random LoRA (non-zero B) trained over the NF4 base."""
    model, _ = edgepeft.load_base(tiny_dir(arch), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random"), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return save_adapter(model, tmp_path / f"adapter-{arch}-{name}", name)


def ort_prefill(folder, manifest: Manifest, ids, mask) -> np.ndarray:
    sess = ort.InferenceSession(str(folder / manifest.model_file), providers=["CPUExecutionProvider"])
    past = [
        np.zeros((ids.shape[0], manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
        for _ in range(2 * manifest.num_layers)
    ]
    feeds = dict(zip(input_names(manifest.num_layers), [ids.numpy(), mask.numpy(), *past], strict=True))
    return sess.run(None, feeds)[0]


def staging_left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_base_alone(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = export(tiny_dir("gpt2"), out, weights="fp32", quiet=True)
    assert result.graphs == {"": out}
    for name in ("model.onnx", "model.onnx.data", "edgepeft.json", "verify.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    m = read_manifest(out)
    assert isinstance(m, Manifest)
    base, _ = edgepeft.load_base(tiny_dir("gpt2"), quant="none")
    assert m.base == str(tiny_dir("gpt2").resolve())
    assert m.base_fingerprint == edgepeft.fingerprint(base)
    assert (m.model_type, m.graph, m.weights, m.base_quant) == ("gpt2", "generic", "fp32", "none")
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size) == (2, 4, 16, 384)
    assert (m.eos_token_id, m.bos_token_id, m.pad_token_id) == (2, 1, 0)
    assert m.max_context == 256 and m.kv_dtype == "float32" and m.adapters == []
    assert m.inputs[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert m.outputs[-1] == "present.1.value" and m.num_nodes == sum(m.op_counts.values())
    assert m.verify["greedy_equal"] and m.verify["prefill_max_abs_diff"] <= FP32_TOL
    assert result.verify.passed and staging_left(tmp_path) == []
    assert str(result).startswith(f"exported 1 graph(s) to {out}")


def test_merged_lora_over_nf4_equals_the_merged_pytorch_model(tiny_dir, tmp_path, input_ids):
    adapter = lora_folder(tiny_dir, tmp_path)
    out = tmp_path / "out"
    result = export(tiny_dir("gpt2"), out, {"sql": adapter}, weights="fp32", quiet=True)
    assert set(result.graphs) == {"sql"}
    index = read_manifest(out)
    assert isinstance(index, ExportIndex) and index.graphs == {"sql": "sql"}
    m = read_manifest(out / "sql")
    assert m.base_quant == "nf4"  # read from the adapter's metadata

    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model, _ = edgepeft.load_base(tiny_dir("gpt2"), quant="nf4")
    assert m.base_fingerprint == index.base_fingerprint == edgepeft.fingerprint(model)
    with torch.no_grad():
        base_logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    edgepeft.load_adapter(model, adapter, name="sql")
    merged, report = merge(model, "sql", quant="none")
    assert [(a.name, a.peft_type, a.fingerprint) for a in m.adapters] == [
        ("sql", "LORA", report.fingerprint)
    ]
    got = ort_prefill(out / "sql", m, input_ids, mask)
    with torch.no_grad():
        want = merged(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool().numpy()
    assert np.abs(got - want.numpy())[real].max() <= FP32_TOL
    assert np.abs(got - base_logits.numpy())[real].max() > 1e-2  # the adapter is in the graph
    assert m.verify["greedy_equal"] and json.loads((out / "verify.json").read_text())["passed"]


def test_two_adapters_give_two_graphs_and_the_caller_model_is_untouched(tiny_dir, tmp_path):
    first = lora_folder(tiny_dir, tmp_path, name="sql", seed=1)
    second = lora_folder(tiny_dir, tmp_path, name="chat", seed=2)
    model, tokenizer = edgepeft.load_base(tiny_dir("gpt2"), quant="nf4")
    names = [n for n, _ in model.named_modules()]
    out = tmp_path / "out"
    result = export(model, out, [first, second], weights="fp32", tokenizer=tokenizer, quiet=True)
    assert set(result.graphs) == {first.name, second.name}
    assert [n for n, _ in model.named_modules()] == names
    logits = {}
    ids = torch.tensor([[5, 6, 7, 8]])
    for name in result.graphs:
        m = read_manifest(out / name)
        logits[name] = ort_prefill(out / name, m, ids, torch.ones_like(ids))
        assert m.verify["greedy_equal"] and (out / name / "tokenizer.json").is_file()
    assert np.abs(logits[first.name] - logits[second.name]).max() > 1e-2
    assert len(result.verify.graphs) == 2


def test_a_failure_half_way_leaves_nothing(tiny_dir, tmp_path):
    good = lora_folder(tiny_dir, tmp_path, "gpt2")
    wrong_arch = lora_folder(tiny_dir, tmp_path, "llama")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="adapter-llama-sql"):
        export(tiny_dir("gpt2"), out, {"sql": good, "other": wrong_arch}, weights="fp32",
               quant="nf4", verify=False, quiet=True)
    assert not out.exists() and staging_left(tmp_path) == []


def test_existing_output_is_kept_unless_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(tiny_dir("gpt2"), out, weights="fp32", quiet=True)
    assert (out / "keep.txt").read_text() == "mine"
    export(tiny_dir("gpt2"), out, weights="fp32", verify=False, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_recipe_gives_defaults_and_flags_win(tiny_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('weights = "int8"\nblock_size = 16\naccuracy_level = 0\nmax_context = 64\n')
    export(tiny_dir("gpt2"), tmp_path / "a", recipe=recipe, verify=False, quiet=True)
    m = read_manifest(tmp_path / "a")
    assert (m.weights, m.block_size, m.accuracy_level, m.max_context) == ("int8", 16, 0, 64)
    export(tiny_dir("gpt2"), tmp_path / "b", weights="fp32", recipe=recipe, verify=False, quiet=True)
    assert read_manifest(tmp_path / "b").weights == "fp32"


def test_shipped_recipes_load():
    assert load_recipe("export/cpu-int4.toml")["weights"] == "int4"
    assert load_recipe("export/cpu-int8.toml")["weights"] == "int8"


@pytest.mark.parametrize(
    "text, match",
    [("weight = 'int4'", "unknown key"), ("block_size = '32'", "must be a int"), ("weights = [", "TOML")],
)
def test_bad_recipes_are_refused(tmp_path, text, match):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(recipe)


def test_separate_mode_on_a_traced_graph(tiny_dir, tmp_path):
    """GPT-2 has no fused builder: its separate export is the traced graph with adapter inputs."""
    adapter = lora_folder(tiny_dir, tmp_path)
    result = export(tiny_dir("gpt2"), tmp_path / "out", {"sql": adapter}, weights="fp32",
                    mode="separate", quiet=True)
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.graph, manifest.mode) == ("generic", "separate")
    assert [e.name for e in manifest.adapters] == ["sql"]
    assert result.verify.passed


def test_cli_export_then_verify(tiny_dir, tmp_path, capsys):
    adapter = lora_folder(tiny_dir, tmp_path)
    out = tmp_path / "out"
    argv = ["export", "--base", str(tiny_dir("gpt2")), "--adapter", f"sql={adapter}",
            "--weights", "fp32", "--out", str(out), "--no-verify", "--quiet"]
    assert main(argv) == 0
    assert "exported 1 graph(s)" in capsys.readouterr().out
    assert not (out / "verify.json").exists()
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sql" in printed and "PASSED" in printed
    document = json.loads((out / "verify.json").read_text())
    assert document["passed"] and document["graphs"][0]["tokens_agree"] == 24
    assert main(argv) == 2  # out exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def test_manifest_records_the_int4_recipe_in_every_mode(tiny_dir, tmp_path):
    """merged and separate int4 exports record how their weights were quantized; fp32 and a
    manifest written before the field existed read as None (symmetric RTN, for old int4)."""
    adapter = lora_folder(tiny_dir, tmp_path, arch="llama")
    base = tiny_dir("llama")
    separate = export(base, tmp_path / "sep", {"sql": adapter}, mode="separate", verify=False,
                      quiet=True, int4_method="rtn")  # fmt: skip
    m = read_manifest(tmp_path / "sep")
    assert (m.mode, m.quantization["method"], m.quantization["mixed"]) == ("separate", "rtn", True)
    assert "lm_head" in m.quantization["int8_tensors"] and separate.manifest == m
    merged = export(base, tmp_path / "merged", {"sql": adapter}, verify=False, quiet=True)
    graph = read_manifest(merged.graphs["sql"])
    assert graph.quantization["method"] == "search" and not graph.quantization["symmetric"]
    export(base, tmp_path / "fp32", weights="fp32", verify=False, quiet=True)
    assert read_manifest(tmp_path / "fp32").quantization is None
    old = json.loads((tmp_path / "fp32" / "edgepeft.json").read_text())
    del old["quantization"]
    assert Manifest.from_dict(old).quantization is None
