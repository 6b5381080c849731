#!/usr/bin/python

DOCUMENTATION = r"""
---
module: dsmesh_preflight
short_description: Check from the master that the cluster can run the job, one line per check per node
description:
  - Run on the master. Checks BatchMode ssh to every node, that every node answers pdsh, that python,
    torch, deepspeed, transformers, accelerate, peft, datasets, CUDA, NCCL and the driver are the same as
    on the master, that the GPUs match the slots and are idle (and what nvidia-smi said where it failed),
    that the model and datasets are present and identical (sizes and sha256), free disk for checkpoints,
    clock skew, a conda environment where the job says conda, and with shared storage that every node
    sees the master's runs directory.
  - Then runs a short all-reduce across every rank through C(deepspeed --hostfile) with the pdsh launcher
    (NCCL on GPUs, gloo on CPUs) in the job's own rank environment, reports its bus bandwidth and the
    transport NCCL chose between the nodes, and warns when that is TCP sockets on a cluster that declares
    InfiniBand or RoCE, or when the bandwidth falls short of the inventory's expected figure.
  - Fails, with the report, when any check fails. Changes nothing on any node but a marker file the
    shared-storage check writes and removes.
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
attributes:
  check_mode:
    support: full
    details: The same read-only checks run.
  diff_mode:
    support: none
options:
  nodes:
    description:
      - The cluster's nodes (C(dsmesh.cluster.job_node) of each host) - C(name), C(address), C(slots) and
        what is known of the hardware; checked in the hostfile's order (master first).
    type: list
    elements: dict
    required: true
  master:
    description: The master's name (where this runs).
    type: str
    required: true
  job:
    description:
      - The job's settings, as M(dsmesh.cluster.deepspeed_render) takes them - the interpreter, code directory,
        model and datasets whose copies are compared, the run and output directories, the rank environment,
        the launcher's arguments, C(shared_storage) and C(env_kind).
    type: dict
    required: true
  min_free_gib:
    description: Free GiB the checkpoints need where the output directory is.
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
  fabric:
    description: What connects the nodes, as the inventory declares it; C(infiniband) and C(roce) should give NCCL's IB transport.
    type: str
    choices: [unknown, infiniband, roce, ethernet]
    default: unknown
  expected_busbw_gbps:
    description: The all-reduce bus bandwidth the fabric should give (GB/s); below 70% of it is a warning.
    type: float
  timeout:
    description: Seconds the all-reduce may take, start-up included.
    type: int
    default: 180
"""

EXAMPLES = r"""
- name: Preflight from the master
  dsmesh.cluster.dsmesh_preflight:
    nodes: [{name: node1, address: node1, slots: 8}, {name: node2, address: node2, slots: 8}]
    master: node1
    master_addr: node1
    fabric: infiniband
    expected_busbw_gbps: 40
    job:
      python: /opt/venv/bin/python
      code_dir: /opt/dsmesh/src
      run_dir: /var/lib/dsmesh/runs/r1
      output_dir: /var/lib/dsmesh/runs/r1/output
      model_dir: /models/qwen
      datasets: [/data/train.jsonl]
      max_seq_length: 4096
      global_batch_size: 64
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
nccl:
  description: What NCCL said it uses - C(network) (IB or Socket), C(ib_devices), C(socket_devices),
    C(between_nodes), C(within_node), C(gpudirect_rdma); empty on CPUs.
  returned: always
  type: dict
passed:
  description: No check failed (warnings allowed). A playbook that registers the result with
    C(failed_when: false), to show the report first, stops on this.
  returned: always
  type: bool
seconds:
  description: Wall time of the whole preflight.
  returned: always
  type: float
"""

import os
import time
import uuid

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.hostfile import HostfileError, resolve_nodes
from ..module_utils.nccl import transport
from ..module_utils.pdsh import node_errors
from ..module_utils.pdsh_clock import check_clocks
from ..module_utils.preflight import (
    build_report,
    collective_row,
    failed,
    format_report,
    network_row,
    parse_probe_output,
)
from ..module_utils.preflight_run import Collective, check_mesh, run_probes
from ..module_utils.rank_env import EnvError
from ..module_utils.render import RunSpec, cluster_facts, rank_environment
from ..module_utils.rundir import write_atomic


def data_paths(spec):
    """The files every node must hold identically, by label: the model directory and each dataset."""
    paths = {"model": spec.model_dir}
    for path in list(spec.datasets) + list(spec.eval_datasets):
        paths[f"data:{os.path.basename(path)}"] = path
    return paths


