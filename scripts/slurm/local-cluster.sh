#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `launcher=slurm` and to test against the real scheduler.
#
#   sudo scripts/slurm/local-cluster.sh start    # install (Debian packages) if missing, configure, start, wait for idle
#   sudo scripts/slurm/local-cluster.sh status   # daemons and node state; exit status 0 when the node takes jobs
#   sudo scripts/slurm/local-cluster.sh stop     # cancel the jobs, stop the daemons by their process ids
#
# Needs root on Debian (or Ubuntu): it installs slurmctld, slurmd, slurm-client and munge with apt-get, and writes
# /etc/slurm/slurm.conf. It refuses to touch a slurm.conf it did not write, so it never reconfigures a real cluster
# node. No systemd needed: the daemons run in the background, their state and logs are in $LOCAL_SLURM_DIR
# (default /var/lib/lottery-slurm). Requeued jobs start again after ~14 s (AuthInfo=cred_expire=10, scheduler every
# second) instead of SLURM's default ~2 min. No accounting database: `sacct` does not work here, see docs/clusters.md.
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/var/lib/lottery-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by lottery scripts/slurm/local-cluster.sh"
PARTITION=debug
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

# The daemon whose pid FILE holds is running (not a stale file whose pid now belongs to another program).
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

check_host() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts the SLURM daemons)"
    command -v apt-get >/dev/null && [ -f /etc/debian_version ] || die "needs a Debian or Ubuntu machine (apt-get)"
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
    if pid_alive /run/munge/munged.pid; then return; fi
    # Without systemd nobody creates munged's runtime folder; it must belong to the munge user.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

write_conf() {
    local host node
    host=$(hostname -s)
    # slurmctld and slurmd find each other by the node's name.
    if ! getent hosts "$host" >/dev/null; then
        say "adding $host to /etc/hosts (it did not resolve)"
        echo "127.0.1.1 $host" >>/etc/hosts
    fi
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
    fi
    mkdir -p /etc/slurm "$STATE"/{ctld,spool,log}
    # The node as slurmd sees it: CPUs, sockets, cores, threads, memory.
    node=$(slurmd -C | head -n 1)
    cat >"$CONF" <<EOF
$MARK
ClusterName=lottery-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job may start only cred_expire + 1 s after it ended (default 120 s); the scheduler looks every second.
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -n 1; }

start() {
    check_host
    if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; then
        say "already running"
    else
        install_packages
        start_munge
        write_conf
        pid_alive "$STATE/slurmctld.pid" || slurmctld -c   # -c: no jobs left over from an earlier start
        pid_alive "$STATE/slurmd.pid" || slurmd
    fi
    local i state=""
    for i in $(seq 60); do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*) say "node $(hostname -s) is $state (partition $PARTITION)"; return 0 ;;
            drain*|down*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node not idle after 60 s (state: ${state:-no answer}); logs: $STATE/log"
}

stop() {
    if pid_alive "$STATE/slurmctld.pid"; then
        # Jobs first, so that no job step outlives the daemons.
        local jobs i
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 30); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    local f pid
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill "$pid"
            for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
    done
    say "stopped"
}

status() {
    local ok=0 f
    for f in /run/munge/munged.pid "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
        if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else echo "$(basename "$f" .pid): not running"; ok=1; fi
    done
    [ $ok -eq 0 ] || return 1
    sinfo -N -o "%N %P %T %c %m %G" || return 1
    case "$(node_state)" in idle*|mixed*|allocated*) return 0 ;; *) return 1 ;; esac
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
