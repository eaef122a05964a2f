"""verify() on KV-prefix adapters, and the reference continuations verify.json keeps.

    separate llama (fused), NF4 base, fp32 graph: prefix + prompt + LoRA in one folder
        every adapter checked (none skipped), judged <= 1e-4, top-1 100%, left-padded prompts
        reference_tokens == HF generate() on each prompt alone with the adapter active
        a KV prefix file with other values: that adapter fails, the others pass, CLI exit 1
    generic graphs (gpt2, llama): a KV prefix file beside a base export, check_graph
        gpt2 + prompt tuning: learned absolute positions, so prompts are compared unpadded
    verify.json written before reference_tokens existed: read_report fills the defaults
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import edgepeft
from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.cli import main
from edgepeft.config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from edgepeft.export.api import export
from edgepeft.export.kv_prefix import (
    export_kv_prefix,
    kv_prefix_tensors,
    read_kv_prefix_file,
    write_kv_prefix_file,
)
from edgepeft.export.manifest import read_manifest
from edgepeft.export.verify import (
    REFERENCE_PER_PROMPT,
    VERIFY_FILE,
    check_graph,
    read_report,
    verify,
)

pytest.importorskip("onnxruntime")

N = 5
NEW_TOKENS = 8
FP32_TOL = 1e-4
PROMPT_LENGTHS = (7, 4, 9)  # verify's default prompts: left padded by 2, 5 and 0
PROMPTS = [[5, 17, 200, 33, 81, 9], [250, 12, 40], [77, 300, 8, 150, 61, 99, 240, 18]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapted(folder, quant: str):
    """The base from `folder` holding a prefix ("pre"), a prompt ("pro") and a LoRA ("sql")."""
    model, _ = edgepeft.load_base(folder, quant=quant)
    torch.manual_seed(1)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=N), name="pre")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=N), name="pro")
    add_adapter(model, LoraConfig(r=4, init="random"), name="sql")
    return model


@torch.no_grad()
def _generate_alone(model, prompts) -> tuple[tuple[int, ...], ...]:
    """HF generate() on each prompt alone (batch 1, no padding): an independent reference."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        rows.append(tuple(out[0, ids.shape[1] :].tolist()))
    return tuple(rows)


@pytest.fixture(scope="module")
def separate(tiny_dir, tmp_path_factory):
    """(model with the three adapters, fp32 separate export of them over the NF4 base)."""
    root = tmp_path_factory.mktemp("kvverify")
    folder = tiny_dir("llama")
    model = _adapted(folder, "nf4")
    folders = {name: save_adapter(model, root / name, name) for name in ("sql", "pre", "pro")}
    out = root / "separate"
    export(folder, out, adapters=folders, weights="fp32", mode="separate", verify=False, quiet=True)
    return model, out


def test_separate_export_checks_kv_prefix_adapters_beside_lora(separate):
    model, out = separate
    report = verify(out)
    assert [g.name for g in report.graphs] == ["", "sql", "pre", "pro"]
    assert report.skipped == {} and report.passed
    assert [len(p) for p in report.prompt_tokens] == list(PROMPT_LENGTHS)
    for check in report.graphs:
        print(f"{check.name or '(base)'}: {check.max_abs_diff:.2e}, KL {check.mean_kl:.1e}")
        assert check.exact and check.passed and check.batched
        assert check.max_abs_diff <= FP32_TOL and check.top1_agree == check.top1_total
        assert check.top1_total == sum(PROMPT_LENGTHS) + 3 * (NEW_TOKENS - 1)
        assert check.greedy_match == check.row_greedy_match == 3
    by_name = {g.name: g for g in report.graphs}
    assert by_name["pre"].adapter_file.endswith("pre.kvprefix.safetensors")
    assert by_name["sql"].adapter_file.endswith("sql.onnx_adapter")

    # Reference continuations: HF generate with each adapter active, one prompt at a time.
    for name, check in by_name.items():
        assert check.reference_tokens_mode == REFERENCE_PER_PROMPT
        if name:
            set_adapter(model, name)
            assert check.reference_tokens == _generate_alone(model, report.prompt_tokens), name
    assert len({c.reference_tokens for c in report.graphs}) == 4  # each adapter changes them

    document = json.loads((out / VERIFY_FILE).read_text())
    assert [g["name"] for g in document["graphs"]] == ["", "sql", "pre", "pro"]
    assert document["graphs"][2]["reference_tokens"] == [list(r) for r in by_name["pre"].reference_tokens]
    assert read_report(out) == report
    assert "| pre | fp32 |" in (out / "verify.md").read_text()


