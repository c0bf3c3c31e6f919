#!/usr/bin/env bash
# Drift peer comparison (not CI; issue 13, point 6): gradsift and River's drift-aware online
# learners (ARF, Hoeffding adaptive tree, linear model reset by ADWIN), prequential on the same
# drifting streams and the same input vectors; prints one Markdown table.
#   bash benches/peers/drift_river.sh [drift_river.py options, e.g. --seeds 1,2,3]
# Env: PEERS_VENV (/var/tmp/peers-venv), GRADSIFT_BIN (/var/tmp/gradsift-target/release/gradsift,
#      must accept output.features), DRIFT_OUT (/var/tmp/river-drift).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${PEERS_VENV:-/var/tmp/peers-venv}"
BIN="${GRADSIFT_BIN:-${CARGO_TARGET_DIR:-/var/tmp/gradsift-target}/release/gradsift}"
OUT="${DRIFT_OUT:-/var/tmp/river-drift}"

# The venv lives outside the repository so that nothing here lands in a commit.
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import river, numpy, pyarrow" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "river>=0.26,<0.27" "numpy>=2.0,<3" "pyarrow>=16"
fi

if [ ! -x "$BIN" ]; then
    echo "no gradsift binary at $BIN (cargo build --release, or set GRADSIFT_BIN)" >&2
    exit 1
fi

"$VENV/bin/python" benches/peers/drift_river.py --gradsift "$BIN" --out "$OUT" "$@"
