#!/usr/bin/env python3
"""Peer timings for gradsift's fused CPU kernel: JAX (CPU, jit), numpy by hand, River.

MLP 16 -> 64 -> 64 -> 1, ReLU, f32, loss l_i = (yhat_i - y_i)^2, Adam (b1 0.9, b2 0.999,
eps 1e-5, lr 1e-3, written by hand; no optax), at B = 256 and B = 8, random normal inputs.
One thread: the env below is set before numpy/jax are imported; run under `taskset -c 1`.
Medians of many timed calls, each after warm-up and ending in block_until_ready.

    taskset -c 1 python benches/peers/peers.py [--out /var/tmp/peers/peers.json]

Not part of CI; see README.md beside this file.
"""

import os

# Must precede the numpy/jax imports: BLAS and XLA read these once, at load time.
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ["JAX_PLATFORMS"] = "cpu"
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZES = (16, 64, 64, 1)
B1, B2, EPS, LR = 0.9, 0.999, 1e-5, 1e-3
SEED = 7


def flops(b):
    """FLOPs of one batch: forward, activation gradients (none w.r.t. inputs), weight gradients."""
    layers = list(zip(SIZES[:-1], SIZES[1:]))
    fwd = 2 * b * sum(i * o for i, o in layers)
    act = 2 * b * sum(i * o for i, o in layers[1:])
    wgt = 2 * b * sum(i * o for i, o in layers)
    return {"forward": fwd, "activation_grads": act, "weight_grads": wgt}


def init_params(rng):
    """He-normal weights, zero biases, f32; shared by the JAX and numpy runs."""
    return [
        (
            (rng.standard_normal((i, o)) * np.sqrt(2.0 / i)).astype(np.float32),
            np.zeros(o, np.float32),
        )
        for i, o in zip(SIZES[:-1], SIZES[1:])
    ]


# ---------------------------------------------------------------- timing


def median_us(call, min_reps, seconds):
    """Median wall time of `call()` in µs over at least min_reps calls and `seconds` seconds."""
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3, len(times)


# ---------------------------------------------------------------- JAX


def jax_mlp(params, x, deltas=None):
    """Forward pass; returns yhat (B,) and each layer's input. `deltas` are zeros added to the
    pre-activations so that grad w.r.t. them is the per-row gradient w.r.t. z_k."""
    a, inputs = x, []
    for k, (w, b) in enumerate(params):
        inputs.append(a)
        z = a @ w + b
        if deltas is not None:
            z = z + deltas[k]
        a = jax.nn.relu(z) if k + 1 < len(params) else z
    return a[:, 0], inputs


@jax.jit
def jax_ghost_norms(params, x, y):
    """Exact per-sample gradient norms: one forward, one backward of the summed loss w.r.t. z_k,
    s_i^2 = sum_k (|a_k,i|^2 + 1) |g_k,i|^2 (the +1 is the bias)."""
    deltas = [jnp.zeros((x.shape[0], w.shape[1]), x.dtype) for w, _ in params]

    def summed(d):
        yhat, inputs = jax_mlp(params, x, d)
        return jnp.sum((yhat - y) ** 2), inputs

    gs, inputs = jax.grad(summed, has_aux=True)(deltas)
    s2 = sum((jnp.sum(a * a, 1) + 1.0) * jnp.sum(g * g, 1) for a, g in zip(inputs, gs))
    return jnp.sqrt(s2)


def _loss_one(params, x, y):
    yhat, _ = jax_mlp(params, x[None, :])
    return (yhat[0] - y) ** 2


@jax.jit
def jax_vmap_norms(params, x, y):
    """Per-sample gradients materialised by vmap(grad), then their norms."""
    g = jax.vmap(jax.grad(_loss_one), in_axes=(None, 0, 0))(params, x, y)
    leaves = jax.tree_util.tree_leaves(g)
    return jnp.sqrt(sum(jnp.sum(l.reshape(x.shape[0], -1) ** 2, 1) for l in leaves))


def _mean_loss(params, x, y):
    yhat, _ = jax_mlp(params, x)
    return jnp.mean((yhat - y) ** 2)


jax_fwd_bwd = jax.jit(jax.value_and_grad(_mean_loss))


