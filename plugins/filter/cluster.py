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


def cluster_node(hostvars):
    """The fields of one host that the cluster model checks (see cluster_inventory_check)."""
    return {
        "name": str(hostvars.get("inventory_hostname")),
        "ansible_host": hostvars.get("ansible_host"),
        "cluster_address": cluster_address(hostvars),
        "gpus": hostvars.get("gpus"),
    }


class FilterModule:
    def filters(self):
        return {"cluster_address": cluster_address, "cluster_node": cluster_node}
