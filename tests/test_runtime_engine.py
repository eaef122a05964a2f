"""edgepeft.runtime.Engine: greedy output equals PyTorch (HF generate over the edgepeft model
holding the same adapter), for every switchable adapter kind on a fused graph and for a
generic (torch.onnx) gpt2 graph; sampling, stop strings, streaming, chat, context.

A batch is compared with HF generate on the same left-padded batch, except for prompt
tuning: the engine seeds each row's virtual tokens right before its text (batch-invariant),
so its batch is compared with HF generate on each prompt alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from runtime_fixtures import (
    ADAPTERS,
    PROMPTS,
    bos_ids,
    build_separate,
    shared_separate,
    torch_greedy,
)

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from edgepeft.export import api
from edgepeft.export.kv_prefix import export_kv_prefix
from edgepeft.runtime import ContextLengthError, Engine, UnknownAdapterError

NEW_TOKENS = 12


def reference_batch(model, adapter, rows):
    """What the engine's batch must equal: HF's padded batch, or for prompt tuning (whose
    peft batch shifts the text away from the virtual tokens by the row's pads) each row alone."""
    if adapter == "prompt":
        return [torch_greedy(model, [r], NEW_TOKENS)[0] for r in rows]
    return torch_greedy(model, rows, NEW_TOKENS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def separate(tiny_dir, tmp_path_factory):
    return shared_separate(tiny_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def engine(separate):
    return Engine(separate.out, threads=2)


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_greedy_matches_pytorch_on_the_fused_graph(adapter, separate, engine):
    model, tokenizer = separate.model, separate.tokenizer
    set_adapter(model, adapter)
    try:
        rows = [bos_ids(tokenizer, p) for p in PROMPTS]
        assert [engine.encode(p) for p in PROMPTS] == rows
        # one at a time, then the three as one left-padded batch
        singles = [
            engine.generate(p, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True)
            for p in PROMPTS
        ]
        batch = engine.generate(
            PROMPTS, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True
        )
        want_single = [torch_greedy(model, [r], NEW_TOKENS)[0] for r in rows]
        want_batch = reference_batch(model, adapter, rows)
    finally:
        set_adapter(model, None)
    assert [r.token_ids for r in singles] == want_single
    assert [r.token_ids for r in batch] == want_batch
    for r in singles:
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert r.finish_reason in ("eos", "length") and r.adapter == adapter


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma2"])
def test_greedy_matches_pytorch_on_another_architecture(arch, tiny_dir, tmp_path):
    """gemma2: logit softcap, sliding-window layers, its own head_dim; every adapter kind."""
    other = build_separate(tiny_dir(arch), tmp_path)
    engine = Engine(other.out)
    rows = [bos_ids(other.tokenizer, p) for p in PROMPTS]
    for adapter in [None, *ADAPTERS]:
        set_adapter(other.model, adapter)
        want = reference_batch(other.model, adapter, rows)
        got = engine.generate(
            PROMPTS, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True
        )
        assert [r.token_ids for r in got] == want, adapter


def test_adapters_change_the_output_and_switch_back(engine):
    outputs = {
        name: engine.generate(PROMPTS, adapter=name, max_new_tokens=NEW_TOKENS, return_result=True)
        for name in [None, *ADAPTERS]
    }
    tokens = {k: [r.token_ids for r in v] for k, v in outputs.items()}
    for name in ADAPTERS:
        assert tokens[name] != tokens[None], f"adapter {name} changes nothing"
    # switching back and forth on one engine gives each adapter's own output again
    for name in ["dora", None, "prefix", "lora", "prompt", None]:
        again = engine.generate(
            PROMPTS, adapter=name, max_new_tokens=NEW_TOKENS, return_result=True
        )
        assert [r.token_ids for r in again] == tokens[name]


def test_adapters_report(engine, separate):
    infos = engine.adapters()
    assert list(infos) == list(ADAPTERS)
    assert {k: i.kind for k, i in infos.items()} == {
        "lora": "lora",
        "dora": "dora",
        "ia3": "ia3",
        "bottleneck": "bottleneck",
        "prefix": "kv_prefix",
        "prompt": "kv_prefix",
    }
    assert infos["lora"].rank == 4 and infos["ia3"].rank is None
    assert infos["bottleneck"].rank == 64 // 8  # hidden / reduction_factor
    assert infos["prefix"].num_virtual_tokens == 5 and infos["prompt"].num_virtual_tokens == 4
    for info in infos.values():
        size = (separate.out / "adapters").joinpath(info.file.split("/")[-1]).stat().st_size
        assert 0 < info.bytes <= size


def test_unknown_adapter_lists_the_loaded_ones(engine):
    with pytest.raises(
        UnknownAdapterError, match="no adapter named 'sq1'.*loaded: bottleneck, dora, ia3, lora"
    ):
        engine.generate("hello", adapter="sq1")


# ---------------------------------------------------------------- generic graph


@pytest.fixture(scope="module")
def gpt2_merged(tiny_dir, tmp_path_factory):
    """A generic gpt2 graph with a LoRA merged in, and the PyTorch model holding it."""
    root = tmp_path_factory.mktemp("runtime-gpt2")
    model, tokenizer = load_base(tiny_dir("gpt2"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, init="random"), "lora")
    folder = save_adapter(model, root / "lora", "lora")
    api.export(
        tiny_dir("gpt2"), root / "base", weights="fp32", quant="none", verify=False, quiet=True
    )
    # prefix and prompt tuning as KV prefixes beside the base graph (same base fingerprint)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=3), "prefix")
    export_kv_prefix(model, "prefix", root / "base")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "prompt")
    export_kv_prefix(model, "prompt", root / "base")
    api.export(
        tiny_dir("gpt2"),
        root / "merged",
        adapters={"lora": folder},
        weights="fp32",
        quant="none",
        verify=False,
        quiet=True,
    )
    return model, tokenizer, root


@pytest.mark.parametrize("which", ["base", "merged"])
def test_greedy_matches_pytorch_on_a_generic_graph(which, gpt2_merged):
    model, tokenizer, root = gpt2_merged
    engine = Engine(root / which if which == "base" else root / "merged" / "lora")
    assert engine.manifest.graph == "generic" and engine.adapters() == {}
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    set_adapter(model, "lora" if which == "merged" else None)
    try:
        want = torch_greedy(model, rows, NEW_TOKENS)
        want_one = torch_greedy(model, rows[1:2], NEW_TOKENS)[0]
    finally:
        set_adapter(model, None)
    got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_result=True)
    assert [r.token_ids for r in got] == want
    assert (
        engine.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, return_result=True).token_ids
        == want_one
    )


