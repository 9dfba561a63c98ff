#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, on loopback, without systemd: for the SLURM tests and
# for trying `rlhf submit` on a laptop. Installs Debian's slurm-wlm and munge when missing (root).
#
#   scripts/slurm-local.sh start    install if needed, configure, start (reuses a running cluster)
#   scripts/slurm-local.sh stop     stop the daemons
#   scripts/slurm-local.sh status   exit 0 when the cluster takes jobs
#
# Exit status 3 means SLURM cannot be set up here (not root, or no Debian packages): the tests
# skip with the reason printed on stderr.
set -euo pipefail

STATE_DIR=${RLHF_SLURM_DIR:-/tmp/rlhf-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

cannot() { echo "slurm-local: $*" >&2; exit 3; }

ready() {
    # sinfo can say idle before slurmd answers, so ask slurmd too.
    scontrol show slurmd >/dev/null 2>&1 &&
        sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

install() {
    command -v sbatch >/dev/null && command -v munged >/dev/null && command -v slurmd >/dev/null && return
    [ "$(id -u)" = 0 ] || cannot "slurm-wlm and munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package index may be stale or absent on a fresh machine.
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } ||
        cannot "apt-get could not install slurm-wlm and munge"
}

start_munge() {
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
        if [ ! -s /etc/munge/munge.key ]; then
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
        chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
        chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged --force
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
        cannot "munged did not start"
    fi
}

MARKER="# Written by rlhf scripts/slurm-local.sh"

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        cannot "$CONF is another cluster's configuration; not replacing it (run the tests where SLURM is ours to set up)"
    fi
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" /etc/slurm
    local memory_mb
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$CONF" <<EOF
$MARKER: one node, loopback only, no accounting.
ClusterName=rlhf-local
SlurmctldHost=$NODE
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# Without accounting, finished jobs are visible to scontrol only while younger than MinJobAge.
MinJobAge=86400
# A job whose parent failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
# Seconds between SIGTERM and SIGKILL when a job is cancelled, preempted or requeued: time for
# the ranks to save a checkpoint.
KillWait=60
# CPUs: not `nproc`, which honours OMP_NUM_THREADS (1 under the test workers): a 1-CPU node leaves
# every 2-rank job pending forever.
NodeName=$NODE CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install
    if ready; then echo "slurm-local: running ($CONF)"; return; fi
    [ "$(id -u)" = 0 ] || cannot "starting slurmctld and slurmd needs root"
    start_munge
    write_conf
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 300); do
        if ready; then echo "slurm-local: running ($CONF)"; return; fi
        # A node left down by an earlier, stopped cluster comes back here.
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    cannot "slurmctld/slurmd did not become ready; see $STATE_DIR/slurmctld.log and $STATE_DIR/slurmd.log"
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    # A daemon still shutting down would be taken for a running one by the next start.
    for _ in $(seq 100); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.1
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
