"""Separate mode: one base graph, adapters as .onnx_adapter files switched per run.

Every adapter is compared with PyTorch running the same adapter over the same NF4 base:
prefill of a left-padded batch, then two decode steps over the graph's own KV cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    SelectiveConfig,
)
from edgepeft.export import api
from edgepeft.export.adapter_files import (
    GUARD_PREFIX,
    AdapterBaseMismatchError,
    GraphInput,
    adapter_fingerprint,
    check_adapter_file,
    fingerprint_input,
    load_adapter_file,
    optional_graph_inputs,
    write_adapter_file,
)
from edgepeft.export.graph_info import input_names
from edgepeft.export.weights import DEFAULT_QUANTIZATION, dequantize_packed
from edgepeft.tiny import TINY_VOCAB

ort = pytest.importorskip("onnxruntime")

ARCHS = ["llama", "qwen2", "phi3", "gemma2"]
ADAPTERS = {
    "lora_r4": LoraConfig(r=4, alpha=8, init="random"),
    # all linear layers, rsLoRA, and a smaller rank on o_proj: ranks differ per module
    "lora_r8": LoraConfig(
        r=8, alpha=16, init="random", use_rslora=True, target_modules="all-linear",
        rank_pattern={"o_proj": 2},
    ),
    "dora": LoraConfig(r=4, alpha=8, init="random", use_dora=True),
    "ia3": IA3Config(init="random"),
    "bottleneck": BottleneckConfig(
        style="houlsby", reduction_factor=8, activation="gelu", init="random"
    ),
}
MERGEABLE = ("lora_r4", "lora_r8", "dora", "ia3")
DECODE_STEPS = 2


# ---------------------------------------------------------------- helpers


def _batch(seed=0):
    """Two prompts of 9 tokens, the second left padded by 3, then DECODE_STEPS tokens each."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY_VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    ids[1, :3] = 0
    steps = [rng.integers(3, TINY_VOCAB, 2).astype(np.int64) for _ in range(DECODE_STEPS)]
    return ids, mask, steps


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_ort(session, manifest, run_options=None, batch=None):
    """Logits of the prefill, then of each decode step, the presents fed back as pasts."""
    ids, mask, steps = batch or _batch()
    names = [o.name for o in session.get_outputs()]
    kv = np.float16 if manifest["kv_dtype"] == "float16" else np.float32
    empty = np.zeros((len(ids), manifest["num_kv_heads"], 0, manifest["head_dim"]), kv)
    feed = {"input_ids": ids, "attention_mask": mask}
    feed.update({n: empty for n in input_names(manifest["num_layers"])[2:]})
    logits = []
    for step in [*steps, None]:
        out = dict(zip(names, session.run(None, feed, run_options), strict=True))
        logits.append(out["logits"])
        if step is None:
            break
        mask = np.concatenate([feed["attention_mask"], np.ones((len(ids), 1), np.int64)], axis=1)
        pasts = {k.replace("present", "past_key_values"): v for k, v in out.items() if k != "logits"}
        feed = {"input_ids": step[:, None], "attention_mask": mask, **pasts}
    return logits


@torch.no_grad()
def _run_torch(model, batch=None):
    """The same logits from PyTorch, positions cumsum(mask) - 1: one causal forward over the
    prompt and the decode tokens gives the prefill's and every step's logits at once."""
    ids, mask, steps = batch or _batch()
    ids = torch.from_numpy(np.concatenate([ids, *(s[:, None] for s in steps)], axis=1))
    mask = torch.from_numpy(np.concatenate([mask, np.ones((len(mask), len(steps)), np.int64)], 1))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    out = out.logits.float().numpy()
    prompt = out.shape[1] - len(steps)
    return [out[:, :prompt]] + [out[:, k : k + 1] for k in range(prompt, out.shape[1])]


def _diff(a, b, batch=None):
    """max |a - b| over real (unpadded) prefill positions and every decode step."""
    valid = (batch or _batch())[1].astype(bool)
    prefill = np.abs(a[0] - b[0])[valid].max()
    decode = max(np.abs(x - y).max() for x, y in zip(a[1:], b[1:], strict=True))
    return float(max(prefill, decode))


def _activate(path, export_dir):
    """(RunOptions, adapter): the LoraAdapter must outlive every run using the options."""
    adapter = load_adapter_file(path, export_dir)
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def _perturb_dora_magnitudes(model, name):
    """Random init leaves m = ||W + sBA||, i.e. DoRA == LoRA; move m so DoRA's scale is seen."""
    with torch.no_grad():
        for _, module in adapter_modules(model):
            if name in getattr(module, "lora_magnitude_vector", {}):
                m = module.lora_magnitude_vector[name]
                m.mul_(1 + 0.2 * torch.randn_like(m))


