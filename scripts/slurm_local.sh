#!/usr/bin/env bash
# A real SLURM on this machine, for the `cluster` tests and for trying `cluster=slurm` sweeps
# before they go to a real queue: munged, slurmctld and slurmd (Debian 12's slurm-wlm 22.05)
# with one node, `localhost`, and one partition, `local`, on loopback only.
#
#   scripts/slurm_local.sh start     # installs the packages if missing (apt), starts the daemons
#   export SLURM_CONF=$(scripts/slurm_local.sh conf)    # what sbatch/squeue/submitit then read
#   scripts/slurm_local.sh stop      # stops the daemons (the state folder stays)
#   scripts/slurm_local.sh status    # exit 0 when the node is up and idle or busy
#
# Everything lives in $DSAE_SLURM_DIR (default /tmp/dsae-slurm): slurm.conf, spool, state, logs;
# /etc is left alone except the munge key the package creates. The node offers this machine's
# CPUs and 3/4 of its memory. Needs root (the daemons and apt), as on the build machines.
set -euo pipefail

dir="${DSAE_SLURM_DIR:-/tmp/dsae-slurm}"
conf="$dir/slurm.conf"

need_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
    echo "slurm_local.sh: slurmctld/slurmd/sbatch/munged are missing and cannot be installed" \
         "here (apt-get as root): install slurm-wlm and munge" >&2
    exit 3
  fi
  # ~9 s on the build machine: the daemons, the client and munge, no recommends.
  local pkgs=(slurmctld slurmd slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
      || { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; }
  } >"$dir/apt.log" 2>&1 || {
      echo "slurm_local.sh: apt-get install of slurm-wlm failed: see $dir/apt.log" >&2; exit 3; }
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 3 / 4 / 1024 ))  # MiB
  mkdir -p "$dir/spool" "$dir/state" "$dir/log"
  cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: one node on loopback.
ClusterName=dsae-local
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# Fast enough for tests: the controller notices a finished job within a second.
MessageTimeout=20
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
  SLURM_CONF="$conf" sinfo -h -N -o '%T' 2>/dev/null | head -1
}

start() {
  mkdir -p "$dir"
  need_packages
  write_conf
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged  # the key: /etc/munge/munge.key, made by the package
  fi
  pgrep -f "slurmctld -f $conf" >/dev/null || slurmctld -f "$conf"
  pgrep -f "slurmd -f $conf" >/dev/null || slurmd -f "$conf"
  # The node registered at once here; wait for it (up to 10 minutes on a busy machine).
  for _ in $(seq 1200); do
    case "$(node_state)" in
      idle*|mixed*|allocated*) echo "slurm_local.sh: up (SLURM_CONF=$conf)"; return 0 ;;
      down*|drain*) SLURM_CONF="$conf" scontrol update nodename=localhost state=resume || true ;;
    esac
    sleep 0.5
  done
  echo "slurm_local.sh: the node did not come up: see $dir/log/" >&2
  exit 1
}

stop() {
  [[ -f "$conf" ]] || return 0
  SLURM_CONF="$conf" scancel --user="$(id -un)" 2>/dev/null || true
  pkill -f "slurmd -f $conf" 2>/dev/null || true
  pkill -f "slurmctld -f $conf" 2>/dev/null || true
  for _ in $(seq 60); do
    pgrep -f -- "-f $conf" >/dev/null || return 0
    sleep 0.5
  done
  pkill -9 -f -- "-f $conf" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  conf) echo "$conf" ;;
  status) case "$(node_state)" in idle*|mixed*|allocated*) exit 0 ;; *) exit 1 ;; esac ;;
  *) echo "usage: scripts/slurm_local.sh start|stop|status|conf" >&2; exit 2 ;;
esac
