#!/usr/bin/env python3
"""One Markdown table of gradsift (criterion) against JAX, numpy and River (peers.py).

    python benches/peers/table.py [--target-dir DIR] [--peers /var/tmp/peers/peers.json]

Reads $CARGO_TARGET_DIR/criterion/<group>/<id>/new/estimates.json (median, ns),
$CARGO_TARGET_DIR/fma_peak.json ({"gflops": ...}) and the peers JSON. Anything missing prints
"not measured". Ratio = peer time / gradsift time: above 1 means gradsift is faster.
Standard library only, so it runs with any python3.
"""

import argparse
import json
import os
from pathlib import Path

NA = "not measured"
SIZES = (16, 64, 64, 1)


def flops(b, weight_grads=True):
    """Forward + activation gradients (none w.r.t. inputs) [+ weight gradients], as peers.py."""
    layers = list(zip(SIZES[:-1], SIZES[1:]))
    total = 2 * b * sum(i * o for i, o in layers) + 2 * b * sum(i * o for i, o in layers[1:])
    return total + (2 * b * sum(i * o for i, o in layers) if weight_grads else 0)


def criterion_us(root, group, ident):
    try:
        est = json.loads(
            (root / "criterion" / group / ident / "new" / "estimates.json").read_text()
        )
        return est["median"]["point_estimate"] / 1e3
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fmt(us):
    if us is None:
        return NA
    return f"{us:,.1f}" if us >= 10 else f"{us:,.2f}"


def ratios(base, peers):
    parts = [f"{name} {us / base:.2f}×" for name, us in peers if us is not None and base]
    return ", ".join(parts) if base and parts else NA


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "/var/tmp/gradsift-target")
    )
    ap.add_argument("--peers", default="/var/tmp/peers/peers.json")
    args = ap.parse_args()
    root = Path(args.target_dir)

    try:
        peers_doc = json.loads(Path(args.peers).read_text())
    except (OSError, ValueError):
        peers_doc = {"results": [], "meta": {}}
    peers = {(r["name"], r["batch"]): r for r in peers_doc.get("results", [])}

    def peer_us(name, b):
        r = peers.get((name, b))
        return r["median_us"] if r else None

    try:
        gflops = float(json.loads((root / "fma_peak.json").read_text())["gflops"])
    except (OSError, ValueError, KeyError, TypeError):
        gflops = None

    def limit(f):
        return f / (gflops * 1e3) if gflops else None  # FLOPs / (GFLOP/s) in µs

    head = [
        "work",
        "gradsift µs",
        "JAX jit µs (ghost for norms)",
        "JAX vmap µs",
        "numpy µs",
        "River samples/s",
        "ratio peer/gradsift",
        "limit µs",
    ]
    rows = []
    for b in (256, 8):
        group = f"peers_B{b}"
        for ident, label, jax_name, vmap_name, np_name, wg in (
            (
                "norms_exact",
                "exact per-sample norms",
                "jax_ghost_norms",
                "jax_vmap_norms",
                "numpy_ghost_norms",
                False,
            ),
            ("fwd_bwd", "plain fwd+bwd", "jax_fwd_bwd", None, "numpy_fwd_bwd", True),
            ("fwd_bwd_adam", "fwd+bwd+Adam", "jax_fwd_bwd_adam", None, "numpy_fwd_bwd_adam", True),
        ):
            g = criterion_us(root, group, ident)
            j = peer_us(jax_name, b)
            v = peer_us(vmap_name, b) if vmap_name else None
            n = peer_us(np_name, b)
            rows.append(
                [
                    f"{label}, B={b}",
                    fmt(g),
                    fmt(j),
                    fmt(v) if vmap_name else "—",
                    fmt(n),
                    "—",
                    ratios(g, [("JAX", j), ("vmap", v), ("numpy", n)]),
                    fmt(limit(flops(b, wg))),
                ]
            )

    # Learner core: score + select + train + buffer per 256-row batch; River is the online peer.
    one, many = (
        peers.get(("river_linreg_learn_one", 256)),
        peers.get(("river_linreg_learn_many", 256)),
    )
    river = (
        "; ".join(f"{k} {r['samples_per_s']:,.0f}" for k, r in (("one", one), ("many", many)) if r)
        or NA
    )
    core_dir = root / "criterion" / "learner_core_B256"
    idents = (
        sorted(p.name for p in core_dir.iterdir() if p.is_dir() and "exact" in p.name)
        if core_dir.is_dir()
        else []
    )
    for ident in idents or [None]:
        g = criterion_us(root, "learner_core_B256", ident) if ident else None
        sps = f" ({256 / (g * 1e-6):,.0f}/s)" if g else ""
        # River's time for the same 256 samples, against gradsift's.
        rr = [
            (k, 256 / r["samples_per_s"] * 1e6)
            for k, r in (("River one", one), ("River many", many))
            if r
        ]
        rows.append(
            [
                f"learner core B=256{' ' + ident if ident else ''}",
                fmt(g) + sps,
                "—",
                "—",
                "—",
                river,
                ratios(g, rr),
                "—",
            ]
        )

    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(
        f"limit: {f'{gflops:.1f} GFLOP/s measured FMA peak, one core' if gflops else NA}"
        " (norms: forward + activation grads; fwd+bwd(+Adam): + weight grads)."
    )
    meta = peers_doc.get("meta", {})
    if meta:
        v = meta.get("versions", {})
        print(
            f"peers: JAX {v.get('jax')}, numpy {v.get('numpy')}, River {v.get('river')}; "
            f"Adam {meta.get('adam')}; cpu affinity {meta.get('cpu_affinity')}."
        )
    else:
        print(f"peers: {NA} ({args.peers} missing).")
    print("Ratio = peer time / gradsift time (above 1: gradsift faster). Medians; one thread.")


if __name__ == "__main__":
    main()
