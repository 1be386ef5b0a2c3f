#!/usr/bin/env python3
"""Python `curl_cffi` impersonating Chrome through edgepool (run by tests/clients_recipes.rs).

  s = curl_cffi.requests.Session(impersonate="chrome")
  s.get(url, proxy=P, verify=CA)

Spec and output: see recipe_common.py; mode is "chrome" (the impersonate target).
"""
import sys

from recipe_common import Deprecations, emit, exception_row, load_spec, row

try:
    import curl_cffi
    from curl_cffi import requests as cffi_requests
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `curl_cffi` is not installed: {e}", file=sys.stderr)
    sys.exit(3)

# CURLINFO_HTTP_VERSION values.
HTTP_VERSIONS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}


def main():
    spec = load_spec()
    results = []
    with Deprecations() as deps:
        s = cffi_requests.Session(impersonate=spec["mode"], trust_env=False)
        for url in spec["urls"]:
            try:
                r = s.get(
                    url,
                    proxy=spec["proxy"],
                    verify=spec["ca"],
                    timeout=spec.get("timeout", 20),
                )
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append(exception_row(e))
                continue
            version = HTTP_VERSIONS.get(int(r.http_version), f"curl:{r.http_version}")
            results.append(row(r.status_code, r.content, r.headers.get, version))
        s.close()
    emit(f"curl_cffi {curl_cffi.__version__}", spec["mode"], results, deps.messages())


if __name__ == "__main__":
    main()
