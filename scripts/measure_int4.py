"""Int4 weight quality on a real model: ppl, KL and top-1 against fp32, per quantizer setting.

    SmolLM2-135M-Instruct, fp32 (scripts/real_model.py, cached)
      ├─ "gguf":     as shipped; its linear weights sit exactly on Q4_1's grid (block 32,
      │              scale + min), which flatters any quantizer able to express that grid
      └─ "off-grid": the same function, weights off that grid: seeded per-channel scales
                     moved between each linear's input columns and the norm / linear that
                     feeds them (`off_grid`); its fp32 ppl is printed beside the original's
    per setting (edgepeft/export/weights.py quantize_nbits: method, symmetric, zero points,
    block size, with or without the mixed-precision rule `mixed_bits`):
      every 2-D weight W (linears and the tied embedding / lm_head table)
        ─► dequantize_packed(quantize_nbits(W)) in the fp32 model (what MatMulNBits computes)
    ─► logits on a text: "docs", prose topics of Python's documentation (stdlib pydoc_data),
       or "declaration", the Declaration of Independence (1776, public domain; archaic
       English that int4 rounding hurts several times more than modern prose)
    ─► ppl change, KL(fp32 || quantized) and top-1 agreement per token, bits per weight and
       the weights' size in MB (codes + fp32 scales + zero points + fp32 norms)

    python scripts/measure_int4.py                  # the table (~10 min on 2 cores)
    python scripts/measure_int4.py --sensitivity    # KL with one layer / one kind quantized
    python scripts/measure_int4.py --only "awq|gptq"  # the calibrated settings (moments from
                                                    # CALIBRATION_TEXT, never the scored text)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptq_int4 import gptq_quantize, input_moments  # noqa: E402
from real_model import smollm2_dir  # noqa: E402

from edgepeft.export.channel_scales import CALIBRATION_FILE  # noqa: E402
from edgepeft.export.weights import dequantize_packed, mixed_bits, quantize_nbits  # noqa: E402

OFF_GRID_SPREAD = 0.3
"""Log-std of the per-channel scales that move the weights off the GGUF's grid."""
OFF_GRID_SEED = 0
OFF_GRID_FOLDER = "smollm2-135m-instruct-off-grid"
"""`off_grid_dir`'s folder, beside the original's in the real-model cache."""

DOCS_TOPICS = ("naming", "execmodel", "exceptions", "class", "import", "assignment")
"""Prose-heavy topics of Python's own documentation (stdlib pydoc_data.topics, PSF licence):
on every Python install, plain modern technical English."""

DECLARATION = CALIBRATION_FILE.read_text(encoding="utf-8")
"""The Declaration of Independence (1776, public domain): the exporter's calibration text."""


@dataclass(frozen=True)
class Setting:
    """One way of quantizing every 2-D weight of the model."""

    label: str
    method: str = "rtn"
    symmetric: bool = True
    float_zero_points: bool = False
    block_size: int = 32
    mixed: bool = False
    """int8 (block 32, RTN) where `mixed_bits` says so, int4 elsewhere."""
    packed_qkv: bool = False
    """mixed: q and k take v_proj's bits, as the fused graph's one q|k|v MatMulNBits does."""
    int8_block: int = 32
    """mixed: block size of the int8 tensors (a larger one stores fewer fp32 scales)."""
    v_like_down: bool = False
    """mixed: v_proj int8 only where down_proj is (edge layers, every third), as llama.cpp's
    Q4_K_M gives attn_v more bits only in those layers."""


