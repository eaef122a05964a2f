"""What MatMulNBits' int8 activations (accuracy_level 4) cost on an int4 base, against level 1.

load_base(MODEL, quant="int4")   the training base: the int4 export's own codes (int4_base.py)
  ─ export(weights="int4", accuracy_level=L) for L in LEVELS   the same codes, bit for bit
  ─ onnxruntime prefill of a real text (Python's documentation prose, scripts/measure_int4.py)
vs the PyTorch int4 base's logits on that text:
  max |Δlogit| / max |logit|, mean KL(PyTorch || ORT), top-1 agreement per token

python scripts/measure_int4_levels.py            # the tiny llama (seconds)
python scripts/measure_int4_levels.py --real     # SmolLM2-135M-Instruct (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure_int4  # noqa: E402
from real_model import smollm2_dir  # noqa: E402

from edgepeft.base import load_base  # noqa: E402
from edgepeft.export.api import export  # noqa: E402
from edgepeft.tiny import save_tiny_model  # noqa: E402

LEVELS = (1, 4)


def ort_logits(folder: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """(T, V) logits of one prefill of `ids` (1, T)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            shape = [1 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape]
            feed[i.name] = np.zeros(shape, np.float32)
    return session.run(["logits"], feed)[0][0]


def compare(reference: np.ndarray, test: np.ndarray) -> dict:
    log_p = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(test).double(), -1)
    return {
        "relative": float(np.abs(reference - test).max() / np.abs(reference).max()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "top1": float((reference.argmax(-1) == test.argmax(-1)).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (cached)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of text scored")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="int4-levels-"))
    folder = smollm2_dir() if args.real else save_tiny_model(work / "tiny", "llama")
    start = time.perf_counter()
    model, tokenizer = load_base(folder, quant="int4", device="cpu")
    print(f"load_base(quant='int4'): {time.perf_counter() - start:.1f} s", flush=True)
    text = measure_int4.text("docs")
    ids = np.asarray([tokenizer(text)["input_ids"][: args.tokens]], dtype=np.int64)
    ids = np.minimum(ids, model.config.vocab_size - 1)  # the tiny vocabulary is smaller
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits[0].float().numpy()
    print(
        f"{Path(folder).name}, {ids.shape[1]} tokens of Python docs prose, vs the PyTorch int4 base"
    )
    print("| accuracy_level | max rel. Δlogit | mean KL | top-1 |")
    print("|---|---|---|---|")
    for level in LEVELS:
        out = work / f"level{level}"
        export(model, out, weights="int4", accuracy_level=level, tokenizer=tokenizer,
               verify=False, quiet=True)  # fmt: skip
        row = compare(reference, ort_logits(out, ids, args.threads))
        print(
            f"| {level} | {row['relative']:.2e} | {row['kl']:.2e} | {row['top1']:.2%} |", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
