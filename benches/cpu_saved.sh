#!/usr/bin/env bash
# Learning CPU of a shipped setting vs every-row training, with random rows at a fixed keep and
# replay beside it, on a ~1 M-sample stream, 5 seeds, paired. The bundled archives are too
# short for CPU figures (21-24 ms of learning CPU per run: ± 18% between seeds). Not in CI.
#   cargo build --release && bash benches/cpu_saved.sh          # Milan (default)
#   cargo build --release && WORKLOAD=lte bash benches/cpu_saved.sh
#   SHIPPED_SET=training.micro_batch=11 bash benches/cpu_saved.sh   # a variant of the shipped
#     (several settings: space-separated, e.g. 'selection.unit="micro_batch" selection.keep=0.9')
# Milan: a Milan-shaped stream of 1,000 keys (benches/soak.py's writer); reference replay 3;
# random rows at keep 0.9, replay 2 (the shipped setting's keep and replay, row by row).
# LTE: the four LTE files (13,856 rows, both sites) played 72 times in a row, each copy two
# years after the last (997,632 rows; pyarrow); reference replay 1; random rows at keep 0.9,
# replay 0.25 (the earlier shipped setting's). Beam: the four DeepSense files played 32 times
# in a row (300,000 rows, read in place from ../shared, written to $OUT only); reference every
# row at micro-batches of 8, two optimiser steps each, replay 3 (the beam experiments'
# reference); random rows at keep 0.9, replay 2.
# These repeated streams are CPU tests, not held-out data. The per-step line goes through
# every-row training and the random rows when they take the same steps (fewer rows).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-${CARGO_TARGET_DIR:-target}/release/gradsift}
OUT=${OUT:-/var/tmp/gradsift-cpu}
WORKLOAD=${WORKLOAD:-milan}
mkdir -p "$OUT"
case $WORKLOAD in
  milan)
    S=${S:-$OUT/k1000.parquet}
    [ -f "$S" ] || python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benches'); import soak; soak.write_stream(Path('$S'), 1_150_000, 1_000)"
    pipeline=pipelines/milan-replay.toml; ref_replay=3.0; keep=0.9; replay=2.0
    extra=(--set features.max_keys=10000);;
  lte)
    S=${S:-$OUT/lte-72x.parquet}
    [ -f "$S" ] || python3 - "$S" <<'PY'
import datetime, glob, sys
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
base = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob("../shared/data/lte/*.parquet"))])
base = base.sort_by([("time", "ascending")])
i = base.schema.get_field_index("time")
step = pa.scalar(datetime.timedelta(days=730), pa.duration("us"))
copies = [base.set_column(i, "time", pc.add(base["time"], pc.multiply(step, k)).cast(base.schema.field(i).type)) for k in range(72)]
pq.write_table(pa.concat_tables(copies), sys.argv[1])
PY
    pipeline=pipelines/lte-replay.toml; ref_replay=1.0; keep=0.9; replay=0.25
    extra=();;
  beam)
    S=${S:-$OUT/beam-32x.parquet}
    [ -f "$S" ] || python3 - "$S" <<'PY'
import glob, sys
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
base = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob("../shared/data/beam/*.parquet"))])
i = base.schema.get_field_index("sample_index")
idx = base["sample_index"].cast(pa.int64())
copies = [base.set_column(i, "sample_index", pc.add(idx, 1_000_000 * k)) for k in range(32)]
pq.write_table(pa.concat_tables(copies), sys.argv[1])
PY
    pipeline=pipelines/beam-replay.toml; ref_replay=3.0; keep=0.9; replay=2.0
    extra=(--set 'evaluation.periods=[]' --set 'evaluation.changes=[]');;
  *) echo "WORKLOAD is milan, lte or beam" >&2; exit 2;;
