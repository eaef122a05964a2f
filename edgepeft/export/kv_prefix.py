"""Prompt and prefix tuning as KV-cache prefixes: an adapter file seeded into the cache.

    prefix tuning   flat (N, L*2*H*D) ──view──► layer l: K_l, V_l (1, H, N, D)   (as learned)
    prompt tuning   virtual embeddings (1, N, hidden) ──► the model, adapter active,
                    positions 0..N-1 ──► the K_l, V_l every layer caches
         │
         ▼  adapters/<name>.kvprefix.safetensors   (numpy-readable; no graph change)
    past_key_values.{l}.key/.value (1, H, N, D) fp32, rotary.{l}.inv_freq (rotary_dim/2,)
         │
         ▼  seed_past: per row b, broadcast and (if needed) rotate keys by Δ_b positions
    graph(input_ids (B,T), attention_mask [1 x N | mask], past_key_values = prefix)

Positions, the crux. Row b of a left-padded batch (p_b pads, token j of the padded row)
can place its tokens in two frames, the `positions` option of seed_past / prefill_with_prefix:

    "unpadded"  N + j - p_b      the text directly follows the virtual tokens, as in training
                                 and at batch 1: a prompt's output does not depend on which
                                 prompts share its batch (what the runtime uses)
    "peft"      HF peft's batched reference (edgepeft's PyTorch hooks match peft to 0.0),
                under `generate` (position_ids = cumsum(mask) - 1); verify compares with it
        prefix tuning   N + cumsum(mask) - 1 = N + j - p_b   pads not counted (= "unpadded")
        prompt tuning   column index N + j   peft drops position_ids; virtual tokens at
                                             0..N-1, then the pads, then the text

Prefix keys are used as learned (they act as rotated by position 0); prompt keys are cached
at 0..N-1. The graphs place token j of row b at

    fused   N + j          GroupQueryAttention rotates by column; past keys are used as given,
                           new keys rotated before they are cached (checked by the tests)
    generic N + j - p_b    position_ids = cumsum([1 x N | mask]) - 1

RoPE scores depend only on (query position - key position), so a cached key that stands at
position a in PyTorch must be rotated by Δ_b = (graph position - PyTorch position) of the
row's tokens:

                    positions="peft"   positions="unpadded"
    fused   prefix      p_b                 p_b
    fused   prompt      0                   p_b
    generic prefix      0                   0
    generic prompt      -p_b                0

A row without padding (batch 1, the usual edge case) always has Δ = 0: plain broadcast.
Learned absolute positions (GPT-2) cannot be shifted in a cache: there "peft" seeds a
prompt only into unpadded rows (a padded row's tokens sit at other absolute positions in
peft), while "unpadded" needs no shift on a generic graph and takes any padding.

GroupQueryAttention refuses T > 1 new tokens over a non-empty past at batch > 1, so a fused
prefill runs row by row (each at batch 1 with its own padding, which reproduces what a batched
prefill would compute) and the presents are stacked; decode steps then run batched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.atomic import atomic_path
from edgepeft.export.files import tensors_sha256
from edgepeft.finite import check_finite
from edgepeft.kv_cache_keyword import output_cache

KIND = "kv_prefix"
KV_PREFIX_PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
"""Adapter methods shipped as KV prefixes rather than graph inputs."""
FORMAT = "edgepeft-kv-prefix"
FORMAT_VERSION = 1
SUFFIX = ".kvprefix.safetensors"
ADAPTERS_DIR = "adapters"
LAYOUT = "past_key_values.{i}.key/.value: (1, num_kv_heads, num_virtual_tokens, head_dim) float32"
GRAPH_KINDS = ("fused", "generic")
POSITIONS = ("peft", "unpadded")
"""Frames a padded row's tokens can take (module docstring): HF peft's batched semantics, or
the text right after the virtual tokens, as at batch 1 (batch-invariant)."""
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


# ---------------------------------------------------------------- the adapter's cache prefix


def _virtual_tokens(model, adapter_name: str):
    """(the model's VirtualTokens module, the adapter's plan); errors name what is wrong."""
    from edgepeft.adapters.inject import list_adapters
    from edgepeft.adapters.prompt import ATTRIBUTE

    adapters = list_adapters(model)
    if adapter_name not in adapters:
        have = ", ".join(adapters) or "none"
        raise KeyError(f"no adapter named {adapter_name!r} on this model (adapters: {have})")
    module = getattr(model, ATTRIBUTE, None)
    if module is None or adapter_name not in module.plans:
        raise ValueError(
            f"adapter {adapter_name!r} is {adapters[adapter_name].peft_type}; a KV prefix is made "
            "from prompt or prefix tuning adapters only (merge or export the others as graphs)"
        )
    return module, module.plans[adapter_name]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _inv_freq(model, layer: int) -> np.ndarray | None:
    """The rotary frequencies (rotary_dim / 2,) layer `layer` rotates by; None: no rotary."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return None
    rope_type = rotary.rope_type
    prefix = ""
    if isinstance(rope_type, dict):  # per layer type (gemma3: local and global rotary)
        layer_type = _text_config(model).layer_types[layer]
        rope_type, prefix = rope_type[layer_type], f"{layer_type}_"
    if rope_type not in _STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} changes its frequencies with the sequence length, so a "
            f"cached prefix cannot be re-positioned; supported: {sorted(_STATIC_ROPE_TYPES)}"
        )
    return getattr(rotary, f"{prefix}inv_freq").detach().float().cpu().numpy()


