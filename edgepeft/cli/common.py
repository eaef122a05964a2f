"""What the `edgepeft` commands share: the user-error type, choices, and NAME=DIR values.

    --adapter "NAME=DIR"   ──► (NAME, DIR)
    --adapter "DIR"        ──► (DIR's folder name, DIR)   also a folder whose path holds "="

Standard library only: importing a command module must stay fast and free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from edgepeft.vocab import QUANTS

QUANT_CHOICES = ("none", *(q for q in QUANTS if q != "none"))
"""`edgepeft.vocab.QUANTS` with "none" first, the order --help lists them in."""
DTYPE_CHOICES = ("float32", "float16", "bfloat16")


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def looks_like_path(text: str) -> bool:
    """A model argument that names a folder rather than a hub id."""
    return text.startswith((".", "/", "~")) or Path(text).exists()


def split_named_folder(value: str) -> tuple[str, str]:
    """(name, folder as written) of one `[NAME=]DIR` value; a bare DIR is named after its folder.

    A value that is an existing folder is a DIR even when its path holds "=".
    """
    name, sep, folder = value.partition("=")
    if not sep or Path(value).expanduser().is_dir():
        return Path(value).expanduser().resolve().name, value
    return name, folder


def parse_named_folders(
    values: Sequence[str],
    *,
    duplicate: str,
    check: Callable[[str, Path], None] | None = None,
) -> dict[str, str]:
    """name -> folder (as written) for every `[NAME=]DIR` value, in order.

    Args:
        values: The command's repeated --adapter values.
        duplicate: The UserError for a name given twice, formatted with `name` and the two
            folders, `first` and `second` (user-expanded paths).
        check: Called with (name, user-expanded folder) before the duplicate check, for the
            command's own rules (the folder exists, the name is allowed); raises UserError.
    """
    named: dict[str, str] = {}
    for value in values:
        name, folder = split_named_folder(value)
        if check is not None:
            check(name, Path(folder).expanduser())
        if name in named:
            first, second = Path(named[name]).expanduser(), Path(folder).expanduser()
            raise UserError(duplicate.format(name=name, first=first, second=second))
        named[name] = folder
    return named