esac
common=(--quiet --json --set "source.path=\"$S\"" "${extra[@]}" --set 'buffer.policy="fifo"' --set buffer.rescore_every=0 --set compute.reference_replay_ratio=$ref_replay --set output.scores=false --set telemetry.enabled=false)
for seed in 1 2 3 4 5; do
  for cfg in reference shipped random; do
    case $cfg in
      reference) sets=(--set 'selection.policy="random"' --set 'selection.unit="row"' --set selection.keep=1.0 --set buffer.replay_ratio=$ref_replay)
        [ "$WORKLOAD" != beam ] || sets+=(--set training.micro_batch=8 --set training.steps_per_batch=2);;
      shipped) sets=(); for s in ${SHIPPED_SET:-}; do sets+=(--set "$s"); done;;
      random) sets=(--set 'selection.policy="random"' --set 'selection.unit="row"' --set selection.keep=$keep --set buffer.replay_ratio=$replay);;
    esac
    $B run $pipeline "${common[@]}" "${sets[@]}" --set training.seed=$seed --output "$OUT/$WORKLOAD-$cfg-$seed" > "$OUT/$WORKLOAD-$cfg-$seed.json"
  done
done
python3 - "$OUT" "$WORKLOAD" <<'PY'
import json, statistics as st, sys
out, w = sys.argv[1:]
runs = {c: [json.load(open(f"{out}/{w}-{c}-{s}.json")) for s in range(1, 6)] for c in ["reference", "shipped", "random"]}
for c, rs in runs.items():
    cpu = [1 - r["compute"]["learn_cpu_s"] / f["compute"]["learn_cpu_s"] for r, f in zip(rs, runs["reference"])]
    # Against the reference run's counted rows (its micro-batches and steps may differ).
    back = lambda r: r["compute"]["training"]["rows_backward"] + r["compute"]["scoring"]["rows_backward"]
    rows = [1 - back(r) / back(f) for r, f in zip(rs, runs["reference"])]
    wall = [1 - r["wall_s"] / f["wall_s"] for r, f in zip(rs, runs["reference"])]
    k = "power_loss_db" if w == "beam" else "mae"
    mae = [r["metrics"]["model"][k] / f["metrics"]["model"][k] - 1 for r, f in zip(rs, runs["reference"])]
    print(f"{w} {c:9} learning CPU saved {100*st.mean(cpu):5.1f} ± {100*st.stdev(cpu):4.1f} %   rows saved {100*st.mean(rows):5.1f} %   wall saved {100*st.mean(wall):5.1f} ± {100*st.stdev(wall):4.1f} %   {k} {100*st.mean(mae):+.2f} ± {100*st.stdev(mae):.2f} %   (paired, 5 seeds)")
# Learning CPU per optimiser step against back-propagated rows per step: the line through
# every-row training and random rows (the same steps, fewer rows) splits a step's
# cost into a fixed part and a part per row, per seed.
def per_step(r):
    t = r["compute"]["training"]
    s = r["compute"]["scoring"]
    steps = t["optimizer_steps"]
    rows = (t["rows_backward"] + s["rows_backward"]) / steps
    return rows, 1e6 * r["compute"]["learn_cpu_s"] / steps
fits = []
same_steps = all(f["compute"]["training"]["optimizer_steps"] == r["compute"]["training"]["optimizer_steps"]
                 for f, r in zip(runs["reference"], runs["random"]))
for f, r in (zip(runs["reference"], runs["random"]) if same_steps else []):
    (x0, y0), (x1, y1) = per_step(f), per_step(r)
    slope = (y0 - y1) / (x0 - x1)
    fits.append((y0 - slope * x0, slope, x0, y0, x1, y1))
m = lambda i: st.mean(f[i] for f in fits)
if fits:
    print(f"{w} per step: every-row {m(3):.1f} µs for {m(2):.1f} rows, random rows {m(5):.1f} µs for {m(4):.1f} rows: "
          f"fixed {m(0):.1f} ± {st.stdev(f[0] for f in fits):.1f} µs + {m(1):.2f} ± {st.stdev(f[1] for f in fits):.2f} µs per back-propagated row (5 seeds)")
PY
