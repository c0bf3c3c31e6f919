#!/usr/bin/env python3
"""Soak benchmark: is memory bounded by configuration over millions of samples?

Writes a Milan-shaped stream with many keys (each key is the bundled square 5161's series,
scaled per key and shifted in phase, rows interleaved by time), runs the release binary on it
with checkpoints on, and samples the process's RSS and its Prometheus counters once a second.
Prints RSS at given sample counts, samples/s, and the share of wall time spent writing
checkpoints (from gradsift_checkpoint_duration_seconds). Writes the curve as CSV.

    cargo build --release
    python3 benches/soak.py --keys 10000      # 11.5 M rows = 10 M samples, ~10 minutes on 2 cores
    python3 benches/soak.py --rows 1500000 --keys 1000 --max-keys 900   # key eviction path

Needs pyarrow (the stream is written by pyarrow, as the tests' files are).
"""
import argparse
import json
import csv
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_stream(path: Path, rows: int, keys: int, chunk_slots: int = 50):
    """rows // keys time slots, every key once per slot, written in row groups of ~0.5 M."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pq.read_table(REPO / "data/milan/internet_square5161.parquet")
    series = base["internet"].to_numpy()
    t0 = base["ts"].cast(pa.int64()).to_numpy()[0]
    slots = rows // keys
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.2, 5.0, keys)
    phase = rng.integers(0, len(series), keys)
    key_ids = np.arange(keys, dtype=np.int64)
    schema = pa.schema([("square_id", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")),
                        ("internet", pa.float64())])
    with pq.ParquetWriter(path, schema) as w:
        for s0 in range(0, slots, chunk_slots):
            s = np.arange(s0, min(slots, s0 + chunk_slots))
            vals = series[(phase[None, :] + s[:, None]) % len(series)] * scale[None, :]
            vals *= rng.normal(1.0, 0.05, vals.shape)
            ts = np.repeat(t0 + s * 600_000_000, keys)
            w.write_table(pa.table({
                "square_id": np.tile(key_ids, len(s)),
                "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "internet": vals.reshape(-1),
            }, schema=schema))
    return slots * keys


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(gradsift_rows_total)\{[^}]*outcome="sample"[^}]*\} (\S+)', line)
        if m:
            out["samples"] = out.get("samples", 0.0) + float(m.group(2))
        for name in ("gradsift_checkpoint_duration_seconds_sum",
                     "gradsift_checkpoint_duration_seconds_count", "gradsift_checkpoint_bytes"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def rss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=11_500_000,
                    help="rows written; each key's first 144 rows only warm its lags")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--max-keys", type=int, default=None, help="features.max_keys (default: keys)")
    ap.add_argument("--pipeline", default=str(REPO / "pipelines/milan-replay.toml"))
    ap.add_argument("--binary", default=os.environ.get(
        "GRADSIFT_BIN", str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release/gradsift")))
    ap.add_argument("--work", default=None, help="folder for the stream and the run (default: a temp dir)")
    ap.add_argument("--csv", default=None, help="write the RSS curve here")
    ap.add_argument("--at", default="1000000,5000000,10000000", help="report RSS at these sample counts")
    ap.add_argument("--set", action="append", default=[], help="extra --set for gradsift")
    a = ap.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="gradsift-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    stream = work / f"stream-{a.rows}-{a.keys}.parquet"
    if not stream.exists():
        t = time.time()
        n = write_stream(stream, a.rows, a.keys)
        print(f"wrote {n} rows, {a.keys} keys to {stream} in {time.time() - t:.0f} s", flush=True)
    port = free_port()
    args = [a.binary, "run", a.pipeline, "--quiet", "--output", str(work / "run"),
            "--set", f"source.path={stream}",
            "--set", f"features.max_keys={a.max_keys or a.keys}",
            "--set", "checkpoint.enabled=true",
            "--set", "telemetry.enabled=true", "--set", f"telemetry.listen=127.0.0.1:{port}"]
    for s in a.set:
        args += ["--set", s]
    print(" ".join(args), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    curve, last = [], {}
    while proc.poll() is None:
        time.sleep(1.0)
        r, m = rss_kb(proc.pid), scrape(port)
        if r is None or m is None or "samples" not in m:
            continue
        last = m
        curve.append((time.time() - t0, m["samples"], r))
    out = proc.stdout.read()
    wall = time.time() - t0
    if proc.returncode != 0:
        print(out[-4000:])
        sys.exit(f"gradsift exited with {proc.returncode}")
    peak = re.search(r"samples seen \(valid\)\s*┆\s*(\d+)", out)
    samples = int(peak.group(1)) if peak else int(curve[-1][1])
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seconds", "samples", "rss_kb"])
            w.writerows(curve)
    print(f"\n{samples} samples, {a.keys} keys (max_keys {a.max_keys or a.keys}) in {wall:.1f} s: "
          f"{samples / wall:.0f} samples/s end to end")
    print("RSS (MB) at samples seen:")
    for target in [int(x) for x in a.at.split(",")]:
        pts = [c for c in curve if c[1] <= target]
        if pts and curve[-1][1] >= target * 0.98:
            print(f"  {target:>10}: {pts[-1][2] / 1024:7.1f}")
    warm = [c[2] for c in curve if c[1] >= 0.1 * samples]
    if warm:
        print(f"  after 10% of the stream: min {min(warm) / 1024:.1f}, max {max(warm) / 1024:.1f} "
              f"({(max(warm) / min(warm) - 1) * 100:.1f}% spread)")
    cs = last.get("gradsift_checkpoint_duration_seconds_sum")
    cn = last.get("gradsift_checkpoint_duration_seconds_count")
    if cs is not None and cn:
        print(f"checkpoints: {cn:.0f} written, {cs:.2f} s in all = {cs / wall * 100:.1f}% of wall time; "
              f"last {last.get('gradsift_checkpoint_bytes', 0) / 1e6:.1f} MB")
    # Since checkpoints are encoded and written on a thread of their own, the learner's thread
    # pays only its part (segment roll, dead-letter sync, state copy): the report says how much.
    report = work / "run" / "report.json"
    if report.exists():
        ck = json.loads(report.read_text()).get("checkpoint") or {}
        if "write_seconds" in ck:
            print(f"  on the learner's thread: {ck['seconds']:.2f} s = {ck['seconds'] / wall * 100:.1f}% of wall time")


if __name__ == "__main__":
    main()
