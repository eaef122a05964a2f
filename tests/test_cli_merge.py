"""`edgepeft merge`: adapter folder + base ──► HF model folder that transformers reloads.

    save_adapter(init="random", over NF4) ──main(["merge", ...])──► out/
        AutoModelForCausalLM.from_pretrained(out) logits vs the adapted model:
            --quant none   <= 1e-4 (fp32 W_deq + ΔW; same sums in another order)
            --quant nf4    the bitsandbytes layers reload bit-exactly (= Python merge)
        failures: exit code 2, one line on stderr, no output folder, no staging left
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import edgepeft
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import WEIGHTS_FILE, save_adapter
from edgepeft.base import dequantized_weight, is_linear_like, is_quantized
from edgepeft.cli import main
from edgepeft.config import BottleneckConfig, LoraConfig
from edgepeft.merge import merge

FULL_PRECISION_TOL = 1e-4
"""The merged fp32 weight is dequant(W) + ΔW exactly; the adapted model computes
dequant(W) x + s B (A x), the same products summed in another order (~1e-6 on these
logits). One NF4 rounding step moves them by ~1e-1, so 1e-4 still catches any wrong weight."""


def adapted(tiny_dir, arch: str, quant: str, config=None):
    model, _ = edgepeft.load_base(tiny_dir(arch), quant=quant)
    torch.manual_seed(0)
    add_adapter(model, config or LoraConfig(init="random"), "sql")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model, "sql"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def run_merge(tiny_dir, arch, adapter, out, *extra) -> int:
    return main(["merge", "--base", str(tiny_dir(arch)), "--adapter", str(adapter), "--out", str(out), *extra])


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "inspect" in text and "merge" in text


def test_full_precision_output_reloads_with_the_adapted_logits(tiny_dir, input_ids, tmp_path):
    model = adapted(tiny_dir, "llama", "nf4")
    save_adapter(model, tmp_path / "adapter")

    assert run_merge(tiny_dir, "llama", tmp_path / "adapter", tmp_path / "out") == 0

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not any(is_quantized(m) for m in loaded.modules())
    assert (logits(loaded, input_ids) - logits(model, input_ids)).abs().max() <= FULL_PRECISION_TOL
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["adapter"] == "sql" and report["quant"] == "none"
    assert report["base_quant"] == "nf4"  # read from the adapter's metadata
    assert report["max_rel_weight_error"] < 1e-6 and len(report["layers"]) == 4
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_output_reloads_bit_exactly(tiny_dir, input_ids, tmp_path, quant):
    model = adapted(tiny_dir, "llama", "nf4")
    save_adapter(model, tmp_path / "adapter")
    expected, _ = merge(model, "sql", quant=quant)

    assert run_merge(tiny_dir, "llama", tmp_path / "adapter", tmp_path / "out", "--quant", quant) == 0

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ours = dict(expected.named_modules())
    linear = [(n, m) for n, m in loaded.named_modules() if is_linear_like(m)]
    assert sum(is_quantized(m) for _, m in linear) == len(linear) - 1  # all but lm_head
    for name, module in linear:
        assert type(module) is type(ours[name]), name
        assert torch.equal(dequantized_weight(module), dequantized_weight(ours[name])), name
        if isinstance(module, bnb.nn.Linear4bit):
            # Files are compared above; keep bnb's CPU kernel choice (bf16 repack on
            # AVX512-BF16 CPUs) out of the logits, as edgepeft's own layers do.
            module.support_avx512bf16_for_cpu = False
    assert (logits(loaded, input_ids) - logits(expected, input_ids)).abs().max() <= 1e-5


def test_gpt2_conv1d_and_trained_tied_head(tiny_dir, input_ids, tmp_path):
    model = adapted(tiny_dir, "gpt2", "nf4", LoraConfig(init="random", modules_to_save=("lm_head",)))
    save_adapter(model, tmp_path / "adapter")

    assert run_merge(tiny_dir, "gpt2", tmp_path / "adapter", tmp_path / "out") == 0

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert isinstance(loaded.transformer.h[0].attn.c_attn, Conv1D)
    # The trained head no longer equals the embeddings: the config must not tie them.
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
    assert (logits(loaded, input_ids) - logits(model, input_ids)).abs().max() <= FULL_PRECISION_TOL


def test_peft_folder_without_metadata_defaults_to_an_unquantized_base(
    tiny_dir, input_ids, tmp_path, capsys
):
    model = adapted(tiny_dir, "qwen2", "none")
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS_FILE
    save_file(load_file(weights), weights)  # as HF peft writes it: no edgepeft metadata

    assert run_merge(tiny_dir, "qwen2", tmp_path / "adapter", tmp_path / "out") == 0

    assert "--base-quant" in capsys.readouterr().err
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (logits(loaded, input_ids) - logits(model, input_ids)).abs().max() <= FULL_PRECISION_TOL
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["base_quant"] == "none"


# ---------------------------------------------------------------- failures


def assert_failed_cleanly(code, capsys, tmp_path, words: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgepeft merge: error:")]
    assert code == 2
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_adapter_folder(tiny_dir, tmp_path, capsys):
    code = run_merge(tiny_dir, "llama", tmp_path / "nowhere", tmp_path / "out")
    assert_failed_cleanly(code, capsys, tmp_path, "does not exist")


def test_adapter_for_another_base(tiny_dir, tmp_path, capsys):
    save_adapter(adapted(tiny_dir, "llama", "nf4"), tmp_path / "adapter")
    code = run_merge(tiny_dir, "qwen2", tmp_path / "adapter", tmp_path / "out")
    assert_failed_cleanly(code, capsys, tmp_path, "fingerprint")


def test_unmergeable_method(tiny_dir, tmp_path, capsys):
    save_adapter(adapted(tiny_dir, "llama", "nf4", BottleneckConfig(init="random")), tmp_path / "adapter")
    code = run_merge(tiny_dir, "llama", tmp_path / "adapter", tmp_path / "out")
    assert_failed_cleanly(code, capsys, tmp_path, "cannot be merged")


def test_existing_output_is_kept_without_overwrite(tiny_dir, tmp_path, capsys):
    save_adapter(adapted(tiny_dir, "llama", "nf4"), tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    code = run_merge(tiny_dir, "llama", tmp_path / "adapter", tmp_path / "out")

    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
