"""The runtime runs with torch, transformers, bitsandbytes and onnx unimportable (a device
with `pip install edgepeft` and no extras), and gives the same tokens as in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from bare_install import BLOCKED, PRELUDE
from runtime_fixtures import ADAPTERS, PROMPTS, shared_separate

from edgepeft.runtime import Engine

DEVICE_SCRIPT = """
import json, sys

BLOCKED = {blocked!r}
import edgepeft.runtime
from edgepeft.runtime import Engine

engine = Engine({out!r})
result = {{}}
for adapter in [None, *{adapters!r}]:
    rows = engine.generate({prompts!r}, adapter=adapter, max_new_tokens=8, return_result=True)
    result[str(adapter)] = [r.token_ids for r in rows]
result["stream"] = list(engine.stream({prompts!r}[0], adapter="prefix", max_new_tokens=8))
result["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def separate(tiny_dir, tmp_path_factory):
    return shared_separate(tiny_dir, tmp_path_factory)


def test_runtime_runs_without_torch_and_matches(separate, tmp_path):
    script = tmp_path / "device.py"
    body = DEVICE_SCRIPT.format(
        blocked=BLOCKED, out=str(separate.out), adapters=list(ADAPTERS), prompts=PROMPTS
    )
    script.write_text(PRELUDE + textwrap.dedent(body))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    engine = Engine(separate.out)
    for adapter in [None, *ADAPTERS]:
        rows = engine.generate(PROMPTS, adapter=adapter, max_new_tokens=8, return_result=True)
        assert got[str(adapter)] == [r.token_ids for r in rows], adapter
    assert "".join(got["stream"]) == engine.generate(PROMPTS[0], adapter="prefix", max_new_tokens=8)


def test_blocking_works(tmp_path):
    """The same finder makes `import torch` fail (so the test above can fail)."""
    script = tmp_path / "check.py"
    script.write_text(PRELUDE + "import torch\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "torch is not installed on this device" in run.stderr
