"""Check an export against PyTorch: each graph (check_graph), then the folder (verify).

    export dir ─manifest─► onnxruntime side (sides.py)        PyTorch side (reference.py)
        prompts (inputs.py) ─► passes (passes.py) ─► metrics (compare.py) ─► GraphCheck
        int8/int4 generic graphs: also against the export's dequantized weights (dequantized.py)
    per folder: one graph; a merged set (each sub-export with its own merged reference);
    separate (the base, then each adapter file) ─► VerifyReport ─► verify.json + verify.md

One case cannot be left padded: a prompt-tuned prefix on a graph with learned absolute
positions (GPT-2, generic): there every prompt is compared alone, unpadded, at batch 1
(`batched` False in its check).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from edgepeft.adapters.inject import set_adapter
from edgepeft.adapters.peft_format import load_adapter
from edgepeft.artifacts.manifest import ExportIndex, Manifest, read_manifest
from edgepeft.export.generic import CacheContract, plain_fp32_copy
from edgepeft.export.verify import adapter_paths
from edgepeft.export.verify.compare import (
    first_non_finite,
    kl_and_top1,
    logit_scale,
    max_diff,
    perplexity,
)
from edgepeft.export.verify.criteria import criteria_key
from edgepeft.export.verify.dequantized import exported_weights, holding_weights
from edgepeft.export.verify.inputs import prompt_batch, text_ids, unpadded_rows
from edgepeft.export.verify.passes import continuations, run_pass, run_side, token_rows
from edgepeft.export.verify.reference import load_export_base, load_reference
from edgepeft.export.verify.report import (
    REFERENCE_PER_PROMPT,
    GraphCheck,
    VerifyReport,
    write_report,
)
from edgepeft.export.verify.sides import OrtPrefixSide, OrtSide, TorchSide


def check_graph(
    folder: str | os.PathLike,
    model,
    *,
    name: str = "",
    prompts=None,
    max_new_tokens: int = 8,
    text=None,
    adapter_file: str | os.PathLike | None = None,
    prefix_file: str | os.PathLike | None = None,
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
        prefix_file: A hybrid adapter's (MAM's) KV-prefix part, seeded at prefill while
            `adapter_file`, its graph-input part, is active.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"{folder} holds a set of graphs; check each of {list(manifest.graphs)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids, mask = prompt_batch(folder, manifest, prompts)
    text_tokens = text_ids(folder, manifest, text)
    path = folder / manifest.model_file
    contract = CacheContract(plain_fp32_copy(model)).eval()
    reference = TorchSide(contract, manifest)
    if prefix_file is not None:
        ort_side = OrtPrefixSide(path, manifest, Path(prefix_file), Path(adapter_file))
    elif adapter_file is not None and adapter_paths.is_kv_prefix_file(adapter_file):
        ort_side = OrtPrefixSide(path, manifest, Path(adapter_file))
    else:
        ort_side = OrtSide(path, manifest, None if adapter_file is None else Path(adapter_file))
    steps = max_new_tokens - 1
    batched = not (isinstance(ort_side, OrtPrefixSide) and ort_side.rows_alone(mask))
    batches = [(ids, mask)] if batched else unpadded_rows(ids, mask)
    runs = [run_pass(reference, ort_side, b_ids, b_mask, steps) for b_ids, b_mask in batches]
    prefill, decode = max_diff(runs)
    scale, non_finite = logit_scale(runs), first_non_finite(runs, batched)
    kl, top1_agree, top1_total = kl_and_top1(runs)
    agree = sum(
        int((a == b).sum()) for r in runs for a, b in zip(r.ort_tokens, r.tokens, strict=True)
    )
    greedy_match = sum(
        int((np.stack(r.free_tokens, 1) == np.stack(r.tokens, 1)).all(1).sum()) for r in runs
    )
    if batched:  # what a runtime replaying one prompt at a time must produce
        reference_tokens = continuations(reference, ids, mask, steps)
        ort_alone = continuations(ort_side, ids, mask, steps)
    else:  # the passes already ran each prompt alone
        reference_tokens = [t for r in runs for t in token_rows(r.tokens)]
        ort_alone = [t for r in runs for t in token_rows(r.free_tokens)]

    perplexities = (None, None)
    if text_tokens is not None:
        perplexities = (perplexity(reference, text_tokens), perplexity(ort_side, text_tokens))

    dequant = (None, None)
    if manifest.weights in ("int8", "int4"):
        weights = exported_weights(path, contract)
        if weights is not None:
            with holding_weights(contract, weights):
                exact = [run_side(reference, r.ids, r.mask, steps, r.tokens)[0] for r in runs]
            dequant = max_diff(runs, against=exact)
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
        perplexity_tokens=None if text_tokens is None else int(text_tokens.shape[1]),
        adapter_file=None if adapter_file is None else str(adapter_file),
        dequant_prefill_max_abs_diff=dequant[0],
        dequant_decode_max_abs_diff=dequant[1],
        batched=batched,
        reference_tokens=tuple(reference_tokens),
        reference_tokens_mode=REFERENCE_PER_PROMPT,
        row_greedy_match=sum(a == b for a, b in zip(ort_alone, reference_tokens, strict=True)),
    )


def check_separate(export_dir: Path, manifest: Manifest, model, **kwargs):
    """The base graph with no adapter active, then each adapter file (or KV prefix) in turn."""
    base = model if model is not None else load_export_base(manifest)
    checks = [check_graph(export_dir, base, name="", **kwargs)]
    for entry in manifest.adapters:
        # an .onnx_adapter, or a KV prefix (entry.file)
        file = adapter_paths.adapter_file(export_dir, entry)
        adapted = copy.deepcopy(base)  # the caller's model never gets adapters
        load_adapter(adapted, entry.source, name=entry.name)
        set_adapter(adapted, entry.name)
        # a hybrid (MAM) has both: its graph inputs (file) and its KV prefix
        prefix = export_dir / entry.prefix_file if getattr(entry, "prefix_file", None) else None
        checks.append(
            check_graph(
                export_dir, adapted, name=entry.name, adapter_file=file, prefix_file=prefix, **kwargs
            )
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
        checks, skipped = check_separate(export_dir, manifest, model, **common)
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
    ids, mask = prompt_batch(prompt_folder, first, prompts)
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
