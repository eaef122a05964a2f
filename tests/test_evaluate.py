"""`evaluate` and `edgepeft eval` on a tiny NF4 llama.

    references = the base's own greedy output, one prompt at a time (no padding)
    evaluate(batch_size=4: left-padded batches of mixed lengths)
        base      predictions == references exactly ──► EM = F1 = ROUGE-L = 1.0
        adapters  predictions == one-at-a-time generate with the adapter active
                  (LoRA, prompt tuning, prefix tuning) and differ from the base ──► lower scores
    the model leaves as it came (active adapter, requires_grad, train mode), even on failure
    `edgepeft eval MODEL --adapter DIR --adapter NAME=DIR --data F --out R`
        R's predictions == evaluate() on the model the adapters were saved from

Generation is limited to tokens that decode to lowercase words (the model's own
generation_config.suppress_tokens), so ROUGE-L sees real tokens, not stray bytes.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import edgepeft
from edgepeft.adapters.inject import active_adapter, adapter_parameters, add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.cli import main
from edgepeft.config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from edgepeft.metrics import METRICS, score
from edgepeft.train.evaluate import evaluate, read_examples

NEW_TOKENS = 6
EOS = 2
PROMPTS = [
    "the quick brown fox",
    "SELECT name FROM users WHERE id = 1;",
    "hello",
    "edge devices run small models",
    "translate to french: hello ->",
    "adapters switch",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def load(tiny_dir, words_only: bool = True):
    model, tokenizer = edgepeft.load_base(tiny_dir("llama"), quant="nf4")
    if words_only:
        model.generation_config.suppress_tokens = [
            i
            for i in range(len(tokenizer))
            if i != EOS and not re.fullmatch(r" ?[a-z]+", tokenizer.decode([i]))
        ]
    return model, tokenizer


def greedy(model, tokenizer, prompt: str) -> str:
    """One prompt alone: no padding, the plain HF generate call."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    new = out[0, ids.shape[1] :].tolist()
    new = new[: new.index(EOS)] if EOS in new else new
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def rows_answered_by(model, tokenizer) -> list[dict]:
    return [{"prompt": p, "completion": greedy(model, tokenizer, p)} for p in PROMPTS]


def run(model, tokenizer, data, **kwargs):
    return evaluate(model, tokenizer, data, max_new_tokens=NEW_TOKENS, batch_size=4, progress=False, **kwargs)


