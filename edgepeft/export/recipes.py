"""Export recipes: named TOML files of export options, and the options an export runs with.

    explicit arguments  over  the recipe (a shipped name or a .toml path)  over  DEFAULTS
        ─► export_options(): every value checked, one error naming the file and the key

Torch-free: `edgepeft plan` reads the shipped recipes to recommend one without loading the
exporter.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepeft.export.weights import METHODS, WeightQuantization, weight_quantization
from edgepeft.settings import read_toml
from edgepeft.vocab import MODES, WEIGHT_FORMATS

RECIPE_KEYS = {
    "weights": str,
    "block_size": int,
    "accuracy_level": int,
    "accuracy_level_int8": int,
    "mode": str,
    "max_context": int,
    "providers": list,
    "int4_method": str,
    "mixed_precision": bool,
    "activation_aware": bool,
}
DEFAULTS = {
    "weights": "int4",
    "mode": "merged",
    "block_size": 32,
    "accuracy_level": 4,
    "int4_method": "search",
    "mixed_precision": True,
    "activation_aware": True,
}
RECIPES_DIR = Path(__file__).resolve().parent.parent / "data" / "recipes"
"""The recipes shipped inside the package (package data: the wheel holds them)."""


def recipe_path(recipe: str | os.PathLike) -> Path:
    """The TOML file a recipe names, looked for in this order:

    1. a file at that path ("my-recipe.toml", "~/recipes/gpu.toml");
    2. a recipe shipped in the package (RECIPES_DIR) by name: "cpu-int4" or "cpu-int4.toml";
    3. the repository's old spelling "export/cpu-int4.toml" (the recipes lived in export/
       before they shipped in the package): the shipped recipe of that name.

    Raises:
        FileNotFoundError: none of these (the message lists the shipped names).
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1 or path.parent.name == "export":
        shipped = RECIPES_DIR / f"{path.name.removesuffix('.toml')}.toml"
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise FileNotFoundError(
        f"recipe {recipe} not found: no such file, and no shipped recipe of that name "
        f"(shipped recipes: {names}); pass a name or the path of a .toml file"
    )


def load_recipe(recipe: str | os.PathLike) -> dict:
    """Export options from a TOML recipe (a name or a path, found by `recipe_path`);
    unknown keys and wrong types are errors.

    Keys: weights, block_size, accuracy_level, accuracy_level_int8 (that of the 8-bit
    MatMulNBits nodes only; default accuracy_level), mode, max_context, providers (the
    onnxruntime execution providers the runtime should try, recorded in the manifest),
    int4_method ("search" or "rtn"), mixed_precision and activation_aware (true / false),
    see `quantization_of`.
    """
    path = recipe_path(recipe)
    data = read_toml(path, "recipe")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown key(s) {unknown}; known: {sorted(RECIPE_KEYS)}")
    for key, value in data.items():
        kind = RECIPE_KEYS[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(
                f"recipe {path}: {key} must be a {RECIPE_KEYS[key].__name__}, got {value!r}"
            )
    return data


def export_options(recipe, **given) -> dict:
    """Explicit arguments over the recipe over the defaults; each value checked."""
    options = {**DEFAULTS, **(load_recipe(recipe) if recipe else {})}
    options.update({k: v for k, v in given.items() if v is not None})
    if options["weights"] not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {options['weights']!r}")
    if options["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {options['mode']!r}")
    for key in ("accuracy_level", "accuracy_level_int8"):
        if options.get(key) is not None and options[key] not in range(5):
            raise ValueError(f"{key} must be 0..4 (MatMulNBits), got {options[key]!r}")
    if options.get("max_context") is not None and options["max_context"] < 1:
        raise ValueError(f"max_context must be positive, got {options['max_context']}")
    if options["int4_method"] not in METHODS:
        raise ValueError(
            f"int4_method must be one of {METHODS} (recipe key or --int4-method), "
            f"got {options['int4_method']!r}"
        )
    return options


def quantization_of(options: dict) -> WeightQuantization:
    """The int4/int8 recipe the export options ask for (int4_method, mixed_precision,
    activation_aware)."""
    return weight_quantization(
        options["int4_method"], options["mixed_precision"], options["activation_aware"]
    )
