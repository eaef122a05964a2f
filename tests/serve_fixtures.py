"""What the serve tests share: a tiny export with two LoRA adapters and a chat template, and a
real uvicorn server on a free loopback port in a thread. Not a test module."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from edgepeft.adapters.inject import add_adapter
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import LoraConfig
from edgepeft.export import api
from edgepeft.tiny import tiny_model, tiny_tokenizer

ADAPTERS = ("sql", "chat")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = ["the quick brown fox", "SELECT name FROM users WHERE", "edge devices run small"]


LONG = 20_000
"""max_tokens of a request that outlasts the test's actions (ignore_eos): seconds of decode."""


def build_export(root: Path) -> Path:
    """fp32 separate-mode export of the tiny llama (chat template, a context of 32k so a
    request can run for seconds) and two LoRAs."""
    base = root / "base"
    tiny_model("llama", max_position_embeddings=1 << 15).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    model, _ = load_base(base, quant="none")
    folders = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, alpha=16, init="random", target_modules="all-linear")
        add_adapter(model, config, name)
        folders[name] = save_adapter(model, root / "src" / name, name)
    out = root / "out"
    api.export(base, out, adapters=folders, weights="fp32", mode="separate", quant="none",
               verify=False, quiet=True)  # fmt: skip
    return out


_SHARED: list[Path] = []


def shared_export(tmp_path_factory) -> Path:
    """build_export once per test session (the serve test modules only read it)."""
    if not _SHARED:
        _SHARED.append(build_export(tmp_path_factory.mktemp("serve")))
    return _SHARED[0]


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no port race
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
