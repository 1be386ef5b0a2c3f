#!/usr/bin/env python3
"""A worker using Python `requests` through edgepool (run by tests/clients.rs).

Usage: requests_client.py SPEC.json

SPEC.json holds {
  "proxy": "http://127.0.0.1:PORT",        # edgepool's proxy listener
  "ca": "/path/to/edgepool/ca.pem",         # the gateway CA (verify=)
  "timeout": 20,                            # per request, seconds
  "requests": [{"method": "GET", "url": "...", "body_b64": "..."}, ...]
}

All requests go through ONE requests.Session (so it keeps its proxy and tunnel
connections alive). Prints one JSON document on stdout:

{"client": "requests <version>",
 "results": [{"status", "len", "sha256", "reused", "error", "http_version",
              "body_text" (UTF-8 bodies up to 64 KiB, else null),
              "exception" (only if the request raised)}]}

Exit status 0 even if some requests failed: the Rust test asserts on the summary.
"""
import base64
import hashlib
import json
import sys

try:
    import requests
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `requests` is not installed: {e}", file=sys.stderr)
    sys.exit(3)


def body_text(content):
    if len(content) > 64 * 1024:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    proxy = spec["proxy"]
    timeout = spec.get("timeout", 20)
    session = requests.Session()
    # Ignore HTTP(S)_PROXY / NO_PROXY / REQUESTS_CA_BUNDLE from the environment: a
    # NO_PROXY=localhost would silently bypass edgepool.
    session.trust_env = False
    session.proxies = {"http": proxy, "https": proxy}
    session.verify = spec["ca"]
    results = []
    for req in spec["requests"]:
        data = base64.b64decode(req["body_b64"]) if req.get("body_b64") is not None else None
        try:
            r = session.request(req.get("method", "GET"), req["url"], data=data, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"exception": repr(e)})
            continue
        content = r.content
        version = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}.get(
            getattr(r.raw, "version", None), "unknown"
        )
        results.append(
            {
                "status": r.status_code,
                "len": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
                "reused": r.headers.get("x-edgepool-reused"),
                "error": r.headers.get("x-edgepool-error"),
                "http_version": version,
                "body_text": body_text(content),
            }
        )
    session.close()
    json.dump({"client": f"requests {requests.__version__}", "results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
