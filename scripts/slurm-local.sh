#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, on loopback, without systemd: for the SLURM tests and
# for trying `rlhf submit` on a laptop. Installs Debian's slurm-wlm and munge when missing (root).
#
#   scripts/slurm-local.sh start    install if needed, configure, start (reuses a running cluster)
#   scripts/slurm-local.sh start --no-install
#                                   install nothing and write nothing under /etc: use the running
#                                   cluster, or start (root) the one this script configured before
#   scripts/slurm-local.sh stop     stop the daemons
#   scripts/slurm-local.sh status   exit 0 when the cluster takes jobs
#
# Each change to the machine's packages or /etc is reported on stdout as a "slurm-local: changed: ..."
# line. Exit status 3 means SLURM cannot be set up here (not root, no Debian packages, or nothing to
# use under --no-install): the tests skip with the reason printed on stderr.
set -euo pipefail

STATE_DIR=${RLHF_SLURM_DIR:-/tmp/rlhf-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

NO_INSTALL=0

cannot() { echo "slurm-local: $*" >&2; exit 3; }
changed() { echo "slurm-local: changed: $*"; }

ready() {
    # sinfo can say idle before slurmd answers, so ask slurmd too.
    scontrol show slurmd >/dev/null 2>&1 &&
        sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

install() {
    command -v sbatch >/dev/null && command -v munged >/dev/null && command -v slurmd >/dev/null && return
    [ "$NO_INSTALL" = 0 ] || cannot "slurm-wlm and munge are not installed (--no-install installs nothing)"
    [ "$(id -u)" = 0 ] || cannot "slurm-wlm and munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package index may be stale or absent on a fresh machine.
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } ||
        cannot "apt-get could not install slurm-wlm and munge"
    changed "installed slurm-wlm and munge (apt-get)"
}

start_munge() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    if [ "$NO_INSTALL" = 1 ]; then
        [ -s /etc/munge/munge.key ] || cannot "munged is not running and there is no /etc/munge/munge.key (--no-install writes nothing under /etc)"
    else
        mkdir -p /etc/munge
        if [ ! -s /etc/munge/munge.key ]; then
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
            changed "wrote /etc/munge/munge.key"
        fi
        # -c: say only what was actually changed.
        if [ -n "$(chown -Rc munge:munge /etc/munge; chmod -c 0700 /etc/munge; chmod -c 0400 /etc/munge/munge.key)" ]; then
            changed "set the owner and modes of /etc/munge"
        fi
    fi
    # munged's runtime folders (/run is not kept across a container's restarts).
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    cannot "munged did not start"
}

MARKER="# Written by rlhf scripts/slurm-local.sh"

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        cannot "$CONF is another cluster's configuration; not replacing it (run the tests where SLURM is ours to set up)"
    fi
    if [ "$NO_INSTALL" = 1 ]; then
        [ -f "$CONF" ] || cannot "no SLURM cluster is running and there is no $CONF (--no-install writes nothing under /etc)"
        # The folders the existing configuration names (RLHF_SLURM_DIR may have changed since).
        awk -F= '/^(StateSaveLocation|SlurmdSpoolDir)=/ {print $2}' "$CONF" | xargs -r mkdir -p
        return
    fi
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" /etc/slurm
    local text
    text=$(conf_text)
    [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$text" ] && return
    printf '%s\n' "$text" >"$CONF"
    changed "wrote $CONF"
}

conf_text() {
    local memory_mb
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat <<EOF
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
    [ "$(id -u)" = 0 ] || cannot "no SLURM cluster is running here and starting slurmctld and slurmd needs root"
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

usage() { echo "usage: $0 start [--no-install] | stop | status" >&2; exit 2; }

action=${1:-start}
if [ $# -gt 0 ]; then shift; fi
for arg in "$@"; do
    case "$action $arg" in
        "start --no-install") NO_INSTALL=1 ;;
        *) usage ;;
    esac
done
case "$action" in
    start) start ;;
    stop) stop ;;
    status) ready ;;
    *) usage ;;
esac
