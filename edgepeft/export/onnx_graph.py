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

Spooling (`GraphBuilder(name, spool_dir=out_dir)`): a builder that writes into a known
folder streams every initializer of 1 KiB or more into the data file as it is created,
so a graph's weights are never all in memory at once:

    initializer(name, array) ──bytes──► out_dir/.export-XXXX/model.onnx.data  (4 KiB aligned)
                             └────────► TensorProto(name, dims, external: offset, length)
    save(out_dir) ─► model.onnx beside it ─► both moved into out_dir (data first)
    discard()     ─► the temporary folder removed (a failed build leaves nothing)
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

EXTERNAL_THRESHOLD = 1024
"""Initializers of at least this many bytes live in model.onnx.data (smaller ones inline)."""
ALIGNMENT = 4096
"""Offsets of external tensors are multiples of this (page size: onnxruntime can map them)."""


def onnx_dtype(dtype) -> int:
    """The TensorProto element type of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Collects nodes and initializers of one graph, in the order they are emitted.

    Args:
        name: The graph's name.
        spool_dir: The folder `save` will write to. When given, large initializers go to
            a data file in a temporary folder inside it as they are created (call `save`
            or `discard`); otherwise they are held in memory until `save`.
    """

    def __init__(self, name: str, spool_dir: Path | None = None):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._spool: Path | None = None
        self._data = None
        if spool_dir is not None:
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix=".export-", dir=spool_dir))
            self._data = open(self._spool / DATA_FILE, "wb")  # noqa: SIM115 - closed in save/discard

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
        """Store `array` under `name` (the bytes are copied now, or written when spooling)."""
        array = np.ascontiguousarray(array)
        if self._data is None or array.nbytes < EXTERNAL_THRESHOLD or array.dtype == object:
            self.initializers.append(numpy_helper.from_array(array, self._claim(name)))
            return name
        # The bytes go straight to the file: a TensorProto that once held them keeps them
        # in its protobuf arena until the whole graph is freed.
        tensor = TensorProto(name=self._claim(name), data_type=onnx_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        offset = -self._data.tell() % ALIGNMENT + self._data.tell()
        self._data.seek(offset)
        self._data.write(array.astype(array.dtype.newbyteorder("<"), copy=False).data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
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

    def discard(self) -> None:
        """Drop the spooled data of a graph that will not be saved (no-op otherwise)."""
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def save(self, out_dir: Path, opsets: dict[str, int]) -> Path:
        """Write out_dir/model.onnx with all weights in model.onnx.data beside it.

        Both files are written in a temporary folder inside `out_dir` and moved in
        place (data first), so an interrupted export leaves the previous files whole.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.model(opsets)
        if self._spool is not None:
            if self._spool.parent.resolve() != out_dir.resolve():
                raise ValueError(
                    f"graph {self.name!r} spools its weights in {self._spool.parent}; "
                    f"save it there, not in {out_dir}"
                )
            tmp, spooled = self._spool, self._data
            self._data = self._spool = None
        else:
            tmp, spooled = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir)), None
        try:
            if spooled is not None:
                spooled.close()
                onnx.save_model(model, tmp / MODEL_FILE)
            else:
                onnx.save_model(
                    model,
                    tmp / MODEL_FILE,
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=DATA_FILE,
                    size_threshold=EXTERNAL_THRESHOLD,
                )
            data = tmp / DATA_FILE
            if data.exists():
                os.replace(data, out_dir / DATA_FILE)
            os.replace(tmp / MODEL_FILE, out_dir / MODEL_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir / MODEL_FILE