SETTINGS = [
    Setting("rtn-sym b32 (today)"),
    Setting("rtn-asym b32", symmetric=False),
    Setting("search-sym b32", method="search"),
    Setting("search-asym b32", method="search", symmetric=False),
    Setting("search-asym-fz b32", method="search", symmetric=False, float_zero_points=True),
    Setting("rtn-asym b64", symmetric=False, block_size=64),
    Setting("search-asym b64", method="search", symmetric=False, block_size=64),
    Setting(
        "search-asym-fz b64", method="search", symmetric=False, float_zero_points=True,
        block_size=64,
    ),
    Setting("rtn-asym b128", symmetric=False, block_size=128),
    Setting("search-asym b128", method="search", symmetric=False, block_size=128),
    Setting("rtn-sym b32 mixed", mixed=True),
    Setting("search-asym b32 mixed", method="search", symmetric=False, mixed=True),
    Setting("search-asym b64 mixed", method="search", symmetric=False, block_size=64, mixed=True),
    Setting(
        "search-asym-fz b64 mixed", method="search", symmetric=False, float_zero_points=True,
        block_size=64, mixed=True,
    ),
    Setting("search-asym b32 mixed, packed qkv (export default)", method="search",
            symmetric=False, mixed=True, packed_qkv=True),  # fmt: skip
    Setting("gptq b32", method="gptq", symmetric=False),
    Setting("gptq b32 mixed", method="gptq", symmetric=False, mixed=True),
    Setting("gptq b32 mixed, packed qkv", method="gptq", symmetric=False, mixed=True,
            packed_qkv=True),  # fmt: skip
    Setting("gptq b64 mixed", method="gptq", symmetric=False, block_size=64, mixed=True),
    Setting("awq-search b32 mixed", method="awq", symmetric=False, mixed=True),
    Setting("awq-search b32 mixed, packed qkv", method="awq", symmetric=False, mixed=True,
            packed_qkv=True),  # fmt: skip
    Setting("awq-search b32 mixed v-like-down, packed qkv", method="awq", symmetric=False,
            mixed=True, packed_qkv=True, v_like_down=True),  # fmt: skip
    Setting("awq-search b32 mixed, int8 b128", method="awq", symmetric=False, mixed=True,
            int8_block=128),  # fmt: skip
    Setting("awq-search b32 mixed, int8 b128, packed qkv", method="awq", symmetric=False,
            mixed=True, packed_qkv=True, int8_block=128),  # fmt: skip
]
AWQ_ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
"""Exponents tried for the activation-aware input-channel scales s = rms(x)^alpha."""
AWQ_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))
"""Linears that share one input, so one scale vector (folded into the RMSNorm before them,
or into up_proj's rows for down_proj: function-preserving, as `off_grid` moves scales).
o_proj is left unscaled: its inputs are v's channels repeated per query head."""
CALIBRATION_TEXT = "declaration"
"""GPTQ's input moments come from this text, never from the one scored ("docs")."""


@dataclass(frozen=True)
class Quality:
    """One quantized model against its fp32 original on the same tokens."""

    ppl: float
    ppl_change: float
    """ppl / fp32 ppl - 1."""
    kl: float
    """Mean over tokens of KL(fp32 || quantized), nats."""
    top1: float
    """Share of tokens whose most likely next token is unchanged."""


