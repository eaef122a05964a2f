"""The frozen base: load, quantize with bitsandbytes, freeze, fingerprint.

    HF folder / hub id ──from_pretrained (safetensors only)──► fp model
        │ fingerprint(weights as stored)     recorded before any rounding
        ▼
    quantize_linears(quant)    nn.Linear / GPT-2 Conv1D ─► bnb Linear4bit | Linear8bitLt
        ▼
    freeze ─► (model, tokenizer), model.edgepeft_base = BaseInfo(...)

Every other part of edgepeft reads a layer's weight through `dequantized_weight`,
so adapters never branch on the quantization backend.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from edgepeft.int4_base import Int4Linear
from edgepeft.vocab import BNB4_FORMATS, QUANTS

log = logging.getLogger("edgepeft")

Quant = Literal["nf4", "fp4", "int8", "int4", "none"]
"""`load_base`'s quant argument: one of `edgepeft.vocab.QUANTS`."""


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter must know about the base it was trained on."""

    name_or_path: str
    fingerprint: str
    quant: str
    double_quant: bool
    compute_dtype: str


# ---------------------------------------------------------------- layer access


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a [train] dependency
        return None
    return Conv1D


def bitsandbytes():
    """The bitsandbytes module, imported on first use (it is slow to import and CPU-noisy)."""
    # On AVX512-BF16 CPUs bnb warns at import that an optional bf16 kernel package is
    # missing; edgepeft turns that bf16 path off for its layers (`quantized_linear`).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


_bnb = bitsandbytes  # old private name, kept for callers not yet moved


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing x @ W^T + b that an adapter can wrap (incl. bnb and GPT-2 Conv1D)."""
    conv1d = _conv1d_type()
    return isinstance(module, (nn.Linear, Int4Linear)) or (
        conv1d is not None and isinstance(module, conv1d)
    )


