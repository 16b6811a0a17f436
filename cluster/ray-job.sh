#!/usr/bin/env bash
# What a client of a Ray head needs, written once: cluster/local-multinode.sh sources this file, the
# tests (tests/conftest.py RayNodes) run it, and so can you.
#
#   bash cluster/ray-job.sh ensure-token
#       make sure ~/.ray/auth_token exists (Ray's own generator, `ray get-auth-token --generate`; an existing token
#       is kept). Ray 2.60 has token auth on for `ray.init()`, but `ray start --head` on a machine without a token
#       starts with auth OFF, and with RAY_AUTH_MODE=token it refuses to start. Run it before `ray start --head`.
#   bash cluster/ray-job.sh head-ready <dashboard address> <agent port>
#       exit 0 when the head takes jobs: its job API answers (`ray job list`) and so does its dashboard agent,
#       which runs the submitted jobs (GET http://<head>:<agent port>/api/healthz, the head's
#       --dashboard-agent-listen-port, 52365 by default). The job API answers first, by a second or more, and
#       until the agent is up Ray refuses submissions ("No available agent to submit job").
#   bash cluster/ray-job.sh wait-head <dashboard address> <agent port> [<timeout s, 120>]
#       head-ready, polled every 2 s.
#   bash cluster/ray-job.sh start-head <dir> [ray start options]
#       a Ray head of your own on this machine: a token (ensure-token), then `ray start --head --block` on
#       127.0.0.1 and free ports, in its own process session with its own temp dir (so it neither meets nor
#       replaces another Ray here); its log, PID, addresses (dashboard, GCS) and agent port go to <dir>.
#       Waits until it takes jobs (wait-head; a head that does not come up is stopped and started again on
#       other ports, 3 tries), then prints its dashboard address (e.g. HEAD=$(bash cluster/ray-job.sh
#       start-head runs/head)).
#   bash cluster/ray-job.sh stop-head <dir>
#       stop the head start-head started from <dir>, and nothing else (`ray stop` stops every Ray of your user).
#   bash cluster/ray-job.sh submit <dashboard address> <submission id> [ray job submit options] -- <command...>
#       `ray job submit --submission-id <id> [options] -- <command>`, safe to repeat: when the CLI fails without
#       saying whether Ray took the job (seen on a loaded 2-core machine: "Remote end closed connection without
#       response"), `ray job status <id>` tells. Ray has the job: follow its logs to its end (again, when the log
#       stream ends first) and judge it by its status. Ray does not: submit again in 5 s (up to 5 tries; Ray
#       refuses a second job with one id, so a job never runs twice). A job that failed is reported, not rerun.
#       Exit 0 only for a job that succeeded.
#
# Sourced, it defines ray_ensure_token, ray_head_ready, ray_wait_head, ray_start_head, ray_stop_head, ray_submit
# (same arguments), ray_free_ports, ray_node_agent_port and ray_stop_node. Clients send the token only with
# RAY_AUTH_MODE=token in their environment. The health check and the port picker run $PYTHON (else python).

ray_ensure_token() {
  ray get-auth-token --generate >/dev/null
}

