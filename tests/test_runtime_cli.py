"""`edgepeft run` and `edgepeft chat` print exactly what the Engine's Python API generates.

    tiny llama + LoRA "sql" ─► fp32 separate export (with a chat template)
    run:  stdout == Engine.generate(prompt, adapter, sampling...) ; --stream the same text
    chat: stdin a pipe; /adapter switches mid-conversation (history kept), /adapters lists,
          /reset clears, unknown adapter -> a message and the chat goes on, /quit ends;
          no chat template -> plain "User:/Assistant:" text, said once
"""

from __future__ import annotations

import io
import shutil
import sys

import pytest
import torch
from transformers import AutoTokenizer

from edgepeft.adapters.inject import add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.cli import main
from edgepeft.config import LoraConfig
from edgepeft.export import api
from edgepeft.export.files import record_files
from edgepeft.runtime import Engine
from edgepeft.runtime.cli import Conversation

NEW = 6
PROMPT = "the quick brown fox"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def out(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-cli")
    base = root / "base"
    shutil.copytree(tiny_dir("llama"), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    model, _ = load_base(base, quant="none")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear"), "sql")
    folder = save_adapter(model, root / "src" / "sql", "sql")
    api.export(base, root / "out", adapters={"sql": folder}, weights="fp32", mode="separate",
               quant="none", verify=False, quiet=True)
    return root / "out"


@pytest.fixture(scope="module")
def engine(out):
    return Engine(out)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_prints_the_engines_generation(out, engine, capsys):
    for adapter in (None, "sql"):
        want = engine.generate(PROMPT, adapter=adapter, max_new_tokens=NEW)
        flags = ["--adapter", adapter] if adapter else []
        assert run(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", NEW, *flags)[:2] == (0, want + "\n")
        streamed = run(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", NEW, "--stream", *flags)
        assert streamed[:2] == (0, want + "\n")
    assert engine.generate(PROMPT, max_new_tokens=NEW) != engine.generate(PROMPT, adapter="sql", max_new_tokens=NEW)
    # an adapter file instead of a name; sampling flags reach the engine
    by_file = run(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", NEW,
                  "--adapter", out / "adapters" / "sql.onnx_adapter")
    assert by_file[1] == engine.generate(PROMPT, adapter="sql", max_new_tokens=NEW) + "\n"
    sampled = engine.generate(PROMPT, adapter="sql", max_new_tokens=NEW, temperature=1.5, top_k=50,
                              top_p=0.9, seed=7)
    assert run(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", NEW, "--adapter", "sql",
               "--temperature", 1.5, "--top-k", 50, "--top-p", 0.9, "--seed", 7, "--threads", 1)[1] == sampled + "\n"


def test_run_errors_name_what_to_do(out, tmp_path, capsys):
    code, _, err = run(capsys, "run", out, "--prompt", PROMPT, "--adapter", "nope")
    assert code == 2 and "no adapter named 'nope'" in err and "(loaded: sql)" in err
    code, _, err = run(capsys, "run", tmp_path / "missing", "--prompt", PROMPT)
    assert code == 2 and "missing does not exist" in err
    code, _, err = run(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", 0)
    assert code == 2 and "--max-new-tokens must be at least 1" in err


def chat(monkeypatch, capsys, out, lines: list[str], *flags) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return run(capsys, "chat", out, "--max-new-tokens", NEW, *flags)


def test_chat_switches_adapters_mid_conversation(out, engine, monkeypatch, capsys):
    first, second, third = "hello", "the quick brown fox", "edge devices"
    code, stdout, err = chat(monkeypatch, capsys, out, [
        first, "/adapters", "/adapter sql", second, "/adapter nope", "", "/adapter none", third,
        "/reset", first, "/quit", "never read",
    ])
    assert code == 0 and "chatting with" in err

    def reply(messages, adapter):
        return engine.generate(messages, adapter=adapter, max_new_tokens=NEW, truncate=True)

    turn1 = [{"role": "user", "content": first}]
    r1 = reply(turn1, None)
    turn2 = [*turn1, {"role": "assistant", "content": r1.strip()}, {"role": "user", "content": second}]
    r2 = reply(turn2, "sql")  # the history is kept across the switch
    turn3 = [*turn2, {"role": "assistant", "content": r2.strip()}, {"role": "user", "content": third}]
    r3 = reply(turn3, None)
    info = engine.adapters()["sql"]
    expected = (
        f"{r1}\n"
        f"  sql (lora, rank 4, {info.bytes / 1024:.1f} KiB)\n* none (the base alone)\n"
        "now: adapter sql\n"
        f"{r2}\n"
        "error: no adapter named 'nope' in " + str(out) + " (loaded: sql); name one of these, give an "
        "adapter file, or leave --adapter out for the base\n"
        "now: base, no adapter\n"
        f"{r3}\n"
        "history cleared\n"
        f"{r1}\n"  # after /reset the first turn again
    )
    assert stdout == expected
    assert r2 != reply(turn2, None)  # the switch changed the model


def test_chat_without_a_template_continues_plain_text(out, engine, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    (plain / "chat_template.jinja").unlink()
    record_files(plain)  # removed on purpose: no longer a file of the export
    code, stdout, err = chat(monkeypatch, capsys, plain, ["hello", "how are you"], "--adapter", "sql")
    assert code == 0 and err.count("has no chat template") == 1
    conversation = Conversation(templated=False)
    plain_engine = Engine(plain)
    replies = []
    for text in ("hello", "how are you"):
        prompt = conversation.prompt(text)
        assert prompt.endswith("Assistant:") and f"User: {text}" in prompt
        replies.append(plain_engine.generate(prompt, adapter="sql", max_new_tokens=NEW, stop=conversation.stops,
                                             truncate=True))
        conversation.add(text, replies[-1].strip())
    assert stdout == "".join(f"{r}\n" for r in replies)
    assert conversation.prompt("x").startswith(f"User: hello\nAssistant: {replies[0].strip()}\nUser: how are you")
