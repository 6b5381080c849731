#!/usr/bin/env bash
# How long `site.yml --tags ssh,pdsh` takes on fresh lab nodes, cold and repeated, for 2, 4 and 8
# nodes. Each size gets a fresh lab (its start-up is not timed); the repeated run must change
# nothing. Targets: 8 nodes cold at most 2.5x the 2-node cold run, and the repeated run on 4
# nodes at most 20 s. Prints a table, PASS/FAIL per target and, last, one JSON line; exits 1
# when a target fails or a repeated run changed something.
#
#   bash bench/provision.sh                  (make bench-provision)
#   BENCH_NODES="2 4" bash bench/provision.sh
#
# The bench lab (LAB_PREFIX=dsbench: containers dsbench-node*, inventory/lab/dsbench.yml) lives
# beside the default lab and is removed at the end, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH=$ROOT/.venv/bin:$PATH ANSIBLE_CONFIG=$ROOT/ansible.cfg ANSIBLE_NOCOLOR=1
export LAB_PREFIX=dsbench
source scripts/podman-env.sh
INVENTORY=inventory/lab/dsbench.yml
read -ra NODES <<<"${BENCH_NODES:-2 4 8}"
for n in "${NODES[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_NODES must list node counts, got '$n'" >&2; exit 2; }
done
COLD_RATIO_LIMIT=2.5   # 8 nodes cold / 2 nodes cold
REPEAT_4_LIMIT_S=20    # repeated run on 4 nodes
LOGS=$(mktemp -d /tmp/bench-provision.XXXXXX)

log() { printf 'bench: %s\n' "$*" >&2; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }   # calc FORMAT EXPRESSION
teardown() { bash scripts/lab.sh down >/dev/null 2>&1 || true; }
trap teardown EXIT

# The timed run starts on booted, quiet nodes: every node's systemd done starting, and the
# containers' freshly written layers flushed to disk (their writeback would otherwise land in the
# first seconds of the run, and more of it the more nodes there are).
settle() {
  local i
  for ((i = 1; i <= $1; i++)); do
    podman exec "$LAB_PREFIX-node$i" timeout 60 systemctl is-system-running --wait >/dev/null 2>&1 || true
  done
  sync
}

# Runs site.yml once, logging to $1; prints its wall time in seconds. Stops the bench on failure.
timed_run() {
  local out=$1 start end
  start=$(date +%s.%N)
  if ! ansible-playbook -i "$INVENTORY" site.yml --tags ssh,pdsh >"$out" 2>&1; then
    log "ansible-playbook failed (full log: $out); its end:"
    tail -n 30 "$out" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  calc %.2f "$end - $start"
}

# Sum of changed= over a run's PLAY RECAP.
changed_in() {
  awk '/^PLAY RECAP/ { recap = 1; next }
       recap && / : ok=/ { for (i = 1; i <= NF; i++) if ($i ~ /^changed=/) { split($i, kv, "="); n += kv[2] } }
       END { print n + 0 }' "$1"
}

declare -A COLD REPEAT
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for n in "${NODES[@]}"; do
  log "$n nodes: starting a fresh lab (not timed)"
  teardown
  bash scripts/lab.sh up "$n" >"$LOGS/lab-$n.log" 2>&1 || { tail -n 20 "$LOGS/lab-$n.log" >&2; exit 1; }
  settle "$n"
  log "$n nodes: cold run"
  COLD[$n]=$(timed_run "$LOGS/cold-$n.log")
  log "$n nodes: repeated run"
  REPEAT[$n]=$(timed_run "$LOGS/repeat-$n.log")
  changed=$(changed_in "$LOGS/repeat-$n.log")
  if [[ $changed != 0 ]]; then
    log "FAIL: the repeated run on $n nodes changed $changed thing(s); it must change nothing."
    log "What changed (full log: $LOGS/repeat-$n.log):"
    grep -E '^(TASK|changed:)' "$LOGS/repeat-$n.log" | grep -B1 '^changed:' >&2 || true
    exit 1
  fi
done
teardown

printf '\n%-6s %9s %9s %14s\n' nodes "cold s" "repeat s" "cold vs 2-node"
for n in "${NODES[@]}"; do
  ratio=n/a
  [[ -n ${COLD[2]:-} ]] && ratio=$(calc %.2fx "${COLD[$n]} / ${COLD[2]}")
  printf '%-6s %9.1f %9.1f %14s\n' "$n" "${COLD[$n]}" "${REPEAT[$n]}" "$ratio"
done
echo

failed=0
verdict() {  # $1 = target, $2 = value, $3 = limit, $4 = what measuring it needs
  if [[ $2 == n/a ]]; then printf 'SKIP  %s (needs %s)\n' "$1" "$4"; return; fi
  if [[ $(calc %d "$2 <= $3") == 1 ]]; then printf 'PASS  %s: %s <= %s\n' "$1" "$2" "$3"
  else printf 'FAIL  %s: %s > %s\n' "$1" "$2" "$3"; failed=1; fi
}
cold_ratio=n/a repeat_4=n/a
[[ -n ${COLD[2]:-} && -n ${COLD[8]:-} ]] && cold_ratio=$(calc %.2f "${COLD[8]} / ${COLD[2]}")
[[ -n ${REPEAT[4]:-} ]] && repeat_4=$(calc %.1f "${REPEAT[4]}")
verdict "8 nodes cold / 2 nodes cold" "$cold_ratio" "$COLD_RATIO_LIMIT" "BENCH_NODES with 2 and 8"
verdict "repeated run on 4 nodes, s" "$repeat_4" "$REPEAT_4_LIMIT_S" "BENCH_NODES with 4"

json_times() {  # $1 = name of an associative array of times by node count
  local -n times=$1
  local n sep=
  printf '{'
  for n in "${NODES[@]}"; do printf '%s"%s": %.1f' "$sep" "$n" "${times[$n]}"; sep=', '; done
  printf '}'
}
json_or_null() { [[ $1 == n/a ]] && echo null || echo "$1"; }
node_list=${NODES[*]}
printf '{"bench": "provision", "nodes": [%s], "cold_s": %s, "repeat_s": %s, "cold_ratio_8_vs_2": %s, "cold_ratio_limit": %s, "repeat_4_s": %s, "repeat_4_limit_s": %s, "pass": %s, "cpus": %s, "load_before": "%s"}\n' \
  "${node_list// /, }" "$(json_times COLD)" "$(json_times REPEAT)" \
  "$(json_or_null "$cold_ratio")" "$COLD_RATIO_LIMIT" "$(json_or_null "$repeat_4")" "$REPEAT_4_LIMIT_S" \
  "$([[ $failed == 0 ]] && echo true || echo false)" "$(nproc)" "$load_before"
rm -rf "$LOGS"
exit "$failed"
