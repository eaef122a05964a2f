"""Export benchmark: batch-1 CPU decode speed of edgepeft's graphs beside onnxruntime-genai's.

    per model shape (random weights; speed does not depend on their values)
      build worker ─► HF folder + tiny tokenizer, LoRA r=16 all-linear (init "random", PEFT folder)
                  ─► edgepeft.export: fused int4 | separate int4 + .onnx_adapter | merged int4
                                      | generic int4                      (edgepeft/export/)
      python -m onnxruntime_genai.models.builder -p int4 -e cpu [--extra_options adapter_path=]
      decode workers, one fresh process per contender:
        ort    the same Python loop for every graph: InferenceSession with IO binding,
               2 intra-op threads; prefill the prompt, then greedy decode step by step
        og     onnxruntime-genai's own generator loop
        torch  PyTorch eager fp32, the same loop over the HF model with its KV cache
      median of the runs ─► tok/s, ratios to the builder's graphs
    memory worker: peak RSS of exporting a ~1B random llama, beside its fp32 size
    ─► BENCHMARKS.md section "export" (scripts/benchmarks_md.py), or --output FILE; --json FILE

    python scripts/bench_export.py            full run (~15 min on 2 cores)
    python scripts/bench_export.py --quick --output /tmp/bench.md    smoke run on tiny shapes

A contender that cannot run says why in its row ("not available: ..."); none is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT_TOKENS = 16
THREADS = 2
LORA_RANK = 16
ADAPTER = "bench"
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the tiny tokenizer's


@dataclass(frozen=True)
class Shape:
    """One model shape of the benchmark: its HF config and how long to decode."""

    name: str
    config: dict
    new_tokens: int
    runs: int


_LLAMA_56M = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
_QWEN25_05B = dict(  # Qwen2.5-0.5B's shape: q/k/v biases, tied embeddings
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
_LLAMA_1B = dict(  # TinyLlama-1.1B's shape, for the export memory measurement only
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
_TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)

FULL_SHAPES = (
    Shape("llama ~56M", _LLAMA_56M, new_tokens=128, runs=3),
    Shape("Qwen2.5-0.5B shape", _QWEN25_05B, new_tokens=64, runs=3),
)
QUICK_SHAPES = (Shape("tiny qwen2", dict(model_type="qwen2", **_TINY, tie_word_embeddings=True), 8, 1),)
FULL_MEMORY = Shape("llama ~1.1B", _LLAMA_1B, 0, 0)
QUICK_MEMORY = Shape("tiny llama", dict(model_type="llama", **_TINY, tie_word_embeddings=False), 0, 0)

BUILDER = "builder int4"
BUILDER_LORA = "builder int4, LoRA baked in"
FUSED = "edgepeft fused int4, no adapter"
DEFAULT = "edgepeft fused int4, default recipe (search + int8 mix)"
SEPARATE_OFF = "edgepeft separate int4, no adapter active"
SEPARATE_ON = "edgepeft separate int4, LoRA r=16 active (switchable)"
MERGED = "edgepeft merged int4 (LoRA folded in)"
GENERIC = "edgepeft generic int4 (torch.onnx)"
TORCH = "PyTorch eager fp32"
OG_BUILDER = "onnxruntime-genai generator loop, builder int4"
OG_FUSED = "onnxruntime-genai generator loop, edgepeft fused int4"
ORDER = (FUSED, DEFAULT, SEPARATE_ON, SEPARATE_OFF, MERGED, GENERIC, BUILDER, BUILDER_LORA, TORCH,
         OG_BUILDER, OG_FUSED)


def log(line: str) -> None:
    print(f"bench_export: {line}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- workers (fresh processes)


def _make_model(spec: dict) -> dict:
    """Random-weight HF folder (+ tiny tokenizer) and, if asked, a random LoRA PEFT folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepeft.tiny import tiny_tokenizer

    config = dict(spec["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config, **SPECIAL_IDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = Path(spec["folder"])
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    result = {"params": params, "fp32_bytes": params * 4}
    if spec.get("adapter"):
        from edgepeft.adapters.inject import add_adapter
        from edgepeft.adapters.peft_format import save_adapter
        from edgepeft.base import load_base
        from edgepeft.config import LoraConfig

        base, _ = load_base(folder, quant="none")
        torch.manual_seed(1)
        lora = LoraConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules="all-linear", init="random")
        add_adapter(base, lora, ADAPTER)
        save_adapter(base, spec["adapter"], ADAPTER)
    return result


def _export(spec: dict) -> dict:
    """One edgepeft export; reports its wall time and this process's peak RSS."""
    import edgepeft.export as export

    start = time.perf_counter()
    export(
        spec["folder"],
        spec["out"],
        adapters={ADAPTER: spec["adapter"]} if spec.get("adapter") else None,
        weights="int4",
        # RTN everywhere but the "default" row: the same format as the builder's, so the
        # rows compare graphs, not quantizers (bench_quality.py compares those).
        int4_method=spec.get("int4_method", "rtn"),
        mixed_precision=spec.get("mixed_precision", False),
        mode=spec.get("mode", "merged"),
        graph=spec.get("graph", "auto"),
        verify=False,
        overwrite=True,
        quiet=True,
    )
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def _ort_decode(spec: dict) -> dict:
    """The decode loop every ONNX graph gets: IO binding, KV cache kept as OrtValues."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    # An active adapter is its parameters fed as the graph inputs they are named after; that
    # is what RunOptions.add_active_adapter does in session.run, but run_with_iobinding
    # ignores active adapters (onnxruntime 1.31 warns so), so they are bound here instead.
    adapter = {}
    if spec.get("adapter"):
        adapter = ort.AdapterFormat.read_adapter(spec["adapter"]).get_parameters()
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]
    kv_dtype = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32
    prompt = np.array([spec["prompt"]], dtype=np.int64)  # (1, T)

    def step(ids: np.ndarray, total: int, past: dict) -> tuple[int, dict]:
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if "position_ids" in inputs:
            positions = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
            binding.bind_cpu_input("position_ids", positions)
        for name, value in {**adapter, **past}.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        token = int(values[0].numpy()[0, -1].argmax())
        present = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in zip(outputs[1:], values[1:], strict=True)
        }
        return token, present

    def generate(count: int) -> tuple[float, float, list[int]]:
        empty = np.zeros((1, spec["kv_heads"], 0, spec["head_dim"]), kv_dtype)
        past = {n: ort.OrtValue.ortvalue_from_numpy(empty) for n in past_names}
        start = time.perf_counter()
        token, past = step(prompt, prompt.shape[1], past)
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(count - 1):
            token, past = step(np.array([[token]], np.int64), prompt.shape[1] + len(tokens), past)
            tokens.append(token)
        return prefilled - start, time.perf_counter() - prefilled, tokens

    generate(min(4, spec["new_tokens"]))  # warm-up: arenas, prepacked weights
    return _timed(generate, spec)


def _og_decode(spec: dict) -> dict:
    """onnxruntime-genai's generator loop (its own KV handling), greedy, no early stop."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec["model"])
    threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    prompt = np.array([spec["prompt"]], dtype=np.int32)

    def generate(count: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        total = prompt.shape[1] + count
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)  # prefill
        prefilled = time.perf_counter()
        while not generator.is_done():  # count tokens: count - 1 decode runs
            generator.generate_next_token()
        done = time.perf_counter()
        return prefilled - start, done - prefilled, [int(t) for t in generator.get_sequence(0)[prompt.shape[1]:]]

    generate(min(4, spec["new_tokens"]))
    return _timed(generate, spec)


def _torch_decode(spec: dict) -> dict:
    """PyTorch eager fp32: the HF model and its KV cache, the same prefill + step loop."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    prompt = torch.tensor([spec["prompt"]])

    @torch.inference_mode()
    def generate(count: int) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(count - 1):
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
        return prefilled - start, time.perf_counter() - prefilled, tokens

    generate(min(4, spec["new_tokens"]))
    return _timed(generate, spec)


def _timed(generate, spec: dict) -> dict:
    prefill, decode, tokens = [], [], []
    for _ in range(spec["runs"]):
        p, d, tokens = generate(spec["new_tokens"])
        prefill.append(p)
        decode.append(d)
    steps = spec["new_tokens"] - 1
    return {
        "decode_tok_s": steps / statistics.median(decode),
        "decode_tok_s_runs": [steps / d for d in decode],
        "prefill_ms": 1000 * statistics.median(prefill),
        "tokens": tokens,
        "peak_rss_mb": peak_rss_mb(),
    }


def _batch(spec: dict) -> list[dict]:
    """Several make/export jobs in one process (--quick: one torch import instead of five)."""
    return [WORKERS[job["kind"]](job) for job in spec["jobs"]]


WORKERS = {
    "make": _make_model,
    "export": _export,
    "batch": _batch,
    "ort": _ort_decode,
    "og": _og_decode,
    "torch": _torch_decode,
}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh Python process (benchmarks_md.run_worker)."""
    import benchmarks_md

    return benchmarks_md.run_worker(__file__, spec, timeout)


# ---------------------------------------------------------------- the benchmark


@dataclass
class Row:
    name: str
    result: dict | None = None
    """The decode worker's numbers, or None when `missing` says why not."""
    missing: str = ""
    nodes: int | None = None
    size_mb: float | None = None

    @property
    def tok_s(self) -> float | None:
        return self.result["decode_tok_s"] if self.result else None


@dataclass
class ShapeResult:
    shape: Shape
    params: int = 0
    rows: dict[str, Row] = field(default_factory=dict)
    exports: dict[str, dict] = field(default_factory=dict)
    """Export name -> {"seconds", "peak_rss_mb"} or {"missing"}."""


def _graph_facts(model_path: Path) -> tuple[int, float]:
    """(node count, model.onnx + external data size in MB)."""
    import onnx

    nodes = len(onnx.load(str(model_path), load_external_data=False).graph.node)
    size = sum(p.stat().st_size for p in model_path.parent.iterdir() if p.name.startswith(model_path.name))
    return nodes, size / 1e6


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__


def _builder(folder: Path, out: Path, cache: Path, adapter: Path | None) -> dict:
    """onnxruntime-genai's model builder, int4 for CPU, optionally with the LoRA baked in."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder),
               "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)]
    if adapter is not None:
        command += ["--extra_options", f"adapter_path={adapter}"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"model builder failed: {last}")
    return {"seconds": time.perf_counter() - start}


def _edgepeft_exports(shape: Shape, work: Path, quick: bool, result: ShapeResult) -> dict:
    """Model folder, LoRA folder and edgepeft's exports; row -> (model.onnx, adapter) | reason."""
    folder, adapter = work / "hf", work / "lora"
    make = {"kind": "make", "config": shape.config, "folder": str(folder), "adapter": str(adapter)}
    graphs: dict[str, tuple[Path, Path | None] | str] = {}
    exports = {
        "fused": ({}, [FUSED]),
        "default": ({"int4_method": "search", "mixed_precision": True}, [DEFAULT]),
        "merged": ({"adapter": str(adapter), "mode": "merged"}, [MERGED]),
        "generic": ({"graph": "generic"}, [GENERIC]),
    }
    if importlib.util.find_spec("edgepeft.export.separate") is not None:
        exports["separate"] = ({"adapter": str(adapter), "mode": "separate"}, [SEPARATE_OFF, SEPARATE_ON])
    else:
        for row in (SEPARATE_OFF, SEPARATE_ON):
            graphs[row] = "not available: separate mode missing (edgepeft/export/separate.py)"
        result.exports["separate"] = {"missing": "separate mode missing"}
    jobs = {
        name: {"kind": "export", "folder": str(folder), "out": str(work / f"edgepeft-{name}"), **options}
        for name, (options, _) in exports.items()
    }
    if quick:  # one process for all but fused (the memory row): peak RSS only for fused
        batched = [name for name in jobs if name != "fused"]
        log(f"[{shape.name}] random model, LoRA r={LORA_RANK}, edgepeft exports {batched}")
        made, *done = run_worker({"kind": "batch", "jobs": [make, *(jobs[n] for n in batched)]})
        outcomes = {name: {"seconds": d["seconds"]} for name, d in zip(batched, done, strict=True)}
        log(f"[{shape.name}] edgepeft export fused int4")
        outcomes["fused"] = run_worker(jobs["fused"])
    else:
        log(f"[{shape.name}] random model + LoRA r={LORA_RANK} folders")
        made = run_worker(make)
        outcomes = {}
        for name, job in jobs.items():
            log(f"[{shape.name}] edgepeft export {name} int4")
            try:
                outcomes[name] = run_worker(job)
            except Exception as e:  # reported in the table, and the worker's stderr here
                log(f"export {name} failed:\n{e}")
                outcomes[name] = {"missing": _reason(e)}
    result.params = made["params"]
    for name, (_, rows) in exports.items():
        result.exports[name] = outcomes[name]
        out = Path(jobs[name]["out"])
        if "missing" in outcomes[name]:
            for row in rows:
                graphs[row] = f"failed: export: {outcomes[name]['missing']}"
            continue
        model = out / ADAPTER / "model.onnx" if name == "merged" else out / "model.onnx"
        if name == "separate":
            files = sorted(out.rglob("*.onnx_adapter"))
            graphs[SEPARATE_OFF] = (model, None)
            graphs[SEPARATE_ON] = (model, files[0]) if files else "failed: no .onnx_adapter written"
        else:
            graphs[rows[0]] = (model, None)
    return graphs


def bench_shape(shape: Shape, work: Path, quick: bool) -> ShapeResult:
    """Build every contender of one shape, then time each in its own process."""
    result = ShapeResult(shape)
    folder, adapter = work / "hf", work / "lora"
    graphs = _edgepeft_exports(shape, work, quick, result)
    for row, baked in ((BUILDER, None), (BUILDER_LORA, adapter)):
        out = work / ("builder-lora" if baked else "builder")
        log(f"[{shape.name}] {row}")
        try:
            result.exports[row] = _builder(folder, out, work / "builder-cache", baked)
            graphs[row] = (out / "model.onnx", None)
        except Exception as e:
            log(f"{row} failed: {e}")
            result.exports[row] = {"missing": _reason(e)}
            graphs[row] = f"not available: {_reason(e)}"
    shutil.rmtree(work / "builder-cache", ignore_errors=True)

    heads = shape.config["num_attention_heads"]
    common = {
        "prompt": [3 + (7 * i) % (shape.config["vocab_size"] - 3) for i in range(PROMPT_TOKENS)],
        "new_tokens": shape.new_tokens,
        "runs": shape.runs,
        "threads": THREADS,
        "kv_heads": shape.config.get("num_key_value_heads", heads),
        "head_dim": shape.config["hidden_size"] // heads,
    }
    plans = [(row, "ort", graph) for row, graph in graphs.items()]
    plans.append((TORCH, "torch", (folder, None)))
    plans.append((OG_BUILDER, "og", graphs.get(BUILDER)))
    fused = graphs.get(FUSED)
    if isinstance(fused, tuple):
        try:
            from edgepeft.export.genai import write_genai_config

            write_genai_config(fused[0].parent, intra_op_threads=THREADS)
            plans.append((OG_FUSED, "og", fused))
        except Exception as e:
            plans.append((OG_FUSED, "og", f"failed: genai_config: {_reason(e)}"))
    else:
        plans.append((OG_FUSED, "og", fused))
    for row, kind, graph in plans:
        if not isinstance(graph, tuple):
            result.rows[row] = Row(row, missing=graph or "not available")
            continue
        model, adapter_file = graph
        og_folder = kind == "og"
        log(f"[{shape.name}] decode: {row}")
        spec = {**common, "kind": kind, "model": str(model.parent if og_folder else model),
                "adapter": str(adapter_file) if adapter_file else None}
        try:
            entry = Row(row, result=run_worker(spec))
            log(f"[{shape.name}] {row}: {entry.tok_s:.1f} tok/s")
        except Exception as e:
            log(f"{row} failed:\n{e}")
            entry = Row(row, missing=f"failed: {_reason(e)}")
        if kind != "torch":
            entry.nodes, entry.size_mb = _graph_facts(model)
        result.rows[row] = entry
    return result


def bench_memory(shape: Shape, work: Path) -> dict:
    """Peak RSS of `edgepeft.export` (int4, no verify) on a random model, in a fresh process."""
    folder = work / "hf"
    log(f"[memory] random {shape.name} folder")
    made = run_worker({"kind": "make", "config": shape.config, "folder": str(folder)})
    log(f"[memory] exporting {shape.name} int4")
    try:
        exported = run_worker({"kind": "export", "folder": str(folder), "out": str(work / "out")})
    except Exception as e:
        log(f"memory export failed:\n{e}")
        exported = {"missing": _reason(e)}
    shutil.rmtree(work, ignore_errors=True)
    return {**made, **exported, "shape": shape.name}


# ---------------------------------------------------------------- report


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.0f}K"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def ratio(results: list[ShapeResult], shape: str, row: str, over: str) -> float | None:
    for r in results:
        if r.shape.name == shape:
            a, b = r.rows[row].tok_s if row in r.rows else None, r.rows[over].tok_s if over in r.rows else None
            return None if a is None or b is None else a / b
    return None


