"""Fetches the leaf certificate edgepool presents inside CONNECT tunnels and checks it, and the
CA, with Python `cryptography`'s strict DER parser and its RFC 5280 / CA/B path verifier — the
parser that Scrapy (through pyOpenSSL) and every `cryptography` user runs.

Usage: strict_certs.py SPEC.json
SPEC: {"proxy": "127.0.0.1:PORT", "ca": "/path/ca.pem", "out": "/dir",
       "targets": [{"connect": "host:port", "name": "host", "kind": "dns"|"ip"}]}
Prints one JSON object: {"client": ..., "ca": {...}, "leaves": [{...}]}. Each leaf row has
`parsed` (every extension decoded), `verified` (chains to the CA for `name`), `error`, and
`der` (where the leaf was written, for openssl).
"""

import datetime
import ipaddress
import json
import os
import socket
import ssl
import sys

import cryptography
from cryptography import x509
from cryptography.x509 import verification


def connect_tunnel(proxy, target):
    host, port = proxy.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"proxy closed during CONNECT {target}: {head!r}")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 200" not in status:
        raise RuntimeError(f"CONNECT {target} answered {status!r}")
    return sock


def fetch_leaf(proxy, target, name, kind):
    sock = connect_tunnel(proxy, target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sni = name if kind == "dns" else None
    with ctx.wrap_socket(sock, server_hostname=sni) as tls:
        return tls.getpeercert(binary_form=True)


def decode_all(cert):
    """Touches every field a strict parser must decode; raises on any DER violation."""
    exts = []
    for ext in cert.extensions:
        exts.append(ext.oid._name if hasattr(ext.oid, "_name") else ext.oid.dotted_string)
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    cert.public_key()
    cert.signature_hash_algorithm
    return exts


def main():
    spec = json.load(open(sys.argv[1]))
    with open(spec["ca"], "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    ca_row = {"extensions": decode_all(ca)}
    store = verification.Store([ca])
    now = datetime.datetime.now(datetime.timezone.utc)
    leaves = []
    for i, t in enumerate(spec["targets"]):
        row = {"target": t["connect"], "name": t["name"]}
        try:
            der = fetch_leaf(spec["proxy"], t["connect"], t["name"], t["kind"])
            path = os.path.join(spec["out"], f"leaf{i}.der")
            with open(path, "wb") as f:
                f.write(der)
            row["der"] = path
            leaf = x509.load_der_x509_certificate(der)
            row["extensions"] = decode_all(leaf)
            row["parsed"] = True
            if t["kind"] == "dns":
                subject = x509.DNSName(t["name"])
            else:
                subject = x509.IPAddress(ipaddress.ip_address(t["name"]))
            verifier = (
                verification.PolicyBuilder().store(store).time(now).build_server_verifier(subject)
            )
            chain = verifier.verify(leaf, [])
            row["verified"] = len(chain) == 2
        except Exception as e:  # noqa: BLE001 - reported to the Rust test verbatim
            row.setdefault("parsed", False)
            row["verified"] = False
            row["error"] = f"{type(e).__name__}: {e}"
        leaves.append(row)
    print(
        json.dumps(
            {"client": f"cryptography {cryptography.__version__}", "ca": ca_row, "leaves": leaves}
        )
    )


if __name__ == "__main__":
    main()
