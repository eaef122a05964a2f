"""Selective adapters in separate mode: the norm weights and biases they tune become graph
inputs defaulting to the base's values, so one base graph switches them per request."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from ort_prefill import prefill
from ort_prefill import session as ort_session
from runtime_fixtures import bos_ids, torch_greedy

from edgepeft.adapters.importance import choose_mask
from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, SelectiveConfig
from edgepeft.export import api
from edgepeft.export.channel_scales import ChannelScales, layer_groups
from edgepeft.export.fused import export_fused
from edgepeft.tiny import TINY_VOCAB, tiny_model

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NORMS = (r"norm\.weight$",)
PROMPTS = ["the quick brown fox", "SELECT name FROM users WHERE"]


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY_VOCAB, (2, 12)).astype(np.int64)


def _calibration(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (2, 12), generator=g) for _ in range(n)]


def _relative(test: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(test - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize(
    ("arch", "patterns"),
    [("llama", NORMS), ("qwen2", (*NORMS, r"\.bias$")), ("gemma2", NORMS), ("qwen3", NORMS)],
)
def test_tuned_parameters_switch_on_one_graph_exactly(arch, patterns, tiny_dir, tmp_path):
    """fp32: the file's values give PyTorch's logits with the adapter, the unfed defaults the
    base's; norms (qk-norms, gemma's 1 + w) and qwen2's q/k/v biases alike."""
    model, _ = load_base(tiny_dir(arch), quant="none")
    torch.manual_seed(0)
    add_adapter(model, SelectiveConfig(patterns=patterns, init="random"), "s")
    folder = save_adapter(model, tmp_path / "s", "s")
    set_adapter(model, None)
    ids = _ids()
    with torch.no_grad():
        base_logits = model(torch.from_numpy(ids)).logits.numpy()
    set_adapter(model, "s")
    with torch.no_grad():
        tuned_logits = model(torch.from_numpy(ids)).logits.numpy()
    out = tmp_path / "out"
    result = api.export(
        tiny_dir(arch), out, {"s": folder}, weights="fp32", mode="separate", quant="none",
        quiet=True,
    )  # fmt: skip
    assert result.verify.passed, str(result.verify)
    entry = json.loads((out / "edgepeft.json").read_text())["adapters"][0]
    assert entry["kind"] == "selective"
    assert "model.norm" in entry["targets"]
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj" in entry["targets"]

    session = ort_session(out / "model.onnx")
    adapter = ort.LoraAdapter()
    adapter.Load(str(out / entry["file"]))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    with_adapter = prefill(session, ids, run_options=options)
    assert _relative(with_adapter, tuned_logits) <= 1e-5
    assert _relative(prefill(session, ids), base_logits) <= 1e-5
    assert _relative(tuned_logits, base_logits) > 1e-2  # the adapter changes something


def test_a_tuned_norm_keeps_its_channel_scales_explicit(tmp_path):
    """Folding s into a tuned γ would change the value the file sets: those groups get a
    Mul instead, and the graph stays exact with the tuned γ fed."""
    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    scales = {}
    for i in range(model.config.num_hidden_layers):
        for group in layer_groups(i):
            width = model.get_submodule(group.members[0]).in_features
            scales[group.key] = np.exp(rng.normal(0, 0.7, width)).astype(np.float32)
    given = ChannelScales(scales, {key: 0.5 for key in scales}, tokens=0)
    tuned = [f"model.layers.{i}.input_layernorm.weight" for i in range(2)]
    info = export_fused(model, tmp_path, "fp32", tuned_parameters=tuned, channel_scales=given)
    nodes = onnx.load(str(info.path), load_external_data=False).graph.node
    scale_muls = [n.name for n in nodes if n.name.endswith("/ScaleMul")]
    assert len(scale_muls) == 2, scale_muls  # the q|k|v group of each layer, no other

    values = {}
    with torch.no_grad():
        for name in tuned:
            gamma = model.get_submodule(name.removesuffix(".weight")).weight
            gamma.mul_(torch.from_numpy(np.exp(rng.normal(0, 0.3, gamma.shape)).astype(np.float32)))
            values[name] = gamma.numpy().copy()
        ids = _ids()
        reference = model(torch.from_numpy(ids)).logits.numpy()
    assert _relative(prefill(info.path, ids, values), reference) <= 1e-5


