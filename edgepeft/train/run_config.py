"""One training run's config file: file + key=value overrides -> a checked RunConfig.

    run.toml / run.yaml / run_config.json
        ──read (paths in the file resolve against the file's folder)──► nested dict
        ──overrides "train.lr=1e-4" (TOML scalars; paths resolve against the cwd)──► dict
        ──check every key (unknown ones are named with the valid ones)──► RunConfig
    run(config)   (train/run.py, importable from here too)
        load_base ──► add_adapter ──► memory plan ──► edgepeft.train ──► evaluate

A file looks like this (TOML; YAML with the same keys works too):

    model = "../models/tiny-llama"      # folder (relative to this file), hub id, or "tiny:llama"
    quant = "nf4"                       # none | nf4 | fp4 | int8
    double_quant = true
    adapter = "reverse"                 # adapter name
    output_dir = "runs/reverse"
    max_memory = "2GiB"                 # optional: refuse configs the planner says won't fit
    [method]                            # type + that config's fields
    type = "lora"                       # lora | dora | ia3 | prompt | p_tuning | prefix | ...
    r = 8
    [data]
    train = "reverse/train.jsonl"
    val = "reverse/val.jsonl"           # optional
    [train]                             # TrainConfig fields
    max_steps = 300
    [eval]                              # optional; or eval = "test.jsonl"
    data = "reverse/test.jsonl"
    max_new_tokens = 8

`model = "tiny:<arch>"` (llama, qwen2, gpt2, ... see edgepeft.tiny) trains over a tiny random
model built offline into output_dir/tiny-<arch>/ (same seed, same weights, so --resume works);
the examples use it. The resolved config (absolute paths, every default filled in) is saved as
`run_config.json` in output_dir, and loads back with `load_run_config`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepeft.adapters import run_config_types
from edgepeft.config import TrainConfig
from edgepeft.settings import read_toml
from edgepeft.tiny import TINY_CONFIGS
from edgepeft.train.memory import parse_memory
from edgepeft.vocab import QUANTS as QUANT_KINDS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RUN_CONFIG_FILE = "run_config.json"
TINY_PREFIX = "tiny:"
EVAL_FILE = "eval.json"
QUANTS = ("none", *(q for q in QUANT_KINDS if q != "none"))
"""`edgepeft.vocab.QUANTS` with "none" first, the order messages list them in."""

METHOD_TYPES: dict[str, type] = run_config_types()  # "dora" is LoRA with use_dora=True

_TOP_KEYS = ("model", "quant", "double_quant", "adapter", "method", "data", "train", "output_dir",
             "max_memory", "eval")  # fmt: skip
_DATA_KEYS = ("train", "val")
_EVAL_KEYS = ("data", "max_new_tokens", "batch_size")
_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "val_data")
# Where a value is a path: (table or None, key).
_PATH_KEYS = ((None, "output_dir"), ("data", "train"), ("data", "val"), ("eval", "data"))


class ConfigError(ValueError):
    """The run config is unusable; the message names the file, the key and what to write."""


@dataclass(frozen=True)
class EvalSettings:
    """End-of-run evaluation: greedy generation on a prompt/completion JSONL."""

    data: Path
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass(frozen=True)
class RunConfig:
    """Everything one `edgepeft train` run needs, checked and with paths resolved."""

    model: str
    """Base model folder (absolute) or hub id."""
    method: Any
    """The adapter config (LoraConfig, IA3Config, ...)."""
    method_type: str
    """The `method.type` it came from ("dora" is a LoraConfig with use_dora=True)."""
    train_data: Path
    train: TrainConfig
    """Its `val_data` is `data.val` when given."""
    output_dir: Path
    quant: str = "nf4"
    double_quant: bool = True
    adapter: str = "default"
    max_memory: str | int | None = None
    eval: EvalSettings | None = None
    source: str = "<dict>"
    """The file it was read from, for messages."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON values; `from_dict` reads it back."""
        method = {"type": self.method_type}
        for f in dataclasses.fields(self.method):
            value = getattr(self.method, f.name)
            method[f.name] = list(value) if isinstance(value, tuple) else (
                dict(value) if isinstance(value, Mapping) else value
            )
        train = dataclasses.asdict(self.train)
        val = train.pop("val_data")
        return {
            "model": self.model,
            "quant": self.quant,
            "double_quant": self.double_quant,
            "adapter": self.adapter,
            "method": method,
            "data": {"train": str(self.train_data), **({"val": val} if val else {})},
            "train": train,
            "output_dir": str(self.output_dir),
            "max_memory": self.max_memory,
            "eval": dataclasses.asdict(self.eval) | {"data": str(self.eval.data)} if self.eval else None,
        }


