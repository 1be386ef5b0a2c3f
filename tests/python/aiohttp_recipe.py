#!/usr/bin/env python3
"""Python `aiohttp` through edgepool (run by tests/clients_recipes.rs).

  ctx = ssl.create_default_context(cafile=CA)
  async with aiohttp.ClientSession() as s:
      async with s.get(url, proxy=P, ssl=ctx) as r: ...

(aiohttp speaks HTTP/1.1 only.) Spec and output: see recipe_common.py; mode is "default".
"""
import asyncio
import ssl
import sys

from recipe_common import Deprecations, emit, exception_row, load_spec, row

try:
    import aiohttp
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `aiohttp` is not installed: {e}", file=sys.stderr)
    sys.exit(3)


async def run(spec):
    ctx = ssl.create_default_context(cafile=spec["ca"])
    timeout = aiohttp.ClientTimeout(total=spec.get("timeout", 20))
    results = []
    # trust_env defaults to False: HTTP(S)_PROXY from the environment is not used.
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for url in spec["urls"]:
            try:
                async with session.get(url, proxy=spec["proxy"], ssl=ctx) as r:
                    content = await r.read()
                    version = f"HTTP/{r.version.major}.{r.version.minor}"
                    results.append(row(r.status, content, r.headers.get, version))
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append(exception_row(e))
    return results


def main():
    spec = load_spec()
    with Deprecations() as deps:
        results = asyncio.run(run(spec))
    emit(f"aiohttp {aiohttp.__version__}", spec["mode"], results, deps.messages())


if __name__ == "__main__":
    main()
