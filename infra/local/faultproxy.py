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
CODE instead (e.g. `ExpiredToken`: credentials that have expired).
`--not-found N` answers the first N DescribeInstances calls that name
instances with InvalidInstanceID.NotFound for the last one named, as EC2
does for an instance it has just launched (it is eventually consistent).
`--fail-op OP --fail-count N --fail-code CODE [--fail-skip K]` answers N
calls of operation OP, after the first K, with error CODE. `--slow-op OP`
holds back the answer to every call of OP `--slow` seconds, after the
server has handled it (an SSM SendCommand accepted, its answer not yet
read).

AWS behaviours the local S3 server is kinder about:
- `--list-prefixes P1,P2`: the caller holds s3:ListBucket only for keys
  under these prefixes, so a GET or HEAD of a missing object anywhere else
  is answered 403 AccessDenied instead of 404, as S3 does.
  `--list-prefixes-from TEMPLATE --template-param K=V ...` takes them from
  the `s3:prefix` conditions of the s3:ListBucket grants of the template's
  DeployPolicy (infra/aws/fleetsync.yaml), so a test runs as that policy
  lets a deploy role run.
- `--kms`: objects as SSE-KMS stores them: every ETag the client sees (in
  headers and in listings) is opaque, 32 hex digits that are not the MD5
  of the content, and responses say `x-amz-server-side-encryption:
  aws:kms`. The client's If-Match / If-None-Match ETags are mapped back (and
  the request signed again with the world's credentials, since the SDK
  signs those headers), so conditional requests keep working as on S3.
