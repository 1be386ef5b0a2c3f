#!/usr/bin/env python3
"""Python `httpx` through edgepool, HTTP/2, current API (run by tests/clients_recipes.rs).

  ctx = ssl.create_default_context(cafile=CA)
  httpx.Client(proxy=P, verify=ctx, http2=True)        # mode "sync"
  httpx.AsyncClient(proxy=P, verify=ctx, http2=True)   # mode "async"

`verify=` with a path string is deprecated since httpx 0.28; `proxies=` was removed in 0.28.
`http2=True` needs the `h2` package (`pip install 'httpx[http2]'`). trust_env=False keeps
HTTP(S)_PROXY / NO_PROXY / SSL_CERT_FILE from the environment out of the recipe.

Spec and output: see recipe_common.py.
"""
import asyncio
import ssl
import sys

from recipe_common import Deprecations, emit, exception_row, load_spec, row

try:
    import httpx
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `httpx` is not installed: {e}", file=sys.stderr)
    sys.exit(3)


def client_kwargs(spec):
    return {
        "proxy": spec["proxy"],
        "verify": ssl.create_default_context(cafile=spec["ca"]),
        "http2": True,
        "trust_env": False,
        "timeout": spec.get("timeout", 20),
    }


def to_row(r):
    return row(r.status_code, r.content, r.headers.get, r.http_version)


def run_sync(spec):
    results = []
    with httpx.Client(**client_kwargs(spec)) as client:
        for url in spec["urls"]:
            try:
                results.append(to_row(client.get(url)))
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append(exception_row(e))
    return results


async def run_async(spec):
    results = []
    async with httpx.AsyncClient(**client_kwargs(spec)) as client:
        for url in spec["urls"]:
            try:
                results.append(to_row(await client.get(url)))
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append(exception_row(e))
    return results


def main():
    spec = load_spec()
    mode = spec["mode"]
    with Deprecations() as deps:
        if mode == "sync":
            results = run_sync(spec)
        elif mode == "async":
            results = asyncio.run(run_async(spec))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    emit(f"httpx {httpx.__version__}", mode, results, deps.messages())


if __name__ == "__main__":
    main()
