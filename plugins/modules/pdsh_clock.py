#!/usr/bin/python

DOCUMENTATION = r"""
---
module: pdsh_clock
short_description: Check through pdsh that every node answers, and measure their clock skew
description:
  - Runs C(date) on every given host with C(pdsh -R ssh) from the node the task runs on (the master).
  - Fails, naming them, when hosts do not answer.
  - Reports each node's clock offset from the master and the skew between nodes; warns (or fails)
    past a threshold, since distributed training and its logs assume clocks that agree.
  - Changes nothing; check mode runs the same read-only check.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  hosts:
    description: Addresses pdsh reaches the nodes by (the hostfile's first column).
    type: list
    elements: str
    required: true
  connect_timeout:
    description: Seconds pdsh waits for a connection to each node.
    type: int
    default: 10
  warn_skew_seconds:
    description: Warn when two nodes' clocks differ by more than this plus the measurement's own
      uncertainty (how long the pdsh call took).
    type: float
    default: 1.0
  fail_skew_seconds:
    description: Fail when two nodes' clocks differ by more than this. Unset never fails on skew.
    type: float
version_added: "1.0.0"
author:
  - dsmesh ML infrastructure team
"""

EXAMPLES = r"""
- name: Every node answers pdsh and the clocks agree within 5 s
  pdsh_clock:
    hosts: [node1, node2]
    fail_skew_seconds: 5
"""

RETURN = r"""
answered:
  description: Hosts that answered.
  returned: always
  type: list
  elements: str
missing:
  description: Hosts that did not answer.
  returned: always
  type: list
  elements: str
offsets_seconds:
  description: Each answering host's clock minus this node's clock.
  returned: always
  type: dict
skew_seconds:
  description: Largest difference between two answering hosts' clocks.
  returned: always
  type: float
uncertainty_seconds:
  description: How long the pdsh call took; the skew is known to within this.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.pdsh_clock import check_clocks


def main():
    module = AnsibleModule(
        argument_spec=dict(
            hosts=dict(type="list", elements="str", required=True),
            connect_timeout=dict(type="int", default=10),
            warn_skew_seconds=dict(type="float", default=1.0),
            fail_skew_seconds=dict(type="float"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not p["hosts"]:
        module.fail_json(msg="pdsh_clock: hosts is empty; give the nodes' addresses")
    if module.get_bin_path("pdsh") is None:
        module.fail_json(msg="pdsh_clock: pdsh is not installed on this node (the pdsh role installs it)")
    report = check_clocks(p["hosts"], p["connect_timeout"])
    if report["missing"]:
        module.fail_json(
            msg="pdsh could not reach: {}. Check that these nodes are up and that this node can "
                "'ssh -o BatchMode=yes' to them. pdsh said: {}".format(", ".join(report["missing"]), report["stderr"].strip()),
            changed=False, **report)
    if p["fail_skew_seconds"] is not None and report["skew_seconds"] > p["fail_skew_seconds"]:
        module.fail_json(
            msg="The nodes' clocks differ by {:.3f} s (limit {:.3f} s): {}. Sync them (chrony or "
                "systemd-timesyncd against one server).".format(report["skew_seconds"], p["fail_skew_seconds"],
                                                            report["offsets_seconds"]),
            changed=False, **report)
    # pdsh reaches the nodes one after another: only a skew beyond what that spread explains counts.
    if report["skew_seconds"] > p["warn_skew_seconds"] + report["uncertainty_seconds"]:
        module.warn("The nodes' clocks differ by {:.3f} s (more than {:.3f} s): {}. Sync them (chrony or "
                    "systemd-timesyncd against one server).".format(report["skew_seconds"], p["warn_skew_seconds"], report["offsets_seconds"]))
    module.exit_json(changed=False, **report)


if __name__ == "__main__":
    main()
