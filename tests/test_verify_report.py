"""The verify report: metrics, verify.md, judged thresholds, separate adapters, perplexity.

    fp32 llama        KL ~0, top-1 and continuations all equal; perplexity = exp(HF loss)
    prompts           drawn from the vocabulary with a fixed seed (no special tokens)
    separate nf4      base + each .onnx_adapter activated through onnxruntime.LoraAdapter,
                      judged exact (relative |Δ| measured ~4e-7); a swapped file fails, CLI exit 1
    merged nf4        weights rounded again at export: judged on KL and top-1 ("nf4 requantized")
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

import edgepeft
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.cli import main
from edgepeft.config import LoraConfig
from edgepeft.export.api import export
from edgepeft.export.manifest import read_manifest
from edgepeft.export.verify import CRITERIA, GraphCheck, criteria_key, verify

TEXT = "the quick brown fox jumps over the lazy dog. SELECT name FROM users WHERE id = 1;"
NF4_TOL = 1e-3


def random_lora(tiny_dir, folder, name: str, seed: int):
    """A LoRA with non-zero B over the NF4 llama base, saved as a PEFT folder."""
    model, _ = edgepeft.load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(seed)
    add_adapter(model, LoraConfig(init="random"), name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return save_adapter(model, folder / name, name)


@pytest.fixture(scope="module")
def fp32_llama(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "llama-fp32"
    export(tiny_dir("llama"), out, weights="fp32", verify=False, quiet=True)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {"sql": random_lora(tiny_dir, folder, "sql", 0), "chat": random_lora(tiny_dir, folder, "chat", 5)}


def test_fp32_metrics_files_and_perplexity(fp32_llama, tiny_dir):
    report = verify(fp32_llama, text=TEXT)
    (check,) = report.graphs
    assert check.exact and check.passed and report.passed
    assert check.max_abs_diff <= 1e-4 and check.mean_kl < 1e-9
    assert check.top1_agree == check.top1_total == 7 + 4 + 9 + 3 * 7  # prefill + decode positions
    assert (check.greedy_match, check.greedy_prompts, check.greedy_tokens) == (3, 3, 8)

    # Perplexity against an independent computation: HF's own shifted cross-entropy.
    model, tokenizer = edgepeft.load_base(tiny_dir("llama"), quant="none")
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert check.perplexity_tokens == ids.shape[1]
    assert check.perplexity_torch == pytest.approx(expected, rel=1e-5)
    assert check.perplexity_ort == pytest.approx(expected, rel=1e-4)

    document = json.loads((fp32_llama / "verify.json").read_text())
    assert document == json.loads(json.dumps(report.to_dict()))
    assert document["graphs"][0]["mean_kl"] == check.mean_kl
    table = (fp32_llama / "verify.md").read_text()
    assert "| adapter | weights | max \\|Δlogit\\|" in table
    assert "| (base) | fp32 |" in table and "| 3/3 × 8 tok |" in table and "| pass |" in table


def test_default_prompts_are_drawn_from_the_vocabulary(fp32_llama):
    first = verify(fp32_llama, max_new_tokens=1).prompt_tokens
    assert [len(p) for p in first] == [7, 4, 9]
    assert not {0, 1, 2} & {t for p in first for t in p}  # <pad>, <s>, </s>
    assert verify(fp32_llama, max_new_tokens=1).prompt_tokens == first
    given = verify(fp32_llama, prompts=["hello world", "SELECT"], max_new_tokens=2)
    assert given.prompts == 2 and given.graphs[0].greedy_prompts == 2


def test_judged_formats(fp32_llama):
    manifest = read_manifest(fp32_llama)
    assert criteria_key(manifest) == "fp32"
    assert criteria_key(replace(manifest, weights="nf4", base_quant="nf4")) == "nf4"
    rounded = replace(manifest, weights="nf4", base_quant="none")  # quantized at export
    assert criteria_key(rounded) == "nf4 requantized"
    assert criteria_key(replace(manifest, weights="fp4", base_quant="nf4")) == "fp4 requantized"
    assert criteria_key(replace(manifest, weights="int4")) == "int4"
    assert set(CRITERIA) >= {"fp32", "fp16", "int8", "int4", "nf4", "fp4", "nf4 requantized"}
    check = GraphCheck(
        name="", weights="fp32", prefill_max_abs_diff=2e-3, decode_max_abs_diff=0.0,
        tokens_agree=3, tokens_total=3, criteria="fp32", top1_agree=5, top1_total=5,
        logit_scale=20.0,
    )
    assert not check.passed  # 1e-4 of the logits' scale: above 5e-5
    assert replace(check, logit_scale=100.0).passed  # the same |Δ| is 2e-5 of larger logits
    assert not replace(check, logit_scale=100.0, top1_agree=4).passed
    assert not replace(check, logit_scale=100.0, mean_kl=float("nan")).passed
    int4 = replace(check, weights="int4", criteria="int4", prefill_max_abs_diff=2.0, mean_kl=0.1)
    assert int4.passed and not replace(int4, top1_agree=2).passed  # 40% agree
    assert "disagrees with the trained model on 60% of tokens" in replace(int4, top1_agree=2).failures[0]
    assert not replace(int4, mean_kl=5.2).passed
    assert not replace(int4, decode_max_abs_diff=float("inf")).passed


def test_separate_nf4_checks_each_adapter_file(tiny_dir, adapters, tmp_path, capsys):
    out = tmp_path / "separate"
    export(tiny_dir("llama"), out, adapters, weights="nf4", mode="separate", verify=False, quiet=True)
    report = verify(out)
    assert [g.name for g in report.graphs] == ["", "sql", "chat"]
    for check in report.graphs:
        assert check.weights == "nf4" and check.exact and check.passed
        assert check.max_abs_diff <= NF4_TOL and check.top1_agree == check.top1_total
    assert report.graphs[1].adapter_file.endswith("sql.onnx_adapter")

    # sql's file replaced by chat's: onnxruntime now computes chat, PyTorch sql.
    files = {a.name: out / a.file for a in read_manifest(out).adapters}
    shutil.copyfile(files["chat"], files["sql"])
    broken = verify(out)
    by_name = {g.name: g for g in broken.graphs}
    assert not by_name["sql"].passed and by_name["sql"].max_abs_diff > 1e-2
    assert by_name["chat"].passed and by_name[""].passed and not broken.passed
    table = (out / "verify.md").read_text()
    assert "| sql | nf4 |" in table and "**FAIL**" in table
    assert main(["verify", str(out), "--max-new-tokens", "2"]) == 1
    assert "FAILED: sql nf4" in capsys.readouterr().out


def test_merged_nf4_is_judged_on_kl_and_top1(tiny_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    export(tiny_dir("llama"), out, {"sql": adapters["sql"]}, weights="nf4", verify=False, quiet=True)
    report = verify(out)
    (check,) = report.graphs
    # The merged weight is rounded to NF4 again: measured ~0.1 on this model.
    assert check.criteria == "nf4 requantized" and not check.exact
    assert check.max_abs_diff > NF4_TOL and check.passed and report.passed
    assert "nf4 requantized: mean KL <= 5e-01, top-1 >= 50%" in str(report)
    assert "| sql | nf4 |" in (out / "verify.md").read_text()


def test_cli_prompts_and_text(fp32_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["verify", str(fp32_llama), "--prompt", "hello world", "--text", str(text)]) == 0
    assert "PASSED" in capsys.readouterr().out
    document = json.loads((fp32_llama / "verify.json").read_text())
    assert document["prompts"] == 1 and document["graphs"][0]["perplexity_ort"] > 1
    assert main(["verify", str(fp32_llama), "--text", str(tmp_path / "missing.txt")]) == 2
