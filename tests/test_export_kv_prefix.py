"""Prompt/prefix tuning as seeded KV prefixes: onnxruntime with the prefix vs PyTorch (peft semantics)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from edgepeft import (
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter_parameters,
    add_adapter,
    disable_adapters,
    load_adapter,
    load_base,
    save_adapter,
    set_adapter,
)
from edgepeft.base import fingerprint
from edgepeft.export.fused import export_fused
from edgepeft.export.generic import export_generic
from edgepeft.export.kv_prefix import (
    SUFFIX,
    export_kv_prefix,
    greedy_with_prefix,
    kv_prefix_tensors,
    read_kv_prefix_file,
    run_with_prefix,
    seed_past,
    write_kv_prefix_file,
)
from edgepeft.export.manifest import AdapterEntry
from edgepeft.tiny import TINY_VOCAB, tiny_model

ort = pytest.importorskip("onnxruntime")

N = 5
DECODE_STEPS = 3
NEW_TOKENS = 8
TOL = 1e-4
PAD = 3  # left pads of row 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batch(seed=0, pad=PAD):
    """Two prompts of 9 tokens, the second left padded by `pad`; then one token per step."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY_VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    steps = [rng.integers(3, TINY_VOCAB, 2).astype(np.int64) for _ in range(DECODE_STEPS)]
    return ids, mask, steps


@torch.no_grad()
def _torch_logits(model, ids, mask, steps):
    """PyTorch with the adapter's hooks, full recompute, positions as generate passes them."""
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    logits = []
    for step in [None, *steps]:
        if step is not None:
            ids = torch.cat([ids, torch.from_numpy(step)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits.append(out.numpy() if step is None else out[:, -1:].numpy())
    return logits


@torch.no_grad()
def _torch_greedy(model, ids, mask):
    out = model.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].numpy()


def _diffs(ort_logits, torch_logits, mask) -> tuple[float, float]:
    """(max |diff| over the prefill's real tokens, over the decode steps), per row for row 1."""
    valid = mask.astype(bool)  # logits at padded positions carry no meaning
    prefill = np.abs(ort_logits[0] - torch_logits[0])[valid].max()
    decode = max(np.abs(a - b).max() for a, b in zip(ort_logits[1:], torch_logits[1:], strict=True))
    return float(prefill), float(decode)


def _through_file(model, name, tmp_path):
    """The adapter's prefix as the runtime reads it: exported, then read back."""
    entry = export_kv_prefix(model, name, tmp_path)
    return read_kv_prefix_file(tmp_path / entry["file"], fingerprint(model)), entry


def _with_adapters(arch):
    """A tiny model holding a prefix ("pre") and a prompt-tuning ("pro") adapter."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=N), name="pre")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=N), name="pro")
    return model


def _base_graph(model, tmp_path, exporter=export_fused):
    """The base's fp32 graph; the adapters are off (a traced hook would end up in the graph)."""
    with disable_adapters(model):
        return exporter(model, tmp_path / "graph", "fp32")


# ---------------------------------------------------------------- fused graphs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_fused_graph_with_seeded_prefix_matches_pytorch(arch, tmp_path):
    """One base graph; both adapters switch by their files alone; left padding, batch 2."""
    model = _with_adapters(arch)
    session = _session(_base_graph(model, tmp_path).path)  # neither adapter is in the graph
    ids, mask, steps = _batch()
    for name in ("pre", "pro"):
        set_adapter(model, name)
        prefix, _ = _through_file(model, name, tmp_path)
        got = run_with_prefix(session, ids, mask, prefix, graph="fused", steps=steps)
        prefill, decode = _diffs(got, _torch_logits(model, ids, mask, steps), mask)
        print(f"{arch} {name}: prefill {prefill:.2e}, decode {decode:.2e}")
        assert prefill <= TOL and decode <= TOL
        tokens = greedy_with_prefix(
            session, ids, mask, prefix, graph="fused", max_new_tokens=NEW_TOKENS
        )
        np.testing.assert_array_equal(tokens, _torch_greedy(model, ids, mask))


def test_fused_prefix_keys_are_repositioned_for_padded_rows(tmp_path):
    """Broadcasting the prefix alone is right for unpadded rows only: the shift matters."""
    model = _with_adapters("llama")
    set_adapter(model, "pre")
    session = _session(_base_graph(model, tmp_path).path)
    prefix, _ = _through_file(model, "pre", tmp_path)
    unshifted = dataclasses.replace(
        prefix,
        inv_freq=tuple(np.zeros_like(f) for f in prefix.inv_freq),  # rotate by 0
    )
    ids, mask, _ = _batch()
    want = _torch_logits(model, ids, mask, [])[0]
    got = run_with_prefix(session, ids, mask, unshifted, graph="fused")[0]
    diff = np.abs(got - want)
    assert diff[0].max() <= TOL  # row 0 has no padding
    assert diff[1][mask[1].astype(bool)].max() > 1e-3  # row 1: keys seen from other positions


def test_prompt_over_an_nf4_base_and_an_fp16_graph(tiny_dir, tmp_path):
    """Virtual tokens run through the quantized base; an fp16 graph gets fp16 cache entries."""
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(1)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=N), name="pro")
    prefix, _ = _through_file(model, "pro", tmp_path)
    ids, mask, steps = _batch()
    want = _torch_logits(model, ids, mask, steps)
    for weights, tol in (("fp32", TOL), ("fp16", 5e-3)):
        with disable_adapters(model):
            info = export_fused(model, tmp_path / weights, weights)
        got = run_with_prefix(_session(info.path), ids, mask, prefix, graph="fused", steps=steps)
        prefill, decode = _diffs(got, want, mask)
        print(f"nf4 base, {weights} graph, prompt: prefill {prefill:.2e}, decode {decode:.2e}")
        assert prefill <= tol and decode <= tol


