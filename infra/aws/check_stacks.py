"""Deploys both CloudFormation templates into moto's CloudFormation, in
process (no server, no network), and checks what they made: the closest
stand-in for a real stack creation that runs here, so that a template error
cfn-lint cannot see (a Ref to nothing, a Sub of a missing name, a resource
that depends on one it cannot have) fails the test command.

- fleetsync.yaml, a new group: the stack completes; its group, launch
  template, node role, policies and SSM document exist.
- fleetsync-existing-group.yaml, beside a group that exists with its own
  launch template and instance role: the stack completes; the role gains
  the node policy (and the SSM grant), the document and the deploy policy
  exist, and the group itself is unchanged. Then the stack is deleted and
  the role is left as it was.

moto's CloudFormation skips resource types it does not implement (a
warning): those are listed here, so that a new resource moto cannot create
is noticed rather than silently untested.

Run by infra/aws/check with the project's venv (moto, boto3, PyYAML).
"""

import json
import logging
import os
import sys
import warnings

import boto3
import botocore.exceptions
import yaml
from moto import mock_aws

HERE = os.path.dirname(os.path.abspath(__file__))
REGION = "eu-west-1"
# What moto's CloudFormation does not implement; cfn-lint checks them.
NOT_IN_MOTO = {"AWS::AutoScaling::LifecycleHook", "AWS::EC2::SecurityGroupEgress", "AWS::IAM::OIDCProvider", "AWS::S3::BucketPolicy"}


def document_as_aws_makes_it():
    """AWS::SSM::Document: CloudFormation takes Content as an object and
    DocumentFormat defaults to JSON (the resource's documented default);
    moto 5.2 wants the format given and the content as text. Made as AWS
    makes it, so the templates need not differ from what AWS is given."""
    from moto.ssm.models import Document

    made = Document.create_from_cloudformation_json.__func__

    def create(cls, name, cloudformation_json, account_id, region_name, **kwargs):
        properties = cloudformation_json["Properties"]
        properties.setdefault("DocumentFormat", "JSON")
        if not isinstance(properties.get("Content"), str):
            properties["Content"] = json.dumps(properties["Content"])
        return made(cls, name, cloudformation_json, account_id, region_name, **kwargs)

    Document.create_from_cloudformation_json = classmethod(create)


def no_value_as_aws_drops_it():
    """AWS::NoValue in a list (a statement under Fn::If) removes the element
    in CloudFormation; moto 5.2 leaves a null there, which IAM then refuses."""
    from moto.cloudformation import parsing

    clean = parsing.clean_json

    def clean_json(resource_json, resources_map):
        cleaned = clean(resource_json, resources_map)
        if isinstance(resource_json, list) and isinstance(cleaned, list):
            return [v for v in cleaned if v is not None]
        return cleaned

    parsing.clean_json = clean_json


def fail(message):
    sys.exit(f"infra/aws/check_stacks.py: {message}")