ray_head_ready() {  # ray_head_ready <dashboard address> <agent port>
  local host=${1#*://}
  host=${host%%[:/]*}  # the agent runs on the head: the dashboard's host
  ray job list --address "$1" >/dev/null 2>&1 &&
    "${PYTHON:-python}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
      "http://$host:$2/api/healthz" 2>/dev/null
}

ray_wait_head() {  # ray_wait_head <dashboard address> <agent port> [<timeout s>]
  local deadline=$((SECONDS + ${3:-120}))
  until ray_head_ready "$1" "$2"; do
    if ((SECONDS >= deadline)); then
      echo "the head at $1 did not take jobs within ${3:-120} s (job API, and its agent on port $2)" >&2
      return 1
    fi
    sleep 2
  done
}

ray_free_ports() {  # ray_free_ports <n>: n distinct free TCP ports of 127.0.0.1 (sockets bound together: ports
  # picked one by one can repeat, and Ray refuses a node given one port twice)
  "${PYTHON:-python}" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

ray_stop_node() {  # ray_stop_node <PID of a `ray start --block` run in its own process session (setsid)>
  # as `ray stop` does it for one node: SIGTERM to `ray start --block`, which stops the node's processes in
  # order (usually in seconds; SIGTERM to the whole session instead waits out ~30 s timeouts), a grace period of
  # 16 s (`ray stop`'s default), then SIGKILL to what is left of the session, and to the node's workers that left
  # it (they carry RAY_RAYLET_PID=<the node's raylet>)
  # (what is already gone is not an error: every kill may find nothing, also under `set -e`)
  local pid=$1 raylets r f
  raylets=$(ps -o pid=,comm= --sid "$pid" 2>/dev/null | awk '$2 == "raylet" {print $1}') || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 16); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  for r in $raylets; do
    for f in $(grep -lzx "RAY_RAYLET_PID=$r" /proc/[0-9]*/environ 2>/dev/null || true); do
      f=${f#/proc/}
      kill -KILL "${f%/environ}" 2>/dev/null || true
    done
  done
  return 0
}

ray_node_agent_port() {  # ray_node_agent_port <node temp dir>: the port the node's dashboard agent
  # serves HTTP on (-1: its HTTP server did not start), as the agent recorded it in the node's session
  # directory (a node started with --dashboard-agent-listen-port=0 listens on its node IP, not 127.0.0.1)
  local f
  for f in "$1"/session_latest/dashboard_agent_listen_port_*; do
    [ -f "$f" ] && cat "$f" && return 0
  done
  return 1
}

ray_start_head() {  # ray_start_head <dir> [ray start options]
  local dir=$1 pid gcs dash agent recorded tmp try deadline
  shift
  mkdir -p "$dir"
  if [ -f "$dir/head.pid" ] && kill -0 "$(cat "$dir/head.pid")" 2>/dev/null; then
    echo "a head started from $dir runs already (PID $(cat "$dir/head.pid"), $(cat "$dir/address")):" \
      "bash cluster/ray-job.sh stop-head $dir first" >&2
    return 1
  fi
  ray_ensure_token || return 1
  for try in 1 2 3; do
    # The agents' other ports are left to Ray (each binds port 0); the agent that runs jobs gets one picked
    # here, so that it also listens on 127.0.0.1 where the readiness check reaches it. A port picked free
    # can be taken by another process before the agent binds it: that agent then records port -1 and serves
    # no HTTP, while whatever took the port may answer the check, and the head answers `ray job list` but
    # refuses every job. So the head is ready only when its agent recorded the port it was given.
    read -r gcs dash agent <<<"$(ray_free_ports 3)"
    tmp=$(mktemp -d /tmp/rh-XXXXXX)  # short: Ray's socket paths have a length limit
    echo "$tmp" >"$dir/temp_dir"
    RAY_AUTH_MODE=token setsid ray start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
      --dashboard-agent-listen-port="$agent" --temp-dir="$tmp" "$@" >"$dir/head.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/head.pid"
    echo "http://127.0.0.1:$dash" >"$dir/address"
    echo "127.0.0.1:$gcs" >"$dir/gcs_address"  # what `ray start --address` of a worker node takes
    recorded=
    deadline=$((SECONDS + 120))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      recorded=$(ray_node_agent_port "$tmp") && [[ $recorded =~ ^-?[0-9]+$ ]] && break
      recorded=
      sleep 1
    done
    if [[ $recorded == "$agent" ]] &&
      RAY_AUTH_MODE=token ray_wait_head "http://127.0.0.1:$dash" "$agent" 120; then
      echo "$agent" >"$dir/agent_port"
      echo "http://127.0.0.1:$dash"
      return 0
    fi
    echo "the head did not come up (try $try of 3; its agent recorded port ${recorded:-none}," \
      "given $agent); its log: $dir/head.log" >&2
    ray_stop_head "$dir"
  done
  return 1
}

ray_stop_head() {  # ray_stop_head <dir>
  local dir=$1
  if [ ! -f "$dir/head.pid" ]; then
    echo "no head was started from $dir (no $dir/head.pid)" >&2
    return 1
  fi
  ray_stop_node "$(cat "$dir/head.pid")"
  if [ -f "$dir/temp_dir" ]; then rm -rf "$(cat "$dir/temp_dir")"; fi
  rm -f "$dir/head.pid" "$dir/temp_dir" "$dir/address" "$dir/gcs_address" "$dir/agent_port"
  echo "stopped the head started from $dir" >&2
}

ray_submit() {  # ray_submit <dashboard address> <submission id> [ray job submit options] -- <command...>
  local address=$1 id=$2 said status rc=1 _; shift 2
  said=$(mktemp)
  for _ in 1 2 3 4 5; do
    if ray job submit --address "$address" --submission-id "$id" "$@" 2>&1 | tee "$said"; then
      rc=0
      break
    fi
    if grep -q "Job '$id' \(failed\|was stopped\)" "$said"; then  # the CLI followed the job to its end
      break
    fi
    if ray job status --address "$address" "$id" >/dev/null 2>&1; then  # Ray has the job: follow it to its end
      while :; do
        ray job logs --address "$address" --follow "$id" || true
        status=$(ray job status --address "$address" "$id" 2>&1) || true
        # "Status for job '<id>': RUNNING" (or PENDING): the log stream ended before the job did; follow again
        [[ $status == *"Status for job '$id':"* ]] || break
        echo "the log stream of job $id ended while it runs; following it again" >&2
        sleep 5
      done
      if [[ $status == *"Job '$id' succeeded"* ]]; then
        echo "Job '$id' succeeded (followed after the submit command failed)"
        rc=0
      else
        echo "job $id did not succeed: $status" >&2
      fi
      break
    fi
    echo "Ray did not take job $id; submitting it again in 5 s" >&2
    sleep 5
  done
  rm -f "$said"
  return $rc
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # run, not sourced
  set -euo pipefail
  case ${1:-} in
    ensure-token) ray_ensure_token ;;
    head-ready) shift; ray_head_ready "$@" ;;
    wait-head) shift; ray_wait_head "$@" ;;
    start-head) shift; ray_start_head "$@" ;;
    stop-head) shift; ray_stop_head "$@" ;;
    submit) shift; ray_submit "$@" ;;
    *) sed -n '5,/^#$/{/^#$/d;s/^# \?//p}' "$0" >&2; exit 2 ;;  # the usage: line 5 to the first bare '#'
  esac
fi
