"""The method registry is the one place a method's capabilities live.

Every "methods that can X" list elsewhere in edgepeft is derived from `edgepeft.adapters`;
config.py's CONFIG_TYPES, which stays torch-free, is checked against it instead.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from edgepeft import adapters
from edgepeft.adapters.bottleneck import BottleneckLayer
from edgepeft.adapters.ia3 import IA3Layer
from edgepeft.adapters.layer import SEPARATE_FILES, MethodSpec
from edgepeft.adapters.lora import LoraLayer
from edgepeft.adapters.parallel import ParallelLayer
from edgepeft.adapters.prompt import VirtualTokens
from edgepeft.adapters.selective import SelectiveLayer
from edgepeft.adapters.unipelt import GatedLoraLayer
from edgepeft.config import CONFIG_TYPES
from edgepeft.export.api import _STREAMED_MERGED, _STREAMED_SEPARATE
from edgepeft.export.kv_prefix import KV_PREFIX_PEFT_TYPES
from edgepeft.export.separate import SEPARATE_PEFT_TYPES
from edgepeft.train.run_config import METHOD_TYPES

PACKAGE = Path(adapters.__file__).parent.parent

MODULE_CLASSES = {
    "LORA": LoraLayer,
    "IA3": IA3Layer,
    "PROMPT_TUNING": VirtualTokens,
    "P_TUNING": VirtualTokens,
    "PREFIX_TUNING": VirtualTokens,
    "BOTTLENECK": BottleneckLayer,
    "PARALLEL_ADAPTER": ParallelLayer,
    "MAM": ParallelLayer,  # and VirtualTokens: neither part merges
    "UNIPELT": GatedLoraLayer,  # and its gated bottleneck, prefix gates, VirtualTokens
    "SELECTIVE": SelectiveLayer,
}


def test_capability_lists_equal_the_registry():
    assert SEPARATE_PEFT_TYPES == adapters.peft_types(separate_file="onnx_adapter")
    assert KV_PREFIX_PEFT_TYPES == adapters.peft_types(separate_file="kv_prefix")
    assert _STREAMED_MERGED == adapters.peft_types(streamed_merge=True)
    assert _STREAMED_SEPARATE == adapters.peft_types(streamed_separate=True)
    assert list(METHOD_TYPES.items()) == list(adapters.run_config_types().items())
    assert list(CONFIG_TYPES.items()) == list(adapters.config_types().items())


def test_capability_lists_keep_their_values():
    # What these lists said before the registry answered them (order included).
    assert SEPARATE_PEFT_TYPES == (
        "LORA", "IA3", "BOTTLENECK", "PARALLEL_ADAPTER", "MAM", "UNIPELT", "SELECTIVE",
    )  # fmt: skip
    assert _STREAMED_MERGED == ("LORA", "IA3")
    assert _STREAMED_SEPARATE == ("LORA", "IA3", "BOTTLENECK")
    assert KV_PREFIX_PEFT_TYPES == ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    assert list(METHOD_TYPES) == [
        "lora", "dora", "ia3", "prompt", "p_tuning", "prefix", "bottleneck", "parallel", "mam",
        "unipelt", "selective",
    ]  # fmt: skip
    assert METHOD_TYPES["dora"] is METHOD_TYPES["lora"] is CONFIG_TYPES["LORA"]


@pytest.mark.parametrize("peft_type", list(adapters.METHODS))
def test_every_method_sets_every_field(peft_type):
    spec = adapters.METHODS[peft_type]
    for f in dataclasses.fields(MethodSpec):
        value = getattr(spec, f.name)
        if f.name == "separate_file":
            assert value is None or value in SEPARATE_FILES
        elif f.name in ("mergeable", "streamed_merge", "streamed_separate"):
            assert isinstance(value, bool), f.name
        elif f.name == "run_config_names":
            assert value and all(isinstance(name, str) for name in value)
        else:
            assert value is not None, f.name
    assert spec.config_cls.peft_type == peft_type
    assert spec.mergeable is MODULE_CLASSES[peft_type].mergeable


def test_peft_types_refuses_unknown_capabilities():
    assert adapters.peft_types() == tuple(adapters.METHODS)
    assert adapters.peft_types(mergeable=True) == ("LORA", "IA3", "SELECTIVE")
    with pytest.raises(TypeError, match="unknown capabilities"):
        adapters.peft_types(mergable=True)


def _edgepeft_imports(path: Path) -> set[str]:
    """Every edgepeft module a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgepeft"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edgepeft"))
    return found


def test_base_never_imports_adapters():
    assert not {m for m in _edgepeft_imports(PACKAGE / "base.py") if m.startswith("edgepeft.adapters")}


@pytest.mark.parametrize("name", ["bottleneck", "dora", "ia3", "layer", "lora", "mam", "p_tuning",
                                  "parallel", "prompt", "saved_modules", "selective",
                                  "targets"])  # fmt: skip
def test_methods_never_import_the_registry(name):
    """The registry imports the methods, so they import their siblings, never the package."""
    assert "edgepeft.adapters" not in _edgepeft_imports(PACKAGE / "adapters" / f"{name}.py")
