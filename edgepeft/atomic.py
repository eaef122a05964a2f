"""Write a file so that readers see the old version or the new one, never half of either.

    with atomic_path("out/edgepeft.json") as tmp:    # a hidden, unused sibling name
        write(tmp)                                   # any writer: json, safetensors, ORT, savefig
    # renamed onto the target when the block succeeds; removed when it raises

    with atomic_folder("out") as staging:            # a new, empty hidden sibling folder
        build(staging)                               # swapped in whole when the block succeeds

Every temporary sibling is named `.<name>.<pid>.<8 hex>.tmp[suffix]` and is live (in a
registry) while its block runs:
    SIGTERM / SIGINT   with the default action, the live paths are removed before the process
                       dies of the signal; a Python handler (KeyboardInterrupt, the CLI's, the
                       training loop's) is called as before, and `finally` blocks clean up
    SIGKILL, a crash   the next write to the same target removes the siblings whose process
                       is gone (one log line each, with its size); a live process's stay
Handlers are installed only while a path is live, and only from the main thread (where
signal() works); a write staged in another thread alone is cleaned on the next run.

Standard library only: the torch-free device runtime uses it too.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("edgepeft")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LIVE: set[Path] = set()
_PREVIOUS: dict[int, Any] = {}
"""What our handler replaced, and so delegates to, per signal."""
_LOCK = threading.Lock()


def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """An unused hidden name next to `path` (nothing is created); for staging folders too."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    # Keep the suffix last: some writers (matplotlib, ...) pick a format from it.
    with _live(temporary_sibling(path, path.suffix)) as tmp:
        yield tmp
        os.replace(tmp, path)


@contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty hidden sibling folder of `path`, for the caller to fill and rename.

    Whatever is still at the staging name when the block ends (it raised, or the caller
    did not rename it) is removed, as it is on SIGTERM / SIGINT.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    with _live(temporary_sibling(path)) as staging:
        staging.mkdir()  # unlike mkdtemp's 0700, the umask decides, as for the other outputs
        yield staging


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new empty staging folder; when the block succeeds it becomes `path`.

    An existing `path` is replaced (`replace=True`) or is an error raised before any work
    (FileExistsError). The old folder is renamed aside first and removed only once the new
    one is in place, so a crash leaves the old or the new folder at `path`, never neither
    for longer than one rename. On failure or a signal nothing at `path` changes.
    """
    path = Path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    with staging_folder(path) as staging:
        yield staging
        if not path.exists():
            os.replace(staging, path)
            return
        old = temporary_sibling(path, ".old")
        with _signals_held():  # a signal between the two renames would leave neither
            os.replace(path, old)
            os.replace(staging, path)
        _remove(old)


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = False, ensure_ascii: bool = True) -> Path:
    """`value` as indented JSON with a final newline, written atomically."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    return write_bytes(path, text)


# ---------------------------------------------------------------- what killed runs left


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` whose writing process no longer runs.

    Only names `temporary_sibling(path, ...)` makes are considered; a sibling of a live
    process (this one included: another thread may be writing it) is kept.

    Returns:
        The removed paths.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp.*", re.DOTALL)
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        stale = Path(entry.path)
        size = _size(stale)
        _remove(stale)
        log.warning(
            "removed %s (%.1f MiB), left by process %s, which is no longer running",
            stale, size / 2**20, match.group(1),
        )  # fmt: skip
        removed.append(stale)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists here (True where that cannot be checked safely)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists under another user
        return True
    return True


def _size(path: Path) -> int:
    """Bytes under `path`; 0 for what another process removes meanwhile."""
    if not path.is_dir():
        return path.lstat().st_size if path.exists() else 0
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- live paths and signals


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT / SIGTERM wait until the block ends (where the platform can hold them)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _live(path: Path) -> Iterator[Path]:
    """Register `path` while the block runs; remove whatever is at `path` when it ends."""
    main = threading.current_thread() is threading.main_thread()
    with _LOCK:
        _LIVE.add(path)
        if main:
            _install()
    try:
        yield path
    finally:
        _remove(path)
        with _LOCK:
            _LIVE.discard(path)
            if main and not _LIVE:
                _restore()


def _install() -> None:
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if current is not _on_signal and current is not None:  # None: set outside Python
            _PREVIOUS[sig] = current
            signal.signal(sig, _on_signal)


def _restore() -> None:
    for sig in list(_PREVIOUS):
        # If another handler replaced ours meanwhile, keep what ours delegates to: that
        # handler may put ours back when it is done.
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, _PREVIOUS.pop(sig))


def _on_signal(signum: int, frame) -> None:
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    if callable(previous):  # it decides; if it raises, `finally` blocks remove the live paths
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # SIG_DFL: death without unwinding; clean up first
        remove_live()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def remove_live() -> None:
    """Remove every temporary sibling being written now (at exit, or before dying of a signal)."""
    for path in list(_LIVE):  # no lock: this may run in a signal handler that interrupted it
        _remove(path)


atexit.register(remove_live)  # a write left running in a daemon thread when Python exits