def _prefix_keys_values(module, name: str, plan) -> list[tuple]:
    """Per layer (K, V), each (1, H, N, D): peft's flat layout (layer, key|value, head, dim)."""
    import torch

    n, layers, heads, head_dim = (
        plan.num_virtual_tokens,
        plan.num_layers,
        plan.kv_heads,
        plan.head_dim,
    )
    with torch.no_grad():
        kv = module.flat(name).detach().float().view(n, layers, 2, heads, head_dim)
        kv = kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, N, D)
        return [(kv[i, 0][None], kv[i, 1][None]) for i in range(layers)]


def _prompt_keys_values(model, module, name: str) -> list[tuple]:
    """Per layer (K, V) (1, H, N, D) that the model caches for the N virtual tokens.

    The model runs as it is with `name` active, except that the virtual tokens are fed
    as inputs_embeds themselves (the hook that prepends them is paused), at positions
    0..N-1 under a full mask, as the hook places them. Every module's active adapter is
    put back afterwards; no requires_grad flag changes.
    """
    import torch

    from edgepeft.adapters.layer import adapter_modules

    modules = [m for _, m in adapter_modules(model)]
    before = [m.active for m in modules]
    for m in modules:
        m.set_active(name)  # a module without `name` becomes inactive, as set_adapter does
    module.set_active(None)  # the prompts go in as inputs below, not through the hook
    try:
        embeds = model.get_input_embeddings()
        prompts = module.flat(name).detach().to(embeds.weight.dtype)[None]  # (1, N, hidden)
        n = prompts.shape[1]
        with torch.no_grad():
            out = model(
                inputs_embeds=prompts,
                attention_mask=torch.ones(1, n, dtype=torch.long, device=prompts.device),
                position_ids=torch.arange(n, device=prompts.device)[None],
                use_cache=True,
            )
    finally:
        for m, active in zip(modules, before, strict=True):
            m.active = active
    pairs = [(layer.keys.float(), layer.values.float()) for layer in output_cache(out).layers]
    if any(keys.shape[2] != n for keys, _ in pairs):
        raise NotImplementedError(
            f"adapter {name!r}: a layer cached fewer than its {n} virtual tokens (a sliding "
            "window shorter than the prompt); such a prompt has no KV prefix"
        )
    return pairs


