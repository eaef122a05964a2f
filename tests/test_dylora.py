"""DyLoRA: nested ranks in one LoRA, trained one sampled rank per step, cut to plain LoRAs.

    LoraConfig(r=8, dylora_min_rank=2) ──train──► each step one rank b in [2, 8] (seed, step),
        the same in every layer and micro-batch; eval: the full rank
    set_active_rank(model, b) ──► logits  ==  HF peft over truncate_rank(folder, b)   (1e-5 rel.)
        fp32 base and NF4 base (peft over transformers' bitsandbytes)
    edgepeft export --rank b  ==  export of the truncate_rank folder (every file but the manifest)
    edgepeft plan --adapter DIR ──► the largest rank within a device budget

The bench section (scripts/bench_train.py --dylora) measures what the ranks are worth.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from script_loader import load_script
from test_lora import hf_model, transformers_nf4

import edgepeft
from edgepeft import LoraConfig, TrainConfig
from edgepeft.adapters.inject import adapter_parameters
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.lora import DYLORA_METADATA, LoraLayer, step_rank
from edgepeft.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from edgepeft.cli import main
from edgepeft.devices import DEVICES_DIR
from edgepeft.export.api import export
from edgepeft.plan import rank as plan_rank
from edgepeft.plan.planner import plan
from edgepeft.truncate import trained_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_TOL = 1e-5
DYLORA = LoraConfig(r=8, alpha=16, init="random", target_modules="all-linear", dylora_min_rank=2)
ROWS = [{"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."}] * 16
FAST = dict(batch_size=4, max_seq_len=32, val_fraction=0.0, quiet=True, scheduler="constant")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def dylora_model(folder, config=DYLORA, quant="none", **base_kwargs):
    model, _ = edgepeft.load_base(folder, quant=quant, **base_kwargs)
    torch.manual_seed(0)
    edgepeft.add_adapter(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off init, so every rank's rows and columns matter
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# ---------------------------------------------------------------- config and sampling


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=8, dylora_min_rank=0), "from 1 to r=8"),
        (dict(r=8, dylora_min_rank=9), "from 1 to r=8"),
        (dict(r=8, dylora_min_rank=True), "from 1 to r=8"),
        (dict(r=8, dylora_min_rank=2, use_dora=True), "use_dora"),
        (dict(r=8, dylora_min_rank=2, rank_pattern={"q_proj": 4}), "rank_pattern"),
    ],
)
def test_config_refuses_ranks_outside_one_to_r(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_step_rank_is_uniform_over_the_range_and_fixed_by_seed_and_step():
    draws = [step_rank(DYLORA, seed=0, step=s) for s in range(1, 701)]
    assert set(draws) == set(range(2, 9))  # every rank of [min, r], nothing else
    counts = [draws.count(b) for b in range(2, 9)]
    assert min(counts) > 60 and max(counts) < 140  # 100 expected each
    assert draws == [step_rank(DYLORA, seed=0, step=s) for s in range(1, 701)]
    assert draws != [step_rank(DYLORA, seed=1, step=s) for s in range(1, 701)]


# ---------------------------------------------------------------- the layer at rank b


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_layer_at_rank_b_uses_leading_factors_and_its_own_scaling(rslora, tiny_dir):
    config = dataclasses.replace(DYLORA, use_rslora=rslora)
    model = dylora_model(tiny_dir("llama"), config)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    layer = next(m for _, m in adapter_modules(model) if isinstance(m, LoraLayer))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for b in (2, 5, 8):
        edgepeft.set_active_rank(model, b)
        with torch.no_grad():
            added = layer(x) - layer.base_layer(x)
            scale = 16 / (b**0.5 if rslora else b)
            expected = x @ A[:b].T @ B[:, :b].T * scale  # (2, 5, out)
            merged = layer.delta_weight("default")
        assert rel_diff(added, expected) <= REL_TOL
        assert rel_diff(merged, (B[:, :b] @ A[:b]).detach() * scale) <= REL_TOL
    edgepeft.set_active_rank(model, None)
    with torch.no_grad():
        full = layer(x) - layer.base_layer(x)
    assert rel_diff(full, x @ A.T @ B.T * layer.scaling["default"]) <= REL_TOL


def test_set_active_rank_refuses_plain_lora_and_untrained_ranks(tiny_dir):
    model = dylora_model(tiny_dir("llama"))
    for bad in (1, 9):
        with pytest.raises(ValueError, match="trained at ranks 2 to 8"):
            edgepeft.set_active_rank(model, bad)
    plain = dylora_model(tiny_dir("llama"), dataclasses.replace(DYLORA, dylora_min_rank=None))
    with pytest.raises(ValueError, match="not a DyLoRA adapter"):
        edgepeft.set_active_rank(plain, 4)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        edgepeft.set_active_rank(plain, 4, name="nope")


# ---------------------------------------------------------------- training


def test_each_step_trains_one_sampled_rank_in_every_layer_and_resumes_exactly(tiny_dir, tmp_path):
    model, tok = edgepeft.load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    edgepeft.add_adapter(model, dataclasses.replace(DYLORA, init="default"))
    layers = [m for _, m in adapter_modules(model) if isinstance(m, LoraLayer)]
    seen: list[tuple[bool, int | None]] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: seen.append((m.training, m.active_rank.get("default")))
        )
        for m in layers
    ]
    config = TrainConfig(max_steps=4, lr=1e-2, grad_accum=2, seed=7, **FAST)
    result = edgepeft.train(model, tok, ROWS, config, tmp_path / "run")
    for h in hooks:
        h.remove()

    per_step = len(layers) * 2  # every layer, both micro-batches
    trained = [rank for training, rank in seen if training]
    expected = [step_rank(DYLORA, seed=7, step=s) for s in range(1, 5)]
    assert trained == [b for b in expected for _ in range(per_step)]
    assert len(set(expected)) > 1  # the draws differ between steps
    assert all(m.active_rank == {} for m in layers)  # back at the full rank after training

    saved, _, metadata = read_adapter(result.last_adapter_dir)
    assert saved.dylora_min_rank == 2 and metadata[DYLORA_METADATA] == "2"
    assert "dylora_min_rank" not in json.loads((result.last_adapter_dir / CONFIG_FILE).read_text())

    # Stopped after step 2 and resumed: the same ranks, so the same losses bit for bit.
    again, tok = edgepeft.load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    edgepeft.add_adapter(again, dataclasses.replace(DYLORA, init="default"))
    edgepeft.train(again, tok, ROWS, config, tmp_path / "resumed", _stop_after_steps=2)
    resumed = edgepeft.train(again, tok, ROWS, config, tmp_path / "resumed", resume=True)
    assert resumed.train_losses == result.train_losses


# ---------------------------------------------------------------- truncate_rank


def test_peft_loads_the_dylora_folder_and_each_truncation_at_its_rank(
    tiny_dir, tmp_path, input_ids
):
    folder = tiny_dir("llama")
    model = dylora_model(folder)
    edgepeft.save_adapter(model, tmp_path / "dy")
    full = PeftModel.from_pretrained(hf_model(folder), tmp_path / "dy").eval()
    assert rel_diff(logits(model, input_ids), logits(full, input_ids)) <= REL_TOL
    assert trained_ranks(tmp_path / "dy") == (2, 8)

    for b in (2, 5):
        out = edgepeft.truncate_rank(tmp_path / "dy", b, tmp_path / f"r{b}")
        document = json.loads((out / CONFIG_FILE).read_text())
        assert document["r"] == b and document["lora_alpha"] == 16  # alpha/b is DyLoRA's scale
        reference = PeftModel.from_pretrained(hf_model(folder), out).eval()
        edgepeft.set_active_rank(model, b)
        ours = logits(model, input_ids)
        assert rel_diff(ours, logits(reference, input_ids)) <= REL_TOL
        assert rel_diff(ours, logits(full, input_ids)) > 1e-3  # rank b really is another model
        assert trained_ranks(out) == (2, b)  # still nested: can be cut again
    edgepeft.set_active_rank(model, None)

    # Loaded back into edgepeft, the truncated folder is a plain rank-5 LoRA.
    loaded, _ = edgepeft.load_base(folder, quant="none")
    edgepeft.load_adapter(loaded, tmp_path / "r5")
    edgepeft.set_active_rank(model, 5)
    assert rel_diff(logits(loaded.eval(), input_ids), logits(model, input_ids)) <= REL_TOL


def test_truncation_over_nf4_matches_peft_over_transformers_bnb(tiny_dir, tmp_path, input_ids):
    folder = tiny_dir("llama")
    model = dylora_model(folder, quant="nf4", double_quant=False)  # transformers' default
    edgepeft.save_adapter(model, tmp_path / "dy")
    edgepeft.truncate_rank(tmp_path / "dy", 3, tmp_path / "r3")
    reference = PeftModel.from_pretrained(transformers_nf4(folder), tmp_path / "r3").eval()
    edgepeft.set_active_rank(model, 3)
    assert rel_diff(logits(model, input_ids), logits(reference, input_ids)) <= REL_TOL


def test_truncate_refuses_what_it_cannot_cut_naming_the_folder(tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    edgepeft.save_adapter(dylora_model(folder), tmp_path / "dy")
    with pytest.raises(ValueError, match=r"dy was trained up to rank 8; cannot truncate to rank 9"):
        edgepeft.truncate_rank(tmp_path / "dy", 9, tmp_path / "out")
    with pytest.raises(ValueError, match=r"dy was trained at ranks 2 to 8 .*rank 1 is below"):
        edgepeft.truncate_rank(tmp_path / "dy", 1, tmp_path / "out")
    plain = dylora_model(folder, dataclasses.replace(DYLORA, dylora_min_rank=None))
    edgepeft.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain is a plain LoRA \(r=8\), not trained with DyLoRA"):
        edgepeft.truncate_rank(tmp_path / "plain", 4, tmp_path / "out")
    ia3, _ = edgepeft.load_base(folder, quant="none")
    edgepeft.add_adapter(ia3, edgepeft.IA3Config())
    edgepeft.save_adapter(ia3, tmp_path / "ia3")
    with pytest.raises(ValueError, match=r"ia3 holds a IA3 adapter"):
        edgepeft.truncate_rank(tmp_path / "ia3", 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_tensors_are_the_leading_rows_and_columns(tiny_dir, tmp_path):
    edgepeft.save_adapter(dylora_model(tiny_dir("llama")), tmp_path / "dy")
    edgepeft.truncate_rank(tmp_path / "dy", 4, tmp_path / "r4")
    with (
        safe_open(str(tmp_path / "dy" / WEIGHTS_FILE), "pt") as a,
        safe_open(str(tmp_path / "r4" / WEIGHTS_FILE), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert (
            b.metadata()["edgepeft_base_fingerprint"] == a.metadata()["edgepeft_base_fingerprint"]
        )
        for key in a.keys():
            want = a.get_tensor(key)[:4] if ".lora_A." in key else a.get_tensor(key)[:, :4]
            assert torch.equal(b.get_tensor(key), want)


# ---------------------------------------------------------------- export --rank, plan --adapter


def test_cli_export_with_rank_equals_exporting_the_truncated_folder(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama")
    edgepeft.save_adapter(dylora_model(folder), tmp_path / "dy")
    out = tmp_path / "cli"
    argv = ["export", "--base", str(folder), "--adapter", f"sql={tmp_path / 'dy'}", "--rank", "4",
            "--weights", "fp32", "--mode", "separate", "--out", str(out), "--no-verify", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    cut = tmp_path / "cli-adapters-r4" / "sql"
    assert f"cut 1 adapter(s) to rank 4 in {cut.parent}" in capsys.readouterr().out
    edgepeft.truncate_rank(tmp_path / "dy", 4, tmp_path / "r4")
    export(folder, tmp_path / "api", {"sql": tmp_path / "r4"}, weights="fp32", mode="separate",
           verify=False, quiet=True)  # fmt: skip

    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*") if p.is_file()
    )
    assert any(p.suffix == ".onnx_adapter" for p in files)
    for rel in files:  # graphs and adapter files alike; the JSON records each source folder
        ours, theirs = (out / rel).read_bytes(), (tmp_path / "api" / rel).read_bytes()
        if rel.suffix != ".json":
            assert ours == theirs, rel
        elif rel.name != "edgepeft.json":  # the manifest also lists the JSON files' hashes
            named = ours.decode().replace(str(cut.resolve()), str((tmp_path / "r4").resolve()))
            assert json.loads(named) == json.loads(theirs), rel
    manifest = json.loads((out / "edgepeft.json").read_text())
    assert str(cut.resolve()) in json.dumps(manifest)  # what `edgepeft verify` reloads
    assert main(["export", *argv[1:5], "--rank", "9", "--out", str(tmp_path / "x")]) == 2
    assert "cannot truncate to rank 9" in capsys.readouterr().err


def test_plan_picks_the_largest_rank_within_the_budget(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama")
    edgepeft.save_adapter(dylora_model(folder), tmp_path / "dy")
    ranks = plan_rank.adapter_ranks(tmp_path / "dy")
    # all-linear on 2 layers of hidden 64 (kv 32, ffn 128): (in + out) per rank, fp32
    assert ranks.bytes_per_rank == 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 4
    assert (ranks.min_rank, ranks.trained_rank, ranks.fixed_bytes) == (2, 8, 0)
    roomy = plan_rank.fit_rank(folder, "x86-laptop-16gb", tmp_path / "dy", context=64)
    assert roomy.rank == 8
    assert roomy.weights == "int4"  # the laptop's recommended recipe
    assert roomy.base_peak == plan(folder, "x86-laptop-16gb", context=64).formats["int4"].total

    budget = roomy.base_peak + 2 * ranks.bytes_at(5) + 100  # two copies fit at rank 5, not 6
    profile = tmp_path / "tight.toml"
    text = (DEVICES_DIR / "x86-laptop-16gb.toml").read_text()
    profile.write_text(text.replace('"16GiB"', f'"{budget}"').replace('"4GiB"', '"0"'))
    argv = ["plan", "--model", str(folder), "--device", str(profile), "--context", "64",
            "--weights", "int4", "--adapter", str(tmp_path / "dy"), "--adapters", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "largest rank that fits: 5" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rank"] == 5 and data["fits"] and data["peak"] <= budget
    assert data["adapter"]["min_rank"] == 2 and data["weights"] == "int4"

    tiny = plan_rank.fit_rank(
        folder, profile, tmp_path / "dy", adapters=40, context=64, weights="int4"
    )
    assert tiny.rank is None and "none" in str(tiny)


def test_plan_metadata_key_is_the_adapters_own():
    assert plan_rank.DYLORA_METADATA == DYLORA_METADATA  # plan/ cannot import lora.py (torch)


def test_bench_section_runs_and_reports_every_rank():
    bench_train = load_script("bench_train")
    markdown = bench_train.main(["--dylora", "--smoke", "--no-write"])
    assert "## DyLoRA: one adapter at every rank" in markdown and "Trial run" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
