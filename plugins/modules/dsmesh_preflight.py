#!/usr/bin/python

DOCUMENTATION = r"""
---
module: dsmesh_preflight
short_description: Check from the master that the cluster can run the job, one line per check per node
description:
  - Run on the master. Checks BatchMode ssh to every node, that every node answers pdsh, that python,
    torch, deepspeed, transformers, accelerate, peft, CUDA, NCCL and the driver are the same as on the
    master, that the GPUs match the slots and are idle, that the model and datasets are present and
    identical (sizes and sha256), free disk for checkpoints, and clock skew.
  - Then runs a short all-reduce across every rank through C(deepspeed --hostfile) with the pdsh
    launcher (NCCL on GPUs, gloo on CPUs) and reports its bus bandwidth.
  - Fails, with the report, when any check fails. Changes nothing on any node (check mode runs the same
    read-only checks).
options:
  nodes:
    description: The cluster's nodes, each with C(name), C(address) (the address the nodes reach it by)
      and C(slots); ordered and checked as the hostfile is (master first).
    type: list
    elements: dict
    required: true
  master:
    description: The master's name (where this runs).
    type: str
    required: true
  python:
    description: The training environment's interpreter, the same path on every node.
    type: path
    required: true
  code_dir:
    description: Directory holding the C(dsmesh) and C(train) packages on every node.
    type: path
    required: true
  paths:
    description: Files or directories that must be identical on every node, by label (model, dataset).
    type: dict
    default: {}
  disk_path:
    description: Where checkpoints go; its filesystem's free space is checked.
    type: path
  min_free_gib:
    description: Free GiB needed at I(disk_path).
    type: float
    default: 10
  checksum:
    description: Compare sha256 of every file (else sizes only, for very large models).
    type: bool
    default: true
  clock_warn_seconds:
    description: Clock offset from the master that is reported as a warning.
    type: float
    default: 1.0
  clock_fail_seconds:
    description: Clock offset from the master that fails the preflight.
    type: float
    default: 30.0
  collective:
    description: Run the all-reduce through the launcher.
    type: bool
    default: true
  master_addr:
    description: Address the ranks reach the master by (the launcher's C(--master_addr)).
    type: str
    required: true
  master_port:
    description: Rendezvous port for the all-reduce.
    type: int
    default: 29510
  env:
    description: The user's variables for the ranks; PATH of the training environment and
      OMP_NUM_THREADS are added as in C(.deepspeed_env).
    type: dict
    default: {}
  launcher_args:
    description: Extra arguments for C(deepspeed) (for example C(--num_accelerators) on CPUs).
    type: list
    elements: str
    default: []
  timeout:
    description: Seconds the all-reduce may take, start-up included.
    type: int
    default: 180
author: dsmesh
"""

EXAMPLES = r"""
- name: Preflight from the master
  dsmesh_preflight:
    nodes: [{name: node1, address: node1, slots: 8}, {name: node2, address: node2, slots: 8}]
    python: /opt/venv/bin/python
    code_dir: /opt/dsmesh/src
    paths: {model: /models/qwen, dataset: /data/train.jsonl}
    disk_path: /var/lib/dsmesh/runs
    master_addr: node1
"""