def kv_prefix_tensors(model, adapter_name: str) -> dict[str, np.ndarray]:
    """The cache prefix of a prompt or prefix tuning adapter, in PyTorch's (peft's) frame.

    Args:
        model: An edgepeft model holding adapter `adapter_name` (prompt or prefix tuning);
            it is left as it was (active adapter included).
        adapter_name: The adapter to turn into cache entries.

    Returns:
        "past_key_values.{i}.key" / ".value": (1, n_kv, N, head_dim) float32 per layer, keys
        in the frame PyTorch caches them (see the module docstring), and, for rotary
        models, "rotary.{i}.inv_freq": (rotary_dim / 2,) float32, so a runtime can move
        keys to a graph's frame (`seed_past`).
    """
    module, plan = _virtual_tokens(model, adapter_name)
    if plan.method == "prefix":
        pairs = _prefix_keys_values(module, adapter_name, plan)
    else:
        pairs = _prompt_keys_values(model, module, adapter_name)
    tensors: dict[str, np.ndarray] = {}
    for i, (keys, values) in enumerate(pairs):
        tensors[f"past_key_values.{i}.key"] = np.ascontiguousarray(keys.cpu().numpy(), np.float32)
        tensors[f"past_key_values.{i}.value"] = np.ascontiguousarray(
            values.cpu().numpy(), np.float32
        )
        inv_freq = _inv_freq(model, i)
        if inv_freq is not None:
            tensors[f"rotary.{i}.inv_freq"] = np.ascontiguousarray(inv_freq, np.float32)
    return tensors


# ---------------------------------------------------------------- the file


@dataclass(frozen=True)
class KVPrefix:
    """An adapter's cache prefix as the runtime holds it (numpy only)."""

    adapter: str
    method: str
    """"prefix" or "prompt": decides how rows are re-positioned (module docstring)."""
    num_virtual_tokens: int
    base_fingerprint: str
    keys: tuple[np.ndarray, ...]
    """Per layer (1, n_kv, N, head_dim) float32."""
    values: tuple[np.ndarray, ...]
    inv_freq: tuple[np.ndarray | None, ...]
    """Per layer rotary frequencies (rotary_dim / 2,); None for absolute positions."""

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], meta: dict) -> KVPrefix:
        layers = int(meta["num_layers"])
        missing = [
            f"past_key_values.{i}.{kind}"
            for i in range(layers)
            for kind in ("key", "value")
            if f"past_key_values.{i}.{kind}" not in tensors
        ]
        if missing:
            raise ValueError(
                f"KV prefix of adapter {meta.get('adapter')!r} lacks {missing[:4]}; "
                "re-export the adapter"
            )
        return cls(
            adapter=meta["adapter"],
            method=meta["method"],
            num_virtual_tokens=int(meta["num_virtual_tokens"]),
            base_fingerprint=meta["base_fingerprint"],
            keys=tuple(tensors[f"past_key_values.{i}.key"] for i in range(layers)),
            values=tuple(tensors[f"past_key_values.{i}.value"] for i in range(layers)),
            inv_freq=tuple(tensors.get(f"rotary.{i}.inv_freq") for i in range(layers)),
        )


def kv_prefix_path(out_dir: str | os.PathLike, adapter_name: str) -> Path:
    """out_dir/adapters/<name>.kvprefix.safetensors."""
    return Path(out_dir) / ADAPTERS_DIR / f"{adapter_name}{SUFFIX}"


