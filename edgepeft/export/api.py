"""`export()`: a base (HF folder or loaded model) and its adapters as onnxruntime graphs.

    base ──load_base(quant: given, else the adapters' recorded one, else "none")──► model
        (an HF folder the fused builder takes is not loaded: stream.skeleton reads it layer
         by layer while the graph is built, merging LoRA/DoRA/IA3 per layer; `_streamed`)
        │ fingerprint(model), before any merge
        ├─ no adapters  ─► one graph                                 out/
        ├─ "merged"     ─► per adapter: load_adapter ─► merge(quant="none") ─► graph
        │                  ─► unmerge, delete_adapter                 out/<name>/, index in out/
        └─ "separate"   ─► edgepeft.export.separate.export_separate (hook, below)
    graph: model_type in FUSED_MODEL_TYPES ─► export_fused (contrib ops), else (or when the
           fused builder raises NotImplementedError) ─► export_generic (torch.onnx trace)
    each graph folder: model.onnx + .data, tokenizer files, edgepeft.json, verify.json,
        genai_config.json; last, every file's size and sha256 into edgepeft.json (finish.py)
    all of it is written in .<out>.<pid>.XXXX.tmp/ beside out/ and renamed into place at
    the end (edgepeft.atomic.staging_folder: removed on failure, SIGTERM, SIGINT)

Separate-mode hook: a module `edgepeft/export/separate.py` defining
`export_separate(model, adapters: dict[str, Path], out_dir: Path, *, weights, block_size,
accuracy_level, max_context, tokenizer, base_fingerprint, progress) -> None` that writes
the whole folder (graph, adapter files, edgepeft.json) into `out_dir` (the staging
folder); until it exists, mode="separate" raises ValueError.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edgepeft.atomic import staging_folder
from edgepeft.export.finish import finish_graph_folder
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
from edgepeft.vocab import GRAPHS, MODES  # noqa: F401  (MODES: re-exported, the old import path)

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


# ---------------------------------------------------------------- options


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


def _base_quant(quant: str | None, folders: dict[str, Path]) -> str:
    """The given quant, else the one the adapters were trained over, else "none"."""
    if quant is not None:
        return quant
    from edgepeft.adapters.peft_format import read_adapter

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


# ---------------------------------------------------------------- streaming

_STREAMED_MERGED = ("LORA", "IA3")
"""Adapter kinds merged layer by layer while streaming (DoRA is LORA with use_dora)."""
_STREAMED_SEPARATE = ("LORA", "IA3", "BOTTLENECK")
"""Adapter kinds a streamed separate export takes (not DoRA: its scale needs all base rows)."""


def _streamed(path: Path, quant: str, folders: dict[str, Path], options, graph, separate):
    """A weightless base that streams its checkpoint (edgepeft.export.stream), or None.

    Streamed: an HF folder whose architecture the fused builder takes, weights other
    than nf4/fp4 (those read bitsandbytes' codes of a loaded base), and adapters that
    only change linear layers inside the decoder layers. Anything else loads whole.
    """
    if not path.is_dir() or graph == "generic" or options["weights"] in ("nf4", "fp4"):
        return None
    from edgepeft.adapters.peft_format import read_adapter
    from edgepeft.export import fused
    from edgepeft.export.stream import skeleton

    allowed = _STREAMED_SEPARATE if separate else _STREAMED_MERGED
    for folder in folders.values():
        config, tensors, _ = read_adapter(folder)
        if config.peft_type not in allowed or getattr(config, "modules_to_save", None):
            return None
        if separate and getattr(config, "use_dora", False):
            return None
        if any(".layers." not in key for key in tensors):
            return None
    model = skeleton(path, quant=quant)
    if model is None or getattr(model.config, "model_type", None) not in fused.FUSED_MODEL_TYPES:
        return None
    if fused.unsupported(model, options["weights"], options["accuracy_level"]) is not None:
        return None  # the generic exporter needs the loaded model
    return model


def _folder_tokenizer(path: Path):
    """The folder's tokenizer, as load_base finds it (None, with a warning, when it has none)."""
    import logging

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        logging.getLogger("edgepeft").warning("no tokenizer loaded from %s (%s)", path, e)
        return None


def _merged_fingerprint(model, name: str) -> str:
    """The fingerprint merge(model, name) would give the merged model, nothing merged."""
    from edgepeft.adapters.inject import list_adapters
    from edgepeft.base import base_info
    from edgepeft.merge import _merged_fingerprint as derived
    from edgepeft.merge import _plan

    return derived(base_info(model).fingerprint, name, list_adapters(model)[name], _plan(model, name))


# ---------------------------------------------------------------- one graph


def _build_graph(model, folder: Path, options: dict, graph: str, say: Progress):
    """Write model.onnx(.data) into `folder` with the fused or the generic builder."""
    from edgepeft.export.generic import export_generic

    kwargs = dict(
        block_size=options["block_size"],
        accuracy_level=options["accuracy_level"],
        quantization=quantization_of(options),
    )
    model_type = getattr(model.config, "model_type", None)
    if graph != "generic":
        from edgepeft.export import fused

        if graph == "fused" or model_type in fused.FUSED_MODEL_TYPES:
            try:
                say(f"building fused graph ({model_type}, {options['weights']})")
                return fused.export_fused(model, folder, options["weights"], **kwargs), "fused"
            except NotImplementedError as e:
                if graph == "fused":
                    raise ValueError(f"no fused graph for this model: {e}") from e
                say(f"fused builder declined ({e}); using the generic exporter")
    if options["weights"] in ("nf4", "fp4"):
        raise ValueError(
            f"weights={options['weights']!r} (exact bitsandbytes 4-bit, MatMulBnb4) needs the fused "
            f"builder, which {model_type!r} has not; export with weights='int4' instead"
        )
    say(f"building generic graph ({model_type}, {options['weights']})")
    return export_generic(model, folder, options["weights"], progress=say, **kwargs), "generic"


def _token_ids(model, tokenizer) -> dict:
    config = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    return dict(eos_token_id=eos, bos_token_id=getattr(config, "bos_token_id", None), pad_token_id=pad)


def _max_context(model, requested: int | None) -> int | None:
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if requested is None:
        return limit
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_context {requested} exceeds the model's {limit} positions; pass at most {limit}"
        )
    return requested


