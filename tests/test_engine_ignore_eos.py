"""Engine.generate / stream with ignore_eos and min_new_tokens: a fixed number of tokens.

The tiny export's eos is set to the token greedy decoding picks first, so by default every
request ends at once; ignore_eos must then run exactly max_new_tokens, and min_new_tokens
must hold eos (and stop strings) back until that many tokens are out.
"""

from __future__ import annotations

import pytest

from edgepeft.export import api
from edgepeft.runtime import Engine

PROMPTS = ["the quick brown fox", "edge devices run small models"]
NEW = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ignore-eos") / "export"
    api.export(tiny_dir("llama"), out, weights="fp32", quant="none", verify=False, quiet=True)
    engine = Engine(out, threads=1)
    firsts = [r.token_ids[0] for r in engine.generate(PROMPTS, max_new_tokens=1, return_result=True)]
    engine.eos_token_ids = frozenset(firsts)  # what the export's eos would be: greedy's first pick
    return engine


def test_by_default_the_request_ends_at_the_first_eos(engine):
    for result in engine.generate(PROMPTS, max_new_tokens=NEW, return_result=True):
        assert result.token_ids == [] and result.finish_reason == "eos"


def test_ignore_eos_runs_exactly_max_new_tokens(engine):
    results = engine.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True, return_result=True)
    for result in results:
        assert len(result.token_ids) == NEW and result.finish_reason == "length"
        assert not set(result.token_ids) & engine.eos_token_ids
    [alone] = [engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)]
    assert "".join(engine.stream(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)) == alone


def test_min_new_tokens_holds_eos_back_until_that_many_tokens(engine):
    results = engine.generate(PROMPTS, max_new_tokens=NEW, min_new_tokens=3, return_result=True)
    for result in results:
        assert 3 <= len(result.token_ids) <= NEW


def test_stop_strings_do_not_end_the_request_before_min_new_tokens(engine):
    text = engine.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)
    stop = text[:1]  # found in the first token's text: by default the request stops there
    early = engine.generate(
        PROMPTS[0], max_new_tokens=NEW, min_new_tokens=1, stop=stop, return_result=True
    )
    assert early.finish_reason == "stop" and early.text == ""
    held = engine.generate(
        PROMPTS[0], max_new_tokens=NEW, ignore_eos=True, stop=stop, return_result=True
    )
    assert len(held.token_ids) == NEW and held.text.startswith(stop)


def test_min_new_tokens_must_fit_max_new_tokens(engine):
    with pytest.raises(ValueError, match="min_new_tokens"):
        engine.generate(PROMPTS[0], max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        engine.generate(PROMPTS[0], max_new_tokens=4, min_new_tokens=-1)


def test_edgepeft_run_takes_ignore_eos(engine, capsys):
    from edgepeft.cli import main

    args = ["run", str(engine.export_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "3"]
    assert main([*args, "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()
