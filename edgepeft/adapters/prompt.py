"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021).

Both change what the model sees, not one layer, so one model-level module,
`model.edgepeft_prompts`, holds every such adapter and two hooks on the causal LM
rewrite its inputs while one of them is active:

    prompt tuning   input_ids ──embed──► [P_1..P_N | x_1..x_T] ──► model ──► logits[:, N:]
                    attention_mask ──► [1 x N | mask]      labels ──► [-100 x N | labels]

    prefix tuning   flat (N, L*2*H*D) ──view──► layer l: K_l, V_l (B, H, N, D)
                    ──► DynamicCache as the forward's cache; positions start at N
                    attention_mask ──► [1 x N | mask]

Everything matches HF peft's PeftModelForCausalLM, except that prompt tuning drops
the N virtual positions from the logits so the output has the caller's length.
With `projection=True` a prefix is trained through peft's MLP
(embedding (N, token_dim) ─► Linear ─► Tanh ─► Linear); only the MLP's output is
saved ("prompt_embeddings", as peft saves it), and a loaded prefix is that output
as a plain tensor. Neither method changes a weight, so neither can be merged.
P-tuning (p_tuning.py) is prompt tuning whose table comes out of a trained encoder; it
comes in through `add_virtual_prompt` and is saved, loaded and exported as prompt tuning.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from edgepeft.adapters.layer import AdapterModule, MethodSpec
from edgepeft.architectures import DecoderShape
from edgepeft.base import base_info
from edgepeft.config import PrefixTuningConfig, PromptTuningConfig
from edgepeft.kv_cache_keyword import find_cache, put_cache

ATTRIBUTE = "edgepeft_prompts"
"""Name of the module on the causal LM that holds every prompt/prefix adapter."""

SAVED_KEY = "prompt_embeddings"
"""peft's key for a prompt-learning adapter's one tensor."""


@dataclass(frozen=True)
class _Plan:
    """How adapter `name` feeds the model: the shapes its flat tensor unfolds to."""

    method: Literal["prompt", "prefix"]
    num_virtual_tokens: int
    num_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0


class PrefixProjection(nn.Module):
    """peft's reparameterisation: N trained vectors through Linear ─► Tanh ─► Linear."""

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, out: int, device) -> None:
        super().__init__()
        # nn.Embedding's own init (standard normal), as peft's Embedding starts.
        self.embedding = nn.Parameter(torch.randn(num_tokens, token_dim, device=device))
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, hidden, device=device),
            nn.Tanh(),
            nn.Linear(hidden, out, device=device),
        )

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)  # (N, L*2*H*D)


