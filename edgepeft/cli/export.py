"""`edgepeft export` and `edgepeft verify`: onnxruntime graphs written, then checked.

    edgepeft export --base MODEL [--adapter NAME=DIR ...] --out DIR
        --recipe TOML (weights, block_size, accuracy_level, mode, max_context) < explicit flags
            ──► edgepeft.export.export ──► <out>/ (model.onnx + .data, tokenizer,
            edgepeft.json, genai_config.json, verify.json; one folder per adapter in merged mode)
        --rank R: each (DyLoRA) adapter first cut to rank R by edgepeft.truncate_rank into
            <out>-adapters-r<R>/<NAME>, which the export records and verify reloads
    edgepeft verify EXPORT_DIR
        the export against PyTorch; exit 1 if any check fails (every weight format is
        judged, see verify.CRITERIA); --files: sizes and sha256 only, no PyTorch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepeft.cli.common import QUANT_CHOICES, UserError, looks_like_path, parse_named_folders
from edgepeft.vocab import GRAPHS, MODES, WEIGHT_FORMATS

# ---------------------------------------------------------------- export


def add_export_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "export",
        help="export a base and its adapters as ONNX graphs for onnxruntime",
        description="Export a base model, alone or with adapters merged in (one graph per "
        "adapter), as onnxruntime decoder graphs with a KV cache, then check them against "
        "PyTorch. Explicit flags override the --recipe file.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="adapter folder, exported as NAME (default: the folder's name); repeatable",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--rank",
        type=int,
        metavar="R",
        help="DyLoRA adapters: export rank R (written first to <out>-adapters-r<R>/NAME, a plain "
        "LoRA folder that the export's manifest points to)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        help="default: int4; nf4/fp4: the base's own bitsandbytes codes (MatMulBnb4)",
    )
    parser.add_argument("--mode", choices=MODES, help="default: merged")
    parser.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="how to load the base (default: what the adapters record; else none)",
    )
    parser.add_argument("--block-size", type=int, metavar="N", help="int4/int8 block (default 32)")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        metavar="N",
        help="MatMulNBits compute type, 0-4 (default 4: int8 activations)",
    )
    parser.add_argument(
        "--accuracy-level-int8",
        type=int,
        choices=range(5),
        metavar="N",
        help="that of the 8-bit MatMulNBits nodes only (default: --accuracy-level)",
    )
    parser.add_argument(
        "--int4-method",
        choices=("search", "rtn"),
        help="int4 rounding (default search: fitted scales, uint8 zero points; "
        "rtn: symmetric round-to-nearest, the old format)",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int4: store tied embedding/lm_head, v_proj and some down_proj in int8 (default on)",
    )
    parser.add_argument(
        "--activation-aware",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int4: calibrated per-channel scales before rounding (AWQ; default on)",
    )
    parser.add_argument("--max-context", type=int, metavar="N", help="default: the model's limit")
    parser.add_argument(
        "--recipe", metavar="NAME|TOML", help="a shipped recipe (cpu-int4, ...) or a .toml file"
    )
    parser.add_argument(
        "--graph",
        choices=GRAPHS,
        default="auto",
        help="graph builder (default auto: fused where the architecture has one)",
    )
    parser.add_argument(
        "--lora-everywhere",
        action="store_true",
        help="separate mode: rank-0 LoRA inputs on every linear layer (not lm_head), so a LoRA "
        "trained later over this base (same --quant) is added without a new base graph "
        "(edgepeft.export.separate.export_adapter); needs no --adapter",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def run_export(args: argparse.Namespace) -> int:
    # lazy: the exporter imports torch; a bare install gets the "pip install" line instead
    from edgepeft.export.api import export

    adapters = parse_named_folders(
        args.adapter, duplicate="adapter name {name!r} given twice; name them with --adapter NAME=DIR"
    )
    if looks_like_path(args.base) and not Path(args.base).expanduser().is_dir():
        raise UserError(f"base model folder {args.base} does not exist")
    if args.rank is not None:
        adapters = truncated_adapters(adapters, args.rank, Path(args.out))
    result = export(
        args.base,
        args.out,
        adapters or None,
        weights=args.weights,
        mode=args.mode,
        quant=args.quant,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        accuracy_level_int8=args.accuracy_level_int8,
        int4_method=args.int4_method,
        mixed_precision=args.mixed_precision,
        activation_aware=args.activation_aware,
        max_context=args.max_context,
        recipe=args.recipe,
        verify=not args.no_verify,
        graph=args.graph,
        overwrite=args.overwrite,
        quiet=args.quiet,
        lora_everywhere=args.lora_everywhere,
    )
    print(result)
    return 0


def truncated_adapters(adapters: dict, rank: int, out: Path) -> dict:
    """`edgepeft export --rank R`: every adapter cut to rank R beside the export (kept, since
    the manifest records each adapter's folder and `edgepeft verify` reloads it)."""
    # lazy: truncation reads the folders with torch
    from edgepeft.truncate import truncate_rank

    if not adapters:
        raise UserError("--rank needs at least one --adapter NAME=DIR (a DyLoRA adapter) to cut")
    folder = out.with_name(f"{out.name}-adapters-r{rank}")
    cut = {name: truncate_rank(path, rank, folder / name) for name, path in adapters.items()}
    print(f"cut {len(cut)} adapter(s) to rank {rank} in {folder}", flush=True)
    return cut


# ---------------------------------------------------------------- verify


def add_verify_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "verify",
        help="check an exported folder against PyTorch (logits, greedy tokens)",
        description="Reload the export's base (and merged adapters) in PyTorch, run fixed prompts "
        "through both, print max |logit diff|, KL, top-1 and greedy agreement, and write "
        "verify.json and verify.md. Exit code 1 when a check fails (every weight format is "
        "judged; the report prints the criteria).",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by edgepeft export")
    parser.add_argument("--max-new-tokens", type=int, default=8, metavar="N", help="default: 8")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="prompt to compare on (repeatable; default: drawn from the vocabulary, seed 0)",
    )
    parser.add_argument("--text", metavar="FILE", help="text file whose perplexity both sides report")
    parser.add_argument(
        "--files",
        action="store_true",
        help="only check every file's size and sha256 against the manifest (no PyTorch, no "
        "base needed); exit 1 naming the first file that differs",
    )
    return parser


def run_verify(args: argparse.Namespace) -> int:
    # lazy: verify imports torch and the exporter
    from edgepeft.export.verify import verify

    if not Path(args.export_dir).is_dir():
        raise UserError(f"export folder {args.export_dir} does not exist")
    if args.files:
        return verify_files(args.export_dir)
    if args.text is not None and not Path(args.text).is_file():
        raise UserError(f"--text {args.text} is not a file")
    report = verify(
        args.export_dir,
        max_new_tokens=args.max_new_tokens,
        prompts=args.prompt,
        text=Path(args.text).read_text() if args.text else None,
    )
    print(report)
    return 0 if report.passed else 1


def verify_files(export_dir: str) -> int:
    """`edgepeft verify EXPORT_DIR --files`: every recorded file's size and sha256."""
    # lazy: keeps the other commands' startup light
    from edgepeft.export.files import FileIntegrityError, check_export

    try:
        checked = check_export(export_dir, hashes=True)
    except FileIntegrityError as e:
        print(f"verify --files: FAILED: {e}", file=sys.stderr)
        return 1
    if checked == 0:
        raise UserError(
            f"{export_dir} records no file sizes or hashes (exported by an older edgepeft); "
            "re-export it to check its files"
        )
    print(f"verify --files: {checked} file(s) of {export_dir} match their size and sha256")
    return 0
