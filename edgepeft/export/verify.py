"""Check an export against PyTorch: logits, KL, top-1, greedy continuations, perplexity.

    export dir ─manifest─► onnxruntime session                PyTorch reference
                           (model.onnx; separate mode:        (model passed in, or the base from
                           + one adapters/<name>.onnx_adapter  the manifest + the same adapter,
                           activated per run, or a KV prefix   merged or active), fp32, same contract
                           seeded into the cache)
        prompts (given, or drawn with a fixed seed from the tokenizer's vocabulary), left-padded
            ─► prefill (P = 0) ─► N-1 decode steps (T = 1), both fed the reference's greedy
               tokens (teacher forcing), each with its own cache
            ─► free-running greedy continuation of N tokens on each side
            ─► optional text: one prefill each, perplexity
            ─► each prompt alone (batch 1, unpadded): PyTorch greedy = reference_tokens, ORT's
        ▼
    per graph (merged set: each sub-export; separate: the base, then each adapter file):
        max |Δlogit| (prefill, decode), mean KL(PyTorch || ORT) over positions, top-1
        agreement over positions, greedy continuations equal, perplexity of both,
        reference continuations and how many ORT reproduces at batch 1
        int8/int4 generic graphs: also max |Δlogit| against PyTorch holding the export's own
        dequantized weights (quantization error vs graph error)
        ▼
    VerifyReport ─► verify.json + verify.md (a table) in the export dir

Every graph gets a verdict (`passed`; `edgepeft verify` exits 1 when one fails), by the row of
CRITERIA for its weights (the report prints the rows it used):
    fp32; nf4 / fp4 exact (the base's own     max |Δlogit| relative to the logits' scale, mean
      bitsandbytes codes: base alone or       KL, and every top-1 and greedy token equal
      separate mode, base quantized alike)
    fp16, int8, int4; nf4 / fp4 requantized   mean KL and the share of top-1 tokens that agree
      (merged mode: weights rounded again)    (weights rounded at export: logits move by design)
NaN or inf in either side's logits, or in any metric, fails the graph and says where.

Separate mode: each adapter listed in the manifest is checked against the base with that
adapter loaded and active (edgepeft's hooks, which match HF peft to 0.0):

    LoRA / DoRA / IA3 / bottleneck   entry's `file` (else adapters/<name>.onnx_adapter) activated
                                     through onnxruntime.LoraAdapter + RunOptions
    prompt / prefix tuning           entry's `file` (adapters/<name>.kvprefix.safetensors) seeded
                                     into the cache at prefill (kv_prefix.py: seed_past, rows
                                     re-positioned for left padding), then plain decode steps

The same numbers and judgement apply to both. One case cannot be left padded: a prompt-tuned
prefix on a graph with learned absolute positions (GPT-2, generic): there every prompt is
compared alone, unpadded, at batch 1 (`batched` False in its check).

Reference continuations (verify.json, per graph: `reference_tokens`): for each prompt, the
PyTorch reference's greedy continuation of `max_new_tokens` tokens (no stop token: EOS and
what follows are kept), computed for that prompt ALONE at batch 1 without padding
(`reference_tokens_mode` "per-prompt-batch1-unpadded"). A runtime replaying each prompt
(`prompt_tokens`) at batch 1 must produce exactly these tokens. They are not taken from the
left-padded batch because they can differ from it: peft places prompt-tuned tokens by column,
pads included, and batch-dependent kernels may round differently. `row_greedy_match` counts
the prompts whose onnxruntime greedy continuation, run the same way, equals them. Files
written before these fields existed lack them; `read_report` fills the defaults.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.atomic import write_bytes
from edgepeft.export.graph_info import input_names
from edgepeft.export.manifest import ExportIndex, Manifest, read_manifest, write_json

VERIFY_FILE = "verify.json"
VERIFY_TABLE = "verify.md"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"

BNB4 = ("nf4", "fp4")
REQUANTIZED = " requantized"
"""CRITERIA key suffix of nf4/fp4 graphs whose weights were rounded again (merged mode)."""


@dataclass(frozen=True)
class Criteria:
    """What a graph must meet against its PyTorch reference to pass (one row of CRITERIA)."""

    max_relative_diff: float | None
    """max |Δlogit| / max |reference logit| over the compared positions; None: not judged
    (weights rounded at export move every logit by design; KL and top-1 judge those)."""
    max_kl: float
    """Mean KL(PyTorch || ORT) over positions, nats."""
    min_top1: float
    """Share of positions whose argmax agrees; 1.0 also requires every greedy token equal."""


# The one table of verdicts. Measured (default prompts, 41 positions; "rel" = max |Δlogit| /
# max |logit|), tiny random models of every architecture (logits of order 1) / the demo base
# (logits ~14) / SmolLM2-135M-Instruct (30 layers, logits ~20-30):
#   fp32          rel 3.5e-7 / 7e-7 / ~5e-6 (1.13e-4 absolute)          KL <= 3e-11
#   nf4 exact     rel 5e-7 / 1.4e-6 / ~7e-5 (1.77e-3 absolute)          KL <= 8e-10
#   fp16          rel 3.5e-4 - 1.5e-3, KL <= 3e-6, top-1 >= 40/41
#   int8          KL 4e-6 - 8e-4, top-1 39/41 - 41/41
#   int4          KL 5e-4 - 7e-2, top-1 28/41 (tiny gemma2) - 36/41 (demo); a broken SmolLM2
#                 int4 graph: KL 5.2, top-1 5/41
# Exact graphs: the relative bound sits ~10x (fp32) and ~4x (nf4) above the 30-layer model
# and below fp16 storage (3.5e-4: an fp16 cast inside an fp32 graph fails). Rounded graphs:
# the bounds pass every healthy export measured and fail a model that answers garbage.
CRITERIA: dict[str, Criteria] = {
    "fp32": Criteria(max_relative_diff=5e-5, max_kl=1e-6, min_top1=1.0),
    "nf4": Criteria(max_relative_diff=3e-4, max_kl=1e-5, min_top1=1.0),
    "fp4": Criteria(max_relative_diff=3e-4, max_kl=1e-5, min_top1=1.0),
    "fp16": Criteria(max_relative_diff=None, max_kl=5e-3, min_top1=0.9),
    "int8": Criteria(max_relative_diff=None, max_kl=5e-2, min_top1=0.8),
    "int4": Criteria(max_relative_diff=None, max_kl=0.5, min_top1=0.5),
    "nf4" + REQUANTIZED: Criteria(max_relative_diff=None, max_kl=0.5, min_top1=0.5),
    "fp4" + REQUANTIZED: Criteria(max_relative_diff=None, max_kl=0.5, min_top1=0.5),
}
_PROMPT_LENGTHS = (7, 4, 9)
REFERENCE_PER_PROMPT = "per-prompt-batch1-unpadded"


@dataclass(frozen=True)
class GraphCheck:
    """One graph (or one adapter of a separate export) against its PyTorch reference."""

    name: str
    """Adapter name; "" for a base graph."""
    weights: str
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    tokens_agree: int
    """Greedy tokens equal under teacher forcing (each step fed the reference's token)."""
    tokens_total: int
    criteria: str
    """The CRITERIA row this graph is judged by (`criteria_key`)."""
    mean_kl: float = 0.0
    """Mean over real positions of KL(softmax(PyTorch) || softmax(ORT)), nats."""
    top1_agree: int = 0
    """Positions (prefill and decode, padding excluded) whose argmax is the same."""
    top1_total: int = 0
    logit_scale: float | None = None
    """max |logit| of the reference over the compared positions (None in older files)."""
    non_finite: str = ""
    """Where NaN/inf logits were found ("" when none)."""
    greedy_match: int = 0
    """Prompts whose free-running greedy continuation is identical on both sides."""
    greedy_prompts: int = 0
    greedy_tokens: int = 0
    """Length N of each continuation."""
    perplexity_torch: float | None = None
    perplexity_ort: float | None = None
    perplexity_tokens: int | None = None
    adapter_file: str | None = None
    """Separate mode: the .onnx_adapter activated for this check."""
    dequant_prefill_max_abs_diff: float | None = None
    """Against PyTorch holding the export's dequantized weights (int8/int4 generic graphs)."""
    dequant_decode_max_abs_diff: float | None = None
    batched: bool = True
    """Whether the logits were compared over the left-padded batch (False: each prompt alone,
    unpadded; a prompt-tuned prefix over learned absolute positions cannot be padded)."""
    reference_tokens: tuple[tuple[int, ...], ...] = ()
    """Per prompt, the PyTorch greedy continuation (greedy_tokens ids, no stop token), computed
    as `reference_tokens_mode` says."""
    reference_tokens_mode: str = ""
    """REFERENCE_PER_PROMPT: each prompt alone at batch 1, unpadded ("" in older files)."""
    row_greedy_match: int = 0
    """Prompts whose onnxruntime greedy continuation, run the same way, equals reference_tokens."""

    @classmethod
    def from_dict(cls, data: dict) -> GraphCheck:
        """Read a verify.json entry; fields a file lacks (older edgepeft) take their defaults.

        Files from before CRITERIA name no row: exact graphs were those marked `judged`.
        """
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["reference_tokens"] = tuple(tuple(r) for r in known.get("reference_tokens", ()))
        if "criteria" not in known:
            rounded = data["weights"] in BNB4 and not data.get("judged", False)
            known["criteria"] = data["weights"] + (REQUANTIZED if rounded else "")
        return cls(**known)

    @property
    def max_abs_diff(self) -> float:
        return float(np.max([self.prefill_max_abs_diff, self.decode_max_abs_diff]))  # NaN stays

    @property
    def relative_max_diff(self) -> float | None:
        """max |Δlogit| / max |reference logit|: float rounding grows with the logits' size.

        The largest |logit| rather than the RMS: rounding in a dot product scales with its
        largest terms, which the largest logits (those that decide top-1) track; the RMS over
        the vocabulary is set by the mass of small logits and any constant offset, so it moves
        with vocabulary size and says little about the logits that matter.
        """
        if self.logit_scale is None:
            return None
        return self.max_abs_diff / self.logit_scale if self.logit_scale > 0 else math.inf

    @property
    def thresholds(self) -> Criteria:
        return CRITERIA[self.criteria]

    @property
    def exact(self) -> bool:
        """Whether the graph holds the reference's own weights (judged on the logits)."""
        return self.thresholds.max_relative_diff is not None

    @property
    def greedy_equal(self) -> bool:
        return self.tokens_agree == self.tokens_total

    @property
    def top1_equal(self) -> bool:
        return self.top1_agree == self.top1_total

    @property
    def top1_share(self) -> float:
        return self.top1_agree / self.top1_total if self.top1_total else 1.0

    def metrics(self) -> dict[str, float | None]:
        """Every measured number, by name (each must be finite)."""
        return {
            "prefill max |Δlogit|": self.prefill_max_abs_diff,
            "decode max |Δlogit|": self.decode_max_abs_diff,
            "logit scale": self.logit_scale,
            "mean KL": self.mean_kl,
            "PyTorch perplexity": self.perplexity_torch,
            "onnxruntime perplexity": self.perplexity_ort,
            "prefill max |Δlogit| vs dequantized": self.dequant_prefill_max_abs_diff,
            "decode max |Δlogit| vs dequantized": self.dequant_decode_max_abs_diff,
        }

    @property
    def failures(self) -> tuple[str, ...]:
        """Why the graph fails, one phrase per criterion it misses (empty: it passes)."""
        c, out = self.thresholds, []
        if self.non_finite:
            out.append(f"NaN/inf in {self.non_finite}")
        bad = [k for k, v in self.metrics().items() if v is not None and not math.isfinite(v)]
        if bad:
            out.append(f"non-finite {', '.join(bad)}")
        if out:  # every other number follows from the NaN
            return tuple(out)
        relative = self.relative_max_diff
        if c.max_relative_diff is not None and relative is not None:
            if not relative <= c.max_relative_diff:  # `not <=`: NaN fails
                out.append(
                    f"max |Δlogit| {self.max_abs_diff:.2e} is {relative:.1e} of the largest "
                    f"logit ({self.logit_scale:.3g}), above {c.max_relative_diff:.0e}"
                )
        if not self.mean_kl <= c.max_kl:
            out.append(f"mean KL {self.mean_kl:.3g} nats, above {c.max_kl:.0e}")
        if self.top1_share < c.min_top1:
            must = "every one must" if c.min_top1 == 1.0 else f"at least {c.min_top1:.0%} must"
            out.append(
                f"the device model disagrees with the trained model on "
                f"{1 - self.top1_share:.0%} of tokens (top-1 {self.top1_agree}/{self.top1_total}; "
                f"{must} agree)"
            )
        if c.min_top1 == 1.0 and not self.greedy_equal:
            out.append(f"teacher-forced greedy tokens {self.tokens_agree}/{self.tokens_total}")
        return tuple(out)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "max_abs_diff": self.max_abs_diff,
            "relative_max_diff": self.relative_max_diff,
            "thresholds": asdict(self.thresholds),
            "exact": self.exact,
            "greedy_equal": self.greedy_equal,
            "top1_equal": self.top1_equal,
            "failures": list(self.failures),
            "passed": self.passed,
        }


