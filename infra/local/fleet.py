#!/usr/bin/env python3
"""Shapes Auto Scaling Groups in the local world's moto server.

Every group lives in one VPC 127.0.0.0/16 with one subnet 127.0.1.0/24, so
moto hands its instances private IPs 127.0.1.4, .5, ... that Linux routes
to the loopback interface: a listener bound to an instance's address is
reachable, which is how later steps give each instance its own sshd.

    fleet.py network                      # create the VPC and subnet (idempotent)
    fleet.py create NAME --size N [--subnet K[-L]]  # N InService instances in 127.0.K.0/24 (..L); prints JSON
    fleet.py describe NAME                # the group's instances; prints JSON
    fleet.py health INSTANCE Unhealthy    # SetInstanceHealth
    fleet.py standby NAME INSTANCE        # EnterStandby (moto launches a replacement)
    fleet.py launch-hook NAME             # PutLifecycleHook fleetsync-first-pull, as the templates make it
    fleet.py scale NAME N                 # SetDesiredCapacity
    fleet.py terminate INSTANCE           # TerminateInstanceInAutoScalingGroup
    fleet.py nodes-up NAME --dir DIR [--no-sshd] [--simulated MS] [--env K=V ...]  # a node root (and sshd) per InService instance
    fleet.py nodes-down --dir DIR         # stops them
    fleet.py ssm-deregister INSTANCE      # the instance's SSM agent is gone (not managed any more)
    fleet.py ssm-agent INSTANCE STATE     # online | connection-lost | dead (Online, but runs nothing)
    fleet.py document-update NAME [--drop-parameter P]  # a new document version (P left out: an older document)

Each node is a real OpenSSH sshd bound to its instance's private IP (port
FLEETSYNC_SSH_PORT), started in a private mount namespace where the node's
own directory DIR/<instance-id>/srv is bind-mounted over /srv: every node has
its own /srv (DEST and state dir), the host's /srv is untouched, and a
command sent to a node needs no path of its own. Host keys are generated
per node and written to DIR/known_hosts; DIR/ssh_config points the system
ssh client at them (`ssh -F DIR/ssh_config 127.0.1.4 ...`). The node's
sessions get the world's S3 endpoint and credentials through SetEnv, as an
instance would get them from its role, and find fleetsync-agent on PATH.

Each node is also registered with the SSM emulator (FLEETSYNC_SSM_DIR): its
node.json holds the root and environment, and a link to the node directory
in FLEETSYNC_SSM_DIR/instances/ is what "the SSM agent runs" means there. So
SSM commands and SSH sessions see the same /srv. `--no-sshd` registers the
node for SSM only (large fleets that are only reached over SSM);
`--simulated MS` registers it as a simulated instance, whose SSM agent
answers after MS milliseconds with a canned report (the scale benchmark).

`create` also creates the group's SSM Command document
`fleetsync-agent-NAME` in the SSM emulator from
infra/aws/ssm-agent-document.yaml, as the CloudFormation stack does.

Reads FLEETSYNC_MOTO for the endpoint.
"""
import argparse
import json
import os
import signal
import subprocess
import time

import boto3
import yaml

TAG = "fleetsync-local"
DOCUMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "aws", "ssm-agent-document.yaml")


