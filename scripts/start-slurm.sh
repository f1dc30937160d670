#!/usr/bin/env bash
# A real Slurm on this machine for tests and demos: munged, slurmctld and two slurmd
# (node1, node2: one host, distinct ports), one partition `debug`. Idempotent: when the
# cluster already answers with both nodes up and the configuration unchanged, it does nothing.
#
#   sudo bash scripts/start-slurm.sh          # install (Debian/Ubuntu apt) if absent, write the config, start
#   bash scripts/start-slurm.sh --stop        # stop the daemons this script started
#
# Needs root (daemons run as root, SlurmUser=root; munged as `munge`). Installs Debian's
# slurmctld slurmd slurm-client munge (the pieces of slurm-wlm a one-host cluster needs) when
# slurmctld is missing. Exit status: 0 up; 3 cannot set up here (not root, no apt, apt failed, or a
# slurm.conf of another cluster); 4 installed but it does not start (the reason on stderr, logs in /var/log/slurm-meshpilot).
#
# Each node declares MESHPILOT_SLURM_CPUS CPUs (default 4: overcommits a small machine, so two
# test jobs can share the nodes) and the machine's memory; SlurmdParameters=config_overrides lets
# slurmd accept what the hardware does not have. Nodes resolve to 127.0.0.1 (/etc/hosts).
# Logs: /var/log/slurm-meshpilot/. It refuses to overwrite a slurm.conf it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by meshpilot scripts/start-slurm.sh"
LOGDIR=/var/log/slurm-meshpilot
SPOOL=/var/spool/slurm-meshpilot
CPUS=${MESHPILOT_SLURM_CPUS:-4}

die() { echo "start-slurm: $*" >&2; exit 4; }
cannot_install() { echo "start-slurm: $*" >&2; exit 3; }
say() { echo "start-slurm: $*"; }

daemon_pids() {  # pids of the daemons this configuration starts, from their pid files (live ones only)
  local f p
  for f in /run/slurmctld-meshpilot.pid /run/slurmd-meshpilot-node1.pid /run/slurmd-meshpilot-node2.pid; do
    [[ -s "$f" ]] || continue
    p=$(cat "$f")
    [[ "$p" =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null && echo "$p"
  done
  return 0
}

stop_all() {
  local p
  for p in $(daemon_pids); do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do [[ -z "$(daemon_pids)" ]] && break; sleep 0.2; done
  rm -f /run/slurmctld-meshpilot.pid /run/slurmd-meshpilot-node1.pid /run/slurmd-meshpilot-node2.pid
}

if [[ "${1:-}" == "--stop" ]]; then
  [[ -f "$CONF" ]] && grep -qF "$MARK" "$CONF" || die "no cluster of this script to stop ($CONF is not ours)"
  stop_all
  say "stopped slurmctld and slurmd node1/node2"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || cannot_install "needs root (daemons, /etc/slurm, /etc/hosts)"

# --- install --------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot_install "slurm is not installed and there is no apt-get to install it"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/start-slurm-apt.log 2>&1; then
    apt-get update -q >>/tmp/start-slurm-apt.log 2>&1 || true
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>/tmp/start-slurm-apt.log 2>&1 \
      || cannot_install "apt-get install failed (see /tmp/start-slurm-apt.log)"
  fi
fi

HOST=$(hostname)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)

# --- munge ----------------------------------------------------------------------------------
if ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force || die "munged does not start"
  for _ in $(seq 50); do (munge -n | unmunge >/dev/null 2>&1) && break; sleep 0.2; done
  (munge -n | unmunge >/dev/null 2>&1) || die "munge does not answer"
  say "munged started"
fi

# --- configuration --------------------------------------------------------------------------
grep -qE '(^|[[:space:]])node1([[:space:]]|$)' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
mkdir -p /etc/slurm "$LOGDIR" "$SPOOL/ctld" "$SPOOL/node1" "$SPOOL/node2"
if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
  cannot_install "$CONF exists and was not written by this script: not touching it"
fi
new_conf=$(cat <<EOF
$MARK
ClusterName=meshpilot
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120 s): short for tests
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MinJobAge=600
KillWait=15
InactiveLimit=0
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=/run/slurmctld-meshpilot.pid
SlurmdPidFile=/run/slurmd-meshpilot-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
NodeName=node1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=node2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
)

nodes_idle() {  # both nodes answer and are usable
  local out
  out=$(sinfo -h -N -o "%N %t" 2>/dev/null) || return 1
  [[ $(echo "$out" | grep -cE '^node[12] (idle|mix|alloc)') -eq 2 ]]
}

if [[ -f "$CONF" && "$(cat "$CONF")" == "$new_conf" ]] && [[ $(daemon_pids | wc -l) -eq 3 ]] \
   && nodes_idle; then
  say "already up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
  exit 0
fi

stop_all
printf '%s\n' "$new_conf" > "$CONF"
/usr/sbin/slurmctld -i || die "slurmctld does not start (see $LOGDIR/slurmctld.log)"
/usr/sbin/slurmd -N node1 || die "slurmd node1 does not start (see $LOGDIR/slurmd-node1.log)"
/usr/sbin/slurmd -N node2 || die "slurmd node2 does not start (see $LOGDIR/slurmd-node2.log)"
for _ in $(seq 60); do
  nodes_idle && break
  # a node left DOWN/DRAIN by an earlier instance: bring it back
  scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
  sleep 1
done
nodes_idle || die "nodes not idle after 60 s: $(sinfo -h -N -o '%N=%t' 2>&1 | tr '\n' ' ') (see $LOGDIR)"
say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')(config $CONF, logs $LOGDIR)"
