"""`export()`: a base (HF folder or loaded model) and its adapters as onnxruntime graphs.

export() runs these steps, each a function below:

    _request      options (a recipe, then explicit arguments), out/, the adapter folders
    _open_base    base ──load_base(quant: given, else the adapters' recorded one, else "none")──► model
                  (an adapter trained over an int4 base refuses a base quantized otherwise:
                   `_check_int4`; an int4 base loads whole, never streamed)
                  (an HF folder the fused builder takes is not loaded: stream.skeleton reads it
                   layer by layer while the graph is built, merging LoRA/DoRA/IA3 per layer;
                   `_streamed`); fingerprint(model), before any merge
    then, into a staging folder:
      ├─ no adapters  _export_base_alone ─► one graph                          out/
      ├─ "merged"     _export_merged: per adapter load_adapter ─► merge(quant="none") ─► graph
      │               ─► unmerge, delete_adapter                        out/<name>/, index in out/
      └─ "separate"   _export_separate ─► separate.export_separate: one base graph, adapter files
      _verify       each graph folder against PyTorch (verify.json, manifest "verify")
    _finish       one report over every graph; the staging folder becomes out/

    graph: model_type in FUSED_MODEL_TYPES ─► export_fused (contrib ops), else (or when the
           fused builder raises NotImplementedError) ─► export_generic (torch.onnx trace)
    each graph folder: model.onnx + .data, tokenizer files, edgepeft.json, verify.json,
        genai_config.json; last, every file's size and sha256 into edgepeft.json (finish.py)
    all of it is written in .<out>.<pid>.XXXX.tmp/ beside out/ and swapped in at the end
    (edgepeft.atomic.atomic_folder: removed on failure, SIGTERM, SIGINT; an existing out/
    is replaced only once the new one is whole)

A streamed base travels as `_Base.stream` (the LayerStream `skeleton` returned), passed
to the graph builders; the model object carries no export state.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgepeft import int4_base
from edgepeft.adapters import peft_types
from edgepeft.adapters.inject import delete_adapter, list_adapters
from edgepeft.adapters.peft_format import load_adapter, read_adapter
from edgepeft.atomic import atomic_folder
from edgepeft.base import base_info, fingerprint, load_base
from edgepeft.export import fused, model_facts
from edgepeft.export.channel_scales import calibration_ids
from edgepeft.export.finish import finish_graph_folder
from edgepeft.export.generic import export_generic
from edgepeft.export.manifest import (
    AdapterEntry,
    ExportIndex,
    Manifest,
    graph_fields,
    read_manifest,
    write_manifest,
)
from edgepeft.export.recipes import (  # noqa: F401  (re-exported: the old import path)
    RECIPE_KEYS,
    RECIPES_DIR,
    export_options,
    load_recipe,
    quantization_of,
    recipe_path,
)
from edgepeft.export.separate import export_separate
from edgepeft.export.stream import LayerStream, skeleton
from edgepeft.export.verify import verify as run_verify
from edgepeft.export.verify import write_report
from edgepeft.fold import merged_fingerprint
from edgepeft.merge import merge, unmerge
from edgepeft.vocab import BNB4_FORMATS, GRAPHS, MODES  # noqa: F401  (MODES: re-exported, the old import path)

log = logging.getLogger("edgepeft")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    graphs: dict[str, Path]
    """Adapter name ("" for a base alone) -> folder holding its model.onnx."""
    manifest: Manifest | ExportIndex
    verify: object | None
    """The VerifyReport of the check run at export time, or None."""

    def __str__(self) -> str:
        lines = [f"exported {len(self.graphs)} graph(s) to {self.out_dir}"]
        for name, folder in self.graphs.items():
            m = read_manifest(folder)
            lines.append(
                f"  {name or '(base)'}: {m.graph} graph, {m.weights} weights, {m.num_nodes} nodes "
                f"-> {folder / m.model_file}"
            )
        if self.verify is not None:
            lines.append(str(self.verify))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Request:
    """export()'s arguments, checked: what to write, and where."""

    out: Path
    options: dict
    """export_options: weights, mode, block_size, accuracy_level, max_context, ..."""
    graph: str
    folders: dict[str, Path]
    """Adapter name -> its folder."""
    separate: bool
    """Separate mode with something to switch (adapters, or lora_everywhere inputs)."""
    lora_everywhere: bool
    verify: bool
    overwrite: bool


