"""Which MatMulNBits accuracy levels keep an int4 base's export on the trained model, how fast.

load_base(MODEL, quant="int4")   the training base: the int4 export's own codes (int4_base.py)
  ─ export(weights="int4", accuracy_level=L4, accuracy_level_int8=L8) per CANDIDATES row
      (the same codes, bit for bit; L8: the 8-bit nodes: mixed-precision tensors, tied lm_head)
      "lm_head only": the all-level-1 graph with lm_head's node alone set to level 4
      (an edit of the saved graph, measured to see what the other 8-bit nodes cost)
  ─ onnxruntime prefill of a real text (Python's documentation prose, scripts/measure_int4.py)
    vs the PyTorch int4 base's logits: max |Δlogit| / max |logit|, mean KL(PyTorch || ORT),
    top-1 agreement per token
  ─ Engine.generate greedy, batch 1: decode tok/s (median of --runs), beside the exact-NF4
    graph (load_base(quant="nf4"), export weights="nf4") for the 5x goal

python scripts/measure_int4_levels.py            # the tiny llama (seconds)
python scripts/measure_int4_levels.py --real     # SmolLM2-135M-Instruct (~10 min on 2 cores)

--cache DIR keeps the int4 base (torch.save of the module) and its reference logits there,
so a second run skips the ~3 min load.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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

CANDIDATES = (
    # (label, accuracy_level of the 4-bit nodes, of the 8-bit nodes, lm_head only at 4)
    ("all 1", 1, 1, False),
    ("all 4", 4, 4, False),
    ("4-bit 1, 8-bit 4", 1, 4, False),
    ("4-bit 1, lm_head 4", 1, 1, True),
    ("4-bit 4, 8-bit 1", 4, 1, False),
)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


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


def decode_tok_s(folder: Path, threads: int, new_tokens: int, runs: int) -> float:
    """Median decode tok/s of greedy generation, batch 1, exactly `new_tokens` tokens."""
    from edgepeft.runtime import Engine

    engine = Engine(folder, threads=threads)
    engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True)  # warm-up: prepacked weights
    rates = [
        engine.generate(
            PROMPT, max_new_tokens=new_tokens, ignore_eos=True, return_result=True
        ).decode_tokens_per_s
        for _ in range(runs)
    ]
    return statistics.median(rates)


def lm_head_at(source: Path, target: Path, level: int) -> Path:
    """A copy of graph folder `source` whose lm_head MatMulNBits alone runs at `level`."""
    import onnx

    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    (node,) = [n for n in model.graph.node if n.name == "lm_head/MatMulNBits"]
    (attribute,) = [a for a in node.attribute if a.name == "accuracy_level"]
    attribute.i = level
    onnx.save(model, str(target / "model.onnx"))  # the weights stay in model.onnx.data
    return target


def int4_base(folder: Path, cache: Path | None):
    """(model, tokenizer, load seconds): load_base(quant="int4"), or the cached module."""
    from transformers import AutoTokenizer

    cached = cache / "int4_base.pt" if cache is not None else None
    start = time.perf_counter()
    if cached is not None and cached.is_file():
        model = torch.load(cached, weights_only=False)  # our own file, written below
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        model, tokenizer = load_base(folder, quant="int4", device="cpu")
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model, cached)
    return model, tokenizer, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (cached)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of text scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="decode runs (median)")
    parser.add_argument("--no-speed", action="store_true", help="accuracy only")
    parser.add_argument("--no-nf4", action="store_true", help="skip the exact-NF4 speed row")
    parser.add_argument("--cache", type=Path, help="folder keeping the int4 base between runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="int4-levels-"))
    folder = smollm2_dir() if args.real else save_tiny_model(work / "tiny", "llama")
    model, tokenizer, seconds = int4_base(folder, args.cache)
    print(f"int4 base: {seconds:.1f} s", flush=True)
    text = measure_int4.text("docs")
    ids = np.asarray([tokenizer(text)["input_ids"][: args.tokens]], dtype=np.int64)
    ids = np.minimum(ids, model.config.vocab_size - 1)  # the tiny vocabulary is smaller
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits[0].float().numpy()
    rows = []
    level1 = None
    for label, level4, level8, head_only in CANDIDATES:
        out = work / label.replace(" ", "_").replace(",", "")
        if head_only:
            if level1 is None:
                continue
            lm_head_at(level1, out, 4)
        else:
            export(model, out, weights="int4", accuracy_level=level4,
                   accuracy_level_int8=level8, tokenizer=tokenizer, verify=False,
                   quiet=True)  # fmt: skip
            if (level4, level8) == (1, 1):
                level1 = out
        row = {"label": label, **compare(reference, ort_logits(out, ids, args.threads))}
        if not args.no_speed:
            row["tok_s"] = decode_tok_s(out, args.threads, args.new_tokens, args.runs)
        rows.append(row)
        print(row, flush=True)
    nf4 = None
    if not args.no_speed and not args.no_nf4:
        del model
        base, nf4_tokenizer = load_base(folder, quant="nf4", device="cpu")
        export(base, work / "nf4", weights="nf4", tokenizer=nf4_tokenizer, verify=False,
               quiet=True)  # fmt: skip
        del base
        nf4 = decode_tok_s(work / "nf4", args.threads, args.new_tokens, args.runs)
        print({"label": "exact nf4", "tok_s": nf4}, flush=True)
    print(
        f"\n{Path(folder).name}, {ids.shape[1]} tokens of Python docs prose vs the PyTorch int4 "
        f"base; decode: {args.new_tokens} tokens greedy, batch 1, median of {args.runs}, "
        f"{args.threads} threads"
    )
    print("| accuracy levels | max rel. Δlogit | mean KL | top-1 | decode tok/s | vs nf4 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['tok_s']:.1f}" if "tok_s" in r else "-"
        ratio = f"{r['tok_s'] / nf4:.1f}x" if nf4 and "tok_s" in r else "-"
        print(
            f"| {r['label']} | {r['relative']:.2e} | {r['kl']:.2e} | {r['top1']:.2%} "
            f"| {speed} | {ratio} |"
        )
    if nf4 is not None:
        print(f"| exact nf4 (MatMulBnb4) | | | | {nf4:.1f} | 1.0x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