@partial(jax.jit, donate_argnums=(0, 1, 2))
def jax_adam_step(params, m, v, t, x, y):
    """Forward + backward + one Adam step (by hand, bias-corrected)."""
    loss, g = jax.value_and_grad(_mean_loss)(params, x, y)
    t = t + 1
    tm = jax.tree_util.tree_map
    m = tm(lambda m, g: B1 * m + (1 - B1) * g, m, g)
    v = tm(lambda v, g: B2 * v + (1 - B2) * g * g, v, g)
    c1 = 1 - B1 ** t.astype(jnp.float32)
    c2 = 1 - B2 ** t.astype(jnp.float32)
    params = tm(lambda p, m, v: p - LR * (m / c1) / (jnp.sqrt(v / c2) + EPS), params, m, v)
    return params, m, v, t, loss


# ---------------------------------------------------------------- numpy


def np_forward(params, x):
    a, inputs, masks = x, [], []
    for k, (w, b) in enumerate(params):
        inputs.append(a)
        z = a @ w + b
        if k + 1 < len(params):
            masks.append(z > 0)
            a = np.maximum(z, 0)
        else:
            a = z
    return a, inputs, masks


def np_deltas(params, inputs, masks, out_grad):
    """Per-row gradients w.r.t. each z_k, last layer first; none w.r.t. the inputs."""
    g = out_grad
    gs = [g]
    for k in range(len(params) - 1, 0, -1):
        g = (g @ params[k][0].T) * masks[k - 1]
        gs.append(g)
    return gs[::-1]


def np_ghost_norms(params, x, y):
    yhat, inputs, masks = np_forward(params, x)
    gs = np_deltas(params, inputs, masks, 2 * (yhat - y[:, None]))
    s2 = sum(
        (np.einsum("ij,ij->i", a, a) + 1) * np.einsum("ij,ij->i", g, g) for a, g in zip(inputs, gs)
    )
    return np.sqrt(s2)


def np_fwd_bwd(params, x, y):
    yhat, inputs, masks = np_forward(params, x)
    r = yhat - y[:, None]
    loss = np.mean(r * r)
    gs = np_deltas(params, inputs, masks, (2 / x.shape[0]) * r)
    return loss, [(a.T @ g, g.sum(0)) for a, g in zip(inputs, gs)]


class NpAdam:
    """Forward + backward + Adam on numpy arrays, updated in place."""

    def __init__(self, params):
        self.p = [(w.copy(), b.copy()) for w, b in params]
        self.m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
        self.v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
        self.t = 0

    def step(self, x, y):
        loss, grads = np_fwd_bwd(self.p, x, y)
        self.t += 1
        c1, c2 = 1 - B1**self.t, 1 - B2**self.t
        for p2, m2, v2, g2 in zip(self.p, self.m, self.v, grads):
            for p, m, v, g in zip(p2, m2, v2, g2):
                m *= B1
                m += (1 - B1) * g
                v *= B2
                v += (1 - B2) * g * g
                p -= (LR / c1) * m / (np.sqrt(v / c2) + EPS)
        return loss


# ---------------------------------------------------------------- River on Milan


def milan_features():
    """The Milan pipeline's features (schemas/milan_internet.json), widened to 16 inputs:
    log1p(internet) lagged per square_id at 1..9 slots (pipeline: 1..6), 143/144/145 (the same
    slot yesterday and its neighbours; pipeline: 144), hour-of-day and day-of-week as sin/cos in
    Milan local time (UTC+1, Monday = 0); target = change of log1p(internet) since lag 1
    (predict_change). Scaling is left to River's StandardScaler."""
    df = pd.read_parquet(sorted((REPO / "data" / "milan").glob("*.parquet"))[0])
    df = df.sort_values(["square_id", "ts"])
    v = np.log1p(df["internet"].astype(np.float64))
    lags = list(range(1, 10)) + [143, 144, 145]
    feats = {f"lag{k}": v.groupby(df["square_id"]).shift(k) for k in lags}
    local = df["ts"] + pd.Timedelta(hours=1)
    hour = local.dt.hour + local.dt.minute / 60
    dow = local.dt.day_of_week + hour / 24
    feats |= {
        "hour_sin": np.sin(2 * np.pi * hour / 24),
        "hour_cos": np.cos(2 * np.pi * hour / 24),
        "dow_sin": np.sin(2 * np.pi * dow / 7),
        "dow_cos": np.cos(2 * np.pi * dow / 7),
    }
    x = pd.DataFrame(feats)
    y = v - feats["lag1"]
    keep = x.notna().all(axis=1).to_numpy()
    return x[keep].reset_index(drop=True), y[keep].reset_index(drop=True)


