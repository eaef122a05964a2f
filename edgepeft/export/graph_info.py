"""Moved to `edgepeft.artifacts.graph_io` (the torch-free on-disk contract); the old path stays."""

from edgepeft.artifacts.graph_io import *  # noqa: F401,F403
from edgepeft.artifacts.graph_io import (  # noqa: F401  (re-exported: the old import path)
    DATA_FILE,
    GRAPH_WEIGHT_FORMATS,
    IR_VERSION,
    KV_DTYPES,
    MODEL_FILE,
    input_names,
    output_names,
)

WEIGHT_FORMATS = GRAPH_WEIGHT_FORMATS
"""The builders' float and MatMulNBits formats (vocab.WEIGHT_FORMATS is every format)."""
