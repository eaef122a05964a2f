"""Reference logits from AdapterHub's `adapters` library, written as committed test fixtures.

    tiny Llama (TINY_CONFIG, seed 0, weights re-drawn at a readable scale)
        ──► adapters.init + add_adapter("ref", <the case's AdapterHub config>)
        ──► every adapter parameter drawn from a seeded normal (the identity init would
            make parity trivial)
        ──► eval forward, eager attention, no cache, fixed input_ids / attention_mask
        ──► tests/fixtures/adapterhub/<case>.safetensors
                base.<HF name>        the base weights (the test rebuilds the same base)
                adapter.<AH name>     the adapter's parameters under AdapterHub's names
                input_ids, attention_mask, position_ids       (B, T) int64
                logits                (B, T, V) fp32, the adapted model at position_ids
                base_logits           (B, T, V) fp32, the same inputs without the adapter
                gate_logits.<AH name> (B, T, 1) fp32, each gate Linear's output (UniPELT)
              with a prefix, also:
                logits_adapterhub_positions  (B, T, V) fp32, at AdapterHub's own positions
            metadata: one key, "adapterhub_reference", a JSON object: script, case,
                versions, tiny_config, adapter_name, adapterhub_config, edgepeft (the
                matching edgepeft config), inputs, positions, agrees, differs

Positions: edgepeft (as HF peft) puts a prefix's N virtual tokens at positions 0..N-1 and
the input at N..N+T-1; AdapterHub leaves the input at 0..T-1. The prefix keys carry no
rotation, so the query-prefix scores (R(pos) q) . k_p depend on the absolute position and
the two differ (2.6% of the logits in mam). `logits` is AdapterHub run with position_ids
= N + t, edgepeft's positions; `logits_adapterhub_positions` is its default run.

tests/test_adapterhub_reference.py reads these files in the main venv (transformers 5.x,
no `adapters`), rebuilds the base, puts the edgepeft adapter on it with AdapterHub's
parameters and compares logits. `adapters` 1.3.0 pins transformers < 4.58, so this script
runs only in its own venv; it is rerun by hand, and its outputs are committed:

    python3 -m venv /tmp/ahvenv && . /tmp/ahvenv/bin/activate
    pip install torch==2.13.0          # first: CPU torch, before adapters pulls another
    pip install adapters==1.3.0        # brings transformers 4.57 and safetensors
    python scripts/make_reference_adapters.py [--out tests/fixtures/adapterhub]

The math each case pins, read from adapters 1.3.0 for LlamaForCausalLM (h: a decoder
layer's residual stream entering the FFN sub-block; y = mlp(post_attention_layernorm(h));
f(z) = up(relu(down(z))); Llama passes no layer norm to AdapterHub's bottleneck layers):

    par_bn              h + y + 4.0 * f(h)                          = edgepeft ParallelAdapter
    mam                 prefix K/V (B, n_kv, N, D) after RoPE + par_bn  = edgepeft MAM (no GQA,
                        input positions N + t: see Positions)
    seq_bn              h + (y + h) + f(y + h)   AdapterHub's Pfeiffer default
                        (original_ln_before=True: the adapter reads y + h and its residual
                        is y); edgepeft's Pfeiffer computes h + y + f(y): they differ
    seq_bn_mlp_output   original_ln_before=False: h + y + f(y)      = edgepeft Pfeiffer
    unipelt_t1          UniPELT, T = 1 (a gate's mean over the sequence is the token's gate)
    unipelt_lora_bn_t1  UniPELT's gated LoRA + gated bottleneck, no prefix, T = 1

Every figure is fp32 on CPU with one thread; rerunning with the pinned versions rewrites
the files byte for byte (the metadata is one key: safetensors would write several in a
hash map's order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCRIPT = "scripts/make_reference_adapters.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "adapterhub"
METADATA_KEY = "adapterhub_reference"
ADAPTER = "ref"
"""The adapter's name inside AdapterHub (it appears in every adapter.* key)."""

TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # no GQA: the prefix MLP reads (N, hidden) there, (N, kv_dim) here
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PREFIX_LENGTH = 5  # AdapterHub's default 30 (10 in UniPELT), kept small for the files
PREFIX_BOTTLENECK = 32  # AdapterHub's MAM default 800 (512 in UniPELT), likewise

CASE_NAMES = ("par_bn", "mam", "seq_bn", "seq_bn_mlp_output", "unipelt_t1", "unipelt_lora_bn_t1")
"""The files this script writes, one per case (the test checks the folder holds these)."""

_GATE_DIFF = (
    "AdapterHub averages every gate over the sequence, g = mean_t sigmoid(w.x_t + b), one "
    "per row; edgepeft's gates are per token. Equal here because T = 1."
)
_LORA_GATE = (
    "gated LoRA (q_proj, v_proj; r 8, alpha 2): AdapterHub computes W x + g * (B A x) with "
    "g = sigmoid(gate(x)) and NO alpha / r factor once gating is on (adapters/methods/"
    "lora.py, LoRA.forward)"
)
_BN_GATE = (
    "gated sequential bottleneck (reduction 16, relu, scaling 1.0) with original_ln_before="
    "False: h + y + g * f(y), g = sigmoid(gate(y)); AdapterHub's UniPELT default "
    "original_ln_before=True reads y + h instead (see case seq_bn)"
)
_PREFIX_GATE = (
    "gated prefix: AdapterHub scales the prefix keys AND values by g = mean_t sigmoid("
    "gate(x_t)), x the attention input after input_layernorm (adapters/methods/"
    "prefix_tuning.py, compose_single): scores q.(g k_p) / sqrt(d), values g v_p. edgepeft "
    "adds log g to the prefix's attention scores instead (q.k_p / sqrt(d) + log g, values "
    "v_p): the two differ for any g != 1, so this part does not agree"
)


def _check_environment():
    """The pinned libraries, or a clear refusal (this script never runs in the main venv)."""
    try:
        import adapters
        import transformers
    except ImportError as error:
        sys.exit(
            f"{SCRIPT}: needs AdapterHub's `adapters` library ({error}); it pins transformers "
            "< 4.58, so run it in its own venv:\n"
            "  python3 -m venv /tmp/ahvenv && . /tmp/ahvenv/bin/activate\n"
            "  pip install torch==2.13.0 && pip install adapters==1.3.0"
        )
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if (major, minor) >= (4, 58):
        sys.exit(
            f"{SCRIPT}: transformers {transformers.__version__} is installed, but adapters "
            f"{adapters.__version__} supports transformers < 4.58; use the venv in this "
            "script's docstring"
        )


