"""Importance-masked selective tuning: the mask is the budgeted top score, only it trains,
and the sparse delta saves, loads and merges exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgepeft.adapters.importance import choose_mask, unit_scores
from edgepeft.adapters.inject import (
    adapter_parameters,
    add_adapter,
    count_parameters,
    disable_adapters,
    list_adapters,
)
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from edgepeft.adapters.selective import SelectiveLayer
from edgepeft.base import load_base
from edgepeft.config import SelectiveConfig, TrainConfig
from edgepeft.export.api import export
from edgepeft.merge import merge
from edgepeft.tasks import make_splits
from edgepeft.tiny import TINY_VOCAB
from edgepeft.train import train
from edgepeft.train.run import run
from edgepeft.train.run_config import ConfigError, load_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Unquantized parameters of an nf4 llama: norms, the input embedding, the output head.
UNQUANTIZED = (r"norm\.weight$", r"embed_tokens\.weight$", r"lm_head\.weight$")
LINEAR = (r"layers\.\d\.self_attn\.(q|v)_proj\.weight$", r"layers\.0\.mlp\.down_proj\.weight$")
# (quant, patterns): over nf4 only unquantized parameters can be tuned; fp32 tunes linears.
BASES = {"nf4": ("nf4", UNQUANTIZED), "fp32-linear": ("none", LINEAR)}
WORDS = ["hello", "dog", "cat", "house", "water", "bread", "night", "sun"]


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (2, 12), generator=g) for _ in range(n)]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def masked_model(tiny_dir, base: str, **fields):
    quant, patterns = BASES[base]
    model, _ = load_base(tiny_dir("llama"), quant=quant)
    add_adapter(model, SelectiveConfig(patterns=patterns, mask="importance", **fields))
    return model


def layers(model, name="default"):
    """(full parameter name, layer, local name) of every delta of adapter `name`."""
    return [
        (f"{path}.{local}", module, local)
        for path, module in adapter_modules(model)
        if isinstance(module, SelectiveLayer) and name in module.selective_delta
        for local in module.selective_delta[name]
    ]


def base_state(model) -> dict[str, torch.Tensor]:
    """Every base tensor as stored (nf4 codes and their quant states too)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if ".selective_delta." not in k and ".selective_index." not in k
    }


def brute_force_scores(tiny_dir, base: str, score: str, data) -> dict[str, torch.Tensor]:
    """The score recomputed on a fresh base, from gradients of the weights themselves."""
    import re

    quant, patterns = BASES[base]
    model, _ = load_base(tiny_dir("llama"), quant=quant)
    model.eval()
    chosen = {n: p for n, p in model.named_parameters() if any(re.search(r, n) for r in patterns)}
    for p in chosen.values():
        p.requires_grad_(True)
    out = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in chosen.items()}
    for ids in data:
        for p in chosen.values():
            p.grad = None
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for n, p in chosen.items():
            g = p.grad.double()
            out[n] += g.square() if score == "fisher" else (g * p.detach().double()).abs()
    return out


def expected_units(scores: dict[str, torch.Tensor], order: list[str], structure: str, k: int):
    """{param: set of unit indices}: the top k units, ties to the earlier (param, index)."""
    ranked = []
    for rank, name in enumerate(order):
        for i, s in enumerate(unit_scores(scores[name], structure).tolist()):
            ranked.append((-s, rank, i, name))
    ranked.sort()
    keep: dict[str, set[int]] = {name: set() for name in order}
    for _, _, i, name in ranked[:k]:
        keep[name].add(i)
    return keep


