"""Torch-free readers for the user's settings files: TOML with a clear error, and sizes.

Device profiles, export recipes and run configs all go through `read_toml`, and every
size a user writes ("8GiB", "512MB") through `parse_size`, so that one spelling works
everywhere and every error names the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def read_toml(path: str | os.PathLike, what: str) -> dict:
    """The table of TOML file `path`; `what` names it in errors ("device profile", ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{what} {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text: {e}") from e


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from "8GiB" / "8G" (2^30), "8GB" (10^9), "512MiB", "1.5 GiB" or an int."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be an int or a string like '8GiB', got {value!r}")
    if isinstance(value, int):
        nbytes = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise ValueError(
                f"cannot read {what} {value!r}; write a number with a unit such as '8GB' "
                "(10^9 bytes), '8GiB' (2^30), '512MiB' or a plain byte count"
            )
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return nbytes


def format_size(n: float, decimals: int = 2) -> str:
    """"1.50 GiB", "3.00 MiB", "12 B": binary units, `decimals` decimals (bytes: none)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{decimals}f} {unit}"
    return f"{int(n)} B"