def _cases():
    """case -> (AdapterHub config, input kind, edgepeft config, agrees, differs)."""
    from adapters import (
        ConfigUnion,
        LoRAConfig,
        MAMConfig,
        ParBnConfig,
        PrefixTuningConfig,
        SeqBnConfig,
        UniPELTConfig,
    )

    prefix = PrefixTuningConfig(prefix_length=PREFIX_LENGTH, bottleneck_size=PREFIX_BOTTLENECK)
    seq_bn_mlp_output = SeqBnConfig(reduction_factor=16, original_ln_before=False)
    lora = LoRAConfig(r=8, alpha=2)
    parallel = dict(reduction_factor=2, scaling=4.0, activation="relu")
    return {
        "par_bn": (
            ParBnConfig(),
            "padded",
            {"type": "ParallelAdapterConfig", **parallel},
            ["all: h + y + 4.0 * up(relu(down(h))), h the FFN sub-block's input"],
            [],
        ),
        "mam": (
            MAMConfig(prefix_tuning=prefix, adapter=ParBnConfig()),
            "padded",
            {
                "type": "MAMConfig",
                "num_virtual_tokens": PREFIX_LENGTH,
                "prefix_bottleneck": PREFIX_BOTTLENECK,
                **parallel,
            },
            [
                "prefix: wte (N, hidden) -> Linear -> tanh -> Linear (-> L*2*H*D), laid out "
                "(layer, key|value, head, dim) as peft; keys without RoPE, all N visible",
                "parallel adapter: as par_bn",
            ],
            [
                "edgepeft's prefix embedding is (N, kv_heads*head_dim), AdapterHub's (N, "
                "hidden): equal without GQA, as here",
                "positions: edgepeft (as peft) runs the input at N..N+T-1, AdapterHub at "
                "0..T-1; prefix keys carry no rotation, so q_rot(pos) . k_p differs. "
                "`logits` is AdapterHub given position_ids = N + t (equal); "
                "`logits_adapterhub_positions` is its default (differs)",
            ],
        ),
        "seq_bn": (
            SeqBnConfig(),
            "padded",
            {"type": "BottleneckConfig", "style": "pfeiffer", "reduction_factor": 16},
            ["placement: one adapter per layer on the FFN output (Pfeiffer)"],
            [
                "AdapterHub (original_ln_before=True, residual_before_ln=True, no layer norm "
                "on Llama): out = h + (y + h) + f(y + h), the adapter reads the residual "
                "stream y + h; edgepeft: out = h + y + f(y), the adapter reads the MLP output "
                "y. See seq_bn_mlp_output for the setting that agrees."
            ],
        ),
        "seq_bn_mlp_output": (
            seq_bn_mlp_output,
            "padded",
            {"type": "BottleneckConfig", "style": "pfeiffer", "reduction_factor": 16},
            ["all: h + y + up(relu(down(y))) (SeqBnConfig with original_ln_before=False)"],
            [],
        ),
        "unipelt_t1": (
            UniPELTConfig(prefix_tuning=prefix, adapter=seq_bn_mlp_output, lora=lora),
            "single",
            {
                "type": "UniPELT (edgepeft/adapters/unipelt.py)",
                "num_virtual_tokens": PREFIX_LENGTH,
                "prefix_bottleneck": PREFIX_BOTTLENECK,
                "lora_r": 8,
                "lora_alpha": 2,
                "bottleneck_reduction_factor": 16,
            },
            [_LORA_GATE, _BN_GATE, "prefix keys/values before gating: as mam", _GATE_DIFF],
            [_PREFIX_GATE, "positions: as mam (`logits` is at edgepeft's positions N + t)"],
        ),
        "unipelt_lora_bn_t1": (
            ConfigUnion(seq_bn_mlp_output.replace(use_gating=True), lora.replace(use_gating=True)),
            "single",
            {
                "type": "UniPELT without its prefix part",
                "lora_r": 8,
                "lora_alpha": 2,
                "bottleneck_reduction_factor": 16,
            },
            [_LORA_GATE, _BN_GATE, _GATE_DIFF],
            [],
        ),
    }


INPUTS = {
    "padded": "2 rows of 7 tokens, the second left-padded by 2 (compare where the mask is 1)",
    "single": "4 rows of 1 token, no padding, no cache",
}


def _inputs(kind: str, vocab: int, torch):
    """(input_ids, attention_mask): two rows of 7, the second left-padded by 2; or four
    rows of a single token (where a gate's mean over the sequence is the token's gate)."""
    g = torch.Generator().manual_seed(1)
    if kind == "padded":
        ids = torch.randint(3, vocab, (2, 7), generator=g)
        mask = torch.ones(2, 7, dtype=torch.long)
        ids[1, :2], mask[1, :2] = TINY_CONFIG["pad_token_id"], 0
        return ids, mask
    ids = torch.randint(3, vocab, (4, 1), generator=g)
    return ids, torch.ones(4, 1, dtype=torch.long)


