"""Serving benchmark: `edgepeft serve` under N concurrent openai clients, one adapter each.

    build (or --export DIR)  a llama (random demo shape, or --real: SmolLM2-135M-Instruct)
                             + 8 random LoRA r=16 on every linear layer ─► int4 separate export
    server                   `edgepeft serve EXPORT --port 0` in a subprocess (8 adapters loaded)
    one at a time            each client's requests in turn: TTFT, per-token latency
    concurrent               N threads, each its own openai client and adapter, R requests each
                             (continuous batching: a request joins the running batch between
                             decode steps, LoRA adapters mixed in one forward; serve/scheduler.py)
    same adapter             the same N threads all on one adapter: what mixing costs
    peer (--real)            llama-cpp-python's server (python -m llama_cpp.server) on the same
                             weights: convert_hf_to_gguf ─► Q4_K_M, adapter a0 ─► LoRA GGUF;
                             the same loads on that one adapter (it serves one LoRA, fixed at
                             start); eos banned by logit_bias so every request runs its length
    ─► a table: aggregate tok/s and its ratio to one at a time, p50/p99 TTFT and per-token
       latency, server RSS; BENCHMARKS.md section "serve" with --real, or --output FILE

    python scripts/bench_serve.py                      demo shape (~1 min on 2 cores)
    python scripts/bench_serve.py --quick              tiny shape, a smoke run
    python scripts/bench_serve.py --real --clients 8   SmolLM2 (scripts/real_model.py), ~5 min
    python scripts/bench_serve.py --export out/        an existing separate export (its adapters)

Requests stream with ignore_eos, so every one decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
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


def build(shape: dict | None, work: Path) -> Path:
    """A llama (random of `shape`, or None: the real SmolLM2) with 8 random LoRA adapters,
    exported int4 in separate mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepeft.adapters.inject import add_adapter
    from edgepeft.adapters.peft_format import save_adapter
    from edgepeft.base import load_base
    from edgepeft.config import LoraConfig
    from edgepeft.export import api
    from edgepeft.tiny import tiny_tokenizer

    torch.manual_seed(0)
    if shape is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from real_model import smollm2_dir

        folder = smollm2_dir()
    else:
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
        with torch.no_grad():  # random init's B is not 0, but small: a real adapter's size
            for p in base.parameters():
                if p.requires_grad:
                    p.mul_(0.1)
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

    def __init__(self, export: Path, threads: int, max_queue: int, max_batch: int = 8):
        command = [sys.executable, "-m", "edgepeft.cli", "serve", str(export), "--port", "0",
                   "--threads", str(threads), "--max-queue", str(max_queue),
                   "--max-batch", str(max_batch),
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


PEER_EOS_IDS = (0, 2)
"""SmolLM2's <|endoftext|> and <|im_end|>: banned on the peer, which has no ignore_eos."""


def one_request(client, model: str, new_tokens: int, peer: bool = False) -> dict:
    """TTFT and per-token latency of one streamed request (exactly new_tokens tokens). The
    peer reports no usage while streaming: its tokens are its text chunks (one per token)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    text = []
    if peer:
        options = {"logit_bias": {str(t): -100 for t in PEER_EOS_IDS}}
    else:
        options = {"stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=new_tokens, temperature=0, stream=True, **options
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            text.append(chunk.choices[0].text)
            first = first or time.perf_counter()
            if peer:
                tokens += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "per_token": (end - first) / max(tokens - 1, 1),
            "tokens": tokens, "model": model, "text": "".join(text)}  # fmt: skip


def run_clients(
    url: str, models: list[str], requests: int, new_tokens: int, concurrent: bool, peer=False
):
    import openai

    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(model):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                           timeout=600) as client:  # fmt: skip
            for _ in range(requests):
                r = one_request(client, model, new_tokens, peer)
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


def row(label: str, results: list[dict], wall: float, base_rate: float) -> str:
    rate = tokens_per_s(results, wall)
    ttft = [r["ttft"] * 1000 for r in results]
    per = [r["per_token"] * 1000 for r in results]
    return (f"| {label} | {len(results)} | {rate:.0f} | {rate / base_rate:.2f}x | "
            f"{percentile(ttft, .5):.1f} | {percentile(ttft, .99):.1f} | "
            f"{percentile(per, .5):.2f} | {percentile(per, .99):.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="an existing separate export (default: build)")
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (cached)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few requests")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the server")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument("--output", type=Path, help="write the markdown here (default with "
                        "--real: BENCHMARKS.md, section serve)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="build the export here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens = min(args.requests, 2), min(args.new_tokens, 16)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as temporary:
        work = args.workdir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        export = args.export
        if export is None:
            what = "SmolLM2-135M-Instruct" if args.real else "a random llama"
            log(f"building {what} with 8 LoRA adapters (int4, separate)")
            export = build(None if args.real else TINY if args.quick else DEMO, work)
        log(f"serving {export}")
        server = Served(export, args.threads, max(args.clients * 2, 16), args.max_batch)
        try:
            import openai

            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none") as client:
                names = [m.id for m in client.models.list().data]
                adapters = names[1:] or names
                one_request(client, adapters[0], 4)  # warm up
            models = [adapters[i % len(adapters)] for i in range(args.clients)]
            log("one at a time")
            alone = run_clients(server.url, models, args.requests, args.new_tokens, False)
            log(f"{args.clients} concurrent clients, {len(set(models))} adapters")
            mixed = run_clients(server.url, models, args.requests, args.new_tokens, True)
            log(f"{args.clients} concurrent clients, one adapter")
            same = run_clients(server.url, [models[0]] * args.clients, args.requests,
                               args.new_tokens, True)  # fmt: skip
            rss = rss_bytes(server.process.pid)
        finally:
            server.close()
        sizes = export_sizes(export)
        peer = None
        if args.real and args.export is None:
            peer = llama_server_runs(work, args)
    model = export.name if args.export else "SmolLM2-135M-Instruct" if args.real else "random llama"
    text = markdown(model, args, len(names) - 1, alone, mixed, same, rss, sizes, peer)
    print(text)
    if args.json:
        runs = {"one at a time": alone, "mixed": mixed, "same adapter": same}
        if isinstance(peer, dict):
            runs.update({f"llama.cpp server, {k}": v for k, v in peer.items()})
        numbers = {name: {"requests": results, "wall_s": wall, "tok_s": tokens_per_s(results, wall)}
                   for name, (results, wall) in runs.items()}  # fmt: skip
        args.json.write_text(json.dumps({"model": model, "rss_bytes": rss, "runs": numbers}, indent=1))
    if args.output:
        args.output.write_text(text)
    elif args.real and args.export is None:
        from benchmarks_md import write_section

        log(f"wrote {write_section('serve', text)}")
    return 0


def llama_server_runs(work: Path, args) -> dict | str:
    """{"one at a time", "concurrent"} on llama-cpp-python's server with adapter a0 (the
    same weights, Q4_K_M), or why it was skipped."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_quality as bq
    from real_model import smollm2_dir

    missing = bq.installed("llama_cpp") or bq.installed("sse_starlette") or bq.installed(
        "pydantic_settings"
    )
    if missing:
        return missing
    log("llama.cpp peer: converting SmolLM2 to Q4_K_M and adapter a0 to a LoRA GGUF")
    f32 = bq.gguf_f32(smollm2_dir(), work / "smollm2-f32.gguf")
    q4 = bq.gguf_quantized(f32, "Q4_K_M", work / "smollm2-q4_k_m.gguf")
    lora = bq.gguf_lora(work / "lora" / ADAPTERS[0], smollm2_dir(), work / "a0-f32.gguf")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --interrupt_requests False: by default a new request cuts the running one short
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(q4), "--lora_path",
               str(lora), "--n_threads", str(args.threads), "--n_ctx", "2048",
               "--host", "127.0.0.1", "--port", str(port),
               "--interrupt_requests", "False"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(240):
            if server.poll() is not None:
                return f"llama_cpp.server exited with {server.returncode}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            return "llama_cpp.server did not answer within 2 minutes"
        import openai

        with openai.OpenAI(base_url=f"{url}/v1", api_key="none") as client:
            one_request(client, "a0", 4, peer=True)  # warm up
        models = ["a0"] * args.clients
        log("llama.cpp peer: one at a time")
        alone = run_clients(url, models, args.requests, args.new_tokens, False, peer=True)
        log(f"llama.cpp peer: {args.clients} concurrent clients")
        together = run_clients(url, models, args.requests, args.new_tokens, True, peer=True)
        counts = {r["tokens"] for results, _ in (alone, together) for r in results}
        if counts != {args.new_tokens}:
            return (f"llama_cpp.server answered {sorted(counts)} tokens per request, not "
                    f"{args.new_tokens}")  # fmt: skip
        return {"one at a time": alone, "concurrent": together}
    finally:
        server.terminate()
        server.wait(120)


