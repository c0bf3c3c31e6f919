#!/usr/bin/env bash
# Issue 12: which beam to act on, chosen on the four-site stream's validation period and read
# on its test period. Each candidate runs on seeds 1-15, paired by seed against acting on the
# most probable beam with the schedule blend; the table gives the power loss change on
# validation (seeds 1-5, the screen; seeds 6-15, the confirmation) and on test (15 seeds),
# and top-1 on test. Not part of CI; about half a minute.
#   cargo build --release && bash experiments/beam-decision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/gradsift}
OUT=${OUT:-/var/tmp/gradsift-beam-decision}
rm -rf "$OUT" && mkdir -p "$OUT"
schedule='model.blend={ mode = "schedule", n0 = 300.0, spread = 0.5 }'
bayes='model.blend={ mode = "bayes", spread = 0.5, decay = 0.99 }'
argmax='model.decision="argmax"'
least='model.decision="min_expected_loss"'
run() { # pipeline label settings…
  local p=$1 label=$2; shift 2
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  for seed in $(seq 1 15); do
    $B run "pipelines/$p.toml" --quiet --json --set telemetry.enabled=false --set output.scores=false \
      --set training.seed=$seed "${sets[@]}" --output "$OUT/run" > "$OUT/$p-$label-$seed.json" 2>/dev/null
  done
}
for p in beam-replay beam-tracking; do
  run $p argmax "$schedule" "$argmax"
  run $p least "$schedule" "$least"
  run $p bayes "$bayes" "$argmax"
  run $p bayes-least "$bayes" "$least"
done
python3 - "$OUT" <<'PY'
import json, statistics as st, sys
out = sys.argv[1]
def m(p, label, seed, period, k="power_loss_db"):
    r = json.load(open(f"{out}/{p}-{label}-{seed}.json"))
    q = next(x for x in r["periods"] if x["name"] == period)
    return q["metrics"]["model"][k]
def paired(p, label, seeds, period):
    d = [m(p, label, s, period) / m(p, "argmax", s, period) - 1 for s in seeds]
    return f"{100 * st.mean(d):+.1f} ± {100 * st.stdev(d):.1f}% ({sum(x < 0 for x in d)}/{len(d)})"
names = {"least": "least expected loss", "bayes": "`bayes` blend", "bayes-least": "`bayes` blend + least expected loss"}
print("| pipeline, candidate (vs schedule blend, most probable beam) | validation, seeds 1-5 | validation, seeds 6-15 | test, 15 seeds | top-1 on test |")
print("|---|---|---|---|---|")
for p in ("beam-replay", "beam-tracking"):
    for label, name in names.items():
        t1 = [st.mean(m(p, l, s, "test", "top1") for s in range(1, 16)) for l in ("argmax", label)]
        print(f"| `{p}`: {name} | {paired(p, label, range(1, 6), 'validation')} | "
              f"{paired(p, label, range(6, 16), 'validation')} | {paired(p, label, range(1, 16), 'test')} | "
              f"{t1[0]:.3f} → {t1[1]:.3f} |")
PY
