#!/usr/bin/env bash
# CI: bring up a real one-node Slurm cluster on this machine (Debian 12, Slurm 22.05, root, no systemd),
# so the tests can submit real job arrays. Idempotent: run it as often as you like; when the cluster is
# already up and its configuration unchanged it only checks that the node answers.
#
#   .ci/slurm-up.sh            # then: sbatch --wait --array=0-3 job.sh
#
# What it sets up:
#   - packages slurm-wlm (slurmctld, slurmd, slurm-client) and munge, installed only when sbatch is missing
#   - /etc/munge/munge.key (created if missing) and a running munged
#   - /etc/slurm/slurm.conf: one node named $(hostname -s) at 127.0.0.1, partition "debug" (default),
#     linuxproc process tracking and no cgroups/task plugin, so it works in containers without systemd
#   - slurmctld and slurmd started directly as daemons (logs and pid files below)
#
# No accounting storage (no slurmdbd): `sacct` does not work here. Finished jobs, array tasks included,
# stay visible to `scontrol show job <id>` and `squeue -t all` for MinJobAge (1 hour), and every finished
# job/task gets a line in /var/log/slurm/jobcomp.log (jobcomp/filetxt) for good. A failed array task:
#   squeue -h -t all -j <array id> -o '%K %T %r'   # task id, state (FAILED), reason (NonZeroExitCode)
#   scontrol show job <array id>_<task>            # JobState=FAILED ExitCode=3:0 StdOut=<its log file>
#
# Environment knobs:
#   SLURM_UP_TIMEOUT      seconds to wait for the node to be idle (default 60)
#   SLURM_UP_MIN_JOB_AGE  MinJobAge, seconds a finished job stays in slurmctld (default 3600). Note that
#                         `sbatch --wait` polls after 2 s, 10 s, 42 s, 74 s, ... (sleeps 2, 8, then 32 s) unless
#                         MinJobAge is small: <= 16 keeps it at 8 s steps, <= 4 at 2 s steps, but then
#                         finished jobs vanish from scontrol/squeue within about a minute.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
JOBCOMP_LOG=$LOG_DIR/jobcomp.log
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
MIN_JOB_AGE=${SLURM_UP_MIN_JOB_AGE:-3600}

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: ERROR: $*" >&2; exit 1; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- 1. packages
if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] \
   || [ ! -x /usr/sbin/munged ]; then
  say "installing slurm-wlm and munge (apt)"
  # keep the packages' init scripts from starting daemons during the install; we start them ourselves
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp)
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"$apt_log" 2>&1; then
    [ -n "$policy_added" ] && rm -f /usr/sbin/policy-rc.d
    tail -n 30 "$apt_log" >&2
    die "apt-get could not install slurm-wlm/munge (log above)"
  fi
  [ -n "$policy_added" ] && rm -f /usr/sbin/policy-rc.d
  rm -f "$apt_log"
fi
command -v sbatch >/dev/null || die "sbatch is still not on PATH after the install"

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key --force >/dev/null || die "mungekey failed"
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || die "cannot write munge key"
  fi
fi
if id munge >/dev/null 2>&1; then MUNGE_USER=munge; else MUNGE_USER=root; fi
chown "$MUNGE_USER:$MUNGE_USER" /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown "$MUNGE_USER:$MUNGE_USER" /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  if [ "$MUNGE_USER" = munge ]; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  else
    /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (munge -n | unmunge fails; see /var/log/munge/munged.log)"

# ---------------------------------------------------------------- 3. configuration
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB / 2 < 1024 ? MEM_MB / 2 : 1024 ))   # modest, never more than the machine has
mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$SPOOL_DIR"

new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Written by .ci/slurm-up.sh: a one-node CI cluster (no systemd, no cgroups, no accounting storage).
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# how long finished jobs (and array tasks) stay visible to "scontrol show job" / "squeue -t all"
MinJobAge=$MIN_JOB_AGE
MailProg=/bin/true
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=""
if ! cmp -s "$new_conf" "$CONF"; then
  say "writing $CONF (node $NODE, $CPUS CPUs, RealMemory=$REAL_MEM)"
  install -m 644 "$new_conf" "$CONF"
  conf_changed=1
fi
rm -f "$new_conf"
# No cgroup.conf: with proctrack/linuxproc, task/none and jobacct_gather/none Slurm 22.05 loads no cgroup
# plugin, and slurmd starts and runs jobs without one (checked).

# ---------------------------------------------------------------- 4. daemons
if [ -n "$conf_changed" ]; then
  # a configuration change (first run, other host name or CPU count) needs fresh daemons
  for pidf in "$SLURMD_PID" "$CTLD_PID"; do
    if running "$pidf"; then
      pid=$(cat "$pidf"); say "restarting (stopping pid $pid from $pidf)"; kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi
if ! running "$CTLD_PID"; then
  say "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP \
  || { grep -v pmix "$LOG_DIR/slurmctld.log" | tail -n 20 >&2; die "slurmctld does not answer (scontrol ping; log above)"; }
if ! running "$SLURMD_PID"; then
  say "starting slurmd"
  /usr/sbin/slurmd -N "$NODE" || { grep -v pmix "$LOG_DIR/slurmd.log" | tail -n 20 >&2; die "slurmd did not start (log above)"; }
fi

# wait for the node to be idle (or mixed/allocated, if jobs already run); resume it if down or drained
deadline=$(( SECONDS + TIMEOUT ))
state=""
while :; do
  state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|drained*|fail*)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "--- sinfo:" >&2; sinfo -N -l >&2 || true
    echo "--- scontrol show node:" >&2; scontrol show node "$NODE" >&2 || true
    # (the mpi/pmix errors in the logs are harmless noise: Debian ships the plugin without libpmix)
    echo "--- slurmctld.log:" >&2; grep -v pmix "$LOG_DIR/slurmctld.log" | tail -n 20 >&2 || true
    echo "--- slurmd.log:" >&2; grep -v pmix "$LOG_DIR/slurmd.log" | tail -n 20 >&2 || true
    die "node $NODE is not idle after ${TIMEOUT}s (state: ${state:-unknown})"
  fi
  sleep 1
done

# ---------------------------------------------------------------- 5. done
say "Slurm is up: node $NODE is $state, partition debug (logs in $LOG_DIR, finished jobs in $JOBCOMP_LOG)"
exit 0
