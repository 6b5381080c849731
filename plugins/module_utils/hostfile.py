"""DeepSpeed hostfile from inventory nodes (stdlib only).

A hostfile line is `<host> slots=<n>`. DeepSpeed's pdsh runner ssh-es from the master to every
<host>, and rank 0 runs on the first line, so the first column must be the address the nodes
reach each other by (cluster_address, else ansible_host) and the master must come first.
"""


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
        raise HostfileError(f"{host}: {what} must be an integer, got {value!r}") from None


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
            raise HostfileError(f"include/exclude names {wanted}, which is not in the cluster group")

    def selected(n):
        keys = (n.get("name"), n.get("address"))
        if include and not any(k in include for k in keys):
            return False
        return not any(k in exclude for k in keys)

    entries, seen_names, seen_addresses = [], {}, {}
    for n in nodes:
        name = n.get("name")
        if not name:
            raise HostfileError(f"a cluster node has no name: {n!r}")
        if name in seen_names:
            raise HostfileError(f"{name} appears twice in the cluster group")
        seen_names[name] = True
        address = n.get("address") or name
        address = str(address).strip()
        if not _HOST_RE.match(address):
            raise HostfileError(f"{name}: address {address!r} cannot be a hostfile entry (no spaces or shell characters)")
        if not selected(n):
            continue
        if address in seen_addresses:
            raise HostfileError(f"{seen_addresses[address]} and {name} both have the address {address}: one node would get both slot counts")
        seen_addresses[address] = name
        slots = _int_or_none(n.get("slots"), "gpus (slots)", name)
        found = _int_or_none(n.get("gpu_count"), "gpu_count", name)
        if slots is None:
            slots = found
            if slots is None:
                raise HostfileError(f"{name}: no slots: set `gpus` in the inventory or gather GPU facts")
        elif found is not None and found > 0 and slots > found:
            raise HostfileError(f"{name}: the inventory says gpus={slots} but nvidia-smi found {found} GPU(s)")
        if slots <= 0:
            raise HostfileError("{}: zero slots (gpus={}{}); a hostfile entry needs at least one".format(name, n.get("slots"),
                                   f", {found} GPU(s) found" if found is not None else ""))
        entries.append({"name": name, "address": address, "slots": slots})
    if master not in seen_names:
        raise HostfileError(f"master {master} is not in the cluster group")
    master_entry = [e for e in entries if e["name"] == master]
    if not master_entry:
        raise HostfileError(f"master {master} is excluded by include/exclude: rank 0 runs on the master")
    return master_entry + [e for e in entries if e["name"] != master]


def render_hostfile(entries):
    return "".join(f"{e['address']} slots={e['slots']}\n" for e in entries)
