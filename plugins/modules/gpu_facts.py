#!/usr/bin/python
"""Ansible module: GPU count, model and memory of a node (nvidia-smi), host memory, CPUs."""



DOCUMENTATION = r"""
---
module: gpu_facts
short_description: Gather GPU count, model and memory (nvidia-smi), host memory and the cluster interface of a node
description:
  - Runs C(nvidia-smi --query-gpu=index,name,memory.total,compute_cap) and reads C(/proc/meminfo).
  - A node without C(nvidia-smi) is a CPU-only node - it reports C(ds_gpu_count=0) and the
    hostfile then uses the inventory's slots.
  - With I(cluster_address), also reports the network interface that holds that address on the
    node (C(ip -o addr show), or the kernel's own tables where C(ip) is not installed), for
    C(NCCL_SOCKET_IFNAME).
  - Changes nothing on the node; runs in check mode too.
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
attributes:
  check_mode:
    support: full
    details: It only reads; check mode gathers the same facts.
  diff_mode:
    support: none
options:
  cluster_address:
    description: The address (or name, resolved on the node) the nodes reach this node by.
    type: str
  nvidia_smi:
    description: Name or path of nvidia-smi.
    type: str
    default: nvidia-smi
  fail_on_error:
    description:
      - Fail when nvidia-smi exists but does not work (a broken driver), instead of reporting no GPUs.
    type: bool
    default: true
notes:
  - Facts are returned under C(ansible_facts) with a C(ds_) prefix.
seealso:
  - module: dsmesh.cluster.deepspeed_render
"""

EXAMPLES = r"""
- name: Gather GPU facts
  dsmesh.cluster.gpu_facts:
    cluster_address: "{{ cluster_address | default(ansible_host) }}"

- name: Show them
  ansible.builtin.debug:
    msg: "{{ ds_gpu_count }} x {{ ds_gpu_model }} ({{ ds_gpu_memory_gib }} GiB), interface {{ ds_cluster_interface }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts about the node.
  returned: always
  type: dict
  contains:
    ds_gpu_count:
      description: Number of GPUs (0 on a CPU-only node).
      type: int
      sample: 8
    ds_gpu_model:
      description: GPU model name (C(mixed - ...) when they differ), or null.
      type: str
      sample: NVIDIA H20
    ds_gpu_memory_gib:
      description: Memory of the smallest GPU in GiB, or null.
      type: float
      sample: 95.58
    ds_gpu_bf16:
      description: Whether every GPU has bf16 (compute capability 8.0+), null if unknown or no GPU.
      type: bool
    ds_gpu_compute_capability:
      description: CUDA compute capability, when nvidia-smi reports it.
      type: str
      sample: "9.0"
    ds_gpus:
      description: One entry per GPU - index, name, memory_mib, compute_capability.
      type: list
      elements: dict
    ds_host_memory_gib:
      description: Host RAM in GiB (MemTotal).
      type: float
      sample: 1007.5
    ds_cpu_count:
      description: CPUs this process may run on.
      type: int
      sample: 192
    ds_cluster_interface:
      description: Interface holding I(cluster_address), null if none holds it or it was not given.
      type: str
      sample: bond0
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.gpus import (
    NVIDIA_SMI_FIELDS,
    NVIDIA_SMI_FIELDS_OLD,
    GpuFactsError,
    parse_meminfo,
    parse_nvidia_smi,
    summarize,
)
from ..module_utils.rank_env import interface_holding, local_addresses, parse_ip_addr


def query_gpus(module, smi):
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_OLD):
        rc, out, err = module.run_command([smi, "--query-gpu=" + fields, "--format=csv,noheader,nounits"])
        if rc == 0:
            return parse_nvidia_smi(out), None
        if "compute_cap" not in (out + err):
            return [], f"nvidia-smi failed (rc={rc}): {(err or out).strip()}"
    return [], f"nvidia-smi failed: {(err or out).strip()}"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            cluster_address=dict(type="str"),
            nvidia_smi=dict(type="str", default="nvidia-smi"),
            fail_on_error=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    facts = {}
    warnings = []
    smi = module.get_bin_path(p["nvidia_smi"]) if not os.path.isabs(p["nvidia_smi"]) else p["nvidia_smi"]
    gpus = []
    if smi and os.path.exists(smi):
        try:
            gpus, error = query_gpus(module, smi)
        except GpuFactsError as exc:
            gpus, error = [], str(exc)
        if error:
            if p["fail_on_error"]:
                module.fail_json(msg=error)
            warnings.append(error)
    for k, v in summarize(gpus).items():
        facts["ds_" + k] = v
    try:
        with open("/proc/meminfo") as fd:
            facts["ds_host_memory_gib"] = parse_meminfo(fd.read())
    except (OSError, GpuFactsError) as exc:
        facts["ds_host_memory_gib"] = None
        warnings.append(f"cannot read host memory: {exc}")
    try:
        facts["ds_cpu_count"] = len(os.sched_getaffinity(0))
    except AttributeError:
        facts["ds_cpu_count"] = os.cpu_count()
    facts["ds_cluster_interface"] = None
    if p["cluster_address"]:
        pairs = None
        ip = module.get_bin_path("ip")
        if ip:
            rc, out, err = module.run_command([ip, "-o", "addr", "show"])
            if rc == 0:
                pairs = parse_ip_addr(out)
        if pairs is None:
            # no iproute2 on the node (the H200 machine's image): the kernel's own tables
            pairs = local_addresses()
        facts["ds_cluster_interface"] = interface_holding(pairs, p["cluster_address"])
        if not facts["ds_cluster_interface"]:
            warnings.append("no interface on this node holds {}".format(p["cluster_address"]))
    for w in warnings:
        module.warn(w)
    module.exit_json(changed=False, ansible_facts=facts)


if __name__ == "__main__":
    main()
