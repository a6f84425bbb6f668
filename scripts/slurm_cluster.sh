#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests in tests/test_slurm.py.
#
#   bash scripts/slurm_cluster.sh install   # root: apt-get the Debian packages (once)
#   bash scripts/slurm_cluster.sh start     # munged, MariaDB, slurmdbd, slurmctld, 2 x slurmd
#   bash scripts/slurm_cluster.sh status    # what runs: daemons, sinfo, squeue
#   bash scripts/slurm_cluster.sh stop      # stop all of them, leave nothing running
#
# No systemd: every daemon runs as a plain background process, with its pid, log and spool
# files in one state dir ($SLURM_CI_STATE, default /var/spool/slurm-ci). Two emulated nodes,
# n1 and n2, are two slurmd daemons on this host on distinct ports (`slurmd -N n1`); each
# declares the machine's real CPUs. Partitions: `low` (the default), `lowgrace` and `high`; a job
# in `high` preempts (requeues) jobs in `low` at once, and jobs in `lowgrace` after a grace time
# of $SLURM_CI_GRACE_TIME s (GraceTime, default 20). Accounting: slurmdbd on MariaDB, so `sacct`
# works.
# The configs are written from scripts/slurm/*.conf.in to /etc/slurm (where the SLURM commands
# look). `start` and `stop` are idempotent.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLURM_CI_STATE:-/var/spool/slurm-ci}"
CLUSTER="${SLURM_CI_CLUSTER:-ci}"
ACCOUNT="${SLURM_CI_ACCOUNT:-ci}"
ETC=/etc/slurm
CTLD_PORT=6817
DBD_PORT=6819
N1_PORT=6818
N2_PORT=6820
DB_PORT=3306
DB_USER=slurm
KILL_WAIT="${SLURM_CI_KILL_WAIT:-30}"
GRACE_TIME="${SLURM_CI_GRACE_TIME:-20}"
MIN_JOB_AGE="${SLURM_CI_MIN_JOB_AGE:-30}"
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MYSQL_SOCKET=/run/mysqld/mysqld.sock
CTLD_RECOVERED=0

say() { printf 'slurm_cluster: %s\n' "$*"; }
die() { printf 'slurm_cluster: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (it writes /etc/slurm and starts system daemons); run it with sudo"
}

pid_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ]; }
pid_from() { [ -s "$1" ] && [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }

# ----------------------------------------------------------------------------------------------
cmd_install() {
    need_root install
    command -v apt-get >/dev/null || die "no apt-get on this machine: install ${PACKAGES[*]} (SLURM, munge, MariaDB) with its package manager"
    command -v dpkg-query >/dev/null || die "no dpkg-query: this is not a Debian-like system"
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "already installed: ${PACKAGES[*]}"
        return 0
    fi
    say "installing ${missing[*]}"
    # Keep the packages' scripts from starting daemons (no systemd here; `start` runs them).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
    [ "$made_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get failed (exit $rc): could not install ${missing[*]}"
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || die "$p is still not installed"
    done
    say "installed: $(dpkg-query -W -f='${Package} ${Version}, ' "${PACKAGES[@]}")"
}

check_installed() {
    local b
    for b in munged mariadbd slurmdbd slurmctld slurmd sbatch sacctmgr; do
        command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] ||
            die "$b not found: run 'bash scripts/slurm_cluster.sh install' first (as root)"
    done
}

# ----------------------------------------------------------------------------------------------
start_munge() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s "$key" ]; then
        say "creating the munge key $key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge && chmod 0400 "$key" && chmod 0755 /run/munge
    local pid
    pid="$(pid_from /run/munge/munged.pid)"
    if pid_alive "$pid" && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        say "munged already runs (pid $pid)"
        return
    fi
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    local i
    for i in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"
    say "munged started (pid $(pid_from /run/munge/munged.pid))"
}

mysql_up() { mariadb-admin --socket="$MYSQL_SOCKET" ping >/dev/null 2>&1; }

