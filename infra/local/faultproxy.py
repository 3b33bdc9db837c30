#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for the local S3 server.

    faultproxy.py --port P --upstream http://127.0.0.1:S3PORT --rate 0.06 --seed 7 --stats FILE

Sits on 127.0.0.1 between a client and SeaweedFS and, for a share `--rate`
of requests (a seeded random sequence), answers with a fault instead of the
server's answer:

- `500`: HTTP 500 InternalError;
- `503`: HTTP 503 SlowDown;
- `reset`: the response headers, part of the body, then the connection is
  reset (RST);
- `truncate`: the original Content-Length, half the body, then a clean close;
- `flip`: the whole body with one byte flipped (so its MD5 no longer matches
  the ETag);
- `stall`: the headers, then nothing for `--stall` seconds (longer than the
  client's read timeout), then a close.

Body faults are applied to object GETs only; listings and writes get the
two status faults. Requests are forwarded unchanged (the Host header too, so
SigV4 signatures stay valid), one upstream connection per request, asking
for HTTP/1.0 so that bodies come whole, not chunked. Counts per fault are
rewritten to `--stats` (JSON) after every fault.
"""
import argparse
import asyncio
import json
import os
import random
import socket
import struct
import urllib.parse

BODY_FAULTS = ["500", "503", "reset", "truncate", "flip", "stall"]
STATUS_FAULTS = ["500", "503"]


class Proxy:
    def __init__(self, a):
        self.upstream = urllib.parse.urlparse(a.upstream)
        self.rate, self.stall = a.rate, a.stall
        self.rng = random.Random(a.seed)
        self.stats_path = a.stats
        self.counts = {"requests": 0, "faults": 0, **{f: 0 for f in BODY_FAULTS}}

    def record(self, fault):
        self.counts["faults"] += 1
        self.counts[fault] += 1
        with open(self.stats_path + ".tmp", "w") as f:
            json.dump(self.counts, f)
        os.replace(self.stats_path + ".tmp", self.stats_path)

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [l for l in lines[1:] if l]
                length = next((int(l.split(":", 1)[1]) for l in headers if l.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                self.counts["requests"] += 1
                path, _, query = target.partition("?")
                is_object_get = method == "GET" and path.count("/") >= 2 and "list-type" not in query and "uploads" not in query
                fault = None
                if self.rng.random() < self.rate:
                    fault = self.rng.choice(BODY_FAULTS if is_object_get else STATUS_FAULTS)
                if fault in ("500", "503"):
                    self.record(fault)
                    code, name = (500, "InternalError") if fault == "500" else (503, "SlowDown")
                    msg = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code><Message>injected</Message></Error>'.encode()
                    writer.write(f"HTTP/1.1 {code} {name}\r\nContent-Type: application/xml\r\nContent-Length: {len(msg)}\r\n\r\n".encode() + msg)
                    await writer.drain()
                    continue
                status_line, resp_headers, resp_body = await self.forward(method, target, headers, body)
                if fault is not None and resp_body and status_line.split(" ")[1] in ("200", "206"):
                    self.record(fault)
                    await self.inject(fault, writer, status_line, resp_headers, resp_body)
                    return
                writer.write(self.head(status_line, resp_headers, len(resp_body)) + resp_body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    def head(self, status_line, headers, length):
        kept = [h for h in headers if not h.lower().startswith(("content-length:", "connection:", "transfer-encoding:"))]
        return (status_line.replace("HTTP/1.0", "HTTP/1.1") + "\r\n" + "".join(h + "\r\n" for h in kept)
                + f"Content-Length: {length}\r\n\r\n").encode("latin-1")

    async def forward(self, method, target, headers, body):
        r, w = await asyncio.open_connection(self.upstream.hostname, self.upstream.port)
        fwd = [h for h in headers if not h.lower().startswith("connection:")] + ["Connection: close"]
        w.write((f"{method} {target} HTTP/1.0\r\n" + "".join(h + "\r\n" for h in fwd) + "\r\n").encode("latin-1") + body)
        await w.drain()
        raw = await r.read()
        w.close()
        head, _, resp_body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        return lines[0], [l for l in lines[1:] if l], resp_body

    async def inject(self, fault, writer, status_line, headers, body):
        if fault == "flip":
            b = bytearray(body)
            b[self.rng.randrange(len(b))] ^= 0xFF
            writer.write(self.head(status_line, headers, len(b)) + bytes(b))
            await writer.drain()
        elif fault == "truncate":
            writer.write(self.head(status_line, headers, len(body)) + body[: len(body) // 2])
            await writer.drain()
        elif fault == "reset":
            writer.write(self.head(status_line, headers, len(body)) + body[: len(body) // 3])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close sends RST
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault == "stall":
            writer.write(self.head(status_line, headers, len(body)))
            await writer.drain()
            await asyncio.sleep(self.stall)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", type=float, default=0.06)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--stall", type=float, default=5.0)
    ap.add_argument("--stats", required=True)
    a = ap.parse_args()
    proxy = Proxy(a)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", a.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