def _export_one(
    model,
    folder: Path,
    *,
    final: Path,
    options: dict,
    graph: str,
    tokenizer,
    base: str,
    base_fingerprint: str,
    base_quant: str,
    adapters: list[AdapterEntry],
    verify: bool,
    say: Progress,
) -> tuple[Manifest, object | None]:
    folder.mkdir(parents=True, exist_ok=True)
    info, kind = _build_graph(model, folder, options, graph, say)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = Manifest(
        base=base,
        base_fingerprint=base_fingerprint,
        base_quant=base_quant,
        model_type=model.config.model_type,
        graph=kind,
        block_size=options["block_size"],
        accuracy_level=options["accuracy_level"],
        max_context=_max_context(model, options.get("max_context")),
        providers=options.get("providers"),
        mode="merged",
        adapters=adapters,
        **graph_fields(info),
        **_token_ids(model, tokenizer),
    )
    write_manifest(folder, manifest)
    report = None
    if verify:
        from edgepeft.export.verify import verify as run_verify
        from edgepeft.export.verify import write_report

        say("verifying against PyTorch")
        # A streamed model holds no weights: verify loads the reference from the manifest.
        reference = None if getattr(model, "edgepeft_stream", None) is not None else model
        report = replace(run_verify(folder, model=reference), export_dir=str(final))
        write_report(folder, report)  # named for where it will live
        manifest = replace(manifest, verify=report.graphs[0].to_dict())
        write_manifest(folder, manifest)
    # graph metadata, genai_config.json, every file's size and sha256 (finish.py)
    manifest = finish_graph_folder(folder, config=model.config, progress=say)
    return manifest, report


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
    int4_method: str | None = None,
    mixed_precision: bool | None = None,
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
        int4_method: "search" (default: each block's scale and zero point fitted to its
            error, asymmetric, uint8 zero points) or "rtn" (symmetric round-to-nearest,
            no zero points: the exporter's format before search became the default).
        mixed_precision: int4 exports store the tensors `weights.mixed_bits` names (tied
            embedding / lm_head, v_proj, some down_proj) in int8 (default True).
        max_context: Longest sequence the runtime should allow (default: the model's).
        recipe: A shipped recipe's name ("cpu-int4") or a TOML file (`recipe_path`) whose
            keys (weights, block_size, accuracy_level, mode, max_context, int4_method,
            mixed_precision) replace the
            defaults; explicit arguments win over it.
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
    from edgepeft.adapters.inject import delete_adapter, list_adapters
    from edgepeft.adapters.peft_format import load_adapter
    from edgepeft.base import base_info, fingerprint, load_base
    from edgepeft.merge import merge, unmerge

    say = (lambda line: None) if quiet else (lambda line: print(f"export: {line}", file=sys.stderr, flush=True))
    options = export_options(
        recipe,
        weights=weights,
        mode=mode,
        block_size=block_size,
        accuracy_level=accuracy_level,
        int4_method=int4_method,
        mixed_precision=mixed_precision,
        max_context=max_context,
    )
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    folders = _adapter_folders(adapters)
    if lora_everywhere and options["mode"] != "separate":
        raise ValueError("lora_everywhere=True needs mode='separate' (graph inputs for later adapters)")
    separate = options["mode"] == "separate" and (folders or lora_everywhere)

    if isinstance(base, (str, os.PathLike)):
        base_quant = _base_quant(quant, folders)
        path = Path(base).expanduser()
        model = _streamed(path, base_quant, folders, options, graph, separate)
        if model is not None:
            say(f"streaming base {base} layer by layer (quant {base_quant})")
            model.edgepeft_stream.progress = say
            loaded_tokenizer = _folder_tokenizer(path)
        else:
            say(f"loading base {base} (quant {base_quant})")
            model, loaded_tokenizer = load_base(path if path.is_dir() else str(base), quant=base_quant)
        tokenizer = tokenizer or loaded_tokenizer
        base_name = str(path.resolve()) if path.is_dir() else str(base)
    else:
        info = base_info(base)
        if quant is not None and quant != info.quant:
            raise ValueError(f"the loaded base is quantized {info.quant!r}; got quant={quant!r}")
        # Adapters are loaded onto a copy: the caller's model keeps its modules.
        model = copy.deepcopy(base) if folders else base
        base_quant, base_name = info.quant, info.name_or_path
    base_fp = fingerprint(model)

    # Removed if the export fails or is interrupted; a killed export's is removed here.
    with staging_folder(out) as staging:
        common = dict(
            options=options,
            graph=graph,
            tokenizer=tokenizer,
            base=base_name,
            base_fingerprint=base_fp,
            base_quant=base_quant,
            verify=verify,
            say=say,
        )
        reports, graphs = [], {}
        if separate:
            from edgepeft.export.separate import export_separate

            export_separate(
                model,
                folders,
                staging,
                weights=options["weights"],
                block_size=options["block_size"],
                accuracy_level=options["accuracy_level"],
                max_context=_max_context(model, options.get("max_context")),
                tokenizer=tokenizer,
                base_fingerprint=base_fp,
                progress=say,
                lora_everywhere=lora_everywhere,
                graph=graph,
                quantization=quantization_of(options),
            )
            graphs[""] = out
            if verify:
                from edgepeft.export.verify import verify as run_verify
                from edgepeft.export.verify import write_report

                say("verifying the base and every adapter file against PyTorch")
                # A streamed skeleton holds no weights: verify then loads the base itself.
                streamed = getattr(model, "edgepeft_stream", None) is not None
                report = run_verify(staging, model=None if streamed else model)
                report = replace(report, export_dir=str(out))
                write_report(staging, report)
                reports.append(report)
            finish_graph_folder(staging, config=model.config, progress=say)
        elif not folders:
            _, report = _export_one(model, staging, final=out, adapters=[], **common)
            reports.append(report)
            graphs[""] = out
        else:
            for i, (name, folder) in enumerate(folders.items(), 1):
                say(f"[{i}/{len(folders)}] merging adapter {name!r} from {folder}")
                load_adapter(model, folder, name=name)
                peft_type = list_adapters(model)[name].peft_type
                stream = getattr(model, "edgepeft_stream", None)
                if stream is not None:  # folded layer by layer as the graph is built
                    merged, merged_fp = model, _merged_fingerprint(model, name)
                    stream.merge_adapter = name
                else:
                    merged, merge_report = merge(model, name, quant="none", inplace=True)
                    merged_fp = merge_report.fingerprint
                entry = AdapterEntry(
                    name=name,
                    peft_type=peft_type,
                    source=str(folder.resolve()),
                    fingerprint=merged_fp,
                )
                try:
                    _, report = _export_one(
                        merged, staging / name, final=out / name, adapters=[entry], **common
                    )
                finally:
                    if stream is not None:
                        stream.merge_adapter = None
                    else:
                        unmerge(merged)
                    delete_adapter(model, name)
                reports.append(report)
                graphs[name] = out / name
            index = ExportIndex(
                base=base_name,
                base_fingerprint=base_fp,
                weights=options["weights"],
                graphs={name: name for name in folders},
            )
            write_manifest(staging, index)
        report = _combined(reports, out)
        if report is not None and folders and not separate:  # the set's index folder
            from edgepeft.export.verify import write_report

            write_report(staging, report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    say(f"wrote {out}")
    return ExportResult(out_dir=out, graphs=graphs, manifest=read_manifest(out), verify=report)


def _combined(reports: list, out: Path):
    """One VerifyReport over every graph's check (named for the final folder)."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    first = reports[0]
    return replace(
        first, export_dir=str(out), graphs=tuple(g for r in reports for g in r.graphs)
    )


__all__ = ["RECIPES_DIR", "ExportResult", "export", "load_recipe", "recipe_path"]