def _adapted_base(base_dir, folder, configs=ADAPTERS):
    """(NF4 reference model holding every adapter, name -> its saved adapter folder)."""
    model, _ = load_base(base_dir, quant="nf4")
    torch.manual_seed(0)
    folders = {}
    for name, config in configs.items():
        add_adapter(model, config, name)
        if name == "dora":
            _perturb_dora_magnitudes(model, name)
        folders[name] = save_adapter(model, folder / name, name)
    return model, folders


@dataclass
class Exported:
    model: torch.nn.Module
    """The NF4 reference holding every adapter of ADAPTERS."""
    base_dir: Path
    folders: dict[str, Path]
    out: Path
    """The fp32 separate-mode export of the base with every adapter."""


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """exported(arch) -> Exported, built once per architecture for this module."""
    made: dict[str, Exported] = {}

    def make(arch: str) -> Exported:
        if arch not in made:
            root = tmp_path_factory.mktemp(f"separate-{arch}")
            model, folders = _adapted_base(tiny_dir(arch), root / "adapters_src")
            out = root / "separate"
            api.export(tiny_dir(arch), out, adapters=folders, weights="fp32", mode="separate", quiet=True)
            made[arch] = Exported(model, tiny_dir(arch), folders, out)
        return made[arch]

    return make


def _manifest(folder):
    return json.loads((folder / "edgepeft.json").read_text())


# Sibling projections the base graph keeps packed, with one adapter branch each (none of
# these adapters puts input-side IA3 or a bottleneck on them, which would unpack them).
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _expected_adapter_inputs(model, fingerprint):
    """Graph inputs the adapters need, derived from the PyTorch modules holding them."""
    names = {fingerprint_input(fingerprint)}
    for path, module in adapter_modules(model):
        parent, _, leaf = path.rpartition(".")
        path = f"{parent}.{PACKED.get(leaf, leaf)}"
        if module.peft_type == "LORA":
            names |= {f"{path}.lora_A", f"{path}.lora_B", f"{path}.lora_row_mask"}
            if len(module.lora_magnitude_vector):
                names.add(f"{path}.dora_scale")
        elif module.peft_type == "IA3":
            names.add(f"{path}.ia3_scale")
        elif module.peft_type == "BOTTLENECK":
            names |= {f"{path}.adapter_{s}.{p}" for s in ("down", "up") for p in ("weight", "bias")}
    return names


