"""Check an exported graph against PyTorch: logits, KV-cache decoding, greedy tokens.

    export dir ─manifest─► onnxruntime session                PyTorch reference
                           (model.onnx)                       (model passed in, or the base from
                                                              the manifest + the same adapters
                                                              merged), in fp32, same contract
        fixed prompts, left-padded ─► prefill (P = 0) ─► N-1 decode steps (T = 1)
            both sides fed the reference's greedy tokens (teacher forcing), each its own cache
        ▼
    max |logit diff| over real (unpadded) positions, prefill and decode; greedy agreement
    int8/int4: also against PyTorch holding the export's own dequantized weights, which
    separates quantization error (weights rounded) from graph error (anything else)
        ▼
    VerifyReport ─► verify.json in the export dir

Numbers are reported, never hidden: `within_tolerance` compares with TOLERANCES, and
only an fp32 graph whose greedy tokens disagree fails `passed`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepeft.export.graph_info import input_names
from edgepeft.export.manifest import ExportIndex, Manifest, read_manifest, write_json

VERIFY_FILE = "verify.json"

# Expected max |logit diff| against the fp32 PyTorch model, per weight format. Measured on
# the tiny random gpt2/llama (logits of order 1, default prompts): fp32 ~3e-7 (kernel order
# only); fp16 storage ~4e-4; int8 RTN ~1.3e-2; int4 RTN ~0.14 (both with int8 activations,
# accuracy_level 4, which alone accounts for ~8e-3). Real models differ; the report states
# the measured numbers whatever these say.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "int8": 1e-1, "int4": 1.0}

DEFAULT_PROMPTS = (
    "the quick brown fox",
    "SELECT name FROM users WHERE",
    "translate to french: hello ->",
)


@dataclass(frozen=True)
class GraphCheck:
    """One graph against its PyTorch reference."""

    name: str
    """Adapter name in a merged set; "" for a single graph."""
    weights: str
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    tokens_agree: int
    tokens_total: int
    tolerance: float
    dequant_prefill_max_abs_diff: float | None = None
    """Against PyTorch holding the export's dequantized weights (int8/int4 generic graphs)."""
    dequant_decode_max_abs_diff: float | None = None

    @property
    def greedy_equal(self) -> bool:
        return self.tokens_agree == self.tokens_total

    @property
    def within_tolerance(self) -> bool:
        return max(self.prefill_max_abs_diff, self.decode_max_abs_diff) <= self.tolerance

    @property
    def passed(self) -> bool:
        """fp32 graphs must give the reference's greedy tokens; others are reported only."""
        return self.greedy_equal or self.weights != "fp32"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "greedy_equal": self.greedy_equal,
            "within_tolerance": self.within_tolerance,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class VerifyReport:
    export_dir: str
    prompts: int
    max_new_tokens: int
    graphs: tuple[GraphCheck, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.graphs)

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens,
            "passed": self.passed,
            "graphs": [g.to_dict() for g in self.graphs],
        }

    def __str__(self) -> str:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.2e}"

        lines = [
            f"verify {self.export_dir}: {self.prompts} prompts, {self.max_new_tokens} new tokens",
            f"  {'graph':<12} {'weights':<7} {'prefill':>9} {'decode':>9} {'tol':>8} "
            f"{'greedy':>7}  {'vs dequantized (prefill/decode)'}",
        ]
        for g in self.graphs:
            lines.append(
                f"  {g.name or '-':<12} {g.weights:<7} {num(g.prefill_max_abs_diff):>9} "
                f"{num(g.decode_max_abs_diff):>9} {num(g.tolerance):>8} "
                f"{g.tokens_agree:>3}/{g.tokens_total:<3}  "
                f"{num(g.dequant_prefill_max_abs_diff)} / {num(g.dequant_decode_max_abs_diff)}"
                + ("" if g.within_tolerance else "  (above tolerance)")
            )
        lines.append("  max |logit diff| vs the fp32 PyTorch model; " + (
            "PASSED" if self.passed else "FAILED: an fp32 graph's greedy tokens disagree"
        ))
        return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def _prompt_batch(folder: Path, manifest: Manifest, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (B, T), attention_mask (B, T)) int64, left-padded."""
    tokenizer = None
    if prompts is None or isinstance(prompts[0], str):
        with contextlib.suppress(OSError, ValueError):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
    if tokenizer is not None:
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts or DEFAULT_PROMPTS]
    elif prompts is not None and not isinstance(prompts[0], str):
        rows = [list(map(int, p)) for p in prompts]
    else:  # no tokenizer in the folder: fixed random ids of three lengths
        rng = np.random.default_rng(0)
        rows = [list(rng.integers(3, manifest.vocab_size, n)) for n in (7, 4, 9)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


# ---------------------------------------------------------------- running both sides


class _Ort:
    def __init__(self, path: Path, manifest: Manifest):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.kv_dtype = np.dtype(manifest.kv_dtype)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        shape = (batch, m.num_kv_heads, 0, m.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * m.num_layers)]

    def __call__(self, ids, mask, past):
        feeds = dict(zip(input_names(self.manifest.num_layers), [ids, mask, *past], strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits.astype(np.float32), present


class _Torch:
    def __init__(self, contract, manifest: Manifest):
        self.contract = contract
        self.manifest = manifest

    def empty_past(self, batch: int):
        import torch

        m = self.manifest
        return [torch.zeros(batch, m.num_kv_heads, 0, m.head_dim) for _ in range(2 * m.num_layers)]

    def __call__(self, ids, mask, past):
        import torch

        with torch.no_grad():
            logits, *present = self.contract(torch.from_numpy(ids), torch.from_numpy(mask), *past)
        return logits.numpy(), present


def _run(side, ids, mask, steps: int, forced: list[np.ndarray] | None):
    """Prefill, then `steps` decode steps: [(logits (B, T, V), mask (B, P+T))], greedy tokens.

    With `forced`, step k feeds forced[k] (the reference's tokens) instead of its own.
    """
    outputs, tokens = [], []
    logits, past = side(ids, mask, side.empty_past(ids.shape[0]))
    outputs.append((logits, mask))
    for step in range(steps + 1):
        own = logits[:, -1].argmax(-1)  # (B,)
        tokens.append(own)
        if step == steps:
            break
        feed = forced[step] if forced is not None else own
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        logits, past = side(feed[:, None].astype(np.int64), mask, past)
        outputs.append((logits, mask))
    return outputs, tokens


def _max_diff(got, want) -> tuple[float, float]:
    """(prefill, decode) max |logit diff| over positions that hold a real token."""
    diffs = []
    for (a, mask), (b, _) in zip(got, want, strict=True):
        real = mask[:, -a.shape[1] :].astype(bool)  # (B, T)
        diffs.append(float(np.abs(a - b)[real].max()))
    return diffs[0], max(diffs[1:], default=0.0)


@contextlib.contextmanager
def _dequantized(contract, weights: dict[str, np.ndarray]):
    """Swap the contract's weight parameters for the export's dequantized ones, then back."""
    import torch
    from torch import nn

    swapped = []
    try:
        for name, array in weights.items():
            path, _, attr = name.rpartition(".")
            module = contract.get_submodule(path)
            swapped.append((module, attr, getattr(module, attr)))
            setattr(module, attr, nn.Parameter(torch.from_numpy(array), requires_grad=False))
        yield
    finally:
        for module, attr, old in reversed(swapped):
            setattr(module, attr, old)


def _export_weights(path: Path, contract) -> dict[str, np.ndarray] | None:
    """The export's dequantized MatMulNBits weights, if each maps to a reference parameter."""
    import onnx

    from edgepeft.export.generic import matmul_nbits_weights

    weights = matmul_nbits_weights(onnx.load(str(path)))
    params = dict(contract.named_parameters())
    if not weights or any(
        name not in params or tuple(params[name].shape) != w.shape for name, w in weights.items()
    ):
        return None  # e.g. a fused graph: its weight names are not the PyTorch ones
    return weights


def check_graph(
    folder: str | os.PathLike,
    model,
    *,
    name: str = "",
    prompts=None,
    max_new_tokens: int = 8,
) -> GraphCheck:
    """Compare the graph in `folder` with `model` (the PyTorch model it was exported from)."""
    from edgepeft.export.generic import CacheContract, plain_fp32_copy

    folder = Path(folder)
    manifest = read_manifest(folder)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"{folder} holds a set of graphs; check each of {list(manifest.graphs)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids, mask = _prompt_batch(folder, manifest, prompts)
    path = folder / manifest.model_file
    contract = CacheContract(plain_fp32_copy(model)).eval()
    reference = _Torch(contract, manifest)
    want, tokens = _run(reference, ids, mask, max_new_tokens - 1, None)
    got, ort_tokens = _run(_Ort(path, manifest), ids, mask, max_new_tokens - 1, tokens)
    prefill, decode = _max_diff(got, want)
    agree = sum(int((a == b).sum()) for a, b in zip(ort_tokens, tokens, strict=True))

    dequant = (None, None)
    if manifest.weights in ("int8", "int4"):
        weights = _export_weights(path, contract)
        if weights is not None:
            with _dequantized(contract, weights):
                exact, _ = _run(reference, ids, mask, max_new_tokens - 1, tokens)
            dequant = _max_diff(got, exact)
    return GraphCheck(
        name=name,
        weights=manifest.weights,
        prefill_max_abs_diff=prefill,
        decode_max_abs_diff=decode,
        tokens_agree=agree,
        tokens_total=ids.shape[0] * max_new_tokens,
        tolerance=TOLERANCES[manifest.weights],
        dequant_prefill_max_abs_diff=dequant[0],
        dequant_decode_max_abs_diff=dequant[1],
    )


# ---------------------------------------------------------------- reference from the manifest


def load_reference(manifest: Manifest):
    """The PyTorch model a graph was exported from: its base with the same adapters merged."""
    from edgepeft.adapters.peft_format import load_adapter
    from edgepeft.base import fingerprint, load_base
    from edgepeft.merge import merge

    try:
        model, _ = load_base(manifest.base, quant=manifest.base_quant)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load the export's base {manifest.base!r} ({e}); pass the model to "
            "verify(..., model=...)"
        ) from e
    if fingerprint(model) != manifest.base_fingerprint:
        raise ValueError(
            f"base {manifest.base!r} now has fingerprint {fingerprint(model)}, the export was "
            f"made from {manifest.base_fingerprint}: the folder changed since the export"
        )
    if manifest.adapters and manifest.mode != "merged":
        raise ValueError(f"verify checks merged exports only; this one is {manifest.mode!r}")
    for adapter in manifest.adapters:
        load_adapter(model, adapter.source, name=adapter.name)
        model, _ = merge(model, adapter.name, quant="none", inplace=True, keep_original=False)
    return model