def _base(torch, LlamaConfig, LlamaForCausalLM):
    """The tiny base: weights at unit-variance activations, so logits spread and top-1 is
    not decided by rounding (HF's 0.02 init gives near-ties)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG, attn_implementation="eager"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # (out, in) projections
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.eval()


def _randomize_adapter(model, torch) -> dict:
    """Draw every adapter parameter ("ref" in its name); returns name -> tensor."""
    g = torch.Generator().manual_seed(2)
    drawn = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{ADAPTER}." not in name:
                continue
            if name.endswith("bias"):
                value = 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("wte.weight"):
                value = torch.randn(p.shape, generator=g)  # an embedding table
            else:  # (out, in) weights, LoRA's A (r, in) and B (out, r) alike
                value = 0.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            p.copy_(value)
            drawn[name] = value.clone().contiguous()
    return drawn


def _prefix_length(ah_config) -> int:
    """N of the config's prefix-tuning part (0: none)."""
    configs = ah_config.configs if hasattr(ah_config, "configs") else [ah_config]
    return next((c.prefix_length for c in configs if c.architecture == "prefix_tuning"), 0)


def _case_file(case: str, spec, out: Path, torch, versions: dict) -> dict:
    import adapters
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    ah_config, kind, edgepeft_config, agrees, differs = spec
    model = _base(torch, LlamaConfig, LlamaForCausalLM)
    ids, mask = _inputs(kind, TINY_CONFIG["vocab_size"], torch)
    base = {f"base.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    adapters.init(model)
    model.add_adapter(ADAPTER, config=ah_config)
    model.set_active_adapters(ADAPTER)
    drawn = _randomize_adapter(model, torch)
    gates, hooks = {}, []
    for name, module in model.named_modules():
        if f".{ADAPTER}" in name and name.rsplit(".", 1)[-1] in ("gate", ADAPTER):
            if isinstance(module, torch.nn.Linear) and module.out_features == 1:
                hooks.append(module.register_forward_hook(_keep(gates, name)))
    model.eval()
    n = _prefix_length(ah_config)
    positions = (n + torch.arange(ids.shape[1])).expand(ids.shape[0], -1).contiguous()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        for hook in hooks:
            hook.remove()
        own = {}
        if n:
            own["logits_adapterhub_positions"] = model(
                input_ids=ids, attention_mask=mask, use_cache=False
            ).logits.contiguous()

    tensors = {
        **base,
        **{f"adapter.{k}": v for k, v in drawn.items()},
        **{f"gate_logits.{k}": v for k, v in gates.items()},
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "position_ids": positions,
        "logits": logits.float().contiguous(),
        "base_logits": base_logits.float().contiguous(),
        **own,
    }
    reference = {
        "script": SCRIPT,
        "case": case,
        "versions": versions,
        "tiny_config": TINY_CONFIG,
        "adapter_name": ADAPTER,
        "adapterhub_config": ah_config.to_dict(),
        "edgepeft": edgepeft_config,
        "inputs": INPUTS[kind],
        "positions": (
            f"position_ids = {n} + t (edgepeft's, after a prefix of {n}); "
            "logits_adapterhub_positions at AdapterHub's default 0 + t"
            if n
            else "position_ids = t (both libraries' default)"
        ),
        "agrees": agrees,
        "differs": differs,
    }
    path = out / f"{case}.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(reference, sort_keys=True)})
    real = mask.bool()
    shift = (logits - base_logits)[real].norm() / base_logits[real].norm()
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "adapter_shift": round(float(shift), 4),
    }


def _keep(store: dict, name: str):
    def hook(module, args, output):
        store[name] = output.detach().float().clone().contiguous()  # (B, T, 1)

    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for <case>.safetensors")
    args = parser.parse_args(argv)
    _check_environment()

    import adapters
    import safetensors
    import torch
    import transformers

    torch.set_num_threads(1)  # one summation order: the files are reproducible
    versions = {
        "adapters": adapters.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    cases = _cases()
    assert tuple(cases) == CASE_NAMES, "CASE_NAMES must list _cases() in order"
    for case, spec in cases.items():
        print(case, _case_file(case, spec, args.out, torch, versions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
