#!/usr/bin/env bash
# Run the test suite against the newest versions pip installs today (not the lock), on purpose.
#
#   scripts/check_latest.sh              # fresh venv in a temp folder, newest versions, pytest -q
#   scripts/check_latest.sh --write      # ...and, when the suite passes, rewrite constraints.txt
#   scripts/check_latest.sh -- -k prompt # extra arguments after -- go to pytest
#
# CI installs from constraints.txt (the versions the suite last passed on), so an upstream release
# cannot turn a submission red; this script is how a release is let in. It prints which pinned
# versions moved, runs the suite, and with --write refreshes the lock only on a green run.
# Not part of CI: it needs the registry's newest releases, which change under it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

write_lock=0
pytest_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) write_lock=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "check_latest.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

work="$(mktemp -d -t edgepeft-latest.XXXXXX)"
trap 'rm -rf "$work"' EXIT INT TERM
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch first (it lies on local disk); anything newer would be a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q --upgrade -e ".[train,test]"
pip freeze --exclude-editable | grep -v '^-e ' | sort > "$work/latest.txt"

echo "versions that differ from constraints.txt:"
python - "$REPO/constraints.txt" "$work/latest.txt" <<'EOF'
import sys

def pins(path):
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out

locked, latest = pins(sys.argv[1]), pins(sys.argv[2])
moved = [(n, locked.get(n, "-"), v) for n, v in sorted(latest.items()) if locked.get(n) != v]
for name, old, new in moved:
    print(f"  {name:30} {old:>14} -> {new}")
print("  (none)" if not moved else f"  {len(moved)} package(s)")
EOF

python -m pytest -q -p no:cacheprovider "${pytest_args[@]}"

if [[ $write_lock == 1 ]]; then
    {
        echo "# Exact versions the test suite last passed on (scripts/check_latest.sh --write)."
        echo "# CI and the README install with: pip install -c constraints.txt -e \".[train,test]\""
        echo "# Python $(python -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)"
        sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' "$work/latest.txt"
    } > "$REPO/constraints.txt.new"
    mv "$REPO/constraints.txt.new" "$REPO/constraints.txt"
    echo "constraints.txt rewritten from a green run"
fi
