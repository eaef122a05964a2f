"""scripts/bench_qlora.py: its task (seeded, train and test disjoint), exact-match scoring,
batched greedy generation against each prompt alone, its table and reading; the real-model
smoke run only with -m real."""

from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_qlora")


def test_the_task_is_the_same_for_a_seed_and_another_for_another_seed(bench):
    assert bench.task(30, 10, seed=3) == bench.task(30, 10, seed=3)
    assert bench.task(30, 10, seed=3) != bench.task(30, 10, seed=4)
    train, test = bench.task(30, 10)
    assert (len(train), len(test)) == (30, 10)


def test_no_test_entity_is_seen_in_training(bench):
    train, test = bench.task(400, 100)

    def entities(people):
        first = {p.name.split()[0] for p in people}
        last = {p.name.split()[1] for p in people}
        return first, last, {p.city for p in people}, {p.job for p in people}

    for seen, held_out in zip(entities(train), entities(test), strict=True):
        assert seen and held_out and not seen & held_out
    assert len({p.sentence.split(p.name)[0] for p in train}) > 3  # several templates used


def test_every_answer_is_the_json_of_what_the_sentence_says(bench):
    for person in bench.task(50, 50)[1]:
        fields = json.loads(person.answer)
        assert list(fields) == ["name", "age", "city", "job"]
        assert fields == {"name": person.name, "age": person.age, "city": person.city,
                          "job": person.job}  # fmt: skip
        for value in (person.name, str(person.age), person.city, person.job):
            assert value in person.sentence
        assert " a a" not in person.sentence and " a e" not in person.sentence  # articles
        row = person.row()["messages"]
        assert [m["role"] for m in row] == ["system", "user", "assistant"]
        assert row[1]["content"] == person.sentence and row[2]["content"] == person.answer


def test_exact_match_is_the_exact_string_outer_whitespace_aside(bench):
    person = bench.task(1, 1)[1][0]
    answer = person.answer
    assert bench.exact_match(f" {answer}\n", answer)
    swapped = json.dumps(dict(reversed(list(json.loads(answer).items()))))
    assert not bench.exact_match(swapped, answer)  # same fields, another order
    assert not bench.exact_match(answer.replace(": ", ":"), answer)
    people = bench.task(1, 4)[1]
    predictions = [people[0].answer, "no", people[2].answer + " ", people[2].answer]
    assert bench.em(predictions, people) == 0.5
    assert bench.agreement(predictions, [people[0].answer, "no", "x", "y"]) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 4"):
        bench.em(predictions[:3], people)


def test_answers_are_cut_before_the_first_eos(bench):
    assert bench.until_eos([5, 6, 2, 7, 2], 2) == [5, 6]
    assert bench.until_eos([5, 6], 2) == [5, 6]


def test_batched_greedy_generation_equals_each_prompt_alone(bench, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32).eval()
    prompts = [[3, 9, 14, 5, 7, 21], [4, 8], [11, 12, 13, 30]]  # left padding of 4 and 2
    eos = 1
    together = bench.torch_generate(model, prompts, max_new_tokens=6, eos=eos, batch=3)
    alone = [bench.torch_generate(model, [p], max_new_tokens=6, eos=eos)[0] for p in prompts]
    assert together == alone
    assert all(eos not in ids for ids in together) and any(len(ids) > 1 for ids in together)


def _rows(bench, int4_em: float, int4_tok_s: float):
    row = bench.Row
    return [
        row(bench.PYTORCH_BASE, 0.0, 0.0),
        row(bench.PYTORCH, 0.94, 1.0, 0.0, 1.0),
        row(bench.DEFAULT, int4_em, 0.96, 0.012, 0.97, int4_tok_s, 150.0, 90.5, 4.5),
        row(bench.EXPORTS["merged-int4"][0], 0.92, 0.9, 0.02, 0.96, 140.0, None, 90.0),
        row(bench.PEER, 0.9, 0.88, 0.05, 0.93, 100.0, 120.0, 100.6, 18.0),
        row("llama.cpp Q8_0 + LoRA", skipped="RuntimeError: llama worker failed"),
    ]


def test_table_ratios_are_to_llama_cpp_q4_k_m_with_the_lora(bench):
    lines = bench.table(_rows(bench, 0.94, 125.0))
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines[2:]}  # fmt: skip
    assert len(cells) == 6 and all(len(c) == 9 for c in cells.values())
    ours = cells[bench.DEFAULT]
    assert ours[:6] == ["0.940", "96%", "0.0120", "97.0%", "125.0", "1.25"]
    assert ours[6:] == ["150.0", "90.5", "4.50"]
    assert cells[bench.PEER][5] == "1.00"
    assert cells[bench.PYTORCH_BASE][2:] == ["–"] * 7  # nothing measured is shown as a dash
    assert cells["llama.cpp Q8_0 + LoRA"][0] == "skipped: RuntimeError: llama worker failed"


@pytest.mark.parametrize(
    ("int4_em", "tok_s", "equal", "goal"),
    [(0.94, 125.0, "equal", "met"), (0.92, 125.0, "not equal", "met"),
     (0.94, 90.0, "equal", "missed")],
)  # fmt: skip
def test_reading_says_equal_and_met_or_not_with_the_numbers(bench, int4_em, tok_s, equal, goal):
    text = bench.reading(_rows(bench, int4_em, tok_s))
    assert f"is {int4_em:.3f} against PyTorch's 0.940: **{equal}**" in text
    assert f"**{tok_s / 100:.2f}x** (goal >= 1.0x: **{goal}**)" in text
    assert "merged int4 1.40x" in text


def test_reading_is_not_judged_without_the_int4_row(bench):
    rows = [r for r in _rows(bench, 0.94, 125.0) if r.contender != bench.DEFAULT]
    assert bench.reading(rows) == "**Reading**: not judged, no int4 row."


def test_qalora_reading_judges_the_merged_int4_row(bench):
    rows = [r for r in _rows(bench, 0.94, 125.0) if r.contender != bench.DEFAULT]
    text = bench.reading(rows, merged_default=True)
    assert "default int4 format (merged) is 0.920 against PyTorch's 0.940: **not equal**" in text
    assert "**1.40x** (goal >= 1.0x: **met**)" in text
    assert bench.QALORA.qalora and bench.QALORA.section == "qlora-qalora"
    assert set(bench.QALORA.exports) == {"merged-int4", "merged-int4-exact"}
    assert (bench.FULL.section, bench.INT4.section) == ("qlora", "qlora-int4")


@pytest.mark.real
def test_quick_run_on_the_real_model(bench, tmp_path):
    out, numbers = tmp_path / "qlora.md", tmp_path / "qlora.json"
    assert bench.main(["--quick", "--output", str(out), "--json", str(numbers)]) == 0
    rows = {r["contender"]: r for r in json.loads(numbers.read_text())["rows"]}
    assert rows[bench.PYTORCH]["same"] == 1.0
    assert not rows[bench.DEFAULT]["skipped"] and rows[bench.DEFAULT]["kl"] < 0.5
    assert "## QLoRA" in out.read_text()
