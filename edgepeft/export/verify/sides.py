"""The two sides of a check, each producing logits for the same inputs and its own cache.

    OrtSide         model.onnx in onnxruntime (CPU); separate mode: + one .onnx_adapter
                    activated per run through onnxruntime.LoraAdapter + RunOptions
    OrtPrefixSide   the same graph with an adapter's KV prefix seeded into the cache at
                    prefill (artifacts/kv_seed.py: seed_past, rows re-positioned for left padding);
                    a hybrid (MAM) adds its .onnx_adapter part as OrtSide does
    TorchSide       the PyTorch reference behind generic.CacheContract, fp32, same contract

Every side answers the same two calls:
    side.empty_past(B)            the cache before the prefill
    side(ids, mask, past)         ─► (logits (B, T, V) float32 numpy, the next past)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgepeft.artifacts.graph_io import input_names
from edgepeft.artifacts.kv_prefix import read_kv_prefix_file
from edgepeft.artifacts.kv_seed import decode_step, prefill_with_prefix
from edgepeft.artifacts.manifest import Manifest


class OrtSide:
    """The exported graph in onnxruntime, optionally with one .onnx_adapter active."""

    def __init__(self, path: Path, manifest: Manifest, adapter_file: Path | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.kv_dtype = np.dtype(manifest.kv_dtype)
        self.run_options = self.adapter = None
        if adapter_file is not None:
            # RunOptions does not own the adapter: keep it alive as long as the options.
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(adapter_file))
            self.run_options = ort.RunOptions()
            self.run_options.add_active_adapter(self.adapter)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        shape = (batch, m.num_kv_heads, 0, m.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * m.num_layers)]

    def __call__(self, ids, mask, past):
        feeds = dict(zip(input_names(self.manifest.num_layers), [ids, mask, *past], strict=True))
        logits, *present = self.session.run(None, feeds, self.run_options)
        return logits.astype(np.float32), present


class OrtPrefixSide(OrtSide):
    """The graph with an adapter's KV prefix seeded at prefill; its "past" is a DecodeState.
    A hybrid (MAM) also activates its graph-input part, `adapter_file`, in every run."""

    def __init__(
        self, path: Path, manifest: Manifest, prefix_file: Path, adapter_file: Path | None = None
    ):
        super().__init__(path, manifest, adapter_file)
        self.prefix = read_kv_prefix_file(prefix_file, manifest.base_fingerprint)

    def empty_past(self, batch: int) -> None:
        return None  # prefill seeds the prefix itself

    def __call__(self, ids, mask, past):
        if past is None:
            logits, state = prefill_with_prefix(
                self.session,
                ids,
                mask,
                self.prefix,
                graph=self.manifest.graph,
                run_options=self.run_options,
            )
        else:  # the state's mask already holds the N virtual positions and grows by one
            logits, state = decode_step(self.session, past, ids[:, 0], self.run_options)
        return logits.astype(np.float32), state

    def rows_alone(self, mask: np.ndarray) -> bool:
        """A prompt-tuned prefix on learned absolute positions cannot be left padded."""
        absolute = any(f is None for f in self.prefix.inv_freq)
        padded = bool((mask == 0).any())
        return padded and absolute and self.prefix.method == "prompt" and self.manifest.graph == "generic"


class TorchSide:
    """The PyTorch reference wrapped in generic.CacheContract (same inputs and outputs)."""

    def __init__(self, contract, manifest: Manifest):
        self.contract = contract
        self.manifest = manifest

    def empty_past(self, batch: int):
        m = self.manifest
        return [torch.zeros(batch, m.num_kv_heads, 0, m.head_dim) for _ in range(2 * m.num_layers)]

    def __call__(self, ids, mask, past):
        with torch.no_grad():
            logits, *present = self.contract(torch.from_numpy(ids), torch.from_numpy(mask), *past)
        return logits.numpy(), present
