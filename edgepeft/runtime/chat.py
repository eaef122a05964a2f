"""Text in and out: the exported tokenizer, its chat template, incremental decoding.

    export/tokenizer.json         ──► tokenizers.Tokenizer     encode / decode
    export/tokenizer_config.json  ──► chat_template (jinja2), bos / eos tokens
    prompt str       ──► [BOS] + encode(text, no special tokens)
    messages [{role, content}] ──► template(add_generation_prompt=True) ──► as a prompt str

BOS leads only when the tokenizer puts one in front of plain text itself (Llama does, GPT-2
and Qwen do not), and never twice (a chat template may write its own): the rule training
and evaluation use (edgepeft.train.data.bos_to_add), so prompts tokenize as on the host.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextCodec:
    """Tokenizer and chat template of an export folder (no transformers needed)."""

    def __init__(self, folder: str | os.PathLike, bos_token_id: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the export has no tokenizer; export with a tokenizer, or "
                "pass token ids instead of text"
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = folder / TOKENIZER_CONFIG_FILE
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = self._template(folder)
        bos = bos_token_id
        if bos is None and _token_text(self.config.get("bos_token")) is not None:
            bos = self.tokenizer.token_to_id(_token_text(self.config["bos_token"]))
        self.bos_token_id = bos
        probe = self.tokenizer.encode("a", add_special_tokens=True).ids
        self.bos_to_add = [bos] if bos is not None and probe[:1] == [bos] else []
        self._template_fn = None

    def _template(self, folder: Path) -> str | dict | None:
        template = self.config.get("chat_template")
        if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
            template = (folder / CHAT_TEMPLATE_FILE).read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    # ------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        """Prompt ids: [BOS] (when the tokenizer adds one and the text lacks it) + tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.bos_to_add and ids[:1] != self.bos_to_add:
            ids = [*self.bos_to_add, *ids]
        return ids

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied to `messages`, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise ValueError(
                "the export's tokenizer has no chat template (tokenizer_config.json "
                "'chat_template'), so a list of messages cannot be turned into a prompt; pass "
                "the prompt as a string, or add a chat_template to tokenizer_config.json"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(
                    f"message {i} must be a dict with 'role' and 'content', got {message!r}"
                )
        if self._template_fn is None:
            self._template_fn = _compile(self.chat_template)
        return self._template_fn(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_text(self.config.get("bos_token")) or "",
            eos_token=_token_text(self.config.get("eos_token")) or "",
            pad_token=_token_text(self.config.get("pad_token")) or "",
            unk_token=_token_text(self.config.get("unk_token")) or "",
        )

    # ------------------------------------------------------------ outputs

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _compile(template: str):
    """A jinja2 render function with the helpers chat templates expect (raise_exception...)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
        value, indent=indent, ensure_ascii=False
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3 templates
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the export's chat template does not parse: {e}") from e
    return compiled.render


class IncrementalDecoder:
    """Text pieces of a growing token list, each emitted once and only when complete.

    Byte-level BPE splits a multi-byte character over tokens: a piece is held back while the
    decoded text ends in U+FFFD (an unfinished character). Decoding restarts a few tokens
    back (`_window`) so merges across the boundary (leading spaces, ...) come out right.
    """

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self._start = 0  # first token of the decode window
        self._emitted = 0  # characters of the window's text already returned

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.codec.decode(self.ids[self._start :])
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted :]
        # Slide the window: keep the last few tokens so the next decode has context.
        if len(self.ids) - self._start > 8:
            keep = len(self.ids) - 4
            self._emitted = len(self.codec.decode(self.ids[keep:]))
            self._start = keep
        else:
            self._emitted = len(text)
        return piece

    def text(self) -> str:
        return self.codec.decode(self.ids)


__all__ = ["IncrementalDecoder", "TextCodec"]
