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
#
# It leaves a real SLURM alone: slurm.conf and gres.conf in $SLURM_CONF_DIR (default
# /etc/slurm, where SLURM looks; the script points its own SLURM commands there through
# SLURM_CONF) carry the line in MARKER below. If either file exists without it (the
# machine has a SLURM of its own), `start` refuses, changing nothing, and says how to
# run the SLURM tier elsewhere; `stop` refuses to stop daemons that are not the
# testbed's. With PINGU_SLURM_TESTBED_FORCE=1, `start` instead backs each such file up
# to NAME.pingu-backup (never over an earlier backup; a file that was not there gets a
# NAME.pingu-none marker) and takes the machine's SLURM daemons down for the testbed's;
# `stop` then restores the files (the machine's own daemons are left for you to start).
set -euo pipefail

STATE="${SLURM_TESTBED_DIR:-/tmp/pingu-slurm}"
CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
export SLURM_CONF="$CONF_DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="${SLURM_TESTBED_CPUS:-16}"
GPUS="${SLURM_TESTBED_GPUS:-4}"
MARKER="# written by pingu-dask scripts/slurm_testbed.sh"
BACKUP=.pingu-backup  # NAME.pingu-backup: the machine's own NAME, while the testbed runs
NONE=.pingu-none      # NAME.pingu-none: there was no NAME before the testbed (forced)
FILES=(slurm.conf gres.conf)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "slurm_testbed: must run as root (it installs packages and writes $CONF_DIR)" >&2
        exit 1
    fi
}

# True when the file carries the testbed's marker (or is what earlier versions of
# this script wrote: slurm.conf headed "# Written by pingu-dask's ...", gres.conf the
# single fake-GPU line).
written_by_testbed() {
    local path="$1"
    grep -qxF "$MARKER" "$path" && return 0
    head -n 1 "$path" | grep -q "^# Written by pingu-dask's scripts/slurm_testbed.sh" && return 0
    [ "$(basename "$path")" = gres.conf ] \
        && [ "$(grep -cv '^[[:space:]]*$' "$path")" -eq 1 ] \
        && grep -qxE 'Name=gpu File=/dev/fakegpu\[0-[0-9]+\]' "$path"
}

# The configuration files here that the testbed did not write (and has not backed up).
foreign_files() {
    local name
    for name in "${FILES[@]}"; do
        if [ -e "$CONF_DIR/$name" ] && ! written_by_testbed "$CONF_DIR/$name"; then
            echo "$CONF_DIR/$name"
        fi
    done
}

refuse_start() {
    {
        echo "slurm_testbed: refusing to start: not written by this testbed (no line \"$MARKER\"):"
        printf '    %s\n' "$@"
        echo "  This machine has a SLURM of its own; the testbed would replace its configuration"
        echo "  and restart its daemons. Nothing was changed. The SLURM tests (tests/test_slurm.py)"
        echo "  will fail saying that this SLURM is not the testbed's; the rest of the suite runs."
        echo "  To run the SLURM tier:"
        echo "    - on a machine or container without a SLURM of its own, as root: make test"
        echo "      (e.g. a fresh Debian/Ubuntu container with the checkout in it)"
        echo "    - or here, taking this machine's SLURM down meanwhile:"
        echo "      PINGU_SLURM_TESTBED_FORCE=1 $0 start"
        echo "      (backs the files up to NAME$BACKUP; \`$0 stop\` puts them back)"
    } >&2
    exit 3
}

# Before anything is written: refuse, or (forced) back the machine's files up.
claim_configuration() {
    local foreign path name
    mapfile -t foreign < <(foreign_files)
    [ "${#foreign[@]}" -eq 0 ] && return 0
    [ "${PINGU_SLURM_TESTBED_FORCE:-0}" = 1 ] || refuse_start "${foreign[@]}"
    for path in "${foreign[@]}"; do
        if [ -e "$path$BACKUP" ] && ! cmp -s "$path" "$path$BACKUP"; then
            echo "slurm_testbed: $path$BACKUP exists and differs from $path; not overwriting" \
                "a backup: put the right one back as $path first" >&2
            exit 3
        fi
    done
    for path in "${foreign[@]}"; do
        cp -p "$path" "$path$BACKUP"
        echo "slurm_testbed: PINGU_SLURM_TESTBED_FORCE=1: $path backed up to $path$BACKUP" \
            "(\`$0 stop\` restores it)"
    done
    for name in "${FILES[@]}"; do
        [ -e "$CONF_DIR/$name" ] || : > "$CONF_DIR/$name$NONE"
    done
}

# True when a forced start left backups (or absent-file markers) to restore.
forced() {
    local name
    for name in "${FILES[@]}"; do
        [ -e "$CONF_DIR/$name$BACKUP" ] || [ -e "$CONF_DIR/$name$NONE" ] && return 0
    done
    return 1
}

restore_configuration() {
    local name path
    for name in "${FILES[@]}"; do
        path="$CONF_DIR/$name"
        if [ -e "$path$BACKUP" ]; then
            mv -f "$path$BACKUP" "$path"
            echo "slurm_testbed: restored $path"
        elif [ -e "$path$NONE" ]; then
            rm -f "$path" "$path$NONE"
            echo "slurm_testbed: removed the testbed's $path (there was none before)"
        fi
    done
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
$MARKER
# A one-node test cluster; the testbed rewrites this file (see the script's header).
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
    printf '%s\nName=gpu File=/dev/fakegpu[0-%s]\n' "$MARKER" "$last" > "$STATE/gres.conf.new"
    CHANGED=0
    for name in "${FILES[@]}"; do
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
    claim_configuration
    install
    configure
    if ! pgrep -x munged >/dev/null; then
        local munged
        munged="$(command -v munged || echo /usr/sbin/munged)"
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- "$munged"
        else
            "$munged" --force
        fi
        touch "$STATE/munged.started"  # stop ends only a munged the testbed started
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
    local foreign
    if forced; then
        stop_daemons
        if [ -f "$STATE/munged.started" ]; then
            pkill -x munged 2>/dev/null || true
        fi
        rm -f "$STATE/munged.started"
        restore_configuration
        echo "slurm_testbed: stopped; start this machine's own SLURM daemons again" \
            "(e.g. systemctl start slurmctld slurmd)"
        return
    fi
    mapfile -t foreign < <(foreign_files)
    if [ "${#foreign[@]}" -gt 0 ]; then
        echo "slurm_testbed: not stopping anything: ${foreign[*]} not written by this" \
            "testbed, so the SLURM daemons here are this machine's own" >&2
        exit 3
    fi
    stop_daemons
    pkill -x munged 2>/dev/null || true
    rm -f "$STATE/munged.started"
    echo "slurm_testbed: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
