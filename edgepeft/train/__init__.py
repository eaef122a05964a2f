"""Training: one adapter over a frozen base, with exact resume, progress and reports.

    edgepeft.train(model, tokenizer, "data.jsonl", TrainConfig(...), "runs/x")
        data.py        rows ─► token ids + completion-only labels ─► sampler ─► batches
        loop.py        train(): the loop, read top to bottom; its named steps are steps.py
        loss.py        token loss, gradient accumulation, validation loss, precision
        optim.py       optimizer, learning-rate schedule, one update
        checkpoint.py  safetensors + JSON state (no pickle), atomic, bit-exact resume
        report.py      progress bar, metrics.jsonl, loss_curves.png, summary.json
        memory.py      will a step fit? (estimator); meter.py measures what it really holds
        run_config.py  a run config file ─► RunConfig; run.py trains and evaluates one

`edgepeft.train` is this package, and calling it calls `train`: the top-level lazy
export and the submodule resolve to the same callable, whichever is imported first.
"""

from __future__ import annotations

import sys
import types

from edgepeft.config import TrainConfig
from edgepeft.train.data import (
    Batch,
    DataError,
    DataReport,
    EpochSampler,
    Example,
    Row,
    collate,
    load_rows,
    pack_examples,
    prepare_data,
    split_rows,
    tokenize_rows,
)
from edgepeft.train.loop import TrainResult, train
from edgepeft.train.loss import evaluate_loss

__all__ = [
    "Batch",
    "DataError",
    "DataReport",
    "EpochSampler",
    "Example",
    "Row",
    "TrainConfig",
    "TrainResult",
    "collate",
    "evaluate_loss",
    "load_rows",
    "pack_examples",
    "prepare_data",
    "split_rows",
    "tokenize_rows",
    "train",
]


class _CallableModule(types.ModuleType):
    # `import edgepeft.train` binds this module where the lazy export binds the function;
    # making the module callable keeps `edgepeft.train(...)` working either way.
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