def create(cfn, name, template, parameters):
    """Creates a stack and returns its resources, failing with moto's reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfn.create_stack(
                StackName=name,
                TemplateBody=open(os.path.join(HERE, template)).read(),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Capabilities=["CAPABILITY_IAM"],
            )
        except botocore.exceptions.ClientError as e:
            fail(f"{template}: the stack failed: {e}")
    skipped = {str(w.message).split("Tried to parse ")[1].split(" ")[0] for w in caught if "Tried to parse" in str(w.message)}
    if skipped - NOT_IN_MOTO:
        fail(f"{template}: moto could not create {sorted(skipped - NOT_IN_MOTO)}; test those another way and list them in NOT_IN_MOTO")
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    if stack["StackStatus"] != "CREATE_COMPLETE":
        fail(f"{template}: stack {stack['StackStatus']}: {stack.get('StackStatusReason')}")
    resources = cfn.list_stack_resources(StackName=name)["StackResourceSummaries"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources}, outputs


def new_group(session, vpc, subnets):
    cfn = session.client("cloudformation")
    ec2, elb = session.client("ec2"), session.client("elbv2")
    app_sg = ec2.create_security_group(GroupName="app", Description="database access", VpcId=vpc)["GroupId"]
    target_group = elb.create_target_group(Name="web", Protocol="HTTP", Port=80, VpcId=vpc)["TargetGroups"][0]["TargetGroupArn"]
    made, outputs = create(cfn, "web", "fleetsync.yaml", {
        "GroupName": "web", "VpcId": vpc, "SubnetIds": ",".join(subnets),
        "GitHubRepository": "example/app", "ExtraSecurityGroupIds": app_sg,
        "TargetGroupArns": target_group,
    })
    for logical in ("SourceBucket", "NodeRole", "DeployPolicy", "DistPolicy", "AgentDocument", "LaunchTemplate", "Group", "GitHubDeployRole"):
        if logical not in made:
            fail(f"fleetsync.yaml: the stack made no {logical} (made {sorted(made)})")
    groups = session.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"]
    if len(groups) != 1:
        fail("fleetsync.yaml: no group web after the stack")
    if groups[0]["TargetGroupARNs"] != [target_group] or groups[0]["HealthCheckType"] != "ELB":
        fail(f"fleetsync.yaml: the group's target groups {groups[0]['TargetGroupARNs']}, health check {groups[0]['HealthCheckType']}")
    data = ec2.describe_launch_template_versions(LaunchTemplateId=made["LaunchTemplate"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    if len(data["SecurityGroupIds"]) != 2 or app_sg not in data["SecurityGroupIds"]:
        fail(f"fleetsync.yaml: the instances' security groups are {data['SecurityGroupIds']}, not the stack's and {app_sg}")
    session.client("ssm").get_document(Name="fleetsync-agent-web")
    if not outputs.get("SourceUrl", "").startswith("s3://"):
        fail(f"fleetsync.yaml: SourceUrl output {outputs.get('SourceUrl')!r}")


def existing_group(session, subnets):
    iam, asg, ssm, ec2 = (session.client(s) for s in ("iam", "autoscaling", "ssm", "ec2"))
    # The fleet as an operator already runs it: a role, its profile, a
    # launch template, a group; an existing bucket.
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    iam.create_role(RoleName="shop-web", AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(RoleName="shop-web", PolicyName="app", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "*"}]}))
    iam.create_instance_profile(InstanceProfileName="shop-web")
    iam.add_role_to_instance_profile(InstanceProfileName="shop-web", RoleName="shop-web")
    ec2.create_launch_template(LaunchTemplateName="shop", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.small"})
    asg.create_auto_scaling_group(AutoScalingGroupName="shop", LaunchTemplate={"LaunchTemplateName": "shop"},
                                  MinSize=2, MaxSize=4, DesiredCapacity=2, VPCZoneIdentifier=subnets[0])
    session.client("s3").create_bucket(Bucket="shop-code", CreateBucketConfiguration={"LocationConstraint": REGION})
    sg = ec2.create_security_group(GroupName="shop-web", Description="shop web")["GroupId"]
    before = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["shop"])["AutoScalingGroups"][0]

    cfn = session.client("cloudformation")
    made, outputs = create(cfn, "shop-fleetsync", "fleetsync-existing-group.yaml", {
        "GroupName": "shop", "InstanceRoleName": "shop-web", "ExistingBucket": "shop-code",
        "LaunchHook": "true", "NodeSecurityGroupId": sg, "GitHubRepository": "example/shop",
    })
    for logical in ("NodePolicy", "NodeSsmPolicy", "DeployPolicy", "DistPolicy", "AgentDocument", "GitHubDeployRole"):
        if logical not in made:
            fail(f"fleetsync-existing-group.yaml: the stack made no {logical} (made {sorted(made)})")
    if "SourceBucket" in made:
        fail("fleetsync-existing-group.yaml: made a bucket although ExistingBucket was given")
    policies = set(iam.list_role_policies(RoleName="shop-web")["PolicyNames"])
    if policies != {"app", "fleetsync-node-shop", "fleetsync-node-ssm-shop"}:
        fail(f"fleetsync-existing-group.yaml: the instance role's policies are {sorted(policies)}")
    node = iam.get_role_policy(RoleName="shop-web", PolicyName="fleetsync-node-shop")["PolicyDocument"]
    node = node if isinstance(node, dict) else json.loads(node)
    grants = {s["Sid"]: s for s in node["Statement"]}
    want = "arn:aws:s3:::shop-code/app/*"
    if want not in grants["ReadTheSourceAndDist"]["Resource"]:
        fail(f"fleetsync-existing-group.yaml: the node may not read {want}: {grants['ReadTheSourceAndDist']}")
    if not grants["CompleteOwnLaunchHook"]["Resource"].endswith("autoScalingGroupName/shop"):
        fail(f"fleetsync-existing-group.yaml: the launch hook grant names {grants['CompleteOwnLaunchHook']['Resource']}")
    document = ssm.get_document(Name="fleetsync-agent-shop")
    content = yaml.safe_load(document["Content"]) if document["DocumentFormat"] == "YAML" else json.loads(document["Content"])
    if content != yaml.safe_load(open(os.path.join(HERE, "ssm-agent-document.yaml"))):
        fail("fleetsync-existing-group.yaml: the SSM document differs from ssm-agent-document.yaml")
    for key in ("SourceUrl", "DistUrl", "DeployPolicyArn", "DistPolicyArn", "GitHubDeployRoleArn", "UserDataExports"):
        if key not in outputs:
            fail(f"fleetsync-existing-group.yaml: no {key} output (outputs: {sorted(outputs)})")
    if outputs["SourceUrl"] != "s3://shop-code/app" or "FLEETSYNC_GROUP='shop'" not in outputs["UserDataExports"]:
        fail(f"fleetsync-existing-group.yaml: outputs {outputs}")
    after = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["shop"])["AutoScalingGroups"][0]
    keep = ("LaunchTemplate", "MinSize", "MaxSize", "DesiredCapacity", "VPCZoneIdentifier")
    if any(before.get(k) != after.get(k) for k in keep):
        fail("fleetsync-existing-group.yaml: the stack changed the existing group")

    cfn.delete_stack(StackName="shop-fleetsync")
    left = set(iam.list_role_policies(RoleName="shop-web")["PolicyNames"])
    if left != {"app"}:
        fail(f"fleetsync-existing-group.yaml: deleting the stack left {sorted(left)} on the role")


def main():
    # In process only: an endpoint setting (a local world's, when run from
    # a shell that has one) would send boto3 past moto's mock to a server.
    for k in [k for k in os.environ if k.startswith("AWS_ENDPOINT_URL") or k == "AWS_PROFILE"]:
        os.environ.pop(k, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION)
    # moto says "not supported" again on each later read of a stack: the
    # creation's warnings are the ones checked against NOT_IN_MOTO.
    logging.getLogger("moto").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Tried to parse")
    document_as_aws_makes_it()
    no_value_as_aws_drops_it()
    with mock_aws():
        session = boto3.Session(region_name=REGION)
        ec2 = session.client("ec2")
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        subnets = [s["SubnetId"] for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]][:2]
        new_group(session, vpc, subnets)
        existing_group(session, subnets)
    print("infra/aws: both templates deploy into moto's CloudFormation", file=sys.stderr)


if __name__ == "__main__":
    main()
