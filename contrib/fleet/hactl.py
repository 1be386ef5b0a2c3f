#!/usr/bin/env python3
"""Talk to HAProxy's runtime API (the `stats socket` of contrib/haproxy/haproxy.cfg).

    hactl.py SOCKET cmd 'show stat'             # any runtime command, raw answer
    hactl.py SOCKET states BACKEND              # one line per server: name status weight
    hactl.py SOCKET wait-up BACKEND N SECONDS   # until N servers of BACKEND are UP (exit 1 on timeout)
    hactl.py SOCKET set-state BACKEND SERVER ready|drain|maint

Used by contrib/fleet/run-local.sh, compare.sh and smoke.sh (no socat needed).
"""
import csv
import io
import socket
import sys
import time


def command(path, cmd, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(cmd.encode() + b"\n")
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out.decode(errors="replace")


def states(path, backend):
    text = command(path, "show stat")
    if text.startswith("# "):
        text = text[2:]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
            rows.append((row["svname"], row["status"], row["weight"]))
    return rows


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    path, what = argv[1], argv[2]
    if what == "cmd" and len(argv) == 4:
        sys.stdout.write(command(path, argv[3]))
    elif what == "states" and len(argv) == 4:
        for name, status, weight in states(path, argv[3]):
            print(name, status, weight)
    elif what == "wait-up" and len(argv) == 6:
        backend, want, secs = argv[3], int(argv[4]), float(argv[5])
        deadline = time.monotonic() + secs
        last = []
        while time.monotonic() < deadline:
            try:
                last = states(path, backend)
                if sum(1 for _, st, _ in last if st.startswith("UP")) >= want:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"hactl: {backend}: fewer than {want} servers UP after {secs:g} s: {last}")
    elif what == "set-state" and len(argv) == 6:
        out = command(path, f"set server {argv[3]}/{argv[4]} state {argv[5]}").strip()
        if out:
            sys.exit(f"hactl: set server {argv[3]}/{argv[4]} state {argv[5]}: {out}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