class VirtualTokens(AdapterModule):
    """Every prompt- and prefix-tuning adapter of one model, and the hooks that apply them."""

    peft_type = "PROMPT_LEARNING"
    adapter_attrs = ("embeddings", "projections")
    model_level = True
    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ParameterDict()
        """name -> (N, token_dim) prompts, or (N, L*2*H*D) prefixes."""
        self.projections = nn.ModuleDict()
        """name -> a module whose forward() gives the flat tensor: PrefixProjection (prefixes
        trained with `projection=True`) or p-tuning's PromptEncoder."""
        self.plans: dict[str, _Plan] = {}
        self._hooks: list = []
        self._keep_last: int | None = None  # caller's length, set per forward by prompt tuning
        self._as_tuple = False

    # ---- lifecycle

    @classmethod
    def on(cls, model: nn.Module) -> VirtualTokens:
        """The model's module, attached with its hooks on first use."""
        module = getattr(model, ATTRIBUTE, None)
        if module is None:
            module = cls()
            setattr(model, ATTRIBUTE, module)
            # Module-level hooks that look the module up on the model they run for,
            # so a deep copy of the model uses its own copy of the adapters.
            module._hooks = [
                model.register_forward_pre_hook(_before_forward, with_kwargs=True),
                model.register_forward_hook(_after_forward),
            ]
        return module

    def detach_from(self, model: nn.Module) -> None:
        """Remove the hooks and this module from `model` (it holds no adapter any more)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if getattr(model, ATTRIBUTE, None) is self:
            delattr(model, ATTRIBUTE)

    def forget(self, name: str) -> None:
        self.plans.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        kind = "prefix" if self.plans[name].method == "prefix" else "prompt"
        raise TypeError(
            f"adapter {name!r} is {kind} tuning: it adds virtual tokens and changes no weight, so it "
            "cannot be merged; keep it separate (export supports that)"
        )

    # ---- tensors

    def flat(self, name: str) -> torch.Tensor:
        """What peft saves: (N, token_dim) prompts or (N, L*2*H*D) prefixes."""
        if name in self.projections:
            return self.projections[name]()
        return self.embeddings[name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        encoder = self.projections[name] if name in self.projections else None
        if encoder is None or not encoder.training:
            return {SAVED_KEY: self.flat(name)}
        # What is saved is the encoder's output without dropout (p-tuning's LSTM has some):
        # a dropout sample in the file would be noise on every request.
        encoder.eval()
        try:
            return {SAVED_KEY: self.flat(name)}
        finally:
            encoder.train()

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        value = tensors[SAVED_KEY]
        if name not in self.projections:
            super().load_tensors(name, tensors)
            return
        # A saved prefix is the MLP's output; it cannot be turned back into MLP
        # weights, so the adapter becomes that output, as peft loads it.
        projection = self.projections[name]
        trainable = projection.embedding.requires_grad
        del self.projections[name]
        self.embeddings[name] = nn.Parameter(
            value.detach().to(device=projection.embedding.device, dtype=torch.float32).clone(),
            requires_grad=trainable,
        )

    # ---- the hooks

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict):
        self._keep_last, self._as_tuple = None, False
        name = self.active
        if name is None:
            return None
        plan = self.plans[name]
        n = plan.num_virtual_tokens
        kwargs = {**_positional_as_keywords(model, args), **kwargs}  # a new dict: caller's untouched
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if tokens is None:
            raise ValueError(f"adapter {name!r} needs input_ids or inputs_embeds; got neither")
        batch, length = tokens.shape[:2]

        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"adapter {name!r} extends a 2-D (batch, length) attention_mask by its "
                    f"{n} virtual tokens; got shape {tuple(mask.shape)}. Pass a 2-D mask."
                )
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        kwargs.pop("token_type_ids", None)  # peft drops them too: they would miss N positions

        if kwargs.get("position_ids") is not None:
            # As peft: a prefix shifts the caller's positions by N; prompt tuning drops
            # them, so positions follow the cache (0..N+T-1 over prompt and input).
            kwargs["position_ids"] = kwargs["position_ids"] + n if plan.method == "prefix" else None

        cache, _ = find_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return (), kwargs  # a later generation step: the virtual tokens sit in the cache
        if plan.method == "prefix":
            put_cache(model, kwargs, self._prefix_cache(model, name, batch, cache))
            return (), kwargs

        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, D)
        prompts = self.flat(name).to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, N, D)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, N+T, D)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        if not return_dict:  # trim on the ModelOutput, then give the caller its tuple
            kwargs["return_dict"], self._as_tuple = True, True
        self._keep_last = length
        return (), kwargs

    def after_forward(self, model: nn.Module, output):
        keep, as_tuple = self._keep_last, self._as_tuple
        self._keep_last, self._as_tuple = None, False
        if keep is None:
            return None
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[1] > keep:
            output.logits = logits[:, -keep:]  # (B, T, V): the caller's positions only
        return output.to_tuple() if as_tuple else output

    def _prefix_cache(self, model: nn.Module, name: str, batch: int, cache):
        """A cache holding adapter `name`'s keys and values (the caller's empty one, if given)."""
        from transformers import DynamicCache

        plan = self.plans[name]
        n, layers, heads, head_dim = plan.num_virtual_tokens, plan.num_layers, plan.kv_heads, plan.head_dim
        dtype = model.get_input_embeddings().weight.dtype
        # peft's layout of the flat dim: (layer, key|value, head, head_dim).
        kv = self.flat(name).to(dtype).view(n, layers, 2, heads, head_dim)
        kv = kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, N, D)
        if cache is None:
            cache = DynamicCache(config=model.config)
        for layer in range(layers):
            keys = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H, N, D)
            values = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(keys, values, layer)
        return cache


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    module = getattr(model, ATTRIBUTE, None)
    return None if module is None else module.before_forward(model, args, kwargs)


def _after_forward(model: nn.Module, args: tuple, output):
    module = getattr(model, ATTRIBUTE, None)
    return None if module is None else module.after_forward(model, output)


def _positional_as_keywords(model: nn.Module, args: tuple) -> dict:
    if not args:
        return {}
    names = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}"
        )
    return dict(zip(names, args, strict=False))


# ---------------------------------------------------------------- model facts


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_fact(config, field: str, value: int, method: str):
    """Fill `field` from the model; a value already set (from a folder) must agree."""
    given = getattr(config, field)
    if given is not None and given != value:
        raise ValueError(
            f"{method} adapter has {field}={given}, but this model needs {field}={value}; "
            "it was made for another architecture: load it onto its own base"
        )
    return value


def _check_tokens(config) -> None:
    if config.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be at least 1, got {config.num_virtual_tokens}")


def prompt_facts(model: nn.Module, config, method: str) -> dict[str, int]:
    """token_dim (the hidden size), num_layers and num_attention_heads, as peft records them
    for methods that prepend input embeddings; values `config` already holds must agree."""
    _check_tokens(config)
    text = DecoderShape.from_config(_text_config(model))
    facts = {"token_dim": text.hidden, "num_layers": text.layers, "num_attention_heads": text.heads}
    return {k: _check_fact(config, k, v, method) for k, v in facts.items()}


def resolve_prompt(model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
    """The config with the model facts peft records (token_dim, num_layers, heads)."""
    if config.init == "text" and not config.init_text:
        raise ValueError('prompt tuning with init="text" needs init_text (the text to start from)')
    resolved = prompt_facts(model, config, "prompt tuning")
    if config.init == "text" and config.tokenizer_name_or_path is None:
        # peft insists on a tokenizer path with text init; the base's folder holds it.
        resolved["tokenizer_name_or_path"] = base_info(model).name_or_path or None
    return dataclasses.replace(config, **resolved)


def resolve_prefix(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """The config with peft's key/value facts: token_dim = kv heads x head size."""
    _check_tokens(config)
    text = DecoderShape.from_config(_text_config(model))
    facts = {
        "token_dim": text.kv_heads * text.head_dim,
        "num_layers": text.layers,
        "num_attention_heads": text.kv_heads,
    }
    resolved = {k: _check_fact(config, k, v, "prefix tuning") for k, v in facts.items()}
    if config.projection_hidden is None:
        resolved["projection_hidden"] = resolved["token_dim"]
    return dataclasses.replace(config, **resolved)


