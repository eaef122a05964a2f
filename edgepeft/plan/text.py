"""The plan as text for a terminal: `render` (a Plan) and `render_training`.

    Plan ──render──►  header (model, device, budget, bandwidth, context, adapters)
                      one column per weight format: file, memory by kind, peak, fits,
                      decode tok/s at the start and at the end of the context
                      recommended: recipe (weights, mode, max context, providers): why
    training result ──render_training──► the training planner's estimate and verdict

JSON output needs no renderer: `Plan.to_dict()` and plan_training's dict are printed as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgepeft.settings import format_size
from edgepeft.vocab import NBITS

if TYPE_CHECKING:  # type hints only: planner.py imports this module
    from edgepeft.plan.planner import Plan


def compact_size(n: float) -> str:
    """format_size without its space ("1.50GiB"): narrow table cells."""
    return format_size(n).replace(" ", "")


def render(p: Plan) -> str:
    """The plan as the table `edgepeft plan` prints."""
    d, m = p.device, p.model
    place = "GPU memory" if d.accelerator == "cuda" and d.memory_kind == "vram" else "memory"
    lines = [
        f"plan: {m.name} ({m.model_type}, {m.parameters / 1e6:,.0f}M parameters) on {d.name}",
        f"  device: {d.description}",
        f"  budget {compact_size(d.budget)} of {compact_size(d.memory)} {place} ({compact_size(d.reserved)} reserved); "
        f"{d.bandwidth / 1e9:.1f} GB/s {d.bandwidth_kind} x efficiency {d.efficiency:g}; "
        f"runs on {d.accelerator}",
        f"  context {p.context}, prefill {p.prefill} tokens, "
        + (f"{p.adapters} LoRA adapter(s) r={p.rank} (separate mode)" if p.adapters else "no adapters"),
        "",
    ]
    cols = list(p.formats.values())
    rows = [
        ("model file", lambda f: compact_size(f.data_file_bytes)),
        ("weights in memory", lambda f: compact_size(f.weights_resident)),
        (f"KV cache ({p.context})", lambda f: compact_size(f.kv_cache)),
        ("activations", lambda f: compact_size(f.activations)),
        ("adapters", lambda f: compact_size(f.adapters)),
        ("runtime", lambda f: compact_size(f.runtime)),
        ("peak", lambda f: compact_size(f.total)),
        ("fits", lambda f: ("yes" if f.fits else "NO") + f" ({'+' if f.fits else '-'}{compact_size(abs(f.margin))})"),
        ("decode tok/s", lambda f: f"{f.tok_s_start:,.1f}"),
        (f"  at {p.context}", lambda f: f"{f.tok_s_full:,.1f}"),
    ]
    width = max(len(label) for label, _ in rows)
    cells = [[fn(f) for f in cols] for _, fn in rows]
    col_w = [max(len(f.weights), *(len(r[i]) for r in cells)) for i, f in enumerate(cols)]
    lines.append(" " * (width + 2) + "  ".join(f.weights.rjust(w) for f, w in zip(cols, col_w, strict=True)))
    for (label, _), row in zip(rows, cells, strict=True):
        lines.append(f"{label:<{width}}  " + "  ".join(c.rjust(w) for c, w in zip(row, col_w, strict=True)))
    rec = p.recommendation
    lines.append("")
    if rec.recipe is None:
        lines.append(f"recommended: nothing ({rec.reason})")
    else:
        r = rec.recipe
        block = f", block {r.block_size}" if r.weights in NBITS else ""
        lines.append(
            f"recommended: {r.name} ({r.weights}{block}, {r.mode}, max context "
            f"{rec.max_context}, providers "
            f"{', '.join(x.removesuffix('ExecutionProvider') for x in r.providers)}): {rec.reason}"
        )
        if p.adapters and r.mode != "separate":
            lines.append(
                f"  with --mode separate: the {p.adapters} adapter(s) switch per request on one "
                "base (the recipe's other settings stand)"
            )
        if rec.plan is not None:
            lines.append(
                f"  peak {compact_size(rec.plan.total)} of {compact_size(rec.plan.budget)}, "
                f"~{rec.plan.tok_s_start:,.1f} tok/s"
            )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def render_training(result: dict, model: str) -> str:
    """plan_training's result as `edgepeft plan --train` prints it."""
    s = result["settings"]
    verdict = "fits" if result["fits"] else "does NOT fit"
    return "\n".join([
        f"training plan: {model} on {result['device']} ({result['torch_device']}, "
        f"budget {compact_size(result['budget'])})",
        f"  LoRA r={s['rank']} on all linear layers over a {s['quant']} base, batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, {s['optimizer']}, checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}",
        "",
        result["text"],
        "",
        f"{verdict} ({'+' if result['fits'] else '-'}{compact_size(abs(result['margin']))}); largest batch "
        f"at {s['seq_len']} tokens: {result['largest_batch_size']}, longest sequence at batch "
        f"{s['batch_size']}: {result['largest_seq_len']}",
    ])  # fmt: skip


__all__ = ["compact_size", "render", "render_training"]
