# -*- coding: utf-8 -*-
"""DeepSpeed hostfile from inventory nodes (stdlib only).

A hostfile line is `<host> slots=<n>`. DeepSpeed's pdsh runner ssh-es from the master to every
<host>, and rank 0 runs on the first line, so the first column must be the address the nodes
reach each other by (cluster_address, else ansible_host) and the master must come first.
"""

from __future__ import absolute_import, division, print_function

import re


class HostfileError(Exception):
    pass


# What pdsh/ssh and DeepSpeed's parser (r'^(\S+)\s+slots=(\d+)') accept as a host.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]]+$")


def _int_or_none(value, what, host):
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HostfileError("%s: %s must be an integer, got %r" % (host, what, value))


def resolve_nodes(nodes, master, include=None, exclude=None):
    """Turn inventory entries into ordered hostfile entries.

    nodes: list of dicts with name (inventory hostname), address (cluster_address or
    ansible_host), slots (inventory `gpus`, optional) and gpu_count (GPUs found, optional).
    Returns a list of {"name", "address", "slots"} with the master first, the others in
    inventory order.
    """
    if not nodes:
        raise HostfileError("the cluster group is empty")
    include = list(include or [])
    exclude = list(exclude or [])
    names = [n.get("name") for n in nodes]
    for wanted in include + exclude:
        if wanted not in names and wanted not in [n.get("address") for n in nodes]:
            raise HostfileError("include/exclude names %s, which is not in the cluster group" % wanted)

    def selected(n):
        keys = (n.get("name"), n.get("address"))
        if include and not any(k in include for k in keys):
            return False
        return not any(k in exclude for k in keys)

    entries, seen_names, seen_addresses = [], {}, {}
    for n in nodes:
        name = n.get("name")
        if not name:
            raise HostfileError("a cluster node has no name: %r" % (n,))
        if name in seen_names:
            raise HostfileError("%s appears twice in the cluster group" % name)
        seen_names[name] = True
        address = n.get("address") or name
        address = str(address).strip()
        if not _HOST_RE.match(address):
            raise HostfileError("%s: address %r cannot be a hostfile entry (no spaces or shell characters)"
                                % (name, address))
        if not selected(n):
            continue
        if address in seen_addresses:
            raise HostfileError("%s and %s both have the address %s: one node would get both slot counts"
                                % (seen_addresses[address], name, address))
        seen_addresses[address] = name
        slots = _int_or_none(n.get("slots"), "gpus (slots)", name)
        found = _int_or_none(n.get("gpu_count"), "gpu_count", name)
        if slots is None:
            slots = found
            if slots is None:
                raise HostfileError("%s: no slots: set `gpus` in the inventory or gather GPU facts" % name)
        elif found is not None and found > 0 and slots > found:
            raise HostfileError("%s: the inventory says gpus=%d but nvidia-smi found %d GPU(s)"
                                % (name, slots, found))
        if slots <= 0:
            raise HostfileError("%s: zero slots (gpus=%s%s); a hostfile entry needs at least one"
                                % (name, n.get("slots"),
                                   ", %s GPU(s) found" % found if found is not None else ""))
        entries.append({"name": name, "address": address, "slots": slots})
    if master not in seen_names:
        raise HostfileError("master %s is not in the cluster group" % master)
    master_entry = [e for e in entries if e["name"] == master]
    if not master_entry:
        raise HostfileError("master %s is excluded by include/exclude: rank 0 runs on the master" % master)
    return master_entry + [e for e in entries if e["name"] != master]


def render_hostfile(entries):
    return "".join("%s slots=%d\n" % (e["address"], e["slots"]) for e in entries)