def perturb(model, name: str, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_base_scores_one_on_its_own_greedy_output(tiny_dir):
    model, tokenizer = load(tiny_dir)
    rows = rows_answered_by(model, tokenizer)
    assert all(re.search("[a-z]", row["completion"]) for row in rows)  # ROUGE has tokens to match
    report = run(model, tokenizer, rows)
    base = report["base"]
    assert base.predictions == tuple(row["completion"] for row in rows)
    assert base.metrics == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    assert base.n == len(PROMPTS)


ADAPTERS = {
    "lora": LoraConfig(init="random"),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
}


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_adapter_generates_as_unbatched_generate_and_scores_lower(tiny_dir, method):
    model, tokenizer = load(tiny_dir)
    rows = rows_answered_by(model, tokenizer)
    torch.manual_seed(0)
    add_adapter(model, ADAPTERS[method], "tuned")
    perturb(model, "tuned")
    expected = [greedy(model, tokenizer, p) for p in PROMPTS]

    report = run(model, tokenizer, rows)
    tuned = report["tuned"]
    assert tuned.predictions == tuple(expected)
    assert report["base"].metrics["exact_match"] == 1.0  # disabling reaches hook-based adapters too
    assert tuned.metrics == score(expected, [row["completion"] for row in rows])
    assert tuned.metrics["exact_match"] < 1.0
    assert all(tuned.metrics[k] <= 1.0 for k in METRICS)
    assert sum(tuned.metrics.values()) < sum(report["base"].metrics.values())


def test_report_table_dict_and_atomic_save(tiny_dir, tmp_path):
    model, tokenizer = load(tiny_dir)
    rows = rows_answered_by(model, tokenizer)
    for seed, name in enumerate(("b", "a")):
        torch.manual_seed(seed)
        add_adapter(model, LoraConfig(init="random"), name)
        perturb(model, name)
    set_adapter(model, "b")
    b_alone = tuple(greedy(model, tokenizer, p) for p in PROMPTS)
    report = run(model, tokenizer, rows)

    assert [t.name for t in report.targets] == ["base", "b", "a"]  # the model's order
    assert report["b"].predictions == b_alone != report["a"].predictions  # each ran switched in
    lines = str(report).splitlines()
    assert lines[1].split() == ["target", "EM", "F1", "ROUGE-L", "n"]
    assert lines[2].split() == ["base", "1.000", "1.000", "1.000", str(len(PROMPTS))]
    assert [line.split()[0] for line in lines[3:]] == ["b", "a"]

    document = report.to_dict()
    assert document["n"] == len(PROMPTS) and document["max_new_tokens"] == NEW_TOKENS
    assert list(document["targets"]) == ["base", "b", "a"]
    assert document["targets"]["a"] == {**report["a"].metrics, "n": len(PROMPTS)}
    first = document["examples"][0]
    assert first["source"] == "<rows>:1"
    assert first["prompt"] == PROMPTS[0] and first["reference"] == rows[0]["completion"]
    assert set(first["predictions"]) == {"base", "b", "a"}
    assert first["predictions"]["a"]["prediction"] == report["a"].predictions[0]
    assert set(first["predictions"]["a"]) == {"prediction", *METRICS}

    out = tmp_path / "reports" / "eval.json"
    assert report.save(out, extra={"model": "tiny"}) == out
    assert json.loads(out.read_text()) == {**json.loads(json.dumps(document)), "model": "tiny"}
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no staging file left

    only = run(model, tokenizer, rows, adapters=["a"], include_base=False)
    assert [t.name for t in only.targets] == ["a"]
    assert only["a"].predictions == report["a"].predictions
    with pytest.raises(KeyError, match="no target 'base'.*targets: a"):
        only["base"]


def test_active_adapter_flags_and_mode_restored_even_on_failure(tiny_dir):
    model, tokenizer = load(tiny_dir)
    rows = rows_answered_by(model, tokenizer)[:2]
    for name in ("a", "b"):
        torch.manual_seed(0)
        add_adapter(model, LoraConfig(init="random"), name)
    set_adapter(model, "a")
    adapter_parameters(model, "a")[0].requires_grad_(False)  # a caller's own choice survives
    model.train()
    flags = [p.requires_grad for p in model.parameters()]

    def state():
        return active_adapter(model), [p.requires_grad for p in model.parameters()], model.training

    run(model, tokenizer, rows)
    assert state() == ("a", flags, True)

    calls = []

    def fail_on_second_target(module, args, kwargs):
        if active_adapter(model) == "b":
            calls.append(1)
            raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(fail_on_second_target, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(model, tokenizer, rows, adapters=["b"], include_base=False)
    finally:
        handle.remove()
    assert calls and state() == ("a", flags, True)


def test_chat_rows_are_rendered_with_the_template(tiny_dir):
    model, tokenizer = load(tiny_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    rendered = "<system>be brief\n<user>hello\n<assistant>"
    assert tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == rendered
    answer = greedy(model, tokenizer, rendered)
    chat = [{"messages": [*history, {"role": "assistant", "content": answer}]}]

    report = run(model, tokenizer, chat)
    assert report["base"].predictions == (answer,)
    assert report["base"].metrics["exact_match"] == 1.0
    assert report.to_dict()["examples"][0]["messages"] == history

    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"<rows>:1: a 'messages' row needs the tokenizer's chat template"):
        run(model, tokenizer, chat)


BAD_FILES = {
    "invalid_json": ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion"\n', r":3: invalid JSON"),
    "missing_completion": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r":2: missing key 'completion'"),
    "not_an_object": ('[1, 2]\n', r":1: expected a JSON object"),
    "no_reference": ('{"text": "just text"}\n', r":1: a 'text' row has no reference"),
    "chat_without_answer": (
        '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
        r":1: 'messages' must end with the assistant message",
    ),
    "empty": ("\n", r"holds no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_names_file_and_line(tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "test.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        read_examples(path)
    if case != "empty":
        assert str(path) in str(raised.value)


def test_bad_requests_fail_before_generating(tiny_dir):
    model, tokenizer = load(tiny_dir)
    rows = [{"prompt": "hello", "completion": "x"}]
    with pytest.raises(KeyError, match="no adapter named 'nope'.*adapters: none"):
        run(model, tokenizer, rows, adapters=["nope"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run(model, tokenizer, rows, include_base=False)
    add_adapter(model, LoraConfig(), "base")
    with pytest.raises(ValueError, match="named 'base'"):
        run(model, tokenizer, rows)
    assert run(model, tokenizer, rows, include_base=False)["base"].n == 1
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run(model, tokenizer, "missing.jsonl", include_base=False)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def saved_adapters(tiny_dir, tmp_path):
    """A LoRA and a prompt-tuning adapter saved over the NF4 tiny llama, and that model."""
    model, tokenizer = load(tiny_dir, words_only=False)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(init="random"), "sql")
    perturb(model, "sql", 0.1)
    save_adapter(model, tmp_path / "sql", "sql")
    torch.manual_seed(0)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3), "soft")
    save_adapter(model, tmp_path / "adapters" / "pt", "soft")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "the fox"}) + "\n" for p in PROMPTS[:4]))
    return model, tokenizer, data