def clients():
    kw = dict(
        endpoint_url=os.environ["FLEETSYNC_MOTO"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return boto3.client("ec2", **kw), boto3.client("autoscaling", **kw)


def network(ec2, k=1, bits=24):
    """The subnet 127.0.K.0/BITS (created on first use). A /24 holds about
    250 instances over a world's life (moto never reuses an address, and
    puts a group's instances in its first subnet), so large groups take a
    subnet of their own, and thousands a /20."""
    name = TAG if k == 1 else f"{TAG}-{k}"
    cidr = [{"Name": "cidr-block", "Values": [f"127.0.{k}.0/{bits}"]}]
    subnets = ec2.describe_subnets(Filters=cidr)["Subnets"]
    if subnets:
        return subnets[0]["SubnetId"]
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": [TAG]}])["Vpcs"]
    if vpcs:
        vpc = vpcs[0]["VpcId"]
    else:
        vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
        ec2.create_tags(Resources=[vpc], Tags=[{"Key": "Name", "Value": TAG}])
    try:
        sub = ec2.create_subnet(VpcId=vpc, CidrBlock=f"127.0.{k}.0/{bits}")["Subnet"]["SubnetId"]
    except ec2.exceptions.ClientError as e:
        if e.response["Error"]["Code"] != "InvalidSubnet.Conflict":
            raise
        # Another test created it a moment ago: use theirs.
        for _ in range(50):
            found = ec2.describe_subnets(Filters=cidr)["Subnets"]
            if found:
                return found[0]["SubnetId"]
            time.sleep(0.1)
        raise
    ec2.create_tags(Resources=[sub], Tags=[{"Key": "Name", "Value": name}])
    return sub


def describe(ec2, asg, name):
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    ips = {}
    ids = [i["InstanceId"] for i in group["Instances"]]
    if ids:
        for page in ec2.get_paginator("describe_instances").paginate(InstanceIds=ids):
            for res in page["Reservations"]:
                for i in res["Instances"]:
                    ips[i["InstanceId"]] = i.get("PrivateIpAddress")
    return {
        "group": name,
        "instances": [
            {"id": i["InstanceId"], "ip": ips.get(i["InstanceId"]), "lifecycle": i["LifecycleState"], "health": i["HealthStatus"]}
            for i in group["Instances"]
        ],
    }


# What a node's sessions inherit, as an instance would from its role/config.
NODE_ENV = ["AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED"]


def create_document(name):
    """The group's SSM Command document, as the CloudFormation stack makes it."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_SSM")
    if not endpoint:
        return
    ssm = boto3.client("ssm", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    content = yaml.safe_load(open(DOCUMENT))
    ssm.create_document(Name=f"fleetsync-agent-{name}", DocumentType="Command", DocumentFormat="JSON", Content=json.dumps(content))


def update_document(name, drop=None):
    """A new version of the group's document, as a stack update makes it
    (UpdateMethod: NewVersion): the same, but it first marks the node
    (`/srv/.ssm-document-version-2`), so a test sees which version ran.
    `drop`: a parameter left out, with the lines that use it (a document
    from before that parameter existed)."""
    ssm = boto3.client("ssm", endpoint_url=os.environ["AWS_ENDPOINT_URL_SSM"], region_name=os.environ.get("AWS_REGION", "us-east-1"),
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    content = yaml.safe_load(open(DOCUMENT))
    step = content["mainSteps"][0]["inputs"]
    step["runCommand"] = [": > /srv/.ssm-document-version-2"] + list(step["runCommand"])
    if drop:
        del content["parameters"][drop]
        step["runCommand"] = [line for line in step["runCommand"] if "{{ %s }}" % drop not in line]
    out = ssm.update_document(Name=f"fleetsync-agent-{name}", DocumentFormat="JSON", Content=json.dumps(content), DocumentVersion="$LATEST")
    return out["DocumentDescription"]


def nodes_up(ec2, asg, name, root, sshd=True, simulated=None, extra_env=()):
    port = int(os.environ["FLEETSYNC_SSH_PORT"])
    os.makedirs(root, exist_ok=True)
    client_key = os.path.join(root, "id_ed25519")
    if not os.path.exists(client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", client_key], check=True)
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    agent_dir = os.environ.get("FLEETSYNC_AGENT_DIR", "")
    env = {k: os.environ[k] for k in NODE_ENV if k in os.environ}
    # /srv/bin first: the node's own install (/usr/local/bin on an instance),
    # where a test puts a different agent on one node.
    env["PATH"] = ":".join(p for p in ["/srv/bin", agent_dir, "/usr/local/bin", "/usr/bin", "/bin"] if p)
    env["HOME"] = "/root"
    # The agent's default state dir (/var/lib/fleetsync on a real instance)
    # is inside the node's own root, so nodes never share a lock or a record.
    env["FLEETSYNC_STATE_DIR"] = "/srv/state"
    # ...and its /etc/fleetsync/agent.toml is /srv/etc/fleetsync/agent.toml
    # (empty unless a test writes one).
    env["FLEETSYNC_AGENT_CONFIG"] = "/srv/etc/fleetsync/agent.toml"
    # --env: what a test changes about the nodes (say, S3 through a proxy).
    env.update(kv.split("=", 1) for kv in extra_env)
    ssm_dir = os.environ.get("FLEETSYNC_SSM_DIR")
    nodes = []
    for inst in describe(ec2, asg, name)["instances"]:
        if inst["lifecycle"] != "InService" or not inst["ip"]:
            continue
        node = os.path.join(root, inst["id"])
        if os.path.exists(os.path.join(node, "sshd.pid")) or (not sshd and os.path.exists(os.path.join(node, "node.json"))):
            continue  # already up
        os.makedirs(os.path.join(node, "srv", "etc", "fleetsync"), exist_ok=True)
        open(os.path.join(node, "srv", "etc", "fleetsync", "agent.toml"), "a").close()
        info = {"id": inst["id"], "ip": inst["ip"], "root": os.path.join(node, "srv"), "env": env}
        if simulated is not None:
            # Spread +-25% around MS, the same for an instance every time.
            spread = int(inst["id"][-6:], 16) % 1000 / 1000 - 0.5
            info.update(simulated=True, simulated_ms=int(simulated * (1 + spread / 2)))
        with open(os.path.join(node, "node.json"), "w") as f:
            json.dump(info, f)
        if ssm_dir:
            link = os.path.join(ssm_dir, "instances", inst["id"])
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(node), link)
        nodes.append({"id": inst["id"], "ip": inst["ip"], "root": os.path.join(node, "srv")})
        if not sshd:
            continue
        host_key = os.path.join(node, "host_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
        with open(os.path.join(node, "sshd_config"), "w") as f:
            f.write(
                f"ListenAddress {inst['ip']}:{port}\n"
                f"HostKey {host_key}\n"
                f"AuthorizedKeysFile {client_key}.pub\n"
                f"PidFile {node}/sshd.pid\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"SetEnv {' '.join(f'{k}={v}' for k, v in env.items())}\n"
            )
        with open(os.path.join(root, "known_hosts"), "a") as f:
            f.write(f"[{inst['ip']}]:{port} {' '.join(open(host_key + '.pub').read().split()[:2])}\n")
        log = open(os.path.join(node, "sshd.log"), "w")
        subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f'mount --bind "{node}/srv" /srv && exec /usr/sbin/sshd -D -e -f "{node}/sshd_config"'],
            stdout=log, stderr=log, start_new_session=True,
        )
    with open(os.path.join(root, "ssh_config"), "w") as f:
        f.write(
            f"Host 127.*\n  Port {port}\n  User root\n  IdentityFile {client_key}\n"
            f"  UserKnownHostsFile {root}/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
    # Ready when every node has written its pid file (sshd does so once listening).
    deadline = time.time() + 20
    for n in nodes if sshd else []:
        while not os.path.exists(os.path.join(root, n["id"], "sshd.pid")):
            if time.time() > deadline:
                raise SystemExit(f"sshd for {n['id']} did not start: see {root}/{n['id']}/sshd.log")
            time.sleep(0.05)
    return {"ssh_config": os.path.join(root, "ssh_config"), "port": port, "nodes": nodes}


def nodes_down(root):
    """Stops every node's sshd under root and waits for each to exit (sshd
    removes its own pid file as it goes), and deregisters the nodes from
    the SSM emulator."""
    pids = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        link = os.path.join(os.environ.get("FLEETSYNC_SSM_DIR", "/nonexistent"), "instances", entry)
        if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(os.path.join(root, entry)):
            os.unlink(link)
        try:
            pid = int(open(os.path.join(root, entry, "sshd.pid")).read())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, ValueError):
            pass
    deadline = time.time() + 5
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return {"stopped": len(pids)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("network")
    c = sub.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", type=int, default=3)
    c.add_argument("--subnet", default="1", help="K in 127.0.K.0/24, or K-L for several subnets (about 250 instances each)")
    c.add_argument("--subnet-bits", type=int, default=24, help="the subnets' prefix length (20 for thousands of instances)")
    sub.add_parser("describe").add_argument("name")
    h = sub.add_parser("health")
    h.add_argument("instance")
    h.add_argument("status", choices=["Healthy", "Unhealthy"])
    s = sub.add_parser("standby")
    s.add_argument("name")
    s.add_argument("instance")
    sub.add_parser("launch-hook", help="add the launch lifecycle hook the templates make").add_argument("name")
    sc = sub.add_parser("scale")
    sc.add_argument("name")
    sc.add_argument("size", type=int)
    sub.add_parser("terminate").add_argument("instance")
    nu = sub.add_parser("nodes-up")
    nu.add_argument("name")
    nu.add_argument("--dir", required=True)
    nu.add_argument("--no-sshd", action="store_true", help="register with the SSM emulator only")
    nu.add_argument("--simulated", type=int, metavar="MS", help="simulated instances: the SSM emulator answers for them after MS ms")
    nu.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable the nodes' sessions get")
    sub.add_parser("ssm-deregister").add_argument("instance")
    sa = sub.add_parser("ssm-agent")
    sa.add_argument("instance")
    sa.add_argument("state", choices=["online", "connection-lost", "dead"])
    sub.add_parser("nodes-down").add_argument("--dir", required=True)
    du = sub.add_parser("document-update")
    du.add_argument("name")
    du.add_argument("--drop-parameter")
    a = ap.parse_args()

    if a.cmd == "ssm-deregister":
        link = os.path.join(os.environ["FLEETSYNC_SSM_DIR"], "instances", a.instance)
        if os.path.lexists(link):
            os.unlink(link)
        return
    if a.cmd == "ssm-agent":
        node = os.path.realpath(os.path.join(os.environ["FLEETSYNC_SSM_DIR"], "instances", a.instance))
        with open(os.path.join(node, "ssm-agent"), "w") as f:
            f.write(a.state)
        return
    if a.cmd == "nodes-down":
        print(json.dumps(nodes_down(a.dir)))
        return
    if a.cmd == "document-update":
        print(json.dumps(update_document(a.name, a.drop_parameter)))
        return
    ec2, asg = clients()
    if a.cmd == "nodes-up":
        sshd = not a.no_sshd and a.simulated is None
        print(json.dumps(nodes_up(ec2, asg, a.name, a.dir, sshd=sshd, simulated=a.simulated, extra_env=a.env)))
        return
    if a.cmd == "network":
        print(network(ec2))
        return
    if a.cmd == "launch-hook":
        asg.put_lifecycle_hook(LifecycleHookName="fleetsync-first-pull", AutoScalingGroupName=a.name,
                               LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", HeartbeatTimeout=900, DefaultResult="ABANDON")
        print(json.dumps({"hook": "fleetsync-first-pull"}))
        return
    if a.cmd == "create":
        first, _, last = a.subnet.partition("-")
        subnet = ",".join(network(ec2, k, a.subnet_bits) for k in range(int(first), int(last or first) + 1))
        ec2.create_launch_template(
            LaunchTemplateName=a.name, LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"}
        )
        asg.create_auto_scaling_group(
            AutoScalingGroupName=a.name,
            LaunchTemplate={"LaunchTemplateName": a.name},
            MinSize=0,
            MaxSize=max(a.size, 1) * 2,
            DesiredCapacity=a.size,
            VPCZoneIdentifier=subnet,
        )
        create_document(a.name)
    elif a.cmd == "health":
        asg.set_instance_health(InstanceId=a.instance, HealthStatus=a.status)
        return
    elif a.cmd == "standby":
        asg.enter_standby(AutoScalingGroupName=a.name, InstanceIds=[a.instance], ShouldDecrementDesiredCapacity=True)
    elif a.cmd == "scale":
        asg.set_desired_capacity(AutoScalingGroupName=a.name, DesiredCapacity=a.size)
    elif a.cmd == "terminate":
        asg.terminate_instance_in_auto_scaling_group(InstanceId=a.instance, ShouldDecrementDesiredCapacity=True)
        return
    print(json.dumps(describe(ec2, asg, a.name)))


if __name__ == "__main__":
    main()
