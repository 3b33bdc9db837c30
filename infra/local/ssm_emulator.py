#!/usr/bin/env python3
"""An executing SSM Run Command emulator for the local world.

moto's SSM accepts SendCommand but runs nothing (every command is Success
at once with empty output), so the bastion's SSM path is tested against
this server instead, reached with AWS_ENDPOINT_URL_SSM. It speaks the real
wire protocol (AWS JSON 1.1, `X-Amz-Target: AmazonSSM.<Operation>`), so the
bastion uses the unmodified aws-sdk-ssm client.

    ssm_emulator.py --port P --dir DIR [--rate-limit N]   # FLEETSYNC_MOTO must point at moto

It is meant to be as unkind as SSM wherever fleetsync depends on a
behaviour (../shared/notes/local-world.md; the SSM agent's source,
aws/amazon-ssm-agent; the botocore model):
- Documents: AWS-RunShellScript (`commands`, `executionTimeout`, whose
  unanchored pattern lets an out-of-range value through and runs it with
  3600 s, as the SSM agent does) and Command documents made with
  CreateDocument (schemaVersion 2.2, one aws:runShellScript step), with
  versions as SSM keeps them (UpdateDocument adds one, the default version
  stays, and SendCommand runs its DocumentVersion, else the default): typed
  parameters checked against allowedValues / allowedPattern (a mismatch is
  InvalidParameters and nothing runs), defaults applied, `{{ name }}`
  pasted into the script as plain text, `timeoutSeconds` from a parameter.
- SendCommand: at most 50 InstanceIds (more is a ValidationException);
  `tag:KEY` and `InstanceIds` Targets resolved against moto's EC2 at send
  time; an instance not registered (no SSM agent) fails the whole call with
  InvalidInstanceId, as on AWS; TimeoutSeconds 30..2592000.
- MaxConcurrency and MaxErrors (a number or N%, defaults 50 and 0): at most
  MaxConcurrency invocations run at once; once errors exceed MaxErrors no
  further instance is started and the rest end Cancelled.
- Invocations go Pending -> InProgress -> Success | Failed | TimedOut |
  Cancelled, with StatusDetails as on the wire (`ExecutionTimedOut`,
  `DeliveryTimedOut`, no spaces). ResponseCode is -1 until the end, then the
  script's exit status; executionTimeout and CancelCommand SIGKILL the
  script's process group. A command expires TimeoutSeconds +
  executionTimeout after SendCommand: whatever is still Pending or
  InProgress then ends TimedOut / DeliveryTimedOut (waves queued behind a
  small MaxConcurrency do).
- Output as the SSM agent shapes it: stdout cut at 24,000 bytes ending in
  `--output truncated--`, stderr capped at 8,000 characters by the service;
  on a non-zero exit the agent appends `failed to run commands: exit status
  N` to stderr. ListCommandInvocations with Details carries the plugin
  Output (stdout, `\\n----------ERROR-------\\n`, stderr, 2,500 characters
  with the agent's truncation markers).
- Eventual consistency: GetCommandInvocation answers InvocationDoesNotExist
  for FLEETSYNC_SSM_INVOCATION_DELAY s (default 0.5) after SendCommand, and
  for FLEETSYNC_SSM_OUTPUT_LAG s (default 0.5) after an invocation ended it
  still answers InProgress with empty output and ResponseCode -1, while
  ListCommandInvocations already shows the final status.
- CancelCommand is asynchronous, as on AWS ("there is no guarantee that the
  command will be terminated"): a running invocation shows `Cancelling`
  and its script is killed FLEETSYNC_SSM_CANCEL_DELAY s (default 1) later.
- DescribeInstanceInformation: registered instances, paged (MaxResults
  5..50), with their PingStatus.
- `--rate-limit N` (or FLEETSYNC_SSM_RATE_LIMIT): more than N requests a
  second (burst 2N) are answered ThrottlingException, as SSM does under
  load. Two operations that are not AWS's serve the scale benchmark:
  `FleetsyncEmulatorStats` answers the requests seen per operation and how
  many were throttled; `FleetsyncEmulatorConfigure {"RateLimit": N}` sets
  the limit (0: none).

An instance is registered when DIR/instances/<instance-id> links to its node
directory (fleet.py nodes-up does this): the script runs as root in a
private mount namespace with the node's own srv/ bind-mounted over /srv and
the environment from its node.json, the same root its sshd serves. A file
`ssm-agent` in the node directory changes how its SSM agent behaves:
`connection-lost` (PingStatus ConnectionLost; nothing is ever delivered),
`dead` (the agent died but the instance still shows Online, or the
instance vanished in a scale-in: an invocation goes InProgress, or stays
there if its script was running, and then nothing happens until the
command expires, as AWS shows a terminated instance's). A node
whose node.json says `"simulated": true` runs nothing: it answers after
`simulated_ms` with a canned agent report marked `"simulated": true` (the
bastion's scale benchmark, thousands of instances).

Every SendCommand, CancelCommand and finished invocation is appended to
DIR/calls.jsonl, so tests can check batching and concurrency.
"""
import argparse
import heapq
import json
import math
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import yaml

