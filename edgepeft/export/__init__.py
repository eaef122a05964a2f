"""Export an edgepeft model to ONNX for onnxruntime (fused contrib-op graphs, or generic torch.onnx).

    export(base, out_dir, adapters, weights, mode)      api.py
        fused.py     Llama-family decoders from fused contrib ops (GQA, SkipSimplifiedLayerNorm,
                     MatMulNBits, packed QKV)
        generic.py   everything else through torch.onnx, with the same graph I/O
        weights.py   fp32 / fp16 / int8 / int4 packing for MatMulNBits
        manifest.py  what the device runtime reads;   verify.py  ORT vs PyTorch, written report

`edgepeft.export` is this package, and calling it calls `api.export`: the top-level
lazy export and the subpackage resolve to the same callable, whichever is imported first.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from edgepeft.export.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
