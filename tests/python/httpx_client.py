#!/usr/bin/env python3
"""A worker using Python `httpx` through edgepool (run by tests/clients.rs).

Usage: httpx_client.py SPEC.json

SPEC.json holds {
  "proxy": "http://127.0.0.1:PORT",        # edgepool's proxy listener
  "ca": "/path/to/edgepool/ca.pem",         # the gateway CA
  "http2": true,                            # ask for HTTP/2 (only if `h2` is importable)
  "timeout": 20,
  "requests": [{"method": "GET", "url": "...", "body_b64": "..."}, ...]
}

All requests go through ONE httpx.Client. Works with httpx before 0.26
(`proxies=`) and from 0.26 on (`proxy=`; `proxies=` was removed in 0.28).
HTTP/2 is enabled only if the `h2` package is importable, else HTTP/1.1.

Prints one JSON document on stdout:

{"client": "httpx <version>", "http2_enabled": bool,
 "results": [{"status", "len", "sha256", "reused", "error", "http_version",
              "body_text", "exception"?}]}
"""
import base64
import hashlib
import inspect
import json
import ssl
import sys

try:
    import httpx
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `httpx` is not installed: {e}", file=sys.stderr)
    sys.exit(3)

try:
    import h2  # noqa: F401 - only probing availability

    HAVE_H2 = True
except ImportError:
    HAVE_H2 = False


def body_text(content):
    if len(content) > 64 * 1024:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def make_client(spec):
    http2 = bool(spec.get("http2", True)) and HAVE_H2
    # An SSLContext works for `verify=` in every httpx version (a path string is
    # deprecated from 0.28 on). httpcore sets the ALPN protocols on it itself.
    ctx = ssl.create_default_context(cafile=spec["ca"])
    kwargs = {
        "verify": ctx,
        "http2": http2,
        # Ignore HTTP(S)_PROXY / NO_PROXY / SSL_CERT_FILE from the environment.
        "trust_env": False,
        "timeout": spec.get("timeout", 20),
    }
    params = inspect.signature(httpx.Client.__init__).parameters
    if "proxy" in params:  # httpx >= 0.26
        kwargs["proxy"] = spec["proxy"]
    else:  # httpx < 0.26
        kwargs["proxies"] = spec["proxy"]
    return httpx.Client(**kwargs), http2


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    client, http2 = make_client(spec)
    results = []
    with client:
        for req in spec["requests"]:
            data = (
                base64.b64decode(req["body_b64"]) if req.get("body_b64") is not None else None
            )
            try:
                r = client.request(req.get("method", "GET"), req["url"], content=data)
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append({"exception": repr(e)})
                continue
            content = r.content
            results.append(
                {
                    "status": r.status_code,
                    "len": len(content),
                    "sha256": hashlib.sha256(content).hexdigest(),
                    "reused": r.headers.get("x-edgepool-reused"),
                    "error": r.headers.get("x-edgepool-error"),
                    "http_version": r.http_version,
                    "body_text": body_text(content),
                }
            )
    json.dump(
        {
            "client": f"httpx {httpx.__version__}",
            "http2_enabled": http2,
            "results": results,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
