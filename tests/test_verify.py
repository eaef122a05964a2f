"""verify(): the export against PyTorch rebuilt from the manifest; numbers, verify.json, failures.

    export(verify=False) ──verify(dir)──► base reloaded from the manifest (+ adapters merged)
        fp32: prefill / decode max |logit diff| <= 1e-4, 24/24 greedy tokens, passed
        fp32, logits scaled to ~600: |Δ| above 1e-4 yet passed (judged relative to the logits);
            one weight of the reference moved by 1e-3: every top-1 still equal, yet it fails
        NaN in onnxruntime's logits (one lm_head entry) or in PyTorch's: fails, saying where
        int4: worse than fp32, much closer to PyTorch holding the graph's own weights, passed
            on KL and top-1; the graph of another model's weights: fails, loudly
        a graph swapped for another model's: large diffs, tokens disagree, CLI exit 1
        a base folder changed since the export: a clear error
"""

from __future__ import annotations

import copy
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
from edgepeft.export.verify import CRITERIA, check_graph, verify
from edgepeft.tiny import tiny_model, tiny_tokenizer

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
    assert check.criteria == "fp32" and check.exact and report.passed
    assert check.relative_max_diff <= CRITERIA["fp32"].max_relative_diff
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
    report = verify(out)
    check = report.graphs[0]
    assert check.weights == check.criteria == "int4" and not check.exact
    # Measured on this model: ~0.15 vs fp32 (weight rounding), ~1e-2 vs the graph's own
    # dequantized weights (int8 activations at accuracy_level 4 only).
    assert 1e-3 < check.prefill_max_abs_diff and check.relative_max_diff > 1e-3
    assert check.dequant_prefill_max_abs_diff < check.prefill_max_abs_diff / 3
    assert check.dequant_decode_max_abs_diff < check.decode_max_abs_diff / 3
    # Judged on KL and top-1 (measured: KL ~5e-4, 34/41): a few flipped near-ties pass.
    assert not check.top1_equal and check.passed and report.passed
    assert "int4: mean KL <= 5e-01, top-1 >= 50%" in str(report)

    # The int4 graph of another model's weights: the trained model's tokens are lost.
    export_generic(tiny_model("gpt2", seed=1), out, "int4")
    broken = verify(out)
    assert not broken.passed and broken.graphs[0].top1_share < 0.5
    loud = "the device model disagrees with the trained model on"
    assert loud in str(broken) and "FAILED: (base) int4" in str(broken)
    assert loud in (out / "verify.md").read_text()
    assert main(["verify", str(out)]) == 1


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
    write_json(moved / "edgepeft.json", {**document, "base_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="fingerprint"):
        verify(moved)


def test_not_an_export_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="edgepeft export"):
        verify(tmp_path)
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _scaled_llama(folder, scale: float):
    """The tiny llama with its final norm scaled: logits of order `scale`."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def test_fp32_is_judged_relative_to_the_logits_scale(tmp_path):
    """A correct export of a model with large logits passes; a subtly wrong graph fails.

    Rounding grows with the logits: SmolLM2-135M (30 layers, logits ~25) shows 1.1e-4. This
    2-layer model rounds ~15x less (rel ~3e-7), so its logits are scaled to ~600 to show the
    same absolute error, which the old fixed 1e-4 failed.
    """
    model = _scaled_llama(tmp_path / "base", 600.0)
    out = tmp_path / "fp32"
    export(tmp_path / "base", out, weights="fp32", verify=False, quiet=True)
    check = check_graph(out, model)
    print(f"scaled: |Δ| {check.max_abs_diff:.2e}, scale {check.logit_scale:.0f}")
    assert check.logit_scale > 300 and check.max_abs_diff > FP32_TOL  # the old bound fails
    assert check.passed and check.relative_max_diff < CRITERIA["fp32"].max_relative_diff / 10

    # One weight of the reference moved by 1e-3 (weights ~0.02): same top-1 everywhere, KL
    # ~5e-7, but 1.5e-4 of the logits' scale off: the graph is not the model.
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3
    wrong = check_graph(out, moved)
    assert wrong.top1_equal and wrong.greedy_equal and wrong.mean_kl < CRITERIA["fp32"].max_kl
    assert not wrong.passed and "of the largest logit" in wrong.failures[0]


def test_nan_logits_fail_and_say_where(fp32_export, tiny_dir, tmp_path):
    """The old check took max(0.0, nan) == 0.0 and PASSED a graph answering NaN."""
    broken = tmp_path / "nan"
    shutil.copytree(fp32_export, broken)
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.lm_head.weight[17, 3] = float("nan")  # one vocabulary entry (tied: also its input)
    export_generic(model, broken, "fp32")
    report = verify(broken)
    (check,) = report.graphs
    assert not check.passed and not report.passed
    assert "NaN/inf in onnxruntime's logits at the prefill, prompt 0" in check.failures[0]
    assert "FAILED" in str(report) and "onnxruntime's logits" in (broken / "verify.md").read_text()
    assert main(["verify", str(broken)]) == 1

    # NaN on the reference's side: the trained model itself is broken.
    reference, _ = edgepeft.load_base(tiny_dir("gpt2"), quant="none")
    with torch.no_grad():
        reference.lm_head.weight[17, 3] = float("nan")
    check = check_graph(fp32_export, reference, max_new_tokens=2)
    assert not check.passed and "PyTorch's logits (the reference itself" in check.failures[0]
