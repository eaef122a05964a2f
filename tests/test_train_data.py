"""Training data: every row format, exact completion-only masks, packing, splits, bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from edgepeft.config import TrainConfig
from edgepeft.tiny import tiny_tokenizer
from edgepeft.train.data import (
    IGNORE,
    DataError,
    EpochSampler,
    collate,
    load_rows,
    pack_examples,
    prepare_data,
    split_rows,
    tokenize_rows,
)

# Every message becomes "<s>role: content</s>"; the generation prompt is "<s>assistant: ".
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
EOS = 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(tok, row, **config):
    rows, report = load_rows([row])
    assert not report.bad, report
    return tokenize_rows(rows, tok, TrainConfig(**config))


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- row formats and masks


def test_prompt_completion_masks_exactly_the_prompt(tok):
    prompt, completion = "translate to french: hello ->", " bonjour"
    [example] = one(tok, {"prompt": prompt, "completion": completion})
    p, c = encode(tok, prompt), encode(tok, completion)
    assert example.input_ids == tuple(p + c + [EOS])  # no BOS: this tokenizer adds none
    assert example.labels == tuple([IGNORE] * len(p) + c + [EOS])
    assert example.label_tokens == len(c) + 1


def test_completion_only_off_trains_on_every_token(tok):
    [example] = one(tok, {"prompt": "the quick", "completion": " fox"}, completion_only=False)
    assert example.labels == example.input_ids


def test_text_rows_train_on_everything_and_end_with_eos(tok):
    [example] = one(tok, {"text": "edge devices run small models"})
    assert example.input_ids == tuple(encode(tok, "edge devices run small models") + [EOS])
    assert example.labels == example.input_ids


def test_bos_is_added_when_the_tokenizer_adds_one():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    rows, _ = load_rows([{"prompt": "the", "completion": " fox"}])
    [example] = tokenize_rows(rows, tok, TrainConfig())
    assert example.input_ids[0] == 1 and example.labels[0] == IGNORE
    assert example.input_ids[1:] == tuple(encode(tok, "the") + encode(tok, " fox") + [EOS])


def test_chat_rows_train_on_every_assistant_turn_only(tok):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "dog"},
        {"role": "assistant", "content": "chien"},
    ]
    [example] = one(tok, {"messages": messages})
    pieces = [
        ("<s>system: be brief</s><s>user: hello</s><s>assistant: ", False),
        ("bonjour</s>", True),
        ("<s>user: dog</s><s>assistant: ", False),
        ("chien</s>", True),
    ]
    ids, labels = [], []
    for text, trained in pieces:
        piece = encode(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    assert example.input_ids == tuple(ids)
    assert example.labels == tuple(labels)
    trained_text = tok.decode([t for t in example.labels if t != IGNORE])
    assert trained_text == "bonjour</s>chien</s>"


def test_chat_rows_without_a_template_are_a_clear_error(tok):
    rows, _ = load_rows([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_rows(rows, tok, TrainConfig())


def test_txt_files_hold_one_example_per_paragraph(tmp_path, tok):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\n\nsecond one\n\nthird\n")
    rows, report = load_rows(path)
    assert [(r.line, r["text"]) for r in rows] == [
        (1, "first paragraph\nstill first"),
        (5, "second one"),
        (7, "third"),
    ]
    assert report.rows == 3 and not report.bad


# ---------------------------------------------------------------- truncation and packing


def test_truncation_keeps_the_start_and_counts_the_row(tok):
    rows, report = load_rows([{"prompt": "the quick", "completion": " brown fox jumps over the lazy dog"}])
    [example] = tokenize_rows(rows, tok, TrainConfig(max_seq_len=6), report=report)
    full = encode(tok, "the quick") + encode(tok, " brown fox jumps over the lazy dog") + [EOS]
    assert example.input_ids == tuple(full[:6])
    assert report.truncated == 1 and report.kept == 1 and report.tokens == 6


def test_a_prompt_filling_max_seq_len_is_a_bad_row_with_its_line(tok):
    rows, report = load_rows([
        {"prompt": "a", "completion": " b"},
        {"prompt": "the quick brown fox jumps over the lazy dog", "completion": " ok"},
    ])
    examples = tokenize_rows(rows, tok, TrainConfig(max_seq_len=4), report=report)
    assert len(examples) == 1 and report.kept == 1
    [bad] = report.bad
    assert bad.line == 2 and "no completion tokens left" in bad.reason and "max_seq_len=4" in bad.reason
    with pytest.raises(DataError, match=r"<rows>:2: no completion tokens left"):
        tokenize_rows(rows, tok, TrainConfig(max_seq_len=4, bad_rows="error"))


def test_packing_concatenates_whole_examples_up_to_max_seq_len(tok):
    rows, _ = load_rows([{"prompt": "the" * (i % 3 + 1), "completion": " fox" * (i % 4 + 1)} for i in range(12)])
    examples = tokenize_rows(rows, tok, TrainConfig())
    packed = pack_examples(examples, max_seq_len=16)
    assert all(len(p.input_ids) <= 16 for p in packed)
    assert len(packed) < len(examples)
    flat = lambda xs, f: [t for x in xs for t in getattr(x, f)]  # noqa: E731
    assert flat(packed, "input_ids") == flat(examples, "input_ids")  # order and content kept
    assert flat(packed, "labels") == flat(examples, "labels")
    # Greedy: the next example would not have fitted into any packed row.
    starts = iter(examples)
    for row in packed:
        used = 0
        while used < len(row.input_ids):
            used += len(next(starts).input_ids)
        assert used == len(row.input_ids)


def test_prepare_data_packs_training_rows_but_not_validation_rows(tok):
    rows = [{"prompt": "the", "completion": " fox" * (i % 3 + 1)} for i in range(20)]
    config = TrainConfig(packing=True, max_seq_len=32, val_fraction=0.2)
    prepared = prepare_data(rows, tok, config)
    assert len(prepared.val) == 4
    assert all(len(e.input_ids) <= 32 for e in prepared.train)
    assert sum(len(e.input_ids) for e in prepared.train) + sum(len(e.input_ids) for e in prepared.val) == (
        prepared.report.tokens
    )
    assert len(prepared.train) < 16


# ---------------------------------------------------------------- split, sampler, collate


def test_split_is_deterministic_by_seed_and_partitions_the_rows():
    rows, _ = load_rows([{"text": f"row {i}"} for i in range(50)])
    train, val = split_rows(rows, 0.2, seed=3)
    again = split_rows(rows, 0.2, seed=3)
    other = split_rows(rows, 0.2, seed=4)
    assert [r.line for r in train] == [r.line for r in again[0]]
    assert [r.line for r in val] == [r.line for r in again[1]]
    assert [r.line for r in val] != [r.line for r in other[1]]
    assert len(val) == 10 and sorted(r.line for r in train + val) == list(range(1, 51))
    assert split_rows(rows[:2], 0.01, seed=0)[1], "a positive fraction holds out at least one row"
    assert split_rows(rows, 0.0, seed=0)[1] == []


def test_sampler_reshuffles_per_epoch_and_resumes_from_its_position():
    sampler = EpochSampler(10, batch_size=4, seed=7)
    stream = [sampler.next_batch() for _ in range(9)]  # 3 epochs: 4 + 4 + 2 per epoch
    assert [len(b) for b in stream[:3]] == [4, 4, 2]
    epochs = [sum(stream[i : i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]
    same_seed = EpochSampler(10, batch_size=4, seed=7)
    assert [same_seed.next_batch() for _ in range(9)] == stream

    resumed = EpochSampler(10, batch_size=4, seed=7)
    resumed.load_state_dict({"epoch": 1, "index": 4, "size": 10, "seed": 7})
    assert [resumed.next_batch() for _ in range(5)] == stream[4:9]
    with pytest.raises(ValueError, match="over 10 examples with seed 7; this run has 12"):
        EpochSampler(12, 4, 7).load_state_dict(sampler.state_dict())


def test_collate_pads_right_with_pad_id_and_ignored_labels(tok):
    rows, _ = load_rows([{"prompt": "the", "completion": " fox"}, {"text": "the quick brown fox"}])
    short, long = sorted(tokenize_rows(rows, tok, TrainConfig()), key=lambda e: len(e.input_ids))
    batch = collate([short, long], pad_id=0)
    n, t = len(short.input_ids), len(long.input_ids)
    assert batch.input_ids.shape == (2, t)
    assert batch.input_ids[0].tolist() == list(short.input_ids) + [0] * (t - n)
    assert batch.labels[0].tolist() == list(short.labels) + [IGNORE] * (t - n)
    assert batch.attention_mask.tolist() == [[1] * n + [0] * (t - n), [1] * t]
    assert batch.label_tokens == short.label_tokens + long.label_tokens
    assert batch.tokens == n + t
    assert batch.input_ids.dtype == torch.long


# ---------------------------------------------------------------- bad rows


BAD_FILE = [
    json.dumps({"prompt": "good", "completion": " row"}),
    "{not json",
    json.dumps({"prompt": "no completion"}),
    json.dumps({"prompt": "x", "completion": 3}),
    "",
    json.dumps({"prompt": "x", "completion": "   "}),
    json.dumps(["a", "list"]),
    json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
    json.dumps({"title": "nothing usable"}),
    json.dumps({"text": "fine too"}),
]


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", BAD_FILE)
    rows, report = load_rows(path)
    assert [r.line for r in rows] == [1, 10]
    assert report.rows == 9 and len(report.bad) == 7  # the blank line 5 is no row
    reasons = {b.line: b.reason for b in report.bad}
    assert set(reasons) == {2, 3, 4, 6, 7, 8, 9}
    assert "invalid JSON" in reasons[2]
    assert "missing key 'completion'" in reasons[3]
    assert "'completion' must be a string" in reasons[4]
    assert reasons[6] == "empty completion"
    assert "expected a JSON object" in reasons[7]
    assert "no non-empty assistant message" in reasons[8]
    assert "no 'prompt'/'completion'" in reasons[9]
    text = str(report)
    assert f"{path}:2: invalid JSON" in text and "7 bad" in text


def test_bad_rows_error_stops_at_the_first_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", BAD_FILE)
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_rows(path, bad_rows="error")
    with pytest.raises(DataError, match=r"data.jsonl:2"):
        prepare_data(path, tiny_tokenizer(), TrainConfig(bad_rows="error"))


def test_no_usable_rows_and_unknown_files_are_clear_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="no usable training rows"):
        prepare_data([{"prompt": "only", "completion": ""}], tok, TrainConfig())
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.jsonl or \.txt"):
        load_rows(tmp_path / "data.csv")


# ---------------------------------------------------------------- bytes that are not UTF-8


GOOD = json.dumps({"prompt": "good", "completion": " row"}).encode()
LATIN_1 = '{"prompt": "caf\xe9", "completion": " au lait"}'.encode("latin-1")


def test_a_row_that_is_not_utf8_is_a_bad_row_with_file_and_line(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, LATIN_1, GOOD]) + b"\n")
    rows, report = load_rows(path)
    assert [r.line for r in rows] == [1, 3] and report.rows == 3
    [bad] = report.bad
    assert bad.line == 2 and "not UTF-8" in bad.reason and "0xe9" in bad.reason
    assert f"{path}:2: not UTF-8" in str(report)
    prepared = prepare_data(path, tok, TrainConfig(val_fraction=0.0))
    assert len(prepared.train) == 2 and prepared.report.bad == [bad]
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        load_rows(path, bad_rows="error")


def test_a_txt_paragraph_with_a_line_that_is_not_utf8_is_skipped_with_its_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first paragraph\n\nsecond,\ncaf\xe9 here\n\nthird\n")
    rows, report = load_rows(path)
    assert [(r.line, r["text"]) for r in rows] == [(1, "first paragraph"), (6, "third")]
    [bad] = report.bad
    assert bad.line == 4 and "not UTF-8" in bad.reason and "paragraph from line 3" in bad.reason


def test_a_file_with_no_usable_row_fails_naming_it_before_any_model_loads(tmp_path):
    from edgepeft.train.data import check_data
    from edgepeft.train.run import run
    from edgepeft.train.run_config import from_dict

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(LATIN_1 + b"\n" + LATIN_1 + b"\n")
    with pytest.raises(ValueError, match=rf"no usable rows in {path}"):
        check_data(str(path), TrainConfig())
    config = from_dict(
        {
            "model": str(tmp_path / "no-such-model"),  # loading it would fail differently
            "method": {"type": "lora", "r": 2},
            "data": {"train": str(path)},
            "output_dir": str(tmp_path / "out"),
        }
    )
    with pytest.raises(ValueError, match=rf"{path}:1: not UTF-8"):
        run(config, echo=lambda _text: None)
