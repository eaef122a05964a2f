"""Build the demo base model shipped in edgepeft/demo/base_model/: deterministic, offline.

    edgepeft.demo.corpus.pretraining_lines(seed 0)       sentences + "upper: garden -> GARDEN"
        ──► byte-level tokenizer, no merges (every character is one token: string
            operations stay operations on tokens)                     tokenizer.json
        ──► Llama (DEMO_CONFIG: hidden 128, 3 layers, GQA 4/2, 0.51M params), seed 0
        ──► pretraining: AdamW, warmup then constant lr, next-token loss on every line
        ──► every SAVE_EVERY steps and at the end: fp32 safetensors + config + tokenizer
            ──► edgepeft/demo/base_model/ (atomic)

Run: python scripts/make_demo_base.py [--out DIR] [--steps N] [--threads 1]
     python scripts/make_demo_base.py --examples-only   # rewrite examples/tasks/demo-*/ only
The lr is constant after warmup, so the model saved at step k is the model `--steps k`
gives. The default (800 steps, 1 thread) took 3.2 min on the 2-core machine it was written
on (partly loaded) and rebuilt the shipped files byte for byte (torch 2.13 CPU); another
torch version or thread count gives slightly different weights that work just as well.
At 800 steps the base answers 94-100% of held-out words for every operation it is told.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from edgepeft import atomic
from edgepeft.atomic import temporary_sibling
from edgepeft.demo import corpus
from edgepeft.demo.paths import BASE_DIR

DEMO_CONFIG = dict(
    vocab_size=259,  # 3 special tokens + 256 byte symbols
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tasks"
STEPS, BATCH, LR, SEED, SAVE_EVERY = 800, 64, 3e-3, 0, 100


def demo_tokenizer():
    """Byte-level BPE with no merges: <pad>=0, <s>=1, </s>=2, then one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_CONFIG["vocab_size"],  # exactly the alphabet: no merge is learned
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def batches(tokenizer, steps: int, batch: int, seed: int):
    """Yield (input_ids, attention_mask) of `batch` lines, each ending in EOS, right-padded."""
    lines = corpus.pretraining_lines(steps * batch, seed)
    eos = tokenizer.eos_token_id
    for step in range(steps):
        rows = [tokenizer(line).input_ids + [eos] for line in lines[step * batch:(step + 1) * batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        yield ids, mask


def pretrain(model, tokenizer, steps: int, batch: int, lr: float, seed: int, save) -> list[float]:
    """AdamW, linear warmup then constant lr; `save(step)` every SAVE_EVERY steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses, start = [], time.perf_counter()
    for step, (ids, mask) in enumerate(batches(tokenizer, steps, batch, seed), 1):
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            elapsed = time.perf_counter() - start
            print(f"step {step}/{steps}  loss {recent:.4f}  {elapsed:.0f}s", file=sys.stderr, flush=True)
        if step % SAVE_EVERY == 0 or step == steps:
            save(step)
    return losses


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def check(model, tokenizer, n: int = 32) -> dict[str, float]:
    """Exact-match rate of every operation on `n` held-out words, told the instruction word."""
    model.eval()
    words = corpus.test_words(n)
    rates = {}
    for op, answer in corpus.OPERATIONS.items():
        hits = sum(
            greedy(model, tokenizer, f"{op}: {w}{corpus.ARROW}").strip() == answer(w) for w in words
        )
        rates[op] = hits / n
    return rates


def example_files() -> dict[Path, str]:
    """examples/tasks/demo-<task>/{train,test}.jsonl: exactly the data `edgepeft demo` trains on."""
    from edgepeft.demo.pipeline import DemoOptions

    options, files = DemoOptions(out_dir=Path(".")), {}
    for task in corpus.TASKS:
        for split, rows in zip(("train", "test"), corpus.task_splits(task, options.n_train, options.n_test), strict=True):
            files[Path(f"demo-{task}") / f"{split}.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows)
    return files


def save(model, tokenizer, out: Path, step: int) -> None:
    """The model folder (safetensors, config, tokenizer), replaced whole."""
    import shutil

    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = temporary_sibling(out)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "PRETRAINED_STEPS").write_text(f"{step}\n")
    old = temporary_sibling(out)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved step {step} to {out}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BASE_DIR, help=f"default: {BASE_DIR}")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"default: {STEPS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--examples-only", action="store_true",
                        help=f"write the demo tasks' JSONL under {EXAMPLES} and stop")  # fmt: skip
    args = parser.parse_args(argv)
    if args.examples_only:
        for path, text in example_files().items():
            atomic.write_bytes(EXAMPLES / path, text)
            print(f"wrote {EXAMPLES / path}")
        return 0

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = demo_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG)).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"demo base: Llama, {params / 1e6:.2f}M parameters, {args.steps} steps x {BATCH} lines, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    start = time.perf_counter()
    losses = pretrain(model, tokenizer, args.steps, BATCH, LR, SEED,
                      lambda step: save(model, tokenizer, args.out, step))  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    print(f"pretrained {args.steps} steps in {minutes:.1f} min, "
          f"loss of the last 100 steps {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    word = corpus.test_words(1)[0]
    for op, rate in check(model, tokenizer).items():
        example = greedy(model, tokenizer, f"{op}: {word}{corpus.ARROW}")
        print(f"  told '{op}:': {rate:.0%} exact on 32 held-out words, e.g. {op}: {word} ->{example!r}")
    print(f"  no instruction: '{word} ->' gives {greedy(model, tokenizer, word + corpus.ARROW)!r}")
    print(f"  text: 'the old king' -> {greedy(model, tokenizer, 'the old king', 40)!r}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
