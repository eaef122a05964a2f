"""A prompt-tuned prompt's greedy answer does not depend on the prompts that share its batch.

The shipped demo base (a trained 0.5M llama: its answers depend on positions, which a
random tiny model's hardly do) + a prompt-tuning adapter, fp32 separate export; 8 prompts
of different lengths, one left-padded batch:
    device runtime (fused graph)     batched == each prompt alone == verify's
                                     reference_tokens (PyTorch per prompt, batch 1)
    edgepeft.evaluate (PyTorch)      batch_size 8 == batch_size 1 == HF generate per prompt
The padded HF batch (peft's semantics: pads between the virtual tokens and the text)
answers differently for these prompts, so the tests see the bug they guard against.
Generic graphs (gpt2) are checked in test_runtime_engine.py, the kv_prefix position
frames in test_export_kv_prefix.py.
"""

from __future__ import annotations

import pytest
import torch
from runtime_fixtures import bos_ids, torch_greedy

from edgepeft.adapters.inject import active_adapter, add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import PromptTuningConfig
from edgepeft.demo.paths import BASE_DIR
from edgepeft.export import api
from edgepeft.export.verify import REFERENCE_PER_PROMPT, check_graph
from edgepeft.runtime import Engine
from edgepeft.train.evaluate import _batches
from edgepeft.train.evaluate import evaluate as torch_evaluate

NEW_TOKENS = 10
PROMPTS = [
    "garden ->",
    "upper: stone ->",
    "reverse: apple ->",
    "hello ->",
    "a ->",
    "upper: blue sky ->",
    "mountain ->",
    "river ->",  # as long as "hello ->": an unpadded batch of two in evaluate
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo base holding prompt adapter "soft", its tokenizer, its fp32 separate export)."""
    root = tmp_path_factory.mktemp("prompt-batch")
    model, tokenizer = load_base(BASE_DIR, quant="none")
    torch.manual_seed(0)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=4, init="vocab"), "soft")
    folder = save_adapter(model, root / "soft", "soft")
    set_adapter(model, None)
    out = root / "out"
    api.export(BASE_DIR, out, adapters={"soft": folder}, weights="fp32", mode="separate",
               quant="none", verify=False, quiet=True)  # fmt: skip
    return model, tokenizer, out


@pytest.fixture(scope="module")
def alone(demo):
    """HF generate with the adapter, each prompt alone (batch 1, no padding), and the same
    prompts as one left-padded HF batch."""
    model, tokenizer, _ = demo
    rows = [bos_ids(tokenizer, p) for p in PROMPTS]
    set_adapter(model, "soft")
    try:
        singles = [torch_greedy(model, [r], NEW_TOKENS)[0] for r in rows]
        padded = torch_greedy(model, rows, NEW_TOKENS)
    finally:
        set_adapter(model, None)
    return rows, singles, padded


def test_the_prompts_expose_the_padding_shift(alone):
    rows, singles, padded = alone
    assert len({len(r) for r in rows}) >= 6  # mostly different lengths: rows carry pads
    assert padded != singles  # peft's padded batch answers differently: the bug is visible


def test_runtime_batch_equals_each_prompt_alone_and_verify_reference(demo, alone):
    model, _, out = demo
    rows, singles, _ = alone
    engine = Engine(out, threads=2)
    assert engine.manifest.graph == "fused"
    batch = engine.generate(rows, adapter="soft", max_new_tokens=NEW_TOKENS, return_result=True)
    one_by_one = [
        engine.generate(r, adapter="soft", max_new_tokens=NEW_TOKENS, return_result=True)
        for r in rows
    ]
    assert [r.token_ids for r in batch] == [r.token_ids for r in one_by_one] == singles

    # verify's reference_tokens (PyTorch, each prompt alone, no stop token) are what a
    # runtime must reproduce; its batched logit check still uses peft's frame and passes.
    set_adapter(model, "soft")
    try:
        check = check_graph(
            out,
            model,
            name="soft",
            prompts=rows,
            max_new_tokens=NEW_TOKENS,
            adapter_file=out / "adapters" / "soft.kvprefix.safetensors",
        )
    finally:
        set_adapter(model, None)
    assert check.reference_tokens_mode == REFERENCE_PER_PROMPT and check.batched
    assert check.passed and check.row_greedy_match == len(rows)
    eos = engine.eos_token_ids
    for got, want in zip(batch, check.reference_tokens, strict=True):
        stop = next((k for k, t in enumerate(want) if t in eos), len(want))
        assert tuple(got.token_ids) == want[:stop]


def test_evaluate_batches_prompt_tuning_without_padding(demo, alone):
    _, singles, _ = alone
    model, tokenizer, _ = demo
    data = [{"prompt": p, "completion": "x"} for p in PROMPTS]
    kwargs = dict(adapters=["soft"], max_new_tokens=NEW_TOKENS, include_base=False)
    batched = torch_evaluate(model, tokenizer, data, batch_size=8, progress=False, **kwargs)
    one = torch_evaluate(model, tokenizer, data, batch_size=1, progress=False, **kwargs)
    expected = tuple(tokenizer.decode(t, skip_special_tokens=True).strip() for t in singles)
    assert batched["soft"].predictions == one["soft"].predictions == expected
    assert len(set(expected)) > 1 and active_adapter(model) is None  # put back as it came


def test_equal_length_batches_hold_one_length_each():
    ids = [[1] * n for n in (3, 5, 3, 3, 5, 2, 3)]
    assert _batches(ids, 2) == [[5, 0], [2, 3], [6, 1], [4]]  # padded: mixes 2 and 3, 3 and 5
    assert _batches(ids, 2, equal_length=True) == [[5], [0, 2], [3, 6], [1, 4]]
    for batch in _batches(ids, 8, equal_length=True):
        assert len({len(ids[i]) for i in batch}) == 1
