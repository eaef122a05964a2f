"""Separate mode on generic (torch.onnx traced) graphs: GPT-2, and llama forced generic.

    tiny gpt2 base + LoRA r2 (c_attn) / LoRA r8 (all-linear, r3 on mlp.c_proj) / DoRA / IA3
    (c_attn out, mlp.c_proj in) / bottleneck ─► export(mode="separate")  (LoRA r2 added
    afterwards with export_adapter) ─► one traced base graph + .onnx_adapter files
        verify (ORT vs PyTorch with each adapter active)     fp32 <= 1e-4, every top-1 equal
        inputs and files                                      the fused graph's names, shapes,
                                                              A^T / s B^T values (Conv1D too)
        no adapter active                                     == a plain export_generic graph
        edgepeft.runtime.Engine greedy tokens                 == HF generate, per adapter
        int4 (accuracy_level 0)                               == PyTorch holding the graph's
                                                              own dequantized weights, 1e-4
    tiny llama, graph="generic": LoRA (q/k/v unpacked) + IA3 ─► verify passes
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from runtime_fixtures import PROMPTS, bos_ids, torch_greedy

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import fingerprint, load_base
from edgepeft.config import BottleneckConfig, IA3Config, LoraConfig
from edgepeft.export import api
from edgepeft.export.adapter_files import GUARD_PREFIX, optional_graph_inputs
from edgepeft.export.generic import (
    CacheContract,
    export_generic,
    matmul_nbits_weights,
    plain_fp32_copy,
)
from edgepeft.export.graph_info import input_names
from edgepeft.export.separate import export_adapter, export_separate
from edgepeft.export.verify import verify
from edgepeft.runtime import Engine
from edgepeft.tiny import TINY_VOCAB

ADAPTERS = {
    "lora_r8": LoraConfig(
        r=8, alpha=16, init="random", target_modules="all-linear", rank_pattern={"mlp.c_proj": 3}
    ),
    "dora": LoraConfig(r=4, alpha=8, init="random", use_dora=True, target_modules="all-linear"),
    "ia3": IA3Config(init="random"),
    "bottleneck": BottleneckConfig(reduction_factor=8, activation="gelu", init="random"),
}
LATER = ("lora_r2", LoraConfig(r=2, alpha=4, init="random"))
"""Added to the export afterwards (export_adapter): c_attn has LoRA inputs from lora_r8."""
NAMES = [*ADAPTERS, LATER[0]]
NEW_TOKENS = 8


class Exported:
    """bare: the base alone (what verify takes); model: the base holding every adapter."""

    def __init__(self, bare, model, tokenizer, base_dir, folders, out, report):
        self.bare, self.model, self.tokenizer, self.base_dir = bare, model, tokenizer, base_dir
        self.folders, self.out, self.report = folders, out, report


def _adapters(model, configs, root) -> dict:
    torch.manual_seed(0)
    folders = {}
    for name, config in configs.items():
        add_adapter(model, config, name)
        if config.peft_type == "LORA" and config.use_dora:
            with torch.no_grad():  # random init leaves DoRA == LoRA (magnitude = norm): move it
                for _, module in adapter_modules(model):
                    if name in getattr(module, "lora_magnitude_vector", {}):
                        m = module.lora_magnitude_vector[name]
                        m.mul_(1 + 0.2 * torch.randn_like(m))
        folders[name] = save_adapter(model, root / name, name)
    set_adapter(model, None)
    return folders


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt2(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("generic-separate")
    base_dir = tiny_dir("gpt2")
    model, tokenizer = load_base(base_dir, quant="none")
    folders = _adapters(model, {**ADAPTERS, LATER[0]: LATER[1]}, root / "src")
    out = root / "out"
    first = {k: folders[k] for k in ADAPTERS}
    api.export(base_dir, out, first, weights="fp32", mode="separate", quant="none", verify=False,
               quiet=True)
    bare, _ = load_base(base_dir, quant="none")
    export_adapter(folders[LATER[0]], out, LATER[0], model=bare)
    report = verify(out, model=bare)
    return Exported(bare, model, tokenizer, base_dir, folders, out, report)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY_VOCAB, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _prefill(session, ids, mask, run_options=None):
    """Logits (B, T, V) of a prefill over an empty cache, at real positions only."""
    n_layers = (len(session.get_outputs()) - 1) // 2
    head = session.get_inputs()[2].shape  # (batch, n_kv, past, head_dim)
    empty = np.zeros((len(ids), head[1], 0, head[3]), np.float32)
    feed = {"input_ids": ids, "attention_mask": mask}
    feed.update({n: empty for n in input_names(n_layers)[2:]})
    logits = session.run(["logits"], feed, run_options)[0]
    return np.where(mask[..., None] == 1, logits, 0)


def _active(path):
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter  # keep the adapter referenced while options is used


# ---------------------------------------------------------------- gpt2


def test_verify_passes_for_every_adapter(gpt2):
    manifest = json.loads((gpt2.out / "edgepeft.json").read_text())
    assert (manifest["graph"], manifest["mode"], manifest["model_type"]) == ("generic", "separate", "gpt2")
    assert [a["name"] for a in manifest["adapters"]] == NAMES
    report = gpt2.report
    assert [c.name for c in report.graphs] == ["", *NAMES]
    for check in report.graphs:
        print(f"gpt2 generic separate {check.name or 'base'}: prefill "
              f"{check.prefill_max_abs_diff:.1e}, decode {check.decode_max_abs_diff:.1e}")
        assert check.prefill_max_abs_diff <= 1e-4 and check.decode_max_abs_diff <= 1e-4
        assert check.top1_agree == check.top1_total and check.greedy_match == check.greedy_prompts
    assert report.passed


def test_inputs_and_files_follow_the_fused_conventions(gpt2):
    inputs = optional_graph_inputs(gpt2.out / "model.onnx")
    p = "transformer.h.0"
    assert inputs[f"{p}.attn.c_attn.lora_A"].shape == (64, f"{p}.attn.c_attn.lora_rank")
    assert inputs[f"{p}.attn.c_attn.lora_B"].shape == (f"{p}.attn.c_attn.lora_rank", 192)
    assert inputs[f"{p}.attn.c_attn.dora_scale"].shape == (192,)
    assert inputs[f"{p}.attn.c_attn.ia3_scale"].shape == (192,)  # output side
    assert inputs[f"{p}.mlp.c_proj.ia3_scale"].shape == (256,)  # feedforward: input side
    assert inputs[f"{p}.mlp.c_proj.adapter_down.weight"].shape == (64, f"{p}.mlp.c_proj.bottleneck_width")
    assert sum(k.startswith(GUARD_PREFIX) for k in inputs) == 1
    assert not any("lm_head" in k for k in inputs)
    # the file holds A^T (in, r) and s B^T (r, out), whatever the layer's weight layout (Conv1D)
    fmt = ort.AdapterFormat.read_adapter(str(gpt2.out / "adapters" / "lora_r8.onnx_adapter"))
    params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    module = dict(adapter_modules(gpt2.model))[f"{p}.mlp.c_proj"]
    a, b, s = module.lora_A["lora_r8"], module.lora_B["lora_r8"], module.scaling["lora_r8"]
    assert params[f"{p}.mlp.c_proj.lora_A"].shape == (256, 3)  # rank_pattern
    np.testing.assert_allclose(params[f"{p}.mlp.c_proj.lora_A"], a.weight.detach().T.numpy())
    np.testing.assert_allclose(params[f"{p}.mlp.c_proj.lora_B"], (b.weight * s).detach().T.numpy())
    sidecar = json.loads((gpt2.out / "adapters" / "lora_r2.json").read_text())
    assert sidecar["packed"] == {} and sidecar["targets"] == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]


def test_no_adapter_active_equals_the_plain_base_graph(gpt2, tmp_path):
    plain = export_generic(gpt2.bare, tmp_path, "fp32")
    ids, mask = _batch()
    base = _prefill(_session(plain.path), ids, mask)
    session = _session(gpt2.out / "model.onnx")
    assert float(np.abs(_prefill(session, ids, mask) - base).max()) <= 1e-6
    for name in NAMES:  # and every adapter does change the logits
        options, _keep = _active(gpt2.out / "adapters" / f"{name}.onnx_adapter")
        assert float(np.abs(_prefill(session, ids, mask, options) - base).max()) > 1e-3, name


def test_engine_greedy_equals_hf_generate(gpt2):
    engine = Engine(gpt2.out, threads=2)
    rows = [bos_ids(gpt2.tokenizer, p) for p in PROMPTS]
    got, want = {}, {}
    for adapter in [None, *NAMES]:
        set_adapter(gpt2.model, adapter)
        try:
            want[adapter] = torch_greedy(gpt2.model, rows, NEW_TOKENS)
        finally:
            set_adapter(gpt2.model, None)
        result = engine.generate(PROMPTS, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True)
        got[adapter] = [r.token_ids for r in result]
    assert got == want
    assert sum(want[n] != want[None] for n in NAMES) >= 3  # the adapters matter to the tokens


def test_int4_equals_pytorch_with_the_graphs_own_weights(gpt2, tmp_path):
    """accuracy_level 0 (fp32 compute): with the graph's dequantized int4 weights put into
    PyTorch, every branch is exact. (DoRA's scale keeps the trained base's norms by design.)"""
    names = ("lora_r8", "ia3", "bottleneck")
    out = tmp_path / "int4"
    api.export(gpt2.base_dir, out, {k: gpt2.folders[k] for k in names}, weights="int4",
               mode="separate", quant="none", accuracy_level=0, verify=False, quiet=True)
    manifest = json.loads((out / "edgepeft.json").read_text())
    assert manifest["op_counts"]["MatMulNBits"] == 9  # 8 linear layers and lm_head
    weights = matmul_nbits_weights(onnx.load(str(out / "model.onnx")))
    session = _session(out / "model.onnx")
    ids, mask = _batch()
    empty = [torch.zeros(2, 4, 0, 16)] * 4  # (B, n_kv, P, head_dim) per layer, key and value
    for name in names:
        set_adapter(gpt2.model, name)
        try:
            contract = CacheContract(plain_fp32_copy(gpt2.model)).eval()  # a copy: ours to change
        finally:
            set_adapter(gpt2.model, None)
        for key, w in weights.items():  # "model.<path>.weight_t" -> the TransposedLinear
            layer = contract.get_submodule(key.removesuffix(".weight_t"))
            if hasattr(layer, "innermost"):  # adapted (maybe by several kinds): the base inside
                layer = layer.innermost()
            layer.weight_t = torch.nn.Parameter(torch.from_numpy(w), requires_grad=False)
        with torch.no_grad():
            logits = contract(torch.from_numpy(ids), torch.from_numpy(mask), *empty)[0].numpy()
        want = np.where(mask[..., None] == 1, logits, 0)
        options, _keep = _active(out / "adapters" / f"{name}.onnx_adapter")
        diff = float(np.abs(_prefill(session, ids, mask, options) - want).max())
        print(f"gpt2 int4 separate {name} vs PyTorch on the graph's weights: {diff:.1e}")
        assert diff <= 1e-4


def test_refusals_name_the_fix(gpt2, tmp_path):
    with pytest.raises(ValueError, match="nf4.*needs the fused builder.*'gpt2'.*int4"):
        api.export(gpt2.base_dir, tmp_path / "a", {"ia3": gpt2.folders["ia3"]}, weights="nf4",
                   mode="separate", quiet=True, verify=False)
    with pytest.raises(ValueError, match="no fused graph for this model.*gpt2"):
        export_separate(
            gpt2.bare, {}, tmp_path / "b", weights="fp32", block_size=32, accuracy_level=0,
            max_context=None, tokenizer=None, base_fingerprint="0" * 16, graph="fused",
        )


# ---------------------------------------------------------------- llama, forced generic


def test_llama_forced_through_the_generic_graph(tiny_dir, tmp_path):
    model, tokenizer = load_base(tiny_dir("llama"), quant="none")
    configs = {
        "lora": LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear"),
        "ia3": IA3Config(init="random"),  # down_proj: input side
    }
    folders = _adapters(model, configs, tmp_path / "src")
    bare, _ = load_base(tiny_dir("llama"), quant="none")
    out = tmp_path / "out"
    out.mkdir()
    export_separate(
        bare, folders, out, weights="fp32", block_size=32, accuracy_level=0, max_context=None,
        tokenizer=tokenizer, base_fingerprint=fingerprint(bare), graph="generic",
    )
    manifest = json.loads((out / "edgepeft.json").read_text())
    assert manifest["graph"] == "generic" and manifest["op_counts"].get("GroupQueryAttention") is None
    inputs = optional_graph_inputs(out / "model.onnx")
    assert "model.layers.0.self_attn.q_proj.lora_A" in inputs  # one slot per module: no packing
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in inputs)
    assert inputs["model.layers.0.mlp.down_proj.ia3_scale"].shape == (128,)
    report = verify(out, model=bare)
    for check in report.graphs:
        print(f"llama generic separate {check.name or 'base'}: {check.prefill_max_abs_diff:.1e}")
    assert report.passed and [c.name for c in report.graphs] == ["", "lora", "ia3"]
