"""One row's continuation: tokens in, text and a finish reason out.

    token ─► eos? ─► "eos" (not kept)                       never before min_new tokens
          ─► kept ─► limit reached? ─► limit_reason ("length", or "context": no room left)
          ─► text += decoder.push(token) ─► a stop string ending past `floor`? ─► "stop",
             the text cut before it

The engine's batch loop and the continuous batch (continuous.py) both keep one RowState per
row, so a row ends for the same reason at the same token whichever ran it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgepeft.runtime.chat import IncrementalDecoder


def stop_strings(stop) -> tuple[str, ...]:
    """`stop` (None, a string or strings) as a tuple; empty or non-string entries raise."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be non-empty strings, got {stop!r}")
    return stops


def first_stop(text: str, stops: Sequence[str], after: int = 0) -> int | None:
    """Where the first stop string that ends past character `after` of `text` starts."""
    hits = [i for i in (text.find(s, max(after - len(s) + 1, 0)) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may start a stop string (not streamed yet)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return held


def min_new_tokens_of(min_new_tokens: int, max_new_tokens: int, ignore_eos: bool) -> int:
    """The tokens before which neither eos nor a stop string ends a row (ignore_eos: all)."""
    if ignore_eos:
        return max_new_tokens
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    return min_new_tokens


@dataclass
class RowState:
    """What one row has generated and whether it has ended (see the module docstring)."""

    limit: int
    """Most tokens this row keeps."""
    eos: frozenset[int]
    stops: tuple[str, ...] = ()
    decoder: IncrementalDecoder | None = None
    """Decodes text token by token (streaming, stop strings); None: decoded at the end."""
    min_new: int = 0
    limit_reason: str = "length"
    """The reason given when `limit` is reached: "length", or "context" when the limit was
    cut to the room left in the context."""
    seen: list[int] | None = None
    """Prompt and kept tokens, for a repetition penalty (None: no penalty)."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    floor: int = 0
    """A stop string must end past this character of the text (min_new tokens' text)."""
    reason: str | None = None
    sent: int = 0
    """Characters of the text already streamed."""

    @property
    def done(self) -> bool:
        return self.reason is not None

    def banned(self) -> frozenset[int]:
        """Tokens this row may not get now: eos before min_new tokens."""
        return self.eos if len(self.generated) < self.min_new else frozenset()

    def push(self, token: int) -> None:
        """Take the row's next token (the row must not be done)."""
        if token in self.eos:
            self.reason = "eos"
            return
        self.generated.append(token)
        if self.seen is not None:
            self.seen.append(token)
        if len(self.generated) >= self.limit:
            self.reason = self.limit_reason
        if self.decoder is None:
            return
        self.text += self.decoder.push(token)
        if len(self.generated) < self.min_new:
            self.floor = len(self.text)
            return
        hit = first_stop(self.text, self.stops, self.floor)
        if hit is not None:
            self.text, self.reason = self.text[:hit], "stop"

    def piece(self) -> str:
        """The text not streamed yet, less what may start a stop string (all of it once done)."""
        safe = len(self.text) if self.done else len(self.text) - held_back(self.text, self.stops)
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : safe], safe
        return piece


__all__ = ["RowState", "first_stop", "held_back", "min_new_tokens_of", "stop_strings"]
