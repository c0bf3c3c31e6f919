#!/usr/bin/env bash
# Issue 12's table: each DeepSense scenario replayed alone through a beam pipeline, 3 seeds,
# prequential, with the report's own persistence and online 5-NN baselines on the same rows;
# then the four-site stream once per seed, its top-1 and power loss split by scenario from
# the score file (the power joined from the archive by file and row): the four-site cost
# against running each site alone. Not part of CI; ~10 seconds.
#   cargo build --release && bash experiments/beam-scenarios.sh [PIPELINE…] [-- --set k=v…]
# Default pipelines: beam-replay (position only) and beam-tracking (position + last beam).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/gradsift}
OUT=${OUT:-/var/tmp/gradsift-beam-scenarios}
pipes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pipes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#pipes[@]} -gt 0 ] || pipes=(pipelines/beam-replay.toml pipelines/beam-tracking.toml)
rm -rf "$OUT" && mkdir -p "$OUT"
for p in "${pipes[@]}"; do
  name=$(basename "$p" .toml)
  for seed in 1 2 3; do
    for s in 1 2 3 4; do
      $B run "$p" --quiet --json --set "source.path=\"../../shared/data/beam/deepsense_scenario$s.parquet\"" \
        --set output.scores=false --set training.seed=$seed "$@" --output "$OUT/run" > "$OUT/$name-s$s-$seed.json"
    done
    $B run "$p" --quiet --json --set training.seed=$seed "$@" --output "$OUT/$name-all-$seed" > "$OUT/$name-all-$seed.json"
  done
done
python3 - "$OUT" "${pipes[@]}" <<'PY'
import json, math, statistics as st, sys
from pathlib import Path
import pyarrow.parquet as pq
out, pipes = Path(sys.argv[1]), [Path(p).stem for p in sys.argv[2:]]
def ms(v): return f"{st.mean(v):.3f} ± {st.stdev(v):.3f}"
power = {}
def loss_db(source, position, prediction):
    # The report's per-row loss: 10·log10(P_best / P_chosen), rows without power left out.
    if source not in power:
        power[source] = pq.read_table(source, columns=["beam_power"]).column(0).to_pylist()
    p = power[source][position]
    best, chosen = max(p), p[int(prediction)]
    return 10 * math.log10(best / chosen) if best > 0 and chosen > 0 else None
print("| pipeline | scenario | top-1 | top-3 | power loss dB (mean per row) | pooled dB | persistence top-1 / dB | 5-NN top-1 / top-3 / dB | four-site top-1 (Δ vs alone) | four-site dB (Δ vs alone) | samples/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name in pipes:
    means = {k: [] for k in ("top1", "top3", "power_loss_db", "power_loss_db_pooled")}
    for s in (1, 2, 3, 4):
        runs = [json.load(open(out / f"{name}-s{s}-{seed}.json")) for seed in (1, 2, 3)]
        m = [r["metrics"]["model"] for r in runs]
        for k in means:
            means[k].append(st.mean(x[k] for x in m))
        b = runs[0]["metrics"]
        p, k = b["persistence"], b["knn"]
        four, four_db = [], []
        for seed in (1, 2, 3):
            t = pq.read_table(out / f"{name}-all-{seed}" / "scores.parquet", columns=["source", "position", "key", "prediction", "target"]).to_pydict()
            rows = [r for r in zip(t["source"], t["position"], t["key"], t["prediction"], t["target"]) if r[2] == str(s)]
            four.append(sum(pr == tg for _, _, _, pr, tg in rows) / len(rows))
            db = [d for d in (loss_db(src, pos, pr) for src, pos, _, pr, _ in rows) if d is not None]
            four_db.append(sum(db) / len(db))
        alone = st.mean(x["top1"] for x in m)
        alone_db = st.mean(x["power_loss_db"] for x in m)
        sps = st.mean(r["samples_per_s"] for r in runs)
        print(f"| {name} | {s} | {ms([x['top1'] for x in m])} | {ms([x['top3'] for x in m])} | "
              f"{ms([x['power_loss_db'] for x in m])} | {ms([x['power_loss_db_pooled'] for x in m])} | "
              f"{p['top1']:.3f} / {p['power_loss_db']:.3f} | {k['top1']:.3f} / {k['top3']:.3f} / {k['power_loss_db']:.3f} | "
              f"{st.mean(four):.3f} ({st.mean(four) - alone:+.3f}) | "
              f"{st.mean(four_db):.3f} ({st.mean(four_db) - alone_db:+.3f}) | {sps:,.0f} |")
    print(f"| {name} | mean | {st.mean(means['top1']):.3f} | {st.mean(means['top3']):.3f} | "
          f"{st.mean(means['power_loss_db']):.3f} | {st.mean(means['power_loss_db_pooled']):.3f} | | | | | |")
PY