STDOUT_GET, STDERR_GET, OUTPUT_LIST = 24_000, 8_000, 2_500
AGENT_MAX_OUTPUT, AGENT_TRUNCATED = 24_000, b"--output truncated--"
ERR_TITLE, TRUNC_OUT, TRUNC_ERR = "\n----------ERROR-------\n", "\n---Output truncated---", "\n---Error truncated----"
MAX_INSTANCE_IDS = 50
TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}
PARAM_REF = re.compile(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}")

# AWS-RunShellScript, as the SSM agent reads it: executionTimeout's pattern
# has no anchors, so any value with a digit 1-9 in it passes.
RUN_SHELL_SCRIPT = {
    "schemaVersion": "1.2",
    "parameters": {
        "commands": {"type": "StringList"},
        "workingDirectory": {"type": "String", "default": ""},
        "executionTimeout": {
            "type": "String",
            "default": "3600",
            "allowedPattern": "([1-9][0-9]{0,4})|(1[0-6][0-9]{4})|(17[0-1][0-9]{3})|(172[0-7][0-9]{2})|(172800)",
        },
    },
}


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


def agent_truncate(data: bytes) -> str:
    """The SSM agent's StringPrefix: a byte prefix plus its marker, from 24,000 bytes up."""
    if len(data) >= AGENT_MAX_OUTPUT:
        data = data[: AGENT_MAX_OUTPUT - len(AGENT_TRUNCATED)] + AGENT_TRUNCATED
    return data.decode("utf-8", "replace")