def _criteria_line(key: str) -> str:
    c = CRITERIA[key]
    logits = (
        f"max |Δlogit| <= {c.max_relative_diff:.0e} x max |logit|, "
        if c.max_relative_diff is not None
        else ""
    )
    exact = c.min_top1 == 1.0
    top1 = "every top-1 and greedy token equal" if exact else f"top-1 >= {c.min_top1:.0%}"
    return f"{key}: {logits}mean KL <= {c.max_kl:.0e}, {top1}"


@dataclass(frozen=True)
class VerifyReport:
    export_dir: str
    prompts: int
    max_new_tokens: int
    graphs: tuple[GraphCheck, ...]
    prompt_tokens: tuple[tuple[int, ...], ...] = ()
    """The token ids of each prompt, as run."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Adapter name -> why it was not checked."""

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
            "prompt_tokens": [list(p) for p in self.prompt_tokens],
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict) -> VerifyReport:
        """Read verify.json; fields a file lacks (older edgepeft) take their defaults."""
        return cls(
            export_dir=data["export_dir"],
            prompts=data["prompts"],
            max_new_tokens=data["max_new_tokens"],
            graphs=tuple(GraphCheck.from_dict(g) for g in data["graphs"]),
            prompt_tokens=tuple(tuple(p) for p in data.get("prompt_tokens", ())),
            skipped=dict(data.get("skipped", {})),
        )

    def _verdict(self) -> str:
        if self.passed:
            return "PASSED"
        failed = ", ".join(f"{g.name or '(base)'} {g.weights}" for g in self.graphs if not g.passed)
        return f"FAILED: {failed}"

    def failure_lines(self) -> list[str]:
        """One line per failing graph: what it misses, loudly."""
        return [
            f"FAIL {g.name or '(base)'} {g.weights}: " + "; ".join(g.failures)
            for g in self.graphs
            if not g.passed
        ]

    def criteria_lines(self) -> list[str]:
        """The CRITERIA rows the graphs were judged by, in order of first use."""
        return [_criteria_line(k) for k in dict.fromkeys(g.criteria for g in self.graphs)]

    def __str__(self) -> str:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.2e}"

        lines = [
            f"verify {self.export_dir}: {self.prompts} prompts, {self.max_new_tokens} new tokens",
            f"  {'graph':<12} {'weights':<7} {'prefill':>9} {'decode':>9} {'relative':>9} "
            f"{'KL':>9} {'top-1':>9} {'greedy':>7} {'cont.':>5} {'result':<6} "
            "vs dequantized (prefill/decode)",
        ]
        for g in self.graphs:
            lines.append(
                f"  {g.name or '-':<12} {g.weights:<7} {num(g.prefill_max_abs_diff):>9} "
                f"{num(g.decode_max_abs_diff):>9} {num(g.relative_max_diff):>9} "
                f"{num(g.mean_kl):>9} {g.top1_agree:>4}/{g.top1_total:<4} "
                f"{g.tokens_agree:>3}/{g.tokens_total:<3} "
                f"{g.greedy_match:>2}/{g.greedy_prompts:<2} "
                f"{'pass' if g.passed else 'FAIL':<6} "
                f"{num(g.dequant_prefill_max_abs_diff)} / {num(g.dequant_decode_max_abs_diff)}"
                + ("" if g.batched else "  (each prompt alone, unpadded)")
                + (
                    ""
                    if g.perplexity_torch is None
                    else f"  ppl {g.perplexity_torch:.4g} / {g.perplexity_ort:.4g}"
                )
            )
        for name, why in self.skipped.items():
            lines.append(f"  {name:<12} skipped: {why}")
        lines.append(
            "  max |logit diff| vs the PyTorch model; relative: that / the reference's max |logit|."
            " Judged by:"
        )
        lines += [f"    {line}" for line in self.criteria_lines()]
        lines += [f"  {line}" for line in self.failure_lines()]
        lines.append("  " + self._verdict())
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """verify.md: one row per graph / adapter, the criteria used, what failed."""

        def num(x: float | None) -> str:
            return "–" if x is None else f"{x:.2e}"

        rows = [
            f"# verify: {Path(self.export_dir).name}",
            "",
            f"{self.prompts} prompts, {self.max_new_tokens} greedy tokens each; logits against "
            "the PyTorch model in fp32. **" + self._verdict() + "**",
            "",
            *[f"- **{line}**" for line in self.failure_lines()],
            *([""] if not self.passed else []),
            "| adapter | weights | max \\|Δlogit\\| | relative to max \\|logit\\| | mean KL "
            "| top-1 | greedy (teacher-forced) | continuations equal | ppl PyTorch | ppl ORT | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in self.graphs:
            rows.append(
                f"| {g.name or '(base)'} | {g.weights} | {num(g.max_abs_diff)} | "
                f"{num(g.relative_max_diff)} | {num(g.mean_kl)} | "
                f"{g.top1_agree}/{g.top1_total} | {g.tokens_agree}/{g.tokens_total} | "
                f"{g.greedy_match}/{g.greedy_prompts} × {g.greedy_tokens} tok | "
                f"{_ppl(g.perplexity_torch)} | {_ppl(g.perplexity_ort)} | "
                f"{'pass' if g.passed else '**FAIL**'} |"
            )
        for name, why in self.skipped.items():
            rows.append(f"| {name} | – | – | – | – | – | – | – | – | – | skipped: {why} |")
        rows += ["", "Judged by (edgepeft.export.verify.CRITERIA):", ""]
        rows += [f"- {line}" for line in self.criteria_lines()]
        return "\n".join(rows) + "\n"


def _ppl(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def write_report(folder: str | os.PathLike, report: VerifyReport) -> None:
    """verify.json and verify.md into `folder`, each written atomically."""
    folder = Path(folder)
    write_json(folder / VERIFY_FILE, report.to_dict())
    write_bytes(folder / VERIFY_TABLE, report.to_markdown())


def read_report(folder: str | os.PathLike) -> VerifyReport:
    """The VerifyReport in `folder`/verify.json (written by `verify`, any edgepeft version)."""
    path = Path(folder) / VERIFY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `edgepeft verify {folder}` first")
    try:
        return VerifyReport.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a verify report ({e!r}); run `edgepeft verify` again") from e


# ---------------------------------------------------------------- inputs


def _tokenizer(folder: Path):
    with contextlib.suppress(OSError, ValueError):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return None


def _vocabulary_rows(tokenizer, manifest: Manifest) -> list[list[int]]:
    """Three prompts of fixed lengths drawn with seed 0 from the vocabulary, specials excluded."""
    size = manifest.vocab_size if tokenizer is None else min(len(tokenizer), manifest.vocab_size)
    special = {manifest.pad_token_id, manifest.bos_token_id}
    eos = manifest.eos_token_id
    special |= set(eos) if isinstance(eos, list) else {eos}
    if tokenizer is not None:
        special |= set(tokenizer.all_special_ids)
    ids = np.array(sorted(set(range(size)) - special))
    rng = np.random.default_rng(0)
    return [[int(i) for i in rng.choice(ids, n)] for n in _PROMPT_LENGTHS]


def _rows(tokenizer, texts_or_ids, what: str) -> list[list[int]]:
    if isinstance(texts_or_ids[0], str):
        if tokenizer is None:
            raise ValueError(f"{what} are strings but the export folder has no tokenizer; pass token ids")
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts_or_ids]
    return [list(map(int, row)) for row in texts_or_ids]


def _prompt_batch(folder: Path, manifest: Manifest, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (B, T), attention_mask (B, T)) int64, left-padded."""
    tokenizer = _tokenizer(folder)
    if prompts is None:
        rows = _vocabulary_rows(tokenizer, manifest)
    else:
        rows = _rows(tokenizer, list(prompts), "prompts")
    if not rows or any(not r for r in rows):
        raise ValueError(f"every prompt needs at least one token; got lengths {[len(r) for r in rows]}")
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def _text_ids(folder: Path, manifest: Manifest, text) -> np.ndarray | None:
    """(1, L) int64 token ids of the perplexity text, cut to the export's max_context."""
    if text is None:
        return None
    (row,) = _rows(_tokenizer(folder), [text], "the perplexity text")
    if manifest.max_context:
        row = row[: manifest.max_context]
    if len(row) < 2:
        raise ValueError(f"the perplexity text has {len(row)} token(s); it needs at least 2")
    return np.array([row], dtype=np.int64)


# ---------------------------------------------------------------- running both sides


class _Ort:
    def __init__(self, path: Path, manifest: Manifest, adapter_file: Path | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.kv_dtype = np.dtype(manifest.kv_dtype)
        self.run_options = self.adapter = None
        if adapter_file is not None:
            # RunOptions does not own the adapter: keep it alive as long as the options.
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(adapter_file))
            self.run_options = ort.RunOptions()
            self.run_options.add_active_adapter(self.adapter)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        shape = (batch, m.num_kv_heads, 0, m.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * m.num_layers)]

    def __call__(self, ids, mask, past):
        feeds = dict(zip(input_names(self.manifest.num_layers), [ids, mask, *past], strict=True))
        logits, *present = self.session.run(None, feeds, self.run_options)
        return logits.astype(np.float32), present


