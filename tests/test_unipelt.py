"""UniPELT: per-token gates against hand-written formulas and, opened fully, against edgepeft's
plain LoRA, bottleneck and prefix; causality and cached decoding; nf4 gradients; save/load;
merge refusal; separate export (fp32 and nf4) against PyTorch across decode steps, verify, the
Engine per request; the identity default of the gate subgraph; `edgepeft train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from edgepeft.adapters.bottleneck import BottleneckLayer
from edgepeft.adapters.inject import adapter_parameters, add_adapter, count_parameters, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.lora import LoraLayer
from edgepeft.adapters.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgepeft.adapters.prompt import VirtualTokens
from edgepeft.adapters.unipelt import GatedBottleneckLayer, GatedLoraLayer, PrefixGate
from edgepeft.base import load_base
from edgepeft.config import (
    BottleneckConfig,
    LoraConfig,
    PrefixTuningConfig,
    UniPELTConfig,
)
from edgepeft.fold import MergeError
from edgepeft.merge import merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = UniPELTConfig(num_virtual_tokens=4, prefix_bottleneck=16)
LAYERS = 2  # the tiny models' sizes


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def rel(got, want) -> float:
    return float((got - want).norm() / want.norm())


def perturb(model, name: str, seed: int = 0) -> None:
    """Move every tensor of adapter `name` off its start: non-zero branches, and gates that
    differ from token to token (σ of roughly ±2 rather than AdapterHub's ~σ(0))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


def adapted(tiny_dir, quant="none", config=SMALL, name="u"):
    model, tokenizer = load_base(tiny_dir("llama"), quant=quant)
    torch.manual_seed(0)
    add_adapter(model, config, name)
    perturb(model, name)
    return model, tokenizer


def test_defaults_are_adapterhubs_and_placed_per_part(tiny_dir):
    from edgepeft.inspect_model import adapter_cost

    config = UniPELTConfig()
    assert (config.r, config.lora_alpha, config.num_virtual_tokens) == (8, 8, 10)
    assert (config.prefix_bottleneck, config.reduction_factor, config.activation) == (
        512,
        16,
        "relu",
    )
    model, _ = load_base(tiny_dir("llama"), quant="none")
    want = adapter_cost(model, config)
    add_adapter(model, config, "u")
    assert count_parameters(model, "u") == want
    assert model.edgepeft_adapters["u"].lora_targets == ("q_proj", "v_proj")
    holders = {path: type(m) for path, m in adapter_modules(model) if "u" in m}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        assert (
            holders[f"{p}.self_attn.q_proj"] is holders[f"{p}.self_attn.v_proj"] is GatedLoraLayer
        )
        assert holders[f"{p}.self_attn.prefix_gate"] is PrefixGate
        assert holders[f"{p}.mlp.down_proj"] is GatedBottleneckLayer
    assert VirtualTokens in holders.values() and len(holders) == 4 * LAYERS + 1
    layer = model.model.layers[0]  # AdapterHub's start: small gate weights, identity branches
    assert float(layer.self_attn.prefix_gate.gate["u"].weight.detach().std()) < 0.04
    assert not layer.mlp.down_proj.adapter_gate["u"].bias.any()
    assert not layer.self_attn.q_proj.lora_B["u"].weight.any()
    assert not layer.mlp.down_proj.adapter_up["u"].weight.any()


def test_gated_lora_and_bottleneck_are_the_per_token_formulas(tiny_dir):
    model, _ = adapted(tiny_dir)
    layer = model.model.layers[1]
    generator = torch.Generator().manual_seed(1)
    q, down = layer.self_attn.q_proj, layer.mlp.down_proj
    x = torch.randn(2, 5, q.base_layer.in_features, generator=generator)
    u = torch.randn(2, 5, down.base_layer.in_features, generator=generator)
    with torch.no_grad():
        A, B, gate = q.lora_A["u"].weight, q.lora_B["u"].weight, q.lora_gate["u"]
        g = torch.sigmoid(x @ gate.weight.T + gate.bias)  # (B, T, 1): one gate per token
        want = x @ q.base_layer.weight.T + g * (8 / 8) * (x @ A.T @ B.T)
        assert rel(q(x), want) <= 1e-6 and float(g.std()) > 0.1
        y = u @ down.base_layer.weight.T
        D, U, gate = down.adapter_down["u"], down.adapter_up["u"], down.adapter_gate["u"]
        g = torch.sigmoid(y @ gate.weight.T + gate.bias)
        want = y + g * (torch.relu(y @ D.weight.T + D.bias) @ U.weight.T + U.bias)
        assert rel(down(u), want) <= 1e-6 and float(g.std()) > 0.01


def test_prefix_gate_scales_each_querys_prefix_weights(tiny_dir):
    """One attention layer written out: the prefix columns' exp(score) times σ(h_t · w + b)."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = adapted(tiny_dir)
    config = model.edgepeft_adapters["u"]
    attn = model.model.layers[0].self_attn
    n, heads, kv_heads, d = 4, 4, config.num_attention_heads, config.token_dim // 2
    prompts = next(m for _, m in adapter_modules(model) if isinstance(m, VirtualTokens))
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kv = prompts.flat("u").view(n, LAYERS, 2, kv_heads, d)
        prefix_k = kv[:, 0, 0].permute(1, 0, 2)[None].expand(2, -1, -1, -1)  # (B, n_kv, N, D)
        prefix_v = kv[:, 0, 1].permute(1, 0, 2)[None].expand(2, -1, -1, -1)
        cache = DynamicCache(config=model.config)
        cache.update(prefix_k, prefix_v, 0)
        cos, sin = model.model.rotary_emb(h, torch.arange(n, n + 5)[None])
        got, _ = attn(
            hidden_states=h, position_embeddings=(cos, sin), attention_mask=None, cache=cache
        )

        def heads_of(t, count):
            return t.view(2, 5, count, d).transpose(1, 2)

        q = heads_of(attn.q_proj(h), heads)
        k, v = heads_of(attn.k_proj(h), kv_heads), heads_of(attn.v_proj(h), kv_heads)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys = torch.cat([prefix_k, k], 2).repeat_interleave(heads // kv_heads, 1)
        values = torch.cat([prefix_v, v], 2).repeat_interleave(heads // kv_heads, 1)
        scores = q @ keys.transpose(-1, -2) * d**-0.5  # (B, H, T, N+T)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights * (torch.arange(n + 5) <= n + torch.arange(5)[:, None])  # causal
        gate = attn.prefix_gate.gate["u"]
        g = torch.sigmoid(h @ gate.weight.T + gate.bias)  # (B, T, 1)
        weights[..., :n] = weights[..., :n] * g[:, None]
        out = (weights / weights.sum(-1, keepdim=True)) @ values  # (B, H, T, D)
        want = attn.o_proj(out.transpose(1, 2).reshape(2, 5, heads * d))
    print(f"prefix gate vs hand-written attention: relative error {rel(got, want):.2e}")
    assert rel(got, want) <= 1e-5 and float(g.std()) > 0.1


def test_open_gates_give_plain_lora_bottleneck_and_prefix(tiny_dir, input_ids):
    """σ → 1 (bias +40): each part is edgepeft's own method with the same weights."""
    model, _ = load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, SMALL, "u")  # init "zeros": the LoRA and bottleneck branches add 0
    add_adapter(
        model, PrefixTuningConfig(num_virtual_tokens=4, projection=True, projection_hidden=16), "p"
    )
    prompts = next(m for _, m in adapter_modules(model) if isinstance(m, VirtualTokens))
    with torch.no_grad():
        prompts.projections["u"].embedding.normal_()  # a prefix that changes the logits
        prompts.projections["p"].load_state_dict(prompts.projections["u"].state_dict())
        gates = [m.gate["u"] for _, m in adapter_modules(model) if isinstance(m, PrefixGate)]
        for gate in gates:
            gate.bias.fill_(40.0)
    set_adapter(model, "p")
    want = logits(model, input_ids)
    set_adapter(model, "u")
    assert rel(logits(model, input_ids), want) <= 1e-6
    with torch.no_grad():
        for gate in gates:
            gate.bias.fill_(-1.0)
    assert (logits(model, input_ids) - want).abs().max() > 1e-3  # the gate is in the path

    add_adapter(model, LoraConfig(r=8, alpha=8, init="random"), "l")
    add_adapter(model, BottleneckConfig(style="pfeiffer", init="random"), "b")
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    u = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(4))
    for path, outer, inner_cls, plain_cls, plain in (
        ("self_attn.v_proj", layer.self_attn.v_proj, GatedLoraLayer, LoraLayer, "l"),
        ("mlp.down_proj", layer.mlp.down_proj, GatedBottleneckLayer, BottleneckLayer, "b"),
    ):
        stack = [outer, outer.base_layer]
        gated = next(m for m in stack if isinstance(m, inner_cls))
        other = next(m for m in stack if isinstance(m, plain_cls))
        with torch.no_grad():
            if inner_cls is GatedLoraLayer:
                gated.lora_A["u"].load_state_dict(other.lora_A[plain].state_dict())
                gated.lora_B["u"].load_state_dict(other.lora_B[plain].state_dict())
                gated.lora_gate["u"].bias.fill_(40.0)
            else:
                gated.adapter_down["u"].load_state_dict(other.adapter_down[plain].state_dict())
                gated.adapter_up["u"].load_state_dict(other.adapter_up[plain].state_dict())
                gated.adapter_gate["u"].bias.fill_(40.0)
            inputs = x if inner_cls is GatedLoraLayer else u
            set_adapter(model, plain)
            want = outer(inputs)
            set_adapter(model, "u")
            got = outer(inputs)
            set_adapter(model, None)
            base = outer(inputs)
        assert rel(got, want) <= 1e-6, path
        assert rel(got, base) > 1e-3, path  # the branch is not zero


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_causal_and_cached_decoding_equals_the_full_forward(attention, tiny_dir, input_ids):
    model, _ = adapted(tiny_dir)
    model.set_attn_implementation(attention)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # a left-padded row: sdpa's boolean mask, eager's additive one
    full = logits(model, input_ids, attention_mask=mask)
    changed = input_ids.clone()
    changed[:, 6:] = 7  # later tokens do not reach earlier positions (AdapterHub's mean would)
    assert torch.equal(logits(model, changed, attention_mask=mask)[:, :6], full[:, :6])

    with torch.no_grad():
        out = model(input_ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, input_ids.shape[1]):  # one token at a time over the cache
            out = model(
                input_ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                cache=out.past_key_values,
                use_cache=True,
            )
            steps.append(out.logits)
    got = torch.cat(steps, dim=1)
    print(f"{attention}: prefill + decode vs full forward, relative error {rel(got, full):.2e}")
    assert rel(got, full) <= 1e-6


