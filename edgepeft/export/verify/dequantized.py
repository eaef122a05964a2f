"""int8 / int4 generic graphs: PyTorch holding the export's own dequantized weights.

    model.onnx MatMulNBits codes ─dequantize─► {parameter name: fp32 array}
        ─► swapped into the reference for one run, then back ─► max |Δlogit| against that

The graph's error then shows apart from the quantization error: a healthy int4 graph is far
from the fp32 reference but close to PyTorch running its own rounded weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgepeft.export.generic import matmul_nbits_weights


@contextlib.contextmanager
def holding_weights(contract, weights: dict[str, np.ndarray]):
    """Swap the contract's weight parameters for the export's dequantized ones, then back."""
    swapped = []
    try:
        for name, array in weights.items():
            path, _, attr = name.rpartition(".")
            module = contract.get_submodule(path)
            swapped.append((module, attr, getattr(module, attr)))
            setattr(module, attr, nn.Parameter(torch.from_numpy(array), requires_grad=False))
        yield
    finally:
        for module, attr, old in reversed(swapped):
            setattr(module, attr, old)


def exported_weights(path: Path, contract) -> dict[str, np.ndarray] | None:
    """The export's dequantized MatMulNBits weights, if each maps to a reference parameter."""
    weights = matmul_nbits_weights(onnx.load(str(path)))
    params = dict(contract.named_parameters())
    if not weights or any(
        name not in params or tuple(params[name].shape) != w.shape for name, w in weights.items()
    ):
        return None  # e.g. a fused graph: its weight names are not the PyTorch ones
    return weights
