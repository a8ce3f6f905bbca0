#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to test profiles/slurm without a real cluster:
#
#   bash profiles/slurm/local-cluster.sh install  # only install slurm-wlm and munge (Debian, root) if missing
#   bash profiles/slurm/local-cluster.sh start    # install if missing, configure, start, wait for the node
#   bash profiles/slurm/local-cluster.sh status   # daemons and node state; exit 0 when jobs can run
#   bash profiles/slurm/local-cluster.sh stop     # stop the daemons this script started
#
# It uses Debian's slurm-wlm and munge, no accounting database (so the Snakemake SLURM plugin needs
# --slurm-status-command squeue --slurm-no-account) and no cgroups (proctrack/linuxproc, task/none),
# so it also works in a container. GPUs are never declared: the node is CPU-only.
# Every step checks before it acts, so `start` may be run again at any time.
# Environment: LOCAL_SLURM_PARTITION (default "debug"), LOCAL_SLURM_WAIT (seconds to wait, default 60).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# Written by profiles/slurm/local-cluster.sh"
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
WAIT=${LOCAL_SLURM_WAIT:-60}
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
LOG_DIR=/var/log/slurm

die() {
    echo "local-cluster.sh: ERROR: $*" >&2
    exit 1
}
say() { echo "local-cluster.sh: $*"; }

# A daemon counts as running when its pid file names a live process.
# (The file may vanish between the test and the read while its daemon exits.)
running() { [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    for bin in slurmctld slurmd sinfo sbatch squeue; do
        command -v "$bin" >/dev/null || { missing+=(slurm-wlm); break; }
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get: install SLURM and munge by hand"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Package lists may be missing or stale on a fresh image: update once, then retry.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/local-cluster-apt.log 2>&1; then
        apt-get update -q >>/tmp/local-cluster-apt.log 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/local-cluster-apt.log 2>&1 \
            || { tail -20 /tmp/local-cluster-apt.log >&2; die "apt-get install ${missing[*]} failed (log: /tmp/local-cluster-apt.log)"; }
    fi
    for bin in munged slurmctld slurmd sinfo sbatch squeue; do
        command -v "$bin" >/dev/null || die "$bin still missing after installing ${missing[*]}"
    done
}

start_munge() {
    id munge >/dev/null 2>&1 || die "no user 'munge' (is the munge package installed?)"
    # /run is a tmpfs on most systems: the socket directory has to be recreated after each boot.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if ! running "$MUNGE_PID"; then
        say "starting munged"
        # munged refuses to run as root by design; stdio to /dev/null so callers that capture our
        # output (pytest) do not wait on the daemon.
        runuser -u munge -- munged </dev/null >/dev/null 2>&1 || die "munged failed to start (see /var/log/munge/munged.log)"
    fi
    local i
    for i in $(seq 1 20); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munge does not work: 'munge -n | unmunge' fails (see /var/log/munge/munged.log)"
}

write_conf() {
    local node host tmp
    host=$(hostname -s)
    # `slurmd -C` prints this machine's NodeName/CPUs/sockets/RealMemory line; any Gres is dropped
    # because no gres.conf is written (the test cluster is CPU-only).
    node=$(slurmd -C 2>/dev/null | grep '^NodeName=' | sed -e 's/ Gres=[^ ]*//') \
        || die "'slurmd -C' failed: cannot read this machine's CPUs and memory"
    [ -n "$node" ] || die "'slurmd -C' printed no NodeName line"
    mkdir -p /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER: a one-node cluster for tests.
ClusterName=localcluster
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: these work inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct has nothing to read, so status comes from squeue.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# squeue forgets a finished job after MinJobAge seconds; the Snakemake plugin needs it for longer
# than 3 status-check intervals to see the job's final state.
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        rm -f "$tmp"
        die "$CONF exists and was not written by this script: refusing to overwrite a real SLURM configuration"
    fi
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    say "writing $CONF"
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    return 0
}

stop_daemon() {
    local name=$1 pidfile=$2 i
    running "$pidfile" || return 0
    say "stopping $name"
    kill "$(cat "$pidfile")"
    for i in $(seq 1 40); do
        running "$pidfile" || { rm -f "$pidfile"; return 0; }
        sleep 0.25
    done
    die "$name (pid $(cat "$pidfile")) did not stop"
}

# Empty while slurmctld does not answer yet (never an error, which `set -e` would turn into an exit).
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1 || true; }

start() {
    need_root
    install_packages
    start_munge
    if write_conf; then
        # A changed node or partition line needs fresh daemons.
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    if ! running "$CTLD_PID"; then
        say "starting slurmctld"
        slurmctld </dev/null >/dev/null 2>&1 || { tail -20 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld failed to start (log: $LOG_DIR/slurmctld.log)"; }
    fi
    if ! running "$SLURMD_PID"; then
        say "starting slurmd"
        slurmd </dev/null >/dev/null 2>&1 || { tail -20 "$LOG_DIR/slurmd.log" >&2 || true; die "slurmd failed to start (log: $LOG_DIR/slurmd.log)"; }
    fi
    local state="" t=0 node
    while [ "$t" -lt "$WAIT" ]; do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing)
                say "SLURM is up: partition '$PARTITION', node $state"
                sinfo
                return 0 ;;
            down* | drain* | drained*)
                # A restarted slurmd leaves the node down ("unexpectedly rebooted"): bring it back.
                node=$(sinfo -h -N -o '%N' 2>/dev/null | head -1 || true)
                scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
        t=$((t + 1))
    done
    tail -10 "$LOG_DIR/slurmctld.log" >&2 || true
    tail -10 "$LOG_DIR/slurmd.log" >&2 || true
    die "the node did not become idle within ${WAIT}s (last state: '${state:-none}'); logs in $LOG_DIR"
}

stop() {
    need_root
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
}

status() {
    local ok=0 name pidfile state
    for pair in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        name=${pair%%:*}
        pidfile=${pair#*:}
        if running "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; ok=1; fi
    done
    state=$(node_state)
    echo "node: ${state:-unknown}"
    case "$state" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
    return "$ok"
}

case "${1:-}" in
    install) need_root; install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