def weight_matrices(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every 2-D parameter: the linears and the (tied) embedding table, once each."""
    return {name: p for name, p in model.named_parameters() if p.ndim == 2}


def off_grid(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every linear weight off Q4_1's grid without changing the function, in place.

    Per-channel scales c = exp(OFF_GRID_SPREAD * N(0, 1)) are moved between a weight's
    input columns and what feeds them: the RMSNorm weight before q/k/v and gate/up, v's
    rows before o (each attention head reads its kv head's channels), up's rows before
    down. Within a block of 32 columns the scales differ, so no block stays on a 16-level
    grid; in exact arithmetic the logits are unchanged. (Noise of a fraction of a step
    would also leave the grid, but costs the fp32 model as much as a second int4 rounding.)
    """

    def scales(n: int) -> torch.Tensor:
        return torch.exp(OFF_GRID_SPREAD * torch.randn(n, generator=generator))

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            c = scales(attn.q_proj.in_features)  # (hidden,)
            layer.input_layernorm.weight.mul_(c)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                linear.weight.div_(c)
            c = scales(mlp.up_proj.in_features)
            layer.post_attention_layernorm.weight.mul_(c)
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.weight.div_(c)
            c = scales(attn.v_proj.out_features)  # (n_kv * head_dim,)
            attn.v_proj.weight.mul_(c[:, None])
            head_dim = attn.head_dim
            per_head = c.reshape(-1, 1, head_dim)  # (n_kv, 1, head_dim)
            groups = attn.o_proj.in_features // attn.v_proj.out_features  # q heads per kv head
            attn.o_proj.weight.div_(per_head.expand(-1, groups, -1).reshape(-1))
            c = scales(mlp.up_proj.out_features)  # (intermediate,)
            mlp.up_proj.weight.mul_(c[:, None])
            mlp.down_proj.weight.div_(c)


def setting_bits(name: str, setting: Setting, num_layers: int) -> int:
    """Bits of one weight under `setting`."""
    if not setting.mixed:
        return 4
    if setting.packed_qkv and re.search(r"\.(q|k)_proj\.", name):
        name = re.sub(r"\.(q|k)_proj\.", ".v_proj.", name)
    if setting.v_like_down and ".v_proj." in name:
        name = name.replace(".self_attn.v_proj.", ".mlp.down_proj.")
    return mixed_bits(name, num_layers)


def quantized(
    name: str,
    weight: np.ndarray,
    setting: Setting,
    num_layers: int,
    hessian: torch.Tensor | None = None,
) -> tuple[np.ndarray, int]:
    """The dequantized weight and its stored bytes (codes + fp32 scales + zero points)."""
    bits = setting_bits(name, setting, num_layers)
    if bits == 8:
        packed = quantize_nbits(weight, 8, setting.int8_block, symmetric=True)
    elif setting.method == "gptq" and hessian is not None:
        packed = gptq_quantize(weight, hessian, 4, setting.block_size)
    elif setting.method in ("gptq", "awq"):  # the table, or awq's scaled weight: search fit
        packed = quantize_nbits(weight, 4, setting.block_size, symmetric=False, method="search")
    else:
        packed = quantize_nbits(
            weight,
            4,
            setting.block_size,
            symmetric=setting.symmetric,
            method=setting.method,
            float_zero_points=setting.float_zero_points,
        )
    size = packed.codes.nbytes + packed.scales.nbytes
    size += 0 if packed.zero_points is None else packed.zero_points.nbytes
    return dequantize_packed(packed), size


def log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T, V) next-token log-probabilities."""
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].float(), dim=-1)


def score(reference: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> Quality:
    """Quality of `test` against `reference` at the positions that predict `targets`.

    Args:
        reference: (N, V) fp32 next-token log-probabilities.
        test: (N, V) log-probabilities of the quantized model at the same positions.
        targets: (N,) the token each position predicts.
    """
    ppl = float(torch.exp(-test.gather(1, targets[:, None]).mean()))
    ref_ppl = float(torch.exp(-reference.gather(1, targets[:, None]).mean()))
    kl = float((reference.exp() * (reference - test)).sum(-1).mean())
    top1 = float((reference.argmax(-1) == test.argmax(-1)).float().mean())
    return Quality(ppl, ppl / ref_ppl - 1, kl, top1)


def compare(reference: torch.Tensor, test: torch.Tensor, ids: torch.Tensor) -> Quality:
    """`score` of (T, V) log-probabilities over ids (1, T); the last position has no target."""
    return score(reference[:-1], test[:-1], ids[0, 1:])


class Bench:
    """One fp32 model whose weights are swapped per setting; the originals kept aside."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.params = weight_matrices(model)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        self.num_layers = model.config.num_hidden_layers
        self.other_bytes = sum(
            p.numel() * 4 for n, p in model.named_parameters() if n not in self.params
        )
        self.reference = log_probs(model, ids)
        self._moments: dict[str, torch.Tensor] | None = None

    def moments(self) -> dict[str, torch.Tensor]:
        """Weight name -> X^T X of its linear's inputs over CALIBRATION_TEXT (fp32 model)."""
        if self._moments is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
            ids = torch.tensor([tokenizer(text(CALIBRATION_TEXT))["input_ids"][:1024]])
            sums: dict[str, torch.Tensor] = {}
            hooks = []
            for name, module in self.model.named_modules():
                if isinstance(module, torch.nn.Linear) and f"{name}.weight" in self.params:

                    def add(module, args, output, key=f"{name}.weight"):
                        moment = input_moments(args[0].detach())
                        sums[key] = sums[key] + moment if key in sums else moment

                    hooks.append(module.register_forward_hook(add))
            try:
                with torch.no_grad():
                    self.model(ids)
            finally:
                for hook in hooks:
                    hook.remove()
            self._moments = sums
        return self._moments

    def run_awq(self, setting: Setting, moments, names) -> tuple[Quality, float]:
        """Activation-aware scaling (AWQ, Lin et al. 2023) before the search fit: per group of
        linears sharing an input, the alpha whose rounded weights give the least output
        error tr(dW H dW^T) on the calibration text; then W * s quantized, / s after."""
        size = count = 0
        done = set()
        with torch.no_grad():
            for name in names or self.params:
                if name in done:
                    continue
                group = [name]
                for members in AWQ_GROUPS:
                    if any(f".{m}." in name for m in members):
                        group = [re.sub(r"\.(\w+_proj)\.", f".{m}.", name) for m in members]
                weights = {g: self.original[g].numpy() for g in group}
                h = moments.get(name)
                bits = {g: setting_bits(g, setting, self.num_layers) for g in group}
                best = None
                alphas = AWQ_ALPHAS if h is not None and any(b == 4 for b in bits.values()) else (0.0,)
                for alpha in alphas:
                    scale = np.ones(next(iter(weights.values())).shape[1], np.float32)
                    if alpha:
                        rms = np.sqrt(np.maximum(np.diag(h.numpy()), 1e-12))
                        scale = (rms**alpha).astype(np.float32)
                        scale /= np.sqrt(scale.max() * scale.min())
                    rounded, error, nbytes = {}, 0.0, 0
                    for g, w in weights.items():
                        q, b = quantized(g, w * scale, setting, self.num_layers)
                        q = q / scale
                        rounded[g], nbytes = q, nbytes + b
                        if h is not None:
                            delta = torch.from_numpy(w - q).double()
                            error += float(((delta @ h) * delta).sum())
                    if best is None or error < best[0]:
                        best = (error, rounded, nbytes)
                _, rounded, nbytes = best
                for g, q in rounded.items():
                    self.params[g].copy_(torch.from_numpy(q.astype(np.float32)))
                    count += q.size
                    done.add(g)
                size += nbytes
        quality = compare(self.reference, log_probs(self.model, self.ids), self.ids)
        self.restore()
        return quality, 8 * size / count

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.original[name])

    def run(self, setting: Setting, names: list[str] | None = None) -> tuple[Quality, float]:
        """Quality with `names` (default all 2-D weights) quantized; and bits per weight."""
        size = count = 0
        moments = self.moments() if setting.method in ("gptq", "awq") else {}
        if setting.method == "awq":
            return self.run_awq(setting, moments, names)
        with torch.no_grad():
            for name in names or self.params:
                weight = self.original[name].numpy()
                rounded, nbytes = quantized(
                    name, weight, setting, self.num_layers, moments.get(name)
                )
                self.params[name].copy_(torch.from_numpy(rounded))
                size, count = size + nbytes, count + weight.size
        quality = compare(self.reference, log_probs(self.model, self.ids), self.ids)
        self.restore()
        return quality, 8 * size / count


