#!/usr/bin/env bash
# Starts a real one-node SLURM cluster on this machine (munge + slurmctld + slurmd from
# Debian's slurm-wlm/munge packages) when no cluster answers `sinfo`, and waits until the
# node is idle. Idempotent: a running cluster is left alone; the cluster is left running.
# Used by the launcher tests (tests/slurm_cluster.py); run as root.
#   bash launch/local_slurm_cluster.sh            # start if needed, wait for the node
set -euo pipefail
CONF=/etc/slurm/slurm.conf
MARK="# written by pldr_dist launch/local_slurm_cluster.sh"
NODE=$(hostname -s)

node_ready() {   # the node accepts jobs: idle, mixed or allocated
  local state
  state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1) || return 1
  [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]]   # a trailing * = not responding
}

for tool in slurmctld slurmd munged sinfo; do
  command -v "$tool" >/dev/null || { echo "[slurm] error: $tool not found (apt-get install slurm-wlm munge, or run tools/setup_machine.sh)" >&2; exit 1; }
done


# Configuration: this node's CPUs, and three quarters of its memory (jobs here do not reserve memory).
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  echo "[slurm] using the existing $CONF (not written by this script)"
else
  cpus=$(getconf _NPROCESSORS_ONLN)   # not nproc: it obeys OMP_NUM_THREADS, which the tests set to 1
  mem_mb=$(awk '/MemTotal/ {print int($2 * 3 / 4 / 1048576) * 1024}' /proc/meminfo)   # fixed per machine, so the file stays the same
  mkdir -p /etc/slurm
  tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
  cat > "$tmp" <<CONF_EOF
$MARK
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
CONF_EOF
  chmod 644 "$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    [ "$(id -u)" = 0 ] || { echo "[slurm] error: writing $CONF needs root" >&2; exit 1; }
    mv "$tmp" "$CONF"
    echo "[slurm] wrote $CONF (node $NODE, $cpus CPUs, ${mem_mb} MiB)"
    # daemons running with an older configuration (another CPU count) restart with this one
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
      echo "[slurm] restarting the daemons with the new configuration"
      scontrol shutdown >/dev/null 2>&1 || true
      for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
      pkill -x slurmctld 2>/dev/null || true; pkill -x slurmd 2>/dev/null || true
    fi
  fi
fi
if node_ready; then
  echo "[slurm] cluster already up: node $NODE $(sinfo -h -n "$NODE" -o %T | head -1)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "[slurm] error: starting a local cluster needs root (slurmd runs jobs as their users)" >&2; exit 1; }
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge

# munge: every slurm message is signed with the machine's munge key.
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
wait_for() {   # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local until=$((SECONDS + $1)); shift
  until "$@"; do (( SECONDS < until )) || return 1; sleep 0.2; done
}
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create --keyfile=/etc/munge/munge.key) \
      || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge /run/munge
  timeout 30 service munge start >/dev/null 2>&1 || true
  # `service` trusts a stale pid file; start the daemon directly if it is still not answering
  wait_for 5 munge_ok || runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munge_ok || { echo "[slurm] error: munged does not answer (see /var/log/munge/munged.log)" >&2; exit 1; }
fi

pgrep -x slurmctld >/dev/null || slurmctld
wait_for 30 scontrol ping >/dev/null 2>&1 || { echo "[slurm] error: slurmctld does not answer (see /var/log/slurm/slurmctld.log)" >&2; exit 1; }
pgrep -x slurmd >/dev/null || slurmd

# Wait for the node to register; a node left DOWN/DRAIN by an earlier run is resumed.
deadline=$((SECONDS + 60))
while (( SECONDS < deadline )); do
  node_ready && { echo "[slurm] cluster up: node $NODE $(sinfo -h -n "$NODE" -o %T | head -1)"; exit 0; }
  state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
  pgrep -x slurmd >/dev/null || slurmd   # an old slurmd may have been shutting down a moment ago
  if [[ "$state" =~ ^(down|drain|drained|draining|unknown) ]]; then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  fi
  sleep 1
done
echo "[slurm] error: node $NODE did not become idle in 60 s (state: ${state:-none}); see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
