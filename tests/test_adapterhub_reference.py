"""edgepeft's parallel adapter, MAM and Pfeiffer bottleneck against AdapterHub's `adapters`.

The reference logits come from tests/fixtures/adapterhub/<case>.safetensors, written by
scripts/make_reference_adapters.py in a venv of its own (`adapters` pins transformers
< 4.58; this venv has 5.x and no `adapters`). Each file holds the tiny base's weights,
AdapterHub's adapter parameters (non-zero), the inputs and the logits. Here the base is
rebuilt from those weights, the edgepeft adapter is added and given AdapterHub's
parameters through an explicit name map, and the logits must agree at every real
(unpadded) position: relative error <= 1e-5, top-1 equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from script_loader import load_script

from edgepeft.adapters.bottleneck import BottleneckLayer
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.parallel import ParallelLayer
from edgepeft.adapters.prompt import ATTRIBUTE, PrefixProjection
from edgepeft.config import BottleneckConfig, MAMConfig, ParallelAdapterConfig, UniPELTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
METADATA_KEY = "adapterhub_reference"
NAME = "ref"
RTOL = 1e-5


def read_case(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = FIXTURES / f"{case}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    return load_file(str(path)), meta


def rebuild_base(tensors: dict[str, torch.Tensor], meta: dict):
    """The producing script's tiny Llama, with its exact weights (eager attention, as there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**meta["tiny_config"], attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    base = {k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")}
    model.load_state_dict(base, strict=True)
    return model


def edgepeft_config(meta: dict):
    """The edgepeft config the fixture names, with AdapterHub's hyper-parameters."""
    spec = dict(meta["edgepeft"])
    kind = spec.pop("type")
    cls = {c.__name__: c for c in (ParallelAdapterConfig, MAMConfig, BottleneckConfig)}.get(kind)
    if cls is None:
        raise ValueError(f"no edgepeft config for fixture type {kind!r}")
    return cls(**spec, init="random")  # random: every parameter exists and is overwritten


# ---------------------------------------------------------------- AdapterHub -> edgepeft names


def bottleneck_pairs(model, wrapper_type) -> list[tuple[str, torch.Tensor]]:
    """AdapterHub's FFN bottleneck, per layer i, `model.layers.i.output_adapters.adapters.ref.
    adapter_down.0` (Linear d -> d/rf; `.1` is the activation) and `.adapter_up`, onto the
    edgepeft layer that wraps `model.layers.i.mlp.down_proj` (adapter_down/up[ref])."""
    pairs = []
    for i, layer in enumerate(model.model.layers):
        wrapped = layer.mlp.down_proj
        assert isinstance(wrapped, wrapper_type), type(wrapped)
        ah = f"model.layers.{i}.output_adapters.adapters.{NAME}"
        for ours, theirs in (
            (wrapped.adapter_down[NAME], "adapter_down.0"),
            (wrapped.adapter_up[NAME], "adapter_up"),
        ):
            pairs += [(f"{ah}.{theirs}.weight", ours.weight), (f"{ah}.{theirs}.bias", ours.bias)]
    return pairs


def prefix_pairs(model) -> list[tuple[str, torch.Tensor]]:
    """AdapterHub's prefix pool (held under layer 0, making every layer's keys/values):
    wte (N, hidden) -> control_trans.0 -> tanh -> control_trans.2 (-> L*2*H*D), onto
    edgepeft's PrefixProjection: embedding (N, kv_heads*head_dim) -> mlp.0 -> tanh -> mlp.2.
    The two flat layouts are both (layer, key|value, head, head_dim)."""
    projection = getattr(model, ATTRIBUTE).projections[NAME]
    assert isinstance(projection, PrefixProjection), type(projection)
    ah = f"model.layers.0.self_attn.prefix_tuning.pool.prefix_tunings.{NAME}.self_prefix"
    pairs = [(f"{ah}.wte.weight", projection.embedding)]
    for theirs, ours in (
        ("control_trans.0", projection.mlp[0]),
        ("control_trans.2", projection.mlp[2]),
    ):
        pairs += [(f"{ah}.{theirs}.weight", ours.weight), (f"{ah}.{theirs}.bias", ours.bias)]
    return pairs


def mapping(model, case: str) -> list[tuple[str, torch.Tensor]]:
    if case == "par_bn":
        return bottleneck_pairs(model, ParallelLayer)
    if case == "mam":
        return prefix_pairs(model) + bottleneck_pairs(model, ParallelLayer)
    if case in ("seq_bn", "seq_bn_mlp_output"):
        return bottleneck_pairs(model, BottleneckLayer)
    raise ValueError(f"no AdapterHub name map for case {case!r}")


