#!/usr/bin/env bash
# Submit a distributed-sae pipeline to a running Ray cluster as a Ray job.
#
#   scripts/submit_ray_job.sh [--address http://HEAD:8265] [--no-wait] [--] <dsae-run overrides>
#   scripts/submit_ray_job.sh --address http://10.0.0.1:8265 \
#       store.path=/shared/acts out_dir=/shared/runs/a train.workers=8 sae.widths=[65536,131072]
#
# The address is the head node's job server (dashboard port, 8265 by default); without --address
# RAY_ADDRESS is used. This directory is uploaded as the job's working directory (Ray's limit:
# 100 MiB per package; runs/, .venv/ and caches are excluded), and the job runs
#     dsae-run cluster=ray-cluster <overrides>
# on the head node: `cluster=ray-cluster` (address: auto) joins the cluster the job runs in, so
# harvest actors and Ray Train workers land on its nodes. Every node needs the same environment
# (the Docker image, see docs/cluster.md) and the store and out_dir must be on storage every node
# sees (a shared filesystem or a mounted bucket: store.path is a POSIX path, docs/cluster.md).
set -euo pipefail

address="${RAY_ADDRESS:-}"
wait_flag=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ -z "$address" ]]; then
  echo "submit_ray_job.sh: no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
# `ray job submit` takes the runtime environment as JSON: upload this tree minus bulky folders.
runtime_env='{"working_dir": ".", "excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.zarr"]}'
set -x
exec ray job submit --address "$address" "${wait_flag[@]}" \
  --runtime-env-json "$runtime_env" \
  -- dsae-run cluster=ray-cluster "$@"
