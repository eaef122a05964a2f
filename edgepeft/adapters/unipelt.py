"""UniPELT (Mao et al., 2022; AdapterHub's `UniPELTConfig`): three parts, each behind a gate.

    g(u) = σ(u · w + b)   one scalar per token, from the gated part's own input u (gating_heads=1)

    attention   q_proj, v_proj:  y = W x + g(x) · s · B A x        s = lora_alpha / r, r = 8
                prefix: N = 10 learned key/value positions per layer (prompt.py's prefix, trained
                through Embedding ─► Linear (kv_dim → 512) ─► Tanh ─► Linear); query t weighs
                them by g(h_t), h_t the attention's input (after input_layernorm):

                    softmax(q_t k^T + bias)   bias_tj = log g(h_t) on the prefix columns j < N,
                                                        0 on the text's own columns

                i.e. each prefix column's unnormalised attention weight is scaled by g(h_t)
    FFN         mlp.down_proj ─► y ─► y' = y + g(y) · up(relu(down(y))),  width hidden // 16
                (a sequential Pfeiffer bottleneck, bottleneck.py's branch)

    x ──► base_layer (frozen, any quantization) ─────────────────────────┐
    │                                                                    + ──► y
    └──► A (r × in) ──► B (out × r) ──► × s ──► × σ(x · w + b) ──────────┘    (GatedLoraLayer)

The prefix gate lives beside each attention module (`self_attn.prefix_gate`, `PrefixGate`): a
forward pre-hook adds log g(h_t) to the prefix columns of the 4-D attention mask the layer
receives (turning transformers' boolean sdpa mask into an additive one, or building the causal
mask where it passes None). The prefix sits in cache columns 0..N-1 at every step, in PyTorch
as in the device graph (artifacts/kv_seed.py), so the same bias serves prefill and decode.
All parts are added, switched, trained and deleted together, and saved in one folder:

    adapter_config.json  {"peft_type": "UNIPELT", "r": 8, "lora_alpha": 8,
                          "target_modules": ["q_proj", "v_proj"], "num_virtual_tokens": 10,
                          "prefix_bottleneck": 512, "reduction_factor": 16,
                          "activation": "relu", "init": "zeros", "token_dim", "num_layers", ...}
    adapter_model.safetensors
        prompt_embeddings                                             (N, L*2*kv_dim): the MLP's output
        base_model.model.model.layers.<i>.self_attn.<q|v>_proj.lora_A.weight      (r, in)
                                                    ….lora_B.weight                (out, r)
                                                    ….lora_gate.{weight (1, in), bias (1,)}
        base_model.model.model.layers.<i>.self_attn.prefix_gate.{weight (1, hidden), bias (1,)}
        base_model.model.model.layers.<i>.mlp.down_proj.adapter_{down,up}.{weight,bias}
                                                    ….adapter_gate.{weight (1, hidden), bias (1,)}

As for prefix tuning, only the prefix MLP's output is saved; a loaded adapter holds it as a plain
tensor. Separate mode ships two files under the adapter's name: an .onnx_adapter (the gated LoRA
and bottleneck branches, the prefix gates, and `model.prefix_gate.columns`, N ones whose length
tells the graph which cache columns the prefix holds) and a .kvprefix.safetensors (the prefix);
the runtime loads them as one adapter. Every gate depends on the input: merging raises.

Where this differs from AdapterHub (adapters 1.3.0):
- Gates are per token. AdapterHub averages each gate over the sequence (mean over dim 1), so a
  token's output depends on later tokens and a full forward differs from cached decoding; it
  cannot run on a KV-cache device. Here g_t reads token t alone: causal, and prefill plus
  decode equals the full forward.
- The prefix gate. AdapterHub multiplies the prefix keys and values by the (averaged) gate; a
  per-token factor on keys that sit in the cache cannot be expressed once they are cached.
  edgepeft scales query t's unnormalised weights on the prefix columns by g_t instead (the
  log g_t bias above); the values are not scaled.
- LoRA scaling: AdapterHub's gated LoRA computes g · B A x, dropping alpha / r (its
  UniPELTConfig's alpha=2 changes nothing); edgepeft keeps s = lora_alpha / r, with alpha = r = 8
  by default, so s = 1 as there.
- Initialisation: gates as AdapterHub's (weight N(0, 0.02); the LoRA and prefix gates keep
  nn.Linear's bias init, the bottleneck gate's bias is 0), but the bottleneck's up projection
  starts at zero (AdapterHub's SeqBn "bert" init draws it from N(0, 0.02)), so LoRA and the
  bottleneck start as the identity.
- The prefix MLP and positions are prefix tuning's (see mam.py): (N, kv_heads * head_size)
  embeddings, text positions N..N+T-1. The bottleneck reads the FFN's output y alone (AdapterHub's
  SeqBn with original_ln_before=False, see bottleneck.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import edgepeft.adapters.prompt as prompt
from edgepeft.adapters.bottleneck import ACTIVATIONS, branch_layers
from edgepeft.adapters.layer import AdapterLayer, AdapterModule, MethodSpec
from edgepeft.adapters.targets import select_modules, wrap
from edgepeft.architectures import DecoderShape, require_architecture
from edgepeft.base import linear_features
from edgepeft.config import PrefixTuningConfig, UniPELTConfig

GATE_ATTRIBUTE = "prefix_gate"
"""The attribute of each attention module that holds its `PrefixGate`."""
INITS = ("zeros", "random")


def new_gate(features: int, device, init: str, zero_bias: bool) -> nn.Linear:
    """Linear(features, 1): g(u) = σ(gate(u)). AdapterHub's start (init "zeros"): weight
    N(0, 0.02), bias nn.Linear's U(±1/√features) or 0; "random": nn.Linear's own init."""
    gate = nn.Linear(features, 1, device=device)
    if init == "zeros":
        nn.init.normal_(gate.weight, std=0.02)
        if zero_bias:
            nn.init.zeros_(gate.bias)
    return gate


def _not_mergeable(name: str, part: str) -> TypeError:
    return TypeError(
        f"UniPELT adapter {name!r}: its {part} is multiplied by a gate σ(u · w + b) computed from "
        "each token's input (input-dependent gates), so no base weight update reproduces it and "
        "it cannot be merged; keep it separate (export supports that)"
    )


class GatedLoraLayer(AdapterLayer):
    """y = W x + σ(x · w + b) · s · B A x on one linear layer."""

    peft_type = "UNIPELT"
    adapter_attrs = ("lora_A", "lora_B", "lora_gate")
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_gate = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, config: UniPELTConfig) -> None:
        in_f, out_f = linear_features(self.innermost())
        device = next(self.innermost().parameters()).device
        A = nn.Linear(in_f, config.r, bias=False, device=device)  # Kaiming-uniform, as LoRA's
        B = nn.Linear(config.r, out_f, bias=False, device=device)
        if config.init == "zeros":
            nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_gate[name] = new_gate(in_f, device, config.init, zero_bias=False)
        self.scaling[name] = config.lora_alpha / config.r

    def forget(self, name: str) -> None:
        self.scaling.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return out
        A, B, gate = self.lora_A[name], self.lora_B[name], self.lora_gate[name]
        x_in = x.to(A.weight.dtype)
        delta = B(A(x_in)) * self.scaling[name]  # (..., in) -> (..., r) -> (..., out)
        return out + (torch.sigmoid(gate(x_in)) * delta).to(out.dtype)  # gate (..., 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise _not_mergeable(name, "LoRA update")

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        raise _not_mergeable(name, "LoRA update")


class GatedBottleneckLayer(AdapterLayer):
    """y' = y + σ(y · w + b) · up(act(down(y))) after the FFN's output projection."""

    peft_type = "UNIPELT"
    adapter_attrs = ("adapter_down", "adapter_up", "adapter_gate")
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_gate = nn.ModuleDict()
        self.activation: dict[str, str] = {}

    def add(self, name: str, config: UniPELTConfig, module_name: str = "") -> None:
        down, up = branch_layers(self.innermost(), config, f"UniPELT adapter {name!r}", module_name)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_gate[name] = new_gate(
            down.in_features, down.weight.device, config.init, zero_bias=True
        )
        self.activation[name] = config.activation

    def forget(self, name: str) -> None:
        self.activation.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return out
        down, up, gate = self.adapter_down[name], self.adapter_up[name], self.adapter_gate[name]
        y = out.to(down.weight.dtype)
        branch = up(ACTIVATIONS[self.activation[name]](down(y)))  # (..., d/rf) -> (..., d)
        return out + (torch.sigmoid(gate(y)) * branch).to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise _not_mergeable(name, "bottleneck branch")

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        raise _not_mergeable(name, "bottleneck branch")


def _before_attention(attention: nn.Module, args: tuple, kwargs: dict):
    # Looked up on the module it runs for, so a deep copy of the model uses its own gates.
    gate = getattr(attention, GATE_ATTRIBUTE, None)
    return None if gate is None else gate.before_attention(attention, args, kwargs)


def _mask_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the attention's scores will have (autocast's when it is on)."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class PrefixGate(AdapterModule):
    """One attention layer's prefix gates: query t's prefix columns get log σ(h_t · w + b)."""

    peft_type = "UNIPELT"
    adapter_attrs = ("gate",)
    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.ModuleDict()
        self.tokens: dict[str, int] = {}
        """name -> N, the prefix's cache columns 0..N-1 that the gate scales."""
        self._hook = None

    @classmethod
    def on(cls, attention: nn.Module) -> PrefixGate:
        """The attention module's gates, attached with their hook on first use."""
        module = getattr(attention, GATE_ATTRIBUTE, None)
        if module is None:
            module = cls()
            setattr(attention, GATE_ATTRIBUTE, module)
            module._hook = attention.register_forward_pre_hook(_before_attention, with_kwargs=True)
        return module

    def add(self, name: str, hidden: int, num_virtual_tokens: int, init: str, device) -> None:
        self.gate[name] = new_gate(hidden, device, init, zero_bias=False)
        self.tokens[name] = num_virtual_tokens

    def forget(self, name: str) -> None:
        self.tokens.pop(name, None)

    def detach_from(self, model: nn.Module) -> None:
        """Remove the hook and this module from its attention layer (no adapter left)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module in model.modules():
            if module is not self and getattr(module, GATE_ATTRIBUTE, None) is self:
                delattr(module, GATE_ATTRIBUTE)
                return

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        gate = self.gate[name]
        return {"weight": gate.weight, "bias": gate.bias}

    def delta_weight(self, name: str) -> torch.Tensor:
        raise _not_mergeable(name, "prefix's attention weight")

    def before_attention(self, attention: nn.Module, args: tuple, kwargs: dict):
        name = self.active
        if name is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, H)
        batch, length = hidden.shape[:2]
        n = self.tokens[name]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(attention.layer_idx) if cache is not None else 0
        if past < n:
            raise RuntimeError(
                f"UniPELT adapter {name!r}: attention layer {attention.layer_idx} sees {past} cached "
                f"positions, fewer than its {n} prefix positions; run the whole model with the "
                "adapter active (set_adapter), which puts the prefix in the cache"
            )
        gate = self.gate[name]
        log_gate = F.logsigmoid(gate(hidden.to(gate.weight.dtype)))  # (B, T, 1): log g_t
        dtype = _mask_dtype(hidden)
        mask = kwargs.get("attention_mask")
        if mask is None:  # transformers' "nothing masked": causal over [past | new]
            query = past + torch.arange(length, device=hidden.device)
            mask = (torch.arange(past + length, device=hidden.device) <= query[:, None])[None, None]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise TypeError(
                f"UniPELT adapter {name!r}: the prefix gate adds to a 4-D attention mask, got "
                f"{type(mask).__name__}; load the model with attn_implementation='sdpa' or 'eager'"
            )
        if mask.dtype == torch.bool:  # sdpa's "attend here" mask, as an additive one
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        mask = mask.to(dtype).expand(batch, mask.shape[1], length, mask.shape[-1])  # (B, h, T, K)
        bias = log_gate.to(dtype).unsqueeze(1)  # (B, 1, T, 1)
        mask = torch.cat([mask[..., :n] + bias, mask[..., n:]], dim=-1)
        return args, {**kwargs, "attention_mask": mask}


# ---------------------------------------------------------------- the method


def prefix_part(config: UniPELTConfig) -> PrefixTuningConfig:
    """The prefix-tuning config of UniPELT's prefix."""
    return PrefixTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        projection=True,
        projection_hidden=config.prefix_bottleneck,
        token_dim=config.token_dim,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
    )