def write_kv_prefix_file(
    out_path: str | os.PathLike, tensors: dict[str, np.ndarray], fingerprint: str, meta: dict
) -> Path:
    """Write a KV prefix as safetensors (numpy API), through a temporary file and a rename.

    Args:
        out_path: The file to write (its folder is created).
        tensors: `kv_prefix_tensors`' dict.
        fingerprint: The base's fingerprint (`edgepeft.base.fingerprint`) the prefix belongs to.
        meta: At least "adapter" and "method" ("prefix" | "prompt"); values become strings.

    Returns:
        The path written.
    """
    from safetensors.numpy import save_file

    for key in ("adapter", "method"):
        if key not in meta:
            raise ValueError(f"KV prefix metadata needs {key!r}; got keys {sorted(meta)}")
    if meta["method"] not in ("prefix", "prompt"):
        raise ValueError(f"method must be 'prefix' or 'prompt', got {meta['method']!r}")
    keys = [tensors[k] for k in tensors if k.startswith("past_key_values.") and k.endswith(".key")]
    if not keys:
        raise ValueError("no past_key_values.{i}.key tensors to write; pass kv_prefix_tensors()")
    _, kv_heads, n, head_dim = keys[0].shape
    metadata = {
        **{k: str(v) for k, v in meta.items()},
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": KIND,
        "base_fingerprint": fingerprint,
        "num_virtual_tokens": str(n),
        "num_layers": str(len(keys)),
        "num_kv_heads": str(kv_heads),
        "head_dim": str(head_dim),
        "layout": LAYOUT,
    }
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    # checked at every read: a file copied without the export's manifest is still checked
    metadata["tensors_sha256"] = tensors_sha256(arrays)
    with atomic_path(out_path) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
    return Path(out_path)


