"""Runtime benchmark: the device engine's adapter switch, decode speed and memory, beside peers.

    build worker ─► random HF llama + 8 random LoRA r=16 all-linear PEFT folders
                 ─► edgepeft.export int4 fused: separate (base + 8 .onnx_adapter files)
                                                merged   (8 graphs, one LoRA folded into each)
                 ─► genai_config.json in the separate folder (edgepeft.export.genai)
    one fresh process per measurement:
      switch         Engine over the separate export, 8 adapters loaded; time the engine's
                     work to make the next request use another adapter (round robin)
      reload         a new onnxruntime InferenceSession of one merged graph (median of a few)
      engine decode  Engine.generate greedy, batch 1, no adapter | LoRA a0 active
      genai decode   onnxruntime-genai's generator loop over the same graph and the same
                     .onnx_adapter (og.Adapters), the same prompt token ids
      engine memory  RSS before / after Engine(base) + load_adapter x 8, beside the file bytes
      merged memory  RSS before / after 8 InferenceSessions of the 8 merged graphs
    ─► BENCHMARKS.md section "runtime" (scripts/benchmarks_md.py), or --output FILE; --json FILE

    python scripts/bench_runtime.py                                   full run (~5 min, 2 cores)
    python scripts/bench_runtime.py --quick --output /tmp/runtime.md  smoke run, tiny shape

A contender that cannot run says why in its row ("failed: ..."); none is left out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

THREADS = 2
LORA_RANK = 16
ADAPTERS = tuple(f"a{i}" for i in range(8))
PROMPT = "the quick brown fox jumps over the lazy dog. edge devices run small models"
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the tiny tokenizer's

SWITCH_TARGET_US = 50.0
SWITCH_VS_RELOAD = 1000.0
DECODE_VS_GENAI = 1.0
MEMORY_VS_FILES = 1.1


@dataclass(frozen=True)
class Shape:
    """The model shape of a run and how much to measure."""

    name: str
    config: dict
    new_tokens: int
    runs: int
    switches: int
    reloads: int


FULL = Shape(
    "llama ~56M",
    dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
         max_position_embeddings=2048, tie_word_embeddings=False),
    new_tokens=128, runs=3, switches=20000, reloads=5,
)
QUICK = Shape(
    "tiny llama",
    dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=256, tie_word_embeddings=False),
    new_tokens=8, runs=1, switches=2000, reloads=2,
)


_START = time.perf_counter()


def log(line: str) -> None:
    print(f"bench_runtime [{time.perf_counter() - _START:6.1f} s]: {line}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """This process's resident set now (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def files_bytes(*paths: Path) -> int:
    """Bytes on disk of each graph (with its .data file) or adapter file."""
    total = 0
    for path in paths:
        for p in (path, path.with_name(path.name + ".data")):
            if p.is_file():
                total += p.stat().st_size
    return total


# ---------------------------------------------------------------- workers (fresh processes)


def _build(spec: dict) -> dict:
    """Random HF llama, 8 random LoRA folders, the separate and merged int4 exports."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import edgepeft.export as export
    from edgepeft.adapters.inject import add_adapter
    from edgepeft.adapters.peft_format import save_adapter
    from edgepeft.base import load_base
    from edgepeft.config import LoraConfig
    from edgepeft.export.genai import write_genai_config
    from edgepeft.tiny import tiny_tokenizer

    torch.set_num_threads(spec["torch_threads"])  # 1 for tiny shapes: threads only add waits
    work = Path(spec["work"])
    folder = work / "hf"
    config = dict(spec["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config, **SPECIAL_IDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model

    base, _ = load_base(folder, quant="none")
    lora = LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules="all-linear", init="random")
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(1 + i)
        add_adapter(base, lora, name)
        adapters[name] = str(save_adapter(base, work / "lora" / name, name))
    del base

    seconds = {}
    for mode in ("separate", "merged"):
        log(f"export {mode} int4 with {len(ADAPTERS)} adapters")
        start = time.perf_counter()
        export(folder, work / mode, adapters=adapters, weights="int4", mode=mode,
               verify=False, overwrite=True, quiet=True)
        seconds[mode] = time.perf_counter() - start
    write_genai_config(work / "separate", intra_op_threads=THREADS)
    return {"params": params, "export_seconds": seconds}


def _adapter_files(separate: Path) -> dict[str, Path]:
    return {name: next(separate.rglob(f"{name}.onnx_adapter")) for name in ADAPTERS}


def _merged_graphs(merged: Path) -> list[Path]:
    return [merged / name / "model.onnx" for name in ADAPTERS]


def _engine(separate: Path, load: bool = True):
    from edgepeft.runtime import Engine

    engine = Engine(separate, threads=THREADS, load_adapters=False)
    if load:
        for name, path in _adapter_files(separate).items():
            engine.load_adapter(path, name=name)
    return engine


def _switch(spec: dict) -> dict:
    """Median and p99 of the engine's switch to another adapter, round robin over 8."""
    engine = _engine(Path(spec["separate"]))
    engine.generate(PROMPT, adapter=ADAPTERS[0], max_new_tokens=2)  # a slot exists, as in serving

    def switch(name: str) -> None:
        engine.prepare(name).close()

    for name in ADAPTERS:  # first use builds each adapter's binding on the slot: not a switch
        switch(name)
    times = []
    clock = time.perf_counter_ns
    for i in range(spec["switches"]):
        name = ADAPTERS[i % len(ADAPTERS)]
        start = clock()
        switch(name)
        times.append(clock() - start)
    times.sort()
    return {
        "median_us": statistics.median(times) / 1000,
        "p99_us": times[int(0.99 * (len(times) - 1))] / 1000,
        "switches": len(times),
    }