class _OrtPrefix(_Ort):
    """The graph with an adapter's KV prefix seeded at prefill; its "past" is a DecodeState."""

    def __init__(self, path: Path, manifest: Manifest, prefix_file: Path):
        from edgepeft.export.kv_prefix import read_kv_prefix_file

        super().__init__(path, manifest)
        self.prefix = read_kv_prefix_file(prefix_file, manifest.base_fingerprint)

    def empty_past(self, batch: int) -> None:
        return None  # prefill seeds the prefix itself

    def __call__(self, ids, mask, past):
        from edgepeft.export.kv_prefix import decode_step, prefill_with_prefix

        if past is None:
            logits, state = prefill_with_prefix(
                self.session, ids, mask, self.prefix, graph=self.manifest.graph
            )
        else:  # the state's mask already holds the N virtual positions and grows by one
            logits, state = decode_step(self.session, past, ids[:, 0])
        return logits.astype(np.float32), state

    def rows_alone(self, mask: np.ndarray) -> bool:
        """A prompt-tuned prefix on learned absolute positions cannot be left padded."""
        absolute = any(f is None for f in self.prefix.inv_freq)
        padded = bool((mask == 0).any())
        return padded and absolute and self.prefix.method == "prompt" and self.manifest.graph == "generic"


def is_kv_prefix_file(path: str | os.PathLike) -> bool:
    from edgepeft.export.kv_prefix import SUFFIX

    return str(path).endswith(SUFFIX)


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