def test_prefix_trained_with_projection_saved_and_loaded(tmp_path):
    model = tiny_model("llama")
    torch.manual_seed(2)
    add_adapter(
        model,
        PrefixTuningConfig(num_virtual_tokens=N, projection=True, projection_hidden=32),
        name="mlp",
    )
    ids, mask, steps = _batch()
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for _ in range(3):
        labels = torch.from_numpy(ids).masked_fill(torch.from_numpy(mask) == 0, -100)
        loss = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_adapter(model, tmp_path / "folder", name="mlp")
    loaded = load_adapter(tiny_model("llama"), tmp_path / "folder", name="mlp")

    trained_tensors = kv_prefix_tensors(model, "mlp")
    for key, value in kv_prefix_tensors(loaded, "mlp").items():
        np.testing.assert_array_equal(value, trained_tensors[key])
    session = _session(_base_graph(loaded, tmp_path).path)
    prefix, _ = _through_file(loaded, "mlp", tmp_path / "out")
    got = run_with_prefix(session, ids, mask, prefix, graph="fused", steps=steps)
    prefill, decode = _diffs(got, _torch_logits(loaded, ids, mask, steps), mask)
    print(f"llama projection prefix: prefill {prefill:.2e}, decode {decode:.2e}")
    assert prefill <= TOL and decode <= TOL
    tokens = greedy_with_prefix(
        session, ids, mask, prefix, graph="fused", max_new_tokens=NEW_TOKENS
    )
    np.testing.assert_array_equal(tokens, _torch_greedy(loaded, ids, mask))