@dataclass(frozen=True)
class _Base:
    """The base to export, loaded or streamed, and what every manifest says of it."""

    model: object
    stream: LayerStream | None
    """The LayerStream of a streamed (weightless) model; None for a loaded one."""
    tokenizer: object | None
    name: str
    quant: str
    fingerprint: str
    """Taken before any adapter is merged."""


# ---------------------------------------------------------------- step 1: the request


def _adapter_folders(adapters) -> dict[str, Path]:
    if adapters is None:
        return {}
    if isinstance(adapters, Mapping):
        folders = {str(k): Path(v).expanduser() for k, v in adapters.items()}
    elif isinstance(adapters, Sequence) and not isinstance(adapters, str):
        folders = {Path(v).expanduser().resolve().name: Path(v).expanduser() for v in adapters}
    else:
        raise TypeError(f"adapters must map names to folders (or list folders), got {adapters!r}")
    for name, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"adapter {name!r}: folder {folder} does not exist")
        if not name or "." in name or "/" in name:
            raise ValueError(f"adapter name {name!r} must be non-empty, without '.' or '/'")
    return folders


def _request(
    options: dict,
    out_dir,
    adapters,
    *,
    graph: str,
    overwrite: bool,
    lora_everywhere: bool,
    verify: bool,
) -> _Request:
    """Check the arguments before anything is loaded; an existing out_dir needs `overwrite`."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    folders = _adapter_folders(adapters)
    if lora_everywhere and options["mode"] != "separate":
        raise ValueError(
            "lora_everywhere=True needs mode='separate' (graph inputs for later adapters)"
        )
    return _Request(
        out=out,
        options=options,
        graph=graph,
        folders=folders,
        separate=options["mode"] == "separate" and bool(folders or lora_everywhere),
        lora_everywhere=lora_everywhere,
        verify=verify,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------- step 2: the base


def _base_quant(quant: str | None, folders: dict[str, Path]) -> str:
    """The given quant, else the one the adapters were trained over, else "none"."""
    if quant is not None:
        return quant
    recorded = {}
    for name, folder in folders.items():
        _, _, metadata = read_adapter(folder)
        if metadata.get("edgepeft_base_quant"):
            recorded[name] = metadata["edgepeft_base_quant"]
    if len(set(recorded.values())) > 1:
        raise ValueError(
            f"the adapters were trained over differently quantized bases ({recorded}); export "
            "them separately, or pass quant= to load the base one way for all"
        )
    return next(iter(recorded.values()), "none")


_STREAMED_MERGED = peft_types(streamed_merge=True)
"""Adapter kinds merged layer by layer while streaming (DoRA is LORA with use_dora)."""
_STREAMED_SEPARATE = peft_types(streamed_separate=True)
"""Adapter kinds a streamed separate export takes (not DoRA: its scale needs all base rows)."""


def _streamed(path: Path, quant: str, request: _Request):
    """(weightless base, the LayerStream reading its checkpoint) (export.stream), or None.

    Streamed: an HF folder whose architecture the fused builder takes, weights other
    than nf4/fp4 (those read bitsandbytes' codes of a loaded base), and adapters that
    only change linear layers inside the decoder layers. Anything else loads whole.
    """
    options, separate = request.options, request.separate
    if not path.is_dir() or request.graph == "generic" or options["weights"] in BNB4_FORMATS:
        return None
    allowed = _STREAMED_SEPARATE if separate else _STREAMED_MERGED
    for folder in request.folders.values():
        config, tensors, _ = read_adapter(folder)
        if config.peft_type not in allowed or getattr(config, "modules_to_save", None):
            return None
        if separate and getattr(config, "use_dora", False):
            return None
        if any(".layers." not in key for key in tensors):
            return None
    streamed = skeleton(path, quant=quant)
    if streamed is None:
        return None
    model, _ = streamed
    if getattr(model.config, "model_type", None) not in fused.FUSED_MODEL_TYPES:
        return None
    if fused.unsupported(model, options["weights"], options["accuracy_level"]) is not None:
        return None  # the generic exporter needs the loaded model
    return streamed


def _folder_tokenizer(path: Path):
    """The folder's tokenizer, as load_base finds it (None, with a warning, when it has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        log.warning("no tokenizer loaded from %s (%s)", path, e)
        return None


def _open_base(base, quant: str | None, tokenizer, request: _Request, say: Progress) -> _Base:
    """Stream or load a base folder (or hub id), or take a loaded model (copied for adapters)."""
    if not isinstance(base, (str, os.PathLike)):
        info = base_info(base)
        if quant is not None and quant != info.quant:
            raise ValueError(f"the loaded base is quantized {info.quant!r}; got quant={quant!r}")
        # Adapters are loaded onto a copy: the caller's model keeps its modules.
        model = copy.deepcopy(base) if request.folders else base
        return _Base(model, None, tokenizer, info.name_or_path, info.quant, fingerprint(model))
    base_quant = _base_quant(quant, request.folders)
    path = Path(base).expanduser()
    streamed = _streamed(path, base_quant, request)
    if streamed is not None:
        say(f"streaming base {base} layer by layer (quant {base_quant})")
        model, stream = streamed
        stream.progress = say
        loaded_tokenizer = _folder_tokenizer(path)
    else:
        say(f"loading base {base} (quant {base_quant})")
        model, loaded_tokenizer = load_base(path if path.is_dir() else str(base), quant=base_quant)
        stream = None
    name = str(path.resolve()) if path.is_dir() else str(base)
    return _Base(model, stream, tokenizer or loaded_tokenizer, name, base_quant, fingerprint(model))


def _check_int4(base: _Base, folders: dict[str, Path], say: Progress) -> None:
    """An adapter trained over an int4 base is exported over that base's very codes.

    Another quantization is refused (the adapter corrects the int4 codes' error, not
    another's); an int4 base whose codes differ from those recorded (another recipe, or a
    calibration that came out otherwise) is exported with a warning.
    """
    for name, folder in folders.items():
        _, _, metadata = read_adapter(folder)
        why = int4_base.mismatch(metadata, base.model, base.quant)
        if why is None:
            continue
        if base.quant != "int4":
            raise ValueError(
                f"adapter {name!r} ({folder}): {why}. Export it over the codes it was trained "
                "with: load the base with quant='int4' (the default when quant= is not given "
                "and the base is a folder), or retrain the adapter over this base"
            )
        say(f"warning: adapter {name!r}: {why}; the device will not compute what was trained")
        log.warning("adapter %r (%s): %s", name, folder, why)


# ---------------------------------------------------------------- step 3: the graphs


def _build_graph(model, stream, folder: Path, options: dict, graph: str, say: Progress, tokenizer):
    """Write model.onnx(.data) into `folder` with the fused or the generic builder."""
    kwargs = dict(
        block_size=options["block_size"],
        accuracy_level=options["accuracy_level"],
        quantization=quantization_of(options),
    )
    model_type = getattr(model.config, "model_type", None)
    level_int8 = _int8_level(options)
    if graph != "generic" and (graph == "fused" or model_type in fused.FUSED_MODEL_TYPES):
        int4 = options["weights"] == "int4"
        try:
            say(f"building fused graph ({model_type}, {options['weights']})")
            info = fused.export_fused(
                model,
                folder,
                options["weights"],
                stream=stream,
                calibration_ids=calibration_ids(tokenizer) if int4 else None,
                accuracy_level_int8=level_int8,
                **kwargs,
            )
            return info, "fused"
        except NotImplementedError as e:
            if graph == "fused":
                raise ValueError(f"no fused graph for this model: {e}") from e
            say(f"fused builder declined ({e}); using the generic exporter")
    if options["weights"] in BNB4_FORMATS:
        raise ValueError(
            f"weights={options['weights']!r} (exact bitsandbytes 4-bit, MatMulBnb4) needs the fused "
            f"builder, which {model_type!r} has not; export with weights='int4' instead"
        )
    if level_int8 is not None:
        raise ValueError(
            f"accuracy_level_int8={level_int8} (accuracy_level {options['accuracy_level']}) "
            f"needs the fused builder, which {model_type!r} has not; give one accuracy_level"
        )
    say(f"building generic graph ({model_type}, {options['weights']})")
    return export_generic(model, folder, options["weights"], progress=say, **kwargs), "generic"


def _int8_level(options: dict) -> int | None:
    """accuracy_level_int8 where it differs from accuracy_level, else None (one level)."""
    level = options.get("accuracy_level_int8")
    return None if level is None or level == options["accuracy_level"] else level


def _export_one(
    model,
    folder: Path,
    *,
    final: Path,
    base: _Base,
    request: _Request,
    adapters: list[AdapterEntry],
    say: Progress,
):
    """One graph folder (base alone, or one adapter merged in); returns its verify report."""
    options = request.options
    folder.mkdir(parents=True, exist_ok=True)
    info, kind = _build_graph(
        model, base.stream, folder, options, request.graph, say, base.tokenizer
    )
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(folder)
    manifest = Manifest(
        base=base.name,
        base_fingerprint=base.fingerprint,
        base_quant=base.quant,
        model_type=model.config.model_type,
        graph=kind,
        block_size=options["block_size"],
        accuracy_level=options["accuracy_level"],
        max_context=model_facts.max_context(model, options.get("max_context")),
        providers=options.get("providers"),
        mode="merged",
        adapters=adapters,
        **graph_fields(info),
        **model_facts.token_ids(model, base.tokenizer),
    )
    write_manifest(folder, manifest)
    report = None
    if request.verify:
        say("verifying against PyTorch")
        report = _verify(folder, final, model, base)
        write_manifest(folder, replace(manifest, verify=report.graphs[0].to_dict()))
    # graph metadata, genai_config.json, every file's size and sha256 (finish.py)
    finish_graph_folder(folder, config=model.config, progress=say)
    return report


def _export_base_alone(base: _Base, request: _Request, staging: Path, say: Progress):
    report = _export_one(
        base.model, staging, final=request.out, base=base, request=request, adapters=[], say=say
    )
    return {"": request.out}, [report]


def _merged_graph(
    base: _Base, request: _Request, name: str, folder: Path, staging: Path, say: Progress
):
    """Adapter `name` folded into the base and exported to staging/<name>; then removed again."""
    model, stream = base.model, base.stream
    load_adapter(model, folder, name=name)
    peft_type = list_adapters(model)[name].peft_type
    if stream is not None:  # folded layer by layer as the graph is built
        merged, merged_fp, folding = model, merged_fingerprint(model, name), stream.merging(name)
    else:
        quant = _fold_quant(base, model, name)
        merged, merge_report = merge(model, name, quant=quant, inplace=True)
        merged_fp, folding = merge_report.fingerprint, contextlib.nullcontext()
    entry = AdapterEntry(
        name=name, peft_type=peft_type, source=str(folder.resolve()), fingerprint=merged_fp
    )
    try:
        with folding:
            return _export_one(
                merged,
                staging / name,
                final=request.out / name,
                base=base,
                request=request,
                adapters=[entry],
                say=say,
            )
    finally:
        if stream is None:
            unmerge(merged)
        delete_adapter(model, name)


def _fold_quant(base: _Base, model, name: str) -> str:
    """merge()'s quant for adapter `name`: "int4" (the base's own codes, the update in float
    zero points: exact) for QA-LoRA over an int4 base, else "none" (fp32, rounded at export)."""
    qalora = getattr(list_adapters(model)[name], "use_qalora", False)
    return "int4" if qalora and base.quant == "int4" else "none"


def _export_merged(base: _Base, request: _Request, staging: Path, say: Progress):
    """One graph folder per adapter, and the index of the set in staging/edgepeft.json."""
    folders = request.folders
    graphs, reports = {}, []
    for i, (name, folder) in enumerate(folders.items(), 1):
        say(f"[{i}/{len(folders)}] merging adapter {name!r} from {folder}")
        reports.append(_merged_graph(base, request, name, folder, staging, say))
        graphs[name] = request.out / name
    index = ExportIndex(
        base=base.name,
        base_fingerprint=base.fingerprint,
        weights=request.options["weights"],
        graphs={name: name for name in folders},
    )
    write_manifest(staging, index)
    return graphs, reports


def _export_separate(base: _Base, request: _Request, staging: Path, say: Progress):
    """One base graph with adapter inputs and a switchable file per adapter (separate.py)."""
    model, options = base.model, request.options
    for name, folder in request.folders.items():
        if getattr(read_adapter(folder)[0], "use_qalora", False):
            raise ValueError(
                f"adapter {name!r} ({folder}) is QA-LoRA (use_qalora): separate mode does not "
                "export its input pooling; export it with mode='merged', which folds it exactly "
                "into an int4 base's zero points"
            )
    if _int8_level(options) is not None:
        raise ValueError(
            f"accuracy_level_int8={options['accuracy_level_int8']} is not supported in separate "
            f"mode yet; export separate graphs with one accuracy_level "
            f"(got {options['accuracy_level']}), or use mode='merged'"
        )
    export_separate(
        model,
        request.folders,
        staging,
        weights=options["weights"],
        block_size=options["block_size"],
        accuracy_level=options["accuracy_level"],
        max_context=model_facts.max_context(model, options.get("max_context")),
        tokenizer=base.tokenizer,
        base_fingerprint=base.fingerprint,
        progress=say,
        lora_everywhere=request.lora_everywhere,
        graph=request.graph,
        quantization=quantization_of(options),
        stream=base.stream,
    )
    reports = []
    if request.verify:
        say("verifying the base and every adapter file against PyTorch")
        reports.append(_verify(staging, request.out, model, base))
    finish_graph_folder(staging, config=model.config, progress=say)
    return {"": request.out}, reports


# ---------------------------------------------------------------- steps 4 and 5: verify, finish


def _verify(folder: Path, final: Path, model, base: _Base):
    """Check the graph folder against PyTorch; the report is written there, named for `final`."""
    # A streamed model holds no weights: verify then loads the reference from the manifest.
    reference = None if base.stream is not None else model
    report = replace(run_verify(folder, model=reference), export_dir=str(final))
    write_report(folder, report)  # named for where it will live
    return report


def _finish(reports: list, request: _Request, staging: Path):
    """One VerifyReport over every graph's check (named for the final folder), or None."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    first = reports[0]
    report = replace(
        first, export_dir=str(request.out), graphs=tuple(g for r in reports for g in r.graphs)
    )
    if request.folders and not request.separate:  # the set's index folder
        write_report(staging, report)
    return report


# ---------------------------------------------------------------- public API


def export(
    base,
    out_dir: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    weights: str | None = None,
    mode: str | None = None,
    *,
    quant: str | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    accuracy_level_int8: int | None = None,
    int4_method: str | None = None,
    mixed_precision: bool | None = None,
    activation_aware: bool | None = None,
    max_context: int | None = None,
    recipe: str | os.PathLike | None = None,
    verify: bool = True,
    graph: str = "auto",
    tokenizer=None,
    overwrite: bool = False,
    quiet: bool = False,
    lora_everywhere: bool = False,
) -> ExportResult:
    """Export a base model, alone or with adapters, as onnxruntime decoder graphs.

    Args:
        base: An HF model folder (or hub id), or a model already loaded (not changed).
        out_dir: Output folder; written in a temporary sibling and renamed at the end.
        adapters: name -> adapter folder (or a list of folders, named after them).
        weights: "int4" (default), "int8", "fp16", "fp32", or "nf4" / "fp4": bitsandbytes'
            own 4-bit codes through MatMulBnb4 (fused architectures; see bnb4.py). Exact to
            an NF4/FP4 base alone or in separate mode; in merged mode the merged weights
            are quantized again with bitsandbytes, so not exact to the trained base.
        mode: "merged" (default: one graph per adapter, adapter folded in) or "separate".
        quant: How to load a base folder: default the adapters' recorded base
            quantization, else "none". The graph is built from the dequantized weights.
        block_size: int4/int8 block size (default 32).
        accuracy_level: MatMulNBits compute type (default 4: int8 activations).
        accuracy_level_int8: That of the 8-bit MatMulNBits nodes (int4's mixed-precision
            tensors, the tied lm_head; default accuracy_level; fused graphs, merged mode).
            Recorded in the manifest's quantization entry.
        int4_method: "search" (default: each block's scale and zero point fitted to its
            error, asymmetric, uint8 zero points) or "rtn" (symmetric round-to-nearest,
            no zero points: the exporter's format before search became the default).
        mixed_precision: int4 exports store the tensors `weights.mixed_bits` names (tied
            embedding / lm_head, v_proj, some down_proj) in int8 (default True).
        activation_aware: int4 fused graphs of llama-family models scale input channels by
            their activation size, calibrated on a shipped public-domain text, before
            rounding (AWQ; export/channel_scales.py; default True; never with "rtn").
        max_context: Longest sequence the runtime should allow (default: the model's).
        recipe: A shipped recipe's name ("cpu-int4") or a TOML file (`recipe_path`) whose
            keys (weights, block_size, accuracy_level, mode, max_context, int4_method,
            mixed_precision, activation_aware) replace the defaults; explicit arguments win
            over it.
        verify: Compare every graph with PyTorch and store the numbers (verify.json,
            manifest "verify").
        graph: "auto" (fused where the architecture has a fused builder), "fused"
            or "generic".
        tokenizer: Tokenizer to ship with a loaded `base` (a folder brings its own).
        overwrite: Replace an existing `out_dir`.
        quiet: No progress lines on stderr.
        lora_everywhere: mode="separate" only: give every linear layer but lm_head rank-0
            LoRA inputs, so a LoRA adapter trained later over this base can be added with
            `export_adapter` (no new base graph); with no adapters the base alone is
            exported this way.

    Returns:
        ExportResult with the graph folders, the top manifest and the verify report.
    """
    say = (
        (lambda line: None)
        if quiet
        else (lambda line: print(f"export: {line}", file=sys.stderr, flush=True))
    )
    options = export_options(
        recipe,
        weights=weights,
        mode=mode,
        block_size=block_size,
        accuracy_level=accuracy_level,
        accuracy_level_int8=accuracy_level_int8,
        int4_method=int4_method,
        mixed_precision=mixed_precision,
        activation_aware=activation_aware,
        max_context=max_context,
    )
    request = _request(
        options,
        out_dir,
        adapters,
        graph=graph,
        overwrite=overwrite,
        lora_everywhere=lora_everywhere,
        verify=verify,
    )
    loaded = _open_base(base, quant, tokenizer, request, say)
    _check_int4(loaded, request.folders, say)
    if request.separate:
        step = _export_separate
    elif request.folders:
        step = _export_merged
    else:
        step = _export_base_alone
    # Removed if the export fails or is interrupted; a killed export's is removed next time.
    with atomic_folder(request.out, replace=request.overwrite) as staging:
        graphs, reports = step(loaded, request, staging, say)
        report = _finish(reports, request, staging)
    say(f"wrote {request.out}")
    manifest = read_manifest(request.out)
    return ExportResult(out_dir=request.out, graphs=graphs, manifest=manifest, verify=report)


__all__ = ["RECIPES_DIR", "ExportResult", "export", "load_recipe", "recipe_path"]
