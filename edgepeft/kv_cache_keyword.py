"""Which keyword a transformers forward takes its KV cache by.

transformers 5.24 renamed the forward's `past_key_values` argument to `cache` (the old name still
works through a deprecation shim that renames it *inside* the decorated forward, after any
forward-pre-hook has run). A hook that edits the cache therefore has to read whichever of the two
names the caller used and write the one the forward will actually read:

    generate (5.24)  ── cache=DynamicCache ──►  hook  ──►  forward(cache=...)
    generate (5.23)  ── past_key_values=... ─►  hook  ──►  forward(past_key_values=...)

This module is the one place that knows both names.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: a typing name only, callers hold the model
    from torch import nn

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The name `model.forward` declares for its KV cache: "cache" (5.24+) or "past_key_values"."""
    parameters = inspect.signature(model.forward).parameters
    return NEW_NAME if NEW_NAME in parameters else OLD_NAME


def find_cache(kwargs: dict):
    """The cache a caller passed under either name, and the name it used (None, None if neither)."""
    for name in (NEW_NAME, OLD_NAME):
        if kwargs.get(name) is not None:
            return kwargs[name], name
    return None, None


def output_cache(output):
    """The cache a forward returned: `output.cache` (5.24+) or `output.past_key_values`."""
    cache = getattr(output, NEW_NAME, None) if NEW_NAME in output else None
    return cache if cache is not None else output[OLD_NAME]


def put_cache(model: nn.Module, kwargs: dict, cache) -> None:
    """Store `cache` in `kwargs` under the one name `model.forward` reads; drop the other name."""
    for name in (NEW_NAME, OLD_NAME):
        kwargs.pop(name, None)
    kwargs[cache_keyword(model)] = cache
