"""A small ONNX graph writer: named nodes, initializers, I/O, atomic save with external data.

    builder = GraphBuilder("decoder")
    x = builder.input("input_ids", np.int64, ["batch", "sequence"])
    w = builder.initializer("embed.weight", table)             # name kept as given
    h = builder.node("Gather", [w, x], name="model.embed/Gather")  # -> "model.embed/Gather/output_0"
    builder.node("MatMul", [h, w_out], name="lm_head/MatMul", output_names=["logits"])
    builder.output("logits", np.float32, ["batch", "sequence", vocab])
    builder.save(out_dir, {"": 21})  # out_dir/model.onnx + model.onnx.data, both or neither

Every tensor gets a stable, meaningful name: initializers keep theirs, node outputs are
"<node name>/output_<k>", so later passes find weights and activations by name.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepeft.export.graph_info import DATA_FILE, IR_VERSION, MODEL_FILE


def onnx_dtype(dtype) -> int:
    """The TensorProto element type of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Collects nodes and initializers of one graph, in the order they are emitted."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"tensor name {name!r} is emitted twice in graph {self.name!r}")
        self._names.add(name)
        return name

    def input(self, name: str, dtype, shape: list[int | str | None]) -> str:
        self.inputs.append(
            helper.make_tensor_value_info(self._claim(name), onnx_dtype(dtype), shape)
        )
        return name

    def optional_input(self, name: str, default: np.ndarray, shape: list[int | str | None]) -> str:
        """A graph input that may be left unfed: the initializer of the same name is its default."""
        self.initializer(name, default)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(default.dtype), shape))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Store `array` under `name` (the bytes are copied now)."""
        self.initializers.append(
            numpy_helper.from_array(np.ascontiguousarray(array), self._claim(name))
        )
        return name

    def node(
        self,
        op_type: str,
        inputs: list[str],
        *,
        name: str,
        outputs: int = 1,
        output_names: list[str] | None = None,
        domain: str = "",
        **attributes,
    ) -> str | list[str]:
        """Emit one node; returns its output name (a list when it has several).

        Outputs are named "<name>/output_<k>" unless `output_names` gives them (graph
        outputs). An empty string skips an optional input or output, as ONNX specifies.
        """
        if output_names is None:
            output_names = [f"{name}/output_{k}" for k in range(outputs)]
        out_names = [self._claim(n) if n else n for n in output_names]
        self.nodes.append(
            helper.make_node(
                op_type, inputs, out_names, name=name, domain=domain or None, **attributes
            )
        )
        return out_names[0] if len(out_names) == 1 else out_names

    def rename(self, tensor: str, name: str) -> str:
        """Give a node output its graph-output name (it must not be consumed yet)."""
        if any(tensor in node.input for node in self.nodes):
            raise ValueError(f"{tensor!r} already feeds a node; name it when emitting instead")
        for node in self.nodes:
            for k, out in enumerate(node.output):
                if out == tensor:
                    node.output[k] = self._claim(name)
                    self._names.discard(tensor)
                    return name
        raise ValueError(f"no node of {self.name!r} produces {tensor!r}")

    def output(self, name: str, dtype, shape: list[int | str | None]) -> str:
        """Declare the already emitted tensor `name` a graph output."""
        if name not in self._names:
            raise ValueError(f"graph output {name!r} is produced by no node of {self.name!r}")
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
        return name

    def op_counts(self) -> dict[str, int]:
        return dict(collections.Counter(n.op_type for n in self.nodes))

    def model(self, opsets: dict[str, int]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[
                helper.make_opsetid(domain, version) for domain, version in opsets.items()
            ],
            producer_name="edgepeft",
        )
        model.ir_version = IR_VERSION
        return model

    def save(self, out_dir: Path, opsets: dict[str, int]) -> Path:
        """Write out_dir/model.onnx with all weights in model.onnx.data beside it.

        Both files are written in a temporary folder inside `out_dir` and moved in
        place (data first), so an interrupted export leaves the previous files whole.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.model(opsets)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
        try:
            onnx.save_model(
                model,
                tmp / MODEL_FILE,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=DATA_FILE,
                size_threshold=1024,
            )
            data = tmp / DATA_FILE
            if data.exists():
                os.replace(data, out_dir / DATA_FILE)
            os.replace(tmp / MODEL_FILE, out_dir / MODEL_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir / MODEL_FILE