start_mariadb() {
    # Its pid and log files in a folder of the state dir that the mysql user owns.
    mkdir -p /run/mysqld "$STATE/mariadb"
    chown mysql:mysql /run/mysqld "$STATE/mariadb"
    if mysql_up; then
        say "MariaDB already runs (pid $(pid_from "$STATE/mariadb/mariadb.pid"))"
    else
        if [ ! -d /var/lib/mysql/mysql ]; then
            say "initialising the MariaDB data dir"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb/install.log" 2>&1
        fi
        # A plain background daemon: no systemd, no mysqld_safe (it would restart it).
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$MYSQL_SOCKET" \
            --pid-file="$STATE/mariadb/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
            --log-error="$STATE/mariadb/mariadb.log" </dev/null >/dev/null 2>&1 &
        local i
        for i in $(seq 150); do
            mysql_up && break
            sleep 0.2
        done
        mysql_up || die "MariaDB did not start (see $STATE/mariadb/mariadb.log)"
        say "MariaDB started (pid $(pid_from "$STATE/mariadb/mariadb.pid"))"
    fi
    mariadb --socket="$MYSQL_SOCKET" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$(db_password)';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$(db_password)';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

db_password() {
    # A random password made once per machine, readable by root only.
    local f="$STATE/db_password"
    if [ ! -s "$f" ]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$f")
    fi
    cat "$f"
}

fill() { # template -> stdout, @VAR@ replaced
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@N1_PORT@|$N1_PORT|g" -e "s|@N2_PORT@|$N2_PORT|g" -e "s|@DB_USER@|$DB_USER|g" \
        -e "s|@DB_PASS@|$(db_password)|g" -e "s|@KILL_WAIT@|$KILL_WAIT|g" -e "s|@GRACE_TIME@|$GRACE_TIME|g" \
        -e "s|@MIN_JOB_AGE@|$MIN_JOB_AGE|g" -e "s|@HARDWARE@|$(hardware)|g" "$1"
}

hardware() {
    # The machine's real CPU layout (slurmd -C), and memory: 40% of it per emulated node (the
    # two share this host; declaring more than there is would drain them).
    local line cpus boards sockets cores threads mem
    line="$(slurmd -C 2>/dev/null | head -1)"
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")"
    boards="$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$line")"
    sockets="$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$line")"
    cores="$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$line")"
    threads="$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$line")"
    mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.4}' /proc/meminfo)"
    if [ -n "$cpus" ] && [ -n "$sockets" ] && [ -n "$cores" ] && [ -n "$threads" ]; then
        echo "CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem"
    else
        echo "CPUs=$(nproc --all) RealMemory=$mem"
    fi
}

write_configs() {
    mkdir -p "$ETC" "$STATE"/{run,log,slurmctld} "$STATE/slurmd-n1" "$STATE/slurmd-n2"
    local tmp
    tmp="$(mktemp)"
    fill "$HERE/slurm/slurm.conf.in" >"$tmp" && install -m 0644 "$tmp" "$ETC/slurm.conf"
    fill "$HERE/slurm/slurmdbd.conf.in" >"$tmp" && install -m 0600 "$tmp" "$ETC/slurmdbd.conf"
    rm -f "$tmp"
}

dbd_up() { sacctmgr -n -P list cluster >/dev/null 2>&1; }

start_slurmdbd() {
    local pid
    pid="$(pid_from "$STATE/run/slurmdbd.pid")"
    if pid_alive "$pid" && dbd_up; then
        say "slurmdbd already runs (pid $pid)"
    else
        /usr/sbin/slurmdbd
        local i
        for i in $(seq 150); do
            dbd_up && break
            sleep 0.2
        done
        dbd_up || die "slurmdbd does not answer (see $STATE/log/slurmdbd.log)"
        say "slurmdbd started (pid $(pid_from "$STATE/run/slurmdbd.pid"))"
    fi
    # The cluster, an account and root in it: sacct shows what the cluster runs.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="test cluster" Organization=ci >/dev/null
    fi
    if ! sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=user | grep -qx root; then
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    local pid
    pid="$(pid_from "$STATE/run/slurmctld.pid")"
    if pid_alive "$pid" && ctld_up; then
        say "slurmctld already runs (pid $pid)"
        scontrol reconfigure >/dev/null 2>&1 || true
        return
    fi
    /usr/sbin/slurmctld
    CTLD_RECOVERED=1
    local i
    for i in $(seq 150); do
        ctld_up && break
        sleep 0.2
    done
    ctld_up || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
    say "slurmctld started (pid $(pid_from "$STATE/run/slurmctld.pid"))"
}

start_slurmd() {
    local node=$1 pid
    pid="$(pid_from "$STATE/run/slurmd-$node.pid")"
    if pid_alive "$pid"; then
        say "slurmd -N $node already runs (pid $pid)"
        return
    fi
    /usr/sbin/slurmd -N "$node"
    local i
    for i in $(seq 50); do
        pid_alive "$(pid_from "$STATE/run/slurmd-$node.pid")" && break
        sleep 0.2
    done
    pid="$(pid_from "$STATE/run/slurmd-$node.pid")"
    pid_alive "$pid" || die "slurmd -N $node did not start (see $STATE/log/slurmd-$node.log)"
    say "slurmd -N $node started (pid $pid)"
}

