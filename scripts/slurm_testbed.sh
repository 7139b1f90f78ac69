#!/usr/bin/env bash
# A single-node SLURM on this machine, for the integration tests: no systemd, no accounting.
#
#   scripts/slurm_testbed.sh start   install (apt, as root) if needed, configure, start
#   scripts/slurm_testbed.sh stop    stop the daemons by PID
#   scripts/slurm_testbed.sh status  sinfo
#
# munged, slurmctld and slurmd run on 127.0.0.1. The node is made to look like a GPU
# node: $SLURM_TESTBED_CPUS CPUs (default 16, more than this machine has, through
# SlurmdParameters=config_overrides) and $SLURM_TESTBED_GPUS fake GPUs (default 4:
# character devices /dev/fakegpuN, like /dev/null), so that --cpus-per-task and
# --gres=gpu:N directives are really scheduled and several 8-core GPU jobs fit at once.
# KillWait is SLURM's default (30 s): what a driver has between SIGTERM and SIGKILL.
# A changed configuration restarts the daemons. State, logs and PID files live in
# $SLURM_TESTBED_DIR (default /tmp/pingu-slurm).
set -euo pipefail

STATE="${SLURM_TESTBED_DIR:-/tmp/pingu-slurm}"
CONF_DIR=/etc/slurm
HOST="$(hostname -s)"
CPUS="${SLURM_TESTBED_CPUS:-16}"
GPUS="${SLURM_TESTBED_GPUS:-4}"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "slurm_testbed: must run as root (it installs packages and writes $CONF_DIR)" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "slurm_testbed: installing slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
    mkdir -p "$STATE"/{spool,state,log} "$CONF_DIR" /run/munge /var/log/munge /var/lib/munge
    local memory last
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    last=$(( GPUS - 1 ))
    for i in $(seq 0 "$last"); do
        [ -e "/dev/fakegpu$i" ] || mknod "/dev/fakegpu$i" c 1 3
    done
    cat > "$STATE/slurm.conf.new" <<CONF
# Written by pingu-dask's scripts/slurm_testbed.sh: a one-node test cluster.
ClusterName=pingu-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
GresTypes=gpu
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=30
MinJobAge=300
JobRequeue=1
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${memory} Gres=gpu:${GPUS} State=UNKNOWN
PartitionName=gpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
    echo "Name=gpu File=/dev/fakegpu[0-${last}]" > "$STATE/gres.conf.new"
    CHANGED=0
    for name in slurm.conf gres.conf; do
        if ! cmp -s "$STATE/$name.new" "$CONF_DIR/$name"; then
            mv "$STATE/$name.new" "$CONF_DIR/$name"
            CHANGED=1
        else
            rm -f "$STATE/$name.new"
        fi
    done
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
}

start() {
    need_root
    install
    configure
    if ! pgrep -x munged >/dev/null; then
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
    fi
    if [ "$CHANGED" = 1 ] && pgrep -x slurmctld >/dev/null; then
        echo "slurm_testbed: configuration changed, restarting slurmctld and slurmd"
        stop_daemons
    fi
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
            echo "slurm_testbed: up ($HOST, $CPUS CPUs advertised on $(nproc) real, gres gpu:$GPUS)"
            sinfo
            return
        fi
        # A node left down or drained by an earlier run comes back with resume.
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm_testbed: SLURM did not come up; logs in $STATE/log" >&2
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

stop_daemons() {
    for name in slurmd slurmctld; do
        if [ -f "$STATE/$name.pid" ]; then
            kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        fi
        pkill -x "$name" 2>/dev/null || true
    done
    for _ in $(seq 1 30); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.5
    done
}

stop() {
    stop_daemons
    pkill -x munged 2>/dev/null || true
    echo "slurm_testbed: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
