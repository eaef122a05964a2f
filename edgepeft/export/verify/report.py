"""The verify report: one GraphCheck per graph, the VerifyReport over them, verify.json / .md.

    GraphCheck (numbers + the CRITERIA row) ─failures─► passed
    VerifyReport(graphs) ─write_report─► verify.json (to_dict) + verify.md (to_markdown)
                         ◄─read_report── verify.json of any edgepeft version (defaults filled)

Torch-free, so the CLI and the device side can read and print a report without PyTorch.

Reference continuations (per graph: `reference_tokens`): for each prompt, the PyTorch
reference's greedy continuation of `max_new_tokens` tokens (no stop token: EOS and what
follows are kept), computed for that prompt ALONE at batch 1 without padding
(`reference_tokens_mode` REFERENCE_PER_PROMPT). A runtime replaying each prompt
(`prompt_tokens`) at batch 1 must produce exactly these tokens. `row_greedy_match` counts
the prompts whose onnxruntime greedy continuation, run the same way, equals them. Files
written before these fields existed lack them; `read_report` fills the defaults.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.artifacts.manifest import write_json
from edgepeft.atomic import write_bytes
from edgepeft.export.verify.criteria import CRITERIA, REQUANTIZED, Criteria, criteria_line
from edgepeft.vocab import BNB4_FORMATS

VERIFY_FILE = "verify.json"
VERIFY_TABLE = "verify.md"
REFERENCE_PER_PROMPT = "per-prompt-batch1-unpadded"
"""`reference_tokens_mode`: each prompt's continuation computed alone at batch 1, unpadded."""



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
            rounded = data["weights"] in BNB4_FORMATS and not data.get("judged", False)
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



@dataclass(frozen=True)
class VerifyReport:
    """Every graph's check of one export folder: what verify.json holds, and its verdict."""

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
        return [criteria_line(k) for k in dict.fromkeys(g.criteria for g in self.graphs)]

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