def _check(config: UniPELTConfig) -> None:
    for field in ("r", "prefix_bottleneck", "reduction_factor"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"UniPELTConfig.{field} must be a positive int, got {value!r}")
    alpha = config.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"UniPELTConfig.lora_alpha must be a number, got {alpha!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"UniPELTConfig.activation must be one of {tuple(ACTIVATIONS)}, got {config.activation!r}"
        )
    if config.init not in INITS:
        raise ValueError(f"UniPELTConfig.init must be one of {INITS}, got {config.init!r}")


def resolve(model: nn.Module, config: UniPELTConfig) -> UniPELTConfig:
    """The config checked, with the LoRA targets and the prefix's model facts filled in."""
    _check(config)
    facts = prompt.resolve_prefix(model, prefix_part(config))
    targets = config.lora_targets
    if targets is None:
        targets = require_architecture(model.config.model_type, "UniPELT LoRA targets").lora_targets
    return dataclasses.replace(
        config,
        lora_targets=targets,
        token_dim=facts.token_dim,
        num_layers=facts.num_layers,
        num_attention_heads=facts.num_attention_heads,
    )


def attention_modules(model: nn.Module, what: str) -> list[str]:
    """The attention module of every decoder layer ("model.layers.i.self_attn")."""
    arch = require_architecture(model.config.model_type, "UniPELT prefix gate placement")
    return [n.rsplit(".", 1)[0] for n in select_modules(model, (arch.attention_output,), what=what)]