def shared_marker(spec, check_mode):
    """With shared storage: the master writes a marker into the runs directory for every node to read
    back (removed after the check). None when the nodes keep their own copies."""
    if not spec.shared_storage:
        return None
    runs_dir = os.path.dirname(spec.run_dir.rstrip("/"))
    marker = {"path": os.path.join(runs_dir, f".dsmesh-shared-{uuid.uuid4().hex[:12]}"), "token": uuid.uuid4().hex}
    if not os.path.isdir(runs_dir):
        return dict(marker, missing=runs_dir)
    write_atomic(marker["path"], marker["token"] + "\n")
    return marker


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True),
            master=dict(type="str", required=True),
            job=dict(type="dict", required=True),
            min_free_gib=dict(type="float", default=10.0),
            checksum=dict(type="bool", default=True),
            clock_warn_seconds=dict(type="float", default=1.0),
            clock_fail_seconds=dict(type="float", default=30.0),
            collective=dict(type="bool", default=True),
            master_addr=dict(type="str", required=True),
            master_port=dict(type="int", default=29510),
            fabric=dict(type="str", choices=["unknown", "infiniband", "roce", "ethernet"], default="unknown"),
            expected_busbw_gbps=dict(type="float"),
            timeout=dict(type="int", default=180),
        ),
        supports_check_mode=True,
    )
    p = module.params
    start = time.time()
    try:
        spec = RunSpec(**{k: v for k, v in p["job"].items() if v is not None})
        nodes = resolve_nodes(p["nodes"], p["master"])
        facts_of_cluster, _ = cluster_facts([n for n in p["nodes"] if n["name"] in {e["name"] for e in nodes}])
        env = rank_environment(spec, facts_of_cluster, max(e["slots"] for e in nodes))
    except (TypeError, ValueError, HostfileError, EnvError) as exc:
        module.fail_json(msg=f"preflight: {exc}", passed=False)
    master = p["master"]
    by_address = {n["address"]: n for n in nodes}
    for tool in ("ssh", "pdsh"):
        if module.get_bin_path(tool) is None:
            module.fail_json(msg=f"{tool} is not installed on the master ({master}): run site.yml's ssh and pdsh parts first",
                             passed=False)
    paths = data_paths(spec)
    gpus = any(n.get("gpu_count") or n.get("gpu_memory_gib") for n in p["nodes"])
    if gpus:
        # NCCL names its transport at INFO (nccl.transport reads it); warnings stay warnings
        env = dict(env, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET")

    # The all-reduce (the slowest check: a real launch) runs while the others are checked; it is
    # cancelled if any of them fails, since a node that is down would make it hang.
    collective_run = None
    if p["collective"]:
        collective_run = Collective(nodes, os.path.join(os.path.dirname(spec.python), "deepspeed"), p["master_addr"],
                                    p["master_port"], spec.code_dir, env, p["timeout"],
                                    extra_launcher_args=spec.launcher_args)
    marker = shared_marker(spec, module.check_mode)
    try:
        mesh = check_mesh(list(by_address))
        clock = check_clocks(list(by_address))
        clock["offsets_seconds"] = {by_address[a]["name"]: o for a, o in clock["offsets_seconds"].items()}
        stdout, stderr, _, _ = run_probes(list(by_address), spec.python, spec.code_dir, paths, spec.output_dir,
                                          p["checksum"], markers=[marker["path"]] if marker else [])
    finally:
        if marker and "missing" not in marker and os.path.exists(marker["path"]):
            os.remove(marker["path"])
    facts = parse_probe_output(stdout)
    table = {n["name"]: {"address": n["address"], "slots": n["slots"], "facts": facts.get(n["address"])}
             for n in nodes}
    for address, error in node_errors(stderr, list(by_address)).items():  # pdsh's own words about a node
        if table[by_address[address]["name"]]["facts"] is None:
            table[by_address[address]["name"]]["facts"] = {"error": error}
    rows = build_report(master, table, {by_address[a]["name"]: v for a, v in mesh.items()}, paths,
                        p["min_free_gib"], p["clock_warn_seconds"], p["clock_fail_seconds"], clock,
                        env_kind=spec.env_kind, shared=marker)
    if marker and "missing" in marker:
        rows.append({"check": "shared storage", "node": master, "status": "FAIL",
                     "detail": f"{marker['missing']} does not exist on the master: mount the shared filesystem there"})

    collective, launch_cmd, launch_out, nccl = None, None, "", None
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
            nccl = transport(launch_out)
            row = network_row(nccl, len(nodes), p["fabric"], (collective or {}).get("busbw_gbps"),
                              p["expected_busbw_gbps"])
            if row:
                rows.append(row)
    report = format_report(rows)
    result = dict(changed=False, report=report, rows=rows, collective=collective or {}, nccl=nccl or {},
                  passed=not failed(rows), seconds=round(time.time() - start, 1))
    if failed(rows):
        tail = "\n".join(launch_out.splitlines()[-30:]) if launch_out and not collective else ""
        module.fail_json(msg="preflight failed:\n" + "\n".join(report) +
                         (f"\nlauncher: {launch_cmd}\n{tail}" if tail else ""), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
