"""verify(): the export against PyTorch rebuilt from the manifest; numbers, verify.json, failures.

    export(verify=False) ──verify(dir)──► base reloaded from the manifest (+ adapters merged)
        fp32: prefill / decode max |logit diff| <= 1e-4, 24/24 greedy tokens, passed
        int4: worse than fp32, and much closer to PyTorch holding the graph's own weights
        a graph swapped for another model's: large diffs, tokens disagree, CLI exit 1
        a base folder changed since the export: a clear error
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import edgepeft
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.cli import main
from edgepeft.config import LoraConfig
from edgepeft.export.api import export
from edgepeft.export.generic import export_generic
from edgepeft.export.manifest import read_manifest, write_json
from edgepeft.export.verify import TOLERANCES, verify
from edgepeft.tiny import tiny_model

FP32_TOL = 1e-4


def lora_folder(tiny_dir, tmp_path):
    """A random LoRA (non-zero B) saved over the NF4 gpt2 base."""
    model, _ = edgepeft.load_base(tiny_dir("gpt2"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random"), "sql")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model, "sql"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return save_adapter(model, tmp_path / "adapter", "sql")


@pytest.fixture(scope="module")
def fp32_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "gpt2-fp32"
    export(tiny_dir("gpt2"), out, weights="fp32", verify=False, quiet=True)
    return out


def test_fp32_report_numbers_and_file(fp32_export):
    report = verify(fp32_export)
    (check,) = report.graphs
    assert check.prefill_max_abs_diff <= FP32_TOL and check.decode_max_abs_diff <= FP32_TOL
    assert check.tokens_agree == check.tokens_total == 3 * 8
    assert check.tolerance == TOLERANCES["fp32"] and check.within_tolerance and report.passed
    assert check.dequant_prefill_max_abs_diff is None  # nothing quantized
    document = json.loads((fp32_export / "verify.json").read_text())
    assert document == json.loads(json.dumps(report.to_dict()))
    assert document["graphs"][0]["prefill_max_abs_diff"] == check.prefill_max_abs_diff
    text = str(report)
    assert "fp32" in text and "24/24" in text and "PASSED" in text


def test_prompts_and_token_count_are_used(fp32_export):
    report = verify(fp32_export, prompts=[[5, 6, 7], [9, 10, 11, 12, 13]], max_new_tokens=3)
    assert (report.prompts, report.graphs[0].tokens_total) == (2, 6)
    assert report.passed


def test_int4_is_reported_against_both_references(tiny_dir, tmp_path):
    out = tmp_path / "int4"
    export(tiny_dir("gpt2"), out, weights="int4", verify=False, quiet=True)
    check = verify(out).graphs[0]
    assert check.weights == "int4" and check.tolerance == TOLERANCES["int4"]
    # Measured on this model: ~0.15 vs fp32 (weight rounding), ~1e-2 vs the graph's own
    # dequantized weights (int8 activations at accuracy_level 4 only).
    assert 1e-3 < check.prefill_max_abs_diff < TOLERANCES["int4"]
    assert check.dequant_prefill_max_abs_diff < check.prefill_max_abs_diff / 3
    assert check.dequant_decode_max_abs_diff < check.decode_max_abs_diff / 3
    assert check.passed  # disagreeing greedy tokens fail fp32 graphs only


def test_merged_set_rebuilds_each_adapter(tiny_dir, tmp_path):
    adapter = lora_folder(tiny_dir, tmp_path)
    out = tmp_path / "set"
    export(tiny_dir("gpt2"), out, {"sql": adapter}, weights="fp32", verify=False, quiet=True)
    report = verify(out)
    assert [g.name for g in report.graphs] == ["sql"]
    assert report.graphs[0].prefill_max_abs_diff <= FP32_TOL and report.passed
    assert (out / "verify.json").is_file()


def test_a_wrong_graph_fails(fp32_export, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(fp32_export, broken)
    export_generic(tiny_model("gpt2", seed=1), broken, "fp32")  # another model's weights
    report = verify(broken)
    check = report.graphs[0]
    assert check.prefill_max_abs_diff > 1e-2 and not check.greedy_equal and not report.passed
    assert "FAILED" in str(report)
    assert main(["verify", str(broken)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_changed_base_is_named(fp32_export, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(fp32_export, moved)
    document = read_manifest(moved).to_dict()
    write_json(moved / "manifest.json", {**document, "base_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="fingerprint"):
        verify(moved)


def test_not_an_export_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="edgepeft export"):
        verify(tmp_path)
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
