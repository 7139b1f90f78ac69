#!/usr/bin/env bash
# A single-node SLURM on this machine, for the integration tests: no systemd, no accounting.
#
#   scripts/slurm_testbed.sh start   install (apt, as root) if needed, configure, start
#   scripts/slurm_testbed.sh stop    stop the daemons by PID
#   scripts/slurm_testbed.sh status  sinfo
#
# munged, slurmctld and slurmd run on 127.0.0.1; the node advertises one fake GPU
# (gres.conf: File=/dev/null) so that --gres=gpu:1 directives are really scheduled.
# State, logs and PID files live in $SLURM_TESTBED_DIR (default /tmp/pingu-slurm).
set -euo pipefail

STATE="${SLURM_TESTBED_DIR:-/tmp/pingu-slurm}"
CONF_DIR=/etc/slurm
HOST="$(hostname -s)"

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
    local cpus memory
    cpus="$(nproc)"
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$CONF_DIR/slurm.conf" <<CONF
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
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
    echo "Name=gpu File=/dev/null" > "$CONF_DIR/gres.conf"
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
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
            echo "slurm_testbed: up ($HOST, $(nproc) CPUs, gres gpu:1)"
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

stop() {
    for name in slurmd slurmctld; do
        if [ -f "$STATE/$name.pid" ]; then
            kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        fi
    done
    pkill -x munged 2>/dev/null || true
    echo "slurm_testbed: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
