#!/usr/bin/env python3
"""Python `requests` through edgepool while REQUESTS_CA_BUNDLE points elsewhere.

A set REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) overrides `Session.verify`: with the default
`trust_env = True`, `Session.merge_environment_settings` replaces a per-request `verify`
of None/True by the environment's bundle, and that per-request value wins over the
session's. Modes (spec["mode"]):

  session_verify       s.verify = CA only (the naive recipe: fails while the variable is set)
  trust_env_false      s.trust_env = False; s.proxies = {...}; s.verify = CA
  per_request_verify   s.proxies = {...}; s.get(url, verify=CA) on every request

Spec and output: see recipe_common.py.
"""
import sys

from recipe_common import Deprecations, emit, exception_row, load_spec, row

try:
    import requests
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `requests` is not installed: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    spec = load_spec()
    mode = spec["mode"]
    proxy, ca, timeout = spec["proxy"], spec["ca"], spec.get("timeout", 20)
    results = []
    with Deprecations() as deps:
        s = requests.Session()
        s.proxies = {"http": proxy, "https": proxy}
        per_request = {}
        if mode == "session_verify":
            s.verify = ca
        elif mode == "trust_env_false":
            s.trust_env = False
            s.verify = ca
        elif mode == "per_request_verify":
            per_request["verify"] = ca
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        for url in spec["urls"]:
            try:
                r = s.get(url, timeout=timeout, **per_request)
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append(exception_row(e))
                continue
            version = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}.get(
                getattr(r.raw, "version", None), "unknown"
            )
            results.append(row(r.status_code, r.content, r.headers.get, version))
        s.close()
    emit(f"requests {requests.__version__}", mode, results, deps.messages())


if __name__ == "__main__":
    main()