@pytest.mark.parametrize("adapter", ["prefix", "prompt"])
def test_kv_prefix_on_a_generic_graph_matches_pytorch(adapter, gpt2_merged):
    """Generic graphs take the prefix through the concat path (positions by cumsum(mask)).

    GPT-2's learned absolute positions: a prompt-tuned padded row cannot take peft's batched
    positions from a cache; each row as if alone (the engine's frame) needs no shift."""
    model, tokenizer, root = gpt2_merged
    engine = Engine(root / "base", load_adapters=False)
    file = root / f"base/adapters/{adapter}.kvprefix.safetensors"
    assert engine.load_adapter(file).kind == "kv_prefix"
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # every row but the longest is padded
    set_adapter(model, adapter)
    try:
        want = reference_batch(model, adapter, rows)
    finally:
        set_adapter(model, None)
    got = engine.generate(PROMPTS, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True)
    assert [r.token_ids for r in got] == want
    alone = [engine.generate(p, adapter=adapter, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    assert [r.text for r in got] == alone
    assert want != [
        r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_result=True)
    ]


def test_device_profile_gives_providers_and_threads(separate, caplog):
    import dataclasses
    import logging

    from edgepeft.devices import load_profile

    with caplog.at_level(logging.WARNING, logger="edgepeft.runtime"):
        engine = Engine(separate.out, device="x86-laptop-16gb", load_adapters=False)
    assert engine.providers[-1] == "CPUExecutionProvider"
    missing = [p for p in load_profile("x86-laptop-16gb").providers if p not in engine.providers]
    assert all(p in caplog.text for p in missing)
    profile = dataclasses.replace(
        load_profile("x86-laptop-16gb"), providers=("CPUExecutionProvider",), threads=1
    )
    engine = Engine(separate.out, device=profile, load_adapters=False)
    assert engine.session.get_session_options().intra_op_num_threads == 1


def test_merged_set_points_to_its_graphs(gpt2_merged):
    _, _, root = gpt2_merged
    with pytest.raises(ValueError, match="merged set.*merged/lora"):
        Engine(root / "merged")


# ---------------------------------------------------------------- sampling, stop, stream


def test_sampling_is_seeded_and_greedy_at_zero_temperature(engine):
    kwargs = dict(adapter="lora", max_new_tokens=NEW_TOKENS, return_result=True)
    greedy = engine.generate(PROMPTS[0], **kwargs).token_ids
    a = engine.generate(PROMPTS[0], temperature=1.5, seed=7, **kwargs).token_ids
    b = engine.generate(PROMPTS[0], temperature=1.5, seed=7, **kwargs).token_ids
    c = engine.generate(PROMPTS[0], temperature=1.5, seed=8, **kwargs).token_ids
    assert a == b and a != c and a != greedy
    # top_k=1 leaves only the argmax: greedy whatever the temperature
    assert (
        engine.generate(PROMPTS[0], temperature=3.0, top_k=1, seed=1, **kwargs).token_ids == greedy
    )
    # a tiny top_p keeps only the most likely token too
    assert (
        engine.generate(PROMPTS[0], temperature=3.0, top_p=1e-6, seed=1, **kwargs).token_ids
        == greedy
    )
    penalised = engine.generate(PROMPTS[0], repetition_penalty=5.0, **kwargs).token_ids
    assert len(set(penalised)) > len(set(greedy))  # repeats less than greedy


def test_sampler_matches_hf_repetition_penalty_and_top_p():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from edgepeft.runtime.sampling import _penalised

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    seen = [[3, 3, 7, 11], [0, 49]]
    want = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor(seen[0] + seen[1][:0])[None].repeat(1, 1), torch.from_numpy(logits[:1].copy())
    )
    np.testing.assert_allclose(_penalised(logits[:1], seen[:1], 1.3), want.numpy(), rtol=1e-6)
    # the kept set of top-k then top-p equals HF's warpers'
    from edgepeft.runtime.sampling import Sampler, SamplingConfig

    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=20, top_p=0.7, seed=0))
    scores = TopPLogitsWarper(0.7)(
        None, TopKLogitsWarper(20)(None, torch.from_numpy(logits.copy()))
    )
    allowed = [set(np.flatnonzero(np.isfinite(s.numpy()))) for s in scores]
    drawn = [set() for _ in range(2)]
    for _ in range(300):
        for b, t in enumerate(sampler(logits)):
            drawn[b].add(int(t))
    assert drawn[0] <= allowed[0] and drawn[1] <= allowed[1]
    assert len(drawn[0]) > 1


