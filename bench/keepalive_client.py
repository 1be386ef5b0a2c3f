#!/usr/bin/env python3
"""N absolute-form GETs through a forward proxy over one keep-alive connection, each answer
checked (status 200, Content-Length body read in full). For bench/instructions.sh: the count
is exact, so two runs differ only by their number of requests.

    keepalive_client.py PROXY_PORT TARGET_HOST:PORT N [PROXY_HOST]
"""
import socket
import sys


def main() -> None:
    proxy_port, target, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    proxy_host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    req = f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nUser-Agent: instructions\r\n\r\n".encode()
    s = socket.create_connection((proxy_host, proxy_port), timeout=120)
    buf = b""
    for i in range(n):
        s.sendall(req)
        while True:
            h = buf.find(b"\r\n\r\n")
            if h >= 0:
                head = buf[:h].decode("latin-1")
                if not head.startswith("HTTP/1.1 200"):
                    sys.exit(f"request {i}: {head.splitlines()[0]!r}")
                lengths = [l.split(":", 1)[1] for l in head.split("\r\n") if l.lower().startswith("content-length:")]
                if len(lengths) != 1:
                    sys.exit(f"request {i}: no single Content-Length")
                end = h + 4 + int(lengths[0])
                if len(buf) >= end:
                    buf = buf[end:]
                    break
            d = s.recv(65536)
            if not d:
                sys.exit(f"request {i}: the proxy closed the connection")
            buf += d
    print(f"ok {n}")


if __name__ == "__main__":
    main()
