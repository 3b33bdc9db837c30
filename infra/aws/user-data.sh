#!/bin/bash
# fleetsync node bootstrap, run once by cloud-init as EC2 user-data:
# 1. install fleetsync-agent and its units from the bucket's dist/, checked
#    against dist/SHA256SUMS; 2. write /etc/fleetsync/agent.toml; 3. first
#    pull (the unit), with lifecycle heartbeats meanwhile; 4. only then
#    complete the launch hook (CONTINUE), so an instance never enters
#    service without the code. Any failure: ABANDON, the group replaces it.
#
# Needs bash, systemd, curl (IMDSv2 only) and python3 (RHEL 8:
# platform-python), which signs the first requests (SigV4): no AWS CLI or
# recent curl needed. Then the agent makes the lifecycle calls.
# fleetsync.yaml embeds this file after an exports line (infra/aws/check
# compares them); tests/boot.rs runs it against the local world.
set -euo pipefail

: "${FLEETSYNC_BUCKET:?the source bucket}"
: "${FLEETSYNC_PREFIX:?the source prefix}"
: "${FLEETSYNC_DEST:?the release-mode DEST, e.g. /var/www/app}"
: "${FLEETSYNC_GROUP:?the Auto Scaling Group}"
: "${FLEETSYNC_HOOK:?the launch lifecycle hook}"
: "${AWS_REGION:?the region}"
# What the test changes: the endpoints (path-style for a local server), the
# root the files are installed under, the pause between tries.
# S3 virtual-hosted style, except for a bucket name with dots: S3's wildcard
# certificate (*.s3.REGION.amazonaws.com) covers one label only, so such a
# bucket is addressed path style.
if [[ $FLEETSYNC_BUCKET == *.* ]]; then
  S3_URL=${FLEETSYNC_S3_URL:-https://s3.$AWS_REGION.amazonaws.com/$FLEETSYNC_BUCKET}
else
  S3_URL=${FLEETSYNC_S3_URL:-https://$FLEETSYNC_BUCKET.s3.$AWS_REGION.amazonaws.com}
fi
AUTOSCALING_URL=${FLEETSYNC_AUTOSCALING_URL:-https://autoscaling.$AWS_REGION.amazonaws.com}
ROOT=${FLEETSYNC_INSTALL_ROOT:-}
PAUSE=${FLEETSYNC_RETRY_PAUSE:-10}
HEARTBEAT=${FLEETSYNC_HEARTBEAT_SECONDS:-300}
DIST="s3://$FLEETSYNC_BUCKET/dist"
INSTANCE_ID=${FLEETSYNC_INSTANCE_ID:-}
heartbeats=''
# The installed agent, once it is: it makes the lifecycle calls from then on.
AGENT=''

fail() {
  echo "fleetsync bootstrap: $*" >&2
  exit 1
}

# imds PATH: instance metadata through IMDSv2.
imds() {
  local token
  token=$(curl -fsS --connect-timeout 2 -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
  curl -fsS --connect-timeout 2 -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

# credentials: sets AK, SK and TOKEN from the environment (the test) or the
# instance role, read again for every request (role credentials rotate).
credentials() {
  if [[ -n ${AWS_ACCESS_KEY_ID:-} ]]; then
    AK=$AWS_ACCESS_KEY_ID SK=${AWS_SECRET_ACCESS_KEY:?} TOKEN=${AWS_SESSION_TOKEN:-}
    return
  fi
  local role json
  role=$(imds iam/security-credentials/) || fail "no instance role: the launch template needs the fleetsync instance profile"
  json=$(imds "iam/security-credentials/$role")
  # field NAME: its first value; sed stops there itself (piped into
  # `head -1`, sed may die of SIGPIPE, which pipefail makes a failure).
  field() { sed -n "/.*\"$1\" *: *\"\\([^\"]*\\)\".*/{s//\\1/p;q;}" <<<"$json"; }
  AK=$(field AccessKeyId) SK=$(field SecretAccessKey) TOKEN=$(field Token)
}

# py_signed METHOD URL SERVICE FILE [BODY]: one AWS request signed with
# SigV4 by python3's standard library; the answer's body into FILE. Tried
# 3 times, 5 s to connect.
py_signed() {
  credentials
  AK=$AK SK=$SK TOKEN=$TOKEN "$PYTHON" - "$@" <<'PY'
import datetime, hashlib, hmac, http.client, os, sys, time, urllib.error, urllib.parse, urllib.request
method, url, service, out = sys.argv[1:5]
body = sys.argv[5].encode() if len(sys.argv) > 5 else b""
u, region = urllib.parse.urlsplit(url), os.environ["AWS_REGION"]
for attempt in range(3):
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": u.netloc, "x-amz-date": stamp, "x-amz-content-sha256": payload}
    if body:
        headers["content-type"] = "application/x-www-form-urlencoded; charset=utf-8"
    if os.environ["TOKEN"]:
        headers["x-amz-security-token"] = os.environ["TOKEN"]
    names = ";".join(sorted(headers))
    path = urllib.parse.quote(u.path or "/", safe="/-_.~")
    canonical = "\n".join([method, path, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), names, payload])
    scope = f"{day}/{region}/{service}/aws4_request"
    signing = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + os.environ["SK"]).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, signing.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={os.environ['AK']}/{scope}, SignedHeaders={names}, Signature={signature}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body or None, method=method, headers=headers), timeout=5) as r:
            data = r.read()
        with open(out, "wb") as f:
            f.write(data)
        sys.exit(0)
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
        if e.code < 500:
            break
    except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short
        why = f"{type(e).__name__}: {e}"
    if attempt < 2:
        time.sleep(1 + attempt)
sys.exit(f"{method} {url}: {why}")
PY
}

# s3_get NAME FILE: dist/NAME into FILE.
s3_get() {
  if [[ $CLIENT == aws ]]; then
    aws s3 cp --only-show-errors --cli-connect-timeout 5 "$DIST/$1" "$2" ||
      fail "cannot read $DIST/$1 (no route to S3 from this subnet? no object? see above)"
    return
  fi
  py_signed GET "$S3_URL/dist/$1" s3 "$2" ||
    fail "cannot read $DIST/$1 from $S3_URL (no route to S3 from this subnet? no object? see above)"
}

# lifecycle ACTION [PARAM=VALUE...]: an Auto Scaling lifecycle call for
# this instance's launch hook: by the agent once it is installed, else
# (the install failed) by the client that fetched it.
lifecycle() {
  if [[ -n $AGENT ]]; then
    local args=(--group "$FLEETSYNC_GROUP" --hook "$FLEETSYNC_HOOK" --instance-id "$INSTANCE_ID" --region "$AWS_REGION")
    case $1 in
      CompleteLifecycleAction) args=(complete "${args[@]}" --result "$(tr '[:upper:]' '[:lower:]' <<<"${2#LifecycleActionResult=}")") ;;
      *) args=(heartbeat "${args[@]}") ;;
    esac
    # The endpoint given to this script, if any (the test's); else the
    # SDK's own (the region's, or AWS_ENDPOINT_URL_AUTO_SCALING).
    local endpoint=()
    [[ -z ${FLEETSYNC_AUTOSCALING_URL:-} ]] || endpoint=("AWS_ENDPOINT_URL_AUTO_SCALING=$FLEETSYNC_AUTOSCALING_URL")
    env ${endpoint[@]+"${endpoint[@]}"} "$AGENT" lifecycle "${args[@]}"
    return $?
  fi
  if [[ $CLIENT == aws ]]; then
    local cli=(--auto-scaling-group-name "$FLEETSYNC_GROUP" --lifecycle-hook-name "$FLEETSYNC_HOOK" --instance-id "$INSTANCE_ID")
    case $1 in
      CompleteLifecycleAction) cli+=(--lifecycle-action-result "${2#LifecycleActionResult=}") ;;
    esac
    local command
    command=$(sed -E 's/([a-z])([A-Z])/\1-\2/g' <<<"$1" | tr '[:upper:]' '[:lower:]')
    aws autoscaling "$command" --cli-connect-timeout 5 "${cli[@]}" >/dev/null
    # $? explicitly: a bare return in the EXIT trap (finish) would return
    # the status of the command that failed before it, not aws's.
    return $?
  fi
  # The names need no escaping: the template allows [A-Za-z0-9_-] alone.
  local body="Action=$1&Version=2011-01-01&AutoScalingGroupName=$FLEETSYNC_GROUP&LifecycleHookName=$FLEETSYNC_HOOK&InstanceId=$INSTANCE_ID"
  shift
  for param in "$@"; do body+="&$param"; done
  py_signed POST "$AUTOSCALING_URL/" autoscaling /dev/null "$body"
}