def read_kv_prefix_file(path: str | os.PathLike, expected_fingerprint: str) -> KVPrefix:
    """Read a KV prefix file, refusing one made for another base than `expected_fingerprint`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KV prefix file {path} not found")
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} has kind {meta.get('kind')!r}, expected {KIND!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {meta['format_version']}; this edgepeft reads up to "
                f"{FORMAT_VERSION}: upgrade edgepeft"
            )
        if meta.get("base_fingerprint") != expected_fingerprint:
            raise ValueError(
                f"KV prefix {path} (adapter {meta.get('adapter')!r}) was made for base "
                f"{meta.get('base_fingerprint')!r}, but this graph's base is "
                f"{expected_fingerprint!r}; export the adapter against this base"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recorded = meta.get("tensors_sha256")  # absent in files written before it was stored
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise ValueError(
            f"KV prefix {path}: its tensors have sha256 {tensors_sha256(tensors)}, the file "
            f"recorded {recorded} when it was exported: it was corrupted since (copy it again "
            "from the original export, or re-export the adapter)"
        )
    check_finite(tensors, adapter=meta.get("adapter") or path.name, file=path)
    return KVPrefix.from_tensors(tensors, meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_kv_prefix(
    model, adapter_name: str, out_dir: str | os.PathLike, source: str = ""
) -> dict:
    """Write out_dir/adapters/<name>.kvprefix.safetensors; returns its manifest entry.

    The adapter must be on `model` (loaded or trained); nothing of `model` changes.

    Returns:
        AdapterEntry's fields as separate mode fills them: "name", "peft_type", "source",
        "fingerprint" (the base's, which the file is bound to), "kind" ("kv_prefix"),
        "file" (relative to out_dir), "sha256" (of the file); plus "method" ("prefix" |
        "prompt") and "num_virtual_tokens", which the file's metadata also holds.
    """
    from edgepeft.adapters.inject import list_adapters
    from edgepeft.base import fingerprint

    _, plan = _virtual_tokens(model, adapter_name)
    tensors = kv_prefix_tensors(model, adapter_name)
    base_fp = fingerprint(model)
    path = kv_prefix_path(out_dir, adapter_name)
    check_finite(tensors, adapter=adapter_name, file=f"{path} (not written)")
    write_kv_prefix_file(path, tensors, base_fp, {"adapter": adapter_name, "method": plan.method})
    return {
        "name": adapter_name,
        "peft_type": list_adapters(model)[adapter_name].peft_type,
        "source": source,
        "fingerprint": base_fp,
        "kind": KIND,
        "file": path.relative_to(Path(out_dir)).as_posix(),
        "sha256": _sha256(path),
        "method": plan.method,
        "num_virtual_tokens": plan.num_virtual_tokens,
    }


# ---------------------------------------------------------------- seeding a graph's cache


def _rotate(keys: np.ndarray, inv_freq: np.ndarray, shift: int) -> np.ndarray:
    """Keys (..., D) turned by `shift` positions (rotate-half RoPE on the first 2*len(inv_freq))."""
    half = inv_freq.shape[0]
    angle = shift * inv_freq.astype(np.float64)  # (half,)
    cos, sin = np.cos(angle), np.sin(angle)
    x1 = keys[..., :half].astype(np.float64)
    x2 = keys[..., half : 2 * half].astype(np.float64)
    out = keys.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


def _shifts(prefix: KVPrefix, attention_mask: np.ndarray, graph: str, positions: str) -> np.ndarray:
    """Δ_b per row: graph position minus PyTorch position of the row's tokens."""
    if graph not in GRAPH_KINDS:
        raise ValueError(
            f"graph must be one of {GRAPH_KINDS} (the manifest's 'graph'), got {graph!r}"
        )
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    pads = (attention_mask == 0).sum(axis=1).astype(np.int64)  # (B,) left pads per row
    # Prefix tuning's peft frame already skips pads: both frames are the unpadded one.
    unpadded = positions == "unpadded" or prefix.method == "prefix"
    if graph == "fused":
        return pads if unpadded else np.zeros_like(pads)
    return np.zeros_like(pads) if unpadded else -pads


def seed_past(
    prefix: KVPrefix,
    attention_mask: np.ndarray,
    graph: str,
    dtype=np.float32,
    *,
    positions: str = "peft",
) -> dict[str, np.ndarray]:
    """past_key_values feeds (B, n_kv, N, head_dim) holding the prefix for every row.

    Args:
        prefix: The adapter's prefix (`read_kv_prefix_file`).
        attention_mask: The caller's (B, T) mask, left padded, without the virtual tokens.
        graph: "fused" or "generic": how the graph positions tokens (module docstring).
        dtype: The graph's KV dtype.
        positions: "peft" (default): a padded row as HF peft computes it in a batch (prompt
            tuning: the pads sit between the virtual tokens and the text), what verify
            compares with; "unpadded": each row's text directly follows the virtual tokens,
            so a row's output equals the same prompt alone at batch 1 (the runtime's).
            Prefix tuning gives the same in both.

    Raises:
        ValueError: an unknown graph or positions, or a padded prompt-tuned row in the
            "peft" frame on a graph with learned absolute positions (GPT-2, generic).
    """
    shifts = _shifts(prefix, np.asarray(attention_mask), graph, positions)
    batch = len(shifts)
    feeds = {}
    for i in range(prefix.num_layers):
        keys = np.repeat(prefix.keys[i], batch, axis=0)  # (B, n_kv, N, D)
        inv_freq = prefix.inv_freq[i]
        if shifts.any():
            if inv_freq is None:
                raise ValueError(
                    f"adapter {prefix.adapter!r} ({prefix.method} tuning) on a {graph} graph with "
                    "learned absolute positions: a left-padded row's tokens would need other "
                    "positions than the graph gives them (peft counts a row's pads in its "
                    "prompt-tuned positions), which a cache prefix cannot express; feed such "
                    "rows one at a time without padding, or seed with positions='unpadded' "
                    "(each row as if alone, the batch-invariant frame)"
                )
            for b in np.flatnonzero(shifts):
                keys[b] = _rotate(keys[b], inv_freq, int(shifts[b]))
        feeds[f"past_key_values.{i}.key"] = keys.astype(dtype)
        feeds[f"past_key_values.{i}.value"] = np.repeat(prefix.values[i], batch, axis=0).astype(
            dtype
        )
    return feeds


@dataclass(frozen=True)
class DecodeState:
    """What the next step feeds: the full mask so far and the presents as pasts."""

    attention_mask: np.ndarray
    """(B, N + tokens so far)."""
    past: dict[str, np.ndarray]


def _kv_dtype(session) -> type:
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            return np.float16 if meta.type == "tensor(float16)" else np.float32
    raise ValueError("the session has no past_key_values inputs: is it an edgepeft decoder graph?")


def _run(session, feed: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feed), strict=True))
    past = {
        n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n != "logits"
    }
    return out["logits"], past


