"""`edgepeft train CONFIG`: config files, overrides, key checking, and whole runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgepeft.cli import main
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
    TrainConfig,
    UniPELTConfig,
)
from edgepeft.tasks import make_splits
from edgepeft.train.run_config import (
    METHOD_TYPES,
    RUN_CONFIG_FILE,
    ConfigError,
    from_dict,
    load_run_config,
    parse_override,
)

TOML = """
model = "{model}"
quant = "none"
adapter = "rev"
output_dir = "out"

[method]
type = "lora"
r = 4
target_modules = ["q_proj", "v_proj"]

[data]
train = "data/train.jsonl"
val = "data/val.jsonl"

[train]
max_steps = 3
batch_size = 4
lr = 5e-3
max_seq_len = 32
eval_every = 2
save_every = 2

[eval]
data = "data/test.jsonl"
max_new_tokens = 6
"""

YAML = """
model: {model}
quant: none
adapter: rev
output_dir: out
method: {{type: lora, r: 4, target_modules: [q_proj, v_proj]}}
data: {{train: data/train.jsonl, val: data/val.jsonl}}
train: {{max_steps: 3, batch_size: 4, lr: 5e-3, max_seq_len: 32, eval_every: 2, save_every: 2}}
eval: {{data: data/test.jsonl, max_new_tokens: 6}}
"""


def write_rows(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run_dir(tmp_path, tiny_dir):
    """A folder with run.toml, run.yaml and their data; paths in them are relative."""
    folder = tmp_path / "project"
    train, val, test = make_splits("reverse", (24, 4, 4), seed=0)
    for name, rows in (("train", train), ("val", val), ("test", test)):
        write_rows(folder / "data" / f"{name}.jsonl", rows)
    (folder / "run.toml").write_text(TOML.format(model=tiny_dir("llama")))
    (folder / "run.yaml").write_text(YAML.format(model=tiny_dir("llama")))
    return folder


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line of stderr (transformers' loading bars may come before it)."""
    lines = err.replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("edgepeft train: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ---------------------------------------------------------------- the config file


def test_toml_and_yaml_give_the_same_config_with_paths_relative_to_the_file(run_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the file's folder: paths must not depend on the cwd
    toml = load_run_config(run_dir / "run.toml")
    assert dataclasses.replace(load_run_config(run_dir / "run.yaml"), source=toml.source) == toml
    assert toml.train_data == run_dir / "data" / "train.jsonl"
    assert toml.output_dir == run_dir / "out"
    assert toml.eval.data == run_dir / "data" / "test.jsonl" and toml.eval.max_new_tokens == 6
    assert toml.train == TrainConfig(
        max_steps=3, batch_size=4, lr=5e-3, max_seq_len=32, eval_every=2, save_every=2,
        val_data=str(run_dir / "data" / "val.jsonl"),
    )  # fmt: skip
    assert toml.method == LoraConfig(r=4, target_modules=("q_proj", "v_proj"))
    assert (toml.quant, toml.adapter, toml.max_memory) == ("none", "rev", None)


def test_overrides_are_toml_scalars_and_their_paths_resolve_against_the_cwd(run_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = load_run_config(
        run_dir / "run.toml",
        ["train.lr=1e-4", "method.r=16", "quant=nf4", "train.quiet=true", "data.train=other.jsonl",
         'method.target_modules=["o_proj"]', "max_memory=2GiB", "method.type=dora"],
    )  # fmt: skip
    assert config.train.lr == 1e-4 and config.train.quiet is True
    assert config.method == LoraConfig(r=16, target_modules=("o_proj",), use_dora=True)
    assert config.method_type == "dora"
    assert config.quant == "nf4" and config.max_memory == "2GiB"
    assert config.train_data == tmp_path / "other.jsonl"
    assert parse_override("a.b='x=y'") == (["a", "b"], "x=y")
    assert parse_override("eval=runs/test.jsonl") == (["eval"], "runs/test.jsonl")


@pytest.mark.parametrize(
    ("override", "named", "valid"),
    [
        ("modle=x", "'modle'", "model, quant, double_quant"),
        ("train.lrr=1", "'train.lrr'", "max_seq_len"),
        ("method.rank=4", "'method.rank'", "target_modules"),
        ("data.test=x.jsonl", "'data.test'", "train, val"),
        ("eval.temperature=0", "'eval.temperature'", "max_new_tokens"),
    ],
)
def test_an_unknown_key_is_named_with_the_valid_ones(run_dir, override, named, valid):
    with pytest.raises(ConfigError) as info:
        load_run_config(run_dir / "run.toml", [override])
    message = str(info.value)
    assert f"unknown key {named}" in message and valid in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.type=adalora", "method.type must be one of lora, dora, ia3"),
        ("quant=int3", "quant must be one of none, nf4"),
        ("train.batch_size=0", "batch_size must be a positive integer"),
        ("method.r=many", "method.r must be int, got 'many'"),
        ("train.packing=1", "train.packing must be bool, got 1"),
        ('method.target_modules=[1, 2]', "method.target_modules must be tuple[str, ...] | str | None"),
        ("max_memory=lots", "cannot read memory size 'lots'"),
        ("model=tiny:bert", "no tiny 'bert' model"),
        ("train.lr", "expected KEY=VALUE"),
        ("method.type=dora", None),
    ],
)
def test_bad_values_are_errors_that_say_what_to_write(run_dir, override, expected):
    if expected is None:  # the control: a valid override loads
        assert load_run_config(run_dir / "run.toml", [override]).method.use_dora
        return
    with pytest.raises(ConfigError) as info:
        load_run_config(run_dir / "run.toml", [override])
    assert expected in str(info.value)


def test_every_method_type_builds_its_config(run_dir):
    base = {"model": "m", "data": {"train": "t.jsonl"}, "output_dir": "o"}
    built = {kind: from_dict({**base, "method": {"type": kind}}).method for kind in METHOD_TYPES}
    assert {kind: type(config) for kind, config in built.items()} == {
        "lora": LoraConfig, "dora": LoraConfig, "ia3": IA3Config, "prompt": PromptTuningConfig,
        "p_tuning": PromptEncoderConfig, "prefix": PrefixTuningConfig, "bottleneck": BottleneckConfig,
        "parallel": ParallelAdapterConfig, "mam": MAMConfig, "unipelt": UniPELTConfig,
        "selective": SelectiveConfig,
    }  # fmt: skip
    assert built["dora"].use_dora and not built["lora"].use_dora
    with pytest.raises(ConfigError, match="use_dora = false"):
        from_dict({**base, "method": {"type": "dora", "use_dora": False}})
    fields = from_dict({**base, "method": {"type": "prefix", "num_virtual_tokens": 3, "projection": True}})
    assert fields.method == PrefixTuningConfig(num_virtual_tokens=3, projection=True)


# ---------------------------------------------------------------- the command


def test_train_command_trains_evaluates_and_saves_the_resolved_config(run_dir, capsys):
    code, out, err = run_cli(["train", str(run_dir / "run.toml"), "method.r=2"], capsys)
    assert code == 0, err
    output = run_dir / "out"
    assert "training memory (estimated)" in out and f"outputs in {output}" in out
    assert (output / "last" / "adapter_model.safetensors").is_file()
    assert (output / "best" / "adapter_model.safetensors").is_file()
    evaluation = json.loads((output / "eval.json").read_text())
    assert set(evaluation["targets"]) == {"base", "rev"} and evaluation["n"] == 4
    assert evaluation["step"] == 3
    # The saved config is complete and absolute: it reruns the same run from anywhere.
    saved = load_run_config(output / RUN_CONFIG_FILE)
    assert saved.method == LoraConfig(r=2, target_modules=("q_proj", "v_proj"))
    assert saved.train_data == run_dir / "data" / "train.jsonl" and saved.output_dir == output
    assert saved.eval.data == run_dir / "data" / "test.jsonl"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 1

    # Again without --resume: refused, the finished run untouched.
    code, _, err = run_cli(["train", str(run_dir / "run.toml"), "method.r=2", "--quiet"], capsys)
    assert code == 2 and "holds a checkpoint" in error_line(err) and "--resume" in err
    # --resume with another method: refused, naming what changed.
    code, _, err = run_cli(["train", str(run_dir / "run.toml"), "--resume", "method.r=3"], capsys)
    assert code == 2 and "method differ" in error_line(err)
    # --resume with the same config: nothing left to do, and nothing printed when quiet.
    code, out, err = run_cli(["train", str(run_dir / "run.toml"), "--resume", "method.r=2", "--quiet"], capsys)
    assert code == 0 and out == "", err
    assert json.loads((output / "summary.json").read_text())["steps"] == 3


def test_max_memory_refuses_a_run_that_does_not_fit(run_dir, capsys):
    code, out, err = run_cli(["train", str(run_dir / "run.toml"), "max_memory=64KiB"], capsys)
    assert code == 2
    assert "max_memory is 64.00 KiB" in error_line(err) and "batch_size=4" in err
    assert "training memory (estimated)" in out  # the plan is shown before the refusal
    assert not (run_dir / "out" / "last").exists()


def test_user_errors_exit_2_with_one_line(run_dir, capsys):
    cases = {
        ("train", str(run_dir / "missing.toml")): "not found",
        ("train", str(run_dir / "run.toml"), "train.lrr=1"): "unknown key 'train.lrr'",
        ("train", str(run_dir / "run.toml"), "--resume"): "holds no checkpoint",
        ("train", str(run_dir / "run.toml"), "--force"): "unknown option '--force'",
    }
    for argv, expected in cases.items():
        code, _, err = run_cli(list(argv), capsys)
        assert code == 2 and expected in error_line(err), (argv, err)


def test_a_tiny_model_is_built_into_the_output_folder(run_dir, capsys):
    code, _, err = run_cli(
        ["train", str(run_dir / "run.toml"), "model=tiny:gpt2", 'method.target_modules=["c_attn"]',
         "train.max_steps=1", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (run_dir / "out" / "tiny-gpt2" / "config.json").is_file()
    assert json.loads((run_dir / "out" / RUN_CONFIG_FILE).read_text())["model"] == "tiny:gpt2"


# ---------------------------------------------------------------- demo tasks and examples


def test_demo_tasks_are_seeded_disjoint_and_one_token_per_letter():
    from edgepeft.tasks import ALPHABET, TASKS, make_task
    from edgepeft.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for name in TASKS:
        train, test = make_splits(name, (100, 20), seed=1)
        assert make_splits(name, (100, 20), seed=1) == [train, test] != make_splits(name, (100, 20), seed=2)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        for row in train + test:
            for text in (row["prompt"], row["completion"]):
                assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text), text
    assert make_task("reverse", 1, 0)[0]["completion"] == make_task("reverse", 1, 0)[0]["prompt"][-2::-1]
    shifted = make_task("shift", 1, 0)[0]
    assert all(ALPHABET.index(b) == (ALPHABET.index(a) + 1) % len(ALPHABET)
               for a, b in zip(shifted["prompt"], shifted["completion"], strict=False))  # fmt: skip
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        make_task("sort", 1, 0)
    with pytest.raises(ValueError, match="ask for 1 to 4096"):
        make_task("reverse", 5000, 0)


def test_committed_example_data_and_configs_are_current():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "make_example_data.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    for name in ("train_reverse_lora.toml", "train_shift_lora.yaml"):
        config = load_run_config(root / "examples" / name)
        assert config.train_data.is_file() and config.train.val_data and config.eval.data.is_file()
        assert config.model == "tiny:llama" and config.method.target_modules == "all-linear"
