"""A WebSocket echo origin for tests/websocket.rs (Python `websockets`, 13+ asyncio API).

Listens on 127.0.0.1 (port 0, or --port), plaintext or TLS (--cert/--key), and writes its port
to --port-file once bound. Every WebSocket connection (any path) echoes each message back
as it came (text as text, binary as binary). Plain HTTP GETs are answered too:
  /page   an HTML page whose script opens ws://<host>/echo, sends "hello from chromium"
          and puts the echo in the document (Chromium test)
  /hold   answered once a message has been echoed (at most 20 s), plus 300 ms: keeps a
          headless browser's virtual time from running out before the echo arrives
  other   200 "plain ok"
Each event is one line appended to --log (flushed at once), for the test to read:
  open <path>                a WebSocket handshake completed
  text <message>             a text message arrived (then echoed)
  binary <len> <hex>         a binary message arrived (its length, first 8 bytes in hex)
  closed <code>              the connection ended; the close code the client sent (or none)
  http <path>                a plain HTTP request
"""
import argparse
import asyncio
import http
import ssl

from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

PAGE = """<!doctype html>
<html><head><title>ws page</title></head>
<body><p id="out">waiting</p>
<script>
const out = document.getElementById("out");
const ws = new WebSocket("ws://" + location.host + "/echo");
ws.onopen = () => ws.send("hello from chromium");
ws.onmessage = (ev) => { out.textContent = "echoed:" + ev.data; ws.close(1000); };
ws.onerror = () => { out.textContent = "ws error"; };
// Headless Chromium's virtual time does not wait for WebSocket traffic; a pending fetch
// holds it until the origin has echoed the message.
fetch("/hold").catch(() => {});
</script></body></html>
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    log = open(args.log, "a", buffering=1)

    echoed = asyncio.Event()

    def note(line):
        log.write(line + "\n")
        log.flush()

    async def echo(ws):
        note("open " + ws.request.path)
        try:
            async for msg in ws:
                if isinstance(msg, str):
                    note("text " + msg)
                else:
                    note("binary %d %s" % (len(msg), msg[:8].hex()))
                await ws.send(msg)
                echoed.set()
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            note("closed " + (str(rcvd.code) if rcvd is not None else "none"))

    async def process_request(conn, request):
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        note("http " + request.path)
        if request.path == "/hold":
            try:
                await asyncio.wait_for(echoed.wait(), 20)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.3)
        if request.path == "/page":
            body, ctype = PAGE.encode(), "text/html; charset=utf-8"
        else:
            body, ctype = b"plain ok\n", "text/plain"
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return Response(http.HTTPStatus.OK.value, "OK", headers, body)

    async def run():
        ctx = None
        if args.cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.cert, args.key)
        async with serve(
            echo,
            "127.0.0.1",
            args.port,
            ssl=ctx,
            process_request=process_request,
            ping_interval=None,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            with open(args.port_file + ".tmp", "w") as f:
                f.write(str(port))
            import os

            os.replace(args.port_file + ".tmp", args.port_file)
            await asyncio.get_running_loop().create_future()

    asyncio.run(run())


if __name__ == "__main__":
    main()
