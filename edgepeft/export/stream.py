"""Stream an HF checkpoint into the graph builder one decoder layer at a time.

    HF folder: config.json + *.safetensors (one file or shards; fp32, fp16 or bf16)
        │ skeleton(): the model built from its config, every parameter an unread
        │ placeholder (torch.empty: address space, no resident memory); buffers such as
        │ rotary tables are real; nothing read yet
        ▼
    (model, stream: LayerStream)           export_fused(model, ..., stream=stream) brackets
        with stream.holding("model.layers.3"):              each part it emits:
            read that layer's tensors (plain file reads, no memory map) ─► fp32
            [quant nf4/fp4/int8: each linear through bitsandbytes, as load_base does;
             int4 is never streamed: `skeleton` returns None, the base loads whole]
            [stream.merging(name): each adapter stack folded, fold.py's per-module math]
            ... the builder quantizes and spools the layer to model.onnx.data ...
        └─ on exit the placeholders come back: the layer's memory is freed

What a streamed model computes is what `load_base(folder, quant)` (and `merge(...,
quant="none")`) would have held, tensor for tensor, so graphs are byte-identical; the
fingerprint is the same sampled hash of the same tensors, read one at a time. Adapters
load onto the skeleton as onto a loaded base: they are made on the placeholders' device
(CPU) and hold real tensors. Only the weights of a `holding` span may be read; the
exporter (api.py `_streamed`) takes only adapters that need no other base weight. The
stream is a value the exporter passes along, never an attribute of the model.

A checkpoint whose tensor names do not cover the model's parameters (renamed keys,
remote code) gives no skeleton: `skeleton` returns None and the caller loads it whole.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from edgepeft.base import (
    BaseInfo,
    base_info,
    is_linear_like,
    quantized_linear,
    set_submodule,
    weights_fingerprint,
)
from edgepeft.fold import FoldTarget, build_folded, stack_update, walk_stacks
from edgepeft.vocab import BNB4_FORMATS

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor in `file`."""
    length: int


class Checkpoint:
    """The tensors of a folder's *.safetensors files, read one at a time on request.

    Reads are plain file reads into a fresh buffer, not memory maps, so a tensor read
    and dropped leaves nothing resident in this process.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.entries: dict[str, _Entry] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():  # sharded: the index names the files that count
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} holds no *.safetensors file")
        for file in files:
            with open(file, "rb") as f:
                try:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
                except (struct.error, ValueError) as e:
                    raise ValueError(
                        f"{file} is not a readable safetensors file ({e}); re-download or re-save it"
                    ) from e
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"{file}: tensor {key!r} has dtype {info['dtype']}, which edgepeft does "
                        f"not read (supported: {sorted(_DTYPES)})"
                    )
                begin, end = info["data_offsets"]
                self.entries[key] = _Entry(
                    file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin
                )

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor `key` as a new tensor in `dtype` (None: as stored)."""
        if key not in self.entries:
            raise KeyError(f"tensor {key!r} is in no safetensors file of {self.folder}")
        entry = self.entries[key]
        buffer = bytearray(entry.length)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(buffer) != entry.length:
                raise ValueError(f"{entry.file} ends inside tensor {key!r}; the file is truncated")
        if not buffer:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            tensor = torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)
        return tensor if dtype is None or dtype == entry.dtype else tensor.to(dtype)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device; buffers stay real.

    A parameter is moved before its module initializes it, so its memory is never touched.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            moved = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = moved

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Lazy:
    """A checkpoint tensor that `weights_fingerprint` reads only when it hashes it."""

    def __init__(self, checkpoint: Checkpoint, key: str):
        self.checkpoint, self.key = checkpoint, key
        self.shape = torch.Size(checkpoint.shape(key))

    def detach(self) -> torch.Tensor:
        return self.checkpoint.read(self.key, dtype=None)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (full name, owning module, attribute) holding it (tied ones too)."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        path, _, attr = name.rpartition(".")
        found.setdefault(id(param), []).append((name, model.get_submodule(path), attr))
    return found


