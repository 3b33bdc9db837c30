#!/usr/bin/env python3
"""An executing SSM Run Command emulator for the local world.

moto's SSM accepts SendCommand but runs nothing (every command is Success
at once with empty output), so the bastion's SSM path is tested against
this server instead, reached with AWS_ENDPOINT_URL_SSM. It speaks the real
wire protocol (AWS JSON 1.1, `X-Amz-Target: AmazonSSM.<Operation>`), so the
bastion uses the unmodified aws-sdk-ssm client.

    ssm_emulator.py --port P --dir DIR      # FLEETSYNC_MOTO must point at moto

What it copies from the real service (../shared/notes/local-world.md):
- SendCommand with AWS-RunShellScript: at most 50 InstanceIds (more is a
  ValidationException); `tag:KEY` and `InstanceIds` Targets resolved against
  moto's EC2 at send time; instances not registered (no SSM agent) make the
  call fail with InvalidInstanceId, as on AWS.
- MaxConcurrency and MaxErrors (a number or N%, defaults 50 and 0): at most
  MaxConcurrency invocations run at once; once errors exceed MaxErrors no
  further instance is started and the rest end Cancelled.
- Invocations go Pending -> InProgress -> Success | Failed | TimedOut
  (`executionTimeout`, default 3600 s, kills the script's process group);
  ResponseCode is the script's exit status.
- GetCommandInvocation answers InvocationDoesNotExist for a short while
  after SendCommand (FLEETSYNC_SSM_INVOCATION_DELAY seconds, default 0.5),
  and returns the first 24,000 characters of stdout and 8,000 of stderr;
  ListCommandInvocations with Details returns 2,500 per plugin.
- DescribeInstanceInformation lists registered instances as Online.
- CancelCommand: invocations not yet started end Cancelled; running ones
  are killed and end Cancelled.

An instance is registered when DIR/instances/<instance-id> links to its node
directory (fleet.py nodes-up does this): the script runs as root in a
private mount namespace with the node's own srv/ bind-mounted over /srv and
the environment from its node.json, the same root its sshd serves.

Every SendCommand and every finished invocation is appended to
DIR/calls.jsonl, so tests can check batching and concurrency.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

STDOUT_GET, STDERR_GET, OUTPUT_LIST = 24_000, 8_000, 2_500
MAX_INSTANCE_IDS = 50
TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}


class ApiError(Exception):
    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def resolve_limit(value, targets, default):
    """MaxConcurrency / MaxErrors: "10" or "10%" of the target count."""
    value = value or default
    try:
        if value.endswith("%"):
            pct = int(value[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return math.floor(targets * pct / 100)
        n = int(value)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise ApiError("ValidationException", f"invalid rate control value {value!r}: use a number or a percentage like 10%")


class Invocation:
    def __init__(self, command, instance_id):
        self.command, self.instance_id = command, instance_id
        self.status, self.details = "Pending", "Pending"
        self.code = -1
        self.stdout = self.stderr = ""
        self.start = self.end = None
        self.proc = None  # the running script, for CancelCommand
        self.cancel_requested = False

    def finish(self, status, details, code, stdout="", stderr=""):
        with self.command.world.lock:
            self.status, self.details, self.code = status, details, code
            self.stdout, self.stderr = stdout, stderr
            self.end = time.time()


class Command:
    def __init__(self, world, req, instance_ids):
        self.world = world
        self.id = str(uuid.uuid4())
        self.req = req
        self.requested = time.time()
        params = req.get("Parameters") or {}
        self.commands = params.get("commands") or []
        timeout = (params.get("executionTimeout") or ["3600"])[0]
        try:
            self.timeout = int(timeout)
        except ValueError:
            raise ApiError("InvalidParameters", f"executionTimeout {timeout!r} is not a number of seconds")
        self.invocations = {i: Invocation(self, i) for i in instance_ids}
        n = len(instance_ids)
        self.max_concurrency_text = req.get("MaxConcurrency") or "50"
        self.max_errors_text = req.get("MaxErrors") or "0"
        self.max_concurrency = max(1, resolve_limit(self.max_concurrency_text, n, "50"))
        self.max_errors = resolve_limit(self.max_errors_text, n, "0")
        self.cancelled = False
        # InvocationDoesNotExist until then, as on AWS right after SendCommand.
        self.visible_at = self.requested + world.invocation_delay

    def errors(self):
        return sum(1 for v in self.invocations.values() if v.status in ("Failed", "TimedOut"))

    def status(self):
        states = [v.status for v in self.invocations.values()]
        if all(s == "Pending" for s in states):
            return "Pending", "Pending"
        if not all(s in TERMINAL for s in states):
            return "InProgress", "In Progress"
        if all(s == "Success" for s in states):
            return "Success", "Success"
        if self.errors() > self.max_errors:
            return "Failed", "Failed"
        return "Failed", "Incomplete"

    def run(self):
        """Starts invocations, MaxConcurrency at a time, until done or
        MaxErrors is exceeded (then the rest are Cancelled)."""
        running = []
        for inv in self.invocations.values():
            while True:
                running = [t for t in running if t.is_alive()]
                if self.errors() > self.max_errors or len(running) < self.max_concurrency:
                    break
                time.sleep(0.02)
            if self.errors() > self.max_errors or self.cancelled:
                inv.finish("Cancelled", "Cancelled", -1)
                continue
            with self.world.lock:
                inv.status, inv.details, inv.start = "InProgress", "In Progress", time.time()
            t = threading.Thread(target=self.world.execute, args=(inv,), daemon=True)
            t.start()
            running.append(t)

    def describe(self):
        status, details = self.status()
        vals = self.invocations.values()
        return {
            "CommandId": self.id,
            "DocumentName": self.req.get("DocumentName"),
            "Comment": self.req.get("Comment", ""),
            "Parameters": self.req.get("Parameters") or {},
            "InstanceIds": self.req.get("InstanceIds") or [],
            "Targets": self.req.get("Targets") or [],
            "RequestedDateTime": self.requested,
            "Status": status,
            "StatusDetails": details,
            "MaxConcurrency": self.max_concurrency_text,
            "MaxErrors": self.max_errors_text,
            "TargetCount": len(self.invocations),
            "CompletedCount": sum(1 for v in vals if v.status in TERMINAL),
            "ErrorCount": self.errors(),
            "DeliveryTimedOutCount": 0,
            "TimeoutSeconds": self.req.get("TimeoutSeconds", 3600),
        }


class World:
    def __init__(self, root):
        self.root = root
        self.lock = threading.Lock()  # guards every Command and Invocation
        self.commands = {}
        self.invocation_delay = float(os.environ.get("FLEETSYNC_SSM_INVOCATION_DELAY", "0.5"))
        self.ec2 = boto3.client(
            "ec2",
            endpoint_url=os.environ["FLEETSYNC_MOTO"],
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        os.makedirs(os.path.join(root, "instances"), exist_ok=True)

    def node_dir(self, instance_id):
        path = os.path.join(self.root, "instances", instance_id)
        return path if os.path.exists(os.path.join(path, "node.json")) else None

    def record(self, entry):
        with self.lock, open(os.path.join(self.root, "calls.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    # -- operations ---------------------------------------------------------

    def SendCommand(self, req):
        if req.get("DocumentName") != "AWS-RunShellScript":
            raise ApiError("InvalidDocument", f"document {req.get('DocumentName')!r}: this emulator runs AWS-RunShellScript only")
        ids = req.get("InstanceIds") or []
        if len(ids) > MAX_INSTANCE_IDS:
            raise ApiError(
                "ValidationException",
                f"1 validation error detected: Value at 'instanceIds' failed to satisfy constraint: Member must have length less than or equal to {MAX_INSTANCE_IDS}",
            )
        if ids and req.get("Targets"):
            raise ApiError("ValidationException", "InstanceIds and Targets are mutually exclusive")
        if not ids:
            ids = self.resolve_targets(req.get("Targets") or [])
        if not ids:
            raise ApiError("InvalidParameters", "the command has no targets")
        unregistered = [i for i in ids if not self.node_dir(i)]
        if unregistered:
            raise ApiError("InvalidInstanceId", f"Instances {unregistered} not in a valid state for account (is the SSM agent running?)")
        cmd = Command(self, req, list(dict.fromkeys(ids)))
        with self.lock:
            self.commands[cmd.id] = cmd
        self.record({"op": "SendCommand", "command_id": cmd.id, "instance_ids": list(cmd.invocations),
                     "max_concurrency": cmd.max_concurrency_text, "max_errors": cmd.max_errors_text, "timeout": cmd.timeout})
        threading.Thread(target=cmd.run, daemon=True).start()
        with self.lock:
            return {"Command": cmd.describe()}

    def resolve_targets(self, targets):
        ids = []
        for t in targets:
            key, values = t.get("Key", ""), t.get("Values") or []
            if key == "InstanceIds":
                ids += values
            elif key.startswith("tag:"):
                filters = [{"Name": key, "Values": values}, {"Name": "instance-state-name", "Values": ["running"]}]
                for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
                    for res in page["Reservations"]:
                        ids += [i["InstanceId"] for i in res["Instances"] if self.node_dir(i["InstanceId"])]
            else:
                raise ApiError("ValidationException", f"target key {key!r}: use InstanceIds or tag:KEY")
        return ids

    def command(self, req):
        cmd = self.commands.get(req.get("CommandId", ""))
        if cmd is None:
            raise ApiError("InvalidCommandId", f"command {req.get('CommandId')!r} does not exist")
        return cmd

    def GetCommandInvocation(self, req):
        with self.lock:
            cmd = self.command(req)
            inv = cmd.invocations.get(req.get("InstanceId", ""))
            if inv is None or time.time() < cmd.visible_at:
                raise ApiError("InvocationDoesNotExist", "")
            fmt = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z" if t else ""
            return {
                "CommandId": cmd.id,
                "InstanceId": inv.instance_id,
                "Comment": cmd.req.get("Comment", ""),
                "DocumentName": "AWS-RunShellScript",
                "PluginName": "aws:runShellScript",
                "ResponseCode": inv.code,
                "ExecutionStartDateTime": fmt(inv.start),
                "ExecutionEndDateTime": fmt(inv.end),
                "ExecutionElapsedTime": "",
                "Status": inv.status,
                "StatusDetails": inv.details,
                "StandardOutputContent": inv.stdout[:STDOUT_GET],
                "StandardOutputUrl": "",
                "StandardErrorContent": inv.stderr[:STDERR_GET],
                "StandardErrorUrl": "",
            }

    def ListCommandInvocations(self, req):
        with self.lock:
            if req.get("CommandId"):
                cmds = [self.command(req)]
            else:
                cmds = list(self.commands.values())
            now = time.time()
            rows = [(c, v) for c in cmds if now >= c.visible_at for v in c.invocations.values()
                    if not req.get("InstanceId") or v.instance_id == req["InstanceId"]]
            start = int(req.get("NextToken") or 0)
            size = int(req.get("MaxResults") or 50)
            page = rows[start:start + size]
            out = []
            for c, v in page:
                item = {
                    "CommandId": c.id,
                    "InstanceId": v.instance_id,
                    "InstanceName": "",
                    "Comment": c.req.get("Comment", ""),
                    "DocumentName": "AWS-RunShellScript",
                    "RequestedDateTime": c.requested,
                    "Status": v.status,
                    "StatusDetails": v.details,
                    "StandardOutputUrl": "",
                    "StandardErrorUrl": "",
                    "CommandPlugins": [],
                }
                if req.get("Details"):
                    plugin = {"Name": "aws:runShellScript", "Status": v.status, "StatusDetails": v.details,
                              "ResponseCode": v.code, "Output": (v.stdout + v.stderr)[:OUTPUT_LIST]}
                    if v.start:
                        plugin["ResponseStartDateTime"] = v.start
                    if v.end:
                        plugin["ResponseFinishDateTime"] = v.end
                    item["CommandPlugins"] = [plugin]
                out.append(item)
            resp = {"CommandInvocations": out}
            if start + size < len(rows):
                resp["NextToken"] = str(start + size)
            return resp

    def ListCommands(self, req):
        with self.lock:
            cmds = [self.command(req)] if req.get("CommandId") else list(self.commands.values())
            if req.get("InstanceId"):
                cmds = [c for c in cmds if req["InstanceId"] in c.invocations]
            start = int(req.get("NextToken") or 0)
            size = int(req.get("MaxResults") or 50)
            resp = {"Commands": [c.describe() for c in cmds[start:start + size]]}
            if start + size < len(cmds):
                resp["NextToken"] = str(start + size)
            return resp

    def CancelCommand(self, req):
        with self.lock:
            cmd = self.command(req)
            cmd.cancelled = True
            running = [v for v in cmd.invocations.values() if v.status == "InProgress"]
            for v in running:
                v.cancel_requested = True
        self.record({"op": "CancelCommand", "command_id": cmd.id})
        for v in running:
            if v.proc is not None:
                try:
                    os.killpg(v.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return {}

    def DescribeInstanceInformation(self, req):
        ids = []
        for f in req.get("Filters") or []:
            if f.get("Key") == "InstanceIds":
                ids += f.get("Values") or []
        for f in req.get("InstanceInformationFilterList") or []:
            if f.get("key") == "InstanceIds":
                ids += f.get("valueSet") or []
        if not ids:
            ids = sorted(os.listdir(os.path.join(self.root, "instances")))
        found = [i for i in ids if self.node_dir(i)]
        return {"InstanceInformationList": [
            {"InstanceId": i, "PingStatus": "Online", "PlatformType": "Linux", "AgentVersion": "3.3.0.0-fleetsync-emulator",
             "ResourceType": "EC2Instance", "LastPingDateTime": time.time()} for i in found]}

    # -- running a script on a node ------------------------------------------

    def execute(self, inv):
        cmd = inv.command
        node = self.node_dir(inv.instance_id)
        if node is None:  # deregistered since SendCommand: the agent went away
            inv.finish("Failed", "Undeliverable", -1, stderr="the SSM agent on this instance is not running")
            self.log_invocation(inv)
            return
        info = json.load(open(os.path.join(node, "node.json")))
        work = os.path.join(node, "ssm", cmd.id)
        os.makedirs(work, exist_ok=True)
        script = os.path.join(work, "_script.sh")
        with open(script, "w") as f:
            f.write("\n".join(cmd.commands) + "\n")
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = inv.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 'mount --bind "$1" /srv && cd / && exec sh "$2"', "sh", info["root"], script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=info["env"], start_new_session=True,
            )
            try:
                code = proc.wait(timeout=cmd.timeout)
                status = ("Success", "Success") if code == 0 else ("Failed", "Failed")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code, status = -1, ("TimedOut", "Execution Timed Out")
        read = lambda p: open(p, "rb").read().decode("utf-8", "replace")
        if inv.cancel_requested:
            code, status = -1, ("Cancelled", "Cancelled")
        inv.finish(status[0], status[1], code, read(out_path), read(err_path))
        self.log_invocation(inv)

    def log_invocation(self, inv):
        self.record({"op": "invocation", "command_id": inv.command.id, "instance_id": inv.instance_id,
                     "status": inv.status, "start": inv.start, "end": inv.end})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    world = None

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b"{}"
        target = self.headers.get("X-Amz-Target", "")
        op = target.split(".", 1)[1] if target.startswith("AmazonSSM.") else ""
        try:
            fn = getattr(self.world, op, None) if op[:1].isupper() else None
            if fn is None:
                raise ApiError("UnknownOperationException", f"operation {op or target!r} is not emulated")
            resp, status = fn(json.loads(body or b"{}")), 200
        except ApiError as e:
            resp, status = {"__type": e.code, "message": e.message}, e.status
        except Exception as e:  # a bug here must show as a server error, not a hang
            resp, status = {"__type": "InternalServerError", "message": repr(e)}, 500
        data = json.dumps(resp).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    Handler.world = World(a.dir)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
