"""Export an edgepeft model to ONNX for onnxruntime (fused contrib-op graphs, or generic torch.onnx).

    export(base, out_dir, adapters, weights, mode)      api.py (options: recipes.py)
        stream.py    an HF folder read layer by layer while the graph is built
        fused.py     Llama-family decoders from fused contrib ops (GQA, SkipSimplifiedLayerNorm,
                     MatMulNBits, packed QKV)
        generic.py   everything else through torch.onnx, with the same graph I/O
        separate.py  one base graph + adapter files (adapter_files.py, kv_prefix.py)
        weights.py   fp32 / fp16 / int8 / int4 packing for MatMulNBits
        verify/      ORT vs PyTorch, written report
    what the device runtime reads (manifest, adapter files, graph I/O) is edgepeft.artifacts;
    the old module names here (manifest.py, files.py, graph_info.py) are aliases of it.

`edgepeft.export` is this package, and calling it calls `api.export`: the top-level
lazy export and the subpackage resolve to the same callable, whichever is imported first.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        # lazy: the torch-free runtime imports this package (its manifest modules), so the
        # exporter and torch load only when it is called
        from edgepeft.export.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
