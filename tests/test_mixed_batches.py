"""Mixed-adapter batches (runtime/mixed.py): rows with different LoRA adapters in one forward
give each row what that row's adapter gives alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig
from edgepeft.export import api
from edgepeft.runtime import Engine
from edgepeft.runtime.errors import UnknownAdapterError
from edgepeft.runtime.mixed import MixedBatchError, mixed_adapter, stack_adapters

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORAS = {
    # packed q|k|v and gate|up slots, all linear layers
    "wide": LoraConfig(r=8, alpha=16, init="random", target_modules="all-linear"),
    # a few modules, another rank: slots where "wide" alone has columns
    "narrow": LoraConfig(r=2, alpha=8, init="random", target_modules=["q_proj", "v_proj"]),
    # per-module ranks
    "patterned": LoraConfig(
        r=4, alpha=4, init="random", target_modules="all-linear", rank_pattern={"o_proj": 1}
    ),
    "dora": LoraConfig(r=4, alpha=8, init="random", use_dora=True),
}
PROMPTS = [
    "the quick brown fox",
    "SELECT name FROM users WHERE",
    "edge devices run small",
    "translate to french: hello",
    "adapters switch per",
]


@pytest.fixture(scope="module", params=["fp32", "int4"])
def engine(request, tiny_dir, tmp_path_factory):
    base = tiny_dir("llama")
    root = tmp_path_factory.mktemp(f"mixed-{request.param}")
    model, _ = load_base(base, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, config in LORAS.items():
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / name, name)
    set_adapter(model, None)
    out = root / "out"
    api.export(base, out, folders, weights=request.param, mode="separate", quiet=True, verify=False)
    return Engine(out, threads=1)


def _alone(engine, prompt, adapter, n=6):
    return engine.generate(prompt, adapter=adapter, max_new_tokens=n, return_result=True).token_ids


@pytest.mark.parametrize(
    "rows",
    [
        ["wide", "narrow", None, "wide", "patterned"],
        ["narrow", "narrow", "patterned", None, None],
        [None, "wide", "wide", "wide", "wide"],
    ],
)
def test_each_row_gets_its_own_adapter(engine, rows):
    batch = engine.generate(PROMPTS, adapter=rows, max_new_tokens=6, return_result=True)
    for prompt, name, result in zip(PROMPTS, rows, batch, strict=True):
        assert result.adapter == name
        assert result.token_ids == _alone(engine, prompt, name), (prompt, name)


def test_the_adapters_change_the_rows(engine):
    """The check above could pass if every adapter were a no-op: these differ from the base."""
    differs = [
        _alone(engine, p, name, n=8) != _alone(engine, p, None, n=8)
        for p in PROMPTS
        for name in ("wide", "narrow", "patterned")
    ]
    assert sum(differs) >= len(differs) // 2


def test_rows_of_one_prompt_without_padding(engine):
    """The same prompt on every row (no left padding): only the adapters tell rows apart."""
    prompt = [5, 17, 42, 9, 100, 33]
    rows = ["wide", None, "narrow", "patterned"]
    batch = engine.generate([prompt] * 4, adapter=rows, max_new_tokens=6, return_result=True)
    assert len({tuple(r.token_ids) for r in batch}) > 1
    for result, name in zip(batch, rows, strict=True):
        assert result.token_ids == _alone(engine, prompt, name)


def test_refuses_what_cannot_stack_naming_the_adapter(engine):
    with pytest.raises(MixedBatchError, match="'dora'"):
        engine.generate(PROMPTS[:2], adapter=["wide", "dora"], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 names for a batch of 3"):
        engine.generate(PROMPTS[:3], adapter=["wide", "narrow"], max_new_tokens=2)
    # a DoRA adapter still serves a batch of its own
    assert len(engine.generate(PROMPTS[:2], adapter=["dora", "dora"], max_new_tokens=2)) == 2


def test_a_graph_without_row_masks_is_named():
    class Info:
        kind, rank, file, name = "lora", 2, "a.onnx_adapter", "a"

    class Adapter:
        prefix, info, name = None, Info(), "a"
        parameters = {
            "m.lora_A": ort.OrtValue.ortvalue_from_numpy(np.ones((4, 2), np.float32)),
            "m.lora_B": ort.OrtValue.ortvalue_from_numpy(np.ones((2, 4), np.float32)),
        }

    to_ort = ort.OrtValue.ortvalue_from_numpy
    with pytest.raises(MixedBatchError, match="m.lora_row_mask"):
        stack_adapters([Adapter()], {"m.lora_A", "m.lora_B"}, to_ort)
    stack = stack_adapters([Adapter()], {"m.lora_A", "m.lora_B", "m.lora_row_mask"}, to_ort)
    masks = mixed_adapter(stack, ["a", None], to_ort).parameters["m.lora_row_mask"].numpy()
    assert masks.tolist() == [[[1, 1]], [[0, 0]]]


def test_row_orders_share_one_stack(engine):
    for rows in (["wide", "narrow"], ["narrow", "wide"], ["wide", None]):
        engine.generate(PROMPTS[:2], adapter=rows, max_new_tokens=1)
    stacks = engine._stacks  # noqa: SLF001  the cache itself is what is checked
    assert ("narrow", "wide") in stacks and len(stacks) <= 2


def test_unloading_drops_the_stacked_copies(engine):
    engine.generate(PROMPTS[:2], adapter=["wide", "patterned"], max_new_tokens=2)
    info = engine.adapters()["patterned"]
    engine.unload_adapter("patterned")
    try:
        with pytest.raises(UnknownAdapterError, match="patterned"):
            engine.generate(PROMPTS[:2], adapter=["wide", "patterned"], max_new_tokens=2)
    finally:
        engine.load_adapter(info.file, "patterned")
    rows = ["patterned", "wide"]
    batch = engine.generate(PROMPTS[:2], adapter=rows, max_new_tokens=4, return_result=True)
    alone = [_alone(engine, p, n, 4) for p, n in zip(PROMPTS[:2], rows, strict=True)]
    assert [r.token_ids for r in batch] == alone


def test_stream_batch_streams_each_row_to_its_own_limit(engine):
    rows, limits = ["wide", None, "narrow", "wide"], [3, 7, 5, 1]
    items = list(engine.stream_batch(PROMPTS[:4], adapter=rows, max_new_tokens=limits))
    results, steps = items[-1], items[:-1]
    for b, (prompt, name, limit) in enumerate(zip(PROMPTS, rows, limits, strict=False)):
        alone = engine.generate(prompt, adapter=name, max_new_tokens=limit, return_result=True)
        assert results[b].token_ids == alone.token_ids, (name, limit)
        assert results[b].finish_reason == alone.finish_reason
        assert "".join(step[b] for step in steps) == results[b].text == alone.text
    with pytest.raises(ValueError, match="2 limits for a batch of 4"):
        next(engine.stream_batch(PROMPTS[:4], max_new_tokens=[1, 2]))