@pytest.mark.parametrize("weights", ["nf4", "int4"])
def test_an_importance_masked_adapter_switches_per_request(weights, tiny_dir, tmp_path):
    """Over an NF4 base: a masked selective adapter, a LoRA and the base alone on one Engine,
    in any order, each answering as PyTorch does (nf4, exact) or passing verify (int4)."""
    from edgepeft.runtime import Engine

    base = tiny_dir("llama")
    model, tokenizer = load_base(base, quant="nf4")
    torch.manual_seed(0)
    config = SelectiveConfig(patterns=NORMS, mask="importance", budget=0.3, init="random")
    add_adapter(model, config, "masked")
    choose_mask(model, "masked", _calibration())
    with torch.no_grad():  # a mask chosen over zeros starts at zero: give it trained values
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    folders = {"masked": save_adapter(model, tmp_path / "masked", "masked")}
    add_adapter(model, LoraConfig(r=4, init="random"), "lora")
    folders["lora"] = save_adapter(model, tmp_path / "lora", "lora")
    out = tmp_path / "out"
    result = api.export(
        base, out, folders, weights=weights, mode="separate", quant="nf4", quiet=True
    )
    assert result.verify.passed, str(result.verify)
    if weights != "nf4":
        return
    engine = Engine(out, threads=1)
    assert engine.adapters()["masked"].kind == "selective"
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    seen = {}
    for name in ("masked", None, "lora", "masked"):
        got = engine.generate(PROMPTS, adapter=name, max_new_tokens=8, return_result=True)
        set_adapter(model, name)
        assert [r.token_ids for r in got] == torch_greedy(model, rows, 8), name
        seen.setdefault(name, [r.token_ids for r in got])
    assert seen["masked"] != seen[None]


def test_an_adapter_added_later_uses_the_graphs_inputs(tiny_dir, tmp_path):
    """export_adapter: a second norm adapter loads onto the same graph; one tuning a
    parameter the graph does not take as an input is refused by name."""
    from edgepeft.export.separate import export_adapter

    base = tiny_dir("llama")
    model, _ = load_base(base, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, patterns in (("first", NORMS), ("later", NORMS), ("unseen", (r"input_layernorm",))):
        add_adapter(model, SelectiveConfig(patterns=patterns, init="random"), name)
        folders[name] = save_adapter(model, tmp_path / name, name)
    out = tmp_path / "out"
    api.export(base, out, {"first": folders["first"]}, weights="fp32", mode="separate",
               quant="none", quiet=True)  # fmt: skip
    entry = export_adapter(folders["later"], out, "later")
    assert entry.kind == "selective"
    from edgepeft.export.verify import verify

    assert verify(out, max_new_tokens=2).passed

    lora_only = tmp_path / "lora-only"
    add_adapter(model, LoraConfig(r=2, init="random"), "lora")
    api.export(base, lora_only, {"lora": save_adapter(model, tmp_path / "lora", "lora")},
               weights="fp32", mode="separate", quant="none", quiet=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"input_layernorm\.weight"):
        export_adapter(folders["unseen"], lora_only, "unseen")


@pytest.mark.parametrize(
    ("arch", "patterns", "match"),
    [
        ("llama", (r"embed_tokens\.weight$",), r"tunes model\.embed_tokens\.weight.*mode='merged'"),
        ("llama", (r"layers\.0\.self_attn\.q_proj\.weight$",), r"q_proj\.weight.*mode='merged'"),
        ("gpt2", (r"ln_f\.weight$",), r"only the fused graph.*mode='merged'"),
    ],
)
def test_what_cannot_switch_is_refused_by_name(arch, patterns, match, tiny_dir, tmp_path):
    base = tiny_dir(arch)
    model, _ = load_base(base, quant="none")
    add_adapter(model, SelectiveConfig(patterns=patterns, init="random"), "x")
    folder = save_adapter(model, tmp_path / "x", "x")
    with pytest.raises(ValueError, match=match):
        api.export(base, tmp_path / "out", {"x": folder}, weights="fp32", mode="separate",
                   quant="none", quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists()
