"""onnxruntime-genai runs edgepeft's exports: genai_config.json, greedy tokens, `.onnx_adapter`s.

    export (fp32) ─► write_genai_config ─► og.Model ─ og.Generator greedy ─► tokens
                                                     == PyTorch generate (the same model)
                                                     == a plain onnxruntime greedy loop
    separate mode: og.Adapters.load(<name>.onnx_adapter) + set_active_adapter
                   == onnxruntime with RunOptions.add_active_adapter(LoraAdapter)

Greedy on both sides never stops early: og's min_length and PyTorch's min_new_tokens mask
the EOS token until the last step, and the onnxruntime loop masks it the same way.
Also here: a `--quick` run of scripts/bench_export.py into a temporary file.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.peft_format import load_adapter, save_adapter
from edgepeft.base import load_base
from edgepeft.config import IA3Config, LoraConfig
from edgepeft.export.api import export
from edgepeft.export.genai import GENAI_CONFIG_FILE, genai_config, write_genai_config
from edgepeft.export.graph_info import input_names
from edgepeft.export.manifest import MANIFEST_FILE, read_manifest
from edgepeft.tiny import TINY_CONFIGS

og = pytest.importorskip("onnxruntime_genai")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 42, 99, 123, 7, 250, 31]
NEW_TOKENS = 12
EOS = 2  # the tiny tokenizer's </s>
SEPARATE = importlib.util.find_spec("edgepeft.export.separate") is not None


# ---------------------------------------------------------------- the three greedy loops


def og_greedy(folder: Path, adapter: Path | None = None) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = len(PROMPT) + NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), adapter.stem)
        generator.set_active_adapter(adapters, adapter.stem)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(PROMPT) :]]


def ort_greedy(folder: Path, adapter: Path | None = None) -> list[int]:
    """Plain onnxruntime: session.run per token, the adapter through RunOptions."""
    manifest = read_manifest(folder)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / manifest.model_file), options)
    run_options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        run_options.add_active_adapter(lora)
    names = input_names(manifest.num_layers)
    shape = (1, manifest.num_kv_heads, 0, manifest.head_dim)
    past = [np.zeros(shape, np.float32) for _ in range(2 * manifest.num_layers)]
    ids, tokens = np.array([PROMPT], np.int64), []
    for step in range(NEW_TOKENS):
        mask = np.ones((1, len(PROMPT) + step), np.int64)
        logits, *past = session.run(None, dict(zip(names, [ids, mask, *past], strict=True)), run_options)
        last = logits[0, -1].copy()
        if step < NEW_TOKENS - 1:
            last[EOS] = -np.inf  # as og's min_length does
        tokens.append(int(last.argmax()))
        ids = np.array([[tokens[-1]]], np.int64)
    return tokens


def torch_greedy(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(PROMPT) :].tolist()


def random_adapter(folder: Path, out: Path, config, seed: int) -> Path:
    """An adapter folder whose every parameter is random (its effect is large)."""
    model, _ = load_base(folder, quant="none")
    torch.manual_seed(seed)
    add_adapter(model, config, out.name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, out.name):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, out, out.name)


def with_adapter(folder: Path, adapter: Path | None):
    model, _ = load_base(folder, quant="none")
    if adapter is not None:
        load_adapter(model, adapter, name=adapter.name)
    return model.eval()


# ---------------------------------------------------------------- genai_config.json


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_genai_config_describes_the_graph(tiny_dir, tmp_path, arch):
    out = tmp_path / "out"
    export(tiny_dir(arch), out, weights="fp32", verify=False, quiet=True)
    (written,) = write_genai_config(out, intra_op_threads=2)
    assert written == out / GENAI_CONFIG_FILE
    config = json.loads(written.read_text())
    tiny = TINY_CONFIGS[arch]
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == arch
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (4, 2)
    assert decoder["hidden_size"] == tiny["hidden_size"]
    assert decoder["head_size"] == tiny.get("head_dim", tiny["hidden_size"] // 4)
    assert decoder["num_hidden_layers"] == tiny["num_hidden_layers"]
    assert decoder["session_options"]["intra_op_num_threads"] == 2
    assert (decoder["filename"], config["model"]["vocab_size"]) == ("model.onnx", tiny["vocab_size"])
    assert (config["model"]["eos_token_id"], config["model"]["bos_token_id"]) == (2, 1)
    assert config["search"]["do_sample"] is False
    assert config == genai_config(out, intra_op_threads=2)


def test_genai_config_needs_an_export_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        write_genai_config(tmp_path)


# ---------------------------------------------------------------- greedy tokens


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])  # gpt2: the generic graph
def test_base_export_runs_in_genai(tiny_dir, tmp_path, arch):
    out = tmp_path / "out"
    export(tiny_dir(arch), out, weights="fp32", verify=False, quiet=True)  # writes genai_config
    reference = torch_greedy(with_adapter(tiny_dir(arch), None))
    assert og_greedy(out) == reference
    assert ort_greedy(out) == reference


def test_merged_lora_export_runs_in_genai(tiny_dir, tmp_path):
    folder = tiny_dir("qwen2")
    adapter = random_adapter(folder, tmp_path / "sql", LoraConfig(r=8, init="random", target_modules="all-linear"), 1)
    out = tmp_path / "out"
    export(folder, out, adapters=[adapter], weights="fp32", verify=False, quiet=True)
    assert (out / "sql" / GENAI_CONFIG_FILE).is_file()  # one per graph folder of the merged set
    reference = torch_greedy(with_adapter(folder, adapter))
    assert reference != torch_greedy(with_adapter(folder, None))  # the adapter matters
    assert og_greedy(out / "sql") == reference


@pytest.mark.skipif(not SEPARATE, reason="separate mode missing: edgepeft/export/separate.py not in this tree")
def test_separate_adapters_switch_in_genai(tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    adapters = [
        random_adapter(folder, tmp_path / "sql", LoraConfig(r=8, alpha=16, init="random", target_modules="all-linear"), 1),
        random_adapter(folder, tmp_path / "chat", IA3Config(init="random"), 2),
    ]
    out = tmp_path / "out"
    export(folder, out, adapters=adapters, weights="fp32", mode="separate", verify=False, quiet=True)
    base = torch_greedy(with_adapter(folder, None))
    assert og_greedy(out) == base  # no adapter active: the base graph alone
    for adapter in adapters:
        files = sorted(out.rglob(f"{adapter.name}.onnx_adapter"))
        assert len(files) == 1, f"expected one {adapter.name}.onnx_adapter in {out}"
        reference = torch_greedy(with_adapter(folder, adapter))
        assert reference != base
        assert og_greedy(out, files[0]) == ort_greedy(out, files[0]) == reference


def test_cli_export_opens_in_genai_as_it_is(tiny_dir, tmp_path):
    """`edgepeft export` output, untouched: og.Model opens it, greedy tokens == the Engine's."""
    from edgepeft.cli import main
    from edgepeft.runtime import Engine

    out = tmp_path / "out"
    assert main(["export", "--base", str(tiny_dir("llama")), "--out", str(out), "--no-verify"]) == 0
    assert not (out / "manifest.json").exists()  # genai would take it for an ORT model package
    engine = Engine(out, verify_files=True)  # genai_config.json is recorded with the rest
    result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, return_result=True)
    tokens = og_greedy(out)
    # the Engine stops at eos; og's min_length forbids it until the last step
    assert tokens[: len(result.token_ids)] == result.token_ids
    assert result.finish_reason == "eos" or len(result.token_ids) == NEW_TOKENS