def is_quantized(module: nn.Module) -> bool:
    if isinstance(module, Int4Linear):
        return True
    bnb = bitsandbytes()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a new fp32 tensor of shape (out, in), whatever its storage."""
    if isinstance(module, Int4Linear):  # dequant(codes) / s: what its forward computes with
        return module.weight
    bnb = bitsandbytes()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        w = bnb.functional.dequantize_4bit(*canonical_4bit(weight))
    elif isinstance(module, bnb.nn.Linear8bitLt):
        # LLM.int8 stores row-wise absmax scales beside the int8 codes.
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        w = weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    elif is_linear_like(module) and not isinstance(module, nn.Linear):
        w = weight.detach().t()  # Conv1D keeps (in, out)
    else:
        w = weight.detach()
    return w.to(torch.float32).clone()


def canonical_4bit(weight) -> tuple[torch.Tensor, object]:
    """(codes, quant_state) of a Params4bit in bnb's standard layout, the layer untouched.

    On CPUs with AVX512-BF16, bnb repacks a Linear4bit that runs an eval forward
    (layers made by transformers; edgepeft's own opt out) into a kernel layout with
    (K/blocksize, N) bf16 absmax. bnb's inverse leaves that absmax transposed, so
    it is restored here on a copy.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    state = copy.copy(state)
    state.original_nested = False  # keep the bf16 absmax the layer now computes with
    codes, state = bitsandbytes().functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = state.absmax.t().reshape(-1).float()  # (K/bs, N) -> blockwise order
    return codes, state


_canonical_4bit = canonical_4bit  # old private name, kept for callers not yet moved


def is_conv1d_origin(module: nn.Module) -> bool:
    """True for GPT-2 Conv1D layers, also after quantization turned them into Linear."""
    conv1d = _conv1d_type()
    return (conv1d is not None and isinstance(module, conv1d)) or getattr(
        module, "edgepeft_conv1d", False
    )


# ---------------------------------------------------------------- quantization


def quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A bitsandbytes layer holding `weight` (out, in) quantized on `device`."""
    bnb = bitsandbytes()
    out_f, in_f = weight.shape
    if quant in BNB4_FORMATS:
        layer = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant,
            device="meta",
        )
        # Otherwise, on CPUs with AVX512-BF16, bnb repacks the weight at the first eval
        # forward and from then on computes in bf16 whatever compute_dtype says.
        layer.support_avx512bf16_for_cpu = False
        layer.weight = bnb.nn.Params4bit(
            weight.detach().to(torch.float32 if compute_dtype == torch.float32 else compute_dtype),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant,
        )
    elif quant == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(
            weight.detach().to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False
        )
    elif quant == "int4":
        raise ValueError(
            "an int4 layer is made by load_base(quant='int4') (calibrated channel scales, "
            "per-layer bits), not from one weight: merge with quant='none' and export with "
            "weights='int4'"
        )
    else:
        raise ValueError(f"quant must be one of {QUANTS[:-1]} here, got {quant!r}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


_quantized_linear = quantized_linear  # old private name, kept for callers not yet moved


def quantize_linears(
    model: nn.Module,
    quant: str,
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> int:
    """Replace every linear-like layer (but `skip_modules`) by a bitsandbytes one, in place.

    Returns the number of layers replaced.
    """
    device = torch.device(device)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_linear_like(module) or is_quantized(module):
            continue
        if any(name == s or name.endswith("." + s) for s in skip_modules):
            continue
        bias = module.bias if module.bias is not None else None
        new = quantized_linear(
            dequantized_weight(module), bias, quant, double_quant, compute_dtype, device
        )
        # A new module starts in training mode; bnb's int8 matmul computes differently there.
        new.train(module.training)
        if not isinstance(module, nn.Linear):
            new.edgepeft_conv1d = True  # remembers GPT-2's (in, out) layout for merges
        set_submodule(model, name, new)
        replaced += 1
    return replaced


@torch.no_grad()
def quantize_int4(model: nn.Module, tokenizer, skip_modules: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every linear layer (but `skip_modules`) by an Int4Linear, in place, on CPU.

    The channel scales are calibrated first on the model's fp32 weights (the int4 export's
    calibration); then each layer is quantized and its fp32 weight dropped. lm_head (tied:
    the embedding table) keeps fp32 storage holding the export's int8 values: training sees
    the table the device looks up and multiplies with, at the memory an nf4 base spends on
    it. Sets `model.edgepeft_int4` (`int4_base.Int4Base`); returns the layers replaced.
    """
    from edgepeft import int4_base

    model.to(device="cpu", dtype=torch.float32)  # one set of codes, whatever the device
    num_layers = model.config.get_text_config().num_hidden_layers
    scales, skipped = int4_base.calibrate_scales(
        model, tokenizer, lambda name: dequantized_weight(model.get_submodule(name))
    )
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_linear_like(module) or is_quantized(module):
            continue
        if any(name == s or name.endswith("." + s) for s in skip_modules):
            continue
        new = Int4Linear.quantize(
            dequantized_weight(module),
            module.bias,
            int4_base.stored_bits(name, num_layers),
            int4_base.member_scale(scales, name),
        )
        new.train(module.training)
        if not isinstance(module, nn.Linear):
            new.edgepeft_conv1d = True  # remembers GPT-2's (in, out) layout for merges
        set_submodule(model, name, new)  # the fp32 layer goes with its last reference
        replaced += 1
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, Int4Linear):
        int4_base.round_table(head.weight, num_layers)
    model.edgepeft_int4 = int4_base.Int4Base(
        int4_base.RECIPE, int4_base.BLOCK_SIZE, scales, skipped
    )
    return replaced


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---------------------------------------------------------------- fingerprint

_SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(config_dict: dict, named_tensors) -> str:
    """Stable 16-hex-digit id of a checkpoint: shape-defining config + sampled weights.

    Sampled values are hashed as fp32, so the same checkpoint loaded in bf16 or
    fp32 gives the same id; any fine-tune or merge that moves the sampled weights
    gives another.
    """
    h = hashlib.sha256()
    keep = {
        k: v
        for k, v in sorted(config_dict.items())
        if isinstance(v, (int, float, str, bool)) and not k.startswith("_")
        and k not in {"transformers_version", "torch_dtype", "dtype", "use_cache"}
    }
    h.update(json.dumps(keep, sort_keys=True).encode())
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        if flat.numel() > _SAMPLES_PER_TENSOR:
            idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
            # fp32 linspace rounds n - 1 up to n past 2^24 elements (a 151936 x 896
            # embedding); clamping keeps every smaller tensor's samples, so its id, as before.
            flat = flat[idx.clamp_(max=flat.numel() - 1)]
        h.update(flat.to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base's own weights by their original names, quantized layers dequantized.

    Adapter modules (`edgepeft.adapters.layer.AdapterModule`) are seen through: their
    wrapper-internal ".base_layer" drops out of the names and the tensors in their
    `adapter_attrs` containers are left out. That class attribute is the whole protocol
    read here, so the base never imports the adapters built on top of it.
    """
    skip_prefixes = []
    out: list[tuple[str, torch.Tensor]] = []
    for path, module in model.named_modules():
        if _is_adapter(module):
            skip_prefixes.extend(f"{path}.{a}." for a in module.adapter_attrs)
    for path, module in model.named_modules():
        clean = path.replace(".base_layer", "")
        if any(f"{path}.".startswith(p) for p in skip_prefixes) or _is_adapter(module):
            continue
        if is_quantized(module):
            out.append((f"{clean}.weight", dequantized_weight(module)))
            if module.bias is not None:
                out.append((f"{clean}.bias", module.bias))
            continue
        for pname, p in module.named_parameters(recurse=False):
            out.append((f"{clean}.{pname}" if clean else pname, p))
    return out


def _is_adapter(module: nn.Module) -> bool:
    return getattr(type(module), "adapter_attrs", None) is not None


def fingerprint(model: nn.Module) -> str:
    """The base's fingerprint: the one `load_base` recorded, else computed now.

    For a model quantized outside edgepeft the quantized layers are hashed through
    their dequantized weights, so that id differs from the checkpoint's.
    """
    info = getattr(model, "edgepeft_base", None)
    if info is not None:
        return info.fingerprint
    return weights_fingerprint(model.config.to_dict(), base_named_tensors(model))


def base_info(model: nn.Module) -> BaseInfo:
    info = getattr(model, "edgepeft_base", None)
    if info is not None:
        return info
    quantized = [m for m in model.modules() if is_quantized(m)]
    quant = "none"
    if quantized:
        q = quantized[0]
        if isinstance(q, Int4Linear):
            quant = "int4"
        elif isinstance(q, bitsandbytes().nn.Linear8bitLt):
            quant = "int8"
        else:
            quant = q.weight.quant_type
    info = BaseInfo(
        name_or_path=str(getattr(model.config, "_name_or_path", "") or ""),
        fingerprint=fingerprint(model),
        quant=quant,
        double_quant=bool(quantized and getattr(quantized[0].weight, "compress_statistics", False)),
        compute_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    model.edgepeft_base = info
    return info


# ---------------------------------------------------------------- loading


def _default_compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _check_local_folder(path: Path) -> None:
    """Refuse pickled checkpoints and name the file when safetensors are unreadable."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise FileNotFoundError(
            f"{path} holds {what}; edgepeft loads safetensors only and never unpickles. "
            "Convert the checkpoint with `model.save_pretrained(dir, safe_serialization=True)` "
            "in a trusted environment."
        )
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(
                f"{shard} is not a readable safetensors file ({e}); re-download or re-save it"
            ) from e


