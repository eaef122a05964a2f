"""Parallel bottleneck adapter: math against a hand-written decoder layer, placement, nf4
gradients, merge refusal, save/load, separate export against PyTorch, per-request switching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgepeft.adapters.inject import (
    adapter_parameters,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    set_adapter,
)
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.parallel import ParallelLayer
from edgepeft.adapters.peft_format import CONFIG_FILE, load_adapter, save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, ParallelAdapterConfig
from edgepeft.fold import MergeError
from edgepeft.merge import merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HIDDEN, LAYERS = 64, 2  # the tiny models' sizes


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def parallels(model, name="default"):
    return {p: m for p, m in adapter_modules(model) if isinstance(m, ParallelLayer) and name in m}


@torch.no_grad()
def reference_logits(model, ids, name):
    """The llama forward written out by hand, with h + mlp(norm(h)) + s·up(relu(down(h)))."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    cos_sin = inner.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for layer in inner.layers:
        attn, _ = layer.self_attn(
            layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask
        )
        h = hidden + attn  # the FFN sub-block's input, before its norm
        mlp, branch = layer.mlp, layer.mlp.down_proj  # the wrapper holds the adapter
        x = layer.post_attention_layernorm(h)
        y = branch.base_layer(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        down, up = branch.adapter_down[name], branch.adapter_up[name]
        side = branch.scaling[name] * up(torch.relu(down(h)))
        hidden = h + y + side
    return model.lm_head(inner.norm(hidden))


def test_forward_matches_hand_written_reference_and_starts_as_identity(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    model.config._attn_implementation = "eager"
    base = logits(model, input_ids)
    add_adapter(model, ParallelAdapterConfig(), "zero")
    assert torch.equal(logits(model, input_ids), base)  # zero up: the identity

    torch.manual_seed(0)
    add_adapter(model, ParallelAdapterConfig(init="random"), "par")
    got = logits(model, input_ids)
    expected = reference_logits(model, input_ids, "par")
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"parallel vs hand-written: relative error {rel:.2e}")
    assert rel <= 1e-6
    assert (got - base).abs().max() > 1e-3  # the branch is really there
    with disable_adapters(model):
        assert torch.equal(logits(model, input_ids), base)


def test_placement_width_and_parameter_count(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(model, ParallelAdapterConfig())
    assert sorted(parallels(model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    layer = parallels(model)["model.layers.0.mlp.down_proj"]
    assert layer.adapter_down["default"].weight.shape == (HIDDEN // 2, HIDDEN)
    assert layer.scaling["default"] == 4.0
    d, w = HIDDEN, HIDDEN // 2
    assert count_parameters(model) == LAYERS * (d * w + w + w * d + d)
    with pytest.raises(ValueError, match="reduction_factor"):
        add_adapter(model, ParallelAdapterConfig(reduction_factor=1000), "narrow")
    with pytest.raises(ValueError, match="activation"):
        add_adapter(model, ParallelAdapterConfig(activation="swish"), "bad")


def test_delete_unwraps_and_removes_the_norm_hook(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    base = logits(model, input_ids)
    add_adapter(model, ParallelAdapterConfig(init="random"), "a")
    delete_adapter(model, "a")
    assert not parallels(model, "a")
    norm = model.model.layers[0].post_attention_layernorm
    assert not norm._forward_pre_hooks
    assert torch.equal(logits(model, input_ids), base)


def test_gradients_over_nf4_reach_only_the_active_adapter(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, ParallelAdapterConfig(init="random"), "other")
    add_adapter(model, ParallelAdapterConfig(init="random"), "trained")
    model(input_ids, labels=input_ids).loss.backward()
    trained = {id(p) for p in adapter_parameters(model, "trained")}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_merge_refuses_with_the_reason(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(model, ParallelAdapterConfig(init="random"), "par")
    with pytest.raises(MergeError, match="PARALLEL_ADAPTER.*not a change of the base weights"):
        merge(model, "par")


def test_save_load_round_trip(tiny_dir, input_ids, tmp_path):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, ParallelAdapterConfig(scaling=2.5, activation="gelu", init="random"), "a")
    want = logits(model, input_ids)
    save_adapter(model, tmp_path / "a", "a")
    document = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert document["peft_type"] == "PARALLEL_ADAPTER" and document["scaling"] == 2.5

    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    load_adapter(fresh, tmp_path / "a", name="a")
    assert torch.equal(logits(fresh, input_ids), want)


# ---------------------------------------------------------------- separate export, runtime

ort = pytest.importorskip("onnxruntime")
PROMPTS = ["the quick brown fox", "SELECT name FROM users WHERE"]


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """fp32 separate export of a parallel adapter and a LoRA; the fp32 model holding both."""
    from edgepeft.export import api

    root = tmp_path_factory.mktemp("parallel-separate")
    base = tiny_dir("llama")
    model, tokenizer = load_base(base, quant="none")
    torch.manual_seed(0)
    configs = {
        "par": ParallelAdapterConfig(activation="gelu", init="random"),
        "lora": LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear"),
    }
    folders = {}
    for name, config in configs.items():
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / "src" / name, name)
    set_adapter(model, None)
    out = root / "out"
    api.export(
        base, out, adapters=folders, weights="fp32", mode="separate", quant="none", quiet=True
    )
    return model, tokenizer, out


def _ort_prefill(out, ids, adapter_file=None):
    from edgepeft.export.adapter_files import load_adapter_file
    from edgepeft.export.graph_info import input_names

    manifest = json.loads((out / "edgepeft.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(out / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    run = ort.RunOptions()
    if adapter_file is not None:
        adapter = load_adapter_file(adapter_file, out)
        run.add_active_adapter(adapter)
    empty = np.zeros((len(ids), manifest["num_kv_heads"], 0, manifest["head_dim"]), np.float32)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed.update({n: empty for n in input_names(manifest["num_layers"])[2:]})
    return session.run(["logits"], feed, run)[0]


def test_fp32_separate_export_matches_pytorch(exported, input_ids):
    model, _, out = exported
    manifest = json.loads((out / "edgepeft.json").read_text())
    entry = next(a for a in manifest["adapters"] if a["name"] == "par")
    assert entry["kind"] == "parallel" and entry["targets"] == [
        f"model.layers.{i}.mlp" for i in range(LAYERS)
    ]
    ids = input_ids.numpy()
    for name in (None, "par"):
        set_adapter(model, name)
        want = logits(model, input_ids).numpy()
        got = _ort_prefill(out, ids, out / entry["file"] if name else None)
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        print(f"{name}: ORT fp32 vs PyTorch, relative error {rel:.2e}")
        assert rel <= 1e-5
    set_adapter(model, None)


def test_engine_switches_it_per_request_next_to_a_lora(exported):
    from edgepeft.runtime import Engine
    from tests.runtime_fixtures import bos_ids, torch_greedy

    model, tokenizer, out = exported
    engine = Engine(out, threads=1)
    assert engine.adapters()["par"].kind == "parallel"
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    outputs = {}
    for name in ("par", None, "lora", "par"):
        got = engine.generate(PROMPTS, adapter=name, max_new_tokens=8, return_result=True)
        set_adapter(model, name)
        assert [r.token_ids for r in got] == torch_greedy(model, rows, 8), name
        outputs.setdefault(name, [r.token_ids for r in got])
    set_adapter(model, None)
    assert outputs["par"] != outputs[None] and outputs["par"] != outputs["lora"]


def test_generic_graph_refuses_parallel_adapters(tiny_dir, tmp_path):
    from edgepeft.export import api

    model, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(model, ParallelAdapterConfig(init="random"), "par")
    folder = save_adapter(model, tmp_path / "par", "par")
    with pytest.raises(ValueError, match="only the fused graph exposes"):
        api.export(
            tiny_dir("llama"),
            tmp_path / "out",
            adapters={"par": folder},
            weights="fp32",
            mode="separate",
            quant="none",
            graph="generic",
            quiet=True,
        )