def test_gradients_over_nf4_reach_every_part_only(tiny_dir, input_ids):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random"), "other")
    add_adapter(model, SMALL, "u")
    perturb(model, "u")  # every part non-zero, so each one's gradient is
    model(input_ids, labels=input_ids).loss.backward()
    trained = {id(p) for p in adapter_parameters(model, "u")}
    holders = {type(m) for _, m in adapter_modules(model) if "u" in m}
    assert holders == {VirtualTokens, PrefixGate, GatedLoraLayer, GatedBottleneckLayer}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_save_load_round_trip_is_exact_and_merge_refuses(tiny_dir, input_ids, tmp_path):
    model, _ = adapted(tiny_dir, quant="nf4")
    want = logits(model, input_ids)
    save_adapter(model, tmp_path / "u", "u")
    with safe_open(str(tmp_path / "u" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    p = "base_model.model.model.layers.1"
    assert {
        "prompt_embeddings",
        f"{p}.self_attn.q_proj.lora_A.weight",
        f"{p}.self_attn.v_proj.lora_gate.bias",
        f"{p}.self_attn.prefix_gate.weight",
        f"{p}.mlp.down_proj.adapter_up.weight",
        f"{p}.mlp.down_proj.adapter_gate.weight",
    } <= keys
    document = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert document["peft_type"] == "UNIPELT" and document["target_modules"] == ["q_proj", "v_proj"]

    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    load_adapter(fresh, tmp_path / "u", name="u")
    assert torch.equal(logits(fresh, input_ids), want)

    with pytest.raises(MergeError, match="'u'.*cannot be merged"):
        merge(fresh, "u")
    with pytest.raises(TypeError, match="'u'.*input-dependent gates.*cannot be merged"):
        fresh.model.layers[0].self_attn.q_proj.delta_weight("u")


# ---------------------------------------------------------------- separate export, runtime

ort = pytest.importorskip("onnxruntime")
PROMPTS = ["the quick brown fox", "SELECT name FROM users WHERE"]


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """fp32 separate export of a UniPELT adapter and a LoRA; the fp32 model holding both."""
    from edgepeft.export import api

    root = tmp_path_factory.mktemp("unipelt-separate")
    base = tiny_dir("llama")
    model, tokenizer = adapted(tiny_dir)
    add_adapter(model, LoraConfig(r=4, init="random", target_modules="all-linear"), "lora")
    folders = {name: save_adapter(model, root / "src" / name, name) for name in ("u", "lora")}
    set_adapter(model, None)
    out = root / "out"
    api.export(
        base, out, adapters=folders, weights="fp32", mode="separate", quant="none",
        verify=False, quiet=True,
    )  # fmt: skip
    return model, tokenizer, out


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_the_export_holds_the_gates_and_two_files(exported):
    from edgepeft.export.adapter_files import optional_graph_inputs

    _, _, out = exported
    manifest = json.loads((out / "edgepeft.json").read_text())
    entry = next(a for a in manifest["adapters"] if a["name"] == "u")
    assert entry["kind"] == "unipelt" and entry["num_virtual_tokens"] == 4
    assert entry["prefix_file"] == "adapters/u.kvprefix.safetensors"
    inputs = optional_graph_inputs(out / "model.onnx")
    assert inputs["model.prefix_gate.columns"].shape == ("prefix_columns",)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        assert inputs[f"{p}.self_attn.prefix_gate.weight"].shape == (64,)
        assert f"{p}.self_attn.q_proj.gated_lora_A" in inputs  # gated: q/k/v unpacked
        assert (
            f"{p}.self_attn.q_proj.lora_A" in inputs
            and f"{p}.self_attn.qkv_proj.lora_A" not in inputs
        )
        assert f"{p}.mlp.down_proj.gated_adapter_down.weight" in inputs
        assert f"{p}.mlp.gate_up_proj.lora_A" in inputs  # the LoRA's other groups stay packed
    parameters = ort.AdapterFormat.read_adapter(str(out / entry["file"])).get_parameters()
    assert np.array_equal(parameters["model.prefix_gate.columns"].numpy(), np.ones(4, np.float32))


def test_ort_matches_pytorch_over_prefill_and_decode_steps(exported, input_ids):
    from edgepeft.artifacts.kv_prefix import read_kv_prefix_file
    from edgepeft.artifacts.kv_seed import decode_step, prefill_with_prefix
    from edgepeft.export.adapter_files import load_adapter_file

    model, _, out = exported
    manifest = json.loads((out / "edgepeft.json").read_text())
    entry = next(a for a in manifest["adapters"] if a["name"] == "u")
    session = _session(out / "model.onnx")
    run = ort.RunOptions()
    adapter = load_adapter_file(out / entry["file"], out)
    run.add_active_adapter(adapter)
    prefix = read_kv_prefix_file(out / entry["prefix_file"], manifest["base_fingerprint"])
    forced = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(5))
    set_adapter(model, "u")
    want = logits(model, torch.cat([input_ids, forced], 1)).numpy()  # (B, T+3, V)
    set_adapter(model, None)
    ids = input_ids.numpy()
    got, state = prefill_with_prefix(
        session, ids, np.ones_like(ids), prefix, graph="fused", run_options=run
    )
    steps = [got]
    for t in range(forced.shape[1]):
        got, state = decode_step(session, state, forced[:, t].numpy(), run_options=run)
        steps.append(got)
    got = np.concatenate(steps, axis=1)
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"UniPELT fp32: ORT vs PyTorch over prefill + 3 decode steps, relative error {error:.2e}")
    assert error <= 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_unfed_prefix_gates_leave_the_graph_bit_identical(tiny_dir, tmp_path):
    from edgepeft.export.fused import export_fused
    from edgepeft.export.graph_info import input_names

    model, _ = load_base(tiny_dir("llama"), quant="none")
    plain = export_fused(model, tmp_path / "plain", "fp32")
    gated = export_fused(model, tmp_path / "gated", "fp32", prefix_gates=True)
    assert not any("prefix_gate" in i.name for i in _session(plain.path).get_inputs())
    assert gated.num_nodes > plain.num_nodes
    ids = np.array([[0, 0, 5, 9, 11], [3, 4, 5, 6, 7]], np.int64)
    mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int64)
    empty = np.zeros((2, 2, 0, 16), np.float32)
    results = []
    for info in (plain, gated):
        session = _session(info.path)
        names = [o.name for o in session.get_outputs()]
        feed = {"input_ids": ids, "attention_mask": mask}
        feed.update(dict.fromkeys(input_names(LAYERS)[2:], empty))
        first = dict(zip(names, session.run(None, feed), strict=True))
        feed = {"input_ids": ids[:, -1:], "attention_mask": np.concatenate([mask, mask[:, -1:]], 1)}
        feed.update(
            {
                n.replace("present.", "past_key_values."): v
                for n, v in first.items()
                if n != "logits"
            }
        )
        results.append((first["logits"], session.run(["logits"], feed)[0]))
    for plain_logits, gated_logits in zip(*results, strict=True):
        assert np.array_equal(plain_logits, gated_logits)