@dataclass(frozen=True)
class _Pass:
    """One batch through both sides: teacher-forced logits, then ORT free-running."""

    ids: np.ndarray
    mask: np.ndarray
    want: list
    """PyTorch's [(logits (B, T, V), mask)] per step, fed its own greedy tokens."""
    tokens: list[np.ndarray]
    """PyTorch's greedy tokens, (B,) per step."""
    got: list
    """ORT's outputs fed PyTorch's tokens (teacher forcing)."""
    ort_tokens: list[np.ndarray]
    free_tokens: list[np.ndarray]
    """ORT's own greedy continuation."""


def _pass(reference, ort_side, ids, mask, steps: int) -> _Pass:
    want, tokens = _run(reference, ids, mask, steps, None)
    got, ort_tokens = _run(ort_side, ids, mask, steps, tokens)
    _, free_tokens = _run(ort_side, ids, mask, steps, None)
    return _Pass(ids, mask, want, tokens, got, ort_tokens, free_tokens)


def _unpadded_rows(ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each prompt alone: ((1, L_b) ids, (1, L_b) ones) without its padding."""
    rows = [row[real.astype(bool)][None] for row, real in zip(ids, mask, strict=True)]
    return [(row, np.ones_like(row)) for row in rows]


def _continuations(side, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[tuple[int, ...]]:
    """Greedy continuation (steps + 1 tokens) of each prompt run alone at batch 1, unpadded."""
    out = []
    for row, ones in _unpadded_rows(ids, mask):
        _, tokens = _run(side, row, ones, steps, None)
        out.append(tuple(int(t[0]) for t in tokens))
    return out


def _rows_of(tokens: list[np.ndarray]) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in row) for row in np.stack(tokens, axis=1)]  # (B, N)


def _real_positions(got, want):
    """(ORT, PyTorch) logits (positions, V) of every step, padding excluded."""
    for (a, mask), (b, _) in zip(got, want, strict=True):
        real = mask[:, -a.shape[1] :].astype(bool)  # (B, T)
        yield a[real], b[real]


def _max_diff(runs: list[_Pass], against=None) -> tuple[float, float]:
    """(prefill, decode) max |logit diff| over positions that hold a real token, every pass.

    `against`: per pass, other reference outputs to compare ORT's with (default: pass.want).
    """
    prefill, decode = [0.0], [0.0]
    for i, run in enumerate(runs):
        want = run.want if against is None else against[i]
        diffs = [float(np.abs(a - b).max()) for a, b in _real_positions(run.got, want)]
        prefill.append(diffs[0])
        decode.extend(diffs[1:])
    return float(np.max(prefill)), float(np.max(decode))  # np.max keeps a NaN; max() may not


def _logit_scale(runs: list[_Pass]) -> float:
    """max |logit| of the reference over the compared positions (finite values only)."""
    scale = 0.0
    for run in runs:
        for _, b in _real_positions(run.got, run.want):
            finite = np.abs(b[np.isfinite(b)])
            scale = max(scale, float(finite.max()) if finite.size else 0.0)
    return scale


def _non_finite(runs: list[_Pass], batched: bool) -> str:
    """Where the first NaN/inf logit of a real position is, on either side ("" if none)."""
    sides = (
        ("got", "onnxruntime's logits"),
        ("want", "PyTorch's logits (the reference itself: its base or adapter holds NaN/inf)"),
    )
    for attr, side in sides:
        for i, run in enumerate(runs):
            for step, (logits, mask) in enumerate(getattr(run, attr)):
                real = mask[:, -logits.shape[1] :].astype(bool)  # (B, T)
                bad = ~np.isfinite(logits).all(-1) & real  # (B, T)
                if bad.any():
                    row = int(np.flatnonzero(bad.any(-1))[0])
                    where = "the prefill" if step == 0 else f"decode step {step}"
                    return f"{side} at {where}, prompt {row if batched else i}"
    return ""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_and_top1(runs: list[_Pass]) -> tuple[float, int, int]:
    """(mean KL(PyTorch || ORT) over positions, positions with equal argmax, positions)."""
    kls, agree, total = [], 0, 0
    pairs = (pair for run in runs for pair in _real_positions(run.got, run.want))
    for a, b in pairs:
        log_p, log_q = _log_softmax(b), _log_softmax(a)  # (positions, V)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return float(np.concatenate(kls).mean()), agree, total


def _perplexity(side, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) of one unpadded row, from a single prefill."""
    logits, _ = side(ids, np.ones_like(ids), side.empty_past(1))
    log_probs = _log_softmax(logits[0, :-1])  # (L-1, V)
    nll = -log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(math.exp(nll.mean()))


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


def criteria_key(manifest: Manifest) -> str:
    """The CRITERIA row of a graph: its weights, "nf4 requantized" where nf4/fp4 codes are not
    the base's own (quantized at export, or merged: the merged weights rounded again)."""
    if manifest.weights not in BNB4:
        return manifest.weights
    merged_adapter = bool(manifest.adapters) and manifest.mode == "merged"
    exact = manifest.base_quant == manifest.weights and not merged_adapter
    return manifest.weights + ("" if exact else REQUANTIZED)


def check_graph(
    folder: str | os.PathLike,
    model,
    *,
    name: str = "",
    prompts=None,
    max_new_tokens: int = 8,
    text=None,
    adapter_file: str | os.PathLike | None = None,
) -> GraphCheck:
    """Compare the graph in `folder` with `model` (the PyTorch model it was exported from).

    Args:
        folder: A single-graph export folder.
        model: The PyTorch reference (bitsandbytes layers are run through their
            dequantized weights, in fp32, which is what they compute).
        name: Adapter name for the report.
        prompts: Strings or token-id lists; default: drawn from the vocabulary (seed 0).
        max_new_tokens: Greedy tokens per prompt (prefill + N-1 decode steps).
        text: String or token ids whose perplexity both sides report (optional).
        adapter_file: An .onnx_adapter to activate in every run, or a .kvprefix.safetensors
            to seed into the cache at prefill (separate mode); `model` then has that
            adapter active.
    """
    from edgepeft.export.generic import CacheContract, plain_fp32_copy

    folder = Path(folder)
    manifest = read_manifest(folder)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"{folder} holds a set of graphs; check each of {list(manifest.graphs)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids, mask = _prompt_batch(folder, manifest, prompts)
    text_ids = _text_ids(folder, manifest, text)
    path = folder / manifest.model_file
    contract = CacheContract(plain_fp32_copy(model)).eval()
    reference = _Torch(contract, manifest)
    if adapter_file is not None and is_kv_prefix_file(adapter_file):
        ort_side = _OrtPrefix(path, manifest, Path(adapter_file))
    else:
        ort_side = _Ort(path, manifest, None if adapter_file is None else Path(adapter_file))
    steps = max_new_tokens - 1
    batched = not (isinstance(ort_side, _OrtPrefix) and ort_side.rows_alone(mask))
    batches = [(ids, mask)] if batched else _unpadded_rows(ids, mask)
    runs = [_pass(reference, ort_side, b_ids, b_mask, steps) for b_ids, b_mask in batches]
    prefill, decode = _max_diff(runs)
    scale, non_finite = _logit_scale(runs), _non_finite(runs, batched)
    kl, top1_agree, top1_total = _kl_and_top1(runs)
    agree = sum(
        int((a == b).sum()) for r in runs for a, b in zip(r.ort_tokens, r.tokens, strict=True)
    )
    greedy_match = sum(
        int((np.stack(r.free_tokens, 1) == np.stack(r.tokens, 1)).all(1).sum()) for r in runs
    )
    if batched:  # what a runtime replaying one prompt at a time must produce
        reference_tokens = _continuations(reference, ids, mask, steps)
        ort_alone = _continuations(ort_side, ids, mask, steps)
    else:  # the passes already ran each prompt alone
        reference_tokens = [t for r in runs for t in _rows_of(r.tokens)]
        ort_alone = [t for r in runs for t in _rows_of(r.free_tokens)]

    perplexities = (None, None)
    if text_ids is not None:
        perplexities = (_perplexity(reference, text_ids), _perplexity(ort_side, text_ids))

    dequant = (None, None)
    if manifest.weights in ("int8", "int4"):
        weights = _export_weights(path, contract)
        if weights is not None:
            with _dequantized(contract, weights):
                exact = [_run(reference, r.ids, r.mask, steps, r.tokens)[0] for r in runs]
            dequant = _max_diff(runs, against=exact)
    return GraphCheck(
        name=name,
        weights=manifest.weights,
        prefill_max_abs_diff=prefill,
        decode_max_abs_diff=decode,
        tokens_agree=agree,
        tokens_total=ids.shape[0] * max_new_tokens,
        criteria=criteria_key(manifest),
        mean_kl=kl,
        top1_agree=top1_agree,
        top1_total=top1_total,
        logit_scale=scale,
        non_finite=non_finite,
        greedy_match=greedy_match,
        greedy_prompts=ids.shape[0],
        greedy_tokens=max_new_tokens,
        perplexity_torch=perplexities[0],
        perplexity_ort=perplexities[1],
        perplexity_tokens=None if text_ids is None else int(text_ids.shape[1]),
        adapter_file=None if adapter_file is None else str(adapter_file),
        dequant_prefill_max_abs_diff=dequant[0],
        dequant_decode_max_abs_diff=dequant[1],
        batched=batched,
        reference_tokens=tuple(reference_tokens),
        reference_tokens_mode=REFERENCE_PER_PROMPT,
        row_greedy_match=sum(a == b for a, b in zip(ort_alone, reference_tokens, strict=True)),
    )


# ---------------------------------------------------------------- reference from the manifest


def _load_base(manifest: Manifest):
    from edgepeft.base import fingerprint, load_base

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
    return model


def load_reference(manifest: Manifest):
    """The PyTorch model a merged graph was exported from: its base with the adapters merged."""
    from edgepeft.adapters.peft_format import load_adapter
    from edgepeft.merge import merge

    if manifest.adapters and manifest.mode != "merged":
        raise ValueError(
            f"load_reference rebuilds merged exports; this one is {manifest.mode!r}: "
            "verify() checks each of its adapter files against the base instead"
        )
    model = _load_base(manifest)
    for adapter in manifest.adapters:
        load_adapter(model, adapter.source, name=adapter.name)
        model, _ = merge(model, adapter.name, quant="none", inplace=True, keep_original=False)
    return model


def adapter_file(export_dir: Path, entry) -> Path:
    """Where a separate export keeps an adapter's file: entry.file, else adapters/<name>.onnx_adapter."""
    given = getattr(entry, "file", None)
    path = export_dir / given if given else export_dir / ADAPTER_DIR / f"{entry.name}{ADAPTER_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter {entry.name!r}: {path} not found; the manifest of {export_dir} lists it. "
            "Re-run the export"
        )
    return path