def bench_river(min_samples, chunk):
    from river import linear_model, preprocessing

    x, y = milan_features()
    reps = -(-min_samples // len(x))  # cycle the bundled file to reach min_samples
    n = (reps * len(x)) // chunk * chunk
    xs = np.tile(x.to_numpy(), (reps, 1))[:n]
    ys = np.tile(y.to_numpy(), reps)[:n]
    cols = list(x.columns)
    out = []

    # Prequential, one sample at a time; dicts are built before timing, as a stream hands them.
    rows = [dict(zip(cols, map(float, r))) for r in x.to_numpy()]
    targets = [float(t) for t in y]
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    per_chunk, abs_err = [], 0.0
    t_all = time.perf_counter()
    for start in range(0, n, chunk):
        t0 = time.perf_counter_ns()
        for i in range(start, start + chunk):
            j = i % len(rows)
            abs_err += abs(model.predict_one(rows[j]) - targets[j])
            model.learn_one(rows[j], targets[j])
        per_chunk.append(time.perf_counter_ns() - t0)
    total = time.perf_counter() - t_all
    out.append(("river_linreg_learn_one", per_chunk, n, total, abs_err / n))

    # Mini-batches of `chunk` rows as DataFrames (built before timing): predict_many, learn_many.
    frames = [
        (pd.DataFrame(xs[s : s + chunk], columns=cols), pd.Series(ys[s : s + chunk]))
        for s in range(0, n, chunk)
    ]
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    per_chunk, abs_err = [], 0.0
    t_all = time.perf_counter()
    for xb, yb in frames:
        t0 = time.perf_counter_ns()
        pred = model.predict_many(xb)
        model.learn_many(xb, yb)
        per_chunk.append(time.perf_counter_ns() - t0)
        abs_err += float(np.abs(pred.to_numpy() - yb.to_numpy()).sum())
    total = time.perf_counter() - t_all
    out.append(("river_linreg_learn_many", per_chunk, n, total, abs_err / n))

    results = []
    for name, per_chunk, n, total, mae in out:
        med = statistics.median(per_chunk) / 1e3
        results.append(
            {
                "name": name,
                "batch": chunk,
                "median_us": med,
                "samples_per_s": chunk / (med * 1e-6),
                "samples": n,
                "overall_samples_per_s": n / total,
                "prequential_mae_log1p_change": mae,
                "features": cols,
            }
        )
    return results


# ---------------------------------------------------------------- main


def cpu_busy(cpus, seconds=0.5):
    """Share of `cpus`' time spent busy (by anyone) over `seconds`, from /proc/stat."""

    def sample():
        idle = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f[0].startswith("cpu") and f[0][3:].isdigit() and int(f[0][3:]) in cpus:
                v = list(map(int, f[1:8]))
                idle += v[3] + v[4]
                total += sum(v)
        return idle, total

    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
        return 1 - (i1 - i0) / max(t1 - t0, 1)
    except (OSError, ValueError):
        return 0.0


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def check_agreement(params, x, y):
    """The four norm/gradient implementations must agree before their times mean anything."""
    jp = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]
    ghost = np.asarray(jax_ghost_norms(jp, x, y))
    vmapped = np.asarray(jax_vmap_norms(jp, x, y))
    npn = np_ghost_norms(params, x, y)
    np.testing.assert_allclose(ghost, vmapped, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(ghost, npn, rtol=2e-3, atol=1e-4)
    _, jg = jax_fwd_bwd(jp, x, y)
    _, ng = np_fwd_bwd(params, x, y)
    for (jw, jb), (nw, nb) in zip(jg, ng):
        np.testing.assert_allclose(np.asarray(jw), nw, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jb), nb, rtol=2e-3, atol=1e-5)