def _reload(spec: dict) -> dict:
    """Creating an InferenceSession of a merged graph: what a merged deployment does to switch."""
    import onnxruntime as ort

    graphs = [Path(p) for p in spec["graphs"]]
    times = []
    for i in range(spec["reloads"] + 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.log_severity_level = 3
        start = time.perf_counter()
        session = ort.InferenceSession(str(graphs[i % len(graphs)]), options,
                                       providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
        del session
    return {"median_ms": 1000 * statistics.median(times[1:]), "runs_ms": [1000 * t for t in times]}


def _engine_decode(spec: dict) -> dict:
    """Engine.generate greedy, batch 1; decode tok/s from its own prefill/decode split."""
    engine = _engine(Path(spec["separate"]), load=spec["adapter"] is not None)
    # Exactly new_tokens tokens, eos never sampled, as og's min_length does: equal lengths.
    run = dict(adapter=spec["adapter"], max_new_tokens=spec["new_tokens"], ignore_eos=True,
               return_result=True)  # fmt: skip
    engine.generate(PROMPT, **{**run, "max_new_tokens": 4})  # warm-up: arenas, prepacked weights
    rates, prefill = [], []
    for _ in range(spec["runs"]):
        result = engine.generate(PROMPT, **run)
        rates.append(result.decode_tokens_per_s)
        prefill.append(result.prefill_ms)
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates,
            "prefill_ms": statistics.median(prefill), "tokens": result.token_ids,
            "prompt_ids": result.prompt_ids}


def _genai_decode(spec: dict) -> dict:
    """onnxruntime-genai's generator loop, greedy, no early stop; the adapter via og.Adapters."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec["separate"])
    threads = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    adapters = None
    if spec["adapter"]:
        adapters = og.Adapters(model)
        adapters.load(spec["adapter_file"], spec["adapter"])
    prompt = np.array([spec["prompt_ids"]], dtype=np.int32)

    def generate(count: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        total = prompt.shape[1] + count
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, spec["adapter"])
        start = time.perf_counter()
        generator.append_tokens(prompt)  # prefill
        prefilled = time.perf_counter()
        while not generator.is_done():  # count tokens: count - 1 decode runs
            generator.generate_next_token()
        done = time.perf_counter()
        return prefilled - start, done - prefilled, [int(t) for t in generator.get_sequence(0)[prompt.shape[1]:]]

    generate(4)
    rates, prefill, tokens = [], [], []
    for _ in range(spec["runs"]):
        p, d, tokens = generate(spec["new_tokens"])
        rates.append((spec["new_tokens"] - 1) / d)
        prefill.append(1000 * p)
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates,
            "prefill_ms": statistics.median(prefill), "tokens": tokens}


def _engine_memory(spec: dict) -> dict:
    """Resident memory the engine adds: the base session, then 8 adapters, then a request."""
    import numpy  # noqa: F401  imports first: their pages are not the engine's
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    import edgepeft.runtime  # noqa: F401

    separate = Path(spec["separate"])
    before = rss_bytes()
    engine = _engine(separate, load=False)
    base = rss_bytes()
    for name, path in _adapter_files(separate).items():
        engine.load_adapter(path, name=name)
    loaded = rss_bytes()
    engine.generate(PROMPT, adapter=ADAPTERS[0], max_new_tokens=4)
    served = rss_bytes()
    report = engine.memory()
    return {
        "base_rss": base - before,
        "adapters_rss": loaded - base,
        "engine_rss": loaded - before,
        "after_request_rss": served - before,
        "process_rss": served,
        "base_file_bytes": files_bytes(separate / "model.onnx"),
        "adapter_file_bytes": files_bytes(*_adapter_files(separate).values()),
        "reported": {"base": report.base_bytes, "adapters": report.adapter_bytes,
                     "kv_cache": report.kv_cache_bytes},
    }


def _merged_memory(spec: dict) -> dict:
    """Resident memory of 8 InferenceSessions, one per merged graph (one adapter each)."""
    import onnxruntime as ort

    graphs = [Path(p) for p in spec["graphs"]]
    before = rss_bytes()
    sessions = []
    for graph in graphs:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"]))
    after = rss_bytes()
    return {"sessions_rss": after - before, "process_rss": after, "file_bytes": files_bytes(*graphs),
            "sessions": len(sessions)}


WORKERS = {
    "build": _build,
    "switch": _switch,
    "reload": _reload,
    "engine_decode": _engine_decode,
    "genai_decode": _genai_decode,
    "engine_memory": _engine_memory,
    "merged_memory": _merged_memory,
}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh Python process (benchmarks_md.run_worker)."""
    import benchmarks_md

    return benchmarks_md.run_worker(__file__, spec, timeout)


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------- the benchmark


def bench(shape: Shape, work: Path) -> dict:
    """Build once, then every measurement in its own process; failures become reasons."""
    log(f"[{shape.name}] random model, {len(ADAPTERS)} LoRA r={LORA_RANK}, int4 exports")
    torch_threads = 1 if shape.config["hidden_size"] < 256 else THREADS
    built = run_worker({"kind": "build", "config": shape.config, "work": str(work),
                        "torch_threads": torch_threads})
    separate = work / "separate"
    files = _adapter_files(separate)
    graphs = [str(p) for p in _merged_graphs(work / "merged")]
    common = {"separate": str(separate), "new_tokens": shape.new_tokens, "runs": shape.runs}
    results: dict[str, dict] = {"build": built}

    def measure(key: str, spec: dict) -> dict:
        log(f"[{shape.name}] {key}")
        try:
            results[key] = run_worker(spec)
        except Exception as e:
            log(f"{key} failed:\n{e}")
            results[key] = {"missing": f"failed: {_reason(e)}"}
        return results[key]

    measure("switch", {"kind": "switch", **common, "switches": shape.switches})
    measure("reload", {"kind": "reload", "graphs": graphs, "reloads": shape.reloads})
    for adapter in (None, ADAPTERS[0]):
        tag = adapter or "base"
        engine = measure(f"engine_decode_{tag}", {"kind": "engine_decode", **common, "adapter": adapter})
        prompt_ids = engine.get("prompt_ids")
        if prompt_ids is None:
            results[f"genai_decode_{tag}"] = {"missing": "not run: no engine prompt ids to feed it"}
            continue
        measure(f"genai_decode_{tag}", {"kind": "genai_decode", **common, "adapter": adapter,
                                        "adapter_file": str(files[ADAPTERS[0]]), "prompt_ids": prompt_ids})
    measure("engine_memory", {"kind": "engine_memory", **common})
    measure("merged_memory", {"kind": "merged_memory", "graphs": graphs})
    return results


# ---------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _met(value: float | None, ok) -> str:
    return "-" if value is None else ("yes" if ok(value) else "no")


def targets(r: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met) rows; a missing measurement is 'not available', never a pass."""
    rows = []
    switch, reload = r.get("switch", {}), r.get("reload", {})
    median = switch.get("median_us")
    rows.append((f"adapter switch median <= {SWITCH_TARGET_US:.0f} µs",
                 "not available" if median is None else f"{median:.2f} µs",
                 _met(median, lambda v: v <= SWITCH_TARGET_US)))
    speedup = reload["median_ms"] * 1000 / median if median and "median_ms" in reload else None
    rows.append((f"adapter switch >= {SWITCH_VS_RELOAD:,.0f}x faster than a merged-graph reload",
                 "not available" if speedup is None else f"{speedup:,.0f}x",
                 _met(speedup, lambda v: v >= SWITCH_VS_RELOAD)))
    for tag, label in (("base", "no adapter"), (ADAPTERS[0], f"LoRA r={LORA_RANK} active")):
        ours, theirs = r.get(f"engine_decode_{tag}", {}), r.get(f"genai_decode_{tag}", {})
        ratio = (ours["decode_tok_s"] / theirs["decode_tok_s"]
                 if "decode_tok_s" in ours and "decode_tok_s" in theirs else None)
        rows.append((f"decode >= {DECODE_VS_GENAI:.1f}x onnxruntime-genai, {label}",
                     "not available" if ratio is None else f"{ratio:.2f}x",
                     _met(ratio, lambda v: v >= DECODE_VS_GENAI)))
    memory = r.get("engine_memory", {})
    ratio = (memory["engine_rss"] / (memory["base_file_bytes"] + memory["adapter_file_bytes"])
             if "engine_rss" in memory else None)
    rows.append((f"engine RSS (base + {len(ADAPTERS)} adapters) <= {MEMORY_VS_FILES}x their bytes",
                 "not available" if ratio is None else f"{ratio:.2f}x",
                 _met(ratio, lambda v: v <= MEMORY_VS_FILES)))
    return rows


def same_tokens(r: dict, tag: str) -> str:
    ours, theirs = r.get(f"engine_decode_{tag}", {}), r.get(f"genai_decode_{tag}", {})
    if "tokens" not in ours or "tokens" not in theirs:
        return "-"
    a, b = ours["tokens"], theirs["tokens"]
    return "yes" if a == b else f"no ({sum(x != y for x, y in zip(a, b, strict=False))} of {len(b)} differ)"


def markdown(shape: Shape, r: dict, quick: bool, seconds: float) -> str:
    c = shape.config
    built = r["build"]
    lines = [
        "## Runtime: adapter switch, decode and memory of the device engine",
        "",
        f"`python scripts/bench_runtime.py{' --quick' if quick else ''}`: {shape.name} "
        f"({built['params'] / 1e6:,.1f}M parameters; hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads / "
        f"{c['num_key_value_heads']} KV heads, vocab {c['vocab_size']:,}; random weights), "
        f"fused int4 graphs (the default recipe: fitted asymmetric blocks, int8 mix; block 32), {THREADS} intra-op threads, CPU. "
        f"{len(ADAPTERS)} random LoRA adapters r={LORA_RANK} on every linear layer but lm_head, "
        "exported once as a separate-mode base with one `.onnx_adapter` each, and once merged "
        f"({len(ADAPTERS)} graphs, one adapter folded into each). Every measurement runs in a "
        "fresh process.",
        "",
    ]
    switch, reload = r["switch"], r["reload"]
    lines += [
        "### Adapter switch vs reloading a merged graph", "",
        "| contender | median | p99 | runs |", "|---|---:|---:|---:|",
    ]
    if "median_us" in switch:
        lines.append(f"| edgepeft engine: next request on another loaded adapter | "
                     f"{switch['median_us']:.2f} µs | {switch['p99_us']:.2f} µs | {switch['switches']:,} |")
    else:
        lines.append(f"| edgepeft engine: next request on another loaded adapter | {switch['missing']} | | |")
    if "median_ms" in reload:
        lines.append(f"| onnxruntime: new InferenceSession of a merged graph | {reload['median_ms']:,.1f} ms "
                     f"| - | {len(reload['runs_ms']) - 1} |")
    else:
        lines.append(f"| onnxruntime: new InferenceSession of a merged graph | {reload['missing']} | | |")
    lines += ["", "A switch is `Engine.prepare(adapter)` + `Request.close()`, the engine's whole "
              "per-request adapter choice: the registry lookup, a free KV slot from the pool and "
              "that slot's IOBinding for the adapter, cached with its tensors already bound "
              "(no tensor is bound or copied), then the slot given back. Adapters round-robin over all 8, so every timed call changes adapter; each "
              "adapter's first use (building its binding) happens before timing. A merged "
              "deployment switches by creating the other graph's session (median of the runs "
              "after a first, cold one).", ""]

    lines += [
        "### Decode speed: the engine vs onnxruntime-genai on the same graph", "",
        f"Batch 1, greedy, {shape.new_tokens} new tokens (EOS ignored), the same prompt token ids "
        f"on both sides, median of {shape.runs} run(s); decode tok/s = (new tokens - 1) / time "
        "after prefill. The adapter is the same `.onnx_adapter` file: `Engine.generate(adapter=)` "
        "and `og.Adapters` + `set_active_adapter`.", "",
        "| adapter | edgepeft engine tok/s | onnxruntime-genai tok/s | ratio | engine prefill ms "
        "| genai prefill ms | same tokens |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for tag, label in (("base", "none"), (ADAPTERS[0], f"LoRA r={LORA_RANK} ({ADAPTERS[0]})")):
        ours, theirs = r[f"engine_decode_{tag}"], r[f"genai_decode_{tag}"]
        cell = lambda d, k, f: f.format(d[k]) if k in d else d.get("missing", "-")  # noqa: E731
        ratio = (f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x"
                 if "decode_tok_s" in ours and "decode_tok_s" in theirs else "-")
        lines.append(f"| {label} | {cell(ours, 'decode_tok_s', '{:,.1f}')} | "
                     f"{cell(theirs, 'decode_tok_s', '{:,.1f}')} | {ratio} | "
                     f"{cell(ours, 'prefill_ms', '{:.1f}')} | {cell(theirs, 'prefill_ms', '{:.1f}')} | "
                     f"{same_tokens(r, tag)} |")

    memory, merged = r["engine_memory"], r["merged_memory"]
    lines += [
        "", "### Resident memory: one base + 8 adapters vs 8 merged graphs", "",
        "RSS growth of a fresh process (after numpy, onnxruntime and tokenizers are imported) "
        "while it opens the models; file bytes are the graphs (+ external data) and adapter files.",
        "",
        "| contender | RSS growth | file bytes | RSS / file bytes |", "|---|---:|---:|---:|",
    ]
    if "engine_rss" in memory:
        files = memory["base_file_bytes"] + memory["adapter_file_bytes"]
        lines += [
            f"| edgepeft engine, base session | {_mib(memory['base_rss'])} | "
            f"{_mib(memory['base_file_bytes'])} | {memory['base_rss'] / memory['base_file_bytes']:.2f}x |",
            f"| edgepeft engine, + {len(ADAPTERS)} adapters loaded | {_mib(memory['engine_rss'])} | "
            f"{_mib(files)} | {memory['engine_rss'] / files:.2f}x |",
            f"| edgepeft engine, after one request (KV cache allocated) | "
            f"{_mib(memory['after_request_rss'])} | {_mib(files)} | "
            f"{memory['after_request_rss'] / files:.2f}x |",
        ]
    else:
        lines.append(f"| edgepeft engine | {memory['missing']} | | |")
    if "sessions_rss" in merged:
        lines.append(f"| onnxruntime, {merged['sessions']} merged-graph sessions | "
                     f"{_mib(merged['sessions_rss'])} | {_mib(merged['file_bytes'])} | "
                     f"{merged['sessions_rss'] / merged['file_bytes']:.2f}x |")
    else:
        lines.append(f"| onnxruntime, merged-graph sessions | {merged['missing']} | | |")
    if "engine_rss" in memory and "sessions_rss" in merged:
        lines += ["", f"{len(ADAPTERS)} merged graphs take {merged['sessions_rss'] / memory['engine_rss']:.1f}x "
                  "the engine's resident memory. The engine reports (engine.memory()): base "
                  f"{_mib(memory['reported']['base'])}, adapters {_mib(memory['reported']['adapters'])}, "
                  f"KV cache {_mib(memory['reported']['kv_cache'])}."]

    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets(r)]
    export_s = ", ".join(f"{k} {v:.1f} s" for k, v in built["export_seconds"].items())
    lines += ["", f"Exports: {export_s}. Whole benchmark: {seconds / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 8 tokens, 1 run (smoke test)")
    parser.add_argument("--output", type=Path, help="write the markdown here instead of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep models and graphs here (default: a temp folder, removed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0

    start = time.perf_counter()
    shape = QUICK if args.quick else FULL
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_runtime."))
    try:
        results = bench(shape, work)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(shape, results, args.quick, time.perf_counter() - start)
    if args.json:
        document = {"shape": {"name": shape.name, "config": shape.config, "new_tokens": shape.new_tokens,
                              "runs": shape.runs}, "results": results,
                    "targets": [dict(zip(("target", "measured", "met"), t, strict=True)) for t in targets(results)]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    from benchmarks_md import publish

    log(f"wrote {publish('runtime', text, args.output)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