def test_stop_strings_and_stream(engine):
    full = engine.generate(PROMPTS[2], adapter="prompt", max_new_tokens=NEW_TOKENS)
    assert len(full) > 3
    stop = full[2:4]
    cut = engine.generate(
        PROMPTS[2],
        adapter="prompt",
        max_new_tokens=NEW_TOKENS,
        stop=[stop, "\x00"],
        return_result=True,
    )
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    pieces = list(engine.stream(PROMPTS[2], adapter="prompt", max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == full and len(pieces) > 1
    assert (
        "".join(engine.stream(PROMPTS[2], adapter="prompt", max_new_tokens=NEW_TOKENS, stop=stop))
        == cut.text
    )


def test_stream_holds_back_split_characters(engine):
    """A multi-byte character split over byte-level tokens comes out whole, once."""
    from edgepeft.runtime.chat import IncrementalDecoder

    codec = engine.codec
    text = "é → 日本 ok"
    ids = codec.tokenizer.encode(text, add_special_tokens=False).ids
    decoder = IncrementalDecoder(codec)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------- chat template, context


def test_chat_messages_use_the_exported_template(separate, tmp_path):
    from transformers import AutoTokenizer

    from edgepeft.export.files import record_files

    with pytest.raises(ValueError, match="no chat template"):
        Engine(separate.out, load_adapters=False).generate([{"role": "user", "content": "hi"}])
    folder = tmp_path / "chat"
    shutil.copytree(separate.out, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    record_files(folder)  # changed on purpose: its new size and sha256 recorded
    engine = Engine(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    hf = AutoTokenizer.from_pretrained(folder)
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.codec.render_chat(messages) == want
    got = engine.generate(messages, adapter="lora", max_new_tokens=4, return_result=True)
    assert got.prompt_ids == bos_ids(hf, want)
    assert (
        engine.generate([messages, messages[1:]], adapter="lora", max_new_tokens=4)[0] == got.text
    )


def test_context_limit_errors_or_truncates(separate, tmp_path):
    folder = tmp_path / "short"
    shutil.copytree(separate.out, folder)
    manifest = json.loads((folder / "edgepeft.json").read_text())
    manifest["max_context"] = 16
    (folder / "edgepeft.json").write_text(json.dumps(manifest))
    engine = Engine(folder)
    long_prompt = list(range(3, 3 + 14))  # token ids
    assert len(engine.generate(long_prompt, max_new_tokens=10, return_result=True).token_ids) <= 3
    with pytest.raises(
        ContextLengthError, match=r"12 tokens \(\+5 virtual tokens.*max_context 16.*truncate=True"
    ):
        engine.generate(long_prompt[:12], adapter="prefix")
    result = engine.generate(
        list(range(3, 40)), max_new_tokens=4, truncate=True, return_result=True
    )
    assert result.prompt_ids == list(range(3, 40))[-13:]
    assert result.finish_reason in ("length", "eos") and len(result.token_ids) <= 4
    # the kept tokens alone give the same continuation
    assert engine.generate(list(range(3, 40))[-13:], max_new_tokens=4) == result.text
