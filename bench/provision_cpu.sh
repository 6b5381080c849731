#!/usr/bin/env bash
# Where a provisioning run's time and CPU go, for one lab size: a fresh lab (LAB_PREFIX=dsprof),
# settled, then `site.yml --tags ssh,pdsh` cold and repeated. Prints wall seconds and CPU-seconds
# of the nodes (their cpuacct cgroups) and of the controller (ansible-playbook and its children).
#
#   bash bench/provision_cpu.sh 8
#   ANSIBLE_STRATEGY=linear bash bench/provision_cpu.sh 8     (the stock strategy)
#   PROFILE=1 bash bench/provision_cpu.sh 8                   (per-task times, ansible.posix.profile_tasks)
#
# Logs stay in /tmp/provision-cpu.*; the lab is removed at the end. Needs cgroup v1 cpuacct (this
# machine); elsewhere the nodes' CPU reads 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH=$ROOT/.venv/bin:$PATH ANSIBLE_CONFIG=$ROOT/ansible.cfg ANSIBLE_NOCOLOR=1 LAB_PREFIX=dsprof
source scripts/podman-env.sh
N=${1:?usage: bench/provision_cpu.sh NODES}
INVENTORY=inventory/lab/dsprof.yml
LOGS=$(mktemp -d /tmp/provision-cpu.XXXXXX)
CALLBACK=ansible.posix.timer
[[ -n ${PROFILE:-} ]] && CALLBACK=ansible.posix.profile_tasks

teardown() { bash scripts/lab.sh down >/dev/null 2>&1 || true; }
trap teardown EXIT

nodes_cpu_ns() {  # summed cpuacct.usage of the lab's containers
  local total=0 id f
  for id in $(podman ps -q --no-trunc --filter "name=^$LAB_PREFIX-node"); do
    f=/sys/fs/cgroup/cpuacct/libpod_parent/libpod-$id/cpuacct.usage
    [[ -r $f ]] && total=$((total + $(<"$f")))
  done
  echo "$total"
}

teardown
bash scripts/lab.sh up "$N" >"$LOGS/lab.log" 2>&1 || { tail -n 20 "$LOGS/lab.log" >&2; exit 1; }
for ((i = 1; i <= N; i++)); do podman exec "$LAB_PREFIX-node$i" timeout 60 systemctl is-system-running --wait >/dev/null 2>&1 || true; done
sync
for phase in cold repeat; do
  before=$(nodes_cpu_ns)
  start=$(date +%s.%N)
  TIMEFORMAT='%U %S'
  { time ANSIBLE_CALLBACKS_ENABLED=$CALLBACK ansible-playbook -i "$INVENTORY" site.yml --tags ssh,pdsh \
      >"$LOGS/$phase.log" 2>&1; } 2>"$LOGS/$phase.time" || { tail -n 30 "$LOGS/$phase.log" >&2; exit 1; }
  end=$(date +%s.%N)
  after=$(nodes_cpu_ns)
  read -r user sys <"$LOGS/$phase.time"
  awk -v n="$N" -v p="$phase" -v t0="$start" -v t1="$end" -v nc="$(( (after - before) / 1000000 ))" -v u="$user" -v s="$sys" \
    'BEGIN { printf "%d nodes %-6s wall %5.1f s   nodes %5.1f CPU-s   controller %5.1f CPU-s\n", n, p, t1 - t0, nc / 1000, u + s }'
done
echo "logs: $LOGS"
