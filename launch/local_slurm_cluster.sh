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
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1) || return 1
  [[ "$state" =~ ^(idle|mixed|allocated|completing) ]]
}

if node_ready; then
  echo "[slurm] cluster already up: node $NODE $(sinfo -h -n "$NODE" -o %T | head -1)"
  exit 0
fi
for tool in slurmctld slurmd munged sinfo; do
  command -v "$tool" >/dev/null || { echo "[slurm] error: $tool not found (apt-get install slurm-wlm munge, or run tools/setup_machine.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "[slurm] error: starting a local cluster needs root (slurmd runs jobs as their users)" >&2; exit 1; }

# Configuration: this node's CPUs, and memory a quarter below what is free now.
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  echo "[slurm] using the existing $CONF (not written by this script)"
else
  cpus=$(nproc)
  mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
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
  mv "$tmp" "$CONF"
  echo "[slurm] wrote $CONF (node $NODE, $cpus CPUs, ${mem_mb} MiB)"
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge

# munge: every slurm message is signed with the machine's munge key.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create --keyfile=/etc/munge/munge.key) \
      || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge /run/munge
  service munge start >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi

pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
pgrep -x slurmd >/dev/null || slurmd

# Wait for the node to register; a node left DOWN/DRAIN by an earlier run is resumed.
for i in $(seq 150); do
  node_ready && { echo "[slurm] cluster up: node $NODE $(sinfo -h -n "$NODE" -o %T | head -1)"; exit 0; }
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
  if [[ "$state" =~ ^(down|drain|drained|draining|unknown) ]] && (( i % 10 == 5 )); then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  fi
  sleep 0.2
done
echo "[slurm] error: node $NODE did not become idle in 30 s (state: ${state:-none}); see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