def _check_separate(export_dir: Path, manifest: Manifest, model, **kwargs):
    """The base graph with no adapter active, then each adapter file (or KV prefix) in turn."""
    import copy

    from edgepeft.adapters.inject import set_adapter
    from edgepeft.adapters.peft_format import load_adapter

    base = model if model is not None else _load_base(manifest)
    checks = [check_graph(export_dir, base, name="", **kwargs)]
    for entry in manifest.adapters:
        file = adapter_file(export_dir, entry)  # .onnx_adapter, or a KV prefix (entry.file)
        adapted = copy.deepcopy(base)  # the caller's model never gets adapters
        load_adapter(adapted, entry.source, name=entry.name)
        set_adapter(adapted, entry.name)
        checks.append(
            check_graph(export_dir, adapted, name=entry.name, adapter_file=file, **kwargs)
        )
    return checks, {}


def verify(
    export_dir: str | os.PathLike,
    *,
    prompts=None,
    max_new_tokens: int = 8,
    model=None,
    text=None,
) -> VerifyReport:
    """Check an export folder against PyTorch and write verify.json and verify.md into it.

    Args:
        export_dir: A folder written by `edgepeft.export` (one graph, a merged set, or
            a separate export with adapter files).
        prompts: Strings (tokenized with the folder's tokenizer) or lists of token ids;
            default: three prompts drawn with a fixed seed from the vocabulary.
        max_new_tokens: Greedy tokens compared per prompt (prefill + N-1 decode steps).
        model: The PyTorch reference (a single graph: the exported model; separate
            mode: the base); default: the manifest's base loaded again (with the same
            adapters merged, or each adapter loaded and active).
        text: A string (or token ids) whose perplexity both sides report; optional.

    Returns:
        The report; `passed` is False when a graph misses its CRITERIA row (or shows NaN/inf).
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    common = dict(prompts=prompts, max_new_tokens=max_new_tokens, text=text)
    skipped: dict[str, str] = {}
    if isinstance(manifest, ExportIndex):
        if model is not None:
            raise ValueError(
                f"{export_dir} holds {len(manifest.graphs)} graphs, each from its own merged "
                "model; verify each folder with its model, or pass no model"
            )
        checks = [
            check_graph(
                export_dir / folder,
                load_reference(read_manifest(export_dir / folder)),
                name=name,
                **common,
            )
            for name, folder in manifest.graphs.items()
        ]
        first = read_manifest(export_dir / next(iter(manifest.graphs.values())))
        prompt_folder = export_dir / next(iter(manifest.graphs.values()))
    elif manifest.mode == "separate" and manifest.adapters:
        checks, skipped = _check_separate(export_dir, manifest, model, **common)
        first, prompt_folder = manifest, export_dir
    else:
        reference = model if model is not None else load_reference(manifest)
        checks = [
            check_graph(
                export_dir,
                reference,
                name=manifest.adapters[0].name if len(manifest.adapters) == 1 else "",
                **common,
            )
        ]
        first, prompt_folder = manifest, export_dir
    ids, mask = _prompt_batch(prompt_folder, first, prompts)
    report = VerifyReport(
        str(export_dir),
        ids.shape[0],
        max_new_tokens,
        tuple(checks),
        prompt_tokens=tuple(
            tuple(int(t) for t in row[real.astype(bool)])
            for row, real in zip(ids, mask, strict=True)
        ),
        skipped=skipped,
    )
    write_report(export_dir, report)
    return report


__all__ = [
    "CRITERIA",
    "Criteria",
    "GraphCheck",
    "VerifyReport",
    "adapter_file",
    "check_graph",
    "criteria_key",
    "is_kv_prefix_file",
    "load_reference",
    "read_report",
    "verify",
    "write_report",
]
