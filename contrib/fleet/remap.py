#!/usr/bin/env python3
"""Which node does HAProxy route each of K target authorities to?

    remap.py PROXY_URL K OUT_FILE [--threads 4] [--prefix 127.77]

Sends one absolute-form `GET http://<authority>/` per authority through the fleet's HAProxy
and writes `<authority> <node>` lines (the node from the X-Edgepool-Node response header that
contrib/haproxy/haproxy.cfg adds). Authorities are distinct loopback literals
`<prefix>.<b>.<c>:80` (K up to 65,536). Run the nodes WITHOUT --allow-target for them: every
node then answers 400 target_forbidden at once, without dialing anything, so this measures the
routing of real requests through the real HAProxy and nodes and nothing else.

    remap.py --compare BEFORE AFTER     # fraction of authorities whose node changed

contrib/fleet/compare.sh uses it to measure how many targets move when a node is added.
"""
import http.client
import sys
import threading
import urllib.parse
from collections import Counter


def authorities(k, prefix):
    for i in range(k):
        yield f"{prefix}.{i // 256}.{i % 256}:80"


def route(proxy, k, out, threads=4, prefix="127.77"):
    u = urllib.parse.urlsplit(proxy)
    todo = list(authorities(k, prefix))
    result = {}
    errors = []
    lock = threading.Lock()

    def worker(part):
        conn = None
        for auth in part:
            for attempt in range(3):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                    conn.request("GET", f"http://{auth}/", headers={"Host": auth})
                    r = conn.getresponse()
                    r.read()
                    node = r.getheader("X-Edgepool-Node") or "-"
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    with lock:
                        result[auth] = node
                    break
                except (OSError, http.client.HTTPException) as e:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if attempt == 2:
                        with lock:
                            errors.append(f"{auth}: {e}")

    parts = [todo[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        for auth in todo:
            f.write(f"{auth} {result.get(auth, '-')}\n")
    counts = Counter(result.values())
    print(" ".join(f"{n}={c}" for n, c in sorted(counts.items())))
    if errors or "-" in counts:
        sys.exit(f"remap.py: {len(errors)} requests failed, {counts.get('-', 0)} without "
                 f"X-Edgepool-Node; first: {errors[:3]}")


def compare(before, after):
    a = dict(line.split() for line in open(before))
    b = dict(line.split() for line in open(after))
    keys = a.keys() & b.keys()
    moved = sum(1 for k in keys if a[k] != b[k])
    flows = Counter((a[k], b[k]) for k in keys if a[k] != b[k])
    print(f"{moved} {len(keys)} {moved / max(len(keys), 1):.4f} "
          + " ".join(f"{x}->{y}:{c}" for (x, y), c in sorted(flows.items())))


def main(argv):
    if len(argv) == 4 and argv[1] == "--compare":
        compare(argv[2], argv[3])
        return
    args = argv[1:]
    threads, prefix = 4, "127.77"
    if "--threads" in args:
        i = args.index("--threads")
        threads = int(args[i + 1])
        del args[i:i + 2]
    if "--prefix" in args:
        i = args.index("--prefix")
        prefix = args[i + 1]
        del args[i:i + 2]
    if len(args) != 3:
        sys.exit(__doc__)
    k = int(args[1])
    if not 1 <= k <= 65536:
        sys.exit("remap.py: K must be 1..65536")
    route(args[0], k, args[2], threads, prefix)


if __name__ == "__main__":
    main(sys.argv)