# ---------------------------------------------------------------- reading


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The nested dict of a .toml, .yaml/.yml or .json file, relative paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} not found (expected a .toml, .yaml or .json file)")
    if path.suffix == ".toml":
        try:
            data = read_toml(path, "run config")
        except ValueError as e:  # names the file: "run config PATH is not valid TOML: ..."
            raise ConfigError(str(e)) from e
        return _checked_table(data, path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"run config {path}: expected a .toml, .yaml/.yml or .json file")
    except ConfigError:
        raise
    except Exception as e:  # each parser raises its own error type
        message = " ".join(str(e).split())
        raise ConfigError(f"run config {path} is not valid {path.suffix[1:].upper()}: {message}") from e
    return _checked_table(data, path)


def _checked_table(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"run config {path}: expected a table of keys at the top, got {type(data).__name__}")
    return _resolve_paths(data, path.resolve().parent, str(path))


def _resolve_paths(data: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """Copy of `data` with relative paths joined to `folder`; the model only when it is there.

    A model value is a hub id unless it looks like a path ("./", "../", "/", "~") or names a
    folder next to the file.
    """
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    if isinstance(data.get("eval"), str):
        data["eval"] = {"data": data["eval"]}
    if isinstance(data.get("data"), str):
        data["data"] = {"train": data["data"]}
    for table, key in _PATH_KEYS:
        holder = data if table is None else data.get(table)
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            holder[key] = str(_join(folder, holder[key]))
    model = data.get("model")
    if isinstance(model, str):
        joined = _join(folder, model)
        if model.startswith((".", "/", "~")) or joined.exists():
            data["model"] = str(joined)
    return data


def _join(folder: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """"train.lr=1e-4" -> (["train", "lr"], 1e-4); the value is a TOML scalar or array.

    A value that is not valid TOML ("nf4", "runs/x") is taken as a string.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4 or method.r=16"
        )
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except Exception:  # not TOML: a bare word or a path
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cwd: Path | None = None) -> dict[str, Any]:
    """Copy of `data` with each "a.b=value" set; path values resolve against `cwd`."""
    cwd = cwd or Path.cwd()
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) > 2:
            raise ConfigError(f"override {text!r}: keys are at most two levels deep (table.key)")
        path_keys = (("output_dir",), ("model",), ("eval",), ("data", "train"), ("data", "val"), ("eval", "data"))
        if isinstance(value, str) and value and tuple(keys) in path_keys:
            joined = _join(cwd, value)
            if keys != ["model"] or value.startswith((".", "/", "~")) or joined.exists():
                value = str(joined)
        if len(keys) == 1:
            if keys[0] == "eval" and isinstance(value, str):
                value = {"data": value}
            data[keys[0]] = value
            continue
        table, key = keys
        holder = data.setdefault(table, {})
        if table == "eval" and isinstance(holder, str):
            holder = data[table] = {"data": holder}
        if not isinstance(holder, dict):
            raise ConfigError(f"override {text!r}: {table!r} is {holder!r}, not a table")
        holder[key] = value
    return data


# ---------------------------------------------------------------- checking


def _unknown(keys, valid: Sequence[str], where: str, source: str) -> None:
    unknown = [k for k in keys if k not in valid]
    if unknown:
        table = f" in [{where.rstrip('.')}]" if where else ""
        raise ConfigError(
            f"{source}: unknown key {where + unknown[0]!r}; valid keys{table}: {', '.join(valid)}"
        )


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Check a nested dict (paths already resolved) and build the RunConfig."""
    _unknown(data, _TOP_KEYS, "", source)
    for required in ("model", "method", "data", "output_dir"):
        if data.get(required) in (None, "", {}):
            raise ConfigError(f"{source}: {required!r} is missing; a run needs {', '.join(('model', 'method', 'data', 'output_dir'))}")
    if not isinstance(data["model"], str):
        raise ConfigError(f"{source}: 'model' must be a folder path or hub id (a string), got {data['model']!r}")
    if data["model"].startswith(TINY_PREFIX):
        arch = data["model"].removeprefix(TINY_PREFIX)
        if arch not in TINY_CONFIGS:
            raise ConfigError(
                f"{source}: model {data['model']!r}: no tiny {arch!r} model; have "
                f"{', '.join(TINY_PREFIX + a for a in TINY_CONFIGS)}"
            )
    quant = data.get("quant", "nf4")
    if quant not in QUANTS:
        raise ConfigError(f"{source}: quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    double_quant = data.get("double_quant", True)
    if not isinstance(double_quant, bool):
        raise ConfigError(f"{source}: double_quant must be true or false, got {double_quant!r}")
    adapter = data.get("adapter", "default")
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ConfigError(f"{source}: adapter must be a non-empty name without '.', got {adapter!r}")

    method_type, method = _method(_table(data, "method", source), source)

    data_table = _table(data, "data", source)
    _unknown(data_table, _DATA_KEYS, "data.", source)
    if not isinstance(data_table.get("train"), str):
        raise ConfigError(f"{source}: data.train (the training JSONL/TXT path) is missing")

    train_table = dict(_table(data, "train", source)) if data.get("train") is not None else {}
    if "val_data" in train_table:
        raise ConfigError(f"{source}: write the validation file as data.val, not train.val_data")
    _unknown(train_table, _TRAIN_KEYS, "train.", source)
    if data_table.get("val") is not None:
        train_table["val_data"] = str(data_table["val"])
    train_table = _numbers(TrainConfig, train_table)
    _check_types(TrainConfig, train_table, "train.", source)
    try:
        train = TrainConfig(**train_table)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: [train]: {e}") from e

    return RunConfig(
        model=data["model"],
        method=method,
        method_type=method_type,
        train_data=Path(data_table["train"]),
        train=train,
        output_dir=Path(data["output_dir"]),
        quant=quant,
        double_quant=double_quant,
        adapter=adapter,
        max_memory=_max_memory(data.get("max_memory"), source),
        eval=_eval(data.get("eval"), source),
        source=source,
    )


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (as TOML/YAML/JSON give it) fits the type hint, roughly and strictly."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        return isinstance(value, (tuple, list)) and all(_matches(v, items[0]) for v in value) if items else True
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        return isinstance(value, Mapping)
    return True


def _check_types(cls: type, values: Mapping[str, Any], where: str, source: str) -> None:
    """ConfigError naming the first value whose type its field does not take."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f"{source}: {where}{key} must be {_describe(hints[key])}, got {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _numbers(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with strings in float fields read as floats: YAML 1.1 reads 5e-3 as a string."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        if isinstance(value, str) and "float" in str(f.type):
            try:
                out[f.name] = float(value)
            except ValueError:
                pass  # the config's own check names the field
    return out


def _table(data: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key!r} must be a table of keys, got {value!r}")
    return value


def _method(table: Mapping[str, Any], source: str) -> tuple[str, Any]:
    kind = table.get("type")
    if kind not in METHOD_TYPES:
        raise ConfigError(
            f"{source}: method.type must be one of {', '.join(METHOD_TYPES)}; got {kind!r}"
        )
    cls = METHOD_TYPES[kind]
    fields = [f.name for f in dataclasses.fields(cls)]
    _unknown([k for k in table if k != "type"], ["type", *fields], "method.", source)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items() if k != "type"}
    if kind == "dora":
        if kwargs.get("use_dora") is False:
            raise ConfigError(f"{source}: method.type = 'dora' with use_dora = false; pick one")
        kwargs["use_dora"] = True
    if kind == "selective" and (kwargs.get("selected") or kwargs.get("density") is not None):
        # They describe a mask already chosen; a run chooses its own before the first step.
        raise ConfigError(
            f"{source}: method.selected and method.density are filled in when training chooses "
            "the importance mask; leave them out of the run config"
        )
    kwargs = _numbers(cls, kwargs)
    _check_types(cls, kwargs, "method.", source)
    try:
        return kind, cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: [method] ({kind}): {e}") from e


def _max_memory(value: Any, source: str) -> str | int | None:
    if value is None:
        return None
    try:
        parse_memory(value)
    except ValueError as e:
        raise ConfigError(f"{source}: max_memory: {e}") from e
    return value


def _eval(value: Any, source: str) -> EvalSettings | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), str) or not value["data"]:
        raise ConfigError(f"{source}: eval must be a JSONL path or a table with data = PATH, got {value!r}")
    _unknown(value, _EVAL_KEYS, "eval.", source)
    settings = EvalSettings(**{**value, "data": Path(value["data"])})
    for key in ("max_new_tokens", "batch_size"):
        n = getattr(settings, key)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{source}: eval.{key} must be a positive integer, got {n!r}")
    return settings


def load_run_config(
    path: str | os.PathLike, overrides: Sequence[str] = (), cwd: Path | None = None
) -> RunConfig:
    """Read, override and check a run config file.

    Args:
        path: A .toml, .yaml/.yml or .json file (a saved run_config.json works too).
        overrides: "key=value" strings with dotted keys, e.g. "train.lr=1e-4".
        cwd: Folder that relative paths in overrides resolve against; default the cwd.

    Raises:
        ConfigError: unreadable file, unknown key (named, with the valid ones), bad value.
    """
    data = apply_overrides(read_file(path), overrides, cwd)
    return from_dict(data, source=str(path))


# `run` and its outcome moved to train/run.py, which imports this module; they stay
# importable from here for callers of the old path.
_MOVED_TO_RUN = ("RunOutcome", "memory_args", "run")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_RUN:
        # lazy: train/run.py imports this module, so importing it at the top would be a cycle
        return getattr(importlib.import_module("edgepeft.train.run"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