# ---------------------------------------------------------------- the benchmark script


def _table(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] != "contender":
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_export_quick_writes_its_own_file(tmp_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_text() if benchmarks.exists() else None
    md, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_export.py"), "--quick", "--output", str(md), "--json", str(raw)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (benchmarks.read_text() if benchmarks.exists() else None) == before
    text, data = md.read_text(), json.loads(raw.read_text())
    table = _table(text)
    (shape,) = data["shapes"]
    rows = shape["rows"]
    must_run = ["edgepeft fused int4, no adapter", "edgepeft merged int4 (LoRA folded in)",
                "edgepeft generic int4 (torch.onnx)", "PyTorch eager fp32"]
    on, off = "edgepeft separate int4, LoRA r=16 active (switchable)", "edgepeft separate int4, no adapter active"
    if SEPARATE:
        must_run += [on, off]
        differ = sum(a != b for a, b in zip(rows[on]["result"]["tokens"], rows[off]["result"]["tokens"], strict=True))
        assert differ > 0, "the active LoRA changed no greedy token: is it fed to the graph?"
    else:
        assert table[on][0] == "not available: separate mode missing (edgepeft/export/separate.py)"
    for name in must_run:
        assert rows[name]["result"] is not None, f"{name}: {rows[name]['missing']}"
        assert rows[name]["result"]["decode_tok_s"] > 0
        assert len(rows[name]["result"]["tokens"]) == shape["new_tokens"]
    builder = rows["builder int4"]["result"]
    for name, row in rows.items():  # every row is in the table, its ratio from the JSON numbers
        assert name in table
        if row["result"] is None:
            assert re.match(r"(not available|failed): ", table[name][0])
        elif builder is not None:
            assert table[name][1] == f"{row['result']['decode_tok_s'] / builder['decode_tok_s']:.2f}x"
    assert "peak_rss_mb" in data["memory"] and "| export peak RSS |" in text
