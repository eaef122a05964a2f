"""MAM adapter: prefix + parallel adapter as one adapter; math against its two parts, nf4
gradients, save/load, merge refusal, separate export (two files, one adapter) on the Engine,
and `edgepeft train`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edgepeft.adapters.inject import adapter_parameters, add_adapter, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.parallel import ParallelLayer
from edgepeft.adapters.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgepeft.adapters.prompt import VirtualTokens
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, MAMConfig
from edgepeft.fold import MergeError
from edgepeft.merge import merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = MAMConfig(num_virtual_tokens=4, prefix_bottleneck=16, init="random")


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_defaults_are_adapterhubs():
    config = MAMConfig()
    assert (config.num_virtual_tokens, config.prefix_bottleneck) == (30, 800)
    assert (config.reduction_factor, config.scaling, config.activation) == (2, 4.0, "relu")


def test_forward_is_the_prefix_cache_plus_the_parallel_branch(tiny_dir, input_ids):
    from transformers import DynamicCache

    model, _ = load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, SMALL, "mam")
    got = logits(model, input_ids)
    config = model.edgepeft_adapters["mam"]
    assert config.token_dim == 32 and config.num_layers == 2  # kv heads x head size

    # The reference: the parallel modules alone, with the prefix handed in as a cache.
    prompts = next(m for _, m in adapter_modules(model) if isinstance(m, VirtualTokens))
    n, heads = config.num_virtual_tokens, config.num_attention_heads
    with torch.no_grad():
        kv = prompts.flat("mam").view(n, 2, 2, heads, config.token_dim // heads)
        cache = DynamicCache(config=model.config)
        for layer in range(2):  # peft's layout: (layer, key|value, head, dim)
            keys = kv[:, layer, 0].permute(1, 0, 2)[None].expand(2, -1, -1, -1)
            values = kv[:, layer, 1].permute(1, 0, 2)[None].expand(2, -1, -1, -1)
            cache.update(keys, values, layer)
    prompts.active = None
    mask = torch.ones(2, n + input_ids.shape[1], dtype=torch.long)
    positions = torch.arange(n, n + input_ids.shape[1])[None].expand(2, -1)
    want = logits(model, input_ids, cache=cache, attention_mask=mask, position_ids=positions)
    prompts.active = "mam"
    rel = ((got - want).norm() / want.norm()).item()
    print(f"MAM vs prefix cache + parallel branch: relative error {rel:.2e}")
    assert rel <= 1e-6
    for _, module in adapter_modules(model):  # the parallel part really is in the path
        if isinstance(module, ParallelLayer):
            module.active = None
    assert (logits(model, input_ids) - got).abs().max() > 1e-3


def test_gradients_over_nf4_reach_both_parts_only(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random"), "other")
    add_adapter(model, SMALL, "mam")
    model(input_ids, labels=input_ids).loss.backward()
    trained = {id(p) for p in adapter_parameters(model, "mam")}
    holders = {type(m) for _, m in adapter_modules(model) if "mam" in m}
    assert holders == {VirtualTokens, ParallelLayer}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_merge_refuses(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    add_adapter(model, SMALL, "mam")
    with pytest.raises(MergeError, match="cannot be merged"):
        merge(model, "mam")


def test_save_load_round_trip_holds_both_tensor_sets(tiny_dir, input_ids, tmp_path):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, SMALL, "mam")
    want = logits(model, input_ids)
    save_adapter(model, tmp_path / "mam", "mam")
    with safe_open(str(tmp_path / "mam" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "prompt_embeddings" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.adapter_up.weight" in keys
    document = json.loads((tmp_path / "mam" / "adapter_config.json").read_text())
    assert document["peft_type"] == "MAM" and document["prefix_bottleneck"] == 16

    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    load_adapter(fresh, tmp_path / "mam", name="mam")
    assert torch.allclose(logits(fresh, input_ids), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- separate export, runtime

PROMPTS = ["the quick brown fox", "SELECT name FROM users WHERE"]


def test_separate_export_writes_two_files_the_engine_loads_as_one(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgepeft.export import api
    from edgepeft.runtime import Engine
    from tests.runtime_fixtures import bos_ids, torch_greedy

    base = tiny_dir("llama")
    model, tokenizer = load_base(base, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, config in (("mam", SMALL), ("lora", LoraConfig(r=4, init="random"))):
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, tmp_path / "src" / name, name)
    out = tmp_path / "out"
    api.export(
        base, out, adapters=folders, weights="fp32", mode="separate", quant="none", quiet=True
    )

    manifest = json.loads((out / "edgepeft.json").read_text())
    entry = next(a for a in manifest["adapters"] if a["name"] == "mam")
    assert entry["kind"] == "mam" and entry["num_virtual_tokens"] == 4
    assert entry["file"] == "adapters/mam.onnx_adapter"
    assert entry["prefix_file"] == "adapters/mam.kvprefix.safetensors"
    assert (out / entry["prefix_file"]).is_file()

    engine = Engine(out, threads=1)
    info = engine.adapters()["mam"]
    assert info.kind == "mam" and info.num_virtual_tokens == 4 and info.method == "prefix"
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    seen = {}
    for name in ("mam", None, "lora", "mam"):
        got = engine.generate(PROMPTS, adapter=name, max_new_tokens=8, return_result=True)
        set_adapter(model, name)
        assert [r.token_ids for r in got] == torch_greedy(model, rows, 8), name
        seen.setdefault(name, [r.token_ids for r in got])
    assert seen["mam"] != seen[None] and seen["mam"] != seen["lora"]

    # Loading the .onnx_adapter by path brings its prefix part; without it, a named error.
    again = Engine(out, threads=1, load_adapters=False)
    assert again.load_adapter(out / entry["file"], "m2").num_virtual_tokens == 4
    (out / entry["prefix_file"]).unlink()
    with pytest.raises(ValueError, match="mam.kvprefix.safetensors, which is missing"):
        again.load_adapter(out / entry["file"], "m3")


@pytest.mark.parametrize("weights", ["fp32", "nf4"])
def test_verify_runs_both_parts_and_passes(weights, tiny_dir, tmp_path):
    """verify seeds MAM's prefix *and* activates its parallel part: either alone fails."""
    pytest.importorskip("onnxruntime")
    from edgepeft.export import api
    from edgepeft.export.verify import verify

    base = tiny_dir("llama")
    quant = "nf4" if weights == "nf4" else "none"
    model, _ = load_base(base, quant=quant)
    torch.manual_seed(0)
    add_adapter(model, SMALL, "mam")
    folder = save_adapter(model, tmp_path / "mam", "mam")
    out = tmp_path / "out"
    api.export(
        base, out, adapters={"mam": folder}, weights=weights, mode="separate", quant=quant,
        verify=False, quiet=True,
    )  # fmt: skip
    report = verify(out, max_new_tokens=4)
    check = next(g for g in report.graphs if g.name == "mam")
    assert report.passed, report.to_dict()
    assert check.top1_agree == check.top1_total
    assert check.adapter_file.endswith("mam.onnx_adapter")


# ---------------------------------------------------------------- edgepeft train


@pytest.mark.parametrize("kind", ["parallel", "mam"])
def test_edgepeft_train_lowers_the_loss(kind, tiny_dir, tmp_path, capsys):
    from edgepeft.cli import main
    from edgepeft.tasks import make_splits

    train, val, _ = make_splits("reverse", (24, 4, 4), seed=0)
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = "num_virtual_tokens = 4\nprefix_bottleneck = 16\n" if kind == "mam" else ""
    (tmp_path / "run.toml").write_text(
        f'model = "{tiny_dir("llama")}"\nquant = "nf4"\nadapter = "a"\noutput_dir = "out"\n'
        f'[method]\ntype = "{kind}"\n{extra}'
        '[data]\ntrain = "train.jsonl"\nval = "val.jsonl"\n'
        "[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_seq_len = 32\n"
        "eval_every = 6\nsave_every = 6\n"
    )
    assert main(["train", str(tmp_path / "run.toml"), "--quiet"]) == 0, capsys.readouterr().err
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.2
    saved = json.loads((tmp_path / "out" / "last" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"parallel": "PARALLEL_ADAPTER", "mam": "MAM"}[kind]
