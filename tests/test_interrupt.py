"""Interrupted writes leave nothing behind.

SIGTERM or SIGINT during an export removes its staging folder: the CLI says so in one line
(exit 130 / 143, no traceback), a bare Python export dies of the signal as usual. A later
run removes the hidden siblings a SIGKILLed run left, and only those of dead processes.

The exports run in a subprocess whose stderr blocks at the first progress line written while
the staging folder exists, so the signal always lands mid-export (no timing guesses).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from edgepeft import atomic

DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path

    mode, base, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    ready = out.parent / "ready"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell

    class StderrThatWaits:
        \"\"\"Blocks (until a signal) at the first write made while the export is staged.\"\"\"

        def __init__(self, real):
            self.real = real

        def write(self, text):
            if not ready.exists() and any(out.parent.glob(f".{out.name}.*")):
                ready.touch()
                time.sleep(300)
            return self.real.write(text)

        def flush(self):
            self.real.flush()

    sys.stderr = StderrThatWaits(sys.stderr)
    if mode == "cli":
        from edgepeft.cli import main

        sys.exit(main(["export", "--base", base, "--out", str(out), "--weights", "fp32",
                       "--no-verify"]))
    from edgepeft.export.api import export

    export(base, out, weights="fp32", verify=False)
    """
)


def interrupted_export(tmp_path: Path, base: Path, mode: str, sig: int):
    """Run DRIVER, send `sig` once the export is staged; (returncode, stderr, out folder)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(base), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out.parent / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the export never reached its staging folder:\n{proc.communicate()}")
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr, out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("ready", "out"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_cli_export_removes_its_staging_and_says_so_in_one_line(
    tiny_dir, tmp_path, sig, code
):
    returncode, stderr, out = interrupted_export(tmp_path, tiny_dir("llama"), "cli", sig)
    assert leftovers(out.parent) == [] and not out.exists()
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    name = signal.Signals(sig).name
    [line] = [s for s in stderr.splitlines() if "interrupted" in s]
    assert line.startswith("edgepeft export: interrupted") and name in line, stderr
    assert f"{out} was not written" in line


def test_a_terminated_python_export_removes_its_staging_and_dies_of_the_signal(tiny_dir, tmp_path):
    returncode, stderr, out = interrupted_export(
        tmp_path, tiny_dir("llama"), "python", signal.SIGTERM
    )
    assert leftovers(out.parent) == [] and not out.exists()
    assert returncode == -signal.SIGTERM, stderr


# ---------------------------------------------------------------- what a SIGKILLed run left


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_sibling(target: Path, pid: int, folder: bool = True, size: int = 3 << 20) -> Path:
    """What a killed run's staging looks like: our name pattern, `pid`, some bytes."""
    path = target.with_name(f".{target.name}.{pid}.0123abcd.tmp{'' if folder else target.suffix}")
    if folder:
        path.mkdir(parents=True)
        (path / "model.onnx.data").write_bytes(b"\0" * size)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
    return path


def test_an_export_removes_the_staging_of_a_dead_run_and_keeps_a_live_ones(
    tiny_dir, tmp_path, caplog
):
    from edgepeft.export.api import export

    out = tmp_path / "out"
    dead = stale_sibling(out, dead_pid())
    live = stale_sibling(out, os.getpid())  # this process: alive, maybe another thread's
    unrelated = tmp_path / ".out.backup"  # not our pattern
    unrelated.mkdir()
    with caplog.at_level(logging.INFO, logger="edgepeft"):
        export(tiny_dir("llama"), out, weights="fp32", verify=False, quiet=True)
    assert not dead.exists()
    assert live.exists() and unrelated.exists()
    assert (out / "edgepeft.json").is_file()
    [record] = [r for r in caplog.records if dead.name in r.getMessage()]
    assert "3.0 MiB" in record.getMessage()


def test_atomic_files_and_checkpoints_remove_stale_siblings_of_dead_runs(tmp_path):
    from edgepeft.train.checkpoint import CHECKPOINT_DIR, write_checkpoint

    target = tmp_path / "manifest.json"
    pid = dead_pid()
    dead_file = stale_sibling(target, pid, folder=False, size=10)
    other_name = stale_sibling(tmp_path / "other.json", pid, folder=False, size=10)
    atomic.write_json(target, {"a": 1})
    assert not dead_file.exists() and other_name.exists()  # only the target's own siblings
    assert target.read_text() == '{\n  "a": 1\n}\n'

    dead_dir = stale_sibling(tmp_path / CHECKPOINT_DIR, pid)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    write_checkpoint(
        tmp_path, step=1, parameters={"p": param}, optimizer=optimizer, scheduler=scheduler,
        scaler=None, progress={},
    )  # fmt: skip
    assert not dead_dir.exists() and (tmp_path / CHECKPOINT_DIR).is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [other_name.name]
