"""The `edgepeft` command line: one subcommand per task, user errors as one line and exit 2.

    edgepeft inspect MODEL
    edgepeft merge --base MODEL --adapter DIR --out DIR [--quant Q] [--base-quant Q] [--dtype D]

        adapter metadata ──► base quant ──► load_base ──► load_adapter (fingerprint checked)
            ──► merge inplace, layer by layer ──► .<out>.XXXX/ (safetensors, config,
            tokenizer, merge_report.json) ──rename──► <out>/

Heavy imports (torch, transformers) happen inside the subcommands, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edgepeft import __version__

QUANT_CHOICES = ("none", "nf4", "fp4", "int8")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
REPORT_FILE = "merge_report.json"


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# ---------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    try:
        from edgepeft.inspect_model import inspect_model
    except ImportError as e:
        raise UserError(f"`edgepeft inspect` is not available in this install ({e})") from e
    print(inspect_model(args.model))
    return 0


# ---------------------------------------------------------------- merge


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).exists()


def _bnb_config(model, quant: str):
    """The quantization_config transformers needs to reload the bitsandbytes layers."""
    import torch
    from transformers import BitsAndBytesConfig

    from edgepeft.base import is_linear_like, is_quantized

    info = model.edgepeft_base
    full_precision = [
        n for n, m in model.named_modules() if is_linear_like(m) and not is_quantized(m)
    ]
    if quant == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=full_precision
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=info.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, info.compute_dtype),
        llm_int8_skip_modules=full_precision,
    )


def _write_atomically(out: Path, write) -> None:
    """Run write(staging_dir), then rename the staging folder to `out`; no partial output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from edgepeft.adapters.peft_format import load_adapter, read_adapter
    from edgepeft.base import load_base
    from edgepeft.merge import merge

    adapter_dir, out = Path(args.adapter), Path(args.out)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist")
    if _looks_like_path(args.base) and not Path(args.base).expanduser().is_dir():
        raise UserError(f"base model folder {args.base} does not exist")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")

    _, _, metadata = read_adapter(adapter_dir)
    base_quant = args.base_quant or metadata.get("edgepeft_base_quant")
    if base_quant is None:
        base_quant = "none"
        print(
            f"note: {adapter_dir} records no base quantization (written by HF peft?); loading the "
            "base unquantized. Pass --base-quant if the adapter was trained over a quantized base.",
            file=sys.stderr,
        )
    name = metadata.get("edgepeft_adapter_name") or "default"
    dtype = getattr(torch, args.dtype)

    model, tokenizer = load_base(
        Path(args.base).expanduser() if _looks_like_path(args.base) else args.base,
        quant=base_quant,
        compute_dtype=dtype,
    )
    load_adapter(model, adapter_dir, name=name)
    model, report = merge(model, name, quant=args.quant, inplace=True, keep_original=False)
    if args.quant != "none":
        # transformers 5 saves and reloads bitsandbytes layers given this config.
        model.config.quantization_config = _bnb_config(model, args.quant)

    document = {
        **report.to_dict(),
        "base": str(args.base),
        "base_quant": base_quant,
        "adapter_dir": str(adapter_dir),
        "dtype": args.dtype,
        "saved_as": "full precision" if args.quant == "none" else f"bitsandbytes {args.quant}",
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(json.dumps(document, indent=2) + "\n")

    _write_atomically(out, write)
    print(report)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepeft", description="Adapt LLMs for constrained hardware."
    )
    parser.add_argument("--version", action="version", version=f"edgepeft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a model folder and what it can run")
    inspect.add_argument("model", metavar="MODEL", help="HF model folder")
    inspect.set_defaults(run=_inspect)

    merge = commands.add_parser(
        "merge",
        help="fold an adapter into its base and write a standard HF model folder",
        description="Fold an adapter into its base and write a standard HF model folder "
        f"(safetensors, config, tokenizer, {REPORT_FILE}).",
    )
    merge.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    merge.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter folder (edgepeft or HF peft)"
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    merge.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="none",
        help="storage of the merged linear layers (default: none = full precision)",
    )
    merge.add_argument(
        "--base-quant",
        choices=QUANT_CHOICES,
        default=None,
        help="quantization the adapter was trained over (default: read from the adapter; "
        "'none' for HF peft folders)",
    )
    merge.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype (default: float32)"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(run=_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (UserError, OSError, ValueError, KeyError) as e:
        # KeyError's str() is the repr of its argument; print the message itself.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"edgepeft {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
