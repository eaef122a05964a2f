"""`modules_to_save`: whole modules (e.g. lm_head) trained in full beside an adapter.

The wrapper keeps the frozen original and one trainable copy per adapter, and runs
the active adapter's copy. peft saves the copy's tensors under the module's own
names (`lm_head.weight`), and so does edgepeft.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgepeft.adapters.layer import ReadThroughLayer
from edgepeft.adapters.targets import candidate_modules, suffix_match, wrap
from edgepeft.base import is_quantized


class ModulesToSaveLayer(ReadThroughLayer):
    peft_type = "MODULES_TO_SAVE"
    adapter_attrs = ("copies",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()

    def add(self, name: str) -> None:
        original = self.innermost()
        if is_quantized(original):
            raise ValueError(
                "modules_to_save cannot copy a quantized layer; keep it unquantized with "
                "load_base(..., skip_modules=...)"
            )
        trained = copy.deepcopy(original)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.copies[name] = trained

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].state_dict(keep_vars=True))

    def forward(self, *args, **kwargs):
        if self.active is None:
            return self.base_layer(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise TypeError("modules_to_save copies replace their module; merge swaps them in")


def add_modules_to_save(model: nn.Module, names: tuple[str, ...] | None, adapter: str) -> list[str]:
    """Wrap every module whose name ends with one of `names`; returns the wrapped names."""
    if not names:
        return []
    all_modules = [n for n, _ in candidate_modules(model)]
    chosen = []
    for key in names:
        hits = [n for n in all_modules if suffix_match(n, key) and ".base_layer" not in n]
        if not hits:
            raise ValueError(
                f"modules_to_save: no module named {key!r} in the model "
                f"(top-level modules: {', '.join(n for n in all_modules if '.' not in n)})"
            )
        chosen.extend(hits)
    for module_name in chosen:
        wrap(model, module_name, ModulesToSaveLayer).add(adapter)
    return chosen