def inject(model: nn.Module, config: UniPELTConfig, name: str) -> list[str]:
    """Add every part of adapter `name`; returns the modules holding them."""
    what = f"UniPELT adapter {name!r}"
    arch = require_architecture(model.config.model_type, "UniPELT placement")
    text = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    hidden = DecoderShape.from_config(text).hidden
    device = model.get_input_embeddings().weight.device
    selected = prompt.inject_prefix(model, prefix_part(config), name)
    for path in attention_modules(model, what):
        PrefixGate.on(model.get_submodule(path)).add(
            name, hidden, config.num_virtual_tokens, config.init, device
        )
        selected.append(f"{path}.{GATE_ATTRIBUTE}")
    for module_name in select_modules(model, config.lora_targets, what=what):
        wrap(model, module_name, GatedLoraLayer).add(name, config)
        selected.append(module_name)
    for module_name in select_modules(model, (arch.ffn_output,), what=what):
        wrap(model, module_name, GatedBottleneckLayer).add(name, config, module_name)
        selected.append(module_name)
    return selected


def to_peft(config: UniPELTConfig) -> dict:
    targets = config.lora_targets
    return {
        **prompt.common_to_peft(config),
        "prefix_bottleneck": config.prefix_bottleneck,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": targets if isinstance(targets, str) or targets is None else list(targets),
        "reduction_factor": config.reduction_factor,
        "activation": config.activation,
        "init": config.init,
    }


def from_peft(data: dict) -> UniPELTConfig:
    prompt.check_common_peft(data)
    for key in ("num_virtual_tokens", "prefix_bottleneck", "r", "lora_alpha", "reduction_factor"):
        if key not in data:
            raise ValueError(f"UniPELT adapter config has no {key!r} field")
    targets = data.get("target_modules")
    config = UniPELTConfig(
        r=int(data["r"]),
        lora_alpha=data["lora_alpha"],
        lora_targets=targets if isinstance(targets, str) or targets is None else tuple(targets),
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        prefix_bottleneck=int(data["prefix_bottleneck"]),
        reduction_factor=data["reduction_factor"],
        activation=data.get("activation", "relu"),
        init=data.get("init", "zeros"),
        token_dim=prompt.optional_int(data, "token_dim"),
        num_layers=prompt.optional_int(data, "num_layers"),
        num_attention_heads=prompt.optional_int(data, "num_attention_heads"),
    )
    _check(config)
    return config


METHOD = MethodSpec(
    config_cls=UniPELTConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=False,
    # The gated branches and gates are graph inputs; the prefix goes beside them as a .kvprefix
    # file of the same name (export/separate.py), which the runtime loads with it.
    separate_file="onnx_adapter",
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("unipelt",),
)
