#!/bin/bash
# A real single-node Slurm cluster on this machine, for the tests marked `slurm` (tests/slurm/conftest.py starts and
# stops it) and for trying the sbatch recipes by hand:
#
#   scripts/slurm_cluster.sh start DIR    install slurm-wlm + munge where missing (apt, needs root), write
#                                         DIR/slurm.conf for one localhost node (this machine's CPUs and memory),
#                                         start munged, slurmctld and slurmd, wait until `sinfo` shows the node idle
#   export SLURM_CONF=DIR/slurm.conf      then sbatch / srun / squeue / scancel talk to that cluster
#   scripts/slurm_cluster.sh stop DIR     stop the daemons this script started (by the pids it recorded), nothing else
#
# Everything lives in DIR: the config, a fresh munge key and socket, state, spool, logs and pid files, so it runs
# beside a system Slurm or another cluster of this script (give each its own SLURM_CLUSTER_PORT: slurmctld listens
# there, slurmd on the port after it). Jobs run as the caller (root in CI). The daemons' logs are in DIR/*.log.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
PORT=${SLURM_CLUSTER_PORT:-16817}
# Seconds to wait for the node to come up idle.
START_TIMEOUT=${SLURM_CLUSTER_START_TIMEOUT:-60}

fail() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install_missing() {
    local missing=()
    for program in munged slurmctld slurmd sinfo sbatch; do
        command -v "$program" >/dev/null || missing+=("$program")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || fail "${missing[*]} not installed and not root: apt-get install slurm-wlm munge"
    echo "slurm_cluster.sh: installing slurm-wlm and munge (missing: ${missing[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$DIR/apt.log" 2>&1 || fail "apt-get update failed, see $DIR/apt.log"
    apt-get install -y -q slurm-wlm munge >>"$DIR/apt.log" 2>&1 || fail "apt-get install failed, see $DIR/apt.log"
}

write_config() {
    local node cpus memory
    node=$(hostname -s)
    # slurmd -C reports what slurmd itself will detect; a node configured with more would be drained.
    cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    memory=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$cpus" ] && [ -n "$memory" ] || fail "could not read CPUs/RealMemory from 'slurmd -C': $(slurmd -C 2>&1)"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: one localhost node, CPU only.
ClusterName=megaseg-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Fast turnaround for tests: SIGKILL 5 s after SIGTERM, finished jobs stay visible to scontrol for 10 minutes.
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_missing
    for name in munged slurmctld slurmd; do
        pid_alive "$DIR/$name.pid" && fail "$name from an earlier start is still running (pid $(cat "$DIR/$name.pid")); run '$0 stop $DIR' first"
    done
    write_config
    export SLURM_CONF=$DIR/slurm.conf
    # A fresh key per cluster: munge credentials of this cluster are useless to any other.
    dd if=/dev/urandom of="$DIR/munge.key" bs=1 count=1024 status=none
    chmod 600 "$DIR/munge.key"
    # --force: the key and socket sit under a world-writable /tmp, which munged refuses without it.
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" 2>>"$DIR/munged.log" \
        || fail "munged did not start: $(tail -n 5 "$DIR/munged.log")"
    # -i: ignore state a previous cluster in DIR left behind; both daemons fork and write their pid files.
    slurmctld -i -f "$DIR/slurm.conf" 2>>"$DIR/slurmctld.log" || fail "slurmctld did not start: $(tail -n 5 "$DIR/slurmctld.log")"
    slurmd -f "$DIR/slurm.conf" 2>>"$DIR/slurmd.log" || fail "slurmd did not start: $(tail -n 5 "$DIR/slurmd.log")"
    local waited=0 state=""
    while [ "$waited" -lt "$START_TIMEOUT" ]; do
        state=$(sinfo -h -N -o %T 2>/dev/null || true)
        [ "$state" = idle ] && { echo "export SLURM_CONF=$DIR/slurm.conf"; return 0; }
        sleep 1
        waited=$((waited + 1))
    done
    fail "the node is not idle after ${START_TIMEOUT}s (sinfo: '${state:-no answer}'); slurmctld.log: $(tail -n 5 "$DIR/slurmctld.log"); slurmd.log: $(tail -n 5 "$DIR/slurmd.log")"
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -f "$DIR/$name.pid" ] || continue
        pid=$(cat "$DIR/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$DIR/$name.pid"
    done
}

case $ACTION in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