def batch_calls(params, x, y):
    """(name, zero-argument call) for each timed JAX and numpy function on one batch."""
    jp = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    calls = [
        (name, partial(lambda fn: jax.block_until_ready(fn(jp, jx, jy)), fn))
        for name, fn in (
            ("jax_ghost_norms", jax_ghost_norms),
            ("jax_vmap_norms", jax_vmap_norms),
            ("jax_fwd_bwd", jax_fwd_bwd),
        )
    ]

    # Adam carries its state from call to call (donated buffers, as in a training loop).
    def zeros():
        return jax.tree_util.tree_map(jnp.zeros_like, jp)

    state = [jax.tree_util.tree_map(jnp.copy, jp), zeros(), zeros(), jnp.int32(0)]

    def adam_call():
        p, m, v, t, loss = jax_adam_step(*state, jx, jy)
        state[:] = [p, m, v, t]
        jax.block_until_ready((p, loss))

    adam = NpAdam(params)
    return calls + [
        ("jax_fwd_bwd_adam", adam_call),
        ("numpy_ghost_norms", lambda: np_ghost_norms(params, x, y)),
        ("numpy_fwd_bwd", lambda: np_fwd_bwd(params, x, y)),
        ("numpy_fwd_bwd_adam", lambda: adam.step(x, y)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/var/tmp/peers/peers.json")
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    ap.add_argument("--min-reps", type=int, default=200)
    ap.add_argument("--river-samples", type=int, default=200_000)
    ap.add_argument("--skip-river", action="store_true")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) != 1:
        print(
            f"warning: not pinned to one core (affinity {cpus}); use taskset -c 1", file=sys.stderr
        )
    busy = cpu_busy(cpus)
    if busy > 0.2:  # another process on our core inflates every median
        print(
            f"warning: CPU {cpus} already {busy:.0%} busy; timings want an idle core",
            file=sys.stderr,
        )

    budget = (args.min_reps, args.seconds)
    rng = np.random.default_rng(SEED)
    params = init_params(rng)
    results = []

    def record(name, b, med, n):
        sps = b / (med * 1e-6)
        results.append(
            {"name": name, "batch": b, "median_us": med, "samples_per_s": sps, "reps": n}
        )
        print(f"  {name:<24} B={b:<4} {med:10.2f} µs  {sps:14,.0f} samples/s  ({n} reps)")

    for b in (256, 8):
        x = rng.standard_normal((b, SIZES[0])).astype(np.float32)
        y = rng.standard_normal(b).astype(np.float32)
        check_agreement(params, x, y)
        f = flops(b)
        print(
            f"B={b}: FLOPs/batch forward {f['forward']:,}, activation grads "
            f"{f['activation_grads']:,}, weight grads {f['weight_grads']:,}"
        )
        for name, call in batch_calls(params, x, y):
            for _ in range(20):  # compile + warm caches
                call()
            record(name, b, *median_us(call, *budget))

    if not args.skip_river:
        print(f"River on Milan features, ≥{args.river_samples:,} samples (bundled file cycled):")
        for r in bench_river(args.river_samples, 256):
            results.append(r)
            print(
                f"  {r['name']:<24} {r['median_us']:10.1f} µs per {r['batch']} samples  "
                f"{r['samples_per_s']:12,.0f} samples/s (median chunk; overall "
                f"{r['overall_samples_per_s']:,.0f}/s, MAE {r['prequential_mae_log1p_change']:.4f})"
            )

    import river

    meta = {
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "river": river.__version__,
        },
        "cpu_affinity": cpus,
        "cpu_busy_before_start": busy,
        "cpu": cpu_model(),
        "flops": {str(b): flops(b) for b in (256, 8)},
        "adam": "hand-written in jax.numpy / numpy (no optax)",
        "env": {
            k: os.environ[k]
            for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
    }
    print(f"\n{'measurement':<24} {'B':>4} {'median µs':>11} {'samples/s':>13}")
    for r in results:
        print(
            f"{r['name']:<24} {r['batch']:>4} {r['median_us']:>11.1f} {r['samples_per_s']:>13,.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