@pytest.mark.parametrize(
    "base, score, structure, budget",
    [
        ("nf4", "fisher", "unstructured", 300),
        ("nf4", "grad_x_weight", "unstructured", 0.05),
        ("fp32-linear", "fisher", "rows", 20),
        ("fp32-linear", "grad_x_weight", "columns", 0.1),
    ],
)
def test_the_mask_keeps_the_budgeted_top_scores(tiny_dir, base, score, structure, budget):
    model = masked_model(tiny_dir, base, score=score, structure=structure, budget=budget)
    data = batches()
    chosen = choose_mask(model, "default", data)

    found = layers(model)
    names = list(dict.fromkeys(full for full, _, _ in found))
    shapes = {full: layer.innermost().get_parameter(local).shape for full, layer, local in found}
    units = {full: unit_scores(torch.zeros(shapes[full]), structure).numel() for full in names}
    total = sum(units.values())
    k = budget if isinstance(budget, int) else round(budget * total)
    assert sum(chosen.selected.values()) == k and list_adapters(model)["default"] == chosen

    reference = expected_units(brute_force_scores(tiny_dir, base, score, data), names, structure, k)
    trained = 0
    for full, layer, local in found:
        mask = layer.mask("default", local)
        index = layer.sparse_index("default", local)
        assert set(index.indices.tolist()) == reference[full], full
        assert int(mask.sum()) == len(reference[full]) * index.unit_size()
        if structure != "unstructured" and mask.dim() == 2:  # whole rows / columns, nothing else
            axis = 1 if structure == "rows" else 0
            assert torch.equal(mask.any(axis), mask.all(axis)), full
        trained += int(mask.sum())
    assert count_parameters(model) == trained
    assert chosen.density == pytest.approx(trained / sum(shapes[n].numel() for n in names))
    print(f"{base} {score} {structure} budget={budget}: density {chosen.density:.4f}")


@pytest.mark.parametrize("base", sorted(BASES))
def test_adamw_moves_only_the_masked_entries(tiny_dir, base):
    model = masked_model(tiny_dir, base, budget=0.1)
    before = base_state(model)
    choose_mask(model, "default", batches())
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2, weight_decay=0.5)
    model.train()
    for ids in batches(4, seed=2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    moved = 0
    for full, layer, local in layers(model):
        delta, mask = layer.delta("default", local), layer.mask("default", local)
        assert torch.count_nonzero(delta[~mask]) == 0, full  # exactly 0, weight decay included
        moved += int(torch.count_nonzero(delta[mask]))
    assert moved > 0
    after = base_state(model)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the base never moved


@pytest.mark.parametrize("base, structure", [("nf4", "unstructured"), ("fp32-linear", "rows")])
def test_save_load_and_merge_are_exact(tiny_dir, base, structure, tmp_path):
    model = masked_model(tiny_dir, base, budget=0.1, structure=structure, init="random")
    chosen = choose_mask(model, "default", batches())
    ids = batches(1, seed=5)[0]
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert (logits(model, ids) - adapted).abs().max() > 1e-3  # the delta matters
    save_adapter(model, tmp_path / "a")

    document = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert document["mask"] == "importance" and document["score"] == "fisher"
    assert document["budget"] == 0.1 and document["density"] == chosen.density
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert not [k for k in tensors if k.endswith("_delta")]  # nothing saved dense
    stored = sum(v.numel() for k, v in tensors.items() if k.endswith("_delta.values"))
    assert stored == count_parameters(model)
    assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith(".indices"))

    fresh, _ = load_base(tiny_dir("llama"), quant=BASES[base][0])
    load_adapter(fresh, tmp_path / "a")
    assert list_adapters(fresh)["default"] == chosen
    assert torch.equal(logits(fresh, ids), adapted)

    merged, _ = merge(fresh, "default")
    assert not list(adapter_modules(merged))
    relative = (logits(merged, ids) - adapted).abs().max() / adapted.abs().max()
    print(f"{base} {structure}: merged vs unmerged relative max |dlogit| = {relative:.2e}")
    assert relative <= 1e-5


def test_a_damaged_index_file_is_refused_by_name(tiny_dir, tmp_path):
    model = masked_model(tiny_dir, "nf4", budget=50)
    choose_mask(model, "default", batches(1))
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS_FILE
    tensors = load_file(str(path))
    key = "base_model.model.lm_head.weight_delta.indices"
    assert tensors[key].numel() > 0
    tensors[key] = torch.full_like(tensors[key], 10**9)
    save_file(tensors, str(path))
    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    with pytest.raises(ValueError, match=r"lm_head\.weight_delta\.indices.*ascending, unique"):
        load_adapter(fresh, tmp_path / "a")


@pytest.mark.parametrize("budget", [0, -3, 1.0, 1.5, True, None])
def test_an_unusable_budget_is_named(budget):
    with pytest.raises(ValueError, match=rf"budget={budget!r}"):
        SelectiveConfig(mask="importance", budget=budget)


