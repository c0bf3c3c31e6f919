#!/usr/bin/env python3
"""The first stage of the shipped-default rule over one or more experiments of one workload
(same reference): the configurations whose mean validation metric on their 5 seeds is within
MARGIN (0.5%) of every-row training's, least learning FLOPs first, with their test figures.
Reads each experiment's `frontier.csv`. The second stage, `experiments/confirm.py`, runs these
candidates on fresh seeds: on 5 seeds the cheapest candidate is mostly the luckiest.

    python3 experiments/pick.py experiments/results/milan experiments/results/milan-batches
"""
import csv
import sys

MARGIN = 0.005


def main(dirs):
    rows, ref = [], None
    for d in dirs:
        for r in csv.DictReader(open(f"{d}/frontier.csv")):
            if r["family"] == "reference":
                ref = ref or r
                continue
            rows.append((d.rstrip("/").split("/")[-1], r))
    higher = "top1" in ref.get("metric", "")  # every shipped metric here is lower-is-better
    rv, rt = float(ref["validation_mean"]), float(ref["test_mean"])
    worse = lambda v, base: (base - v) / base if higher else (v - base) / base
    cands = []
    for exp, r in rows:
        v = worse(float(r["validation_mean"]), rv)
        if v <= MARGIN:
            t = worse(float(r["test_mean"]), rt)
            cands.append((float(r["compute_fraction_mean"]), v, t, float(r["test_sd"]) / rt, r["label"], exp))
    cands.sort()
    print(f"within {100 * MARGIN:.1f}% of every-row training on validation, cheapest first:")
    for c, v, t, sd, label, exp in cands[:8]:
        print(f"  FLOPs {c:.3f}  validation {100 * v:+.2f}%  test {100 * t:+.2f}% (sd {100 * sd:.2f})  {label}  [{exp}]")
    if not cands:
        print("  none")


if __name__ == "__main__":
    main(sys.argv[1:])