def test_engine_switches_it_per_request_next_to_a_lora(exported):
    from edgepeft.runtime import Engine
    from tests.runtime_fixtures import bos_ids, torch_greedy

    model, tokenizer, out = exported
    engine = Engine(out, threads=1)
    info = engine.adapters()["u"]
    assert info.kind == "unipelt" and info.num_virtual_tokens == 4 and info.method == "prefix"
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    seen = {}
    for name in ("u", None, "lora", "u"):
        got = engine.generate(PROMPTS, adapter=name, max_new_tokens=8, return_result=True)
        set_adapter(model, name)
        assert [r.token_ids for r in got] == torch_greedy(model, rows, 8), name
        seen.setdefault(name, [r.token_ids for r in got])
    set_adapter(model, None)
    assert seen["u"] != seen[None] and seen["u"] != seen["lora"]


@pytest.mark.parametrize("weights", ["fp32", "nf4"])
def test_verify_passes_and_the_engine_agrees(weights, exported, tiny_dir, tmp_path):
    from edgepeft.export import api
    from edgepeft.export.verify import verify
    from edgepeft.runtime import Engine
    from tests.runtime_fixtures import bos_ids, torch_greedy

    if weights == "fp32":
        model, tokenizer, out = exported
    else:  # QLoRA: trained over the NF4 base, exported with its own codes (MatMulBnb4)
        model, tokenizer = adapted(tiny_dir, quant="nf4")
        folder = save_adapter(model, tmp_path / "u", "u")
        out = tmp_path / "out"
        api.export(
            tiny_dir("llama"), out, adapters={"u": folder}, weights="nf4", mode="separate",
            quant="nf4", verify=False, quiet=True,
        )  # fmt: skip
    report = verify(out, max_new_tokens=4)
    check = next(g for g in report.graphs if g.name == "u")
    assert report.passed, report.to_dict()
    assert check.top1_agree == check.top1_total and check.adapter_file.endswith("u.onnx_adapter")
    if weights == "nf4":
        rows = [bos_ids(tokenizer, p) for p in PROMPTS]
        got = Engine(out, threads=1).generate(
            PROMPTS, adapter="u", max_new_tokens=6, return_result=True
        )
        assert [r.token_ids for r in got] == torch_greedy(model, rows, 6)


