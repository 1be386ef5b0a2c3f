"""Shared by the tests/python/*_recipe.py workers (run by tests/clients_recipes.rs).

Each recipe script reads a JSON spec (path in argv[1]):

  {"proxy": "http://127.0.0.1:PORT", "ca": "/path/to/edgepool/ca.pem",
   "mode": "...", "urls": ["https://localhost:PORT/...", ...], "timeout": 20}

sends one GET per URL, in order, through edgepool with ONE client object, and prints one
JSON document as the last line of stdout:

  {"client": "<name> <version>", "mode": ..., "deprecations": ["Category: message", ...],
   "results": [{"status", "len", "sha256", "reused", "error", "http_version",
                "body_text" (UTF-8 bodies up to 64 KiB, else null),
                "exception" (only if the request raised)}]}

`deprecations` lists the deprecation warnings the recipe itself triggered: the recipes must
use each client's current, non-deprecated API.
"""
import hashlib
import json
import sys
import warnings


def load_spec():
    with open(sys.argv[1], encoding="utf-8") as f:
        return json.load(f)


def body_text(content):
    if len(content) > 64 * 1024:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def row(status, content, get_header, http_version):
    """One result row; `get_header(name)` returns a response header value or None."""
    return {
        "status": status,
        "len": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "reused": get_header("x-edgepool-reused"),
        "error": get_header("x-edgepool-error"),
        "http_version": http_version,
        "body_text": body_text(content),
    }


def exception_row(e):
    return {"exception": f"{type(e).__module__}.{type(e).__qualname__}: {e}"}


class Deprecations:
    """Records every deprecation warning raised inside the `with` block."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        return False

    def messages(self):
        return [
            f"{w.category.__name__}: {w.message}"
            for w in self.caught
            if "Deprecat" in w.category.__name__
        ]


def emit(client, mode, results, deprecations):
    json.dump(
        {"client": client, "mode": mode, "deprecations": deprecations, "results": results},
        sys.stdout,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