def prefill_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    positions: str = "peft",
) -> tuple[np.ndarray, DecodeState]:
    """Logits (B, T, V) of the prompt with the adapter's prefix seeded, and the decode state.

    `positions`: "peft" (HF peft's batched semantics) or "unpadded" (each row as if alone,
    batch-invariant); see `seed_past`. Decode steps keep the frame the prefill chose.
    """
    input_ids, attention_mask = (
        np.asarray(input_ids, np.int64),
        np.asarray(attention_mask, np.int64),
    )
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must match "
            "(pass the caller's mask, without the virtual tokens)"
        )
    batch = len(input_ids)
    full_mask = np.concatenate(
        [np.ones((batch, prefix.num_virtual_tokens), np.int64), attention_mask], axis=1
    )  # (B, N + T)
    past = seed_past(prefix, attention_mask, graph, _kv_dtype(session), positions=positions)
    # GroupQueryAttention takes T > 1 over a past only at batch 1: one row at a time.
    row_by_row = graph == "fused" and input_ids.shape[1] > 1
    rows = [slice(b, b + 1) for b in range(batch)] if row_by_row else [slice(None)]
    results = [
        _run(
            session,
            {
                "input_ids": input_ids[r],
                "attention_mask": full_mask[r],
                **{k: v[r] for k, v in past.items()},
            },
        )
        for r in rows
    ]
    logits = np.concatenate([lg for lg, _ in results], axis=0)
    presents = {k: np.concatenate([p[k] for _, p in results], axis=0) for k in results[0][1]}
    return logits, DecodeState(full_mask, presents)


def decode_step(session, state: DecodeState, tokens: np.ndarray) -> tuple[np.ndarray, DecodeState]:
    """Feed one token per row (B,); returns logits (B, 1, V) and the next state."""
    tokens = np.asarray(tokens, np.int64).reshape(-1, 1)  # (B, 1)
    mask = np.concatenate([state.attention_mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    logits, past = _run(session, {"input_ids": tokens, "attention_mask": mask, **state.past})
    return logits, DecodeState(mask, past)


def run_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    steps: Sequence[np.ndarray] = (),
    positions: str = "peft",
) -> list[np.ndarray]:
    """Logits of the prefill (B, T, V), then of each forced decode step in `steps` (B, 1, V)."""
    logits, state = prefill_with_prefix(
        session, input_ids, attention_mask, prefix, graph=graph, positions=positions
    )
    out = [logits]
    for tokens in steps:
        logits, state = decode_step(session, state, tokens)
        out.append(logits)
    return out


def greedy_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    max_new_tokens: int,
    positions: str = "peft",
) -> np.ndarray:
    """Greedy continuation (B, max_new_tokens) with the prefix seeded (no stop token)."""
    logits, state = prefill_with_prefix(
        session, input_ids, attention_mask, prefix, graph=graph, positions=positions
    )
    tokens = []
    for step in range(max_new_tokens):
        tokens.append(logits[:, -1].argmax(-1))  # (B,)
        if step + 1 < max_new_tokens:
            logits, state = decode_step(session, state, tokens[-1])
    return np.stack(tokens, axis=1)


__all__ = [
    "KVPrefix",
    "DecodeState",
    "POSITIONS",
    "decode_step",
    "export_kv_prefix",
    "greedy_with_prefix",
    "kv_prefix_path",
    "kv_prefix_tensors",
    "prefill_with_prefix",
    "read_kv_prefix_file",
    "run_with_prefix",
    "seed_past",
    "write_kv_prefix_file",
]
