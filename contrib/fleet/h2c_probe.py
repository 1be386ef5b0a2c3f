#!/usr/bin/env python3
"""Cleartext HTTP/2 (prior knowledge) forward-proxy requests through the fleet's HAProxy.

    h2c_probe.py HOST PORT PROXY_AUTH URL...

Opens ONE HTTP/2 connection to HOST:PORT and sends every URL (http://...) on it as its own
stream (:scheme http, :authority = the target, as an HTTP/2 forward proxy request), all at
once, with `proxy-authorization: PROXY_AUTH` ("" for none). Prints one line per stream:
`<url> <status> <x-edgepool-node> <body length> <body sha256 prefix>`. Exit 1 if a stream got
no response. Needs the Python `h2` package (pip install h2).
"""
import hashlib
import socket
import sys
import urllib.parse

import h2.config
import h2.connection
import h2.events


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    host, port, auth, urls = argv[1], int(argv[2]), argv[3], argv[4:]
    s = socket.create_connection((host, port), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    streams = {}
    for url in urls:
        u = urllib.parse.urlsplit(url)
        sid = c.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", u.scheme), (":authority", u.netloc),
                   (":path", u.path or "/")]
        if auth:
            headers.append(("proxy-authorization", auth))
        c.send_headers(sid, headers, end_stream=True)
        streams[sid] = {"url": url, "status": None, "node": "-", "body": b"", "done": False}
    s.sendall(c.data_to_send())
    while not all(v["done"] for v in streams.values()):
        data = s.recv(65536)
        if not data:
            break
        for e in c.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived):
                h = {k.decode(): v.decode() for k, v in e.headers}
                streams[e.stream_id]["status"] = h.get(":status")
                streams[e.stream_id]["node"] = h.get("x-edgepool-node", "-")
            elif isinstance(e, h2.events.DataReceived):
                streams[e.stream_id]["body"] += e.data
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                streams[e.stream_id]["done"] = True
        s.sendall(c.data_to_send())
    s.close()
    ok = True
    for v in streams.values():
        ok &= v["done"] and v["status"] is not None
        digest = hashlib.sha256(v["body"]).hexdigest()[:12]
        print(v["url"], v["status"], v["node"], len(v["body"]), digest)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv)