def verify(
    export_dir: str | os.PathLike,
    *,
    prompts=None,
    max_new_tokens: int = 8,
    model=None,
) -> VerifyReport:
    """Check an export folder against PyTorch and write verify.json into it.

    Args:
        export_dir: A folder written by `edgepeft.export` (one graph, or a merged set).
        prompts: Strings (tokenized with the folder's tokenizer) or lists of token ids;
            default three fixed prompts.
        max_new_tokens: Greedy tokens compared per prompt (prefill + N-1 decode steps).
        model: The PyTorch reference (a single graph only); default: the manifest's base
            loaded again with the same adapters merged.

    Returns:
        The report; `passed` is False when an fp32 graph's greedy tokens disagree.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if isinstance(manifest, ExportIndex):
        if model is not None:
            raise ValueError(
                f"{export_dir} holds {len(manifest.graphs)} graphs, each from its own merged "
                "model; verify each folder with its model, or pass no model"
            )
        checks = tuple(
            check_graph(
                export_dir / folder,
                load_reference(read_manifest(export_dir / folder)),
                name=name,
                prompts=prompts,
                max_new_tokens=max_new_tokens,
            )
            for name, folder in manifest.graphs.items()
        )
    else:
        reference = model if model is not None else load_reference(manifest)
        checks = (
            check_graph(
                export_dir,
                reference,
                name=manifest.adapters[0].name if len(manifest.adapters) == 1 else "",
                prompts=prompts,
                max_new_tokens=max_new_tokens,
            ),
        )
    report = VerifyReport(
        str(export_dir), checks[0].tokens_total // max_new_tokens, max_new_tokens, checks
    )
    write_json(export_dir / VERIFY_FILE, report.to_dict())
    return report


__all__ = ["GraphCheck", "TOLERANCES", "VerifyReport", "check_graph", "load_reference", "verify"]
