"""inspect_model: facts about the base, analytic adapter counts, memory estimate.

Every analytic count in the method table is checked against `count_parameters` on
a real adapter for each method in the registry when the tests run; rows whose method
is not registered yet show up as skipped (with the reason), never silently dropped.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_ARCHS

import edgepeft
from edgepeft.adapters import METHODS
from edgepeft.architectures import ARCHITECTURES
from edgepeft.base import describe_base, load_base
from edgepeft.inspect_model import METHOD_ROWS, estimate_base_bytes, inspect_loaded, inspect_model


@pytest.fixture(scope="module")
def llama_report(tiny_dir):
    return inspect_model(tiny_dir("llama"))


def test_report_describes_tiny_llama(llama_report, tiny_dir):
    r = llama_report
    assert (r.model_type, r.architecture) == ("llama", "LlamaForCausalLM")
    assert (r.hidden_size, r.layers, r.attention_heads, r.kv_heads, r.head_dim, r.vocab_size) == (
        64,
        2,
        4,
        2,
        16,
        384,
    )
    assert not r.tied_embeddings
    model, _ = load_base(tiny_dir("llama"), quant="none")
    assert r.parameters == describe_base(model).total_params == 123_200
    assert r.fingerprint == model.edgepeft_base.fingerprint
    # 7 linear layers per decoder layer, lm_head is not quantizable.
    assert r.quantizable_linears == 14
    groups = {g.suffix: (g.count, g.in_features, g.out_features) for g in r.linear_groups}
    assert groups == {
        "self_attn.q_proj": (2, 64, 64),
        "self_attn.k_proj": (2, 64, 32),
        "self_attn.v_proj": (2, 64, 32),
        "self_attn.o_proj": (2, 64, 64),
        "mlp.gate_proj": (2, 64, 128),
        "mlp.up_proj": (2, 64, 128),
        "mlp.down_proj": (2, 128, 64),
    }
    targets = dict(r.default_targets)
    assert targets["LoRA / DoRA targets"] == "q_proj, v_proj"
    assert targets["IA3 feedforward"] == "down_proj"
    assert targets["bottleneck houlsby"] == "after self_attn.o_proj and mlp.down_proj"


def test_hand_computed_counts_for_tiny_llama(llama_report):
    """Counts worked out by hand from the shapes above, independent of any adapter code."""
    counts = {m.label: m.trainable_params for m in llama_report.methods}
    per_layer_qv = 8 * (64 + 64) + 8 * (64 + 32)  # LoRA r=8 on q (64->64) and v (64->32)
    assert counts["LoRA r=8"] == 2 * per_layer_qv == 3584
    assert counts["LoRA r=64"] == 8 * counts["LoRA r=8"]
    all_linear_in_out = (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64)
    assert counts["LoRA r=4 all-linear"] == 2 * 4 * all_linear_in_out
    assert counts["DoRA r=8"] == 3584 + 2 * (64 + 32)  # + magnitude per output channel
    assert counts["IA3"] == 2 * (32 + 32 + 128)  # k, v outputs; down_proj input
    assert counts["prompt tuning 20 tokens"] == 20 * 64
    assert counts["prefix tuning 20 tokens"] == 20 * 2 * 2 * (
        2 * 16
    )  # tokens*layers*(k,v)*kv width
    assert counts["bottleneck pfeiffer rf=16"] == 2 * (64 * 4 + 4 + 4 * 64 + 64)
    assert counts["bottleneck houlsby rf=16"] == 2 * counts["bottleneck pfeiffer rf=16"]
    assert counts["BitFit"] == 0  # llama has no biases
    assert all(m.file_bytes == 4 * m.trainable_params for m in llama_report.methods)


def test_str_and_to_dict(llama_report):
    text = str(llama_report)
    assert "LlamaForCausalLM" in text
    assert "self_attn.q_proj x 2" in text
    assert "LoRA r=8" in text and "3,584" in text
    assert "nf4 +double-quant" in text
    data = json.loads(json.dumps(llama_report.to_dict()))
    assert data["hidden_size"] == 64
    assert data["default_targets"]["IA3 targets"] == "k_proj, v_proj, down_proj"
    assert {m["label"] for m in data["methods"]} == {label for label, _ in METHOD_ROWS}
    assert data["methods"][0]["config"]["peft_type"] == "LORA"


def test_unknown_architecture_reports_no_defaults(tiny_dir, monkeypatch):
    monkeypatch.delitem(ARCHITECTURES, "llama")
    model, _ = load_base(tiny_dir("llama"), quant="none")
    report = inspect_loaded(model)
    assert report.default_targets == ()
    costs = {m.label: m for m in report.methods}
    assert costs["LoRA r=8"].trainable_params is None
    assert "name target modules" in costs["LoRA r=8"].note
    # Methods that need no target table still get a number.
    assert costs["LoRA r=8 all-linear"].trainable_params == 2 * 8 * 1024
    assert costs["prompt tuning 20 tokens"].trainable_params == 1280
    assert "none:" in str(report)


# ---------------------------------------------------------------- counts vs real adapters


def _row_cases():
    for arch in ALL_ARCHS:
        for label, config in METHOD_ROWS:
            marks = ()
            if config.peft_type not in METHODS:
                marks = pytest.mark.skip(
                    reason=f"{config.peft_type} is not in edgepeft.adapters.METHODS yet"
                )
            yield pytest.param(arch, label, config, id=f"{arch}-{label}", marks=marks)


@pytest.fixture(scope="module")
def reports(tiny_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = inspect_model(tiny_dir(arch))
        return cache[arch]

    return get


@pytest.mark.parametrize(("arch", "label", "config"), list(_row_cases()))
def test_analytic_count_matches_real_adapter(arch, label, config, tiny_dir, reports):
    expected = {m.label: m.trainable_params for m in reports(arch).methods}[label]
    model, _ = load_base(tiny_dir(arch), quant="none")
    if expected == 0:
        # Nothing to train (BitFit on a bias-free model): adding it must fail loudly.
        with pytest.raises(ValueError):
            edgepeft.add_adapter(model, config, "probe")
        return
    torch.manual_seed(0)
    edgepeft.add_adapter(model, config, "probe")
    assert edgepeft.count_parameters(model, "probe") == expected


# ---------------------------------------------------------------- memory estimate


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: tied embeddings, Conv1D, biases
@pytest.mark.parametrize(
    ("quant", "double_quant"), [("nf4", True), ("nf4", False), ("int8", False), ("none", False)]
)
def test_memory_estimate_matches_describe_base(arch, quant, double_quant, tiny_dir):
    reference, _ = load_base(tiny_dir(arch), quant="none")
    loaded, _ = load_base(tiny_dir(arch), quant=quant, double_quant=double_quant)
    estimate = estimate_base_bytes(reference, quant, double_quant)
    actual = describe_base(loaded).weight_bytes
    # Measured: exact (0 bytes apart) on both tiny models; the brief allows 10%.
    assert abs(estimate - actual) <= 0.10 * actual
    # The embeddings dominate these tiny models, so check the quantized part alone too.
    saved_estimate = estimate_base_bytes(reference, "none") - estimate
    saved_actual = describe_base(reference).weight_bytes - actual
    assert abs(saved_estimate - saved_actual) <= 0.10 * max(saved_actual, 1)


def test_memory_table_orders_quant_types(llama_report):
    by_quant = {(e.quant, e.double_quant): e for e in llama_report.memory}
    nf4_dq, nf4 = by_quant["nf4", True], by_quant["nf4", False]
    int8, none = by_quant["int8", False], by_quant["none", False]
    # On this tiny model the nested code table (1 KiB per layer) outweighs the absmax
    # savings of double quantization; on real models double quant is smaller.
    assert nf4.bytes_fp32_compute < int8.bytes_fp32_compute < none.bytes_fp32_compute
    assert nf4_dq.bytes_fp32_compute < int8.bytes_fp32_compute
    assert none.bytes_bf16_compute * 2 == none.bytes_fp32_compute