# ---------------------------------------------------------------- injection


def _initial_prompts(
    config: PromptTuningConfig, embeddings: nn.Embedding, tokenizer, name: str
) -> torch.Tensor:
    """(N, token_dim) fp32 starting prompts."""
    n = config.num_virtual_tokens
    device = embeddings.weight.device
    if config.init == "random":
        return torch.randn(n, config.token_dim, device=device)  # nn.Embedding's init, as peft
    if config.init == "vocab":
        ids = torch.randint(0, embeddings.num_embeddings, (n,), device=device)
    else:
        if tokenizer is None:
            raise ValueError(
                f'prompt tuning adapter {name!r} has init="text" but no tokenizer was given; '
                "pass tokenizer= to add_adapter (load_base returns one), or use init='vocab'"
            )
        text_ids = list(tokenizer(config.init_text)["input_ids"])
        if not text_ids:
            raise ValueError(f"init_text {config.init_text!r} tokenizes to no tokens")
        repeats = -(-n // len(text_ids))
        ids = torch.tensor((text_ids * repeats)[:n], device=device)
    with torch.no_grad():
        return embeddings(ids).detach().float().clone()


def add_virtual_prompt(
    model: nn.Module, name: str, num_virtual_tokens: int, source: nn.Parameter | nn.Module
) -> list[str]:
    """Put adapter `name` on `model` as N input embeddings prepended to every input.

    `source` is the (N, token_dim) table itself (prompt tuning) or a module whose `forward()`
    returns it (p-tuning's encoder, which is what trains; only its output is saved).
    Returns the one module the adapter lives in.
    """
    module = VirtualTokens.on(model)
    if isinstance(source, nn.Parameter):
        module.embeddings[name] = source
    else:
        module.projections[name] = source
    module.plans[name] = _Plan("prompt", num_virtual_tokens)
    return [ATTRIBUTE]


def inject_prompt(model: nn.Module, config: PromptTuningConfig, name: str, tokenizer=None) -> list[str]:
    """Add prompt-tuning adapter `name`; returns the one module it lives in."""
    prompts = _initial_prompts(config, model.get_input_embeddings(), tokenizer, name)
    return add_virtual_prompt(model, name, config.num_virtual_tokens, nn.Parameter(prompts))


def inject_prefix(model: nn.Module, config: PrefixTuningConfig, name: str) -> list[str]:
    """Add prefix-tuning adapter `name`; returns the one module it lives in."""
    n, token_dim, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
    width = layers * 2 * token_dim
    device = model.get_input_embeddings().weight.device
    module = VirtualTokens.on(model)
    if config.projection:
        module.projections[name] = PrefixProjection(
            n, token_dim, config.projection_hidden, width, device
        )
    else:
        module.embeddings[name] = nn.Parameter(torch.randn(n, width, device=device))
    module.plans[name] = _Plan(
        "prefix",
        n,
        num_layers=layers,
        kv_heads=config.num_attention_heads,
        head_dim=token_dim // config.num_attention_heads,
    )
    return [ATTRIBUTE]


# ---------------------------------------------------------------- HF peft JSON

_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def common_to_peft(config) -> dict:
    """The adapter_config.json fields every prompt-learning method writes."""
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": config.token_dim,
        "num_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_transformer_submodules": 1,
        "modules_to_save": None,
    }


