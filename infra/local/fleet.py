#!/usr/bin/env python3
"""Shapes Auto Scaling Groups in the local world's moto server.

Every group lives in one VPC 127.0.0.0/16 with one subnet 127.0.1.0/24, so
moto hands its instances private IPs 127.0.1.4, .5, ... that Linux routes
to the loopback interface: a listener bound to an instance's address is
reachable, which is how later steps give each instance its own sshd.

    fleet.py network                      # create the VPC and subnet (idempotent)
    fleet.py create NAME --size N         # a group of N InService instances; prints JSON
    fleet.py describe NAME                # the group's instances; prints JSON
    fleet.py health INSTANCE Unhealthy    # SetInstanceHealth
    fleet.py standby NAME INSTANCE        # EnterStandby (moto launches a replacement)
    fleet.py scale NAME N                 # SetDesiredCapacity
    fleet.py terminate INSTANCE           # TerminateInstanceInAutoScalingGroup

Reads FLEETSYNC_MOTO for the endpoint.
"""
import argparse
import json
import os

import boto3

TAG = "fleetsync-local"


def clients():
    kw = dict(
        endpoint_url=os.environ["FLEETSYNC_MOTO"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return boto3.client("ec2", **kw), boto3.client("autoscaling", **kw)


def network(ec2):
    subnets = ec2.describe_subnets(Filters=[{"Name": "tag:Name", "Values": [TAG]}])["Subnets"]
    if subnets:
        return subnets[0]["SubnetId"]
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    sub = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.1.0/24")["Subnet"]["SubnetId"]
    ec2.create_tags(Resources=[vpc, sub], Tags=[{"Key": "Name", "Value": TAG}])
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("network")
    c = sub.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", type=int, default=3)
    sub.add_parser("describe").add_argument("name")
    h = sub.add_parser("health")
    h.add_argument("instance")
    h.add_argument("status", choices=["Healthy", "Unhealthy"])
    s = sub.add_parser("standby")
    s.add_argument("name")
    s.add_argument("instance")
    sc = sub.add_parser("scale")
    sc.add_argument("name")
    sc.add_argument("size", type=int)
    sub.add_parser("terminate").add_argument("instance")
    a = ap.parse_args()

    ec2, asg = clients()
    if a.cmd == "network":
        print(network(ec2))
        return
    if a.cmd == "create":
        subnet = network(ec2)
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