# ---------------------------------------------------------------- generic graphs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generic_graph_with_seeded_prefix_matches_pytorch(arch, tmp_path):
    """Generic graphs count positions by cumsum(mask): prefixes need no shift, prompts -pads."""
    model = _with_adapters(arch)
    session = _session(_base_graph(model, tmp_path, export_generic).path)
    for name in ("pre", "pro"):
        set_adapter(model, name)
        prefix, _ = _through_file(model, name, tmp_path)
        # GPT-2's learned absolute positions: a padded row's prompt-tuned tokens sit at other
        # positions in peft than in this graph, so prompts are checked on unpadded rows there.
        pad = 0 if (arch, name) == ("gpt2", "pro") else PAD
        ids, mask, steps = _batch(pad=pad)
        got = run_with_prefix(session, ids, mask, prefix, graph="generic", steps=steps)
        prefill, decode = _diffs(got, _torch_logits(model, ids, mask, steps), mask)
        print(f"generic {arch} {name} (pad {pad}): prefill {prefill:.2e}, decode {decode:.2e}")
        assert prefill <= TOL and decode <= TOL
        tokens = greedy_with_prefix(
            session, ids, mask, prefix, graph="generic", max_new_tokens=NEW_TOKENS
        )
        np.testing.assert_array_equal(tokens, _torch_greedy(model, ids, mask))


def test_generic_gpt2_refuses_padded_prompt_rows(tmp_path):
    model = _with_adapters("gpt2")
    set_adapter(model, "pro")
    session = _session(_base_graph(model, tmp_path, export_generic).path)
    prefix, _ = _through_file(model, "pro", tmp_path)
    assert prefix.inv_freq == (None, None)  # no rotary: absolute positions
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="absolute positions"):
        run_with_prefix(session, ids, mask, prefix, graph="generic")


# ---------------------------------------------------------------- positions="unpadded"


@pytest.mark.parametrize(
    ("arch", "graph"), [("llama", "fused"), ("llama", "generic"), ("gpt2", "generic")]
)
def test_unpadded_positions_give_each_row_what_it_gives_alone(arch, graph, tmp_path):
    """positions="unpadded": a left-padded row computes what its prompt alone computes (batch
    1, no pads), prompt and prefix tuning, rotary or learned positions: batch-invariant."""
    model = _with_adapters(arch)
    exporter = export_fused if graph == "fused" else export_generic
    session = _session(_base_graph(model, tmp_path, exporter).path)
    ids, mask, steps = _batch()
    for name in ("pre", "pro"):
        set_adapter(model, name)
        prefix, _ = _through_file(model, name, tmp_path)
        kwargs = dict(graph=graph, positions="unpadded")
        got = run_with_prefix(session, ids, mask, prefix, steps=steps, **kwargs)
        tokens = greedy_with_prefix(session, ids, mask, prefix, max_new_tokens=NEW_TOKENS, **kwargs)
        for b in range(len(ids)):
            real = mask[b].astype(bool)
            row, ones = ids[b : b + 1, real], mask[b : b + 1, real]
            want = _torch_logits(model, row, ones, [s[b : b + 1] for s in steps])
            prefill = float(np.abs(got[0][b][real] - want[0][0]).max())
            pairs = zip(got[1:], want[1:], strict=True)
            decode = max(float(np.abs(g[b] - w[0]).max()) for g, w in pairs)
            print(f"{graph} {arch} {name} row {b}: prefill {prefill:.2e}, decode {decode:.2e}")
            assert prefill <= TOL and decode <= TOL, (name, b)
            np.testing.assert_array_equal(tokens[b], _torch_greedy(model, row, ones)[0])
        if prefix.method == "prefix":  # peft's frame is the unpadded one already
            same = run_with_prefix(session, ids, mask, prefix, graph=graph, steps=steps)
            assert all(np.array_equal(a, c) for a, c in zip(got, same, strict=True))
        elif arch != "gpt2":  # peft's batched frame puts the pads before the text
            peft = run_with_prefix(session, ids, mask, prefix, graph=graph)[0]
            assert np.abs(peft[1] - got[0][1])[mask[1].astype(bool)].max() > 1e-3
    with pytest.raises(ValueError, match="positions must be one of"):
        seed_past(prefix, mask, graph, positions="left")