# install: the agent and its units, checked against dist/SHA256SUMS. A
# mismatch is tried again twice (an upload may be under way: the sums are
# written last), then fails the launch.
install_agent() {
  local arch work files attempt version
  case ${FLEETSYNC_ARCH:-$(uname -m)} in
    x86_64 | amd64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) fail "no fleetsync-agent for $(uname -m)" ;;
  esac
  work=$(mktemp -d)
  files=("fleetsync-agent-$arch" fleetsync-agent.service fleetsync-agent.timer)
  for attempt in 1 2 3; do
    s3_get SHA256SUMS "$work/SHA256SUMS"
    grep -q "  fleetsync-agent-$arch\$" "$work/SHA256SUMS" ||
      fail "$DIST has no fleetsync-agent-$arch for this $arch instance: build it on a $arch host with infra/dist/build, then run fleetsync agent-dist upload"
    for f in "${files[@]}"; do s3_get "$f" "$work/$f"; done
    # All three files named, each exactly once, and each matching.
    if (cd "$work" && grep -E "  (fleetsync-agent-$arch|fleetsync-agent\\.service|fleetsync-agent\\.timer)\$" SHA256SUMS > checked &&
      [[ $(sort -u -k2 checked | wc -l) == 3 && $(wc -l < checked) == 3 ]] && sha256sum --check --strict --quiet checked); then
      break
    fi
    ((attempt < 3)) || fail "$DIST/fleetsync-agent-$arch does not match $DIST/SHA256SUMS after 3 tries: upload it again with fleetsync agent-dist upload"
    echo "fleetsync bootstrap: $DIST does not match its SHA256SUMS (an upload under way?); trying again in $PAUSE s" >&2
    sleep "$PAUSE"
  done
  install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/systemd/system"
  install -m 0755 "$work/fleetsync-agent-$arch" "$ROOT/usr/local/bin/fleetsync-agent.new"
  mv -f "$ROOT/usr/local/bin/fleetsync-agent.new" "$ROOT/usr/local/bin/fleetsync-agent"
  install -m 0644 "$work/fleetsync-agent.service" "$work/fleetsync-agent.timer" "$ROOT/etc/systemd/system/"
  rm -rf "$work"
  # Not inside the echo's arguments: set -e ignores a command substitution
  # that fails there, and a binary that cannot run here (another
  # architecture, a glibc older than 2.17) must abandon the launch now,
  # saying why, not surface later as a failed first pull.
  version=$("$ROOT/usr/local/bin/fleetsync-agent" --version) ||
    fail "$ROOT/usr/local/bin/fleetsync-agent does not run on this $(uname -m) instance (a binary for another architecture? a glibc older than 2.17?): see the error above"
  echo "fleetsync bootstrap: installed $version" >&2
  AGENT=$ROOT/usr/local/bin/fleetsync-agent
}

