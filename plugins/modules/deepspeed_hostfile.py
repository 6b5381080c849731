#!/usr/bin/python
"""Ansible module: write DeepSpeed's hostfile from the inventory's cluster group."""



DOCUMENTATION = r"""
---
module: deepspeed_hostfile
short_description: Write DeepSpeed's hostfile (C(<host> slots=<n>), master first) for the cluster
description:
  - Renders the hostfile that C(deepspeed --hostfile) and its pdsh runner read, one line
    C(<host> slots=<n>) per node, with the master node first (rank 0 runs there).
  - The first column is the address the nodes reach each other by (C(cluster_address), else
    C(ansible_host)), because the runner ssh-es from the master to that name.
  - Slots come from the inventory (C(gpus)) or, when it does not say, from the GPUs found on
    the node (see M(gpu_facts)). A node whose inventory asks for more GPUs than it has is refused.
  - Refuses duplicate nodes or addresses, zero slots and a missing or excluded master, naming
    the host.
  - Writes atomically (temporary file and rename) and only when the content or mode differs.
version_added: "1.0.0"
author:
  - ML infrastructure team
options:
  dest:
    description: Path of the hostfile to write. Its directory must exist.
    type: path
    required: true
  nodes:
    description:
      - The cluster nodes in inventory order, one dict per node.
      - C(name) is the inventory hostname, C(address) the address the nodes reach each other by,
        C(slots) the inventory's C(gpus) (optional), C(gpu_count) the GPUs found on the node
        (optional).
    type: list
    elements: dict
    required: true
  master:
    description: Inventory hostname of the master node (the one host of the C(master) group).
    type: str
    required: true
  include:
    description:
      - Only these nodes (inventory hostnames or addresses) go into the hostfile.
      - The master must be among them.
    type: list
    elements: str
    default: []
  exclude:
    description: These nodes (inventory hostnames or addresses) are left out. Not the master.
    type: list
    elements: str
    default: []
  mode:
    description: Permission bits of the file, as an octal string.
    type: raw
    default: "0644"
notes:
  - Supports check mode and diff mode.
seealso:
  - module: gpu_facts
  - module: deepspeed_config
  - module: deepspeed_env
"""

EXAMPLES = r"""
- name: Write the hostfile for the cluster group
  deepspeed_hostfile:
    dest: /srv/train/hostfile
    master: "{{ groups['master'][0] }}"
    nodes:
      - name: gpu-node-33
        address: 172.16.80.33
        slots: 8
      - name: gpu-node-31
        address: 172.16.80.31
        gpu_count: 8

- name: Leave one node out
  deepspeed_hostfile:
    dest: /srv/train/hostfile
    master: gpu-node-33
    nodes: "{{ ds_nodes }}"
    exclude: [gpu-node-31]
"""

RETURN = r"""
hosts:
  description: The hostfile entries, master first.
  returned: success
  type: list
  elements: dict
  sample: [{"name": "gpu-node-33", "address": "172.16.80.33", "slots": 8}]
master_address:
  description: The master's address (first column of the first line), for C(--master_addr).
  returned: success
  type: str
  sample: 172.16.80.33
slots:
  description: Slots per node, in hostfile order.
  returned: success
  type: list
  elements: int
  sample: [8, 8]
world_size:
  description: Total number of ranks (sum of the slots).
  returned: success
  type: int
  sample: 16
content:
  description: The hostfile text.
  returned: success
  type: str
  sample: "172.16.80.33 slots=8\n172.16.80.31 slots=8\n"
dest:
  description: The path written.
  returned: success
  type: str
  sample: /srv/train/hostfile
"""

from ansible.module_utils.basic import AnsibleModule
from ..module_utils.files import FileWriteError, parse_mode, write_file
from ..module_utils.hostfile import HostfileError, render_hostfile, resolve_nodes


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            nodes=dict(type="list", elements="dict", required=True),
            master=dict(type="str", required=True),
            include=dict(type="list", elements="str", default=[]),
            exclude=dict(type="list", elements="str", default=[]),
            mode=dict(type="raw", default="0644"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        entries = resolve_nodes(p["nodes"], p["master"], p["include"], p["exclude"])
        content = render_hostfile(entries)
        written = write_file(p["dest"], content, parse_mode(p["mode"]), check_mode=module.check_mode)
    except (HostfileError, FileWriteError) as exc:
        module.fail_json(msg=str(exc))
    result = dict(
        changed=written["changed"],
        dest=p["dest"],
        hosts=entries,
        master_address=entries[0]["address"],
        slots=[e["slots"] for e in entries],
        world_size=sum(e["slots"] for e in entries),
        content=content,
    )
    if module._diff:
        result["diff"] = written["diff"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
