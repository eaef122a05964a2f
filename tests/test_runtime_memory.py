"""Loading adapters grows the process's resident memory by about their size, and using them
never by the base's: one base in memory, adapters as small extra tensors. Measured in a fresh
subprocess (RSS from /proc) on an export whose base (~55 MB) dwarfs allocator noise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from edgepeft.adapters.inject import add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig
from edgepeft.export import api
from edgepeft.tiny import tiny_model, tiny_tokenizer

ADAPTERS = 3
MB = 1 << 20

DEVICE_SCRIPT = """
import json, sys
from edgepeft.runtime import Engine, resident_bytes

out, n = sys.argv[1], int(sys.argv[2])
engine = Engine(out, load_adapters=False, threads=1)
prompt = list(range(3, 40))
engine.generate(prompt, max_new_tokens=4)  # session arena and a request slot made
rss = {{"warm": resident_bytes()}}
for i in range(n):
    engine.load_adapter(f"{{out}}/adapters/a{{i}}.onnx_adapter")
rss["loaded"] = resident_bytes()
for i in range(n):
    engine.generate(prompt, adapter=f"a{{i}}", max_new_tokens=4)
rss["used"] = resident_bytes()
report = engine.memory()
print(json.dumps({{"rss": rss, "base": report.base_bytes, "adapters": report.adapters}}))
"""


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-memory")
    base = root / "base"
    tiny_model(
        "llama", hidden_size=256, intermediate_size=4096, num_hidden_layers=4
    ).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, _ = load_base(base, quant="none")
    folders = {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        config = LoraConfig(r=16, alpha=16, init="random", target_modules="all-linear")
        add_adapter(model, config, f"a{i}")
        folders[f"a{i}"] = save_adapter(model, root / "src" / f"a{i}", f"a{i}")
    out = root / "out"
    api.export(
        base, out, adapters=folders, weights="fp32", mode="separate", quant="none", quiet=True
    )
    return out


@pytest.mark.slow
def test_adapters_cost_their_size_never_the_base(big_export, tmp_path):
    script = tmp_path / "device.py"
    script.write_text(textwrap.dedent(DEVICE_SCRIPT.format()))
    run = subprocess.run(
        [sys.executable, str(script), str(big_export), str(ADAPTERS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    rss, base = got["rss"], got["base"]
    files = sum(
        (big_export / "adapters" / f"a{i}.onnx_adapter").stat().st_size for i in range(ADAPTERS)
    )
    reported = sum(got["adapters"].values())
    loaded, used = rss["loaded"] - rss["warm"], rss["used"] - rss["warm"]
    print(
        f"base {base / MB:.1f} MiB; {ADAPTERS} adapter files {files / MB:.1f} MiB "
        f"(reported {reported / MB:.1f} MiB); RSS +{loaded / MB:.1f} MiB after loading, "
        f"+{used / MB:.1f} MiB after generating with each"
    )
    assert base > 8 * files / ADAPTERS  # the base dwarfs an adapter
    assert 0.9 * files <= reported <= files
    assert loaded <= 1.5 * files + 4 * MB  # about the files' size ...
    assert used < 0.5 * base  # ... and switching between them never copies the base