# ---------------------------------------------------------------- the file


def test_file_layout_metadata_and_fingerprint_check(tmp_path):
    from safetensors import safe_open

    model = _with_adapters("qwen2")
    entry = export_kv_prefix(model, "pro", tmp_path, source="/adapters/pro")
    path = tmp_path / entry["file"]
    assert entry["file"] == f"adapters/pro{SUFFIX}"
    assert entry["kind"] == "kv_prefix" and entry["method"] == "prompt"
    assert entry["peft_type"] == "PROMPT_TUNING" and entry["num_virtual_tokens"] == N
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
    assert meta["kind"] == "kv_prefix" and meta["adapter"] == "pro"
    assert meta["num_virtual_tokens"] == str(N) and meta["base_fingerprint"] == fingerprint(model)
    assert shapes["past_key_values.1.value"] == (1, 2, N, 16)  # (1, n_kv, N, head_dim)
    assert shapes["rotary.0.inv_freq"] == (8,)

    prefix = read_kv_prefix_file(path, fingerprint(model))
    assert prefix.method == "prompt" and prefix.num_layers == 2
    with pytest.raises(ValueError, match="made for base"):
        read_kv_prefix_file(path, "0123456789abcdef")
    tensors = kv_prefix_tensors(model, "pro")
    with pytest.raises(ValueError, match="method must be"):
        write_kv_prefix_file(
            tmp_path / "x.safetensors", tensors, "fp", {"adapter": "pro", "method": "lora"}
        )
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    fields = AdapterEntry.__dataclass_fields__
    manifest_entry = AdapterEntry(**{k: v for k, v in entry.items() if k in fields})
    assert manifest_entry.fingerprint == fingerprint(model)  # the base the file is bound to
    json.dumps(entry)  # plain JSON, for manifest.json


def test_only_prompt_learning_adapters_have_a_prefix():
    from edgepeft import LoraConfig

    model = tiny_model("llama")
    add_adapter(model, LoraConfig(r=2), name="lora")
    with pytest.raises(ValueError, match="prompt or prefix tuning"):
        kv_prefix_tensors(model, "lora")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        kv_prefix_tensors(model, "nope")


# ---------------------------------------------------------------- through export(mode="separate")


def test_separate_export_ships_soft_prompts_as_kv_prefix_files(tiny_dir, tmp_path):
    """export(mode="separate") writes prompt/prefix adapters as KV-prefix files beside LoRA's."""
    from edgepeft import LoraConfig, load_base, save_adapter
    from edgepeft.export.api import export
    from edgepeft.export.manifest import read_manifest

    folder = tiny_dir("llama")
    model, _ = load_base(folder, quant="nf4")
    torch.manual_seed(1)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=N), name="pre")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=N), name="pro")
    add_adapter(model, LoraConfig(r=4, init="random"), name="sql")
    folders = {name: save_adapter(model, tmp_path / name, name) for name in ("pre", "pro", "sql")}
    out = tmp_path / "out"
    export(folder, out, adapters=folders, weights="fp32", mode="separate", verify=False, quiet=True)

    manifest = read_manifest(out)
    kinds = {entry.name: entry.kind for entry in manifest.adapters}
    assert kinds == {"pre": "kv_prefix", "pro": "kv_prefix", "sql": "lora"}
    session = _session(out / manifest.model_file)
    ids, mask, steps = _batch()
    for entry in manifest.adapters:
        if entry.kind != "kv_prefix":
            continue
        assert entry.num_virtual_tokens == N
        prefix = read_kv_prefix_file(out / entry.file, manifest.base_fingerprint)
        set_adapter(model, entry.name)
        got = run_with_prefix(session, ids, mask, prefix, graph=manifest.graph, steps=steps)
        prefill, decode = _diffs(got, _torch_logits(model, ids, mask, steps), mask)
        assert prefill <= TOL and decode <= TOL, (entry.name, prefill, decode)
