"""Per-node accuracy levels (fused.py `_Emitter.level`): the 8-bit MatMulNBits nodes apart.

export(accuracy_level=L, accuracy_level_int8=L8)   every 8-bit node (mixed-precision tensors,
    the tied / int8 lm_head) at L8, every 4-bit node at L; the manifest's quantization record
    says L8 where it differs; "int4 exact" only when both compute in fp32; onnxruntime of
    (1, 1) equals PyTorch's int4 base; recipes and the CLI take the key; separate mode and
    the generic builder refuse it (one level there)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgepeft.base import load_base
from edgepeft.cli import build_parser
from edgepeft.export.api import export
from edgepeft.export.manifest import read_manifest
from edgepeft.export.recipes import export_options
from edgepeft.export.verify.criteria import criteria_key
from edgepeft.tiny import TINY_VOCAB

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def int4_llama(tiny_dir):
    return load_base(tiny_dir("llama"), quant="int4", device="cpu")


def _levels(folder) -> dict[int, set[int]]:
    """bits -> the accuracy levels of the graph's MatMulNBits nodes of those bits."""
    found: dict[int, set[int]] = {}
    for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            found.setdefault(attrs["bits"], set()).add(attrs["accuracy_level"])
    return found


def test_int8_nodes_take_their_own_level(int4_llama, tmp_path):
    model, tokenizer = int4_llama
    mixed = export(model, tmp_path / "mixed", weights="int4", accuracy_level=1,
                   accuracy_level_int8=4, tokenizer=tokenizer, verify=False, quiet=True)  # fmt: skip
    assert _levels(mixed.out_dir) == {4: {1}, 8: {4}}
    manifest = read_manifest(mixed.out_dir)
    assert manifest.accuracy_level == 1 and manifest.quantization["accuracy_level_int8"] == 4
    assert criteria_key(manifest) == "int4"  # int8 activations somewhere: not exact

    exact = export(model, tmp_path / "exact", weights="int4", accuracy_level=1,
                   accuracy_level_int8=1, tokenizer=tokenizer, quiet=True)  # fmt: skip
    assert _levels(exact.out_dir) == {4: {1}, 8: {1}}
    manifest = read_manifest(exact.out_dir)
    assert "accuracy_level_int8" not in manifest.quantization  # one level: nothing extra
    (check,) = exact.verify.graphs
    assert check.criteria == "int4 exact" and check.passed, exact.verify

    default = export(model, tmp_path / "default", weights="int4", tokenizer=tokenizer,
                     verify=False, quiet=True)  # fmt: skip
    assert _levels(default.out_dir) == {4: {4}, 8: {4}}

    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, (1, 9)).astype(np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    session = ort.InferenceSession(str(mixed.out_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    m = read_manifest(mixed.out_dir)
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, m.num_kv_heads, 0, m.head_dim), np.float32)
    got = session.run(["logits"], feed)[0]
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()  # int8 activations: close


def test_recipes_and_the_cli_take_the_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("accuracy_level = 1\naccuracy_level_int8 = 4\n")
    options = export_options(recipe)
    assert (options["accuracy_level"], options["accuracy_level_int8"]) == (1, 4)
    assert export_options(recipe, accuracy_level_int8=1)["accuracy_level_int8"] == 1
    recipe.write_text("accuracy_level_int8 = 7\n")
    with pytest.raises(ValueError, match="accuracy_level_int8 must be 0..4"):
        export_options(recipe)
    flags = ["--accuracy-level", "1", "--accuracy-level-int8", "4"]
    args = build_parser().parse_args(["export", "--base", "b", "--out", "o", *flags])
    assert (args.accuracy_level, args.accuracy_level_int8) == (1, 4)


def test_separate_mode_and_generic_refuse_two_levels(int4_llama, tmp_path, tiny_dir):
    model, tokenizer = int4_llama
    with pytest.raises(ValueError, match="accuracy_level_int8=4 .*separate"):
        export(model, tmp_path / "sep", weights="int4", mode="separate", lora_everywhere=True,
               accuracy_level=1, accuracy_level_int8=4, verify=False, quiet=True)  # fmt: skip
    with pytest.raises(ValueError, match="accuracy_level_int8=4 .*fused builder"):
        export(tiny_dir("llama"), tmp_path / "gen", weights="int4", graph="generic",
               accuracy_level=1, accuracy_level_int8=4, verify=False, quiet=True)  # fmt: skip
