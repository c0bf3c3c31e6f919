#!/usr/bin/env python3
"""Every configuration against `random` at the same axes (the same keep, replay, unit and
micro-batch: equal compute for a policy that trains the rows random trains), paired by seed,
on each period: the mean and sd of the per-seed Δ in percent, how many seeds it is better in,
and `*` where |mean| > 2 sd. Several result folders are pooled by seed (a 5-seed screen and
its 10-seed confirmation). Standard library only.

    python3 experiments/paired.py experiments/results/milan-clip
    python3 experiments/paired.py experiments/results/milan-clip experiments/results/milan-clip-seeds
    python3 experiments/paired.py experiments/results/beam-clip --metric power_loss_db
"""
import argparse
import csv
import statistics
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="experiment result folders (results.csv inside)")
    ap.add_argument("--metric", default="mae", help="the metric column's suffix (lower is better)")
    ap.add_argument("--periods", default="validation,test")
    args = ap.parse_args()
    runs = defaultdict(dict)
    for d in args.results:
        with open(f"{d}/results.csv") as f:
            for r in csv.DictReader(f):
                if r["status"] == "ok":
                    runs[(r["family"], r["axes"])][int(r["seed"])] = r
    periods = args.periods.split(",")
    head = "".join(f"{p + ' Δ vs random':>26s}" for p in periods)
    print(f"{'configuration':64s}{head}  seeds")
    for (family, axes), by_seed in sorted(runs.items()):
        base = runs.get(("random", axes))
        if family in ("random", "reference") or not base:
            continue
        seeds = sorted(s for s in by_seed if s in base)
        cells = []
        for p in periods:
            col = f"{p}_{args.metric}"
            d = [100 * (float(by_seed[s][col]) / float(base[s][col]) - 1) for s in seeds]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            mean = statistics.mean(d)
            star = "*" if abs(mean) > 2 * sd else " "
            better = sum(x < 0 for x in d)
            cells.append(f"{mean:+7.2f} ± {sd:5.2f}%{star} ({better:2d} better)")
        print(f"{family + '/' + axes:64s}" + "".join(f"{c:>26s}" for c in cells) + f"  {len(seeds)}")


if __name__ == "__main__":
    main()