def test_generic_graph_refuses_unipelt_naming_the_model_type(tiny_dir, tmp_path):
    from edgepeft.export import api

    model, _ = adapted(tiny_dir)
    folder = save_adapter(model, tmp_path / "u", "u")
    with pytest.raises(
        ValueError, match=r"UniPELT adapter\(s\) \['u'\].*llama export here is the traced"
    ):
        api.export(
            tiny_dir("llama"), tmp_path / "out", adapters={"u": folder}, weights="fp32",
            mode="separate", quant="none", graph="generic", quiet=True,
        )  # fmt: skip


# ---------------------------------------------------------------- edgepeft train


def test_edgepeft_train_lowers_the_loss_and_saves(tiny_dir, tmp_path, capsys):
    from edgepeft.cli import main
    from edgepeft.tasks import make_splits

    train, val, _ = make_splits("reverse", (24, 4, 4), seed=0)
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.toml").write_text(
        f'model = "{tiny_dir("llama")}"\nquant = "nf4"\nadapter = "a"\noutput_dir = "out"\n'
        '[method]\ntype = "unipelt"\nnum_virtual_tokens = 4\nprefix_bottleneck = 16\n'
        '[data]\ntrain = "train.jsonl"\nval = "val.jsonl"\n'
        "[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_seq_len = 32\n"
        "eval_every = 6\nsave_every = 6\n"
    )
    assert main(["train", str(tmp_path / "run.toml"), "--quiet"]) == 0, capsys.readouterr().err
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"unipelt: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.2
    saved = json.loads((tmp_path / "out" / "last" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "UNIPELT" and saved["num_virtual_tokens"] == 4
    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    load_adapter(fresh, tmp_path / "out" / "last", name="a")  # the saved folder reloads
