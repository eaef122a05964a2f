"""Where the demo's shipped files live (package data: no download, no network)."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base_model"
"""The demo base model: config.json, model.safetensors, tokenizer files.
Built by scripts/make_demo_base.py."""
