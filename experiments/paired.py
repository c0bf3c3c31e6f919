#!/usr/bin/env python3
"""Every configuration against `random` at the same axes (the same keep, replay, unit and
micro-batch: equal compute for a policy that trains the rows random trains), paired by seed,
on each period: the mean and sd of the per-seed Δ in percent, how many seeds it is better in,
and `*` where |mean| > 2 sd (only with 2 seeds or more; with one seed the sd is n/a). Several
result folders are pooled by seed (a 5-seed screen and its 10-seed confirmation); a run that
two folders both hold (the same family, axes and seed) is kept from the first folder given,
with a warning on stderr. Standard library only.

Δ is the change of the metric itself, configuration over random. For most metrics (mae,
power_loss_db) lower is better: a negative Δ is better. For top1, top3 and accuracy metrics
(detected by the metric's name) higher is better: a positive Δ is better, and "better" counts
the seeds where the metric is higher.

The partner is found by the axes alone, so a family whose fixed settings differ from random's
(another micro-batch, an anneal, another scorer's cost) may train at another compute. The last
column is the configuration's compute (learn_flops, else rows_backward, mean over the paired
seeds) over its partner's; outside 0.95-1.05 the line says "(unequal compute)": that Δ mixes
the policy with the compute.

    python3 experiments/paired.py experiments/results/milan-clip
    python3 experiments/paired.py experiments/results/milan-clip experiments/results/milan-clip-seeds
    python3 experiments/paired.py experiments/results/beam-clip --metric power_loss_db
"""
import argparse
import csv
import re
import statistics
import sys
from collections import defaultdict

COMPUTE_COLUMNS = ("learn_flops", "rows_backward")
EQUAL_COMPUTE = (0.95, 1.05)


def higher_is_better(metric):
    m = metric.lower()
    return re.fullmatch(r"top\d+", m) is not None or "accuracy" in m


def compute_ratio(mine, base, seeds, col):
    if col is None:
        return None
    try:
        a = statistics.mean(float(mine[s][col]) for s in seeds)
        b = statistics.mean(float(base[s][col]) for s in seeds)
    except (KeyError, TypeError, ValueError):
        return None
    return a / b if b else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="experiment result folders (results.csv inside)")
    ap.add_argument("--metric", default="mae",
                    help="the metric column's suffix (lower is better, but top1, top3, accuracy)")
    ap.add_argument("--periods", default="validation,test")
    args = ap.parse_args()
    runs = defaultdict(dict)
    source = {}
    repeats = defaultdict(list)  # (folder, the folder read first) -> the runs repeated
    columns = None
    for d in args.results:
        with open(f"{d}/results.csv") as f:
            reader = csv.DictReader(f)
            have = set(reader.fieldnames or [])
            columns = have if columns is None else columns & have
            for r in reader:
                if r["status"] != "ok":
                    continue
                key, seed = (r["family"], r["axes"]), int(r["seed"])
                if seed in runs[key]:
                    repeats[(d, source[key + (seed,)])].append(f"{key[0]}/{key[1]} seed {seed}")
                    continue
                runs[key][seed] = r
                source[key + (seed,)] = d
    for (d, first), which in repeats.items():
        print(f"warning: {d} holds {len(which)} run(s) already read from {first} (the same family, "
              f"axes and seed; e.g. {which[0]}): kept the first, not pooled", file=sys.stderr)
    col = next((c for c in COMPUTE_COLUMNS if c in columns), None)
    higher = higher_is_better(args.metric)
    periods = args.periods.split(",")
    head = "".join(f"{p + ' Δ vs random':>26s}" for p in periods)
    tail = f"  compute vs random ({col})" if col else ""
    print(f"{'configuration':64s}{head}  seeds{tail}")
    for (family, axes), by_seed in sorted(runs.items()):
        base = runs.get(("random", axes))
        if family in ("random", "reference") or not base:
            continue
        seeds = sorted(s for s in by_seed if s in base)
        if not seeds:
            print(f"{family + '/' + axes:64s}  no seed in common with random")
            continue
        cells = []
        for p in periods:
            pcol = f"{p}_{args.metric}"
            d = [100 * (float(by_seed[s][pcol]) / float(base[s][pcol]) - 1) for s in seeds]
            mean = statistics.mean(d)
            if len(d) > 1:
                sd = statistics.stdev(d)
                star = "*" if abs(mean) > 2 * sd else " "
                sd_text = f"{sd:5.2f}"
            else:
                star, sd_text = " ", f"{'n/a':>5s}"
            better = sum(x > 0 if higher else x < 0 for x in d)
            cells.append(f"{mean:+7.2f} ± {sd_text}%{star} ({better:2d} better)")
        ratio = compute_ratio(by_seed, base, seeds, col)
        note = ""
        if col:
            if ratio is None:
                note = "  n/a"
            else:
                note = f"  ×{ratio:.2f}"
                if not EQUAL_COMPUTE[0] <= ratio <= EQUAL_COMPUTE[1]:
                    note += " (unequal compute)"
        print(f"{family + '/' + axes:64s}" + "".join(f"{c:>26s}" for c in cells) + (f"  {len(seeds):<5d}" + note if note else f"  {len(seeds)}"))


if __name__ == "__main__":
    main()