# finish: on a failure, abandon the launch at once (instead of the group
# waiting out the hook's heartbeat timeout).
finish() {
  local status=$?
  [[ -z $heartbeats ]] || kill "$heartbeats" 2>/dev/null || true
  if ((status != 0)); then
    echo "fleetsync bootstrap failed; abandoning the launch" >&2
    if [[ -z $INSTANCE_ID ]]; then
      echo "fleetsync bootstrap: no instance id (instance metadata unreachable?): the hook times out instead" >&2
    elif ! lifecycle CompleteLifecycleAction LifecycleActionResult=ABANDON; then
      echo "fleetsync bootstrap: completing the launch hook failed too (no route to $AUTOSCALING_URL?)" >&2
    fi
  fi
}

# From here on, any failure abandons the launch.
trap finish EXIT
[[ -n $INSTANCE_ID ]] || INSTANCE_ID=$(imds instance-id) || fail "instance metadata (IMDSv2) is unreachable"
export AWS_REGION AWS_DEFAULT_REGION="$AWS_REGION"
# python3 signs, else the AWS CLI (FLEETSYNC_CLIENT=python|aws chooses: the
# test runs both).
PYTHON=$(command -v python3 || command -v /usr/libexec/platform-python || true)
CLIENT=${FLEETSYNC_CLIENT:-}
if [[ -z $CLIENT ]]; then
  if [[ -n $PYTHON ]]; then CLIENT=python; elif command -v aws >/dev/null; then CLIENT=aws; else
    fail "no python3 and no AWS CLI to sign the first requests with: install either in the AMI"
  fi
