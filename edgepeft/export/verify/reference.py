"""The PyTorch reference of an export, rebuilt from its manifest when none is passed in.

    manifest.base (+ base_quant) ─load_base─► model; fingerprint must equal the manifest's
        merged export: + each adapter loaded from its source, merged (quant "none")
        separate export: the base alone (check.py loads each adapter on a copy, active)
"""

from __future__ import annotations

from edgepeft.adapters.peft_format import load_adapter
from edgepeft.artifacts.manifest import Manifest
from edgepeft.base import fingerprint, load_base
from edgepeft.merge import merge


def load_export_base(manifest: Manifest):
    """The export's base model as the manifest names it, checked against its fingerprint."""
    try:
        model, _ = load_base(manifest.base, quant=manifest.base_quant)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load the export's base {manifest.base!r} ({e}); pass the model to "
            "verify(..., model=...)"
        ) from e
    if fingerprint(model) != manifest.base_fingerprint:
        raise ValueError(
            f"base {manifest.base!r} now has fingerprint {fingerprint(model)}, the export was "
            f"made from {manifest.base_fingerprint}: the folder changed since the export"
        )
    return model


def load_reference(manifest: Manifest):
    """The PyTorch model a merged graph was exported from: its base with the adapters merged."""
    if manifest.adapters and manifest.mode != "merged":
        raise ValueError(
            f"load_reference rebuilds merged exports; this one is {manifest.mode!r}: "
            "verify() checks each of its adapter files against the base instead"
        )
    model = load_export_base(manifest)
    for adapter in manifest.adapters:
        load_adapter(model, adapter.source, name=adapter.name)
        model, _ = merge(model, adapter.name, quant="none", inplace=True, keep_original=False)
    return model