RETURN = r"""
report:
  description: One line per check per node, C(ok), C(warn) or C(FAIL) first.
  returned: always
  type: list
  elements: str
rows:
  description: The same as dicts with check, node, status, detail.
  returned: always
  type: list
  elements: dict
collective:
  description: The all-reduce's result (backend, world size, hosts, bus bandwidth), if it ran.
  returned: always
  type: dict
seconds:
  description: Wall time of the whole preflight.
  returned: always
  type: float
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.hostfile import HostfileError, resolve_nodes
from ..module_utils.pdsh import node_errors
from ..module_utils.pdsh_clock import check_clocks
from ..module_utils.preflight import build_report, collective_row, failed, format_report, parse_probe_output
from ..module_utils.preflight_run import Collective, check_mesh, run_probes
from ..module_utils.rank_env import build_env


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True),
            master=dict(type="str", required=True),
            python=dict(type="path", required=True),
            code_dir=dict(type="path", required=True),
            paths=dict(type="dict", default={}),
            disk_path=dict(type="path"),
            min_free_gib=dict(type="float", default=10.0),
            checksum=dict(type="bool", default=True),
            clock_warn_seconds=dict(type="float", default=1.0),
            clock_fail_seconds=dict(type="float", default=30.0),
            collective=dict(type="bool", default=True),
            master_addr=dict(type="str", required=True),
            master_port=dict(type="int", default=29510),
            env=dict(type="dict", default={}),
            launcher_args=dict(type="list", elements="str", default=[]),
            timeout=dict(type="int", default=180),
        ),
        supports_check_mode=True,
    )
    p = module.params
    start = time.time()
    try:
        nodes = resolve_nodes(p["nodes"], p["master"])
    except HostfileError as exc:
        module.fail_json(msg=f"preflight: {exc}")
    master = p["master"]
    by_address = {n["address"]: n for n in nodes}
    for tool in ("ssh", "pdsh"):
        if module.get_bin_path(tool) is None:
            module.fail_json(msg=f"{tool} is not installed on the master ({master}): run site.yml's ssh and pdsh parts first")

    # The all-reduce (the slowest check: a real launch) runs while the others are checked; it is
    # cancelled if any of them fails, since a node that is down would make it hang.
    collective_run = None
    if p["collective"]:
        env = build_env(user_vars=p["env"], venv=os.path.dirname(os.path.dirname(p["python"])))
        collective_run = Collective(nodes, os.path.join(os.path.dirname(p["python"]), "deepspeed"), p["master_addr"],
                                    p["master_port"], p["code_dir"], env, p["timeout"],
                                    extra_launcher_args=p["launcher_args"])
    mesh = check_mesh(list(by_address))
    clock = check_clocks(list(by_address))
    clock["offsets_seconds"] = {by_address[a]["name"]: o for a, o in clock["offsets_seconds"].items()}
    stdout, stderr, _, _ = run_probes(list(by_address), p["python"], p["code_dir"], p["paths"],
                                      p["disk_path"], p["checksum"])
    facts = parse_probe_output(stdout)
    table = {n["name"]: {"address": n["address"], "slots": n["slots"], "facts": facts.get(n["address"])}
             for n in nodes}
    for address, error in node_errors(stderr, list(by_address)).items():  # pdsh's own words about a node
        if table[by_address[address]["name"]]["facts"] is None:
            table[by_address[address]["name"]]["facts"] = {"error": error}
    rows = build_report(master, table, {by_address[a]["name"]: v for a, v in mesh.items()}, p["paths"],
                        p["min_free_gib"], p["clock_warn_seconds"], p["clock_fail_seconds"], clock)

    collective, launch_cmd, launch_out = None, None, ""
    if collective_run is not None:
        if failed(rows):
            collective_run.cancel()
            rows.append({"check": "all-reduce", "node": "cluster", "status": "skip",
                         "detail": "not run: fix the failures above first"})
        else:
            collective, launch_cmd, launch_out = collective_run.result()
            hostnames = [(t["facts"] or {}).get("hostname") for t in table.values()]
            rows.append(collective_row(collective, [h for h in hostnames if h],
                                       sum(int(n["slots"]) for n in nodes)))
    report = format_report(rows)
    result = dict(changed=False, report=report, rows=rows, collective=collective or {},
                  seconds=round(time.time() - start, 1))
    if failed(rows):
        tail = "\n".join(launch_out.splitlines()[-30:]) if launch_out and not collective else ""
        module.fail_json(msg="preflight failed:\n" + "\n".join(report) +
                         (f"\nlauncher: {launch_cmd}\n{tail}" if tail else ""), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
