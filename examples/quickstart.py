"""load -> add adapter -> save -> load -> merge, on a tiny model built offline.

Run: python examples/quickstart.py [MODEL_DIR]   (default: a tiny random Llama)
"""

import sys
import tempfile
from pathlib import Path

import torch

import edgepeft as ep
from edgepeft.tiny import save_tiny_model

work = Path(tempfile.mkdtemp(prefix="edgepeft-quickstart-"))
base_dir = sys.argv[1] if len(sys.argv) > 1 else save_tiny_model(work / "base", "llama")

# 1. A frozen NF4 base (bitsandbytes; CPU or CUDA through the same code).
model, tokenizer = ep.load_base(base_dir, quant="nf4")
print(ep.describe_base(model), "| fingerprint", ep.fingerprint(model))

# 2. A LoRA adapter. init="random" makes it non-zero without training, so every step shows.
ep.add_adapter(model, ep.LoraConfig(r=8, alpha=16, target_modules="all-linear", init="random"), name="sql")
print("trainable parameters of 'sql':", ep.count_parameters(model, "sql"))

ids = tokenizer("SELECT name FROM users", return_tensors="pt").input_ids
with torch.no_grad():
    adapted = model(ids).logits

# 3. Save in HF peft's format, load into a fresh base: the same numbers come back.
ep.save_adapter(model, work / "adapters" / "sql", name="sql")
fresh, _ = ep.load_base(base_dir, quant="nf4")
ep.load_adapter(fresh, work / "adapters" / "sql", name="sql")
with torch.no_grad():
    reloaded = fresh(ids).logits
print("reload max |diff|:", (reloaded - adapted).abs().max().item())

# 4. Merge into full precision: a plain model, with a report of the error the merge added.
merged, report = ep.merge(fresh, "sql", quant="none")
print(report)
print("artifacts in", work)
