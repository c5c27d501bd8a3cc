#!/usr/bin/env bash
# The whole loop for a backend without Python, on the example C LayerNorm (forward only, float32):
# export the golden vectors, build the backend, let it write its results, judge them.
#   examples/golden_c/run.sh [WORKDIR]      (PROFILE=default for the full case list; NORMREF=...)
# The exit status is normref judge's: 0 when every judged case passes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
normref="${NORMREF:-$root/.venv/bin/normref}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
rm -rf "$work/golden" "$work/results"
"$normref" export "$work/golden" --declare "$here/declare.json" --ops '^layer_norm$' --dtypes float32 \
    --profile "${PROFILE:-quick}" --layout npy-dir --jobs 1
make -s -C "$here" BUILD="$work"
"$work/layernorm" "$work/golden" "$work/results"
"$normref" judge "$work/golden" "$work/results" --jobs 1 --json "$work/report.json"