def plugin_output(stdout, stderr, capacity=OUTPUT_LIST):
    """The SSM agent's TruncateOutput: what ListCommandInvocations' Details show."""
    title = ERR_TITLE if stderr else ""
    space = capacity - len(title)
    if len(stdout) + len(stderr) < space:
        return stdout + title + stderr
    if len(stdout) > space // 2 and len(stderr) > space // 2:
        cut = space - len(TRUNC_ERR) - len(TRUNC_OUT)
        return stdout[: cut // 2] + TRUNC_OUT + title + stderr[: cut // 2] + TRUNC_ERR
    if len(stdout) <= space // 2:
        cut = space - len(TRUNC_ERR)
        return stdout + title + stderr[: cut - len(stdout)] + TRUNC_ERR
    cut = space - len(TRUNC_OUT)
    return stdout[: cut - len(stderr)] + TRUNC_OUT + title + stderr


class Document:
    """A Command document: its parameters and how it becomes a script."""

    def __init__(self, name, content):
        self.name, self.content = name, content
        self.parameters = content.get("parameters") or {}
        if name != "AWS-RunShellScript":
            steps = content.get("mainSteps") or []
            if content.get("schemaVersion") != "2.2" or len(steps) != 1 or steps[0].get("action") != "aws:runShellScript":
                raise ApiError("InvalidDocumentContent", "this emulator runs schemaVersion 2.2 documents of one aws:runShellScript step")
            for p in self.parameters:
                if not re.fullmatch(r"[a-zA-Z0-9]+", p):
                    raise ApiError("InvalidDocumentContent", f"parameter name {p!r}: letters and digits only")

    def resolve(self, given):
        """Checks the parameters as SSM does and returns (script, execution timeout)."""
        values = {}
        for name, value in (given or {}).items():
            if name not in self.parameters:
                raise ApiError("InvalidParameters", f"Parameter {name!r} is not defined in document {self.name}")
            values[name] = value
        for name, spec in self.parameters.items():
            if name not in values:
                if "default" not in spec:
                    raise ApiError("InvalidParameters", f"Parameter {name!r} is required by document {self.name}")
                values[name] = spec["default"] if spec.get("type") == "StringList" else [spec["default"]]
            vals = values[name] if isinstance(values[name], list) else [values[name]]
            if spec.get("type", "String") == "String" and len(vals) != 1:
                raise ApiError("InvalidParameters", f"Parameter {name!r} takes one value")
            for v in vals:
                if "allowedValues" in spec and v not in spec["allowedValues"]:
                    raise ApiError("InvalidParameters", f"Parameter {name!r} value {v!r} is not one of {spec['allowedValues']}")
                if "allowedPattern" in spec and not re.search(spec["allowedPattern"], v):
                    raise ApiError("InvalidParameters", f"Parameter {name!r} value {v!r} does not match the allowed pattern {spec['allowedPattern']}")
            values[name] = vals
        if self.name == "AWS-RunShellScript":
            timeout = int(values["executionTimeout"][0]) if values["executionTimeout"][0].isdigit() else 3600
            return "\n".join(values["commands"]) + "\n", timeout if 1 <= timeout <= 172800 else 3600

        def paste(text):
            return PARAM_REF.sub(lambda m: values[m.group(1)][0].replace("$$", "$") if m.group(1) in values else m.group(0), text)

        inputs = self.content["mainSteps"][0].get("inputs") or {}
        script = "\n".join(paste(line) for line in inputs.get("runCommand") or []) + "\n"
        timeout = paste(str(inputs.get("timeoutSeconds", "3600")))
        return script, int(timeout) if timeout.isdigit() and 1 <= int(timeout) <= 172800 else 3600


class Invocation:
    def __init__(self, command, instance_id):
        self.command, self.instance_id = command, instance_id
        self.status, self.details = "Pending", "Pending"
        self.code = -1
        self.stdout = self.stderr = ""
        self.start = self.end = None
        self.proc = None  # the running script, for CancelCommand and expiry
        self.cancel_requested = False

    def finish(self, status, details, code, stdout="", stderr=""):
        """Ends the invocation once; later attempts (a kill racing the end) are ignored."""
        with self.command.world.lock:
            if self.status in TERMINAL:
                return False
            self.status, self.details, self.code = status, details, code
            self.stdout, self.stderr = stdout, stderr
            self.end = time.time()
        self.command.world.log_invocation(self)
        return True

    def stop(self, status, details):
        """SIGKILLs the running script's process group (`execute` then
        records how it ended) or, when nothing runs there (not delivered, a
        dead or simulated agent), ends the invocation now."""
        if self.status in TERMINAL:
            return
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            self.finish(status, details, -1)

    def visible(self, now):
        """What GetCommandInvocation shows: the final state only once the output lag has passed."""
        if self.status in TERMINAL and now < self.end + self.command.world.output_lag:
            return "InProgress", "InProgress", -1, "", ""
        return self.status, self.details, self.code, self.stdout, self.stderr


class Command:
    def __init__(self, world, req, instance_ids, document):
        self.world = world
        self.id = str(uuid.uuid4())
        self.req = req
        self.requested = time.time()
        self.script, self.timeout = document.resolve(req.get("Parameters"))
        delivery = req.get("TimeoutSeconds", 3600)
        if not 30 <= delivery <= 2592000:
            raise ApiError("ValidationException", f"TimeoutSeconds {delivery}: must be between 30 and 2592000")
        self.expires_at = self.requested + delivery + self.timeout
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
        return sum(1 for v in self.invocations.values() if v.status == "Failed" or v.details == "ExecutionTimedOut")

    def status(self):
        states = [v.status for v in self.invocations.values()]
        if all(s == "Pending" for s in states):
            return "Pending", "Pending"
        if not all(s in TERMINAL for s in states):
            return "InProgress", "InProgress"
        if all(s == "Success" for s in states):
            return "Success", "Success"
        if self.errors() > self.max_errors:
            return "Failed", "Failed"
        return "Failed", "Incomplete"

    def run(self):
        """Starts invocations, MaxConcurrency at a time, until done or
        MaxErrors is exceeded (then the rest are Cancelled)."""
        for inv in self.invocations.values():
            while True:
                with self.world.lock:
                    running = sum(1 for v in self.invocations.values() if v.status == "InProgress")
                if self.errors() > self.max_errors or self.cancelled or inv.status in TERMINAL or running < self.max_concurrency:
                    break
                time.sleep(0.02)
            if inv.status in TERMINAL:  # expired while queued
                continue
            if self.errors() > self.max_errors or self.cancelled:
                inv.finish("Cancelled", "Cancelled", -1)
                continue
            self.world.deliver(inv)

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
            "ExpiresAfter": self.expires_at,
            "Status": status,
            "StatusDetails": details,
            "MaxConcurrency": self.max_concurrency_text,
            "MaxErrors": self.max_errors_text,
            "TargetCount": len(self.invocations),
            "CompletedCount": sum(1 for v in vals if v.status in TERMINAL),
            "ErrorCount": self.errors(),
            "DeliveryTimedOutCount": sum(1 for v in vals if v.details == "DeliveryTimedOut"),
            "TimeoutSeconds": self.req.get("TimeoutSeconds", 3600),
        }