def export_sizes(export: Path) -> tuple[float, float]:
    """(base graph bytes, mean adapter file bytes) of a separate export."""
    base = sum(f.stat().st_size for f in export.glob("model.onnx*"))
    files = list((export / "adapters").glob("*.onnx_adapter"))
    return base, sum(f.stat().st_size for f in files) / max(len(files), 1)


def identical(results: list[dict], alone: list[dict]) -> str:
    """"equal/answers": answers equal to that adapter's answer one at a time (every request
    sends the same prompt, so one answer per adapter is the reference)."""
    reference = {r["model"]: r["text"] for r in alone}
    return f"{sum(r['text'] == reference[r['model']] for r in results)}/{len(results)}"


def table_head(ratio: str) -> list[str]:
    """The header of a runs table whose ratio column is named `ratio`."""
    return [
        f"| run | requests | tok/s | {ratio} | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | "
        "per-token p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]


def tokens_per_s(results: list[dict], wall: float) -> float:
    return sum(r["tokens"] for r in results) / wall


def markdown(model, args, loaded, alone, mixed, same, rss, sizes, peer=None) -> str:
    base = tokens_per_s(*alone)
    mixed_rate, same_rate = tokens_per_s(*mixed), tokens_per_s(*same)
    per_token = statistics.median(r["per_token"] for r in mixed[0]) / statistics.median(
        r["per_token"] for r in same[0]
    )
    kinds = len(set(args_models(args)))
    lines = [
        "## serve",
        "",
        f"`scripts/bench_serve.py{' --real' if args.real else ''}`: `edgepeft serve` on {model}, "
        f"int4 separate export, {loaded} LoRA r={LORA_RANK} adapters on every linear layer "
        f"loaded; {args.clients} streaming `openai` clients x {args.requests} requests x "
        f"{args.new_tokens} tokens (ignore_eos), greedy; server: {args.threads} onnxruntime "
        f"threads, --max-batch {args.max_batch}; loopback.",
        "",
        *table_head("vs one at a time"),
        row("one at a time", *alone, base),
        row(f"{args.clients} concurrent, {kinds} adapters", *mixed, base),
        row(f"{args.clients} concurrent, one adapter", *same, base),
        "",
        f"- Aggregate decode with {args.clients} clients on different adapters: "
        f"**{mixed_rate / base:.2f}x** one at a time (goal >= 4x with 8 clients).",
        f"- A mixed-adapter batch against a same-adapter batch, per token (median): "
        f"**{per_token:.2f}x** (goal <= 1.15x); aggregate {mixed_rate:.0f} vs {same_rate:.0f} tok/s.",
        f"- Answers equal to the same adapter's answer one at a time (greedy, {args.new_tokens} "
        "tokens): "
        f"{identical(mixed[0], alone[0])} with {kinds} adapters, "
        f"{identical(same[0], alone[0])} on one (an int4 graph with "
        "int8 activations moves a row's logits with its place in the cache; see README).",
        f"- Server RSS with {loaded} adapters loaded: {rss / 2**20:.1f} MiB.",
        f"- Bytes behind each decode step: the base graph is {sizes[0] / 2**20:.1f} MiB, one "
        f"adapter {sizes[1] / 2**20:.1f} MiB (fp32). A same-adapter batch reads one adapter per "
        f"step, a batch of {kinds} different ones reads all of theirs: "
        f"{(sizes[0] + sizes[1]) / 2**20:.0f} vs {(sizes[0] + kinds * sizes[1]) / 2**20:.0f} "
        "MiB per step.",
        "- Continuous batching: a request joins the running batch between two decode steps "
        "(its prefill runs alone, then it decodes with the others) and leaves when it ends; "
        "TTFT includes the wait for a free row.",
    ]
    if isinstance(peer, dict):
        peer_alone, peer_together = peer["one at a time"], peer["concurrent"]
        peer_rate = tokens_per_s(*peer_together)
        lines += [
            "",
            "Peer: llama-cpp-python's server (`python -m llama_cpp.server`) on the same weights "
            "(convert_hf_to_gguf.py ─► Q4_K_M) with adapter a0 converted by "
            "convert_lora_to_gguf.py; it takes one LoRA, fixed at start, so it runs the "
            "one-adapter load; eos banned through logit_bias (it has no ignore_eos). Ratios "
            "against edgepeft one at a time.",
            "",
            *table_head("vs edgepeft one at a time"),
            row("llama.cpp server, one at a time", *peer_alone, base),
            row(f"llama.cpp server, {args.clients} concurrent, one adapter", *peer_together, base),
            "",
            f"- edgepeft with {args.clients} concurrent clients on one adapter against the "
            f"llama.cpp server under the same load: **{same_rate / peer_rate:.2f}x** "
            f"({same_rate:.0f} vs {peer_rate:.0f} tok/s); on {kinds} "
            f"different adapters (which that server cannot serve at once): "
            f"{mixed_rate / peer_rate:.2f}x.",
        ]
    elif peer:
        lines += ["", f"- Peer llama-cpp-python server: skipped ({peer})."]
    return "\n".join(lines) + "\n"


def args_models(args) -> list[int]:
    return [i % len(ADAPTERS) for i in range(args.clients)]


if __name__ == "__main__":
    sys.exit(main())
