#!/usr/bin/env bash
# One setting against a pipeline as shipped, paired by seed, on the pipeline's own validation
# and test periods: how the README's "chosen on validation, confirmed on seeds 6-15, test read
# afterwards" comparisons are made. A setting that changes no training (the blend, the
# decision) has no random-at-equal-compute twin; one that does belongs in `gradsift
# experiment`. Not part of CI; each run takes about a second on the bundled files.
#   cargo build --release && bash experiments/versus.sh PIPELINE "SEEDS" [--base 'k=v'…] -- 'k=v'…
# PERIODS="validation test holiday whole" also reads other periods (`whole`: the whole stream).
# e.g. bash experiments/versus.sh pipelines/beam-replay.toml "$(seq 6 15)" \
#        --base 'model.decision="min_expected_loss"' -- 'model.decision="switch"'
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/gradsift}
OUT=${OUT:-/var/tmp/gradsift-versus}
pipeline=$1 seeds=$2; shift 2
base=() cand=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  [ "$1" = "--base" ] || { echo "expected --base or --, found $1" >&2; exit 2; }
  base+=(--set "$2"); shift 2
done
[ "${1:-}" = "--" ] && shift
for s in "$@"; do cand+=(--set "$s"); done
rm -rf "$OUT" && mkdir -p "$OUT"
for seed in $seeds; do
  for side in base cand; do
    if [ $side = base ]; then sets=("${base[@]}"); else sets=("${base[@]}" "${cand[@]}"); fi
    $B run "$pipeline" --quiet --json --set telemetry.enabled=false --set output.scores=false \
      --set training.seed="$seed" "${sets[@]}" --output "$OUT/run" > "$OUT/$side-$seed.json" 2>/dev/null
  done
done
PERIODS=${PERIODS:-validation test} python3 - "$OUT" $seeds <<'PY'
import json, os, statistics as st, sys
out, seeds = sys.argv[1], sys.argv[2:]
def period(side, seed, name):
    r = json.load(open(f"{out}/{side}-{seed}.json"))
    if name == "whole":
        return r["metrics"]["model"]
    return next(p["metrics"]["model"] for p in r["periods"] if p["name"] == name)
first = period("base", seeds[0], "validation")
# (metric, lower is better)
keys = [("power_loss_db", True), ("top1", False)] if "top1" in first else [("mae", True)]
for name in os.environ["PERIODS"].split():
    for k, lower in keys:
        b = [period("base", s, name)[k] for s in seeds]
        d = [100 * (period("cand", s, name)[k] / v - 1) for s, v in zip(seeds, b)]
        better = sum((x < 0) == lower and x != 0 for x in d)
        sd = st.stdev(d) if len(d) > 1 else 0.0
        print(f"{name:10s} {k:14s} base {st.mean(b):.4g}  candidate {st.mean(d):+.2f} ± {sd:.2f}% "
              f"(better on {better} of {len(d)} seeds)")
PY