def off_grid_dir(cache: str | os.PathLike | None = None) -> Path:
    """The off-grid copy of SmolLM2 (`off_grid`, seed OFF_GRID_SEED) as an HF folder, built once.

    It sits beside `smollm2_dir(cache)` as OFF_GRID_FOLDER, so graph exporters and converters
    that read a folder (edgepeft, llama.cpp, onnxruntime-genai) see the same weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.atomic import temporary_sibling

    source = smollm2_dir(cache)
    target = source.parent / OFF_GRID_FOLDER
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    off_grid(model, torch.Generator().manual_seed(OFF_GRID_SEED))
    staging = temporary_sibling(target)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have won
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def text(name: str) -> str:
    """"docs": DOCS_TOPICS of Python's documentation; "declaration": DECLARATION."""
    if name == "declaration":
        return DECLARATION
    from pydoc_data.topics import topics

    return "\n\n".join(topics[t] for t in DOCS_TOPICS)


def load(
    off: bool, tokens: int, text_name: str = "docs"
) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """The model (off-grid copy when `off`), the text's first `tokens` ids, its fp32 ppl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(text(text_name))["input_ids"][:tokens]])  # (1, T)
    if off:
        off_grid(model, torch.Generator().manual_seed(OFF_GRID_SEED))
    lp = log_probs(model, ids)
    ppl = float(torch.exp(-lp[:-1].gather(1, ids[0, 1:, None]).mean()))
    return model, ids, ppl


def table(args: argparse.Namespace) -> None:
    settings = [s for s in SETTINGS if re.search(args.only, s.label)]
    for copy in args.copies:
        model, ids, ppl = load(copy == "off-grid", args.tokens, args.text)
        bench = Bench(model, ids)
        print(f"\n### {copy}: fp32 ppl {ppl:.3f} on {ids.shape[1]} tokens\n")
        print("| setting | ppl vs fp32 | KL | top-1 | bits/weight | MB |")
        print("|---|---|---|---|---|---|")
        for setting in settings:
            started = time.perf_counter()
            q, bpw = bench.run(setting)
            count = sum(p.numel() for p in bench.params.values())
            mb = (count * bpw / 8 + bench.other_bytes) / 1e6
            print(
                f"| {setting.label} | {100 * q.ppl_change:+.1f}% | {q.kl:.4f} | "
                f"{100 * q.top1:.1f}% | {bpw:.3f} | {mb:.1f} |"
                f"  <!-- {time.perf_counter() - started:.0f} s -->",
                flush=True,
            )


def sensitivity(args: argparse.Namespace) -> None:
    """KL with only one layer, or only one kind of tensor, quantized (search-asym b32)."""
    setting = Setting("probe", method="search", symmetric=False, block_size=args.block)
    model, ids, _ = load(True, args.tokens, args.text)
    bench = Bench(model, ids)
    names = list(bench.params)
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = re.search(r"layers\.(\d+)\.", name)
        kind = name.split(".")[-2]
        groups.setdefault(f"kind {kind}", []).append(name)
        groups.setdefault(f"layer {int(layer[1]):02d}" if layer else "table", []).append(name)
    print("| quantized alone | KL | top-1 | ppl vs fp32 |")
    print("|---|---|---|---|")
    for group, members in sorted(groups.items()):
        q, _ = bench.run(setting, members)
        print(f"| {group} | {q.kl:.4f} | {100 * q.top1:.1f}% | {100 * q.ppl_change:+.2f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text scored")
    parser.add_argument(
        "--text", choices=["docs", "declaration"], default="docs", help="the text scored"
    )
    parser.add_argument(
        "--copies", nargs="+", choices=["gguf", "off-grid"], default=["gguf", "off-grid"]
    )
    parser.add_argument("--only", default="", help="regex: run only the settings it matches")
    parser.add_argument("--sensitivity", action="store_true", help="per layer / kind KL")
    parser.add_argument("--block", type=int, default=32, help="block size of --sensitivity")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    (sensitivity if args.sensitivity else table)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
