"""What a server allows: one frozen dataclass, filled from `edgepeft serve`'s flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Limits and options of one `edgepeft serve` app (the host and port are uvicorn's)."""

    api_key: str | None = None
    """Requests to /v1/* and /metrics must send `Authorization: Bearer KEY`; None: open."""
    model_name: str | None = None
    """The name the base answers to in `model`; None: the manifest's base (a path's folder)."""
    max_queue: int = 16
    """Requests that may wait for the worker (the running ones not counted); more get 429."""
    max_batch: int = 8
    """Most requests decoding together (rows of the continuous batch), mixed adapters
    included (1: one at a time)."""
    batch_context: int = 512
    """Cache columns of the continuous batch (KV memory: max_batch x this); it grows to 4x
    for a long request once empty, and a request needing more runs alone."""
    max_tokens_limit: int = 2048
    """Largest `max_tokens` a request may ask for; more get 400."""
    default_max_tokens: int = 256
    """`max_tokens` of a request that sends none (the export's max_context still caps it)."""
    max_body_bytes: int = 1 << 20
    """Largest request body; more get 413."""
    request_timeout_s: float = 300.0
    """Seconds from arrival (queueing included) after which a request is stopped (504)."""
    allow_adapter_loading: bool = True
    """Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (else 403)."""

    def __post_init__(self):
        limits = (
            "max_queue",
            "max_batch",
            "batch_context",
            "max_tokens_limit",
            "default_max_tokens",
            "max_body_bytes",
        )
        for field in limits:
            if getattr(self, field) < 1:
                raise ValueError(f"ServeConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} is above max_tokens_limit "
                f"{self.max_tokens_limit}; lower it or raise the limit"
            )
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; give a key or None for an open server")


__all__ = ["ServeConfig"]