def test_a_budget_above_the_parameter_count_is_named(tiny_dir):
    model, _ = load_base(tiny_dir("llama"), quant="nf4")
    config = SelectiveConfig(patterns=(r"model\.norm\.weight$",), mask="importance", budget=65)
    with pytest.raises(ValueError, match=r"budget=65 asks for 65 .* only 64"):
        add_adapter(model, config)
    assert not list(adapter_modules(model))
    with pytest.raises(ValueError, match=r"budget=5 needs mask='importance'"):
        SelectiveConfig(budget=5)


def test_a_run_config_chooses_the_mask_and_lowers_the_loss(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    train, _, _ = make_splits("reverse", (32, 4, 4), seed=0)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "run.toml").write_text(
        f'model = "{tiny_dir("llama")}"\nquant = "nf4"\noutput_dir = "out"\n'
        '[method]\ntype = "selective"\npatterns = ["norm\\\\.weight$", "lm_head\\\\.weight$"]\n'
        'mask = "importance"\nbudget = 0.2\ncalibration_batches = 2\n'
        '[data]\ntrain = "data/train.jsonl"\n'
        "[train]\nmax_steps = 8\nbatch_size = 4\nlr = 2e-2\nmax_seq_len = 32\n"
        'val_fraction = 0.0\nscheduler = "constant"\n'
    )
    with pytest.raises(ConfigError, match="method.selected and method.density"):
        load_run_config(folder / "run.toml", ['method.selected={"lm_head.weight" = 3}'])
    outcome = run(load_run_config(folder / "run.toml"))
    assert "importance mask keeps" in capsys.readouterr().out
    losses = [
        json.loads(line)["loss"]
        for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    print(f"run config: train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    assert losses[-1] < losses[0]
    saved = json.loads((outcome.result.last_adapter_dir / CONFIG_FILE).read_text())
    total = 5 * 64 + TINY_VOCAB * 64
    assert sum(saved["selected"].values()) == round(0.2 * total)
    assert saved["density"] == pytest.approx(round(0.2 * total) / total)


def test_a_resumed_run_chooses_the_same_mask_and_continues_exactly(tiny_dir, tmp_path):
    rows = [{"prompt": f"reverse: {w} ->", "completion": f" {w[::-1]}"} for w in WORDS] * 2
    config = TrainConfig(
        max_steps=4, lr=1e-2, batch_size=4, max_seq_len=32, val_fraction=0.0, save_every=2,
        quiet=True,
    )  # fmt: skip

    def train_run(output_dir, **kwargs):
        model, tokenizer = load_base(tiny_dir("llama"), quant="nf4")
        add_adapter(model, SelectiveConfig(patterns=UNQUANTIZED, mask="importance", budget=0.05))
        return train(model, tokenizer, rows, config, output_dir, **kwargs)

    whole = train_run(tmp_path / "whole")
    first = train_run(tmp_path / "parts", _stop_after_steps=2)
    assert first.interrupted and first.steps == 2
    resumed = train_run(tmp_path / "parts", resume=True)
    assert resumed.train_losses == whole.train_losses
    mine = load_file(str(resumed.last_adapter_dir / WEIGHTS_FILE))
    theirs = load_file(str(whole.last_adapter_dir / WEIGHTS_FILE))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_merged_export_verifies_and_separate_mode_refuses_whole_matrices(tiny_dir, tmp_path):
    model, _ = load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    config = SelectiveConfig(
        patterns=(*UNQUANTIZED, *LINEAR), mask="importance", budget=0.1, init="random"
    )
    add_adapter(model, config)
    choose_mask(model, "default", batches(1))
    save_adapter(model, tmp_path / "a")
    result = export(
        tiny_dir("llama"), tmp_path / "merged", adapters={"s": tmp_path / "a"}, weights="fp32",
        mode="merged", quiet=True,
    )  # fmt: skip
    assert result.verify.passed
    with pytest.raises(ValueError, match=r"tunes model\.embed_tokens\.weight.*mode='merged'"):
        export(
            tiny_dir("llama"), tmp_path / "separate", adapters={"s": tmp_path / "a"},
            weights="fp32", mode="separate", quiet=True,
        )  # fmt: skip
