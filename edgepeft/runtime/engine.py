"""Engine: one base graph in one InferenceSession, adapters chosen per request.

    Engine("out/")                       edgepeft.json ─► file sizes (+ sha256: verify_files)
                                         ─► session (providers, threads) ─► manifest vs graph
        │                                adapters listed in the manifest ─► loaded, checked
        ├─ load_adapter(path, name) / unload_adapter(name) / adapters()
        ├─ generate(prompt | [prompts] | messages, adapter=name, ...) ─► str | [str]
        │      adapter=[name per row]: a mixed-adapter batch, one forward (mixed.py)
        │      prompts ─► ids (chat.py) ─► prepare(adapter, batch): a free Slot and its
        │      IOBinding for the adapter (kv_cache.py) ─► prefill + decode steps (decode.py)
        │      ─► sampling.py picks tokens ─► stop at eos / stop strings / max_new_tokens
        │      (eos and stop strings not before min_new_tokens; ignore_eos: max_new_tokens)
        ├─ stream(...) ─► text pieces as they are decoded
        ├─ open_batch(rows) ─► a ContinuousBatch: requests join and leave between decode
        │      steps, each row its own adapter, sampler and limits (continuous.py)
        └─ memory() ─► base, adapter and KV cache bytes

Thread-safe: every request works in its own Slot; the session, the registry and the pool
are shared (onnxruntime runs one session from many threads). Switching adapters changes
which binding a request uses; the base weights are never reloaded or copied.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.artifacts.files import check_files, split_records
from edgepeft.artifacts.manifest import ExportIndex, manifest_path, read_manifest
from edgepeft.finite import check_finite_logits
from edgepeft.runtime.adapters import AdapterInfo, AdapterRegistry, LoadedAdapter, read_adapter
from edgepeft.runtime.chat import IncrementalDecoder, TextCodec
from edgepeft.runtime.contract import check_manifest
from edgepeft.runtime.decode import fused_steps, generic_steps
from edgepeft.runtime.errors import ContextLengthError
from edgepeft.runtime.kv_cache import CacheSpec, Slot, SlotPool
from edgepeft.runtime.memory import MemoryReport, graph_bytes
from edgepeft.runtime.mixed import mixed_adapter, stack_adapters
from edgepeft.runtime.row import RowState, held_back, min_new_tokens_of, stop_strings
from edgepeft.runtime.sampling import Sampler, sampling_config
from edgepeft.runtime.session import LOG, choose_providers, create_session, device_settings

FINISH_REASONS = ("eos", "stop", "length", "context")
MIXED_STACKS = 2
"""Sets of adapters whose stacked tensors stay ready (each costs its adapters' bytes)."""
MIXED_BATCHES = 64
"""Row orders of those sets whose masks stay bound (each costs a few KiB)."""


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's continuation and how it was made."""

    text: str
    """The continuation, cut before a stop string; special tokens skipped."""
    token_ids: list[int]
    """Generated tokens (the eos token not included)."""
    prompt_ids: list[int]
    """The prompt as fed (after any truncation), without the adapter's virtual tokens."""
    finish_reason: str
    """"eos", "stop" (a stop string), "length" (max_new_tokens) or "context" (max_context)."""
    adapter: str | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    """Wall time of the decode steps (every token after the first)."""

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


@dataclass
class Request:
    """A slot taken for one request with the binding of its adapter (`Engine.prepare`)."""

    adapter: LoadedAdapter | None
    slot: Slot | None
    binding: object | None
    """fused: the slot's IOBinding with the adapter's tensors bound; generic: None."""
    _pool: SlotPool | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._pool is not None and self.slot is not None:
            self._pool.release(self.slot)
            self._pool = None

    def __enter__(self) -> Request:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine:
    """Run an export folder's base graph with switchable adapters (no torch needed).

    Args:
        export_dir: A folder `edgepeft export` wrote (one graph; a merged set's sub-folder).
        providers: onnxruntime execution providers to try in order (names or (name, options)).
        threads: intra-op threads of the session (default: onnxruntime's).
        device: A device profile (name, path or DeviceProfile) giving providers and threads.
        load_adapters: Load the adapters the manifest lists (a broken file is logged and
            skipped, see `load_errors`).
        verify_files: Also check the sha256 of every file the manifest records (reads them
            all); their sizes are always checked, and the manifest against the graph. A
            listed adapter whose file fails is skipped like any broken one (`load_errors`).

    Raises:
        FileIntegrityError: a file of the graph (model.onnx, its data, tokenizer files,
            genai_config.json) is missing or has another size (or sha256); names the file,
            both values and what to do.
        ManifestGraphMismatchError: a manifest field contradicts the graph (named).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        providers: Sequence | None = None,
        threads: int | None = None,
        device=None,
        *,
        load_adapters: bool = True,
        verify_files: bool = False,
    ):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        if isinstance(manifest, ExportIndex):
            names = ", ".join(f"{self.export_dir / folder}" for folder in manifest.graphs.values())
            raise ValueError(
                f"{self.export_dir} is a merged set (one graph per adapter, each with the adapter "
                f"folded in): open one of its graphs, e.g. Engine('{names.split(', ')[0]}'); "
                f"graphs: {names}. Export with mode='separate' to switch adapters in one engine"
            )
        self.manifest = manifest
        listed = {entry.name: entry.file for entry in manifest.adapters if entry.file}
        graph_files, adapter_files = split_records(manifest.files or {}, listed)
        for entry in manifest.adapters:  # a hybrid's prefix part is checked with its adapter
            if entry.prefix_file in graph_files and entry.name in adapter_files:
                adapter_files[entry.name][entry.prefix_file] = graph_files.pop(entry.prefix_file)
        # before onnxruntime reads a truncated file; each adapter's when it is loaded
        check_files(self.export_dir, graph_files, hashes=verify_files)
        device_providers, device_threads = device_settings(device)
        requested = providers or device_providers or manifest.providers
        chosen = choose_providers(requested, ort.get_available_providers())
        self.session = create_session(
            self.export_dir / manifest.model_file, chosen, threads or device_threads
        )
        check_manifest(manifest, self.session, str(manifest_path(self.export_dir)))
        self.providers: list[str] = list(self.session.get_providers())
        self.graph_inputs = frozenset(i.name for i in self.session.get_overridable_initializers())
        self.spec = CacheSpec(
            num_layers=manifest.num_layers,
            num_kv_heads=manifest.num_kv_heads,
            head_dim=manifest.head_dim,
            vocab_size=manifest.vocab_size,
            kv_dtype=np.dtype(manifest.kv_dtype),
            shared=manifest.graph == "fused",
            max_context=manifest.max_context,
        )
        self._pool = SlotPool(self.session, self.spec)
        self._registry = AdapterRegistry()
        self._stacks: dict[tuple, object] = {}
        """Sorted adapter names -> their LoraStack (mixed.py), the last MIXED_STACKS kept."""
        self._mixed: dict[tuple, LoadedAdapter] = {}
        """Row adapters -> the stack plus row masks, the last MIXED_BATCHES kept."""
        self._mixed_lock = threading.Lock()
        self._codec: TextCodec | None = None
        self.eos_token_ids = _eos_ids(manifest.eos_token_id)
        self.pad_token_id = manifest.pad_token_id if manifest.pad_token_id is not None else 0
        self.load_errors: dict[str, str] = {}
        if load_adapters:
            for name, file in listed.items():
                try:
                    check_files(self.export_dir, adapter_files[name], hashes=verify_files)
                    self.load_adapter(self.export_dir / file, name)
                except (ValueError, OSError) as e:
                    self.load_errors[name] = str(e)
                    LOG.error("adapter %r not loaded: %s", name, e)

    # ------------------------------------------------------------ adapters

    def load_adapter(self, path: str | os.PathLike, name: str | None = None) -> AdapterInfo:
        """Load an .onnx_adapter or .kvprefix.safetensors file, checked against this base.

        Raises:
            AdapterBaseMismatchError: made for another base (names both fingerprints).
            AdapterLoadError: unreadable / truncated / altered file, or a tensor this graph
                has no input for (named). The engine's other adapters are unaffected.
        """
        adapter = read_adapter(
            path,
            name=name,
            base_fingerprint=self.manifest.base_fingerprint,
            graph_inputs=self.graph_inputs,
            kv_shape=(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim),
        )
        self._registry.add(adapter)
        self.load_errors.pop(adapter.name, None)
        return adapter.info

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; requests already running with it finish with it."""
        self._registry.remove(name)
        self._pool.forget(name)
        with self._mixed_lock:
            for rows in [rows for rows in self._mixed if name in rows]:
                self._pool.forget(self._mixed.pop(rows).name)
            for names in [names for names in self._stacks if name in names]:
                del self._stacks[names]

    def adapters(self) -> dict[str, AdapterInfo]:
        """name -> AdapterInfo (kind, rank, bytes, file, ...) of every loaded adapter."""
        return self._registry.infos()

    def prepare(
        self, adapter: str | None = None, batch_size: int = 1, capacity: int = 1
    ) -> Request:
        """Take a slot for a request with `adapter`: the per-request switch, timed alone.

        After the first request of an adapter on a slot, this is a registry lookup, a pool
        lookup and a cached binding: no tensor is bound or copied. Close the Request (or use
        it as a context manager) to give the slot back.
        """
        loaded = None if adapter is None else self._registry.get(adapter)
        return self._prepare(loaded, batch_size, capacity)

    def _row_adapters(self, adapter, batch: int) -> tuple[LoadedAdapter | None, list]:
        """(what the batch binds, each row's adapter name) for adapter=name or [name per row]."""
        if adapter is None or isinstance(adapter, str):
            loaded = None if adapter is None else self._registry.get(adapter)
            return loaded, [adapter] * batch
        names = list(adapter)
        if len(names) != batch:
            raise ValueError(f"adapter lists {len(names)} names for a batch of {batch} prompts")
        return self.batch_adapter(names), names

    def batch_adapter(self, rows: Sequence[str | None]) -> LoadedAdapter | None:
        """What a batch binds for one adapter name (or None: the base) per row: that adapter
        when all rows agree, else the rows' LoRA adapters stacked with row masks (mixed.py)."""
        names = list(rows)
        if len(set(names)) == 1:
            return None if names[0] is None else self._registry.get(names[0])
        distinct = tuple(sorted({n for n in names if n is not None}))
        key = tuple(names)
        with self._mixed_lock:
            hit = self._mixed.get(key)
        if hit is None:
            import onnxruntime as ort

            to_ort = ort.OrtValue.ortvalue_from_numpy
            with self._mixed_lock:
                stack = self._stacks.get(distinct)
            if stack is None:
                loaded = [self._registry.get(n) for n in distinct]
                stack = stack_adapters(loaded, self.graph_inputs, to_ort)
            hit = mixed_adapter(stack, names, to_ort)
            with self._mixed_lock:
                self._stacks[distinct] = stack
                while len(self._stacks) > MIXED_STACKS:  # the oldest set's stacked copies
                    old = self._stacks.pop(next(iter(self._stacks)))
                    for key in [k for k, v in self._mixed.items() if v.keep_alive[0] is old]:
                        self._pool.forget(self._mixed.pop(key).name)
                self._mixed[key] = hit
                while len(self._mixed) > MIXED_BATCHES:
                    self._pool.forget(self._mixed.pop(next(iter(self._mixed))).name)
        return hit

    def open_batch(
        self, rows: int = 8, context: int | None = None, max_columns: int | None = None
    ):
        """A ContinuousBatch over this engine: requests join and leave between decode steps
        (runtime/continuous.py; fused exports). Close it to give its slot back."""
        from edgepeft.runtime.continuous import ContinuousBatch

        return ContinuousBatch(self, rows, context, max_columns)

    def _prepare(self, loaded: LoadedAdapter | None, batch_size: int, capacity: int) -> Request:
        if not self.spec.shared:
            return Request(loaded, None, None)
        slot = self._pool.acquire(batch_size, capacity)
        try:
            binding = slot.binding(loaded)
        except BaseException:
            self._pool.release(slot)
            raise
        return Request(loaded, slot, binding, self._pool)

    # ------------------------------------------------------------ text

    @property
    def codec(self) -> TextCodec:
        """The export's tokenizer and chat template (loaded on first use)."""
        if self._codec is None:
            self._codec = TextCodec(self.export_dir, self.manifest.bos_token_id)
        return self._codec

    def encode(self, prompt) -> list[int]:
        """Token ids of one prompt: a string, a list of chat messages, or token ids as is."""
        if isinstance(prompt, str):
            return self.codec.encode(prompt)
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            return self.codec.encode(self.codec.render_chat(list(prompt)))
        if (
            isinstance(prompt, (Sequence, np.ndarray))
            and len(prompt)
            and all(isinstance(t, (int, np.integer)) for t in prompt)
        ):
            return [int(t) for t in prompt]
        raise TypeError(
            "a prompt is a string, a list of {'role', 'content'} messages, or a list of token "
            f"ids; got {type(prompt).__name__} {str(prompt)[:80]!r}"
        )

    def _prompts(self, prompt_or_messages) -> tuple[list, bool]:
        """(prompts, batched): a list of strings / chats / id lists is a batch."""
        p = prompt_or_messages
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], (str, list, tuple, np.ndarray)):
            return list(p), True
        return [p], False

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompt_or_messages,
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        *,
        truncate: bool = False,
        return_result: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ):
        """Continue a prompt (or a batch of prompts).

        Args:
            prompt_or_messages: A string, chat messages [{"role", "content"}] (the export's
                chat template), token ids, or a list of those (a batch, left padded).
            adapter: A loaded adapter's name; None runs the base. For a batch, also a list
                with one name (or None) per prompt: LoRA adapters then share one forward,
                each row computing its own (runtime/mixed.py).
            max_new_tokens: Most tokens to generate per prompt.
            temperature: 0 is greedy; else sample with top_k / top_p.
            repetition_penalty: HF-style penalty on tokens already in the row.
            stop: String(s) ending the continuation (not included in the text).
            seed: Seeds sampling (reproducible per request).
            truncate: Keep a too-long prompt's last tokens instead of raising.
            return_result: Return GenerationResult(s) (text, token ids, timings).
            min_new_tokens: Neither eos (never sampled before then) nor a stop string ends
                a prompt's continuation before this many tokens.
            ignore_eos: min_new_tokens = max_new_tokens: exactly max_new_tokens tokens
                (fewer only at max_context), as decode benchmarks need.

        Returns:
            str, or a list of str for a batch (GenerationResult(s) with return_result).
        """
        prompts, batched = self._prompts(prompt_or_messages)
        results = self._generate(
            prompts,
            adapter,
            max_new_tokens,
            sampling_config(temperature, top_k, top_p, repetition_penalty, seed),
            stop_strings(stop),
            truncate,
            min_new=min_new_tokens_of(min_new_tokens, max_new_tokens, ignore_eos),
        )
        out = results if return_result else [r.text for r in results]
        return out if batched else out[0]

    def stream(
        self,
        prompt_or_messages,
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        *,
        truncate: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        return_result: bool = False,
    ) -> Iterator[str | GenerationResult]:
        """Yield the continuation of one prompt in text pieces as tokens are decoded.

        Pieces hold whole characters (a multi-byte character split over tokens comes out
        once complete) and never the start of a stop string; "".join(pieces) equals
        `generate(...)` with the same arguments. With `return_result`, the last item is the
        GenerationResult (token counts, finish reason: what a server reports). Closing the
        iterator early ends the request between two decode steps and frees its slot.
        """
        prompts, batched = self._prompts(prompt_or_messages)
        if batched:
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        steps = self.stream_batch(
            prompts,
            adapter,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            stop,
            seed,
            truncate=truncate,
            min_new_tokens=min_new_tokens,
            ignore_eos=ignore_eos,
        )
        try:
            for item in steps:
                if item and isinstance(item[0], GenerationResult):
                    if return_result:
                        yield item[0]
                    return
                if item[0]:
                    yield item[0]
        finally:
            steps.close()  # closed early: the slot goes back now, not when collected

    def stream_batch(
        self,
        prompts: Sequence,
        adapter: str | Sequence[str | None] | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        *,
        truncate: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> Iterator[list]:
        """A batch decoded together, streamed: after each decode step one text piece per row
        ("" when a row has nothing new, as `stream` holds back a possible stop string), then
        as the last item the list of GenerationResults.

        `adapter` may name one adapter per row (a mixed batch) and `max_new_tokens` give one
        limit per row; the other arguments are `generate`'s, shared by every row. Closing the
        iterator ends the batch between two decode steps and frees its slot.
        """
        if not prompts:
            raise ValueError("stream_batch() needs at least one prompt")
        stops = stop_strings(stop)
        sampling = sampling_config(temperature, top_k, top_p, repetition_penalty, seed)
        limits = _row_limits(max_new_tokens, len(prompts))
        min_new = min_new_tokens_of(min_new_tokens, max(limits), ignore_eos)
        sent = [0] * len(prompts)
        run = self._run(
            list(prompts), adapter, limits, sampling, stops, truncate, True, min_new=min_new
        )
        try:
            for value, final in run:
                texts = [r.text for r in value] if final else value
                pieces = []
                for b, text in enumerate(texts):
                    safe = len(text) if final else len(text) - held_back(text, stops)
                    pieces.append(text[sent[b] : safe] if safe > sent[b] else "")
                    sent[b] = max(sent[b], safe)
                if final:
                    if any(pieces):
                        yield pieces
                    yield value
                    return
                yield pieces
        finally:
            run.close()

    def _generate(self, prompts, adapter, max_new_tokens, sampling, stops, truncate, min_new=0):
        run = self._run(
            prompts, adapter, max_new_tokens, sampling, stops, truncate, bool(stops), min_new=min_new
        )
        for value, final in run:
            if final:
                return value
        raise AssertionError("generation ended without a result")

    def _run(
        self, prompts, adapter_name, max_new_tokens, sampling, stops, truncate, incremental, min_new=0
    ):
        """Yields (texts so far, False) after every token, then (results, True).

        `incremental`: decode text token by token (streaming, stop strings); else the text
        is decoded once at the end (the hot loop then only samples and runs the graph).
        `min_new`: tokens before which eos is not sampled and no stop string ends a row.
        """
        limits = _row_limits(max_new_tokens, len(prompts))
        max_new_tokens = max(limits)
        loaded, row_names = self._row_adapters(adapter_name, len(prompts))
        adapter_name = loaded.name if loaded is not None else None
        prefix = loaded.prefix if loaded is not None else None
        n_virtual = prefix.num_virtual_tokens if prefix is not None else 0
        rows = [self.encode(p) for p in prompts]
        rows = [
            self.fit_prompt(r, n_virtual, max_new_tokens, truncate, i, len(rows))
            for i, r in enumerate(rows)
        ]
        input_ids, mask = self._left_padded(rows)
        batch, length = input_ids.shape
        room = (self.spec.max_context or 1 << 62) - n_virtual - length + 1
        new_tokens = min(max_new_tokens, room)
        min_new = min(min_new, new_tokens)
        sampler = Sampler(sampling)
        penalised = sampling.repetition_penalty != 1.0
        need = n_virtual + length + new_tokens - 1  # cache positions the request fills
        # The adapter looked up above serves the whole request, even if it is unloaded meanwhile.
        with self._prepare(loaded, batch, need) as request:
            if self.spec.shared:
                params = loaded.parameters if loaded is not None else None
                steps = fused_steps(
                    self.session, request.slot, request.binding, input_ids, mask, prefix, params
                )
            else:
                params = loaded.parameters if loaded is not None else {}
                steps = generic_steps(self.session, self.spec, params, input_ids, mask, prefix)
            has_text = self.has_tokenizer()
            if stops and not has_text:
                raise ValueError("stop strings need the export's tokenizer (tokenizer.json)")
            states = [
                RowState(
                    limit=min(limit, new_tokens),
                    eos=self.eos_token_ids,
                    stops=stops,
                    decoder=IncrementalDecoder(self.codec) if incremental and has_text else None,
                    min_new=min_new,
                    limit_reason="length" if limit <= new_tokens else "context",
                    seen=list(row) if penalised else None,
                )
                for limit, row in zip(limits, rows, strict=True)
            ]
            seen = [state.seen for state in states] if penalised else None
            start = time.perf_counter()
            try:
                logits = next(steps)
                prefill_ms = (time.perf_counter() - start) * 1000
                decode_start = time.perf_counter()
                for step in range(new_tokens):
                    # Non-finite logits would sample token 0 and answer '' without a word.
                    active = [not state.done for state in states]
                    check_finite_logits(logits[active], adapter=adapter_name, step=step)
                    # Every unfinished row has `step` tokens: eos is held back for all alike.
                    banned = self.eos_token_ids if step < min_new else ()
                    tokens = sampler(logits, seen, banned)
                    for b, state in enumerate(states):
                        if state.done:
                            continue
                        state.push(int(tokens[b]))
                    if all(state.done for state in states):
                        break
                    yield [state.text for state in states], False
                    live = [not state.done for state in states]  # ended rows feed a pad
                    tokens = np.where(live, tokens, self.pad_token_id)
                    logits = steps.send(tokens.astype(np.int64))
                decode_ms = (time.perf_counter() - decode_start) * 1000
            finally:
                steps.close()
        results = [
            self.result(state, prompt_ids, name, prefill_ms, decode_ms)
            for state, prompt_ids, name in zip(states, rows, row_names, strict=True)
        ]
        yield results, True

    def result(
        self,
        state: RowState,
        prompt_ids: list[int],
        adapter: str | None,
        prefill_ms: float,
        decode_ms: float,
    ) -> GenerationResult:
        """The GenerationResult of a finished row: a stopped row keeps its cut text, the
        others are decoded whole (the tokenizer's own text, not the pieces')."""
        if state.reason == "stop":
            text = state.text
        else:
            text = self.codec.decode(state.generated) if self.has_tokenizer() else ""
        return GenerationResult(
            text=text,
            token_ids=state.generated,
            prompt_ids=prompt_ids,
            finish_reason=state.reason or state.limit_reason,
            adapter=adapter,
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
        )

    def _left_padded(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask (B, T), rows right-aligned (every prompt ends at T)."""
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row) :] = row
            mask[b, length - len(row) :] = 1
        return input_ids, mask

    def has_tokenizer(self) -> bool:
        """Whether the export ships a tokenizer (text in and out; else token ids only)."""
        if self._codec is not None:
            return True
        try:
            self.codec  # noqa: B018  (loads it)
        except FileNotFoundError:
            return False
        return True

    def fit_prompt(
        self, row: list[int], n_virtual: int, max_new: int, truncate: bool, i: int = 0, n: int = 1
    ) -> list[int]:
        """Prompt `i` of `n` as it fits the export's max_context beside `n_virtual` virtual
        tokens: as is, cut to its last tokens (`truncate`), or ContextLengthError."""
        limit = self.spec.max_context
        if not row:
            raise ValueError(
                f"prompt {i} tokenizes to no tokens; the model needs something to continue"
            )
        if limit is None or n_virtual + len(row) <= limit:
            return row
        which = f"prompt {i} of {n}" if n > 1 else "the prompt"
        if not truncate:
            raise ContextLengthError(
                f"{which} has {len(row)} tokens"
                + (f" (+{n_virtual} virtual tokens of the adapter)" if n_virtual else "")
                + f", more than the export's max_context {limit}; shorten it or pass "
                "truncate=True to keep its last tokens"
            )
        keep = max(limit - n_virtual - max_new + 1, 1)
        return row[-keep:]

    # ------------------------------------------------------------ memory

    def memory(self) -> MemoryReport:
        """Bytes held now: base graph and weights, each adapter, KV cache buffers."""
        return MemoryReport(
            base_bytes=graph_bytes(self.export_dir / self.manifest.model_file),
            adapters={name: info.bytes for name, info in self.adapters().items()},
            kv_cache_bytes=self._pool.nbytes,
        )

    def clear_cache(self) -> None:
        """Free the KV buffers of idle request slots (they are re-made on demand)."""
        self._pool.clear()

    def __repr__(self) -> str:
        return (
            f"Engine({str(self.export_dir)!r}, graph={self.manifest.graph}, "
            f"providers={self.providers}, adapters={sorted(self.adapters())})"
        )


def _eos_ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    values = value if isinstance(value, (list, tuple)) else [value]
    return frozenset(int(v) for v in values)


def _row_limits(max_new_tokens, batch: int) -> list[int]:
    """max_new_tokens as one limit per row (an int applies to every row)."""
    limits = (
        [max_new_tokens] * batch
        if isinstance(max_new_tokens, (int, np.integer))
        else [int(n) for n in max_new_tokens]
    )
    if len(limits) != batch:
        raise ValueError(f"max_new_tokens lists {len(limits)} limits for a batch of {batch}")
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
    return limits


__all__ = ["Engine", "GenerationResult", "Request"]
