#!/usr/bin/env python3
"""A Scrapy spider run as a script (CrawlerProcess) through edgepool (run by
tests/clients_recipes.rs).

Every request carries `meta={"proxy": P}` (HttpProxyMiddleware, on by default). Modes:

  default   Scrapy's default settings: DOWNLOAD_VERIFY_CERTIFICATES = False, so the
            intercepted leaf is accepted without configuring any CA.
  verify    DOWNLOAD_VERIFY_CERTIFICATES = True (Scrapy >= 2.14; the non-deprecated way:
            DOWNLOADER_CLIENTCONTEXTFACTORY is deprecated). The default download handler then
            verifies against OpenSSL's default trust store, so the CA is given to it the
            OpenSSL way: SSL_CERT_FILE=edgepool-ca.pem in the spider's environment (set by the
            test, not by this script).

The spider fetches spec["urls"] one after the other (the next request is issued from the
previous one's callback/errback), CONCURRENT_REQUESTS = 1. Spec and output: see
recipe_common.py.
"""
import sys

from recipe_common import Deprecations, emit, exception_row, load_spec, row

try:
    import scrapy
    from scrapy.crawler import CrawlerProcess
except ImportError as e:  # the Rust test checks this before running us
    print(f"python module `scrapy` is not installed: {e}", file=sys.stderr)
    sys.exit(3)


class RecipeSpider(scrapy.Spider):
    name = "edgepool_recipe"

    def __init__(self, urls, proxy, results, **kwargs):
        super().__init__(**kwargs)
        self.urls = list(urls)
        self.proxy = proxy
        self.results = results

    def request(self, i):
        return scrapy.Request(
            self.urls[i],
            callback=self.parsed,
            errback=self.failed,
            meta={"proxy": self.proxy, "i": i},
            dont_filter=True,
        )

    async def start(self):
        yield self.request(0)

    def next(self, i):
        if i + 1 < len(self.urls):
            yield self.request(i + 1)

    def parsed(self, response):
        def header(name):
            v = response.headers.get(name)
            return v.decode("latin-1") if v is not None else None

        self.results.append(
            row(response.status, response.body, header, response.protocol or "unknown")
        )
        yield from self.next(response.meta["i"])

    def failed(self, failure):
        self.results.append(exception_row(failure.value))
        yield from self.next(failure.request.meta["i"])


def main():
    spec = load_spec()
    mode = spec["mode"]
    settings = {
        "LOG_LEVEL": "INFO",
        "CONCURRENT_REQUESTS": 1,
        "RETRY_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        # Non-200 answers reach the callback too (the test asserts on them).
        "HTTPERROR_ALLOW_ALL": True,
        "DOWNLOAD_TIMEOUT": spec.get("timeout", 20),
    }
    if mode == "verify":
        settings["DOWNLOAD_VERIFY_CERTIFICATES"] = True
    elif mode != "default":
        raise SystemExit(f"unknown mode {mode!r}")
    results = []
    with Deprecations() as deps:
        process = CrawlerProcess(settings=settings)
        process.crawl(RecipeSpider, urls=spec["urls"], proxy=spec["proxy"], results=results)
        process.start()
    # Only Scrapy's own deprecations count: the recipe must not rely on deprecated settings.
    scrapy_deps = [d for d in deps.messages() if d.startswith("ScrapyDeprecationWarning")]
    emit(f"scrapy {scrapy.__version__}", mode, results, scrapy_deps)


if __name__ == "__main__":
    main()
