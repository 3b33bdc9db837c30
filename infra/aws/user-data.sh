#!/bin/bash
# fleetsync node bootstrap, run once by cloud-init as EC2 user-data.
#
# Installs fleetsync-agent and its systemd unit and timer (from the bucket's
# dist/ prefix, where the operator uploads them), writes
# /etc/fleetsync/agent.toml, runs the first pull, and only then completes
# the Auto Scaling Group's launch lifecycle hook: an instance never enters
# service (or the load balancer) without the code. If anything fails, the
# hook is completed with ABANDON and the group replaces the instance.
#
# The CloudFormation template (fleetsync.yaml) embeds this file verbatim
# after a line that exports the variables below; CI checks that the two
# agree, and runs bash -n and shellcheck on this file.
set -euo pipefail

: "${FLEETSYNC_BUCKET:?the source bucket}"
: "${FLEETSYNC_PREFIX:?the source prefix}"
: "${FLEETSYNC_DEST:?the release-mode DEST, e.g. /var/www/app}"
: "${FLEETSYNC_GROUP:?the Auto Scaling Group}"
: "${FLEETSYNC_HOOK:?the launch lifecycle hook}"
: "${AWS_REGION:?the region}"
export AWS_REGION AWS_DEFAULT_REGION="$AWS_REGION"

imds() {
  local token
  token=$(curl -fsS -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
  curl -fsS -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}
INSTANCE_ID=$(imds instance-id)

complete_hook() {
  aws autoscaling complete-lifecycle-action --auto-scaling-group-name "$FLEETSYNC_GROUP" \
    --lifecycle-hook-name "$FLEETSYNC_HOOK" --instance-id "$INSTANCE_ID" --lifecycle-action-result "$1" || true
}
trap 'echo "fleetsync bootstrap failed; abandoning the launch" >&2; complete_hook ABANDON' ERR

dist="s3://$FLEETSYNC_BUCKET/dist"
aws s3 cp --only-show-errors "$dist/fleetsync-agent" /usr/local/bin/fleetsync-agent.new
chmod 0755 /usr/local/bin/fleetsync-agent.new
mv -f /usr/local/bin/fleetsync-agent.new /usr/local/bin/fleetsync-agent
for unit in fleetsync-agent.service fleetsync-agent.timer; do
  aws s3 cp --only-show-errors "$dist/$unit" "/etc/systemd/system/$unit"
done

install -d -m 0755 /etc/fleetsync "$FLEETSYNC_DEST"
cat > /etc/fleetsync/agent.toml <<TOML
# Written at boot by the fleetsync user-data; see infra/systemd/agent.toml.example.
source = "s3://$FLEETSYNC_BUCKET/$FLEETSYNC_PREFIX"
dest = "$FLEETSYNC_DEST"
mode = "releases"
# Follow the release fleetsync sync deployed to this group, not merely the latest published.
group = "$FLEETSYNC_GROUP"
TOML

systemctl daemon-reload
systemctl enable fleetsync-agent.service fleetsync-agent.timer
# The first pull: a oneshot unit, so this returns when the pull has ended
# and fails if it failed.
systemctl start fleetsync-agent.service
systemctl start fleetsync-agent.timer
complete_hook CONTINUE
echo "fleetsync: $INSTANCE_ID is on $(readlink "$FLEETSYNC_DEST/current")"
