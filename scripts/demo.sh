#!/usr/bin/env bash
# `make demo`: the whole mission on a local 2-node container lab. site.yml takes the nodes from
# "root with a password" to a passwordless SSH mesh with pdsh, puts the training environment,
# a tiny Qwen2 and its dataset on both nodes, runs the preflight and launches a ZeRO-3 job with
# `deepspeed --hostfile` on the master; this script then follows it through the Python API
# (python -m dsmesh status) and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
source scripts/podman-env.sh
NODES=${NODES:-2}
INVENTORY=inventory/lab/hosts.yml

bash scripts/lab.sh up "$NODES"
started=$SECONDS
ansible-playbook site.yml

echo
echo "== following the job (python -m dsmesh status)"
while :; do
  json=$(python -m dsmesh status -i "$INVENTORY" --json -q)
  line=$(python3 -c '
import json, sys
s = json.loads(sys.argv[1])["job_status"] or {}
print(s.get("state"), "| step", s.get("step"), "| loss", s.get("loss"), "| tokens/s", round(s.get("tokens_per_s") or 0))
' "$json")
  echo "  $line"
  case $line in running*) sleep 5 ;; *) break ;; esac
done

python3 - "$json" "$((SECONDS - started))" <<'PY'
import json, sys
s = json.loads(sys.argv[1])["job_status"]
print()
if s["state"] != "finished":
    print(f"The job {s['state']}" + (f" on {s['failed_node']}" if s.get("failed_node") else "") + f"; log: {s['log']}")
    sys.exit(1)
m = s["summary"]
print(f"Job {s['run_id']} finished in {sys.argv[2]} s from the start of site.yml:")
print(f"  steps {m['steps']}, loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, {m['tokens']} tokens, world size {m['world_size']}")
print(f"  checkpoints: {m['output_dir']}/checkpoint-* on every node (the master's and each node's own shards)")
print(f"  final model (HF format, loads with from_pretrained): {m['final_model']} on the master")
print(f"  log: {s['log']} on the master")
PY
echo
echo "Status: ansible-playbook playbooks/status.yml   Stop: ansible-playbook playbooks/stop.yml   Remove the lab: make lab-down"
