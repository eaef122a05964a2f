"""Task evaluation through the device engine equals PyTorch's `edgepeft.evaluate`.

    tiny llama (fp32, a chat template) + LoRA "sql" + prefix tuning "prefix" + prompt
    tuning "prompt"
        ├─ PyTorch: edgepeft.evaluate(model with the adapters, rows)      ─► report A
        └─ export fp32 separate ─► edgepeft.runtime.evaluate(EXPORT, rows) ─► report B
    A.to_dict() == B.to_dict(): every prediction and score, base and adapters, prompt and
    messages rows; `edgepeft eval EXPORT_DIR` writes the same JSON; no torch needed for it.
    Prompt tuning: PyTorch batches equal-length prompts only, the engine seeds each padded
    row's virtual tokens right before its text; both equal batch size 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.cli import main
from edgepeft.config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from edgepeft.export import api
from edgepeft.export.files import record_files
from edgepeft.runtime import Engine
from edgepeft.runtime.evaluate import evaluate as engine_evaluate
from edgepeft.train.evaluate import evaluate as torch_evaluate

NEW_TOKENS = 8
ADAPTERS = ["sql", "prefix", "prompt"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ROWS = [
    {"prompt": "the quick brown fox", "completion": "jumps over the lazy dog"},
    {"prompt": "SELECT name FROM users WHERE id = 1;", "completion": "name"},
    {"prompt": "hello", "completion": "bonjour"},
    {"prompt": "edge devices run small models", "completion": "adapters switch per request"},
    {"prompt": "translate to french: hello ->", "completion": "bonjour"},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]},
    {"messages": [
        {"role": "system", "content": "answer in french"},
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "le renard"},
    ]},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """(PyTorch model with ADAPTERS, its tokenizer, the separate fp32 export)."""
    root = tmp_path_factory.mktemp("runtime-eval")
    base = root / "base"
    shutil.copytree(tiny_dir("llama"), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    model, tokenizer = load_base(base, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, config in (
        ("sql", LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear")),
        ("prefix", PrefixTuningConfig(num_virtual_tokens=4)),
        ("prompt", PromptTuningConfig(num_virtual_tokens=4)),
    ):
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / "src" / name, name)
    set_adapter(model, None)
    out = root / "out"
    api.export(base, out, adapters=folders, weights="fp32", mode="separate", quant="none",
               verify=False, quiet=True)
    return model, tokenizer, out


@pytest.fixture(scope="module")
def engine(exported):
    return Engine(exported[2], threads=2)


@pytest.fixture(scope="module")
def torch_report(exported):
    model, tokenizer, _ = exported
    return torch_evaluate(model, tokenizer, ROWS, adapters=ADAPTERS,
                          max_new_tokens=NEW_TOKENS, batch_size=3, progress=False)


def test_engine_report_equals_the_pytorch_report(engine, torch_report):
    report = engine_evaluate(engine, ROWS, adapters=ADAPTERS, max_new_tokens=NEW_TOKENS,
                             batch_size=3, progress=False)
    assert report.to_dict() == torch_report.to_dict()
    assert str(report) == str(torch_report)
    base, sql = report["base"].predictions, report["sql"].predictions
    assert sum(a != b for a, b in zip(base, sql, strict=True)) >= len(ROWS) // 2  # adapter live
    assert report["prefix"].predictions != base and report["prompt"].predictions != base
    # batch size does not change what the engine says; default: every loaded adapter
    alone = engine_evaluate(engine, ROWS, max_new_tokens=NEW_TOKENS, batch_size=1, progress=False)
    assert [t.name for t in alone.targets] == ["base", *ADAPTERS]  # load order
    assert alone["sql"].predictions == sql and alone["base"].predictions == base
    assert alone["prompt"].predictions == report["prompt"].predictions


def test_bad_requests_name_what_is_there(engine, exported, tmp_path):
    with pytest.raises(KeyError, match=r"'nope'.*loaded: sql, prefix, prompt"):
        engine_evaluate(engine, ROWS, adapters=["nope"], progress=False)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        engine_evaluate(engine, ROWS, adapters=[], include_base=False, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "no reference"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a 'text' row has no reference"):
        engine_evaluate(engine, bad, progress=False)
    plain = tmp_path / "plain"
    shutil.copytree(exported[2], plain)
    (plain / "chat_template.jinja").unlink()
    record_files(plain)  # removed on purpose: no longer a file of the export
    with pytest.raises(ValueError, match=r"<rows>:6: a 'messages' row needs the export's chat template"):
        engine_evaluate(plain, ROWS, progress=False)


def test_edgepeft_eval_on_an_export_folder(exported, torch_report, tmp_path, capsys):
    out = exported[2]
    data, saved = tmp_path / "test.jsonl", tmp_path / "report.json"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    code = main(["eval", str(out), "--data", str(data), "--adapter", "sql",
                 "--adapter", str(out / "adapters" / "prefix.kvprefix.safetensors"),
                 "--adapter", "prompt",
                 "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3", "--out", str(saved),
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    document = json.loads(saved.read_text())
    expected = torch_report.to_dict()
    for i, example in enumerate(expected["examples"]):  # the same rows, read from a file
        assert document["examples"][i].pop("source") == f"{data}:{i + 1}"
        example.pop("source")
    assert document["data"] == str(data)
    assert {k: document[k] for k in expected if k != "data"} == {k: v for k, v in expected.items() if k != "data"}
    assert document["runtime"] == "edgepeft.runtime" and document["weights"] == "fp32"
    assert str(torch_report).splitlines()[1:] == printed.splitlines()[1:6]

    assert main(["eval", str(out), "--data", str(data), "--adapter", "nope"]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(data), "--quant", "nf4"]) == 2
    assert "--quant applies to HF model folders" in capsys.readouterr().err


def test_export_eval_needs_no_torch(exported, tmp_path):
    """`edgepeft eval EXPORT_DIR` in a process where torch, transformers, onnx cannot load."""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:2]))
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "bitsandbytes", "onnx", "peft"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        from edgepeft.cli import main
        code = main(["eval", {str(exported[2])!r}, "--data", {str(data)!r}, "--adapter", "sql",
                     "--max-new-tokens", "4", "--quiet"])
        assert not any(m in sys.modules for m in ("torch", "transformers", "onnx")), "imported"
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[1].split() == ["target", "EM", "F1", "ROUGE-L", "n"]
    assert [line.split()[0] for line in proc.stdout.splitlines()[2:4]] == ["base", "sql"]