- `--put-fault KIND:TEXT:SKIP:COUNT`: PUTs of keys containing TEXT, after
  the first SKIP of them, COUNT times: `409` (ConditionalRequestConflict,
  S3's answer to a conditional write racing another), `503` (SlowDown,
  S3's answer when it sheds load; the PUT never reaches the server),
  `lost` (the PUT reaches the server, then the connection drops before its
  answer) or `slow` (the answer is held back `--slow` seconds).
- `--delete-fault TEXT`: a DeleteObjects (POST ?delete) naming a key that
  contains TEXT deletes nothing and is answered 200 with a per-key
  AccessDenied error for each key it names, as S3 answers a batch whose
  keys the caller may not delete: the call succeeds, its keys do not.
  Its stats count such batches (`delete`) and their keys without TEXT
  (`delete-others`).
- `--delete-slow TEXT`: a DeleteObjects naming a key that contains TEXT is
  held `--slow` seconds, as one call whose retries go on for minutes, then
  its connection is closed; it is never forwarded (stats: `delete-slow`).

Requests are forwarded unchanged (the Host header too, so SigV4 signatures
stay valid), one upstream connection per request, asking for HTTP/1.0 so
that bodies come whole, not chunked. Counts per fault are rewritten to
`--stats` (JSON) after every fault.
"""
import argparse
import asyncio
import hashlib
import html
import json
import os
import random
import re
import socket
import struct
import urllib.parse

BODY_FAULTS = ["500", "503", "reset", "truncate", "flip", "stall"]
STATUS_FAULTS = ["500", "503"]


def api_error(headers, body, code, msg=None):
    """An AWS API error response for the request, in its protocol: JSON 1.1
    (has X-Amz-Target: SSM), EC2's query dialect, the AWS query protocol
    (AutoScaling), or S3's REST XML. Throttling codes get their API's own
    name and status."""
    json_protocol = any(h.lower().startswith("x-amz-target:") for h in headers)
    query = b"Action=" in body
    ec2 = query and b"Version=2016-11-15" in body
    if code == "throttle":
        code = "ThrottlingException" if json_protocol else "RequestLimitExceeded" if ec2 else "Throttling" if query else "SlowDown"
    status = 503 if code in ("RequestLimitExceeded", "SlowDown") else 403 if code == "SignatureDoesNotMatch" else 400
    msg = msg or ("Rate exceeded" if "Throttl" in code or "Limit" in code else "injected by faultproxy.py")
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


def template_list_prefixes(path, params):
    """The key prefixes the template's DeployPolicy grants s3:ListBucket for."""
    import yaml
    doc = yaml.safe_load(open(path))
    statements = doc["Resources"]["DeployPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    prefixes = []
    for st in statements:
        if "Fn::If" in st:
            continue  # a statement for an option (KMS): it grants no listing
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if st.get("Effect") != "Allow" or "s3:ListBucket" not in actions:
            continue
        values = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if values is None:
            return [""]  # the whole bucket
        for v in values:
            text = v["Fn::Sub"] if isinstance(v, dict) else v
            if isinstance(text, list):
                # ["...${Group}...", {Group: <GroupName, or the stack's name>}]
                text = text[0].replace("${Group}", "${GroupName}").replace("${Bucket}", "${ExistingBucket}")
            for k, val in params.items():
                text = text.replace("${" + k + "}", val)
            prefixes.append(text.rstrip("*"))
    return prefixes


def resign(method, target, headers):
    """Signs a request again (SigV4, the world's credentials from the
    environment) after a signed header was changed. The client's payload
    hash (X-Amz-Content-SHA256) is kept as it is."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    class AsIs(SigV4Auth):
        def _normalize_url_path(self, path):
            return path  # S3 paths are signed as sent

    fields = {}
    for h in headers:
        name, _, value = h.partition(":")
        fields[name.strip()] = value.strip()
    auth = next(v for k, v in fields.items() if k.lower() == "authorization")
    region = auth.split("Credential=", 1)[1].split("/")[2]
    host = next(v for k, v in fields.items() if k.lower() == "host")
    keep = {k: v for k, v in fields.items() if k.lower() not in ("authorization", "x-amz-date")}
    req = AWSRequest(method=method, url=f"http://{host}{target}", headers=keep)
    creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ.get("AWS_SESSION_TOKEN"))
    AsIs(creds, "s3", region).add_auth(req)
    return [f"{k}: {v}" for k, v in req.headers.items()]


def sigv4_matches(method, target, headers, body):
    """Whether a request's SigV4 signature is the one botocore computes for
    it from the world's credentials, over the headers the request says it
    signed: what AWS checks before anything else (403
    SignatureDoesNotMatch). moto and SeaweedFS do not check it."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    fields = {}
    for h in headers:
        name, _, value = h.partition(":")
        fields[name.strip().lower()] = value.strip()
    auth = fields.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return False
    parts = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    _key, _date, region, service, _ = parts["Credential"].split("/")
    # The scope must name this API and the world's region, as AWS's does.
    amz_target = fields.get("x-amz-target", "")
    api = ("ssm" if amz_target.startswith("AmazonSSM.") else "ec2" if b"Version=2016-11-15" in body
           else "autoscaling" if b"Version=2011-01-01" in body else service)
    if service != api or region != os.environ.get("AWS_REGION", region):
        return False
    signed = parts["SignedHeaders"].split(";")
    if "host" not in signed or any(h not in fields for h in signed):
        return False
    req = AWSRequest(method=method, url=f"http://{fields['host']}{target}", data=body, headers={h: fields[h] for h in signed})
    req.context["timestamp"] = fields.get("x-amz-date", "")
    creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ.get("AWS_SESSION_TOKEN"))
    signer = SigV4Auth(creds, service, region)
    return signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req) == parts["Signature"]