def check_common_peft(data: dict) -> None:
    """Refuse prompt-learning folders for setups edgepeft does not run."""
    submodules = data.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise ValueError(
            f"num_transformer_submodules={submodules} is for encoder-decoder models; "
            "edgepeft adapts causal LMs (1)"
        )
    if data.get("modules_to_save"):
        raise ValueError(
            f"modules_to_save={data['modules_to_save']!r} beside a prompt-learning adapter is "
            "not implemented in edgepeft"
        )


def optional_int(data: dict, key: str) -> int | None:
    return None if data.get(key) is None else int(data[key])


def prompt_to_peft(config: PromptTuningConfig) -> dict:
    return {
        **common_to_peft(config),
        "prompt_tuning_init": _PEFT_INIT[config.init],
        "prompt_tuning_init_text": config.init_text,
        "tokenizer_name_or_path": config.tokenizer_name_or_path,
        "tokenizer_kwargs": None,
    }


def prompt_from_peft(data: dict) -> PromptTuningConfig:
    check_common_peft(data)
    init = data.get("prompt_tuning_init", "RANDOM")
    by_peft_name = {v: k for k, v in _PEFT_INIT.items()}
    if init not in by_peft_name:
        raise ValueError(
            f"prompt_tuning_init={init!r} is not supported; expected one of {sorted(by_peft_name)}"
        )
    # A folder's values replace any initialisation, so text init is read as "random":
    # loading then needs no tokenizer. The text and tokenizer stay recorded.
    return PromptTuningConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        init="random" if init == "TEXT" else by_peft_name[init],
        init_text=data.get("prompt_tuning_init_text"),
        tokenizer_name_or_path=data.get("tokenizer_name_or_path"),
        token_dim=optional_int(data, "token_dim"),
        num_layers=optional_int(data, "num_layers"),
        num_attention_heads=optional_int(data, "num_attention_heads"),
    )


def prefix_to_peft(config: PrefixTuningConfig) -> dict:
    return {
        **common_to_peft(config),
        "prefix_projection": config.projection,
        "encoder_hidden_size": config.projection_hidden,
        "init_weights": None,
    }


def prefix_from_peft(data: dict) -> PrefixTuningConfig:
    # init_weights ("zero") only sets starting values, which the folder's replace.
    check_common_peft(data)
    return PrefixTuningConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        projection=bool(data.get("prefix_projection", False)),
        projection_hidden=optional_int(data, "encoder_hidden_size"),
        token_dim=optional_int(data, "token_dim"),
        num_layers=optional_int(data, "num_layers"),
        num_attention_heads=optional_int(data, "num_attention_heads"),
    )


PROMPT_METHOD = MethodSpec(
    config_cls=PromptTuningConfig,
    resolve=resolve_prompt,
    inject=inject_prompt,
    to_peft=prompt_to_peft,
    from_peft=prompt_from_peft,
    mergeable=VirtualTokens.mergeable,
    separate_file="kv_prefix",
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("prompt",),
)
PREFIX_METHOD = MethodSpec(
    config_cls=PrefixTuningConfig,
    resolve=resolve_prefix,
    inject=inject_prefix,
    to_peft=prefix_to_peft,
    from_peft=prefix_from_peft,
    mergeable=VirtualTokens.mergeable,
    separate_file="kv_prefix",
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("prefix",),
)