# ---------------------------------------------------------------- parity, per architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_each_adapter_file_matches_pytorch(arch, exported):
    ex = exported(arch)
    model, out = ex.model, ex.out
    manifest = _manifest(out)
    session = _session(out / "model.onnx")

    set_adapter(model, None)
    base_torch = _run_torch(model)
    base_ort = _run_ort(session, manifest)
    diffs = {"(none)": _diff(base_ort, base_torch)}
    assert diffs["(none)"] <= 1e-4

    # one session, adapters switched per run (no reload)
    first_runs = {}
    for name in ADAPTERS:
        options, adapter = _activate(out / "adapters" / f"{name}.onnx_adapter", out)
        got = _run_ort(session, manifest, options)
        set_adapter(model, name)
        want = _run_torch(model)
        diffs[name] = _diff(got, want)
        assert diffs[name] <= 1e-4, name
        assert _diff(want, base_torch) > 1e-2, f"{name} does not change the output"
        first_runs[name] = got
    set_adapter(model, None)
    print(f"{arch} separate fp32: max |ORT - torch| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    # back and forth on the same session: each run gives its own adapter's logits
    for name in ("dora", None, "lora_r4", "bottleneck"):
        if name is None:
            assert _diff(_run_ort(session, manifest), base_ort) == 0
            continue
        options, adapter = _activate(out / "adapters" / f"{name}.onnx_adapter", out)
        assert _diff(_run_ort(session, manifest, options), first_runs[name]) == 0

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    required = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    assert required == input_names(manifest["num_layers"])
    assert set(optional_graph_inputs(out / "model.onnx")) == _expected_adapter_inputs(
        model, manifest["base_fingerprint"]
    )


def test_manifest_and_sidecars_describe_the_files(exported):
    out = exported("llama").out
    manifest = _manifest(out)
    assert manifest["mode"] == "separate"
    entries = {a["name"]: a for a in manifest["adapters"]}
    assert list(entries) == list(ADAPTERS)
    assert {k: e["kind"] for k, e in entries.items()} == {
        "lora_r4": "lora", "lora_r8": "lora", "dora": "dora", "ia3": "ia3", "bottleneck": "bottleneck"
    }
    assert entries["lora_r4"]["rank"] == 4 and entries["lora_r8"]["rank"] == 8
    assert entries["ia3"]["rank"] is None and entries["bottleneck"]["rank"] == 64 // 8
    for name, entry in entries.items():
        path = out / entry["file"]
        assert entry["file"] == f"adapters/{name}.onnx_adapter"
        assert entry["fingerprint"] == manifest["base_fingerprint"] == adapter_fingerprint(path)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["sha256"] == entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sidecar["base_fingerprint"] == manifest["base_fingerprint"]
        assert sidecar["targets"] == entry["targets"]
        params = ort.AdapterFormat.read_adapter(str(path))
        assert params.get_model_version() == int(manifest["base_fingerprint"][:7], 16)
        assert sorted(params.get_parameters()) == sorted(
            [*sidecar["inputs"], fingerprint_input(manifest["base_fingerprint"])]
        )
    late = json.loads((out / "adapters/lora_r8.json").read_text())
    assert late["ranks"]["model.layers.0.self_attn.o_proj"] == 2
    assert late["ranks"]["model.layers.0.self_attn.q_proj"] == 8
    assert late["scaling"]["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 8**0.5)


# ---------------------------------------------------------------- merged vs separate


def test_merged_export_matches_separate(exported, tmp_path):
    ex = exported("llama")
    folders = {k: ex.folders[k] for k in MERGEABLE}
    merged = tmp_path / "merged"
    api.export(ex.base_dir, merged, adapters=folders, weights="fp32", mode="merged", verify=False, quiet=True)
    session, manifest = _session(ex.out / "model.onnx"), _manifest(ex.out)
    diffs = {}
    for name in MERGEABLE:
        options, adapter = _activate(ex.out / "adapters" / f"{name}.onnx_adapter", ex.out)
        want = _run_ort(_session(merged / name / "model.onnx"), _manifest(merged / name))
        diffs[name] = _diff(_run_ort(session, manifest, options), want)
    print("llama fp32 separate vs merged: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-4


def test_int4_separate_against_merged_int4(exported, tmp_path):
    """int4: the base is rounded alone (separate) or with the adapter folded in (merged)."""
    ex = exported("llama")
    names = ("lora_r4", "dora", "bottleneck")
    sep, merged = tmp_path / "separate", tmp_path / "merged"
    kwargs = dict(weights="int4", accuracy_level=0, quiet=True)
    api.export(ex.base_dir, sep, adapters={k: ex.folders[k] for k in names}, mode="separate", **kwargs)
    mergeable = {k: ex.folders[k] for k in names if k in MERGEABLE}
    api.export(ex.base_dir, merged, adapters=mergeable, mode="merged", verify=False, **kwargs)
    session, manifest = _session(sep / "model.onnx"), _manifest(sep)
    assert manifest["weights"] == "int4" and manifest["op_counts"]["MatMulNBits"] > 0
    diffs = {}
    for name in names:
        options, adapter = _activate(sep / "adapters" / f"{name}.onnx_adapter", sep)
        got = _run_ort(session, manifest, options)
        set_adapter(ex.model, name)
        diffs[f"{name} vs torch"] = _diff(got, _run_torch(ex.model))
        if name in mergeable:
            want = _run_ort(_session(merged / name / "model.onnx"), _manifest(merged / name))
            diffs[f"{name} vs merged int4"] = _diff(got, want)
    set_adapter(ex.model, None)
    print("llama int4 (accuracy_level 0): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    # Measured (see the printed line): int4 RTN of the base moves these order-1 logits by
    # ~0.1; an adapter left out would move them by ~1.
    assert max(diffs.values()) <= 0.3


def test_dora_scale_from_trained_base_vs_int4_weights(exported):
    """The file's DoRA scale uses the weights the adapter was trained on (NF4, dequantized);
    recomputing it from the int4 graph's rounded weights would differ by this much."""
    from edgepeft.adapters import dora
    from edgepeft.base import dequantized_weight

    worst = 0.0
    for _, module in adapter_modules(exported("llama").model):
        if "dora" not in getattr(module, "lora_magnitude_vector", {}):
            continue
        weight = dequantized_weight(module.innermost())
        # int4 as the default recipe rounds it (the fixture's graph is fp32)
        rounded = torch.from_numpy(
            dequantize_packed(DEFAULT_QUANTIZATION.quantize(weight.numpy(), 4, 32))
        )
        update = dora.lora_weight(module.lora_A["dora"], module.lora_B["dora"]).detach()
        s = module.scaling["dora"]
        trained, graph = dora.row_norm(weight, update, s), dora.row_norm(rounded, update, s)
        worst = max(worst, float(((graph - trained).abs() / trained).max()))
    print(f"DoRA row norms, int4-rounded vs trained NF4 base: max relative difference {worst:.2e}")
    assert 0 < worst < 0.05


# ---------------------------------------------------------------- fingerprints and refusals


def test_adapter_file_for_another_base_is_refused(exported, tmp_path):
    out = exported("llama").out
    mine = _manifest(out)["base_fingerprint"]
    other = "0123456789abcdef"
    # the same tensors, written as if exported against another base
    inputs = optional_graph_inputs(out / "model.onnx")
    inputs[fingerprint_input(other)] = GraphInput(np.dtype("float32"), (1,))
    params = ort.AdapterFormat.read_adapter(str(out / "adapters/lora_r4.onnx_adapter"))
    tensors = {k: v.numpy() for k, v in params.get_parameters().items() if not k.startswith(GUARD_PREFIX)}
    foreign = write_adapter_file(tmp_path, "lora_r4", tensors, graph_inputs=inputs, base_fingerprint=other)
    with pytest.raises(AdapterBaseMismatchError) as info:
        load_adapter_file(foreign.path, out)
    assert other in str(info.value) and mine in str(info.value)
    with pytest.raises(AdapterBaseMismatchError, match=f"{mine}.*{'f' * 16}"):
        check_adapter_file(out / "adapters/lora_r4.onnx_adapter", "f" * 16)
    # plain onnxruntime refuses it too: the guard input names the adapter's base
    adapter = ort.LoraAdapter()
    adapter.Load(str(foreign.path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    with pytest.raises(Exception, match=f"Invalid input name: {GUARD_PREFIX}{other}"):
        _run_ort(_session(out / "model.onnx"), _manifest(out), options)
    assert check_adapter_file(out / "adapters/lora_r4.onnx_adapter", out) == mine


def test_adapter_tensor_without_graph_input_is_named(exported, tmp_path):
    out = exported("llama").out
    inputs = optional_graph_inputs(out / "model.onnx")
    fp = _manifest(out)["base_fingerprint"]
    stray = {"lm_head.lora_A": np.zeros((64, 4), np.float32)}
    with pytest.raises(ValueError, match="targets layer lm_head that the graph does not expose"):
        write_adapter_file(tmp_path, "late", stray, graph_inputs=inputs, base_fingerprint=fp)
    wrong = {"model.layers.1.self_attn.qkv_proj.lora_A": np.zeros((32, 4), np.float32)}
    with pytest.raises(ValueError, match=r"shape \(32, 4\)"):
        write_adapter_file(tmp_path, "late", wrong, graph_inputs=inputs, base_fingerprint=fp)
    a, b = "model.layers.1.self_attn.qkv_proj.lora_A", "model.layers.1.self_attn.qkv_proj.lora_B"
    ranks = {a: np.zeros((64, 4), np.float32), b: np.zeros((3, 128), np.float32)}
    with pytest.raises(ValueError, match="lora_rank"):
        write_adapter_file(tmp_path, "late", ranks, graph_inputs=inputs, base_fingerprint=fp)
    assert not list(tmp_path.glob("late*"))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (SelectiveConfig(patterns=(r"lm_head\.weight$",), init="random"), "tunes lm_head.*mode='merged'"),
        (LoraConfig(r=2, modules_to_save=("lm_head",)), "modules_to_save.*mode='merged'"),
    ],
)
def test_unswitchable_adapters_are_refused(config, match, tiny_dir, tmp_path):
    model, _ = load_base(tiny_dir("llama"))
    add_adapter(model, config, "x")
    folder = save_adapter(model, tmp_path / "x", "x")
    with pytest.raises(ValueError, match=match):
        api.export(tiny_dir("llama"), tmp_path / "out", adapters={"x": folder}, weights="fp32",
                   mode="separate", quiet=True)
    assert not (tmp_path / "out").exists()


def test_bottlenecks_with_different_activations_are_refused(tiny_dir, tmp_path):
    model, _ = load_base(tiny_dir("llama"))
    folders = {}
    for act in ("relu", "tanh"):
        add_adapter(model, BottleneckConfig(activation=act, init="random"), act)
        folders[act] = save_adapter(model, tmp_path / act, act)
    with pytest.raises(ValueError, match="different activations"):
        api.export(tiny_dir("llama"), tmp_path / "out", adapters=folders, weights="fp32",
                   mode="separate", quiet=True)


def test_fp16_export_ships_fp16_adapter_tensors(exported, tmp_path):
    ex = exported("llama")
    names = ("lora_r4", "ia3")
    out = tmp_path / "separate"
    api.export(ex.base_dir, out, adapters={k: ex.folders[k] for k in names}, weights="fp16",
               mode="separate", quiet=True)
    session, manifest = _session(out / "model.onnx"), _manifest(out)
    for name in names:
        path = out / "adapters" / f"{name}.onnx_adapter"
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        dtypes = {v.numpy().dtype for k, v in params.items() if not k.startswith(GUARD_PREFIX)}
        assert dtypes == {np.dtype("float16")}
        options, adapter = _activate(path, out)
        set_adapter(ex.model, name)
        diff = _diff(_run_ort(session, manifest, options), _run_torch(ex.model))
        print(f"llama fp16 separate, {name}: max |ORT fp16 - torch fp32| = {diff:.2e}")
        assert diff <= 2e-2
    set_adapter(ex.model, None)


def test_lora_everywhere_takes_adapters_trained_later(tiny_dir, tmp_path):
    from edgepeft.base import fingerprint
    from edgepeft.export.packed_adapters import graph_layout, pack_tensors
    from edgepeft.export.separate import adapter_tensors, export_separate

    base = load_base(tiny_dir("llama"))[0]
    out = tmp_path / "separate"
    export_separate(
        base, {}, out, weights="fp32", block_size=32, accuracy_level=4, max_context=None,
        tokenizer=None, base_fingerprint=fingerprint(base), lora_everywhere=True,
    )
    manifest = _manifest(out)
    assert manifest["adapters"] == []
    inputs = optional_graph_inputs(out / "model.onnx")
    assert "model.layers.1.mlp.gate_up_proj.lora_A" in inputs and "lm_head.lora_A" not in inputs
    session = _session(out / "model.onnx")
    assert _diff(_run_ort(session, manifest), _run_torch(base)) <= 1e-4

    torch.manual_seed(1)
    add_adapter(base, LoraConfig(r=3, init="random", target_modules=("up_proj", "o_proj")), "late")
    late = adapter_tensors(base, "late")
    # the graph packs gate/up: the per-module tensors go side by side into its inputs
    tensors = pack_tensors(late.tensors, late.slots, graph_layout(base, inputs))
    assert "model.layers.1.mlp.gate_up_proj.lora_A" in tensors
    written = write_adapter_file(
        out / "adapters", "late", tensors, graph_inputs=inputs,
        base_fingerprint=manifest["base_fingerprint"],
    )
    options, adapter = _activate(written.path, out)
    diff = _diff(_run_ort(session, manifest, options), _run_torch(base))
    print(f"llama LoRA trained after the export, on lora_everywhere inputs: {diff:.1e}")
    assert diff <= 1e-4


def test_exact_nf4_graph_with_adapter_files(exported, tmp_path):
    """weights="nf4" keeps the base's own bitsandbytes codes: separate mode is then exact."""
    ex = exported("llama")
    names = ("lora_r4", "dora")
    out = tmp_path / "separate"
    api.export(ex.base_dir, out, adapters={k: ex.folders[k] for k in names}, weights="nf4",
               mode="separate", quiet=True)
    session, manifest = _session(out / "model.onnx"), _manifest(out)
    for name in names:
        options, adapter = _activate(out / "adapters" / f"{name}.onnx_adapter", out)
        set_adapter(ex.model, name)
        diff = _diff(_run_ort(session, manifest, options), _run_torch(ex.model))
        print(f"llama nf4 (MatMulBnb4) separate, {name}: max |ORT - torch| = {diff:.1e}")
        assert diff <= 1e-4
    set_adapter(ex.model, None)


def test_exact_4bit_without_fused_builder_is_refused(tiny_dir, tmp_path):
    """GPT-2's separate graph is traced (generic): MatMulBnb4 needs the fused builder."""
    model, _ = load_base(tiny_dir("gpt2"))
    add_adapter(model, LoraConfig(r=2), "x")
    folder = save_adapter(model, tmp_path / "x", "x")
    with pytest.raises(ValueError, match="nf4.*needs the fused builder"):
        api.export(tiny_dir("gpt2"), tmp_path / "out", adapters={"x": folder}, weights="nf4",
                   mode="separate", quiet=True)
    assert not (tmp_path / "out").exists()