class Proxy:
    def __init__(self, a):
        self.upstream = urllib.parse.urlparse(a.upstream)
        self.rate, self.stall, self.api, self.always = a.rate, a.stall, a.api, a.always
        self.kinds = a.kinds.split(",") if a.kinds else BODY_FAULTS
        self.only = a.only
        self.max_faults = a.max_faults
        self.rng = random.Random(a.seed)
        self.stats_path = a.stats
        self.not_found = a.not_found
        self.fail_op, self.fail_count, self.fail_code, self.fail_skip = a.fail_op, a.fail_count, a.fail_code, a.fail_skip
        self.op_calls = 0
        self.list_prefixes = a.list_prefixes.split(",") if a.list_prefixes is not None else None
        if a.list_prefixes_from:
            self.list_prefixes = template_list_prefixes(a.list_prefixes_from, dict(p.split("=", 1) for p in a.template_param or []))
        self.put_faults = []
        for spec in a.put_fault or []:
            kind, text, skip, count = spec.split(":")
            self.put_faults.append({"kind": kind, "text": text, "skip": int(skip), "count": int(count), "seen": 0})
        self.slow, self.slow_op = a.slow, a.slow_op
        self.delete_fault = a.delete_fault
        self.delete_slow = a.delete_slow
        self.kms = a.kms
        self.verify_sigv4 = a.verify_sigv4
        self.count = a.count
        self.opaque = {}  # opaque ETag -> the server's
        self.counts = {"requests": 0, "faults": 0, "throttle": 0, "always": 0, "not-found": 0, "fail-op": 0, "denied": 0,
                       "409": 0, "lost": 0, "slow": 0, "delete": 0, "delete-others": 0, "delete-slow": 0, "no-content-sha256": 0, "bad-signature": 0, "signed": 0, **{f: 0 for f in BODY_FAULTS}}

    def record(self, fault):
        self.counts["faults"] += 1
        self.counts[fault] += 1
        self.save()

    def save(self):
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
                if self.count:
                    self.save()
                path, _, query = target.partition("?")
                is_object_get = method == "GET" and path.count("/") >= 2 and "list-type" not in query and "uploads" not in query
                if self.api and self.verify_sigv4:
                    if not sigv4_matches(method, target, headers, body):
                        self.record("bad-signature")
                        writer.write(api_error(headers, body, "SignatureDoesNotMatch",
                                               "The request signature we calculated does not match the signature you provided."))
                        await writer.drain()
                        continue
                    self.counts["signed"] += 1
                    self.save()
                if self.api:
                    fault = self.api_fault(headers, body)
                    if fault is not None:
                        writer.write(api_error(headers, body, fault[0], fault[1]))
                        await writer.drain()
                        continue
                    fault = self.always or ("throttle" if self.rng.random() < self.rate else None)
                    if fault is not None:
                        self.record("always" if self.always else fault)
                        writer.write(api_error(headers, body, fault))
                        await writer.drain()
                        continue
                if not self.api and unsigned_payload(headers):
                    # S3 refuses a SigV4 request without the payload's hash
                    # header (SeaweedFS serves it): curl --aws-sigv4 does not
                    # add one by itself.
                    self.record("no-content-sha256")
                    msg = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRequest</Code><Message>Missing required header for this request: x-amz-content-sha256</Message></Error>'
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)
                    await writer.drain()
                    continue
                fault = None
                exhausted = self.max_faults is not None and self.counts["faults"] >= self.max_faults
                # With --kinds, only object GETs are faulted.
                eligible = is_object_get or self.kinds is BODY_FAULTS
                if self.only and self.only not in urllib.parse.unquote(path):
                    eligible = False
                if not exhausted and eligible and self.rng.random() < self.rate:
                    fault = self.rng.choice(self.kinds if is_object_get else STATUS_FAULTS)
                if fault in ("500", "503"):
                    self.record(fault)
                    code, name = (500, "InternalError") if fault == "500" else (503, "SlowDown")
                    msg = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code><Message>injected</Message></Error>'.encode()
                    writer.write(f"HTTP/1.1 {code} {name}\r\nContent-Type: application/xml\r\nContent-Length: {len(msg)}\r\n\r\n".encode() + msg)
                    await writer.drain()
                    continue
                put_fault = self.put_fault(method, path, query) if not self.api else None
                if put_fault in ("409", "503"):
                    status, code, text = {
                        "409": ("409 Conflict", "ConditionalRequestConflict",
                                "A conflicting conditional operation is currently in progress against this resource."),
                        "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
                    }[put_fault]
                    msg = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{text}</Message></Error>'.encode()
                    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(msg)}\r\n\r\n".encode() + msg)
                    await writer.drain()
                    continue
                deletes = not self.api and method == "POST" and "delete" in query.split("&")
                keys = [html.unescape(k) for k in re.findall(r"<Key>(.*?)</Key>", body.decode("utf-8"))] if deletes else []
                if self.delete_slow and any(self.delete_slow in k for k in keys):
                    self.record("delete-slow")
                    await asyncio.sleep(self.slow)
                    return  # never forwarded: nothing lands after the test
                if self.delete_fault and keys:
                    if any(self.delete_fault in k for k in keys):
                        # Keys of the refused batch that do not match: a
                        # test sees whether matching keys went alone.
                        self.counts["delete-others"] += sum(self.delete_fault not in k for k in keys)
                        self.record("delete")
                        errors = "".join(f"<Error><Key>{html.escape(k)}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                                         for k in keys)
                        msg = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>{errors}</DeleteResult>'.encode()
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)
                        await writer.drain()
                        continue
                if self.kms:
                    unmasked = [self.unmask(h) for h in headers]
                    if unmasked != headers:
                        headers = resign(method, target, unmasked)
                status_line, resp_headers, resp_body = await self.forward(method, target, headers, body)
                if self.kms:
                    resp_headers, resp_body = self.mask(resp_headers, resp_body, method)
                if put_fault == "lost":
                    return  # the server did it; the client never hears
                slow_op = self.api and self.slow_op and self.api_call(headers, body)[0] == self.slow_op
                if slow_op:
                    self.record("slow")
                if put_fault == "slow" or slow_op:
                    await asyncio.sleep(self.slow)
                if self.list_prefixes is not None and method in ("GET", "HEAD") and status_line.split(" ")[1] == "404":
                    key = urllib.parse.unquote(path.split("/", 2)[2]) if path.count("/") >= 2 else ""
                    if key and not any(key.startswith(p) for p in self.list_prefixes if p):
                        self.record("denied")
                        msg = b"" if method == "HEAD" else b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
                        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)
                        await writer.drain()
                        continue
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

    def opaque_of(self, etag):
        """The opaque ETag shown for a server ETag (quoted or not)."""
        bare = etag.strip('"')
        o = hashlib.md5(b"kms:" + bare.encode()).hexdigest()
        self.opaque[o] = bare
        return o

    def mask(self, headers, body, method):
        out = []
        for h in headers:
            name, _, value = h.partition(":")
            if name.lower() == "etag":
                h = f'{name}: "{self.opaque_of(value.strip())}"'
            out.append(h)
        if method in ("GET", "HEAD", "PUT") and not any(h.lower().startswith("x-amz-server-side-encryption:") for h in out):
            out.append("x-amz-server-side-encryption: aws:kms")
        if b"<ETag>" in body:
            def opaque(m):
                bare = m.group(1).decode()
                for quote in ("&quot;", "&#34;", '"'):
                    bare = bare.replace(quote, "")
                return b"<ETag>&quot;" + self.opaque_of(bare).encode() + b"&quot;</ETag>"
            body = re.sub(rb"<ETag>(.*?)</ETag>", opaque, body)
        return out, body

    def unmask(self, h):
        name, _, value = h.partition(":")
        if name.lower() in ("if-match", "if-none-match") and value.strip() != "*":
            real = self.opaque.get(value.strip().strip('"'))
            if real is not None:
                return f'{name}: "{real}"'
        return h

    @staticmethod
    def api_call(headers, body):
        """(operation, query parameters) of an API call: JSON APIs name it in
        X-Amz-Target, query APIs in Action=."""
        target = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("x-amz-target:")), "")
        params = urllib.parse.parse_qs(body.decode("latin-1")) if b"Action=" in body else {}
        return (target.rsplit(".", 1)[-1] if target else (params.get("Action") or [""])[0]), params

    def api_fault(self, headers, body):
        """(code, message) for an API call the options fault, else None."""
        op, params = self.api_call(headers, body)
        if self.fail_op and op == self.fail_op:
            self.op_calls += 1
            if self.fail_skip < self.op_calls <= self.fail_skip + self.fail_count:
                self.record("fail-op")
                return self.fail_code, "injected by faultproxy.py"
        named = [v[0] for k, v in sorted(params.items()) if k.startswith("InstanceId.")]
        if op == "DescribeInstances" and named and self.counts["not-found"] < self.not_found:
            self.record("not-found")
            return "InvalidInstanceID.NotFound", f"The instance ID '{named[-1]}' does not exist"
        return None

    def put_fault(self, method, path, query):
        """The fault (409, 503, lost, slow) a PUT of this key gets, if any;
        a TEXT that starts with `POST ` faults the CompleteMultipartUploads
        of such keys instead."""
        completes = method == "POST" and "uploadId=" in query
        if method != "PUT" and not completes:
            return None
        for f in self.put_faults:
            wanted, text = (True, f["text"][5:]) if f["text"].startswith("POST ") else (False, f["text"])
            if completes == wanted and text in urllib.parse.unquote(path):
                f["seen"] += 1
                if f["skip"] < f["seen"] <= f["skip"] + f["count"]:
                    self.record(f["kind"])
                    return f["kind"]
        return None

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


