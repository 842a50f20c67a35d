#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, on loopback: a head (`ray start --head`) and a
# worker node (`ray start --address`), each its own raylet with its own CPUs and a resource label
# (`dsae_head`, `dsae_worker`) so that work can be pinned to, or must spread over, both. For the
# `cluster` tests and for trying cluster=ray-cluster and scripts/submit_ray_job.sh locally.
#
#   scripts/ray_local_cluster.sh start          # head + worker node; prints the addresses
#   scripts/ray_local_cluster.sh address        # GCS address, for cluster.address= / RAY_ADDRESS
#   scripts/ray_local_cluster.sh dashboard      # job server, for submit_ray_job.sh --address
#   scripts/ray_local_cluster.sh kill-worker    # SIGKILL the worker node's raylet and its workers
#   scripts/ray_local_cluster.sh start-worker   # (re)start a worker node
#   scripts/ray_local_cluster.sh stop           # both nodes
#
# Settings: DSAE_RAY_PORT (GCS port, 6390), DSAE_RAY_HEAD_CPUS (1), DSAE_RAY_WORKER_CPUS (2),
# DSAE_RAY_DIR (/tmp/dsae-ray-$PORT: Ray's temp dir, kept short for its socket paths). Ray's
# temp dir is this cluster's own, so its address is not written to /tmp/ray/ray_current_cluster
# and a plain ray.init() elsewhere on the machine still starts its own instance.
set -euo pipefail

port="${DSAE_RAY_PORT:-6390}"
dport=$((port + 1875))  # 8265 for the default port, Ray's usual dashboard port
dir="${DSAE_RAY_DIR:-/tmp/dsae-ray-$port}"
address="127.0.0.1:$port"
# 256 MB of object store per node, not Ray's 30% of RAM each (2 x 7.4 GB of 24 GiB here): the
# pipeline passes small objects (units go to disk, not through the store).
common=(--node-ip-address=127.0.0.1 --disable-usage-stats --object-store-memory=268435456)

pids_of() {
  # Every process started for node $1 of this cluster: `ray start` runs with DSAE_RAY_NODE set,
  # and the raylet, its workers and the GCS inherit it. The raylet's agents overwrite their
  # environment with their process title, so they are found as the raylet's children.
  local want="DSAE_RAY_NODE=$port/$1" f pid found=()
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    tr '\0' '\n' 2>/dev/null <"$f" | grep -qx "$want" && found+=("$pid")
  done
  for pid in "${found[@]}"; do echo "$pid"; pgrep -P "$pid" || true; done | sort -u
}

start_worker() {
  # Its own temp dir, as a real node has its own disk: sharing the head's, its runtime-env
  # agent deletes a job's working_dir (the same folder) when the node's last actor of that job
  # exits, under the driver still running in it (measured: dsae-run's train stage then died in
  # os.getcwd()).
  DSAE_RAY_NODE="$port/worker" ray start --address="$address" "${common[@]}" --temp-dir="${dir}w" --num-cpus="${DSAE_RAY_WORKER_CPUS:-2}" \
    --resources='{"dsae_worker": 1}' >"$dir/worker.log" 2>&1 \
    || { echo "ray_local_cluster.sh: the worker node did not start: $dir/worker.log" >&2; exit 1; }
}

start() {
  mkdir -p "$dir"
  DSAE_RAY_NODE="$port/head" ray start --head --port="$port" "${common[@]}" --temp-dir="$dir" \
    --num-cpus="${DSAE_RAY_HEAD_CPUS:-1}" --resources='{"dsae_head": 1}' \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dport" \
    >"$dir/head.log" 2>&1 \
    || { echo "ray_local_cluster.sh: the head did not start: $dir/head.log" >&2; exit 1; }
  start_worker
  echo "ray_local_cluster.sh: up: cluster.address=$address, job server http://127.0.0.1:$dport"
}

kill_node() {
  local pids
  pids=$(pids_of "$1")
  [[ -n "$pids" ]] || { echo "ray_local_cluster.sh: no $1 node is running" >&2; return 1; }
  # SIGKILL at once, raylet and workers alike: the node is gone as when a machine is preempted.
  kill -9 $pids 2>/dev/null || true
  echo "ray_local_cluster.sh: killed the $1 node ($(echo $pids | wc -w) processes)"
}

stop() {
  # `ray stop` would stop every Ray process on the machine (other tests' instances too).
  kill_node worker >/dev/null 2>&1 || true
  kill_node head >/dev/null 2>&1 || true
}

case "${1:-}" in
  start) start ;;
  start-worker) mkdir -p "$dir"; start_worker ;;
  kill-worker) kill_node worker ;;
  stop) stop ;;
  address) echo "$address" ;;
  dashboard) echo "http://127.0.0.1:$dport" ;;
  *) echo "usage: scripts/ray_local_cluster.sh start|stop|address|dashboard|kill-worker|start-worker" >&2
     exit 2 ;;
esac
