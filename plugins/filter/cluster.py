"""Filters for the inventory's cluster model."""


def cluster_address(hostvars):
    """The address the nodes reach a node by: its cluster_address, else ansible_host, else its name.

    Takes one host's hostvars, as in ``groups.cluster | map('extract', hostvars) | map('cluster_address')``.
    """
    for key in ("cluster_address", "ansible_host", "inventory_hostname"):
        value = hostvars.get(key)
        if value:
            return str(value)
    raise ValueError("cluster_address: the host has neither cluster_address, ansible_host nor a name")


def node_names(hostvars):
    """Every name and address one host is reached by, without repeats: its inventory name, its
    cluster_address, its ansible_host and the hostname it reports (gathered facts), in that order.
    known_hosts lists a node's host keys under all of them; the ssh client settings cover them all.
    """
    name = str(hostvars.get("inventory_hostname"))
    facts = hostvars.get("ansible_facts") or {}
    names = [name, cluster_address(hostvars), hostvars.get("ansible_host") or name, facts.get("hostname")]
    return list(dict.fromkeys(str(n) for n in names if n))


def cluster_node(hostvars):
    """The fields of one host that the cluster model checks (see cluster_inventory_check)."""
    return {
        "name": str(hostvars.get("inventory_hostname")),
        "ansible_host": hostvars.get("ansible_host"),
        "cluster_address": cluster_address(hostvars),
        "gpus": hostvars.get("gpus"),
    }


def cluster_address_of(name, hostvars):
    """cluster_address of the host called `name`: ``inventory_hostname | cluster_address_of(hostvars)``."""
    return cluster_address(hostvars[name])


def key_login_targets(nodes, addresses, hub=None, mode="ring"):
    """Which addresses each node logs in to when key login is verified: {node: [address, ...]}.

    nodes and addresses are parallel lists (inventory order). ``full``: every node to every
    address, N x N logins. ``ring``: each node to the next node's address (the last to the first)
    and the hub (the master) to every address, 2N logins: every node's key and client are used
    once, every node's sshd accepts a node's key at least twice, and the hub's logins are the ones
    pdsh and DeepSpeed's runner make. The keys and host keys written are the same on every node,
    so the ring proves what the N x N check would, at a cost that grows with N, not with N x N.
    """
    nodes, addresses = list(nodes), [str(a) for a in addresses]
    if len(nodes) != len(addresses):
        raise ValueError(f"key_login_targets: {len(nodes)} nodes but {len(addresses)} addresses")
    if mode not in ("ring", "full"):
        raise ValueError(f"key_login_targets: mode must be 'ring' or 'full', got {mode!r}")
    everyone = list(dict.fromkeys(addresses))
    if not nodes:
        return {}
    if hub not in nodes:
        hub = nodes[0]
    plan = {}
    for i, node in enumerate(nodes):
        if mode == "full" or node == hub:
            plan[node] = everyone
        else:
            plan[node] = [addresses[(i + 1) % len(nodes)]]
    return plan


class FilterModule:
    def filters(self):
        return {"cluster_address": cluster_address, "cluster_node": cluster_node,
                "cluster_address_of": cluster_address_of, "key_login_targets": key_login_targets,
                "node_names": node_names}
