"""`edgepeft inspect` and `edgepeft merge`: a model folder described, an adapter folded in.

    edgepeft inspect MODEL [--json]
    edgepeft inspect ADAPTER_DIR [--base DIR] [--top-k K] [--json]   soft prompts' neighbours
    edgepeft merge --base MODEL --adapter DIR --out DIR [--quant Q] [--base-quant Q] [--dtype D]

        adapter metadata ──► base quant ──► load_base ──► load_adapter (fingerprint checked)
            ──► merge inplace, layer by layer ──► .<out>.XXXX/ (safetensors, config,
            tokenizer, merge_report.json) ──rename──► <out>/

torch and transformers load inside the commands, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepeft.atomic import atomic_folder
from edgepeft.cli.common import DTYPE_CHOICES, QUANT_CHOICES, UserError, looks_like_path

REPORT_FILE = "merge_report.json"


# ---------------------------------------------------------------- inspect


def add_inspect_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "inspect",
        help="describe a model folder and what it can run, or a soft prompt's nearest tokens",
        description="Describe a base model, or, given a prompt-tuning / p-tuning adapter folder, "
        "list each virtual token's nearest vocabulary tokens (cosine similarity against the "
        "base's input embedding).",
    )
    parser.add_argument("model", metavar="MODEL", help="HF model folder, or an adapter folder")
    parser.add_argument(
        "--base",
        metavar="DIR",
        default=None,
        help="adapters: the base model (default: the adapter's base_model_name_or_path)",
    )
    parser.add_argument(
        "--top-k", type=int, default=5, metavar="K", help="adapters: neighbours per token (5)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    is_adapter = (Path(args.model) / "adapter_config.json").is_file()
    if not is_adapter and args.base is not None:
        raise UserError(f"--base is for adapter folders; {args.model} holds no adapter_config.json")
    try:
        # lazy: both reports import torch; the other commands' startup stays free of it
        from edgepeft.inspect_model import inspect_model
        from edgepeft.prompt_inspect import inspect_prompt
    except ImportError as e:
        raise UserError(f"`edgepeft inspect` is not available in this install ({e})") from e
    if is_adapter:
        report = inspect_prompt(args.model, base=args.base, top_k=args.top_k)
    else:
        report = inspect_model(args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


# ---------------------------------------------------------------- merge


def add_merge_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "merge",
        help="fold an adapter into its base and write a standard HF model folder",
        description="Fold an adapter into its base and write a standard HF model folder "
        f"(safetensors, config, tokenizer, {REPORT_FILE}).",
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    parser.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter folder (edgepeft or HF peft)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    parser.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="none",
        help="storage of the merged linear layers (default: none = full precision)",
    )
    parser.add_argument(
        "--base-quant",
        choices=QUANT_CHOICES,
        default=None,
        help="quantization the adapter was trained over (default: read from the adapter; "
        "'none' for HF peft folders)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype (default: float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def run_merge(args: argparse.Namespace) -> int:
    # lazy: torch and the model code load only for this command (`edgepeft --help` stays fast)
    import torch

    from edgepeft.adapters.peft_format import load_adapter, read_adapter
    from edgepeft.base import load_base
    from edgepeft.merge import merge

    adapter_dir, out = Path(args.adapter), Path(args.out)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist")
    if looks_like_path(args.base) and not Path(args.base).expanduser().is_dir():
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
        Path(args.base).expanduser() if looks_like_path(args.base) else args.base,
        quant=base_quant,
        compute_dtype=dtype,
    )
    load_adapter(model, adapter_dir, name=name)
    model, report = merge(model, name, quant=args.quant, inplace=True, keep_original=False)
    if args.quant != "none":
        # transformers 5 saves and reloads bitsandbytes layers given this config.
        model.config.quantization_config = bnb_config(model, args.quant)

    document = {
        **report.to_dict(),
        "base": str(args.base),
        "base_quant": base_quant,
        "adapter_dir": str(adapter_dir),
        "dtype": args.dtype,
        "saved_as": "full precision" if args.quant == "none" else f"bitsandbytes {args.quant}",
    }
    with atomic_folder(out) as folder:  # removed on failure and on SIGTERM / SIGINT
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(json.dumps(document, indent=2) + "\n")
    print(report)
    print(f"wrote {out}")
    return 0


def bnb_config(model, quant: str):
    """The quantization_config transformers needs to reload the bitsandbytes layers."""
    # lazy: called only by `merge`, after torch is loaded
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