def load_base(
    name_or_path: str | os.PathLike,
    quant: Quant = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    skip_modules: tuple[str, ...] = ("lm_head",),
):
    """Load a causal LM, quantize its linear layers, freeze everything.

    Args:
        name_or_path: Local HF model folder or hub id.
        quant: "nf4" / "fp4" (4-bit, QLoRA), "int8" (LLM.int8), "int4" (the int4 export's
            own codes, so `export(weights="int4")` runs what was trained: int4_base.py)
            or "none".
        double_quant: Quantize the 4-bit absmax statistics too (saves ~0.4 bit/param).
        compute_dtype: Dtype of activations and unquantized weights; default fp32 on
            CPU, bf16 (or fp16) on CUDA.
        device: "cpu", "cuda", ...; default CUDA when present.
        trust_remote_code: Run modelling code shipped with the checkpoint. Off by default.
        skip_modules: Linear layers kept unquantized (embeddings are never quantized).

    Returns:
        (model, tokenizer); the tokenizer is None when the folder has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = compute_dtype or _default_compute_dtype(device)

    path = Path(name_or_path)
    if path.is_dir():
        _check_local_folder(path)
        source = str(path)
    else:
        source = _resolve_hub_id(str(name_or_path))

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    fp = weights_fingerprint(
        model.config.to_dict(), [(n, t) for n, t in model.state_dict().items()]
    )
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer loaded from %s (%s)", name_or_path, e)
    if quant == "none":
        model.to(device=device, dtype=compute_dtype)
    elif quant == "int4":
        quantize_int4(model, tokenizer, skip_modules)
        model.to(device=device, dtype=compute_dtype)  # Int4Linear keeps its state fp32
    else:
        # Unquantized parts (embeddings, norms, lm_head) live in compute_dtype on the device.
        model.to(dtype=compute_dtype)
        quantize_linears(
            model,
            quant,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device=device,
            skip_modules=skip_modules,
        )
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.edgepeft_base = BaseInfo(
        name_or_path=str(name_or_path),
        fingerprint=fp,
        quant=quant,
        double_quant=double_quant and quant in BNB4_FORMATS,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
    )
    log.info("%s", describe_base(model))
    return model, tokenizer


def _resolve_hub_id(hub_id: str) -> str:
    """Download (or find in the cache) a hub checkpoint; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:
        raise OSError(
            f"could not fetch {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without network access, download it elsewhere and pass the local folder path."
        ) from e
    _check_local_folder(Path(folder))
    return folder


# ---------------------------------------------------------------- reporting


@dataclass(frozen=True)
class BaseReport:
    total_params: int
    quantized_layers: int
    linear_layers: int
    weight_bytes: int
    quant: str

    def __str__(self) -> str:
        return (
            f"base: {self.total_params / 1e6:.2f}M params, {self.quantized_layers}/"
            f"{self.linear_layers} linear layers quantized ({self.quant}), "
            f"{self.weight_bytes / 2**20:.1f} MiB of weights"
        )


def _param_count(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit codes per byte; count logical parameters.
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def _quantization_statistics(p: torch.Tensor) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps beside a quantized weight (they are no parameters or buffers).

    4-bit: absmax and code table, with double quant also the nested absmax, code
    table and offset; int8: the fp32 per-row scales (SCB).
    """
    found = [getattr(p, "SCB", None)]
    state = getattr(p, "quant_state", None)
    if state is not None:
        found += [state.absmax, state.code, state.offset]
        if state.state2 is not None:
            found += [state.state2.absmax, state.state2.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def describe_base(model: nn.Module) -> BaseReport:
    """Parameter count and bytes actually held by the base weights (quantization included)."""
    seen: set[int] = set()
    total = nbytes = 0
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    packed = {id(m.codes) for m in int4}  # bytes, not parameters: counted below
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue  # tied embeddings count once
        seen.add(id(t))
        nbytes += t.numel() * t.element_size()
        total += _param_count(t) if isinstance(t, nn.Parameter) and id(t) not in packed else 0
        for extra in _quantization_statistics(t):
            if id(extra) not in seen:
                seen.add(id(extra))
                nbytes += extra.numel() * extra.element_size()
    total += sum(m.in_features * m.out_features for m in int4)  # Int4Linear's logical weights
    linear = [m for m in model.modules() if is_linear_like(m)]
    quantized = [m for m in linear if is_quantized(m)]
    info = getattr(model, "edgepeft_base", None)
    return BaseReport(
        total_params=total,
        quantized_layers=len(quantized),
        linear_layers=len(linear),
        weight_bytes=nbytes,
        quant=info.quant if info else ("mixed" if quantized else "none"),
    )
