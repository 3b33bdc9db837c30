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
two status faults.

With `--api` it stands in front of an AWS API server instead (moto for
AutoScaling and EC2, the SSM emulator) and its one fault is `throttle`: the
error each API sends when its rate limit is hit, in that API's own protocol
(AutoScaling `Throttling`, EC2 `RequestLimitExceeded`, SSM
`ThrottlingException`). `--always CODE` answers every request with error
CODE instead (e.g. `ExpiredToken`: credentials that have expired). Requests are forwarded unchanged (the Host header too, so
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


def api_error(headers, body, code):
    """An AWS API error response for the request, in its protocol: JSON 1.1
    (has X-Amz-Target: SSM), EC2's query dialect, the AWS query protocol
    (AutoScaling), or S3's REST XML. Throttling codes get their API's own
    name and status."""
    json_protocol = any(h.lower().startswith("x-amz-target:") for h in headers)
    query = b"Action=" in body
    ec2 = query and b"Version=2016-11-15" in body
    if code == "throttle":
        code = "ThrottlingException" if json_protocol else "RequestLimitExceeded" if ec2 else "Throttling" if query else "SlowDown"
    status = 503 if code in ("RequestLimitExceeded", "SlowDown") else 400
    msg = "Rate exceeded" if "Throttl" in code or "Limit" in code else "injected by faultproxy.py"
    if json_protocol:
        payload = json.dumps({"__type": code, "message": msg}).encode()
        ctype = "application/x-amz-json-1.1"
    elif ec2:
        payload = (f"<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors>"
                   "<RequestID>faultproxy</RequestID></Response>").encode()
        ctype = "text/xml"
    elif not query:
        payload = f"<Error><Code>{code}</Code><Message>{msg}</Message></Error>".encode()
        ctype = "application/xml"
    else:
        payload = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{msg}</Message></Error>"
                   "<RequestId>faultproxy</RequestId></ErrorResponse>").encode()
        ctype = "text/xml"
    return (f"HTTP/1.1 {status} Error\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


class Proxy:
    def __init__(self, a):
        self.upstream = urllib.parse.urlparse(a.upstream)
        self.rate, self.stall, self.api, self.always = a.rate, a.stall, a.api, a.always
        self.kinds = a.kinds.split(",") if a.kinds else BODY_FAULTS
        self.max_faults = a.max_faults
        self.rng = random.Random(a.seed)
        self.stats_path = a.stats
        self.counts = {"requests": 0, "faults": 0, "throttle": 0, "always": 0, **{f: 0 for f in BODY_FAULTS}}

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
                if self.api:
                    fault = self.always or ("throttle" if self.rng.random() < self.rate else None)
                    if fault is not None:
                        self.record("always" if self.always else fault)
                        writer.write(api_error(headers, body, fault))
                        await writer.drain()
                        continue
                fault = None
                exhausted = self.max_faults is not None and self.counts["faults"] >= self.max_faults
                # With --kinds, only object GETs are faulted.
                eligible = is_object_get or self.kinds is BODY_FAULTS
                if not exhausted and eligible and self.rng.random() < self.rate:
                    fault = self.rng.choice(self.kinds if is_object_get else STATUS_FAULTS)
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
    ap.add_argument("--max-faults", type=int, help="stop faulting after this many faults")
    ap.add_argument("--kinds", help="the faults object GETs get, comma-separated (default: all six); other requests are then never faulted")
    ap.add_argument("--api", action="store_true", help="in front of an AWS API server: throttle at --rate")
    ap.add_argument("--always", help="with --api: answer every request with this error code")
    a = ap.parse_args()
    proxy = Proxy(a)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", a.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
