"""The project's shared words: quantization kinds, weight formats, modes and on-disk names.

Torch-free and import-free, so that the trainer, the exporter, the planner and the device
runtime all take these facts from one place. A new format or file kind is added here first.
"""

from __future__ import annotations

QUANTS = ("nf4", "fp4", "int8", "int4", "none")
"""How `load_base` holds the frozen base (bitsandbytes 4-bit, LLM.int8, the int4 export's own
MatMulNBits codes, or full precision)."""
BNB4_FORMATS = ("nf4", "fp4")
"""bitsandbytes' 4-bit codes: a base quant and, exactly, an export weight format (MatMulBnb4)."""

NBITS = {"int4": 4, "int8": 8}
"""Export weight formats stored as MatMulNBits codes, with their bits per code."""
FLOAT_FORMATS = ("fp32", "fp16")
WEIGHT_FORMATS = ("int4", "int8", "nf4", "fp4", "fp16", "fp32")
"""Every export weight format, in the order a device profile prefers them by default."""

MODES = ("merged", "separate")
"""Export modes: adapters folded into one graph each, or one base with switchable files."""
GRAPHS = ("auto", "fused", "generic")
"""Graph builders: the fused contrib-op graph, torch.onnx, or whichever fits the model."""

ADAPTERS_FOLDER = "adapters"
"""The export's folder of separate-mode adapter files."""
ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
"""onnxruntime's adapter format: LoRA / DoRA / IA3 / bottleneck tensors as graph inputs."""
KV_PREFIX_SUFFIX = ".kvprefix.safetensors"
"""Prompt and prefix tuning: the key/value prefix that seeds the cache."""
ADAPTER_SUFFIXES = (ONNX_ADAPTER_SUFFIX, KV_PREFIX_SUFFIX)