def test_a_kv_prefix_with_other_values_fails(separate, tmp_path, capsys):
    """The check looks at the seeded prefix: changed values are caught, for that adapter only."""
    model, out = separate
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    entry = {a.name: a for a in read_manifest(broken).adapters}["pre"]
    tensors = kv_prefix_tensors(model, "pre")
    tensors = {k: v * 1.5 if "value" in k else v for k, v in tensors.items()}
    manifest = read_manifest(broken)
    write_kv_prefix_file(
        broken / entry.file, tensors, manifest.base_fingerprint, {"adapter": "pre", "method": "prefix"}
    )
    report = verify(broken, max_new_tokens=2)
    by_name = {g.name: g for g in report.graphs}
    assert not by_name["pre"].passed and by_name["pre"].max_abs_diff > 1e-2
    assert by_name["pro"].passed and by_name["sql"].passed and not report.passed
    assert main(["verify", str(broken), "--max-new-tokens", "2"]) == 1
    assert "FAILED: pre fp32" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generic_graph_with_a_kv_prefix_file(arch, tiny_dir, tmp_path):
    """A KV prefix beside a generic base export; positions by cumsum(mask) in the graph."""
    folder = tiny_dir(arch)
    out = tmp_path / "base"
    export(folder, out, weights="fp32", graph="generic", verify=False, quiet=True)
    assert read_manifest(out).graph == "generic"
    model = _adapted(folder, "none")
    for name, method in (("pre", "prefix"), ("pro", "prompt")):
        entry = export_kv_prefix(model, name, out)
        assert read_kv_prefix_file(out / entry["file"], read_manifest(out).base_fingerprint)
        set_adapter(model, name)
        check = check_graph(
            out, model, name=name, adapter_file=out / entry["file"], prompts=PROMPTS,
            max_new_tokens=NEW_TOKENS,
        )
        print(f"generic {arch} {name}: {check.max_abs_diff:.2e}, batched {check.batched}")
        assert check.exact and check.passed and check.max_abs_diff <= FP32_TOL
        assert check.top1_agree == check.top1_total and check.greedy_match == 3
        # GPT-2's learned positions: a padded prompt-tuned row cannot be seeded, so each
        # prompt is compared alone; everything else runs as one left-padded batch.
        assert check.batched == ((arch, method) != ("gpt2", "prompt"))
        assert check.reference_tokens == _generate_alone(model, PROMPTS)
        assert check.row_greedy_match == 3


def test_old_verify_files_still_read(separate, tmp_path):
    """verify.json from before reference_tokens (and batched, row_greedy_match) existed."""
    _, out = separate
    verify(out, max_new_tokens=2)
    document = json.loads((out / VERIFY_FILE).read_text())
    for graph in document["graphs"]:
        for key in ("reference_tokens", "reference_tokens_mode", "batched", "row_greedy_match"):
            del graph[key]
    (tmp_path / VERIFY_FILE).write_text(json.dumps(document))
    old = read_report(tmp_path)
    assert [g.name for g in old.graphs] == ["", "sql", "pre", "pro"]
    assert old.graphs[2].reference_tokens == () and old.graphs[2].reference_tokens_mode == ""
    assert old.graphs[2].passed and old.prompt_tokens == tuple(map(tuple, document["prompt_tokens"]))
    (tmp_path / VERIFY_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a verify report"):
        read_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="edgepeft verify"):
        read_report(tmp_path / "nowhere")
