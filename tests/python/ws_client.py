"""A WebSocket client for tests/websocket.rs (Python `websockets` 15+: `proxy=`).

Connects to --uri through the HTTP proxy --proxy (websockets tunnels ws:// and wss:// alike
with CONNECT), trusting --cafile for wss://. Modes:
  echo  send a text and a binary message, check both come back unchanged, close (1000);
  idle  send one text message, read its echo, then send nothing (no pings) and wait for the
        connection to be closed from the other side.
Prints one JSON line: {"text": ..., "binary_ok": ..., "close_code": ..., "closed_by_peer": ...}.
"""
import argparse
import asyncio
import json
import ssl

from websockets.asyncio.client import connect


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--mode", default="echo", choices=["echo", "idle"])
    ap.add_argument("--wait", type=float, default=60.0)
    args = ap.parse_args()
    ctx = None
    if args.uri.startswith("wss://"):
        ctx = ssl.create_default_context(cafile=args.cafile)
    result = {}
    async with connect(
        args.uri,
        proxy=args.proxy,
        ssl=ctx,
        ping_interval=None,
        compression=None,
        open_timeout=30,
    ) as ws:
        await ws.send("hello through edgepool")
        result["text"] = await asyncio.wait_for(ws.recv(), args.wait)
        if args.mode == "echo":
            blob = bytes(range(256)) * 64  # 16 KiB, every byte value
            await ws.send(blob)
            back = await asyncio.wait_for(ws.recv(), args.wait)
            result["binary_ok"] = back == blob
            await ws.close(1000, "done")
            result["closed_by_peer"] = False
        else:
            try:
                await asyncio.wait_for(ws.wait_closed(), args.wait)
                result["closed_by_peer"] = True
            except asyncio.TimeoutError:
                result["closed_by_peer"] = False
        rcvd = ws.protocol.close_rcvd
        result["close_code"] = rcvd.code if rcvd is not None else None
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
