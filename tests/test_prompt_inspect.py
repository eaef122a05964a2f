"""`edgepeft inspect ADAPTER_DIR`: each virtual token's nearest vocabulary tokens.

neighbours == a brute-force cosine search (one vocabulary row at a time)
a virtual token started from a word's embedding lists that word first (similarity 1)
p-tuning is read from its saved table; LoRA and missing bases are refused by name
the command: text and --json, base from the adapter or --base
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from edgepeft import LoraConfig, PromptTuningConfig, add_adapter, load_base, save_adapter
from edgepeft.cli import main
from edgepeft.config import PromptEncoderConfig
from edgepeft.prompt_inspect import NotASoftPromptError, inspect_prompt, nearest_tokens
from edgepeft.tiny import TINY_VOCAB, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _saved(tiny_dir, tmp_path, config, name="soft", **context):
    model, tokenizer = load_base(tiny_dir("llama"), quant="none")
    torch.manual_seed(0)
    add_adapter(model, config, name, **context)
    return model, tokenizer, save_adapter(model, tmp_path / name, name)


def _brute_force(prompt: torch.Tensor, embeddings: torch.Tensor, k: int):
    """(similarity, id) of the k most similar rows, one row at a time, in plain Python order."""
    scored = [
        (F.cosine_similarity(prompt, row, dim=0).item(), v) for v, row in enumerate(embeddings)
    ]
    return sorted(scored, key=lambda pair: -pair[0])[:k]


def test_neighbours_equal_a_brute_force_search(tiny_dir, tmp_path):
    model, _, folder = _saved(tiny_dir, tmp_path, PromptTuningConfig(num_virtual_tokens=3))
    table = model.edgepeft_prompts.embeddings["soft"].detach()
    embeddings = model.get_input_embeddings().weight.detach()
    report = inspect_prompt(folder, top_k=4)
    assert report.peft_type == "PROMPT_TUNING" and report.base == str(tiny_dir("llama"))
    assert report.base_matches is True and report.vocab_searched == TINY_VOCAB
    assert len(report.tokens) == 3
    tokenizer = tiny_tokenizer()
    for i, token in enumerate(report.tokens):
        want = _brute_force(table[i], embeddings, 4)
        assert [n.token_id for n in token.neighbours] == [v for _, v in want]
        for n, (similarity, v) in zip(token.neighbours, want, strict=True):
            assert abs(n.similarity - similarity) <= 1e-5
            assert n.text == tokenizer.decode([v])
        assert abs(token.norm - table[i].norm().item()) <= 1e-5
    mean = embeddings.norm(dim=-1).mean().item()
    assert abs(report.vocab_norm_mean - mean) <= 1e-5 * mean


def test_a_token_started_from_a_word_lists_that_word_first(tiny_dir, tmp_path):
    tokenizer = tiny_tokenizer()
    word = " fox"
    (word_id,) = tokenizer(word)["input_ids"]  # one token in the tiny vocabulary
    config = PromptTuningConfig(num_virtual_tokens=2, init="text", init_text=word)
    _, _, folder = _saved(tiny_dir, tmp_path, config, tokenizer=tokenizer)
    report = inspect_prompt(folder, top_k=3)
    for token in report.tokens:  # the text repeats to fill both virtual tokens
        first = token.neighbours[0]
        assert (first.token_id, first.text) == (word_id, word)
        assert abs(first.similarity - 1.0) <= 1e-6
        assert token.neighbours[1].similarity < 1.0 - 1e-3


def test_p_tuning_is_read_from_its_saved_table(tiny_dir, tmp_path):
    config = PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=16)
    model, _, folder = _saved(tiny_dir, tmp_path, config, name="pt")
    with torch.no_grad():
        table = model.edgepeft_prompts.flat("pt")
    report = inspect_prompt(folder, top_k=2)
    assert report.peft_type == "P_TUNING"
    sims, ids = nearest_tokens(table, model.get_input_embeddings().weight.detach(), 2)
    assert [[n.token_id for n in t.neighbours] for t in report.tokens] == ids.tolist()
    assert sims.shape == (2, 2)


def test_zero_rows_score_zero_not_nan():
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0]])
    sims, ids = nearest_tokens(torch.tensor([[3.0, 0.0]]), embeddings, 3)
    assert ids.tolist() == [[1, 0, 2]] and sims.tolist() == [[1.0, 0.0, 0.0]]


def test_other_adapters_and_missing_bases_are_refused(tiny_dir, tmp_path):
    _, _, lora = _saved(tiny_dir, tmp_path, LoraConfig(r=2), name="lora")
    with pytest.raises(NotASoftPromptError, match="holds a LORA adapter.*PROMPT_TUNING, P_TUNING"):
        inspect_prompt(lora)
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        inspect_prompt(tmp_path / "nothing")
    _, _, soft = _saved(tiny_dir, tmp_path, PromptTuningConfig(num_virtual_tokens=1))
    document = json.loads((soft / "adapter_config.json").read_text())
    document["base_model_name_or_path"] = None
    (soft / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="records no base model; pass the base"):
        inspect_prompt(soft)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        inspect_prompt(soft, base=tiny_dir("llama"), top_k=0)
    # Another base of another width: named, with what to pass.
    with pytest.raises(ValueError, match="virtual tokens have width 64, but .* width 32"):
        inspect_prompt(soft, base=_narrow_base(tmp_path))


def _narrow_base(tmp_path):
    """A tiny llama of hidden size 32 (the usual one has 64)."""
    from edgepeft.tiny import tiny_model

    folder = tmp_path / "narrow"
    tiny_model(
        "llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_the_command_prints_text_and_json(tiny_dir, tmp_path, capsys):
    _, _, folder = _saved(tiny_dir, tmp_path, PromptTuningConfig(num_virtual_tokens=2))
    assert main(["inspect", str(folder), "--top-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "PROMPT_TUNING, 2 virtual tokens" in text and "top 3" in text
    assert len([line for line in text.splitlines() if line.lstrip().startswith("v")]) == 2

    assert main(["inspect", str(folder), "--json", "--base", str(tiny_dir("llama"))]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["top_k"] == 5 and len(document["tokens"]) == 2
    assert len(document["tokens"][0]["neighbours"]) == 5

    # A base model folder still gets the base report; --base there is a user error.
    assert main(["inspect", str(tiny_dir("llama")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "llama"
    assert main(["inspect", str(tiny_dir("llama")), "--base", str(tiny_dir("llama"))]) == 2
    assert "--base is for adapter folders" in capsys.readouterr().err