def test_cli_eval_end_to_end(tiny_dir, tmp_path, saved_adapters, capsys):
    model, tokenizer, data = saved_adapters
    out = tmp_path / "report.json"
    argv = ["eval", str(tiny_dir("llama")), "--adapter", str(tmp_path / "sql"),
            "--adapter", f"soft={tmp_path / 'adapters' / 'pt'}", "--data", str(data),
            "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0

    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[2:5]] == ["base", "sql", "soft"]
    document = json.loads(out.read_text())
    assert document["base_quant"] == "nf4"  # read from the adapters' metadata
    assert list(document["targets"]) == ["base", "sql", "soft"]
    assert document["adapter_dirs"]["soft"] == str(tmp_path / "adapters" / "pt")

    # The same numbers as the Python API on the model the adapters were saved from.
    expected = evaluate(model, tokenizer, data, max_new_tokens=NEW_TOKENS, progress=False)
    for target in ("base", "sql", "soft"):
        got = [ex["predictions"][target]["prediction"] for ex in document["examples"]]
        assert got == list(expected[target].predictions)
        assert {k: document["targets"][target][k] for k in METRICS} == expected[target].metrics
    assert expected["sql"].predictions != expected["base"].predictions


def test_cli_eval_errors_are_one_line(tiny_dir, tmp_path, saved_adapters, capsys):
    _, _, data = saved_adapters
    model_dir = str(tiny_dir("llama"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    cases = [
        (["eval", str(tmp_path / "nowhere"), "--data", str(data)], "is not a folder"),
        (["eval", str(tmp_path / "sql"), "--data", str(data)], "holds no config.json"),
        (["eval", model_dir, "--data", str(bad)], f"{bad}:2: 'prompt' must be a string"),
        (["eval", model_dir, "--data", str(tmp_path / "none.jsonl")], "is not a file"),
        (["eval", model_dir, "--data", str(data), "--no-base"], "nothing to evaluate"),
        (["eval", model_dir, "--data", str(data), "--adapter", f"x={tmp_path / 'sql'}",
          "--adapter", f"x={tmp_path / 'adapters' / 'pt'}"], "two adapters are named 'x'"),
        (["eval", model_dir, "--data", str(data), "--adapter", f"base={tmp_path / 'sql'}"], "--no-base"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("edgepeft eval: error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
