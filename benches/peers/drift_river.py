"""River's drift-aware online learners beside gradsift on gradsift's drifting streams (issue 13, 6).

What it measures: whole-stream prequential metrics (each sample predicted, then learned, in
stream order) of gradsift and of three River learners on the same streams and on exactly the
same input vectors:

* beam-tracking, beam-replay (DeepSense 6G, 64 beams, four sites one after another): power
  loss in dB, mean over rows of 10*log10(P_best / P_chosen) as in src/learner/eval.rs (rows
  whose best or chosen beam power is not positive are left out, as there), and top-1.
* lte-replay (two LTE sites one after another), milan-replay (Milan traffic, Christmas
  weeks): MAE in target units.

gradsift runs each pipeline once per seed (training.seed) with output.features=true; its score
file then holds, per sample in stream order, the model's input vector (`features`) and the
target. The River learners read those vectors as {i: value} dicts, so features, sample order
and sample set are the same for both; only the learner differs. River models, per task:

* regression: forest.ARFRegressor (ADWIN drift and warning detectors, River defaults),
  tree.HoeffdingAdaptiveTreeRegressor, and StandardScaler | LinearRegression re-created
  (scalers included) when drift.ADWIN on its absolute error, in target units, detects a
  change. All three sit inside preprocessing.TargetStandardScaler (running mean/sd of the
  target): LTE targets are ~1e8, which the trees' linear leaf models and SGD would otherwise
  fit raw. LinearRegression gets clip_gradient=1.0 (River's default is 1e12): with
  plain SGD (lr 0.01) it diverges on lte-replay (MAE ~1e11 without resets, ~1e15 with),
  early while the running scalers have seen few rows; clipped, it does not.
* classification (beam): forest.ARFClassifier, tree.HoeffdingAdaptiveTreeClassifier (both
  with River's default naive-Bayes-adaptive leaves: majority-class leaves are ~3x faster but
  near-useless here, top-1 ~5%, as trees on 64 classes split late), and
  linear_model.SoftmaxRegression re-created when drift.ADWIN on its 0/1 error detects a
  change. A model that has seen no label yet predicts None: that counts as beam 0 (the count
  is printed below the table).

The forests and trees take the seed (HAT: its bootstrap); gradsift's seed s is paired with
River's seed s on the features of that gradsift run. The linear models have no seed: where a
seed's features and targets equal the first seed's, its result is reused rather than re-run.
Figures are mean ± sd over seeds. River samples/s is the prequential loop's rate (predict_one +
learn_one + metric), with --jobs River runs side by side.

Runtime: ARF runs n_models=5 here (--n-models), not River's 10. On the beam streams (64
classes, 71 and 79 features) ARFClassifier with 10 trees predicts and learns ~55 samples/s,
which puts the whole comparison at ~15 min on 2 idle cores; with 5 it took 1240 CPU-s
(~10.5 min on 2 idle cores; 18 min wall while a cargo build shared the machine).

Run (not part of CI), from anywhere:
    bash benches/peers/drift_river.sh
    /var/tmp/peers-venv/bin/python benches/peers/drift_river.py \
        --gradsift /var/tmp/gradsift-target/release/gradsift --out /var/tmp/river-drift
Everything written (gradsift outputs, results JSON) goes under --out, outside the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]

# (name, pipeline, task)
STREAMS = [
    ("beam-tracking", "pipelines/beam-tracking.toml", "beam"),
    ("beam-replay", "pipelines/beam-replay.toml", "beam"),
    ("lte-replay", "pipelines/lte-replay.toml", "regression"),
    ("milan-replay", "pipelines/milan-replay.toml", "regression"),
]
MODELS = {
    "regression": ["ARFRegressor", "HoeffdingAdaptiveTreeRegressor", "LinearRegression+ADWIN"],
    "beam": ["ARFClassifier", "HoeffdingAdaptiveTreeClassifier", "SoftmaxRegression+ADWIN"],
}
# Table columns: the same three kinds of learner on both tasks.
COLUMNS = ["ARF", "HAT", "linear + ADWIN reset"]
SHORT = ["ARF", "HAT", "lin"]


# ---------------------------------------------------------------- gradsift


def run_gradsift(binary: str, name: str, pipeline: str, seed: int, out: Path) -> dict:
    """One gradsift run with features in the score file; returns its --json report."""
    run_dir = out / f"{name}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own output from an earlier run of this script
    cmd = [
        binary, "run", pipeline, "--quiet", "--json",
        "--set", "telemetry.enabled=false",
        "--set", "output.features=true",
        "--set", f"training.seed={seed}",
        "--output", str(run_dir),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        msg = p.stderr.strip()[-2000:]
        if "output.features" in p.stderr:
            msg += "\n(this gradsift binary does not accept output.features yet: rebuild it)"
        sys.exit(f"gradsift failed on {pipeline} seed {seed}:\n{msg}")
    report = json.loads(p.stdout)
    (out / f"{name}-s{seed}.json").write_text(p.stdout)
    return report


def score_files(run_dir: Path) -> list[Path]:
    single = run_dir / "scores.parquet"
    if single.exists():
        return [single]
    parts = sorted((run_dir / "scores").glob("part-*.parquet"))
    if not parts:
        sys.exit(f"no score file under {run_dir}")
    return parts


def list_to_matrix(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), d)
    return np.stack(arr.to_numpy(zero_copy_only=False))


def read_scores(run_dir: Path) -> dict:
    """Key, time, features and target of every sample, in stream order (file order)."""
    cols = ["key", "time", "target", "features"]
    tables = [pq.read_table(f) for f in score_files(run_dir)]
    missing = [c for c in cols if c not in tables[0].column_names]
    if missing:
        sys.exit(f"{run_dir}: score file lacks {missing} (output.features not honoured?)")
    t = pa.concat_tables([tb.select(cols) for tb in tables])
    return {
        "key": t.column("key").to_pylist(),
        "time": t.column("time").to_pylist(),
        "target": t.column("target").to_numpy(),
        "features": list_to_matrix(t.column("features")),
    }


def beam_powers(beam_dir: Path, keys: list, times: list) -> np.ndarray:
    """Per-sample received power of the 64 beams, joined on (scenario, sample_index)."""
    index, blocks, base = {}, [], 0
    for f in sorted(beam_dir.glob("deepsense_scenario*.parquet")):
        t = pq.read_table(f, columns=["scenario", "sample_index", "beam_power"])
        blocks.append(list_to_matrix(t.column("beam_power")).astype(np.float64))
        for i, (k, s) in enumerate(zip(t.column("scenario").to_pylist(),
                                       t.column("sample_index").to_pylist())):
            index[(str(k), int(s))] = base + i
        base += t.num_rows
    power = np.concatenate(blocks)
    try:
        rows = [index[(str(k), int(s))] for k, s in zip(keys, times)]
    except KeyError as e:
        sys.exit(f"score row {e} has no beam_power row in {beam_dir}")
    return power[rows]


# ---------------------------------------------------------------- River


def make_model(kind: str, seed: int, n_models: int):
    from river import forest, linear_model, preprocessing, tree

    def tss(reg):  # target scaling: see the module docstring
        return preprocessing.TargetStandardScaler(regressor=reg)

    if kind == "ARFRegressor":
        return tss(forest.ARFRegressor(n_models=n_models, seed=seed))
    if kind == "HoeffdingAdaptiveTreeRegressor":
        return tss(tree.HoeffdingAdaptiveTreeRegressor(seed=seed))
    if kind == "LinearRegression+ADWIN":
        return preprocessing.StandardScaler() | tss(linear_model.LinearRegression(clip_gradient=1.0))
    if kind == "ARFClassifier":
        return forest.ARFClassifier(n_models=n_models, seed=seed)
    if kind == "HoeffdingAdaptiveTreeClassifier":
        return tree.HoeffdingAdaptiveTreeClassifier(seed=seed)
    if kind == "SoftmaxRegression+ADWIN":
        return linear_model.SoftmaxRegression()
    raise ValueError(kind)


def power_loss_terms(power: np.ndarray, chosen: np.ndarray) -> tuple[float, int]:
    """Sum of 10*log10(P_best / P_chosen) and its row count (eval.rs: both powers > 0)."""
    best = power.max(axis=1)
    pick = power[np.arange(len(chosen)), chosen]
    ok = (best > 0) & (pick > 0)
    return float(np.sum(10.0 * np.log10(best[ok] / pick[ok]))), int(ok.sum())


def river_job(job: dict) -> dict:
    """One model, one seed, one stream, prequential in stream order."""
    from river import drift

    kind, seed, task = job["kind"], job["seed"], job["task"]
    X = job["features"]
    xs = [dict(enumerate(row)) for row in X.tolist()]
    y = job["target"]
    n = len(xs)
    resettable = kind.endswith("+ADWIN")
    model = make_model(kind, seed, job["n_models"])
    detector = drift.ADWIN() if resettable else None
    resets = nones = 0
    preds = np.zeros(n, dtype=np.float64 if task == "regression" else np.int64)
    if task == "regression":
        ys = [float(v) for v in y]
    else:
        ys = [int(v) for v in y]

    t0 = time.perf_counter()
    for i in range(n):
        x, yi = xs[i], ys[i]
        p = model.predict_one(x)
        if p is None:  # classifier that has seen no label yet: counts as beam 0
            nones += 1
            p = 0
        preds[i] = p
        model.learn_one(x, yi)
        if detector is not None:
            err = abs(yi - p) if task == "regression" else float(p != yi)
            detector.update(err)
            if detector.drift_detected:
                model = make_model(kind, seed, job["n_models"])
                resets += 1
    secs = time.perf_counter() - t0

    out = {"stream": job["stream"], "kind": kind, "seed": seed, "n": n, "secs": secs,
           "resets": resets, "nones": nones}
    if task == "regression":
        err = np.abs(preds - y)
        out["nonfinite"] = int((~np.isfinite(preds)).sum())
        out["mae"] = float(err.mean())
    else:
        out["top1"] = float(np.mean(preds == y.astype(np.int64)))
        s, k = power_loss_terms(job["power"], preds)
        out["power_loss_db"] = s / k if k else float("nan")
        out["power_rows"] = k
    return out


# ---------------------------------------------------------------- table


def mean_sd(vals: list[float]) -> tuple[float, float]:
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(vals: list[float], digits: int, scale: float = 1.0) -> str:
    if any(not math.isfinite(v) for v in vals):
        return "n/a (non-finite)"
    m, s = mean_sd([v / scale for v in vals])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def rate(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gradsift", default="/var/tmp/gradsift-target/release/gradsift",
                    help="gradsift binary (must accept output.features)")
    ap.add_argument("--out", default="/var/tmp/river-drift", type=Path,
                    help="working directory for gradsift outputs and results (not the repo)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (gradsift and River)")
    ap.add_argument("--streams", default=",".join(s[0] for s in STREAMS),
                    help="comma-separated subset of " + ",".join(s[0] for s in STREAMS))
    ap.add_argument("--n-models", type=int, default=5,
                    help="trees per adaptive random forest (River's default 10: ~15 min in all)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="River runs in parallel")
    ap.add_argument("--beam-data", type=Path, default=REPO.parent / "shared/data/beam",
                    help="directory of deepsense_scenario*.parquet (beam_power, read in place)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = args.streams.split(",")
    streams = [s for s in STREAMS if s[0] in wanted]
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        sys.exit("--out must lie outside the repository")
    out.mkdir(parents=True, exist_ok=True)

    gradsift: dict[str, list[dict]] = {}
    jobs, info, reused = [], {}, []
    for name, pipeline, task in streams:
        gradsift[name] = []
        first = None
        for seed in seeds:
            t0 = time.perf_counter()
            report = run_gradsift(args.gradsift, name, pipeline, seed, out)
            gradsift[name].append(report["metrics"]["model"])
            sc = read_scores(out / f"{name}-s{seed}")
            print(f"gradsift {name} seed {seed}: {len(sc['target'])} samples, "
                  f"d={sc['features'].shape[1]}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            power = beam_powers(args.beam_data, sc["key"], sc["time"]) if task == "beam" else None
            if first is None:
                first = sc
                info[name] = {"n": len(sc["target"]), "d": sc["features"].shape[1],
                              "feature_diff": 0.0}
            elif sc["features"].shape == first["features"].shape:
                info[name]["feature_diff"] = max(
                    info[name]["feature_diff"],
                    float(np.max(np.abs(sc["features"] - first["features"]), initial=0.0)))
            else:
                info[name]["feature_diff"] = float("inf")
            same = sc is first or (
                np.array_equal(sc["features"], first["features"])
                and np.array_equal(sc["target"], first["target"]))
            for kind in MODELS[task]:
                if kind.endswith("+ADWIN") and same and sc is not first:
                    reused.append((name, kind, seed))  # deterministic: same result as seed 1
                    continue
                jobs.append({"stream": name, "task": task, "kind": kind, "seed": seed,
                             "n_models": args.n_models, "features": sc["features"],
                             "target": sc["target"], "power": power})
    t_gradsift = time.perf_counter() - t_start

    # Longest first: the forests.
    jobs.sort(key=lambda j: (not j["kind"].startswith("ARF"), -len(j["target"])))
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(river_job, j) for j in jobs]
        for f in as_completed(futures):
            r = f.result()
            print(f"river {r['stream']} {r['kind']} seed {r['seed']}: {r['secs']:.1f} s, "
                  f"{r['resets']} resets, {r['nones']} None", file=sys.stderr)
            results.append(r)
    for name, kind, seed in reused:
        r = next(r for r in results if (r["stream"], r["kind"], r["seed"]) == (name, kind, seeds[0]))
        results.append({**r, "seed": seed, "reused": True})
    t_total = time.perf_counter() - t_start
    (out / "river-drift.json").write_text(json.dumps(
        {"gradsift": gradsift, "river": results, "info": info, "seeds": seeds,
         "n_models": args.n_models}, indent=1))

    # ---- the table
    by = {}
    for r in results:
        by.setdefault((r["stream"], r["kind"]), []).append(r)
    header = ["stream", "metric", "gradsift"] + COLUMNS + ["River samples/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for name, _, task in streams:
        kinds = MODELS[task]
        speeds = " · ".join(
            f"{SHORT[i]} {rate(statistics.fmean(r['n'] / r['secs'] for r in by[(name, k)]))}"
            for i, k in enumerate(kinds))
        if task == "beam":
            metrics = [("power loss dB", "power_loss_db", 3, 1.0),
                       ("top-1 %", "top1", 1, 0.01)]
        else:
            g = statistics.fmean(m["mae"] for m in gradsift[name])
            e = 3 * int(math.floor(math.log10(abs(g)) / 3)) if g and abs(g) >= 1e3 else 0
            label = "MAE" + (f" (×1e{e})" if e else "")
            metrics = [(label, "mae", 2 if e else 1, 10.0 ** e)]
        for j, (label, key, digits, scale) in enumerate(metrics):
            cells = [name if j == 0 else "", label,
                     fmt([m[key] for m in gradsift[name]], digits, scale)]
            cells += [fmt([r[key] for r in by[(name, k)]], digits, scale) for k in kinds]
            cells.append(speeds if j == 0 else "")
            lines.append("| " + " | ".join(cells) + " |")
        i = info[name]
        resets = [r["resets"] for r in by[(name, kinds[2])]]
        nones = {k: [r["nones"] for r in by[(name, k)]] for k in kinds}
        note = (f"{name}: {i['n']} samples, d={i['d']}; linear resets per seed {resets}; "
                f"None predictions (scored as beam 0 / never for regressors) "
                + ", ".join(f"{SHORT[x]} {nones[k]}" for x, k in enumerate(kinds)))
        if i["feature_diff"] > 0:
            note += f"; features differ across gradsift seeds (max |Δ| {i['feature_diff']:.3g})"
        if task == "beam":
            rows = {k: sorted({r["power_rows"] for r in by[(name, k)]}) for k in kinds}
            if any(v != [i["n"]] for v in rows.values()):
                note += f"; power-loss rows (both powers > 0): {rows}"
        notes.append(note)

    print()
    print("\n".join(lines))
    print()
    print(f"Prequential, whole stream, mean ± sd over seeds {seeds}. Columns: "
          f"ARF = forest.ARF{{Regressor,Classifier}}(n_models={args.n_models}); "
          "HAT = tree.HoeffdingAdaptiveTree{Regressor,Classifier}; "
          "linear = StandardScaler | LinearRegression (regression) or SoftmaxRegression (beam), "
          "re-created on drift.ADWIN over |error| (0/1 error for beam). River regressors inside "
          "TargetStandardScaler. Same input vectors as gradsift (its output.features).")
    for n in notes:
        print(f"- {n}")
    print(f"- wall: gradsift runs {t_gradsift:.0f} s, total {t_total:.0f} s "
          f"(River with {args.jobs} jobs in parallel on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
