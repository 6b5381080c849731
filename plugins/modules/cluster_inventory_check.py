#!/usr/bin/python

DOCUMENTATION = r"""
---
module: cluster_inventory_check
short_description: Check the inventory's cluster model before any node is touched
description:
  - Fails, naming each host and the fix, when the cluster group is empty, the master group does not
    hold exactly one host, the master is not a cluster node, two hosts share an address or a cluster
    address, or a host's C(gpus) is not a positive whole number.
  - Reads only its arguments (run it on the controller); changes nothing, so check mode is the same run.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  nodes:
    description: The cluster group's hosts, each with C(name), C(ansible_host), C(cluster_address), C(gpus).
    type: list
    elements: dict
    required: true
  masters:
    description: Hosts of the master group.
    type: list
    elements: str
    required: true
  cluster_group:
    description: Name of the cluster group, for messages.
    type: str
    default: cluster
  master_group:
    description: Name of the master group, for messages.
    type: str
    default: master
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
"""

EXAMPLES = r"""
- name: Check the inventory model
  cluster_inventory_check:
    nodes: "{{ groups.cluster | map('extract', hostvars) | map('cluster_node') | list }}"
    masters: "{{ groups.master | default([]) }}"
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
master:
  description: The master host.
  returned: success
  type: str
nodes:
  description: Names of the cluster's hosts.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.cluster_inventory import inventory_errors


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True),
            masters=dict(type="list", elements="str", required=True),
            cluster_group=dict(type="str", default="cluster"),
            master_group=dict(type="str", default="master"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    errors = inventory_errors(p["nodes"], p["masters"], p["cluster_group"], p["master_group"])
    if errors:
        module.fail_json(msg="inventory: " + " | ".join(errors), errors=errors, changed=False)
    module.exit_json(changed=False, master=p["masters"][0], nodes=[n["name"] for n in p["nodes"]])


if __name__ == "__main__":
    main()
