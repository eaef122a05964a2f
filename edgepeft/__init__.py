"""edgepeft: adapt LLMs for constrained hardware.

The host side (this package's top level) needs the [train] extra; the device
runtime lives in `edgepeft.runtime` and needs only onnxruntime, numpy and tokenizers.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_base": "edgepeft.base",
    "fingerprint": "edgepeft.base",
    "describe_base": "edgepeft.base",
    "LoraConfig": "edgepeft.config",
    "IA3Config": "edgepeft.config",
    "PromptTuningConfig": "edgepeft.config",
    "PromptEncoderConfig": "edgepeft.config",
    "PrefixTuningConfig": "edgepeft.config",
    "BottleneckConfig": "edgepeft.config",
    "SelectiveConfig": "edgepeft.config",
    "ParallelAdapterConfig": "edgepeft.config",
    "MAMConfig": "edgepeft.config",
    "UniPELTConfig": "edgepeft.config",
    "add_adapter": "edgepeft.adapters.inject",
    "set_adapter": "edgepeft.adapters.inject",
    "disable_adapters": "edgepeft.adapters.inject",
    "delete_adapter": "edgepeft.adapters.inject",
    "active_adapter": "edgepeft.adapters.inject",
    "list_adapters": "edgepeft.adapters.inject",
    "adapter_parameters": "edgepeft.adapters.inject",
    "count_parameters": "edgepeft.adapters.inject",
    "save_adapter": "edgepeft.adapters.peft_format",
    "load_adapter": "edgepeft.adapters.peft_format",
    "AdapterMismatchError": "edgepeft.adapters.peft_format",
    "merge": "edgepeft.merge",
    "unmerge": "edgepeft.merge",
    "MergeReport": "edgepeft.merge",
    "export": "edgepeft.export.api",
    "export_adapter": "edgepeft.export.separate",
    "verify": "edgepeft.export.verify",
    "train": "edgepeft.train",
    "TrainConfig": "edgepeft.config",
    "evaluate": "edgepeft.train.evaluate",
    "truncate_rank": "edgepeft.truncate",
    "set_active_rank": "edgepeft.adapters.lora",
    "choose_mask": "edgepeft.adapters.importance",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    # Lazy, so `import edgepeft.runtime` on a device never pulls in torch.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgepeft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