wait_idle() {
    local deadline=$((SECONDS + ${1:-90})) states resumed=0
    while [ $SECONDS -lt $deadline ]; do
        states="$(sinfo -h -N -p low -o '%N %t' 2>/dev/null | sort -u)"
        if [ -n "$states" ] && ! grep -qv ' idle$' <<<"$states"; then
            return 0
        fi
        # Nodes left down or drained by an earlier run (state is kept in the state dir).
        if [ $resumed = 0 ] && grep -Eq ' (down|drain|drng|drained|fail)' <<<"$states"; then
            scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 1
    done
    sinfo -N -l >&2 || true
    return 1
}

cmd_start() {
    need_root start
    check_installed
    mkdir -p "$STATE"/{run,log}
    start_munge
    start_mariadb
    write_configs
    start_slurmdbd
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    # A slurmctld started afresh recovers the jobs of its state dir: when the cluster was not
    # stopped with `stop` (the machine or session ended under it), they are jobs whose processes
    # are gone, that would hold a node "mixed" for ever, or pending jobs of a test run that
    # no longer exists. None of them can be wanted: cancel them.
    if [ "$CTLD_RECOVERED" = 1 ]; then cancel_all_jobs "cancelling jobs left from a cluster that was not stopped"; fi
    wait_idle 120 || die "the nodes did not become idle (see $STATE/log/)"
    say "cluster '$CLUSTER' is up: config $ETC/slurm.conf, state, pids and logs in $STATE"
    sinfo
}

# ----------------------------------------------------------------------------------------------
cancel_all_jobs() { # message: scancel every job in the queue, wait until the queue is empty
    # %i names an array task as ARRAY_ID_TASK (29_0): scancel refuses its own job id (30).
    local jobs i
    jobs="$(squeue -h -r -o %i 2>/dev/null | sort -u | tr '\n' ' ')"
    [ -n "${jobs// /}" ] || return 0
    say "$1: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for i in $(seq $((KILL_WAIT + 30))); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
        sleep 1
    done
    say "jobs still in the queue after $((KILL_WAIT + 30)) s: $(squeue -h -r -o %i | tr '\n' ' ')"
}

stop_pid() { # name pidfile
    local name=$1 pidfile=$2 pid i
    pid="$(pid_from "$pidfile")"
    if ! pid_alive "$pid"; then
        rm -f "$pidfile"
        return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        pid_alive "$pid" || break
        sleep 0.2
    done
    if pid_alive "$pid"; then
        say "$name (pid $pid) did not stop on TERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    say "stopped $name (pid $pid)"
}

cmd_stop() {
    need_root stop
    # Jobs first, so that no slurmstepd (nor the jobs' processes) outlives the daemons.
    if ctld_up; then cancel_all_jobs "cancelling jobs"; fi
    local n
    for n in "${NODES[@]}"; do stop_pid "slurmd -N $n" "$STATE/run/slurmd-$n.pid"; done
    stop_pid slurmctld "$STATE/run/slurmctld.pid"
    stop_pid slurmdbd "$STATE/run/slurmdbd.pid"
    stop_pid MariaDB "$STATE/mariadb/mariadb.pid"
    stop_pid munged /run/munge/munged.pid
    say "stopped"
}

# ----------------------------------------------------------------------------------------------
cmd_status() {
    local name pidfile pid
    for pair in "munged:/run/munge/munged.pid" "MariaDB:$STATE/mariadb/mariadb.pid" \
        "slurmdbd:$STATE/run/slurmdbd.pid" "slurmctld:$STATE/run/slurmctld.pid" \
        "slurmd -N n1:$STATE/run/slurmd-n1.pid" "slurmd -N n2:$STATE/run/slurmd-n2.pid"; do
        name="${pair%%:*}" pidfile="${pair#*:}"
        pid="$(pid_from "$pidfile")"
        if pid_alive "$pid"; then
            printf '  %-14s runs (pid %s)\n' "$name" "$pid"
        elif [ -e "$pidfile" ] && [ ! -r "$pidfile" ]; then
            printf '  %-14s unknown (%s is not readable: run as root)\n' "$name" "$pidfile"
        else
            printf '  %-14s not running\n' "$name"
        fi
    done
    command -v sinfo >/dev/null || { say "SLURM is not installed"; return 1; }
    ctld_up || { say "slurmctld does not answer"; return 1; }
    sinfo
    squeue
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
restart) cmd_stop && cmd_start ;;
status) cmd_status ;;
*)
    echo "usage: $0 install|start|stop|restart|status" >&2
    exit 2
    ;;
esac
