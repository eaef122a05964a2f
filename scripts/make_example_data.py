"""Write the built-in demo tasks as JSONL under examples/tasks/ (committed; rerun to check).

    edgepeft.tasks.make_splits(task, (512, 64, 128), seed=0)
        ──► examples/tasks/<task>/train.jsonl   512 rows
            examples/tasks/<task>/val.jsonl      64 rows
            examples/tasks/<task>/test.jsonl    128 rows   (no word in two files)

Run: python scripts/make_example_data.py [--out examples/tasks] [--check]
--check writes nothing and exits 1 when a committed file differs from what the seed gives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepeft.tasks import TASKS, make_splits

SIZES = {"train": 512, "val": 64, "test": 128}
SEED = 0


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def files() -> dict[Path, str]:
    """Relative path -> content of every example data file."""
    out = {}
    for task in sorted(TASKS):
        parts = make_splits(task, tuple(SIZES.values()), SEED)
        for split, rows in zip(SIZES, parts, strict=True):
            out[Path(task) / f"{split}.jsonl"] = render(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "examples" / "tasks")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for relative, text in files().items():
        path = args.out / relative
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} rows)")
    if stale:
        print("out of date: " + ", ".join(stale) + "; run scripts/make_example_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