def markdown(results: list[ShapeResult], memory: dict, quick: bool, seconds: float) -> str:
    lines = [
        "## Export: decode speed against onnxruntime-genai's model builder",
        "",
        f"`python scripts/bench_export.py{' --quick' if quick else ''}`: random weights (speed does "
        f"not depend on their values), batch 1, prompt of {PROMPT_TOKENS} tokens, greedy decode, "
        f"{THREADS} intra-op threads, CPU. Every ONNX graph runs in the same Python loop over an "
        "onnxruntime InferenceSession (IO binding, the KV cache kept as OrtValues); "
        "the onnxruntime-genai rows use its own generator loop instead. Decode tok/s = "
        "(new tokens - 1) / time after prefill, median of the runs; each contender in a fresh "
        "process. int4 is symmetric RTN (`int4_method=\"rtn\"`, no mixed precision) in every row but "
        "the default-recipe one (fitted asymmetric blocks, int8 for the table, q|k|v and some "
        "down_proj: larger, so slower), block 32, accuracy_level 4 (int8 activations), "
        f"the builder's CPU default. The LoRA is r={LORA_RANK} on every linear layer but lm_head "
        "(random, non-zero B), made with edgepeft and saved in PEFT format; the builder bakes it in "
        "with `--extra_options adapter_path=` (its own LoRA MatMuls beside the base ones).",
        "",
    ]
    for r in results:
        s = r.shape
        builder, builder_lora = r.rows.get(BUILDER), r.rows.get(BUILDER_LORA)
        lines += [
            f"### {s.name} ({_count(r.params)} parameters; hidden {s.config['hidden_size']}, "
            f"{s.config['num_hidden_layers']} layers, {s.config['num_attention_heads']} heads / "
            f"{s.config.get('num_key_value_heads')} KV heads, vocab {s.config['vocab_size']:,}"
            f"{', tied embeddings' if s.config.get('tie_word_embeddings') else ''}): "
            f"{s.new_tokens} new tokens, {s.runs} run(s)",
            "",
            "| contender | decode tok/s | vs builder int4 | vs builder + LoRA | prefill ms | nodes | size MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ORDER:
            row = r.rows.get(name)
            if row is None:
                continue
            if row.result is None:
                lines.append(f"| {name} | {row.missing} | | | | | |")
                continue
            lines.append(
                f"| {name} | {_num(row.tok_s)} | {_ratio(row.tok_s, builder and builder.tok_s)} | "
                f"{_ratio(row.tok_s, builder_lora and builder_lora.tok_s)} | "
                f"{_num(row.result['prefill_ms'])} | {row.nodes if row.nodes is not None else '-'} | "
                f"{_num(row.size_mb)} |"
            )
        on, off = r.rows.get(SEPARATE_ON), r.rows.get(FUSED)
        if on and off and on.result and off.result:
            differ = sum(a != b for a, b in zip(on.result["tokens"], off.result["tokens"], strict=False))
            lines += ["", f"The switchable LoRA is live: {differ} of {len(on.result['tokens'])} greedy "
                      "tokens differ from the fused graph with no adapter."]
        exported = ", ".join(
            f"{name} {_num(e['seconds'])} s" + (f" (peak RSS {_num(e['peak_rss_mb'], 0)} MiB)" if "peak_rss_mb" in e else "")
            if "seconds" in e else f"{name}: {e['missing']}"
            for name, e in r.exports.items()
        )
        lines += ["", f"Export times: {exported}.", ""]

    big, small = (results[-1].shape.name, results[0].shape.name) if results else ("", "")
    targets = [
        (f"edgepeft int4 >= 1.0x the builder's int4, {small}", ratio(results, small, FUSED, BUILDER), 1.0, True),
        (f"edgepeft int4 >= 1.0x the builder's int4, {big}", ratio(results, big, FUSED, BUILDER), 1.0, True),
        (f"switchable LoRA active >= 1.0x the builder's baked-in LoRA, {big}",
         ratio(results, big, SEPARATE_ON, BUILDER_LORA), 1.0, True),
        (f"switchable LoRA active within 10% of no adapter, {big} (stretch)",
         ratio(results, big, SEPARATE_ON, FUSED), 0.9, True),
        (f"(for reference) builder's baked-in LoRA vs its int4, {big}",
         ratio(results, big, BUILDER_LORA, BUILDER), None, False),
        (f"(for reference) builder's baked-in LoRA vs its int4, {small}",
         ratio(results, small, BUILDER_LORA, BUILDER), None, False),
    ]
    lines += ["### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for text, value, bound, is_target in dict.fromkeys(targets):  # one shape (--quick): no repeats
        met = "-" if not is_target or value is None else ("yes" if value >= bound else "no")
        lines.append(f"| {text} | {'not available' if value is None else f'{value:.2f}x'} | {met} |")

    lines += ["", *memory_markdown(memory)]
    lines += ["", f"Whole benchmark: {seconds / 60:.1f} min."]
    return "\n".join(lines)


def memory_markdown(memory: dict) -> list[str]:
    """The "Export memory" table: peak RSS of the ~1B export beside the model's fp32 size."""
    lines = ["### Export memory", "",
             "Peak resident memory (VmHWM) of one `edgepeft.export(..., weights=\"int4\", verify=False)` "
             "process exporting the fp32 safetensors folder: the checkpoint is streamed layer by layer "
             "(edgepeft/export/stream.py) and every initializer is written to model.onnx.data as it "
             "is made, so neither the fp32 model nor the graph's weights are held whole.", "",
             "| model | parameters | fp32 size | export peak RSS | peak / fp32 size | export time |",
             "|---|---:|---:|---:|---:|---:|"]
    if memory:
        fp32 = memory["fp32_bytes"] / 2**20
        if "peak_rss_mb" in memory:
            lines.append(
                f"| {memory['shape']} | {_count(memory['params'])} | {fp32:,.1f} MiB | "
                f"{memory['peak_rss_mb']:,.0f} MiB | {memory['peak_rss_mb'] / fp32:.2f}x | "
                f"{memory['seconds']:.0f} s |"
            )
        else:
            lines.append(f"| {memory['shape']} | {_count(memory['params'])} | {fp32:,.1f} MiB | "
                         f"failed: {memory['missing']} | | |")
    return lines


def to_json(results: list[ShapeResult], memory: dict) -> dict:
    return {
        "shapes": [
            {
                "name": r.shape.name,
                "config": r.shape.config,
                "params": r.params,
                "new_tokens": r.shape.new_tokens,
                "runs": r.shape.runs,
                "exports": r.exports,
                "rows": {
                    name: {"result": row.result, "missing": row.missing, "nodes": row.nodes, "size_mb": row.size_mb}
                    for name, row in r.rows.items()
                },
            }
            for r in results
        ],
        "memory": memory,
    }


def _memory_only(args: argparse.Namespace) -> int:
    """`--only memory`: the ~1B export peak (the tiny shape with --quick), nothing else."""
    shape = QUICK_MEMORY if args.quick else FULL_MEMORY
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export."))
    try:
        memory = bench_memory(shape, work / "memory")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(memory_markdown(memory))
    if args.json:
        args.json.write_text(json.dumps({"memory": memory}, indent=2) + "\n")
    if args.output:
        from benchmarks_md import machine

        args.output.write_text(f"{text}\n\n_Measured on: {machine()}_\n")
        log(f"wrote {args.output}")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 8 tokens, 1 run (smoke test)")
    parser.add_argument("--output", type=Path, help="write the markdown here instead of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep models and graphs here (default: a temp folder, removed)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the ~1B export memory measurement")
    parser.add_argument("--only", choices=["memory"],
                        help="run one part: 'memory' measures the export peak RSS alone and prints its "
                             "table (written only to --output; BENCHMARKS.md is left as it is)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0
    if args.only == "memory":
        return _memory_only(args)

    start = time.perf_counter()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export."))
    try:
        results = [bench_shape(shape, work / f"shape{i}", args.quick) for i, shape in enumerate(shapes)]
        if args.skip_memory:
            memory = {}
        elif args.quick:  # the fused export of the tiny shape, already run in its own process
            first = results[0]
            memory = {"shape": first.shape.name, "params": first.params,
                      "fp32_bytes": 4 * first.params, **first.exports["fused"]}
        else:
            memory = bench_memory(FULL_MEMORY, work / "memory")
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(results, memory, args.quick, time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps(to_json(results, memory), indent=2) + "\n")
    from benchmarks_md import publish

    log(f"wrote {publish('export', text, args.output)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
