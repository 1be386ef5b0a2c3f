#!/usr/bin/env python3
"""Idempotent requests through the fleet while something happens to it (a node is killed).

    probe.py PROXY_URL CA_FILE SECONDS OUT_JSON [--targets 8] [--threads 6]

Starts its own loopback origins — plain HTTP on 127.0.0.1 and HTTPS on `localhost` (a
throw-away certificate made with openssl; the nodes must not verify it:
`upstream.insecure_skip_verify = ["localhost"]`, as compare.sh configures them) — and runs
worker threads for SECONDS, each sending GETs three ways, in turn, to every target:

  absolute  GET http://127.0.0.1:PORT/...  through the proxy (HAProxy may retry it: L7 retry)
  fetch     POST /v1/fetch {"url": "http://127.0.0.1:PORT/..."}  (retried: "method" is GET)
  tunnel    GET https://localhost:PORT/... inside a CONNECT tunnel (kept alive between requests,
            as clients do); HAProxy cannot replay what is inside a tunnel

Every request is checked (status 200 and the exact body). A failed request is retried ONCE by
the probe on a fresh connection, as a scraping client's retry policy would (Scrapy's
RetryMiddleware, urllib3's Retry). The report counts, per way: sent, ok at the first attempt,
failed at the first attempt, and lost (failed twice).
"""
import http.client
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

BODY = b"edgepool fleet probe\n" * 20


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def start_origin(host, ctx=None):
    srv = Server((host, 0), Handler)
    if ctx is not None:
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def make_cert(tmp):
    key, crt = os.path.join(tmp, "origin.key"), os.path.join(tmp, "origin.crt")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True)
    return crt, key


class Conns:
    """One worker's keep-alive connections, by (way, target)."""

    def __init__(self, proxy, ca):
        self.proxy, self.ca, self.c = proxy, ca, {}

    def get(self, way, port):
        k = (way, port)
        if k not in self.c:
            if way == "tunnel":
                ctx = ssl.create_default_context(cafile=self.ca)
                c = http.client.HTTPSConnection(self.proxy.hostname, self.proxy.port,
                                                timeout=15, context=ctx)
                c.set_tunnel(f"localhost:{port}")
            else:
                c = http.client.HTTPConnection(self.proxy.hostname, self.proxy.port, timeout=15)
            self.c[k] = c
        return self.c[k]

    def drop(self, way, port):
        c = self.c.pop((way, port), None)
        if c is not None:
            c.close()


def one(conns, way, port, n):
    c = conns.get(way, port)
    if way == "absolute":
        c.request("GET", f"http://127.0.0.1:{port}/p{n}", headers={"Host": f"127.0.0.1:{port}"})
    elif way == "fetch":
        doc = json.dumps({"url": f"http://127.0.0.1:{port}/f{n}", "method": "GET"})
        c.request("POST", "/v1/fetch", body=doc, headers={"Content-Type": "application/json"})
    else:
        c.request("GET", f"/t{n}", headers={"Host": f"localhost:{port}"})
    r = c.getresponse()
    body = r.read()
    if r.getheader("Connection", "").lower() == "close":
        conns.drop(way, port)
    if way == "fetch":
        ok = r.status == 200 and json.loads(body).get("body", "").encode() == BODY
    else:
        ok = r.status == 200 and body == BODY
    if not ok:
        raise RuntimeError(f"{way} {port}: status {r.status}, {len(body)} bytes")


def main(argv):
    args = argv[1:]
    opts = {"--targets": 8, "--threads": 6}
    for k in list(opts):
        if k in args:
            i = args.index(k)
            opts[k] = int(args[i + 1])
            del args[i:i + 2]
    if len(args) != 4:
        sys.exit(__doc__)
    proxy, ca, seconds, out = urllib.parse.urlsplit(args[0]), args[1], float(args[2]), args[3]
    tmp = tempfile.mkdtemp(prefix="edgepool-probe-")
    crt, key = make_cert(tmp)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    plain = [start_origin("127.0.0.1") for _ in range(opts["--targets"])]
    tls = [start_origin("127.0.0.1", sctx) for _ in range(opts["--targets"])]
    ports = {"absolute": [s.server_address[1] for s in plain],
             "fetch": [s.server_address[1] for s in plain],
             "tunnel": [s.server_address[1] for s in tls]}
    stats = {w: {"sent": 0, "ok_first": 0, "failed_first": 0, "lost": 0} for w in ports}
    errors = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(w):
        conns = Conns(proxy, ca)
        n = 0
        while time.monotonic() < deadline:
            for way in ("absolute", "fetch", "tunnel"):
                port = ports[way][(n + w) % len(ports[way])]
                n += 1
                for attempt in (1, 2):
                    try:
                        one(conns, way, port, n)
                        if attempt == 1:
                            with lock:
                                stats[way]["sent"] += 1
                                stats[way]["ok_first"] += 1
                        break
                    except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
                        conns.drop(way, port)
                        with lock:
                            if attempt == 1:
                                stats[way]["sent"] += 1
                                stats[way]["failed_first"] += 1
                            else:
                                stats[way]["lost"] += 1
                            if len(errors) < 20:
                                errors.append(f"{time.strftime('%H:%M:%S')} {way} attempt {attempt}: {e}")

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(opts["--threads"])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    report = {"seconds": seconds, "targets_per_way": opts["--targets"], "threads": opts["--threads"],
              "ways": stats, "errors": errors}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    for s in plain + tls:
        s.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    for way, s in stats.items():
        print(f"{way:9} sent {s['sent']:6}  ok {s['ok_first']:6}  failed first try {s['failed_first']:4}  lost {s['lost']:4}")


if __name__ == "__main__":
    main(sys.argv)
