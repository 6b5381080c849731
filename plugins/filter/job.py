"""Filters of the job's side: one node as the render and the preflight take it; the answer a node
program printed."""

import json

from .cluster import cluster_address

# A node's hardware: the fact gpu_facts gathered on it, else the inventory's declaration.
HARDWARE = (
    ("gpu_count", "ds_gpu_count", None),
    ("gpu_model", "ds_gpu_model", "gpu_model"),
    ("gpu_memory_gib", "ds_gpu_memory_gib", "gpu_memory_gib"),
    ("bf16", "ds_gpu_bf16", "gpu_bf16"),
    ("compute_capability", "ds_gpu_compute_capability", None),
    ("host_memory_gib", "ds_host_memory_gib", "host_memory_gib"),
    ("cpu_cores", "ds_cpu_count", "cpu_cores"),
    ("interface", "ds_cluster_interface", "cluster_interface"),
)


def job_node(hostvars):
    """One host: name, address (cluster_address), slots (the inventory's gpus) and its hardware.
    Takes one host's hostvars: ``groups.cluster | map('extract', hostvars) | map('dsmesh.cluster.job_node')``."""
    node = {"name": str(hostvars.get("inventory_hostname")), "address": cluster_address(hostvars),
            "slots": hostvars.get("gpus")}
    gathered = hostvars.get("ds_gpu_count") is not None  # what the node reported beats any declaration
    for key, fact, declared in HARDWARE:
        value = hostvars.get(fact)
        if value is None and declared and not gathered:
            value = hostvars.get(declared)
        node[key] = value
    return node


def json_answer(result):
    """The JSON object a node program printed last on stdout (dsmesh.resume's plan or report), or {}
    when it printed none (it crashed, or the task was skipped)."""
    result = result or {}
    lines = result.get("stdout_lines") or str(result.get("stdout") or "").splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


class FilterModule:
    def filters(self):
        return {"job_node": job_node, "json_answer": json_answer}
