"""QA-LoRA over an int4 base (adapters/qalora.py): pooled LoRA that merges into the zero points.

one layer   the adapted forward == HF peft's QALoraLinearVariant.forward (plain base) and
            == (x/s) @ (dequant + ΔW)^T over a channel-scaled Int4Linear; delta_weight is
            that ΔW; with_weight folds it into float zero points (same codes and scales);
            a plain LoRA update is refused there
refusals    group != the base's block size, an 8-bit layer, in % group, DoRA together
the model   training over quant="int4" lowers the loss, only lora_* get gradients, the codes
            never move; the folder keeps peft's field names and loads back to equal logits
merged      merge(quant="int4") keeps Int4Linear; export(mode="merged") is a plain int4 graph
            (no adapter nodes, the base-alone node count, the base's codes and scales) whose
            onnxruntime logits at accuracy_level 1 equal the trained model's (<= 1e-4 rel.),
            judged "int4 exact"; separate mode is refused with the reason
"""

from __future__ import annotations

import collections
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgepeft.adapters import qalora
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.lora import LoraLayer
from edgepeft.adapters.peft_format import load_adapter, save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig
from edgepeft.export.api import export
from edgepeft.export.manifest import read_manifest
from edgepeft.fold import MergeError
from edgepeft.int4_base import Int4Linear, int4_layers
from edgepeft.merge import merge
from edgepeft.tiny import TINY_VOCAB

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_TOL = 1e-4
TARGETS = ("o_proj", "gate_proj", "up_proj", "down_proj")
"""The tiny llama's 4-bit layers (q|k|v are stored int8 beside the mixed-precision v_proj)."""


def _config(**kw) -> LoraConfig:
    return LoraConfig(
        **{"r": 4, "alpha": 8, "use_qalora": True, "qalora_group_size": 32, "init": "random", **kw}
    )


def _int4_layer(bits: int = 4, scaled: bool = True, seed: int = 0) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=g) * 0.1
    s = np.exp(np.random.default_rng(seed).normal(0, 0.5, 96)).astype(np.float32)
    return Int4Linear.quantize(w, torch.randn(48, generator=g) * 0.1, bits, s if scaled else None)


def _wrapped(base: nn.Module, config: LoraConfig, seed: int = 0) -> LoraLayer:
    torch.manual_seed(seed)
    layer = LoraLayer(base)
    layer.add("task", config.r, config.alpha, config)
    layer.set_active("task")
    with torch.no_grad():
        layer.lora_B["task"].weight.normal_(0, 0.1)
    return layer


