"""Serving benchmark: `edgepeft serve` under N concurrent openai clients, one adapter each.

    build (or --export DIR)  random HF llama + 8 random LoRA r=16 ─► int4 separate export
    server                   `edgepeft serve EXPORT --port 0` in a subprocess (8 adapters loaded)
    one at a time            each client's requests in turn: TTFT, per-token latency
    concurrent               N threads, each its own openai client and adapter, R requests each
    ─► a table on stdout: aggregate tok/s, p50/p99 TTFT and per-token latency, server RSS

    python scripts/bench_serve.py                      demo shape (~1 min on 2 cores)
    python scripts/bench_serve.py --quick              tiny shape, a smoke run
    python scripts/bench_serve.py --export out/        an existing separate export (its adapters)

Requests stream with ignore_eos, so every one decodes exactly --new-tokens tokens. The server
runs one request at a time (edgepeft.serve.scheduler): concurrency shows queueing, not batching.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LORA_RANK = 16
ADAPTERS = tuple(f"a{i}" for i in range(8))
PROMPT = "the quick brown fox jumps over the lazy dog. edge devices run small models"
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the tiny tokenizer's
DEMO = dict(vocab_size=384, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def log(line: str) -> None:
    print(f"bench_serve: {line}", file=sys.stderr, flush=True)


def build(shape: dict, work: Path) -> Path:
    """A random llama with 8 random LoRA adapters, exported int4 in separate mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepeft.adapters.inject import add_adapter
    from edgepeft.adapters.peft_format import save_adapter
    from edgepeft.base import load_base
    from edgepeft.config import LoraConfig
    from edgepeft.export import api
    from edgepeft.tiny import tiny_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **shape, **SPECIAL_IDS)
    folder = work / "hf"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    base, _ = load_base(folder, quant="none")
    lora = LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules="all-linear", init="random")
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(1 + i)
        add_adapter(base, lora, name)
        adapters[name] = save_adapter(base, work / "lora" / name, name)
    out = work / "separate"
    api.export(folder, out, adapters=adapters, weights="int4", mode="separate", verify=False,
               quiet=True)  # fmt: skip
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Served:
    """`edgepeft serve` in a subprocess; its URL read from uvicorn's start line."""

    def __init__(self, export: Path, threads: int, max_queue: int):
        command = [sys.executable, "-m", "edgepeft.cli", "serve", str(export), "--port", "0",
                   "--threads", str(threads), "--max-queue", str(max_queue),
                   "--served-model-name", "base", "--log-level", "info"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env=env)  # fmt: skip
        self.url = None
        for line in self.process.stderr:
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                self.url = found[1]
                break
        if self.url is None:
            raise RuntimeError(f"the server did not start (exit {self.process.wait()})")
        # uvicorn's start line is at info level, so is its access log: keep the pipe drained
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(120)


def one_request(client, model: str, new_tokens: int) -> dict:
    """TTFT and per-token latency of one streamed request (exactly new_tokens tokens)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "per_token": (end - first) / max(tokens - 1, 1),
            "tokens": tokens}  # fmt: skip


def run_clients(url: str, models: list[str], requests: int, new_tokens: int, concurrent: bool):
    import openai

    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(model):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                           timeout=600) as client:  # fmt: skip
            for _ in range(requests):
                r = one_request(client, model, new_tokens)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=client_loop, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for model in models:
            client_loop(model)
    wall = time.perf_counter() - start
    return results, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


def row(label: str, results: list[dict], wall: float) -> str:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1000 for r in results]
    per = [r["per_token"] * 1000 for r in results]
    return (f"| {label} | {len(results)} | {tokens / wall:.0f} | {percentile(ttft, .5):.1f} | "
            f"{percentile(ttft, .99):.1f} | {percentile(per, .5):.2f} | {percentile(per, .99):.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="an existing separate export (default: build)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few requests")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the server")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens = min(args.requests, 2), min(args.new_tokens, 16)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as work:
        export = args.export
        if export is None:
            log("building a random llama with 8 LoRA adapters (int4, separate)")
            export = build(TINY if args.quick else DEMO, Path(work))
        log(f"serving {export}")
        server = Served(export, args.threads, max_queue=max(args.clients * 2, 16))
        try:
            import openai

            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none") as client:
                names = [m.id for m in client.models.list().data]
                adapters = names[1:] or names
                one_request(client, adapters[0], 4)  # warm up
            models = [adapters[i % len(adapters)] for i in range(args.clients)]
            alone = run_clients(server.url, models, args.requests, args.new_tokens, False)
            together = run_clients(server.url, models, args.requests, args.new_tokens, True)
            rss = rss_bytes(server.process.pid)
        finally:
            server.close()
    print(f"\nedgepeft serve, {export.name if args.export else 'random llama'}: "
          f"{args.clients} clients x {args.requests} requests x {args.new_tokens} tokens, "
          f"{len(names) - 1} adapters loaded, {args.threads} threads\n")  # fmt: skip
    print("| run | requests | tok/s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | "
          "per-token p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(row("one at a time", *alone))
    print(row(f"{args.clients} concurrent", *together))
    print(f"\nserver RSS with {len(names) - 1} adapters loaded: {rss / 2**20:.1f} MiB "
          f"(median TTFT ratio concurrent/alone: "
          f"{statistics.median(r['ttft'] for r in together[0]) / statistics.median(r['ttft'] for r in alone[0]):.1f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