def load_adapterhub_parameters(model, case: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy every AdapterHub parameter onto its edgepeft twin; each used once, none left out."""
    theirs = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    pairs = mapping(model, case)
    assert sorted(name for name, _ in pairs) == sorted(theirs), (
        "the name map misses or invents keys"
    )
    ours = {id(p) for p in adapter_parameters(model, NAME)}
    assert {id(p) for _, p in pairs} == ours, "an edgepeft adapter parameter has no AdapterHub twin"
    with torch.no_grad():
        for name, param in pairs:
            assert param.shape == theirs[name].shape, (name, param.shape, theirs[name].shape)
            param.copy_(theirs[name])


def edgepeft_logits(case: str, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """The edgepeft model's logits on the fixture's inputs, at edgepeft's own positions
    (after a prefix of N: N + t, which the fixture's `logits` were made at)."""
    tensors, meta = read_case(case)
    model = rebuild_base(tensors, meta)
    add_adapter(model, edgepeft_config(meta), NAME)
    load_adapterhub_parameters(model, case, tensors)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return out, tensors, meta


def rel_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()  # left padding's positions carry no meaning in either library
    return float((got[real] - want[real]).norm() / want[real].norm())


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("case", ["par_bn", "mam", "seq_bn_mlp_output"])
def test_logits_match_adapterhub(case):
    got, tensors, _ = edgepeft_logits(case)
    want, mask = tensors["logits"], tensors["attention_mask"]
    assert got.shape == want.shape
    assert rel_error(got, want, mask) <= RTOL
    real = mask.bool()
    assert torch.equal(got.argmax(-1)[real], want.argmax(-1)[real])
    # Not a trivial match: the adapter moves AdapterHub's logits well away from the base's.
    assert rel_error(tensors["base_logits"], want, mask) > 0.1


@pytest.mark.parametrize("case", ["par_bn", "mam", "seq_bn", "seq_bn_mlp_output"])
def test_the_rebuilt_base_is_adapterhubs_base(case):
    tensors, meta = read_case(case)
    model = rebuild_base(tensors, meta)
    with torch.no_grad():
        got = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    assert rel_error(got, tensors["base_logits"], tensors["attention_mask"]) <= RTOL


def test_adapterhub_default_pfeiffer_reads_the_residual_stream():
    """A documented difference, pinned: AdapterHub's SeqBnConfig (original_ln_before=True) on
    Llama computes h + (y + h) + f(y + h); edgepeft's Pfeiffer computes h + y + f(y), which
    is AdapterHub's with original_ln_before=False (the parity case above). Same parameters,
    so the default case must differ by far more than rounding; if this ever fails, edgepeft's
    bottleneck changed its input and the docs (and this pin) need the news."""
    got, tensors, meta = edgepeft_logits("seq_bn")
    assert meta["adapterhub_config"]["original_ln_before"] is True
    assert rel_error(got, tensors["logits"], tensors["attention_mask"]) > 1e-2


def test_mam_differs_from_adapterhub_only_by_the_input_positions():
    """AdapterHub runs the input at positions 0..T-1 after its prefix, edgepeft (as peft) at
    N..N+T-1; the prefix keys are not rotated, so q_rot(pos) . k_p depends on pos. Given
    positions that land on AdapterHub's (edgepeft adds N to position_ids it is handed), the
    logits are AdapterHub's default ones; at edgepeft's own positions they are not."""
    tensors, meta = read_case("mam")
    n, (batch, length) = meta["edgepeft"]["num_virtual_tokens"], tensors["input_ids"].shape
    theirs, mask = tensors["logits_adapterhub_positions"], tensors["attention_mask"]
    assert torch.equal(tensors["position_ids"][0], torch.arange(n, n + length))
    shifted = (torch.arange(length) - n).expand(batch, -1)  # + n inside edgepeft: 0..T-1
    got, _, _ = edgepeft_logits("mam", position_ids=shifted)
    assert rel_error(got, theirs, mask) <= RTOL
    assert rel_error(tensors["logits"], theirs, mask) > 1e-2


# ---------------------------------------------------------------- provenance


def fixture_cases() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.safetensors"))


def test_fixtures_name_their_script_and_versions():
    script = load_script("make_reference_adapters")
    assert fixture_cases() == sorted(script.CASE_NAMES)
    for case in fixture_cases():
        tensors, meta = read_case(case)
        assert meta["script"] == "scripts/make_reference_adapters.py" and meta["case"] == case
        versions = meta["versions"]
        assert versions["adapters"] == "1.3.0"
        assert tuple(int(p) for p in versions["transformers"].split(".")[:2]) < (4, 58)
        assert versions["torch"].startswith("2.")
        assert meta["tiny_config"] == script.TINY_CONFIG
        assert (
            meta["tiny_config"]["num_key_value_heads"] == meta["tiny_config"]["num_attention_heads"]
        )
        assert meta["agrees"] or meta["differs"]
        assert tensors["logits"].dtype == torch.float32
        assert (FIXTURES / f"{case}.safetensors").stat().st_size < 1_000_000


def test_unipelt_fixtures_hold_single_tokens_and_gate_logits():
    """For the UniPELT parity test to come: at T = 1 AdapterHub's sequence-mean gates are
    per-token gates, and every gate Linear's output is stored beside its parameters."""
    # Per layer: LoRA's on q_proj and v_proj, the bottleneck's, and (unipelt_t1) the prefix's.
    for case, per_layer in (("unipelt_t1", 4), ("unipelt_lora_bn_t1", 3)):
        tensors, meta = read_case(case)
        batch, length = tensors["input_ids"].shape
        hidden = meta["tiny_config"]["hidden_size"]
        assert length == 1 and batch > 1
        gates = [k.removeprefix("gate_logits.") for k in tensors if k.startswith("gate_logits.")]
        assert len(gates) == per_layer * meta["tiny_config"]["num_hidden_layers"]
        for gate in gates:
            assert tensors[f"gate_logits.{gate}"].shape == (batch, 1, 1)
            assert tensors[f"adapter.{gate}.weight"].shape == (1, hidden)
            assert tensors[f"adapter.{gate}.bias"].shape == (1,)


def unipelt_pairs(model) -> list[tuple[str, torch.Tensor]]:
    """AdapterHub's gated LoRA (`self_attn.{q,v}_proj.loras.ref.{lora_A,lora_B,gate}`) and
    gated bottleneck (`output_adapters.adapters.ref.{adapter_down.0,adapter_up,gate}`) onto
    edgepeft's UniPELT parts of the same layer (lora_A/B/gate, adapter_down/up/gate)."""
    pairs = []
    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "v_proj"):
            ours = getattr(layer.self_attn, proj)
            ah = f"model.layers.{i}.self_attn.{proj}.loras.{NAME}"
            pairs += [
                (f"{ah}.lora_A", ours.lora_A[NAME].weight),
                (f"{ah}.lora_B", ours.lora_B[NAME].weight),
                (f"{ah}.gate.weight", ours.lora_gate[NAME].weight),
                (f"{ah}.gate.bias", ours.lora_gate[NAME].bias),
            ]
        ours = layer.mlp.down_proj
        ah = f"model.layers.{i}.output_adapters.adapters.{NAME}"
        for module, theirs in (
            (ours.adapter_down[NAME], "adapter_down.0"),
            (ours.adapter_up[NAME], "adapter_up"),
            (ours.adapter_gate[NAME], "gate"),
        ):
            pairs += [
                (f"{ah}.{theirs}.weight", module.weight),
                (f"{ah}.{theirs}.bias", module.bias),
            ]
    return pairs


def test_unipelt_gated_lora_and_bottleneck_match_adapterhub_with_the_prefix_shut():
    """AdapterHub's UniPELT without its prefix part, one token per row (its sequence-mean
    gates are then per-token gates, edgepeft's), against edgepeft's UniPELT whose prefix gate
    is shut: log sigmoid(-1e4) = -1e4 leaves the prefix columns exactly no attention weight.
    Gated LoRA with lora_alpha = r: AdapterHub's gated update has no alpha / r factor."""
    tensors, meta = read_case("unipelt_lora_bn_t1")
    model = rebuild_base(tensors, meta)
    spec = meta["edgepeft"]
    config = UniPELTConfig(
        r=spec["lora_r"], lora_alpha=spec["lora_r"], reduction_factor=spec["bottleneck_reduction_factor"],
        num_virtual_tokens=2, prefix_bottleneck=8, init="random",
    )  # fmt: skip
    add_adapter(model, config, NAME)
    theirs = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    pairs = unipelt_pairs(model)
    assert sorted(name for name, _ in pairs) == sorted(theirs), (
        "the name map misses or invents keys"
    )
    with torch.no_grad():
        for name, param in pairs:
            assert param.shape == theirs[name].shape, (name, param.shape, theirs[name].shape)
            param.copy_(theirs[name])
        for layer in model.model.layers:
            layer.self_attn.prefix_gate.gate[NAME].bias.fill_(-1e4)
        ids, mask = tensors["input_ids"], tensors["attention_mask"]
        got = model(input_ids=ids, attention_mask=mask).logits
    want = tensors["logits"]
    assert rel_error(got, want, mask) <= RTOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert rel_error(tensors["base_logits"], want, mask) > 0.1  # the gated parts matter


def test_the_script_refuses_to_run_without_adapters():
    try:
        import adapters  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("AdapterHub's adapters is installed here")
    script = load_script("make_reference_adapters")
    with pytest.raises(SystemExit, match="pip install adapters==1.3.0"):
        script.main(["--out", "/nonexistent"])