class RateLimit:
    """A token bucket: `rate` requests a second, bursts of twice that."""

    def __init__(self, rate):
        self.rate, self.tokens, self.at = rate, 2 * rate, time.monotonic()
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            now = time.monotonic()
            self.tokens = min(2 * self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


class World:
    def __init__(self, root, rate_limit=None):
        self.root = root
        self.lock = threading.Lock()  # guards every Command and Invocation
        self.commands = {}
        # name -> [version 1, 2, ...] and name -> its default version (as
        # SSM: UpdateDocument adds a version; the default moves only when
        # told, so SendCommand without DocumentVersion runs the old one).
        self.documents = {"AWS-RunShellScript": [Document("AWS-RunShellScript", RUN_SHELL_SCRIPT)]}
        self.default_version = {"AWS-RunShellScript": 1}
        self.invocation_delay = float(os.environ.get("FLEETSYNC_SSM_INVOCATION_DELAY", "0.5"))
        self.output_lag = float(os.environ.get("FLEETSYNC_SSM_OUTPUT_LAG", "0.5"))
        self.cancel_delay = float(os.environ.get("FLEETSYNC_SSM_CANCEL_DELAY", "1"))
        self.rate_limit = RateLimit(rate_limit) if rate_limit else None
        self.throttled = 0
        self.requests = {}  # operation -> requests seen
        # Simulated invocations end on this heap (time, seq, invocation), so
        # thousands of them need no thread each.
        self.timers, self.timer_seq, self.timer_wake = [], 0, threading.Condition(self.lock)
        self.ec2 = boto3.client(
            "ec2",
            endpoint_url=os.environ["FLEETSYNC_MOTO"],
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        os.makedirs(os.path.join(root, "instances"), exist_ok=True)
        threading.Thread(target=self.expire_forever, daemon=True).start()
        threading.Thread(target=self.timers_forever, daemon=True).start()

    def node_dir(self, instance_id):
        path = os.path.join(self.root, "instances", instance_id)
        return path if os.path.exists(os.path.join(path, "node.json")) else None

    def agent_state(self, node):
        """online, connection-lost or dead (see the module doc)."""
        try:
            return open(os.path.join(node, "ssm-agent")).read().strip() or "online"
        except FileNotFoundError:
            return "online"

    def record(self, entry):
        with self.lock, open(os.path.join(self.root, "calls.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    # -- operations ---------------------------------------------------------

    def FleetsyncEmulatorStats(self, req):
        with self.lock:
            return {"requests": dict(self.requests), "throttled": self.throttled}

    def FleetsyncEmulatorConfigure(self, req):
        rate = float(req.get("RateLimit") or 0)
        self.rate_limit = RateLimit(rate) if rate > 0 else None
        return {}

    def CreateDocument(self, req):
        name = req.get("Name", "")
        if not re.fullmatch(r"[a-zA-Z0-9_.-]{3,128}", name) or name.startswith(("AWS-", "aws-", "amazon")):
            raise ApiError("ValidationException", f"document name {name!r} is not valid")
        if req.get("DocumentType", "Command") != "Command":
            raise ApiError("InvalidDocumentType", "this emulator runs Command documents only")
        content = yaml.safe_load(req.get("Content", "")) if req.get("DocumentFormat") == "YAML" else json.loads(req.get("Content", "{}"))
        doc = Document(name, content)
        with self.lock:
            if name in self.documents:
                raise ApiError("DocumentAlreadyExists", f"document {name} already exists")
            self.documents[name], self.default_version[name] = [doc], 1
        return {"DocumentDescription": self.describe_document(name)}

    def UpdateDocument(self, req):
        """A new version of the document (only the latest may be updated);
        its default version stays where it was."""
        name = req.get("Name", "")
        content = yaml.safe_load(req.get("Content", "")) if req.get("DocumentFormat") == "YAML" else json.loads(req.get("Content", "{}"))
        with self.lock:
            versions = self.documents.get(name)
            if versions is None or name.startswith("AWS-"):
                raise ApiError("InvalidDocument", f"Document with name {name!r} does not exist")
            if req.get("DocumentVersion", "$LATEST") not in ("$LATEST", str(len(versions))):
                raise ApiError("InvalidDocumentOperation", "only the latest version of a document can be updated")
            versions.append(Document(name, content))
            return {"DocumentDescription": self.describe_document(name)}

    def describe_document(self, name, version=None):
        versions = self.documents[name]
        number = int(version) if version else self.default_version[name]
        parameters = [{"Name": k, "Type": v.get("type", "String"), "Description": v.get("description", ""),
                       **({"DefaultValue": v["default"]} if "default" in v else {})}
                      for k, v in versions[number - 1].parameters.items()]
        return {"Name": name, "DocumentType": "Command", "Status": "Active", "SchemaVersion": "2.2",
                "DocumentVersion": str(number), "LatestVersion": str(len(versions)),
                "DefaultVersion": str(self.default_version[name]), "Parameters": parameters}

    def DescribeDocument(self, req):
        """As SSM's: the document's default version, or the one asked for
        ($LATEST or a number), with its parameters."""
        name, wanted = req.get("Name"), req.get("DocumentVersion")
        with self.lock:
            versions = self.documents.get(name)
            if versions is None:
                raise ApiError("InvalidDocument", f"Document with name {name!r} does not exist")
            number = len(versions) if wanted == "$LATEST" else wanted
            if number is not None and not (str(number).isdigit() and 1 <= int(number) <= len(versions)):
                raise ApiError("InvalidDocumentVersion", f"document {name} has no version {wanted}")
            return {"Document": self.describe_document(name, number)}

    def SendCommand(self, req):
        name, wanted = req.get("DocumentName"), req.get("DocumentVersion") or "$DEFAULT"
        with self.lock:
            versions = self.documents.get(name)
            if versions is None:
                raise ApiError("InvalidDocument", f"Document with name {name!r} does not exist")
            number = len(versions) if wanted == "$LATEST" else self.default_version[name] if wanted == "$DEFAULT" else wanted
            if not str(number).isdigit() or not 1 <= int(number) <= len(versions):
                raise ApiError("InvalidDocumentVersion", f"document {name} has no version {wanted}")
            doc = versions[int(number) - 1]
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
            raise ApiError("InvalidInstanceId", f"Instances [{unregistered}] not in a valid state for account 123456789012")
        cmd = Command(self, req, list(dict.fromkeys(ids)), doc)
        with self.lock:
            self.commands[cmd.id] = cmd
        self.record({"op": "SendCommand", "command_id": cmd.id, "instance_ids": list(cmd.invocations), "document": doc.name,
                     "parameters": req.get("Parameters") or {}, "max_concurrency": cmd.max_concurrency_text,
                     "max_errors": cmd.max_errors_text, "timeout": cmd.timeout, "delivery_timeout": req.get("TimeoutSeconds", 3600),
                     "time": cmd.requested})
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
            now = time.time()
            if inv is None or now < cmd.visible_at:
                raise ApiError("InvocationDoesNotExist", "")
            status, details, code, stdout, stderr = inv.visible(now)
            fmt = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z" if t else ""
            return {
                "CommandId": cmd.id,
                "InstanceId": inv.instance_id,
                "Comment": cmd.req.get("Comment", ""),
                "DocumentName": cmd.req.get("DocumentName"),
                "PluginName": "aws:runShellScript",
                "ResponseCode": code,
                "ExecutionStartDateTime": fmt(inv.start),
                "ExecutionEndDateTime": fmt(inv.end) if status in TERMINAL else "",
                "ExecutionElapsedTime": "",
                "Status": status,
                "StatusDetails": details,
                "StandardOutputContent": stdout[:STDOUT_GET],
                "StandardOutputUrl": "",
                "StandardErrorContent": stderr[:STDERR_GET],
                "StandardErrorUrl": "",
            }

    def ListCommandInvocations(self, req):
        with self.lock:
            if req.get("CommandId"):
                cmds = [self.command(req)]
            else:
                cmds = list(self.commands.values())
            now = time.time()
            # Right after SendCommand the list is empty, as on AWS.
            rows = [(c, v) for c in cmds if now >= c.visible_at for v in c.invocations.values()
                    if not req.get("InstanceId") or v.instance_id == req["InstanceId"]]
            start = int(req.get("NextToken") or 0)
            size = int(req.get("MaxResults") or 50)
            if not 1 <= size <= 50:
                raise ApiError("ValidationException", "MaxResults must be between 1 and 50")
            page = rows[start:start + size]
            out = []
            for c, v in page:
                item = {
                    "CommandId": c.id,
                    "InstanceId": v.instance_id,
                    "InstanceName": "",
                    "Comment": c.req.get("Comment", ""),
                    "DocumentName": c.req.get("DocumentName"),
                    "RequestedDateTime": c.requested,
                    "Status": v.status,
                    "StatusDetails": v.details,
                    "StandardOutputUrl": "",
                    "StandardErrorUrl": "",
                    "CommandPlugins": [],
                }
                if req.get("Details"):
                    plugin = {"Name": "aws:runShellScript", "Status": v.status, "StatusDetails": v.details,
                              "ResponseCode": v.code, "Output": plugin_output(v.stdout, v.stderr)}
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
            running = [v for v in cmd.invocations.values() if v.status in ("InProgress", "Pending")]
            for v in running:
                v.cancel_requested = True
        self.record({"op": "CancelCommand", "command_id": cmd.id, "time": time.time()})
        for v in running:
            with self.lock:
                if v.status == "InProgress":
                    v.status = v.details = "Cancelling"
            threading.Timer(self.cancel_delay, v.stop, ("Cancelled", "Cancelled")).start()
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
        size = int(req.get("MaxResults") or 10)
        if not 5 <= size <= 50:
            raise ApiError("ValidationException", "MaxResults must be between 5 and 50")
        found = [i for i in ids if self.node_dir(i)]
        start = int(req.get("NextToken") or 0)
        page = []
        for i in found[start:start + size]:
            ping = "ConnectionLost" if self.agent_state(self.node_dir(i)) == "connection-lost" else "Online"
            page.append({"InstanceId": i, "PingStatus": ping, "PlatformType": "Linux", "AgentVersion": "3.3.0.0-fleetsync-emulator",
                         "ResourceType": "EC2Instance", "LastPingDateTime": time.time()})
        resp = {"InstanceInformationList": page}
        if start + size < len(found):
            resp["NextToken"] = str(start + size)
        return resp

    # -- running a script on a node ------------------------------------------

    def deliver(self, inv):
        """Hands the invocation to the instance's SSM agent, as it behaves."""
        node = self.node_dir(inv.instance_id)
        if node is None:  # deregistered since SendCommand: the agent went away
            inv.finish("Failed", "Undeliverable", -1)
            return
        state = self.agent_state(node)
        if state == "connection-lost":
            return  # stays Pending until the command expires
        with self.lock:
            if inv.status in TERMINAL:  # cancelled or expired meanwhile
                return
            cancelled = inv.cancel_requested
            if not cancelled:
                inv.status, inv.details, inv.start = "InProgress", "InProgress", time.time()
        if cancelled:  # CancelCommand came while it was being delivered
            inv.finish("Cancelled", "Cancelled", -1)
            return
        if state == "dead":
            return  # InProgress until the command expires
        info = json.load(open(os.path.join(node, "node.json")))
        if info.get("simulated"):
            with self.lock:
                self.timer_seq += 1
                heapq.heappush(self.timers, (time.time() + info.get("simulated_ms", 1000) / 1000, self.timer_seq, inv))
                self.timer_wake.notify()
            return
        threading.Thread(target=self.execute, args=(inv, node, info), daemon=True).start()

    def execute(self, inv, node, info):
        cmd = inv.command
        work = os.path.join(node, "ssm", cmd.id)
        os.makedirs(work, exist_ok=True)
        script = os.path.join(work, "_script.sh")
        with open(script, "w") as f:
            f.write(cmd.script)
        os.chmod(script, 0o700)
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # The SSM agent runs `sh -c <script>`; this runs `sh <script>`,
            # the same for the sh scripts fleetsync sends, without exec'ing
            # a file another thread's fork may still hold open for writing
            # (ETXTBSY).
            proc = inv.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 'mount --bind "$1" /srv && cd / && exec sh "$2"', "sh", info["root"], script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=info["env"], start_new_session=True,
            )
            remaining = max(0.0, min(cmd.timeout, cmd.expires_at - time.time()))
            timed_out = False
            try:
                code = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, timed_out = proc.wait(), True
        stdout = open(out_path, "rb").read()
        stderr = open(err_path, "rb").read()
        if self.agent_state(node) == "dead":
            # The instance vanished (a scale-in terminated it) or its agent
            # died while the script ran: nobody reports the end, and SSM
            # shows InProgress until the command expires.
            return
        if inv.cancel_requested:
            code, status = -1, ("Cancelled", "Cancelled")
        elif timed_out:  # SIGKILLed by the execution timeout, or at the command's expiry
            expired = time.time() >= cmd.expires_at - 0.05
            code, status = -1, ("TimedOut", "DeliveryTimedOut" if expired else "ExecutionTimedOut")
        elif code < 0 or code == 137:
            # Killed by something else (the OOM killer, a person): the SSM
            # agent reports the shell's 137 as any other failure.
            code, status = 137, ("Failed", "Failed")
            stderr += f"failed to run commands: exit status {code}".encode()
        elif code != 0:
            status = ("Failed", "Failed")
            stderr += f"failed to run commands: exit status {code}".encode()
        else:
            status = ("Success", "Success")
        inv.finish(status[0], status[1], code, agent_truncate(stdout), agent_truncate(stderr))

    def timers_forever(self):
        """Ends simulated invocations when their time comes."""
        while True:
            with self.lock:
                while not self.timers or self.timers[0][0] > time.time():
                    self.timer_wake.wait(timeout=None if not self.timers else max(0.0, self.timers[0][0] - time.time()))
                _, _, inv = heapq.heappop(self.timers)
            if inv.status != "InProgress":
                continue
            cmd = inv.command
            now_ms = int(time.time() * 1000)
            report = {
                "status": "ok", "exit_code": 0, "source": "s3://simulated/app/", "dest": "/srv/www", "dry_run": False,
                "coalesced": False, "started_at_ms": int(inv.start * 1000), "finished_at_ms": now_ms,
                "counts": {"listed": 1000, "downloaded": 10, "deleted": 0, "unchanged": 990, "failed": 0, "repaired": 0,
                           "vanished": 0, "replanned": 0, "retries": 0},
                "bytes_downloaded": 40960, "durations": {"lock_wait_ms": 0, "total_ms": now_ms - int(inv.start * 1000)},
                "simulated": True,
            }
            inv.finish("Success", "Success", 0, json.dumps(report) + "\n", "simulated by ssm_emulator.py\n")

    def expire_forever(self):
        """A command's invocations still Pending or InProgress when it expires end DeliveryTimedOut."""
        while True:
            time.sleep(0.1)
            now = time.time()
            with self.lock:
                expired = [v for c in self.commands.values() if c.expires_at <= now
                           for v in c.invocations.values() if v.status in ("Pending", "InProgress", "Delayed")]
            for v in expired:
                v.stop("TimedOut", "DeliveryTimedOut")

    def log_invocation(self, inv):
        self.record({"op": "invocation", "command_id": inv.command.id, "instance_id": inv.instance_id,
                     "status": inv.status, "details": inv.details, "start": inv.start, "end": inv.end})


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
            with self.world.lock:
                self.world.requests[op] = self.world.requests.get(op, 0) + 1
            if not op.startswith("FleetsyncEmulator") and self.world.rate_limit is not None and not self.world.rate_limit.take():
                with self.world.lock:
                    self.world.throttled += 1
                raise ApiError("ThrottlingException", "Rate exceeded")
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
    ap.add_argument("--rate-limit", type=float, default=float(os.environ.get("FLEETSYNC_SSM_RATE_LIMIT") or 0) or None,
                    help="requests a second before ThrottlingException (burst twice that)")
    a = ap.parse_args()
    Handler.world = World(a.dir, a.rate_limit)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
