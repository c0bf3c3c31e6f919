#!/usr/bin/env bash
# Learning CPU of the shipped Milan setting vs every-row training (replay 3) and random at the
# same keep/replay, on a 1 M-sample Milan-shaped stream (benches/soak.py's writer, 1,000 keys),
# 5 seeds, paired. The bundled archive is too short for CPU figures (24 ms of learning CPU
# per run: ± 18% between seeds). Not part of CI.
#   cargo build --release && bash benches/cpu_saved.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/gradsift}
S=${S:-/var/tmp/gradsift-cpu/k1000.parquet}
OUT=${OUT:-/var/tmp/gradsift-cpu}
mkdir -p "$OUT"
[ -f "$S" ] || python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benches'); import soak; soak.write_stream(Path('$S'), 1_150_000, 1_000)"
common=(--quiet --json --set "source.path=\"$S\"" --set features.max_keys=10000 --set 'buffer.policy="fifo"' --set buffer.rescore_every=0 --set compute.reference_replay_ratio=3.0 --set output.scores=false)
for seed in 1 2 3 4 5; do
  for cfg in reference shipped random; do
    case $cfg in
      reference) sets=(--set 'selection.policy="random"' --set selection.keep=1.0 --set buffer.replay_ratio=3.0);;
      shipped) sets=();;
      random) sets=(--set 'selection.policy="random"' --set selection.keep=0.7 --set buffer.replay_ratio=2.0);;
    esac
    $B run pipelines/milan-replay.toml "${common[@]}" "${sets[@]}" --set training.seed=$seed --output "$OUT/$cfg-$seed" > "$OUT/$cfg-$seed.json"
  done
done
python3 - "$OUT" <<'PY'
import json, statistics as st, sys
out = sys.argv[1]
runs = {c: [json.load(open(f"{out}/{c}-{s}.json")) for s in range(1, 6)] for c in ["reference", "shipped", "random"]}
for c, rs in runs.items():
    cpu = [1 - r["compute"]["learn_cpu_s"] / f["compute"]["learn_cpu_s"] for r, f in zip(rs, runs["reference"])]
    wall = [1 - r["wall_s"] / f["wall_s"] for r, f in zip(rs, runs["reference"])]
    mae = [r["metrics"]["model"]["mae"] / f["metrics"]["model"]["mae"] - 1 for r, f in zip(rs, runs["reference"])]
    print(f"{c:9} learning CPU saved {100*st.mean(cpu):5.1f} ± {100*st.stdev(cpu):4.1f} %   wall saved {100*st.mean(wall):5.1f} ± {100*st.stdev(wall):4.1f} %   MAE {100*st.mean(mae):+.2f} ± {100*st.stdev(mae):.2f} %   (paired, 5 seeds)")
PY
