"""Continuous batching: requests join and leave a running batch between decode steps.

    batch = engine.open_batch(rows=8)         one Slot: `rows` rows x `capacity` columns
    row = batch.request(prompt, adapter, max_new_tokens=..., temperature=..., ...)
    if batch.fits(row): handle = batch.join(row)
    updates = batch.step()                    [Update(handle, piece, result | error)]
    batch.leave(handle)                       a cancelled request frees its row at once

Every row shares the batch's column count P (fused graphs: GroupQueryAttention takes one
total length for the whole batch and rotates keys by column index):

    join(L-token prompt): a free row b with L <= P (an empty batch starts at P = L, its
        capacity grown if this row needs more) and P + its new tokens - 1 <= capacity;
        prefilled alone (batch 1, row b's buffer views) with attention_mask (1, P) = [0] * (P - L) + [1] * L, so its keys land at columns
        P-L .. P-1, right-aligned as a left-padded row of a static batch would be
        ─► its first token, from that prefill's last logits
    step(): one decode forward (B, 1), attention_mask (B, P + 1): each row feeds its last
        token, a free row a pad (its output is never read) ─► P += 1
    a row that ends (eos, stop string, its limit) or leaves is free for the next join;
    an empty batch starts again at P = 0

A row that joins at P sits at positions P-L.. rather than 0..: rotary scores depend only on
position differences, so its logits are the prompt's alone up to rounding, as for any
left-padded row. Columns left of a row hold masked stale keys of an earlier occupant.

Adapters: rows that all use one adapter (or none) bind it alone, as a request alone does;
LoRA rows of several adapters and base rows share one forward through a stack (mixed.py).
The stack only grows (the live rows' adapters joined to those it held, while still loaded),
so rows coming and going change only the row masks, not the stacked bytes. The batch holds
the adapter object a row joined with: an adapter unloaded (or reloaded under its name)
meanwhile leaves the running rows as they were; a reloaded one joins once the rows of the
old one have ended. Rows of any other adapter share a batch only with rows of that adapter.
An adapter that seeds a KV prefix (prompt / prefix tuning, MAM, UniPELT) cannot join: its prefix needs the
cache's first columns; run it with Engine.generate. Each row has its own Sampler (seed,
temperature, top-p, penalty), stop strings and limits: a sampled row draws what it would
alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgepeft.finite import check_finite_logits
from edgepeft.runtime.adapters import LoadedAdapter
from edgepeft.runtime.chat import IncrementalDecoder
from edgepeft.runtime.mixed import mixed_adapter, stack_adapters
from edgepeft.runtime.row import RowState, min_new_tokens_of, stop_strings
from edgepeft.runtime.sampling import Sampler, SamplingConfig, sampling_config

BATCH_CONTEXT = 512
"""Default columns of a continuous batch (capped at the export's max_context): room for
the rows that join while it runs; KV memory grows with it."""
GROWTH = 4
"""An empty batch grows to at most GROWTH x its context for a long request (KV memory is
rows x columns); a request needing more runs alone (Engine.generate's one-row slot)."""


class CannotJoin(ValueError):
    """A request that no continuous batch takes (the message says why and what to use)."""


@dataclass(frozen=True)
class RowRequest:
    """A request checked and tokenized for a continuous batch (`ContinuousBatch.request`)."""

    prompt_ids: list[int]
    adapter: str | None
    loaded: LoadedAdapter | None
    mixes: bool
    """LoRA or the base: shares a forward with other LoRA / base rows."""
    limit: int
    """Most new tokens: max_new_tokens, or the room the export's max_context leaves."""
    limit_reason: str
    """"length", or "context" when max_context cut the limit."""
    sampling: SamplingConfig
    stops: tuple[str, ...]
    min_new: int

    def shares_forward(self, other: RowRequest) -> bool:
        """Whether the two can decode in one forward: LoRA / base rows together (stacked),
        any other adapter's rows only with rows of that very adapter object."""
        return self.mixes == other.mixes and (self.mixes or self.loaded is other.loaded)


@dataclass(frozen=True)
class Update:
    """What one row did in a step: a text piece, and its result or error once it ended."""

    handle: int
    piece: str = ""
    result: object | None = None
    """The GenerationResult of a row that ended this step."""
    error: BaseException | None = None
    """Why a row failed (non-finite logits); it left the batch."""


@dataclass
class _Row:
    handle: int
    request: RowRequest
    state: RowState
    sampler: Sampler
    token: int = 0
    """The last sampled token: fed at the next step."""
    prefill_ms: float = 0.0
    decode_start: float = field(default_factory=time.perf_counter)


class ContinuousBatch:
    """Rows that join and leave between decode steps over one slot (module docstring).

    Args:
        engine: An Engine over a fused export (shared KV buffers).
        rows: Most requests decoding at once.
        context: Columns of the batch's cache (default BATCH_CONTEXT, capped at the
            export's max_context): a row joins only if its prompt and new tokens fit in
            what is left. A request that needs more waits until the batch is empty, which
            then grows to it (up to `max_columns`) and shrinks back when a request fits again.
        max_columns: The most columns the batch grows to (default GROWTH x context, capped
            at max_context); `request` refuses one that needs more (CannotJoin).
    """

    def __init__(
        self, engine, rows: int = 8, context: int | None = None, max_columns: int | None = None
    ):
        if not engine.spec.shared:
            raise CannotJoin(
                "continuous batching needs a fused graph (shared KV buffers); this export is "
                "the traced (generic) graph: use Engine.generate with a batch"
            )
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.engine = engine
        self.context = self._capped(context or BATCH_CONTEXT)
        """The columns the batch keeps when its rows need no more."""
        self.max_columns = max(self._capped(max_columns or GROWTH * self.context), self.context)
        self._request = engine.prepare(None, rows, self.context)
        self.slot = self._request.slot
        self.capacity = self.context
        """Columns rows may fill now (the slot, perhaps reused, may hold more)."""
        self.columns = 0
        """P: cache columns every row has filled (left-padded)."""
        self.rows: list[_Row | None] = [None] * rows
        self._stack = None
        """The LoraStack mixed LoRA rows read (grown as adapters join, module docstring)."""
        self._bound: tuple | None = None
        self._binding = None
        self._keep: LoadedAdapter | None = None
        self._handles = 0
        self._pending: list[Update] = []

    # ------------------------------------------------------------ admission

    def request(
        self,
        prompt,
        adapter: str | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop=None,
        seed: int | None = None,
        truncate: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> RowRequest:
        """Check and tokenize one request (Engine.generate's arguments, one prompt).

        Raises:
            CannotJoin: its adapter seeds a KV prefix, or it needs more than max_columns.
            UnknownAdapterError / ValueError / ContextLengthError: as Engine.generate does.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        loaded = self.engine.batch_adapter([adapter])
        if loaded is not None and loaded.prefix is not None:
            raise CannotJoin(
                f"adapter {adapter!r} seeds a KV prefix ({loaded.info.kind}), which needs the "
                "cache's first columns: it cannot join a running batch; use Engine.generate"
            )
        stops = stop_strings(stop)
        if stops and not self.engine.has_tokenizer():
            raise ValueError("stop strings need the export's tokenizer (tokenizer.json)")
        ids = self.engine.encode(prompt)
        ids = self.engine.fit_prompt(ids, 0, max_new_tokens, truncate)
        need = self._capped(len(ids) + max_new_tokens - 1)
        if need > self.max_columns:
            raise CannotJoin(
                f"the prompt ({len(ids)} tokens) and max_new_tokens {max_new_tokens} need {need} "
                f"cache columns, more than a batch grows to ({self.max_columns} x {len(self.rows)} "
                "rows of KV cache); it runs alone"
            )
        room = need - len(ids) + 1  # max_context cuts the new tokens, as generate does
        return RowRequest(
            prompt_ids=ids,
            adapter=adapter,
            loaded=loaded,
            mixes=loaded is None or loaded.info.kind == "lora",
            limit=min(max_new_tokens, room),
            limit_reason="length" if room >= max_new_tokens else "context",
            sampling=sampling_config(temperature, top_k, top_p, repetition_penalty, seed),
            stops=stops,
            min_new=min_new_tokens_of(min_new_tokens, max_new_tokens, ignore_eos),
        )

    @property
    def live(self) -> int:
        """Rows decoding now."""
        return sum(row is not None for row in self.rows)

    def fits(self, request: RowRequest) -> bool:
        """Whether `request` can join now (else after some steps, or once the batch empties:
        an empty batch takes any request, growing its columns if it must)."""
        if self.live == len(self.rows):
            return False
        running = [row.request for row in self.rows if row is not None]
        if not running:
            return True
        if not request.shares_forward(running[0]):
            return False
        same_name = [r.loaded for r in running if r.adapter == request.adapter]
        if any(loaded is not request.loaded for loaded in same_name):
            return False  # reloaded under the same name: after the old rows end
        length = len(request.prompt_ids)
        return length <= self.columns and self.columns + request.limit - 1 <= self.capacity

    def begin(self, requests: list[RowRequest]) -> None:
        """Start an empty batch at the longest prompt of the `requests` about to join (in
        order, as far as they can share it), so that the shorter ones join beside it now
        instead of after the first has decoded that many tokens."""
        if self.live or not requests:
            return
        first, columns, taken = requests[0], 0, []
        for request in requests[: len(self.rows)]:
            if not request.shares_forward(first):
                break
            taken.append(request)
            longer = max(columns, len(request.prompt_ids))
            if any(longer + r.limit - 1 > self.capacity for r in taken):
                break
            columns = longer
        self.columns = columns

    def join(self, request: RowRequest) -> int:
        """Prefill `request` into a free row; returns its handle. Its first piece (and its
        result, if it ends at once) comes with the next `step()`."""
        if not self.fits(request):
            raise ValueError("the request does not fit this batch now (check fits() first)")
        b = self.rows.index(None)
        length = len(request.prompt_ids)
        if self.live == 0:  # begin() may have set the columns; they must leave it room
            self._resize(max(self.columns, length) + request.limit - 1)
            fits = self.columns + request.limit - 1 <= self.capacity
            self.columns = max(self.columns, length) if fits else length
        start = self.columns - length
        slot = self.slot
        slot.mask[b, :start] = 0
        slot.mask[b, start : self.columns] = 1
        began = time.perf_counter()
        logits = self._prefill(b, request)
        self._handles += 1
        row = _Row(
            handle=self._handles,
            request=request,
            state=RowState(
                limit=request.limit,
                eos=self.engine.eos_token_ids,
                stops=request.stops,
                decoder=IncrementalDecoder(self.engine.codec)
                if self.engine.has_tokenizer()
                else None,
                min_new=request.min_new,
                limit_reason=request.limit_reason,
                seen=list(request.prompt_ids) if request.sampling.repetition_penalty != 1 else None,
            ),
            sampler=Sampler(request.sampling),
        )
        row.prefill_ms = (time.perf_counter() - began) * 1000
        row.decode_start = time.perf_counter()
        self.rows[b] = row
        self._take(b, logits, self._pending)
        return row.handle

    def _capped(self, columns: int) -> int:
        limit = self.engine.spec.max_context
        return min(columns, limit) if limit else columns

    def _resize(self, needed: int) -> None:
        """An empty batch takes a slot of max(context, needed) columns if it has another."""
        wanted = max(self.context, self._capped(needed))
        if wanted == self.capacity:
            return
        self._request.close()
        self._bound = self._binding = self._keep = None
        self.engine.clear_cache()  # the old slot's buffers go (idle slots are re-made on demand)
        self._request = self.engine.prepare(None, len(self.rows), wanted)
        self.slot, self.capacity = self._request.slot, wanted

    def _prefill(self, b: int, request: RowRequest) -> np.ndarray:
        """Row b's prompt alone over its buffer views; its last position's logits (1, V)."""
        import onnxruntime as ort

        parameters = request.loaded.parameters if request.loaded is not None else None
        binding, keep = self.slot.row_binding(b, parameters)
        ids = np.asarray([request.prompt_ids], np.int64)  # (1, L)
        logits = np.empty((1, ids.shape[1], self.engine.spec.vocab_size), np.float32)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input(
            "attention_mask", np.ascontiguousarray(self.slot.mask[b : b + 1, : self.columns])
        )
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.engine.session.run_with_iobinding(binding)
        del keep
        return logits[:, -1]

    def leave(self, handle: int) -> None:
        """Free the row of `handle` now (a cancelled request); unknown handles are ignored."""
        for b, row in enumerate(self.rows):
            if row is not None and row.handle == handle:
                self._free(b)

    # ------------------------------------------------------------ decoding

    def step(self) -> list[Update]:
        """One decode forward of every row; the updates of the joins since the last step
        come first. Nothing runs when no row is left."""
        updates, self._pending = self._pending, []
        live = [b for b, row in enumerate(self.rows) if row is not None]
        if not live:
            return updates
        slot, total = self.slot, self.columns + 1
        for b, row in enumerate(self.rows):
            slot.ids[b, 0] = row.token if row is not None else self.engine.pad_token_id
        slot.mask[:, self.columns] = 1
        binding = self._batch_binding()
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(slot.mask[:, :total]))
        self.engine.session.run_with_iobinding(binding)
        self.columns = total
        for b in live:
            self._take(b, slot.logits[b : b + 1, 0], updates)
        return updates

    def _batch_binding(self):
        """The slot's binding for the rows' adapters now (rebuilt when a join or leave
        changes them; free rows run as the base, or as the batch's one non-LoRA adapter)."""
        running = [row.request for row in self.rows if row is not None]
        names = tuple(row.request.adapter if row is not None else None for row in self.rows)
        live = {r.adapter: r.loaded for r in running}
        key = (names, tuple(id(a) for a in live.values()))
        if key == self._bound:
            return self._binding
        mixed = running[0].mixes and len(live) > 1
        if not mixed:  # one adapter (or the base) in every live row: free rows' output is unread
            loaded = running[0].loaded
        else:
            import onnxruntime as ort

            to_ort = ort.OrtValue.ortvalue_from_numpy
            self._stack = self._grown_stack(
                {n: a for n, a in live.items() if n is not None}, to_ort
            )
            loaded = mixed_adapter(self._stack, names, to_ort)
        self._binding = self.slot.binding(loaded, cache=not mixed)
        self._keep = loaded  # the binding's tensors live as long as it is used
        self._bound = key
        return self._binding

    def _grown_stack(self, live: dict[str, LoadedAdapter], to_ort):
        """The stack, rebuilt only when a live adapter is not in it (as that very object):
        then with the live adapters and those it held that are still loaded as they were."""
        held = (
            dict(zip(self._stack.names, self._stack.adapters, strict=True)) if self._stack else {}
        )
        if all(held.get(name) is adapter for name, adapter in live.items()):
            return self._stack
        loaded = self.engine.adapters()
        for name, adapter in held.items():
            if name not in live and loaded.get(name) is adapter.info:
                live[name] = adapter
        return stack_adapters(list(live.values()), self.engine.graph_inputs, to_ort)

    def _take(self, b: int, logits: np.ndarray, updates: list[Update]) -> None:
        """Row b's next token from its logits (1, V): a piece, and its end if it ended."""
        row = self.rows[b]
        state = row.state
        try:  # non-finite logits would sample token 0 and answer '' without a word
            check_finite_logits(logits, adapter=row.request.adapter, step=len(state.generated))
        except ValueError as e:
            self._free(b)
            updates.append(Update(row.handle, error=e))
            return
        seen = [state.seen] if state.seen is not None else None
        row.token = int(row.sampler(logits, seen, state.banned())[0])
        state.push(row.token)
        if not state.done:
            updates.append(Update(row.handle, state.piece()))
            return
        decode_ms = (time.perf_counter() - row.decode_start) * 1000
        result = self.engine.result(
            state, row.request.prompt_ids, row.request.adapter, row.prefill_ms, decode_ms
        )
        updates.append(Update(row.handle, result.text[state.sent :], result=result))
        self._free(b)

    def _free(self, b: int) -> None:
        self.rows[b] = None
        if self.live == 0:
            self.columns = 0

    def close(self) -> None:
        """Give the slot back (rows still running are dropped)."""
        self.rows = [None] * len(self.rows)
        self._binding = self._keep = self._stack = None
        self._request.close()

    def __enter__(self) -> ContinuousBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["BATCH_CONTEXT", "CannotJoin", "ContinuousBatch", "RowRequest", "Update"]
