"""The OpenAI request bodies the server reads (pydantic) and the responses it writes (dicts).

    CompletionRequest      POST /v1/completions        prompt: str | token ids | [one of those]
    ChatCompletionRequest  POST /v1/chat/completions   messages: [{role, content}] (text parts)
    LoadLoraRequest        POST /v1/load_lora_adapter  {lora_name, lora_path}   (vLLM's names)
    UnloadLoraRequest      POST /v1/unload_lora_adapter {lora_name}

Unknown fields are ignored, as OpenAI clients send many; fields whose meaning the engine
cannot honour (n > 1, logprobs, echo, best_of > 1) are refused (400), never ignored.
`ignore_eos` and `min_tokens` are vLLM's extra sampling fields.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from edgepeft.runtime.engine import GenerationResult


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    """OpenAI's default is 1 (sampling); send 0 for greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field the engine cannot honour, or None."""
        if self.n != 1:
            return "n", f"n={self.n}: one choice per request; send n=1 (or leave it out)"
        return None

    def stops(self) -> list[str] | None:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s] or None  # OpenAI clients may send "" for none

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported; the answer holds the completion only"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported by this server"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported; send best_of=1 or leave it out"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()

    def the_prompt(self) -> str | list[int]:
        """The one prompt of this request (a list of one prompt is that prompt)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(
                    f"prompt holds {len(p)} prompts; this server takes one per request "
                    "(send them as separate requests: they are queued)"
                )
            p = p[0]
        if not p:
            raise ValueError("prompt is empty; the model needs something to continue")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"messages[{index}] has a {part.type!r} content part; this server reads "
                    "text parts only"
                )
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server"
        return super().unsupported()

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# ---------------------------------------------------------------- responses


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's reason: "stop" (eos or a stop string) or "length" (max_tokens, the context)."""
    return "stop" if result.finish_reason in ("eos", "stop") else "length"


def usage(result: GenerationResult) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def completion(rid: str, model: str, result: GenerationResult) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
    }


def completion_chunk(rid: str, model: str, text: str, reason: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
    }


def chat_completion(rid: str, model: str, result: GenerationResult) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
    }


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def usage_chunk(rid: str, model: str, kind: str, result: GenerationResult) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(result),
    }


def model_card(name: str, created: int, parent: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "edgepeft"}
    card["root"] = parent or name
    card["parent"] = parent
    return card


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "GenerationRequest",
    "CompletionRequest",
    "LoadLoraRequest",
    "UnloadLoraRequest",
    "chat_chunk",
    "chat_completion",
    "completion",
    "completion_chunk",
    "finish_reason",
    "model_card",
    "new_id",
    "usage",
    "usage_chunk",
]
