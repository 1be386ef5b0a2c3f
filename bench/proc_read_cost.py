#!/usr/bin/env python3
"""What the ephemeral-port check's reads cost with many sockets (src/portguard.rs).

    python3 bench/proc_read_cost.py            # N=10000 TIME_WAIT sockets on 127.0.0.1
    N=20000 python3 bench/proc_read_cost.py

Makes N short connections to a listener of its own on 127.0.0.1 (client closes first, so each
leaves a TIME_WAIT socket for 60 s), then times reading /proc/net/tcp + /proc/net/tcp6 (the
full census, per refresh before the sockstat bound) against /proc/net/sockstat + sockstat6
(what a refresh reads while far below the limits): median of 50 reads each, wall time, so run
it on a quiet machine. Loopback only; bounded by N (at most 20000) and stops by itself.
"""
import os
import socket
import statistics
import time

N = int(os.environ.get("N", "10000"))
if not 0 < N <= 20000:
    raise SystemExit("N must be 1..20000 (the default port range is 28,232 ports)")

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
port = listener.getsockname()[1]
for i in range(N):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = listener.accept()
    c.close()  # active close: TIME_WAIT on the client's port
    s.close()
time.sleep(0.2)


def lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def median_ms(paths, rounds=50):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for p in paths:
            try:
                with open(p, "rb") as f:
                    f.read()
            except OSError:
                pass
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


full = median_ms(["/proc/net/tcp", "/proc/net/tcp6"])
quick = median_ms(["/proc/net/sockstat", "/proc/net/sockstat6"])
print(f"sockets in /proc/net/tcp: {lines('/proc/net/tcp') - 1} (made {N} TIME_WAIT)")
with open("/proc/net/sockstat") as f:
    print("sockstat:", [l.strip() for l in f if l.startswith("TCP:")][0])
print(f"read /proc/net/tcp + tcp6:           {full:8.3f} ms (median of 50)")
print(f"read /proc/net/sockstat + sockstat6: {quick:8.3f} ms (median of 50)")
