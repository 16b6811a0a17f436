#!/usr/bin/env bash
# The whole pipeline on a real multi-node Ray on this machine, as on a cluster:
#   ray start --head + two `ray start --address` workers (custom resources env_runner / learner / serve),
#   ray job submit: prepare -> fine-tune -> RL training (env runners on both workers) -> evaluate,
#   serve deploy of the trained policy, one HTTP request answered; then everything it started is stopped.
#
#   bash cluster/local-multinode.sh                         # defaults: a 3-minute fine-tune, 10 APPO iterations
#   KEEP_SERVING=1 bash cluster/local-multinode.sh          # leave the endpoint up until Ctrl-C
#   OUT=runs/mn FINETUNE_ARGS="--max-minutes 1" TRAIN_ARGS="--iterations 2" bash cluster/local-multinode.sh
#
# Several nodes on one machine need a temp directory each (raylet and object-store sockets live there) and
# their own agent ports (each agent binds port 0 and records the port it got). Ray 2.60 has token auth on:
# clients send ~/.ray/auth_token with RAY_AUTH_MODE=token.
# Stops only what it started (the process groups of its own `ray start --block` processes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHON=$PY
# shellcheck source=cluster/ray-job.sh
source cluster/ray-job.sh  # ray_start_head, ray_stop_head, ray_submit, ray_free_ports, ray_stop_node
OUT=$(realpath -m "${OUT:-runs/multinode}")
FINETUNE_ARGS=${FINETUNE_ARGS:-"--max-minutes 3"}
TRAIN_ARGS=${TRAIN_ARGS:-"--iterations 10"}
export RAY_AUTH_MODE=token
# the nodes stop all together at the end: no drain on SIGTERM (Ray's default waits up to 30 s per node for
# Serve to move replicas to nodes that stay)
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
unset RAY_ADDRESS
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/rmn-XXXXXX)  # short: Ray's socket paths have a length limit
PIDS=()

stop_all() {
  set +e
  if [ -n "${HEAD_STARTED:-}" ] && [ -z "${SERVE_STOPPED:-}" ]; then
    serve shutdown -y --address "$ADDRESS" >/dev/null 2>&1
  fi
  # one node at a time, workers first, as `ray stop` does it (ray_stop_node: SIGTERM, grace, SIGKILL)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    ray_stop_node "${PIDS[i]}"
  done
  if [ -n "${HEAD_STARTED:-}" ]; then ray_stop_head "$OUT/head"; fi
  rm -rf "$TMP"
}
trap stop_all EXIT

start_node() {  # start_node <log name> <ray start args...>: a worker node in its own process session
  # (its agents bind port 0: ports picked free and handed over later can be taken in between)
  local name=$1; shift
  setsid ray start --block --node-ip-address=127.0.0.1 --dashboard-agent-listen-port=0 "$@" \
    >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
}

SERVE_PORT=${SERVE_PORT:-$(ray_free_ports 1)}
# the head: ray_start_head (cluster/ray-job.sh: a token, free ports, its own temp dir; waits for jobs)
ADDRESS=$(ray_start_head "$OUT/head" --num-cpus=1) || { echo "see $OUT/head/head.log" >&2; exit 1; }
HEAD_STARTED=1
GCS_ADDRESS=$(cat "$OUT/head/gcs_address")
start_node worker1 --address="$GCS_ADDRESS" --num-cpus=1 --resources='{"env_runner": 1}' --temp-dir="$TMP/w1"
start_node worker2 --address="$GCS_ADDRESS" --num-cpus=2 \
  --resources='{"env_runner": 1, "learner": 1, "serve": 4}' --temp-dir="$TMP/w2"
"$PY" - "$GCS_ADDRESS" <<'EOF'
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 120
while sum(n["Alive"] for n in ray.nodes()) < 3:
    assert time.time() < deadline, "worker nodes did not join"
    time.sleep(2)
print("3 nodes:", [n["Resources"].get("env_runner", 0) for n in ray.nodes() if n["Alive"]], "env_runner slots")
EOF

ENV_JSON="{\"env_vars\": {\"REC_RLLIB_DATA\": \"$OUT/data\", \"TOKENIZERS_PARALLELISM\": \"false\"}}"
JOBS=0
submit() {  # each job with a submission id of its own: ray_submit (cluster/ray-job.sh) is then safe to repeat
  JOBS=$((JOBS + 1))
  ray_submit "$ADDRESS" "rmn-$$-$JOBS" --working-dir . --runtime-env-json "$ENV_JSON" -- "$@"
}
submit python -m jobs.prepare --dataset ml-100k
# shellcheck disable=SC2086  # the *_ARGS variables are word lists
submit python -m jobs.finetune --dataset ml-100k --out "$OUT/ft" $FINETUNE_ARGS
# shellcheck disable=SC2086
submit python -m jobs.train --address auto --finetuned "$OUT/ft" --out "$OUT/rl" \
  --num-env-runners 2 --env-runner-resource env_runner=1 $TRAIN_ARGS
submit python -m jobs.evaluate --models popularity "$OUT/ft" "$OUT/rl/checkpoint" --out "$OUT/eval"

"$PY" - "$OUT" "$SERVE_PORT" <<'EOF'
import json, sys
import yaml
out, port = sys.argv[1], int(sys.argv[2])
config = yaml.safe_load(open("serving/config.yaml"))
config["http_options"] = {"host": "127.0.0.1", "port": port}
app = config["applications"][0]
app["args"].update(model=f"{out}/rl/checkpoint", dataset=f"{out}/data/ml-100k", feedback_dir=f"{out}/feedback")
app["runtime_env"] = {"env_vars": {"REC_RLLIB_DATA": f"{out}/data", "TOKENIZERS_PARALLELISM": "false"}}
for d in app["deployments"]:
    d["ray_actor_options"]["num_cpus"] = 0.25
    if d["name"] == "PolicyScorer":
        d["ray_actor_options"]["resources"] = {"serve": 1}  # on the worker that offers `serve`
yaml.safe_dump(config, open(f"{out}/serve.yaml", "w"))
EOF
# serve deploy is declarative (the same config again applies nothing new): a first Serve start whose HTTP proxy
# died while starting up (seen once on a loaded 2-core machine: "ProxyActor ... killed by ray.kill") is retried once
serve deploy "$OUT/serve.yaml" --address "$ADDRESS" --working-dir . || {
  echo "serve deploy failed; retrying once in 10 s" >&2
  sleep 10
  serve deploy "$OUT/serve.yaml" --address "$ADDRESS" --working-dir .
}
URL="http://127.0.0.1:$SERVE_PORT"
BODY='{"user": "196", "k": 5, "exploration": "boltzmann", "temperature": 1.0}'
"$PY" - "$URL" "$BODY" "$OUT/answer.json" <<'EOF'
import sys, time, urllib.request
url, body, path = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
deadline = time.time() + 300
while True:
    try:
        req = urllib.request.Request(f"{url}/recommend", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            open(path, "wb").write(r.read())
            break
    except OSError:
        assert time.time() < deadline, "the deployed app never answered"
        time.sleep(3)
print(f"answer of {url}/recommend:")
print(open(path).read())
EOF
echo "try: curl -s -X POST $URL/recommend -H 'content-type: application/json' -d '$BODY'"
if [ -n "${KEEP_SERVING:-}" ]; then
  echo "serving until Ctrl-C"
  while true; do sleep 3600; done
fi
serve shutdown -y --address "$ADDRESS" && SERVE_STOPPED=1
echo "multi-node pipeline done: $OUT"