def _is_parameter(model: nn.Module, name: str) -> bool:
    path, _, attr = name.rpartition(".")
    return attr in model.get_submodule(path)._parameters


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    name = name.replace(".base_layer", "")
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class LayerStream:
    """Fills a skeleton's placeholder parameters from the checkpoint for the span of a `with`."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Checkpoint,
        keys: dict[int, str],
        quant: str,
        double_quant: bool,
        skip_modules: tuple[str, ...] = ("lm_head",),
    ):
        self.model = model
        self.checkpoint = checkpoint
        self.keys = keys
        """id(placeholder parameter) -> its checkpoint key."""
        self.quant = quant
        self.double_quant = double_quant
        self.skip_modules = skip_modules
        self.merge_adapter: str | None = None
        """Set while exporting one merged adapter: its stacks are folded as layers are read."""
        self.progress: Callable[[str], None] | None = None

    def _read(self, param: nn.Parameter) -> torch.Tensor:
        return self.checkpoint.read(self.keys[id(param)])

    def _quantize(self, prefixes, undo: list) -> None:
        """Linear layers become bitsandbytes layers from their fp32 weights, as load_base makes them."""
        for path, module in list(self.model.named_modules()):
            base_name = path.replace(".base_layer", "")
            if not (is_linear_like(module) and id(module.weight) in self.keys and _under(path, prefixes)):
                continue
            if any(base_name == s or base_name.endswith("." + s) for s in self.skip_modules):
                continue
            bias = self._read(module.bias) if module.bias is not None else None
            new = quantized_linear(
                self._read(module.weight), bias, self.quant, self.double_quant, torch.float32, "cpu"
            )
            new.train(module.training)
            for p in new.parameters():
                p.requires_grad_(False)
            set_submodule(self.model, path, new)
            undo.append((path, module))

    def _fill(self, prefixes, undo: list) -> None:
        for owners in _owners(self.model).values():
            first = owners[0][1]._parameters[owners[0][2]]
            if id(first) not in self.keys or not any(_under(name, prefixes) for name, _, _ in owners):
                continue
            value = nn.Parameter(self._read(first), requires_grad=False)
            for _, module, attr in owners:
                module._parameters[attr] = value
            undo.append((owners, first))

    def _merge(self, prefixes, undo: list) -> None:
        """Fold `merge_adapter` into each of its stacks under the prefixes (fold.py's math)."""
        info = base_info(self.model)
        target = FoldTarget(
            quant="none",
            base_quant=info.quant,
            double_quant=info.double_quant,
            dtype=torch.float32,
            head=self.model.get_output_embeddings(),
        )
        stacks, _ = walk_stacks(self.model)
        for stack in stacks:
            holders = [w for w in stack.wrappers if self.merge_adapter in w]
            if not holders or not _under(stack.path, prefixes):
                continue
            stack = replace(stack, holder=holders[0])
            new, _, _ = build_folded(stack.innermost, stack_update(stack, self.merge_adapter), target)
            undo.append((stack.path, self.model.get_submodule(stack.path)))
            set_submodule(self.model, stack.path, new)

    @contextmanager
    def merging(self, name: str) -> Iterator[None]:
        """Inside, every `holding` span also folds adapter `name` into its layers."""
        self.merge_adapter = name
        try:
            yield
        finally:
            self.merge_adapter = None

    @contextmanager
    def holding(self, *prefixes: str) -> Iterator[None]:
        """The modules named by `prefixes` (and below) hold their real weights inside."""
        modules: list = []
        params: list = []
        merged: list = []
        try:
            if self.quant != "none":
                self._quantize(prefixes, modules)
            self._fill(prefixes, params)
            if self.merge_adapter is not None:
                self._merge(prefixes, merged)
            yield
        finally:
            for path, old in reversed(merged):
                set_submodule(self.model, path, old)
            for owners, placeholder in reversed(params):
                for _, module, attr in owners:
                    module._parameters[attr] = placeholder
            for path, old in reversed(modules):
                set_submodule(self.model, path, old)


def skeleton(
    folder: str | Path, quant: str = "none", double_quant: bool = True
) -> tuple[nn.Module, LayerStream] | None:
    """The model of an HF folder with no weights read, and the stream that reads them on demand.

    Returns (model, stream): the model eval, frozen, `edgepeft_base` recorded as `load_base`
    records it; pass the stream to `export_fused(..., stream=stream)`. None when the
    checkpoint's tensor names do not cover the model's parameters, or the config needs
    remote code, or quant is "int4": load it whole then (an int4 base calibrates its channel
    scales over every layer before it rounds the first, so one layer at a time cannot make
    the same codes; `load_base(quant="int4")` does, deterministically).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if quant == "int4":
        return None
    folder = Path(folder)
    checkpoint = Checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except ValueError:  # an architecture transformers does not know without remote code
        return None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    keys: dict[int, str] = {}
    for owners in _owners(model).values():
        name = next((n for n, _, _ in owners if n in checkpoint), None)
        param = owners[0][1]._parameters[owners[0][2]]
        if name is None or checkpoint.shape(name) != tuple(param.shape):
            return None
        # Untouched memory: adapters see a CPU model, yet nothing is resident.
        placeholder = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=False)
        for _, module, attr in owners:
            module._parameters[attr] = placeholder
        keys[id(placeholder)] = name
    named = []
    for name, tensor in model.state_dict().items():
        param_key = keys.get(id(model.get_parameter(name))) if _is_parameter(model, name) else None
        if param_key is not None:
            named.append((name, _Lazy(checkpoint, param_key)))
            continue
        if name in checkpoint:  # a persistent buffer the checkpoint sets
            path, _, attr = name.rpartition(".")
            owner = model.get_submodule(path)
            owner._buffers[attr] = checkpoint.read(name, dtype=None).to(tensor.dtype)
            tensor = owner._buffers[attr]
        named.append((name, tensor))
    fp = weights_fingerprint(model.config.to_dict(), named)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.edgepeft_base = BaseInfo(
        name_or_path=str(folder),
        fingerprint=fp,
        quant=quant,
        double_quant=double_quant and quant in BNB4_FORMATS,
        compute_dtype="float32",
    )
    return model, LayerStream(model, checkpoint, keys, quant, double_quant)


__all__ = ["Checkpoint", "LayerStream", "skeleton"]