def test_forward_matches_peft_qalora_variant_on_a_plain_layer():
    from peft.tuners.lora.variants import QALoraLinearVariant

    base = nn.Linear(96, 48)
    layer = _wrapped(base, _config())
    assert layer.lora_A["task"].weight.shape == (4, 96 // 32)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1))
    peft_module = SimpleNamespace(  # the state peft's variant reads from its Linear
        lora_A=layer.lora_A, lora_B=layer.lora_B, lora_dropout=layer.lora_dropout,
        scaling=layer.scaling, qalora_group_size={"task": 32}, in_features=96, training=False,
    )  # fmt: skip
    with torch.no_grad():
        want = QALoraLinearVariant.forward(peft_module, "task", x, base(x))
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_int4_layer_update_is_constant_per_block_and_folds_into_zero_points():
    base = _int4_layer()
    layer = _wrapped(base, _config())
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = layer(x)
        delta = layer.delta_weight("task")  # (out, in) on x
        # pooled over the codes' input x / s, one group per quantization block
        u = x * (1 / base.input_scale)
        pooled = u.reshape(3, 3, 32).mean(-1) * 3
        a, b = layer.lora_A["task"].weight, layer.lora_B["task"].weight
        want = base(x) + pooled @ a.T @ b.T * layer.scaling["task"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x @ (base.weight + delta).T + base.bias, want, rtol=1e-5, atol=1e-5)
    in_codes = (delta * base.input_scale).reshape(48, 3, 32)  # ΔW in the codes' space
    assert torch.allclose(in_codes, in_codes[..., :1].expand_as(in_codes), atol=1e-7)

    folded = base.with_weight(base.weight + delta)
    assert torch.equal(folded.codes, base.codes) and torch.equal(folded.scales, base.scales)
    assert folded.zero_points.dtype == torch.float32 and folded.zero_points.shape == (48, 3)
    with torch.no_grad():
        merged = folded(x)
    assert (merged - want).abs().max() <= REL_TOL * want.abs().max()

    plain = _wrapped(base, LoraConfig(r=4, alpha=8, init="random"))
    with pytest.raises(ValueError, match="varies within blocks of 32"):
        base.with_weight(base.weight + plain.delta_weight("task"))


def test_refusals_name_the_layer_and_what_to_do(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    with pytest.raises(ValueError, match=r"qalora_group_size 16 is not the int4 base's block"):
        add_adapter(model, _config(qalora_group_size=16, target_modules=("o_proj",)), "g16")
    with pytest.raises(ValueError, match=r"q_proj .*8-bit without zero points.*target o_proj"):
        add_adapter(model, _config(target_modules=("q_proj",)), "int8")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing wrapped
    with pytest.raises(ValueError, match="layer.x: in_features 40 is not a multiple of"):
        qalora.check(nn.Linear(40, 8), 32, "layer.x")
    with pytest.raises(ValueError, match="use_dora"):
        _config(use_dora=True)
    with pytest.raises(ValueError, match="positive integer"):
        _config(qalora_group_size=0)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """(the int4 base + a QA-LoRA trained a few steps, the adapter folder, losses, base copy)."""
    model, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    before = {n: t.clone() for n, t in [*model.named_buffers(), *model.named_parameters()]}
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=16, use_qalora=True, qalora_group_size=32,
                                  target_modules=TARGETS), "task")  # fmt: skip
    trainable = adapter_parameters(model, "task")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    ids = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert grads and all("lora_" in n for n in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    for n, t in [*model.named_buffers(), *model.named_parameters()]:
        if "lora_" not in n:
            assert torch.equal(t, before[n.replace(".base_layer", "")]), n  # codes never move
    folder = save_adapter(model, tmp_path_factory.mktemp("qalora") / "task", "task")
    return model, folder, losses


def test_training_lowers_the_loss_and_the_folder_round_trips(trained, tiny_dir):
    model, folder, losses = trained
    assert losses[-1] < losses[0] - 0.05, losses
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == 32  # peft's names
    fresh, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    load_adapter(fresh, folder, name="task")
    layer = fresh.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.lora_A["task"].weight.shape == (4, layer.innermost().in_features // 32)
    ids = torch.randint(3, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def _graph(folder):
    return onnx.load(str(folder / "model.onnx"))


def _ort_logits(folder, ids: np.ndarray) -> np.ndarray:
    manifest = read_manifest(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros(
                (ids.shape[0], manifest.num_kv_heads, 0, manifest.head_dim), np.float32
            )
    return session.run(["logits"], feed)[0]


def test_merge_int4_keeps_the_codes(trained):
    model, _, _ = trained
    merged, report = merge(model, "task", quant="int4")
    layers = dict(int4_layers(merged))
    assert len(layers) == len(int4_layers(model))  # every decoder linear still Int4Linear
    down = layers["model.layers.0.mlp.down_proj"]
    original = model.get_submodule("model.layers.0.mlp.down_proj").innermost()
    assert torch.equal(down.codes, original.codes) and down.zero_points.is_floating_point()
    assert report.max_rel_weight_error < 1e-5
    ids = torch.randint(3, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = model(ids).logits, merged(ids).logits
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # a copy was merged


def test_merged_export_is_a_plain_int4_graph_equal_to_the_trained_model(
    trained, tiny_dir, tmp_path
):
    model, folder, _ = trained
    base_alone = export(tiny_dir("llama"), tmp_path / "base", quant="int4", weights="int4",
                        accuracy_level=1, verify=False, quiet=True)  # fmt: skip
    result = export(tiny_dir("llama"), tmp_path / "merged", {"task": folder}, weights="int4",
                    mode="merged", accuracy_level=1, quiet=True)  # fmt: skip
    out = tmp_path / "merged" / "task"
    graph, alone = _graph(out), _graph(base_alone.out_dir)
    # The base's nodes, plus per adapted projection the zero points' fractional part as a
    # block-sum correction (ReduceSum + MatMul): no LoRA input, no float zero points, which
    # onnxruntime's CPU MatMulNBits would dequantize on every call (int4_codes.py).
    added = collections.Counter(n.op_type for n in graph.graph.node)
    added.subtract(n.op_type for n in alone.graph.node)
    corrected = {n.name.split("/")[0] for n in graph.graph.node if "/zero_shift/" in n.name}
    assert corrected and +added == {
        op: len(corrected) for op in ("Reshape", "ReduceSum", "MatMul", "Add")
    }
    assert not any("lora" in i.name for i in graph.graph.input)
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    base = {t.name: numpy_helper.to_array(t) for t in alone.graph.initializer}
    assert not any(n.endswith(".zero_points") and v.dtype != np.uint8 for n, v in stored.items())
    down = "model.layers.0.mlp.down_proj"
    assert down in corrected
    np.testing.assert_array_equal(stored[f"{down}.weight.q4"], base[f"{down}.weight.q4"])
    np.testing.assert_array_equal(stored[f"{down}.weight.scales"], base[f"{down}.weight.scales"])
    assert np.abs(stored[f"{down}.weight.zero_shift"]).max() > 0  # the update lives here
    manifest = read_manifest(out)
    assert manifest.quantization["requantized"] == []
    (check,) = result.verify.graphs
    assert check.criteria == "int4 exact" and check.passed, result.verify

    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, (2, 11)).astype(np.int64)
    got = _ort_logits(out, ids)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()  # the trained, unmerged model
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()


def test_separate_mode_is_refused_with_the_reason(trained, tiny_dir, tmp_path):
    _, folder, _ = trained
    with pytest.raises(ValueError, match=r"QA-LoRA .*separate mode .*mode='merged'"):
        export(tiny_dir("llama"), tmp_path / "sep", {"task": folder}, weights="int4",
               mode="separate", verify=False, quiet=True)  # fmt: skip
    assert not (tmp_path / "sep").exists()


def test_a_plain_lora_does_not_merge_into_int4_codes(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="int4", device="cpu")
    add_adapter(model, LoraConfig(r=4, target_modules=("o_proj",), init="random"), "plain")
    with pytest.raises(MergeError, match=r"varies within blocks.*use_qalora=True"):
        merge(model, "plain", quant="int4")
