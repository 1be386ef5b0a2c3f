#!/usr/bin/env python3
"""The fleet's R over time, from every node's /status (edgepool's own counts).

    watch.py NODES_TSV SECONDS OUT_JSON [--window 5] [--mark-file FILE] [--stop-file FILE]

Polls every node's admin /status once a second (nodes.tsv from contrib/fleet/run-local.sh:
name proxy admin pid data_dir) and sums the fleet rows (requests, new_connections) over the
nodes; a node that stops answering keeps its last counts. Prints requests, new connections and
R per window, so a node killed mid-run shows as a dip in R (its targets' cold connections on
the nodes they moved to) and the recovery after it. If --mark-file exists at some poll, that
moment is marked (compare.sh touches it when it kills a node). It stops after SECONDS, or
as soon as --stop-file exists.
"""
import json
import os
import sys
import time
import urllib.request


def fleet(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=1) as r:
        f = json.load(r)["fleet"]
    return f["requests"], f["new_connections"]


def main(argv):
    args = argv[1:]
    window, mark, stop = 5, None, None
    if "--window" in args:
        i = args.index("--window")
        window = int(args[i + 1])
        del args[i:i + 2]
    if "--mark-file" in args:
        i = args.index("--mark-file")
        mark = args[i + 1]
        del args[i:i + 2]
    if "--stop-file" in args:
        i = args.index("--stop-file")
        stop = args[i + 1]
        del args[i:i + 2]
    if len(args) != 3:
        sys.exit(__doc__)
    nodes = [line.split("\t") for line in open(args[0]) if line.strip()]
    seconds, out = float(args[1]), args[2]
    last = {n[0]: (0, 0) for n in nodes}
    samples, marked_at = [], None
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not (stop and os.path.exists(stop)):
        tick = time.monotonic()
        for n in nodes:
            try:
                last[n[0]] = fleet(n[2])
            except OSError:
                pass
        t = round(tick - t0, 1)
        if mark and marked_at is None and os.path.exists(mark):
            marked_at = t
        samples.append({"t": t, "requests": sum(v[0] for v in last.values()),
                        "new_connections": sum(v[1] for v in last.values())})
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    rows = []
    prev = samples[0] if samples else None
    ends = samples[window::window]
    if samples and (not ends or ends[-1] is not samples[-1]):
        ends.append(samples[-1])
    for s in ends:
        req, new = s["requests"] - prev["requests"], s["new_connections"] - prev["new_connections"]
        rows.append({"from": prev["t"], "to": s["t"], "requests": req, "new_connections": new,
                     "reuse_rate": round(1 - new / req, 4) if req else None})
        prev = s
    json.dump({"marked_at": marked_at, "windows": rows, "samples": samples}, open(out, "w"), indent=1)
    for r in rows:
        flag = "  <- node killed" if marked_at is not None and r["from"] <= marked_at < r["to"] else ""
        rr = "-" if r["reuse_rate"] is None else f"{r['reuse_rate']:.4f}"
        print(f"  {r['from']:5.1f}-{r['to']:5.1f} s  requests {r['requests']:5}  new connections {r['new_connections']:4}  R {rr}{flag}")


if __name__ == "__main__":
    main(sys.argv)
