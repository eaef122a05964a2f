"""Write a file so that readers see the old version or the new one, never half of either.

    with atomic_path("out/manifest.json") as tmp:    # a hidden, unused sibling name
        write(tmp)                                   # any writer: json, safetensors, ORT, savefig
    # renamed onto the target when the block succeeds; removed when it raises

Standard library only: the torch-free device runtime uses it too.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """An unused hidden name next to `path` (nothing is created); for staging folders too."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix last: some writers (matplotlib, ...) pick a format from it.
    tmp = temporary_sibling(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = False, ensure_ascii: bool = True) -> Path:
    """`value` as indented JSON with a final newline, written atomically."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    return write_bytes(path, text)
