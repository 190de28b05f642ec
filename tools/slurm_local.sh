#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `make reproduce LAUNCHER=slurm` and
# `make segment-slurm` (tests/experiments/test_slurm.py) and for trying them by hand.
#
#   bash tools/slurm_local.sh install   # Debian's slurm-wlm and munge, with apt-get, only if missing (root)
#   bash tools/slurm_local.sh start     # munged, slurmctld, slurmd on localhost; prints the SLURM_CONF line
#   bash tools/slurm_local.sh status
#   bash tools/slurm_local.sh stop      # stops exactly the daemons start started (their pid files)
#
# Why a private folder (SLURM_LOCAL_DIR, default /tmp/redseg-slurm): everything lives there, the
# configuration, the munge key and socket, the state and the logs, so nothing in /etc is written and
# a system munged or a real cluster's configuration on the same machine is never touched. Clients
# find the cluster through SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf (start prints it).
#
# The node: NodeName=localhost, CPUs=2 (SLURM_LOCAL_CPUS; at most what the machine has),
# RealMemory 90 % of MemTotal, ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no
# cgroups: containers rarely have them), select/cons_tres with CR_CPU (a task takes one CPU, so
# two tasks run side by side on two), no accounting (sacct then has nothing to say). Daemons run as
# root, so start needs root. Every wait is bounded (SLURM_LOCAL_TIMEOUT seconds, default 60).
#
# Requeued jobs: SLURM holds a requeued job for the job credential's lifetime plus a second
# (AuthInfo=cred_expire, SLURM's default 120 s, at least 5) before it may start again, so that the
# new start's launch credential is newer than the revocation of the old start's; slurmd refuses a
# launch whose credential is not ("already killed, do not launch batch job") and SLURM cancels the
# job. This cluster sets cred_expire to SLURM_LOCAL_CRED_EXPIRE seconds (default 30), so that a
# requeued task starts again within the tests' time; never bypass the hold with StartTime=now.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/redseg-slurm}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CTLD_PORT=${SLURM_LOCAL_PORT:-6817}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-30}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; }

install() {
    if have_slurm; then echo "slurm-wlm and munge are installed"; return 0; fi
    [[ $(id -u) -eq 0 ]] || die "installing slurm-wlm and munge needs root (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get here: install SLURM (slurmctld, slurmd, sbatch) and munge yourself"
    echo "installing slurm-wlm and munge with apt-get (each step bounded to ${INSTALL_TIMEOUT:-900} s)"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's packages start their system daemons at install time, and slurmctld's postinst fails
    # when that start fails (no /etc/slurm/slurm.conf): a policy-rc.d that forbids starts, as in
    # Docker images, for the install only. This script's daemons are started by `start`.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# tools/slurm_local.sh install: no daemon starts while installing (removed after)\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    timeout "${INSTALL_TIMEOUT:-900}" apt-get update -q
    timeout "${INSTALL_TIMEOUT:-900}" apt-get install -y -q --no-install-recommends slurm-wlm munge
    have_slurm || die "apt-get finished but slurmctld, slurmd, sbatch or munged is still missing"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every half second until it succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.5
    done
    echo "$what"
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local cpus mem
    cpus=${SLURM_LOCAL_CPUS:-2}
    ((cpus <= $(nproc))) || cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    # SLURM ignores a cred_expire under 5 (and uses 120): refuse it here instead
    if ! [[ $CRED_EXPIRE =~ ^[0-9]+$ ]] || ((CRED_EXPIRE < 5)); then
        die "SLURM_LOCAL_CRED_EXPIRE=$CRED_EXPIRE: seconds, at least 5 (SLURM's minimum for cred_expire)"
    fi
    cat >"$CONF" <<EOF
# Written by tools/slurm_local.sh: a one-node cluster in $DIR (nothing in /etc).
ClusterName=redseg-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    have_slurm || die "SLURM is not installed (slurmctld, slurmd, sbatch, munged): bash tools/slurm_local.sh install"
    [[ $(id -u) -eq 0 ]] || die "start runs munged, slurmctld and slurmd as root: run it as root"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munge/munged.pid"; then
        echo "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop >/dev/null 2>&1 || true
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$DIR/munge/munge.key"
    write_conf
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for "$TIMEOUT" "munged up" test -S "$DIR/munge/munge.socket" || die "munged did not start: $DIR/munge/munged.log"
    # -c: a fresh controller state (no jobs of an earlier start); -i: ignore a stale slurmd state
    slurmctld -c -f "$CONF"
    wait_for "$TIMEOUT" "slurmctld up" scontrol ping || die "slurmctld did not answer within $TIMEOUT s: $DIR/slurmctld.log"
    slurmd -f "$CONF" -N localhost
    node_idle() { [[ $(sinfo -h -n localhost -o %T 2>/dev/null) == idle* ]]; }
    if ! wait_for "$TIMEOUT" "node localhost idle" node_idle; then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        wait_for 10 "node localhost idle" node_idle || die "node localhost not idle ($(sinfo -h -o '%T %E')): $DIR/slurmd.log"
    fi
    echo "one-node SLURM cluster up in $DIR; for sbatch, squeue, scancel:"
    echo "export SLURM_CONF=$CONF"
}

stop_one() {  # stop_one PIDFILE NAME: TERM, then KILL after the timeout
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        if ! wait_for "$TIMEOUT" "$name stopped" bash -c "! kill -0 $pid"; then
            echo "$name (pid $pid) did not stop within $TIMEOUT s: killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop() {
    [[ -f $CONF ]] || { echo "nothing started in $DIR"; return 0; }
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --user=root >/dev/null 2>&1 || true  # this private cluster's jobs only
    fi
    stop_one "$DIR/slurmd.pid" slurmd
    stop_one "$DIR/slurmctld.pid" slurmctld
    stop_one "$DIR/munge/munged.pid" munged
}

status() {
    local d
    for d in slurmctld:"$DIR/slurmctld.pid" slurmd:"$DIR/slurmd.pid" munged:"$DIR/munge/munged.pid"; do
        if alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"; else echo "${d%%:*}: not running"; fi
    done
    if alive "$DIR/slurmctld.pid"; then sinfo; fi
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash tools/slurm_local.sh install|start|stop|status (SLURM_LOCAL_DIR=$DIR)" >&2; exit 2 ;;
esac
