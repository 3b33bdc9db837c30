#!/usr/bin/env python3
"""A stand-in for the Auto Scaling API's launch lifecycle calls, for the boot
test (tests/boot.rs): moto stores lifecycle hooks but has no
CompleteLifecycleAction. Like AWS, it refuses a request whose SigV4
signature does not match the world's credentials (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY), is not for `autoscaling`, or is more than 15 minutes
off; it appends every call, refused or not, to a JSON-lines log.

    lifecycle_standin.py --log FILE    # listens on 127.0.0.1; prints its port

Only CompleteLifecycleAction and RecordLifecycleActionHeartbeat are known.
"""
import argparse
import datetime
import hmac
import json
import os
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$")
KNOWN = {"CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"}
lock = threading.Lock()


def refusal(handler, body):
    """Why AWS would refuse this request's signature, or None."""
    m = AUTH.match(handler.headers.get("Authorization", ""))
    if not m:
        return "MissingAuthenticationToken", "no SigV4 Authorization header"
    key, _day, region, service, signed, signature = m.groups()
    if key != os.environ["AWS_ACCESS_KEY_ID"]:
        return "InvalidClientTokenId", f"unknown access key {key}"
    if service != "autoscaling":
        return "SignatureDoesNotMatch", f"signed for service {service!r}, not autoscaling"
    if region != os.environ.get("AWS_REGION", "us-east-1"):
        return "SignatureDoesNotMatch", f"signed for region {region!r}, not {os.environ.get('AWS_REGION', 'us-east-1')!r}"
    stamp = handler.headers.get("X-Amz-Date", "")
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return "IncompleteSignature", "no X-Amz-Date"
    if abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) > 900:
        return "SignatureDoesNotMatch", "Signature expired"
    names = signed.split(";")
    if "host" not in names:
        return "SignatureDoesNotMatch", "the Host header is not signed"
    request = AWSRequest(method=handler.command, url=f"http://{handler.headers['Host']}{handler.path}", data=body,
                         headers={n: handler.headers[n] for n in names if n != "host" and handler.headers[n] is not None})
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(key, os.environ["AWS_SECRET_ACCESS_KEY"], handler.headers.get("X-Amz-Security-Token")), service, region)
    want = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(want, signature):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided"
    return None


class Handler(BaseHTTPRequestHandler):
    log_path = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}
        refused = refusal(self, body)
        action = form.get("Action", "")
        entry = {"action": action, "group": form.get("AutoScalingGroupName"), "hook": form.get("LifecycleHookName"),
                 "instance": form.get("InstanceId"), "result": form.get("LifecycleActionResult"),
                 "signed": refused is None, "refused": refused and refused[1],
                 "user_agent": self.headers.get("User-Agent", "")}
        with lock, open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if refused is None and action not in KNOWN:
            refused = ("InvalidAction", f"{action!r} is not known here")
        if refused:
            payload = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{refused[0]}</Code>"
                       f"<Message>{refused[1]}</Message></Error><RequestId>standin</RequestId></ErrorResponse>")
            status = 403 if refused[0] != "InvalidAction" else 400
        else:
            payload = (f'<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><{action}Result/>'
                       f"<ResponseMetadata><RequestId>standin</RequestId></ResponseMetadata></{action}Response>")
            status = 200
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    Handler.log_path = a.log
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
