"""Plan benchmark: `edgepeft plan`'s predictions for the `local` profile against measurements.

    local profile (cores, memory, providers, copy-test bandwidth; a local.toml's efficiency)
    per model shape of scripts/bench_export.py (random weights, fused int4 export)
      make + export worker ─► HF folder, edgepeft.export(weights="int4", verify=False)
      decode worker (fresh process: numpy + onnxruntime only) ─► peak RSS (VmHWM), decode tok/s
            IO binding, KV in one buffer per layer shared by past and present (as
            edgepeft.runtime does), prefill the prompt, greedy decode; median of the runs
      plan_format(shape, local, "int4", context = prompt + new tokens, prefill = prompt)
            ─► predicted peak memory and tok/s (at the mean decode position)
    ─► table: predicted vs measured (targets: memory within 15%, tok/s within 30%), decode as a
       share of the bandwidth bound (bytes per token x tok/s / bandwidth; target >= 50% for a
       model beyond the last-level cache); the efficiency measured on the largest model is
       written to edgepeft.devices.calibration_path() (full runs: local.toml in the first
       $EDGEPEFT_DEVICES folder, else ~/.config/edgepeft/devices/), where `edgepeft plan` finds it
    ─► a plan of the larger shape on every shipped profile
    ─► BENCHMARKS.md section "plan" (scripts/benchmarks_md.py), or --output FILE; --json FILE

    python scripts/bench_plan.py                   full run (a few minutes on 2 cores)
    python scripts/bench_plan.py --quick --output /tmp/plan.md     smoke run on a tiny shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = 16
THREADS = 2
FULL = (("llama ~56M", 0, 240, 3), ("Qwen2.5-0.5B shape", 1, 112, 3))
"""(label, index in bench_export.FULL_SHAPES, new tokens, runs)."""
QUICK_NEW, QUICK_RUNS = 16, 1
MEMORY_TOLERANCE, SPEED_TOLERANCE, BOUND_TARGET = 0.15, 0.30, 0.50


def log(line: str) -> None:
    print(f"bench_plan: {line}", file=sys.stderr, flush=True)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- workers (fresh processes)


def _prepare(spec: dict) -> dict:
    """Random-weight HF folder and its fused int4 export (bench_export's own workers)."""
    import bench_export

    made = bench_export._make_model({"config": spec["config"], "folder": spec["folder"]})
    exported = bench_export._export({"folder": spec["folder"], "out": spec["out"], "int4_method": "search", "mixed_precision": True})
    return {**made, **exported}


def _decode(spec: dict) -> dict:
    """Load the export in onnxruntime and decode greedily; peak RSS and tok/s."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    capacity, prompt = spec["capacity"], np.array([spec["prompt"]], np.int64)
    # One buffer per layer and kind, bound as both past and present: the graph writes each
    # step's keys in place (GroupQueryAttention's shared buffer), as edgepeft.runtime does.
    buffers = {
        name: ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, spec["kv_heads"], capacity, spec["head_dim"]), np.float32)
        )
        for name in past_names
    }
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, spec["vocab"]), np.float32))

    def step(ids: np.ndarray, total: int) -> int:
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        for name, value in buffers.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
        if ids.shape[1] == 1:
            binding.bind_ortvalue_output("logits", logits)
            session.run_with_iobinding(binding)
            return int(logits.numpy()[0, -1].argmax())
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        return int(binding.get_outputs()[0].numpy()[0, -1].argmax())

    def generate(count: int) -> tuple[float, list[int]]:
        token = step(prompt, prompt.shape[1])
        tokens = [token]
        start = time.perf_counter()
        for _ in range(count - 1):
            token = step(np.array([[token]], np.int64), prompt.shape[1] + len(tokens))
            tokens.append(token)
        return time.perf_counter() - start, tokens

    generate(min(4, spec["new_tokens"]))  # warm-up: arenas, prepacked weights
    times, tokens = [], []
    for _ in range(spec["runs"]):
        seconds, tokens = generate(spec["new_tokens"])
        times.append(seconds)
    steps = spec["new_tokens"] - 1
    return {
        "decode_tok_s": steps / statistics.median(times),
        "decode_tok_s_runs": [steps / t for t in times],
        "peak_rss": _peak_rss(),
        "tokens": tokens,
    }


WORKERS = {"prepare": _prepare, "decode": _decode}


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh Python process (benchmarks_md.run_worker)."""
    import benchmarks_md

    return benchmarks_md.run_worker(__file__, spec, timeout)


# ---------------------------------------------------------------- the benchmark


def bench_shape(label: str, config: dict, new_tokens: int, runs: int, work: Path, profile) -> dict:
    from edgepeft.plan import decode_tok_s, kv_capacity, model_shape, plan_format, step_seconds

    folder, out = work / "hf", work / "int4"
    log(f"[{label}] random model + fused int4 export")
    made = run_worker({"kind": "prepare", "config": config, "folder": str(folder), "out": str(out)})
    shape = model_shape(folder, name=label)
    context = PROMPT + new_tokens
    planned = plan_format(shape, profile, "int4", context=context, prefill=PROMPT)
    prompt = [3 + (7 * i) % (shape.vocab - 3) for i in range(PROMPT)]
    log(f"[{label}] decode {new_tokens} tokens x {runs} in a fresh process")
    measured = run_worker({
        "kind": "decode", "model": str(out / "model.onnx"), "threads": profile.threads or THREADS,
        "prompt": prompt, "new_tokens": new_tokens, "runs": runs, "capacity": kv_capacity(shape, context),
        "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "vocab": shape.vocab,
    })  # fmt: skip
    mean_position = PROMPT + new_tokens / 2
    read = planned.bytes_per_token + planned.kv_bytes_per_position * mean_position
    predicted_tok_s = decode_tok_s(shape, profile, read)
    # The efficiency this run shows: bandwidth share of the step time left after the fixed cost.
    memory_seconds = max(1 / measured["decode_tok_s"] - step_seconds(shape), 1e-9)
    data = (out / "model.onnx.data").stat().st_size
    log(f"[{label}] {measured['decode_tok_s']:.1f} tok/s, peak RSS {measured['peak_rss'] / 2**20:.0f} MiB")
    return {
        "label": label,
        "config": config,
        "params": made["params"],
        "new_tokens": new_tokens,
        "runs": runs,
        "file_bytes_planned": planned.data_file_bytes,
        "file_bytes_measured": data,
        "peak_planned": planned.total,
        "peak_measured": measured["peak_rss"],
        "tok_s_planned": predicted_tok_s,
        "tok_s_measured": measured["decode_tok_s"],
        "tok_s_runs": measured["decode_tok_s_runs"],
        "bytes_per_token": read,
        "bound_share": read * measured["decode_tok_s"] / profile.bandwidth,
        "efficiency": read / memory_seconds / profile.bandwidth,
        "beyond_llc": planned.bytes_per_token > (profile.last_level_cache or 0),
        "plan": planned.to_dict(),
    }


def every_profile(config: dict, label: str) -> list[dict]:
    """The plan of one shape on every shipped profile (no measurement)."""
    from edgepeft.devices import list_profiles
    from edgepeft.plan import plan

    rows = []
    for name in list_profiles():
        if name == "local":
            continue
        p = plan(dict(config), name)  # context 2048, or the model's limit if shorter
        rec = p.recommendation
        rows.append({
            "device": name,
            "context": p.context,
            "budget": p.device.budget,
            "recipe": rec.recipe.name if rec.recipe else None,
            "max_context": rec.max_context,
            "peak": rec.plan.total if rec.plan else None,
            "tok_s": rec.plan.tok_s_start if rec.plan else None,
            "int4_fits": p.formats["int4"].fits,
            "fp16_fits": p.formats["fp16"].fits,
        })  # fmt: skip
    return rows


def calibrate(results: list[dict], profile, path: Path) -> float | None:
    """Efficiency on the largest model (its bandwidth share once the fixed step cost is off); to
    `path` (the `local` profile's overrides) with where and when it was measured."""
    from benchmarks_md import machine

    if not results:
        return None
    largest = max(results, key=lambda r: r["bytes_per_token"])
    # A model inside the cache (--quick) is not bandwidth-bound: its figure is capped at 1.
    efficiency = round(min(largest["efficiency"], 1.0), 3)
    where = "" if largest["beyond_llc"] else " (within the last-level cache: not a real calibration)"
    from edgepeft.atomic import write_bytes

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = (
        "# Overrides for the `local` profile (detected on the machine that runs edgepeft).\n"
        "# efficiency: share of the measured copy bandwidth a batch-1 int4 decode step reached\n"
        "# (after edgepeft.plan's fixed per-step cost),\n"
        f"# measured by scripts/bench_plan.py on {largest['label']}{where} ({stamp}). Re-run it on\n"
        "# your machine to calibrate yours; delete this file for the documented default.\n"
        f"efficiency = {efficiency}\n"
        f"calibrated = {json.dumps(f'{stamp} on {machine()}')}\n"
    )
    write_bytes(path, text.encode())
    log(f"wrote efficiency {efficiency} to {path}")
    return efficiency


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _error(planned: float, measured: float) -> float:
    return planned / measured - 1


def markdown(results: list[dict], profiles: list[dict], local: dict, quick: bool,
             calibrated: float | None, seconds: float) -> str:  # fmt: skip
    lines = [
        "## Plan: predicted vs measured on this machine",
        "",
        f"`python scripts/bench_plan.py{' --quick' if quick else ''}`: `edgepeft plan`'s prediction "
        "for the `local` profile against a fresh process that loads the fused int4 export "
        "(random weights) in onnxruntime and decodes greedily, batch 1, "
        f"{local['threads']} threads, prompt {PROMPT} tokens, the KV cache in one buffer per layer "
        "shared by past and present (as edgepeft.runtime keeps it). Memory: the process's peak "
        "resident set (VmHWM) against the planned peak (runtime + weights as onnxruntime holds them "
        "+ KV + activations). Speed: median decode tok/s against efficiency x bandwidth / bytes read "
        "per token at the mean decode position.",
        "",
        f"Local profile: {local['cores']} cores, {local['memory'] / 2**30:.1f} GiB, bandwidth "
        f"{local['bandwidth'] / 1e9:.1f} GB/s (numpy copy test, {local['threads']} threads, "
        f"best of 5), last-level cache {(local['last_level_cache'] or 0) / 2**20:.0f} MiB, "
        f"efficiency used {local['efficiency']:g} ({local['source']}).",
        "",
        "| model | params | model.onnx.data MiB (plan / disk) | peak RSS MiB plan | measured | error | "
        "tok/s plan | measured | error | MB read / token | share of bandwidth bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:,.1f}M | {_mib(r['file_bytes_planned'])} / "
            f"{_mib(r['file_bytes_measured'])} | {_mib(r['peak_planned'])} | {_mib(r['peak_measured'])} | "
            f"{_error(r['peak_planned'], r['peak_measured']):+.1%} | {r['tok_s_planned']:,.1f} | "
            f"{r['tok_s_measured']:,.1f} | {_error(r['tok_s_planned'], r['tok_s_measured']):+.1%} | "
            f"{r['bytes_per_token'] / 1e6:,.1f} | {r['bound_share']:.0%} |"
        )
    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for r in results:
        mem = _error(r["peak_planned"], r["peak_measured"])
        speed = _error(r["tok_s_planned"], r["tok_s_measured"])
        lines.append(f"| memory within ±{MEMORY_TOLERANCE:.0%}, {r['label']} | {mem:+.1%} | "
                     f"{'yes' if abs(mem) <= MEMORY_TOLERANCE else 'no'} |")  # fmt: skip
        lines.append(f"| decode tok/s within ±{SPEED_TOLERANCE:.0%}, {r['label']} | {speed:+.1%} | "
                     f"{'yes' if abs(speed) <= SPEED_TOLERANCE else 'no'} |")  # fmt: skip
    beyond = [r for r in results if r["beyond_llc"]]
    if beyond:
        r = max(beyond, key=lambda x: x["bytes_per_token"])
        lines.append(
            f"| decode >= {BOUND_TARGET:.0%} of the bandwidth bound, {r['label']} (weights beyond "
            f"the last-level cache) | {r['bound_share']:.0%} | "
            f"{'yes' if r['bound_share'] >= BOUND_TARGET else 'no'} |"
        )
    else:
        lines.append(f"| decode >= {BOUND_TARGET:.0%} of the bandwidth bound | no model beyond the "
                     "last-level cache in this run | - |")  # fmt: skip
    if calibrated is not None:
        lines += ["", f"Calibrated efficiency {calibrated:g} (the largest model's bandwidth share "
                  "once edgepeft.plan's fixed per-step cost is off) written to the user's "
                  "local.toml (edgepeft.devices.calibration_path()) for `edgepeft plan --device local`. "
                  "The speed prediction above used the efficiency loaded before this run."]  # fmt: skip
    if profiles:
        lines += ["", f"### {results[-1]['label']} on every shipped profile (context {profiles[0]['context']}, no adapters)",
                  "", "| device | budget GiB | recommended recipe | max context | peak GiB | est. tok/s | "
                  "int4 fits | fp16 fits |", "|---|---:|---|---:|---:|---:|:---:|:---:|"]  # fmt: skip
        for p in profiles:
            peak = "-" if p["peak"] is None else f"{p['peak'] / 2**30:.2f}"
            speed = "-" if p["tok_s"] is None else f"{p['tok_s']:,.1f}"
            lines.append(
                f"| {p['device']} | {p['budget'] / 2**30:.2f} | {p['recipe'] or 'none fits'} | "
                f"{p['max_context']} | {peak} | {speed} | {'yes' if p['int4_fits'] else 'no'} | "
                f"{'yes' if p['fp16_fits'] else 'no'} |"
            )
        lines += ["", "Vendor profiles' speeds are estimates from peak bandwidth x an efficiency "
                  "stated in each file, not measurements."]  # fmt: skip
    lines += ["", f"Whole benchmark: {seconds / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 16 tokens, 1 run (smoke)")
    parser.add_argument("--output", type=Path, help="write the markdown here instead of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep models and graphs here")
    parser.add_argument(
        "--calibrate", type=Path, metavar="TOML",
        help="write the measured efficiency here (full runs default: local.toml in the user's "
        "profile folder, edgepeft.devices.calibration_path(); "
        "--quick writes none unless given)",
    )  # fmt: skip
    parser.add_argument("--no-calibrate", action="store_true", help="write no efficiency")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0

    import bench_export

    from edgepeft.devices import calibration_path, load_profile

    start = time.perf_counter()
    log("measuring the local profile (copy-test bandwidth)")
    profile = load_profile("local")
    local = profile.to_dict()
    if args.quick:
        shapes = [(s.name, s.config, QUICK_NEW, QUICK_RUNS) for s in bench_export.QUICK_SHAPES]
    else:
        shapes = [(label, bench_export.FULL_SHAPES[i].config, n, runs) for label, i, n, runs in FULL]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_plan."))
    try:
        results = [
            bench_shape(label, config, n, runs, work / f"shape{i}", profile)
            for i, (label, config, n, runs) in enumerate(shapes)
        ]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    profiles = every_profile(shapes[-1][1], shapes[-1][0])
    target = args.calibrate or (None if args.quick else calibration_path())
    calibrated = None if args.no_calibrate or target is None else calibrate(results, profile, target)
    text = markdown(results, profiles, local, args.quick, calibrated, time.perf_counter() - start)
    if args.json:
        payload = {"local": local, "results": results, "profiles": profiles, "calibrated": calibrated}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    from benchmarks_md import publish

    log(f"wrote {publish('plan', text, args.output)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
