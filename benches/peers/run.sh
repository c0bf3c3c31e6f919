#!/usr/bin/env bash
# Peer benchmark (not CI): gradsift's criterion peers benches, then JAX/numpy/River, then one
# Markdown table of ratios. Everything timed runs pinned to one core.
#   bash benches/peers/run.sh
# Env: PEERS_VENV (/var/tmp/peers-venv), CARGO_TARGET_DIR (/var/tmp/gradsift-target),
#      PEERS_CPU (1), PEERS_OUT (/var/tmp/peers/peers.json), PEERS_BENCH_FILTER (below).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${PEERS_VENV:-/var/tmp/peers-venv}"
CPU="${PEERS_CPU:-1}"
OUT="${PEERS_OUT:-/var/tmp/peers/peers.json}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/gradsift-target}"
# Criterion filters by regex on "group/id": plain "peers" would skip fma_peak (the limit column)
# and learner_core_B* (the River row), so they are added here.
FILTER="${PEERS_BENCH_FILTER:-peers|fma_peak|learner_core}"

# The venv lives outside the repository so that nothing here lands in a commit.
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q \
    "jax[cpu]>=0.10,<0.11" "river>=0.26,<0.27" "numpy>=2.0,<3" "pandas>=2.2,<4" "pyarrow>=16"

echo "== gradsift (criterion: $FILTER), CPU $CPU"
cargo bench --bench scoring --no-run        # build on all cores, time on one
# The table reads every result criterion keeps: start from none, so all come from this run.
rm -rf "$CARGO_TARGET_DIR"/criterion/{peers_B256,peers_B8,fma_peak,learner_core_B256,learner_core_B8}
taskset -c "$CPU" cargo bench --bench scoring -- "$FILTER"

echo "== peers: JAX, numpy, River, CPU $CPU"
taskset -c "$CPU" "$VENV/bin/python" benches/peers/peers.py --out "$OUT"

echo "== table"
"$VENV/bin/python" benches/peers/table.py --peers "$OUT"