def unsigned_payload(headers):
    """A request signed with SigV4 in the Authorization header whose
    x-amz-content-sha256 is missing or not among the signed headers, which
    S3 answers 400 InvalidRequest (older curls send the header unsigned)."""
    lower = [h.lower() for h in headers]
    auth = next((h for h in lower if h.startswith("authorization: aws4-hmac-sha256")), None)
    if auth is None:
        return False
    signed = auth.partition("signedheaders=")[2].split(",")[0].split(";")
    return "x-amz-content-sha256" not in signed or not any(h.startswith("x-amz-content-sha256:") for h in lower)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", type=float, default=0.06)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--stall", type=float, default=5.0)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--max-faults", type=int, help="stop faulting after this many faults")
    ap.add_argument("--only", metavar="TEXT", help="fault only requests whose path contains TEXT")
    ap.add_argument("--kinds", help="the faults object GETs get, comma-separated (default: all six); other requests are then never faulted")
    ap.add_argument("--api", action="store_true", help="in front of an AWS API server: throttle at --rate")
    ap.add_argument("--always", help="with --api: answer every request with this error code")
    ap.add_argument("--not-found", type=int, default=0, help="with --api: the first N DescribeInstances naming instances get InvalidInstanceID.NotFound")
    ap.add_argument("--fail-op", help="with --api: the operation --fail-count calls of answer --fail-code")
    ap.add_argument("--fail-count", type=int, default=1)
    ap.add_argument("--fail-skip", type=int, default=0)
    ap.add_argument("--fail-code", default="AccessDeniedException")
    ap.add_argument("--list-prefixes", help="S3: key prefixes the caller may list; a missing object elsewhere is 403, not 404")
    ap.add_argument("--list-prefixes-from", metavar="TEMPLATE", help="S3: --list-prefixes from the template's DeployPolicy")
    ap.add_argument("--template-param", action="append", metavar="K=V", help="a template parameter's value, for --list-prefixes-from")
    ap.add_argument("--put-fault", action="append", help="S3: KIND:TEXT:SKIP:COUNT, KIND one of 409, 503, lost, slow; TEXT 'POST ...' for POSTs")
    ap.add_argument("--slow", type=float, default=1.0, help="seconds a `slow` PUT's (or --slow-op's) answer is held back")
    ap.add_argument("--delete-fault", metavar="TEXT", help="S3: a DeleteObjects naming a key containing TEXT deletes nothing, each key answered AccessDenied")
    ap.add_argument("--delete-slow", metavar="TEXT", help="S3: a DeleteObjects naming a key containing TEXT is held back --slow seconds")
    ap.add_argument("--slow-op", help="with --api: the operation whose answers are held back --slow seconds")
    ap.add_argument("--count", action="store_true", help="keep --stats' request count current (written after every request)")
    ap.add_argument("--verify-sigv4", action="store_true", help="with --api: answer 403 SignatureDoesNotMatch to a request whose SigV4 signature is wrong")
    ap.add_argument("--kms", action="store_true", help="S3: opaque ETags (not the content's MD5), as SSE-KMS gives")
    a = ap.parse_args()
    proxy = Proxy(a)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", a.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