fi

install_agent
[[ ${FLEETSYNC_STEP:-all} == install ]] && exit 0

install -d -m 0755 "$ROOT/etc/fleetsync" "$FLEETSYNC_DEST"
cat > "$ROOT/etc/fleetsync/agent.toml" <<TOML
# Written by the fleetsync user-data; see infra/systemd/agent.toml.example.
source = "s3://$FLEETSYNC_BUCKET/$FLEETSYNC_PREFIX"
dest = "$FLEETSYNC_DEST"
mode = "releases"
# The release fleetsync sync deployed to this group, not the latest published.
group = "$FLEETSYNC_GROUP"
# The unit's FLEETSYNC_METRICS_FILE, for the pulls SSM runs outside the unit.
metrics-file = "/var/lib/prometheus/node-exporter/fleetsync.prom"
TOML
# FilesOwner: who owns the files placed in DEST (the web server's user).
[[ -z ${FLEETSYNC_OWNER:-} ]] || printf 'owner = "%s"\n' "$FLEETSYNC_OWNER" >> "$ROOT/etc/fleetsync/agent.toml"
# BeforeSwitch, AfterSwitch, HealthUrl: as TOML strings.
toml() { local v=${1//\\/\\\\}; printf '"%s"' "${v//\"/\\\"}"; }
[[ -z ${FLEETSYNC_BEFORE_SWITCH:-} ]] || echo "before-switch = $(toml "$FLEETSYNC_BEFORE_SWITCH")" >> "$ROOT/etc/fleetsync/agent.toml"
[[ -z ${FLEETSYNC_AFTER_SWITCH:-} ]] || echo "after-switch = $(toml "$FLEETSYNC_AFTER_SWITCH")" >> "$ROOT/etc/fleetsync/agent.toml"
[[ -z ${FLEETSYNC_HEALTH_URL:-} ]] || echo "health-url = $(toml "$FLEETSYNC_HEALTH_URL")" >> "$ROOT/etc/fleetsync/agent.toml"
# SharedPaths and KeepAssets (comma-separated): as TOML lists.
toml_list() {
  local list='' p paths
  IFS=, read -ra paths <<<"$2"
  for p in "${paths[@]}"; do list+="${list:+, }$(toml "$p")"; done
  echo "$1 = [$list]" >> "$ROOT/etc/fleetsync/agent.toml"
}
[[ -z ${FLEETSYNC_SHARED:-} ]] || toml_list shared "$FLEETSYNC_SHARED"
[[ -z ${FLEETSYNC_KEEP_ASSETS:-} ]] || toml_list keep-assets "$FLEETSYNC_KEEP_ASSETS"

systemctl daemon-reload
systemctl enable fleetsync-agent.service fleetsync-agent.timer
# The first pull: a oneshot unit, so this returns when the pull has ended
# and fails if it failed. Heartbeats every 5 minutes meanwhile (the hook
# waits 15 minutes for one).
# Stopped between heartbeats, never during one (a heartbeat after the
# CONTINUE below would fail): TERM ends the wait for `sleep` at once, and
# waits for a heartbeat under way.
(
  nap=''
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$HEARTBEAT" & nap=$!
    wait "$nap"
    lifecycle RecordLifecycleActionHeartbeat || true
  done
) &
heartbeats=$!
systemctl start fleetsync-agent.service
kill "$heartbeats" 2>/dev/null || true
wait "$heartbeats" 2>/dev/null || true
heartbeats=''
systemctl start fleetsync-agent.timer
lifecycle CompleteLifecycleAction LifecycleActionResult=CONTINUE
echo "fleetsync: $INSTANCE_ID is on $(readlink "$FLEETSYNC_DEST/current")"
