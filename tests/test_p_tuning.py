"""P-tuning: peft's encoders and folders both ways, NF4 training, run configs, export, runtime.

encoder math    our MLP / LSTM encoder with peft's weights == peft's logits (training form)
folders         edgepeft -> peft and peft (one trained step) -> edgepeft, MLP and LSTM
saved           only "prompt_embeddings" = the encoder's output (without dropout)
NF4 base        gradients reach the encoder only; edgepeft.train and `edgepeft train`
                lower the loss and train (and checkpoint) exactly the encoder's parameters
device          fp32 separate export passes verify; the Engine switches it per request
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from runtime_fixtures import bos_ids, torch_greedy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from edgepeft import (
    LoraConfig,
    TrainConfig,
    adapter_parameters,
    add_adapter,
    count_parameters,
    load_adapter,
    load_base,
    save_adapter,
    set_adapter,
    train,
)
from edgepeft.adapters import METHODS, peft_types
from edgepeft.adapters.p_tuning import PromptEncoder, encoder_parameter_count
from edgepeft.adapters.prompt import ATTRIBUTE
from edgepeft.cli import main
from edgepeft.config import PromptEncoderConfig, config_from_dict, config_to_dict
from edgepeft.inspect_model import adapter_cost
from edgepeft.merge import MergeError, merge
from edgepeft.train.checkpoint import CHECKPOINT_DIR, TENSORS_FILE
from edgepeft.train.report import read_metrics
from edgepeft.train.run_config import from_dict

peft = pytest.importorskip("peft")

N = 4
HIDDEN = 24
TOL = 1e-5
ENCODERS = ["MLP", "LSTM"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about position ids on tiny models
        yield


@pytest.fixture
def mask():
    m = torch.ones(2, 9, dtype=torch.long)
    m[0, :3] = 0  # left padding in the first row
    return m


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _config(kind: str, **kw) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        num_virtual_tokens=N, encoder_reparameterization_type=kind, encoder_hidden_size=HIDDEN, **kw
    )


def _peft_config(kind: str, **kw):
    return peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=HIDDEN,
        **kw,
    )


def _encoder(model, name: str) -> PromptEncoder:
    return model.get_submodule(ATTRIBUTE).projections[name]


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# ---------------------------------------------------------------- the encoders against peft's


@pytest.mark.parametrize("kind", ENCODERS)
def test_encoder_with_peft_weights_gives_peft_logits(tiny_dir, input_ids, mask, kind):
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir("llama")), _config(kind), "a")
    theirs = peft.get_peft_model(_hf(tiny_dir("llama")), _peft_config(kind)).eval()
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()[0]
    assert count_parameters(ours) == encoder_parameter_count(_config(kind), 64)

    # peft's weights into our encoder: same layer names below the adapter, embedding aside.
    state = theirs.prompt_encoder["default"].state_dict()
    state["embedding"] = state.pop("embedding.weight")
    _encoder(ours, "a").load_state_dict(state)
    with torch.no_grad():
        base = _hf(tiny_dir("llama"))(input_ids).logits
        for kw in ({}, {"attention_mask": mask}):
            got = ours(input_ids, **kw).logits
            want = theirs(input_ids=input_ids, **kw).logits[:, N:]  # peft keeps N more
            assert got.shape == (2, 9, 384) and _rel(got, want) <= TOL
        assert _rel(ours(input_ids).logits, base) > 1e-2  # the adapter does something
        got_loss = ours(input_ids, attention_mask=mask, labels=input_ids).loss
        want_loss = theirs(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
    assert abs(got_loss.item() - want_loss.item()) <= TOL * abs(want_loss.item())


@pytest.mark.parametrize("kind", ENCODERS)
def test_edgepeft_folder_loads_in_peft(tiny_dir, input_ids, mask, tmp_path, kind):
    torch.manual_seed(0)
    ours = add_adapter(_hf(tiny_dir("llama")), _config(kind), "a")
    save_adapter(ours, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    with torch.no_grad():
        # (N, 64); LSTM kernels round differently with and without autograd, hence not equal
        assert _rel(saved["prompt_embeddings"], _encoder(ours, "a")()) <= 1e-6

    theirs = peft.PeftModel.from_pretrained(_hf(tiny_dir("llama")), tmp_path / "a").eval()
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            want = theirs(input_ids=input_ids, **kw).logits[:, N:]
            assert _rel(ours(input_ids, **kw).logits, want) <= TOL


@pytest.mark.parametrize("kind", ENCODERS)
def test_peft_folder_loads_in_edgepeft_after_a_training_step(
    tiny_dir, input_ids, mask, tmp_path, kind
):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_hf(tiny_dir("llama")), _peft_config(kind))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.5)
    theirs.train()
    theirs(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(_hf(tiny_dir("llama")), tmp_path / "p", "p")
    module = ours.get_submodule(ATTRIBUTE)
    assert "p" not in module.projections  # loaded: the table, as peft loads it
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            want = theirs(input_ids=input_ids, **kw).logits[:, N:]  # peft still runs its encoder
            assert _rel(ours(input_ids, **kw).logits, want) <= TOL


def test_adapter_config_json_is_peft_s(tiny_dir, tmp_path):
    """Same keys and values as the file peft writes for the same adapter (but peft's own
    bookkeeping: its version, auto_mapping)."""
    ours = add_adapter(_hf(tiny_dir("llama")), _config("LSTM", encoder_num_layers=1), "a")
    save_adapter(ours, tmp_path / "a")
    theirs = peft.get_peft_model(_hf(tiny_dir("llama")), _peft_config("LSTM", encoder_num_layers=1))
    theirs.save_pretrained(tmp_path / "p")
    a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    p = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    for key in ("peft_version", "auto_mapping"):
        p.pop(key)
    assert a == p
    assert a["peft_type"] == "P_TUNING" and a["encoder_num_layers"] == 1 and a["token_dim"] == 64

    loaded = load_adapter(_hf(tiny_dir("llama")), tmp_path / "p", "p")
    config = loaded.edgepeft_adapters["p"]
    assert config == _config(
        "LSTM", encoder_num_layers=1, token_dim=64, num_layers=2, num_attention_heads=4
    )
    assert config_from_dict(config_to_dict(config)) == config
    default = add_adapter(_hf(tiny_dir("llama")), PromptEncoderConfig(), "d").edgepeft_adapters["d"]
    assert (default.encoder_hidden_size, default.num_virtual_tokens) == (64, 20)  # peft's default


def test_saving_while_training_stores_the_encoder_without_dropout(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = add_adapter(_hf(tiny_dir("llama")), _config("LSTM", encoder_dropout=0.5), "a")
    encoder = _encoder(model, "a")
    model.train()
    with torch.no_grad():
        noisy = encoder()
        encoder.eval()
        clean = encoder()
        encoder.train()
    assert _rel(noisy, clean) > 0.05  # dropout is on while training
    save_adapter(model, tmp_path / "a")
    assert encoder.training  # and stays on
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"]
    assert _rel(saved, clean) <= 1e-6  # not bit-equal: LSTM kernels differ under autograd


def test_bad_configs_are_refused_with_the_field(tiny_dir):
    model = _hf(tiny_dir("llama"))
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be one of"):
        add_adapter(model, PromptEncoderConfig(encoder_reparameterization_type="GRU"), "a")
    with pytest.raises(ValueError, match="num_virtual_tokens must be at least 1"):
        add_adapter(model, PromptEncoderConfig(num_virtual_tokens=0), "a")
    with pytest.raises(ValueError, match="token_dim=32, but this model needs token_dim=64"):
        add_adapter(model, PromptEncoderConfig(token_dim=32), "a")
    assert not hasattr(model, ATTRIBUTE)


def test_cannot_be_merged_and_ships_as_a_kv_prefix(tiny_dir):
    model = add_adapter(_hf(tiny_dir("llama")), _config("MLP"), "a")
    with pytest.raises(MergeError, match="cannot be merged.*Keep the adapter separate"):
        merge(model, "a")
    assert "P_TUNING" in peft_types(separate_file="kv_prefix")
    assert not METHODS["P_TUNING"].mergeable


# ---------------------------------------------------------------- training over NF4


@pytest.mark.parametrize("kind", ENCODERS)
def test_gradients_reach_only_the_encoder_over_nf4(tiny_dir, input_ids, kind):
    model, _ = load_base(tiny_dir("llama"), quant="nf4", device="cpu")
    add_adapter(model, _config(kind), "a")
    trained = {id(p) for p in adapter_parameters(model)}
    assert trained == {id(p) for p in _encoder(model, "a").parameters()}
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


ROWS = [{"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."}] * 16
FAST = dict(batch_size=4, max_seq_len=32, val_fraction=0.0, quiet=True, scheduler="constant")


def test_train_lowers_the_loss_moving_only_the_encoder(tiny_dir, tmp_path):
    model, tok = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, _config("MLP"), "a")
    encoder = _encoder(model, "a")
    before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, tok, ROWS, TrainConfig(max_steps=6, lr=1e-2, **FAST), tmp_path)
    losses = result.train_losses
    assert losses[-1] < losses[0] - 0.02, losses
    assert result.trainable_params == encoder_parameter_count(_config("MLP"), 64)
    after = encoder.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "an encoder tensor froze"
    assert all(torch.equal(others[n], p) for n, p in model.named_parameters() if n in others)
    # The optimizer held the encoder's tensors: they, and their Adam moments, are checkpointed.
    saved = load_file(tmp_path / CHECKPOINT_DIR / TENSORS_FILE)
    held = sorted(k.removeprefix("adapter/") for k in saved if k.startswith("adapter/"))
    assert held == sorted(f"{ATTRIBUTE}.projections.a.{k}" for k in before)
    moments = [k for k in saved if k.startswith("optimizer/state/") and k.endswith("exp_avg")]
    assert len(moments) == len(before)
    last = load_file(result.last_adapter_dir / "adapter_model.safetensors")
    assert list(last) == ["prompt_embeddings"] and last["prompt_embeddings"].shape == (N, 64)


RUN_TOML = """
model = "{model}"
quant = "nf4"
adapter = "pt"
output_dir = "{out}"
[method]
type = "p_tuning"
num_virtual_tokens = 4
encoder_reparameterization_type = "LSTM"
encoder_hidden_size = 16
[data]
train = "{data}"
[train]
max_steps = 5
batch_size = 4
lr = 1e-2
max_seq_len = 32
val_fraction = 0.0
scheduler = "constant"
"""


def test_run_config_method_p_tuning_trains(tiny_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    toml = RUN_TOML.format(model=tiny_dir("llama"), out=tmp_path / "out", data=data)
    (tmp_path / "run.toml").write_text(toml)
    assert main(["train", str(tmp_path / "run.toml"), "--quiet"]) == 0, capsys.readouterr().err
    losses = [
        row["loss"] for row in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in row
    ]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    document = json.loads((tmp_path / "out" / "last" / "adapter_config.json").read_text())
    assert (
        document["peft_type"] == "P_TUNING"
        and document["encoder_reparameterization_type"] == "LSTM"
    )
    method = from_dict({"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
                        "method": {"type": "p_tuning", "encoder_dropout": 0}}, "test").method  # fmt: skip
    assert method == PromptEncoderConfig(encoder_dropout=0)


@pytest.mark.parametrize("kind", ENCODERS)
def test_inspect_cost_counts_the_encoder(tiny_dir, kind):
    model, _ = load_base(tiny_dir("qwen2"), quant="none")
    config = PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind,
                                 encoder_num_layers=3 if kind == "LSTM" else 2)  # fmt: skip
    expected = adapter_cost(model, config)
    add_adapter(model, config, "a")
    assert count_parameters(model, "a") == expected


# ---------------------------------------------------------------- on the device


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """(fp32 reference model holding "pt" (LSTM encoder) and "sql", their separate export)."""
    from edgepeft.export.api import export

    root = tmp_path_factory.mktemp("ptuning-export")
    folder = tiny_dir("llama")
    model, tokenizer = load_base(folder, quant="none")
    torch.manual_seed(1)
    add_adapter(model, _config("LSTM"), "pt")
    add_adapter(model, LoraConfig(r=4, init="random"), "sql")
    folders = {name: save_adapter(model, root / name, name) for name in ("pt", "sql")}
    out = root / "out"
    export(folder, out, adapters=folders, weights="fp32", mode="separate", verify=False, quiet=True)
    return model, tokenizer, out


def test_separate_export_passes_verify(exported):
    from edgepeft.export.manifest import read_manifest
    from edgepeft.export.verify import verify

    _, _, out = exported
    entries = {e.name: e for e in read_manifest(out).adapters}
    assert (entries["pt"].kind, entries["pt"].peft_type, entries["pt"].num_virtual_tokens) == (
        "kv_prefix",
        "P_TUNING",
        N,
    )
    report = verify(out)
    assert report.passed and report.skipped == {}
    checks = {g.name: g for g in report.graphs}
    assert checks["pt"].adapter_file.endswith("pt.kvprefix.safetensors")
    assert checks["pt"].max_abs_diff <= 1e-4 and checks["pt"].top1_agree == checks["pt"].top1_total


def test_engine_switches_p_tuning_per_request(exported):
    from edgepeft.runtime import Engine

    model, tokenizer, out = exported
    engine = Engine(out, threads=1)
    prompts = ["the quick brown fox", "SELECT name FROM users WHERE"]
    rows = [bos_ids(tokenizer, p) for p in prompts]
    want = {}
    for name in (None, "pt", "sql"):  # the trained form (encoder) is the reference
        set_adapter(model, name)
        want[name] = [torch_greedy(model, [r], 8)[0] for r in rows]
    set_adapter(model, None)
    assert want["pt"] != want[None] and want["pt"] != want["sql"]
    for name in (None, "pt", "sql", "pt", None):
        got = [
            engine.generate(p, adapter=name, max_new_tokens=8, return_result=True) for p in prompts
        ]
        assert [r.token_ids for r in got] == want[name], name
