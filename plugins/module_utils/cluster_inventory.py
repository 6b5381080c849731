"""Checks of the inventory's cluster model: one master inside the cluster, distinct addresses,
positive slot counts. Pure functions, unit-tested; the cluster_inventory_check module wraps them."""
from collections import defaultdict


def inventory_errors(nodes, masters, cluster_group="cluster", master_group="master"):
    """Every problem with the cluster model, each naming the host and the fix.

    nodes: [{"name", "ansible_host", "cluster_address", "gpus"}] for the cluster group's hosts.
    masters: names of the master group's hosts.
    """
    errors = []
    names = [n["name"] for n in nodes]
    if not nodes:
        errors.append(f"group '{cluster_group}' has no hosts. List every node under '{cluster_group}' "
                      "(see inventory/example/hosts.yml).")
    if len(masters) != 1:
        held = f": {', '.join(masters)}" if masters else ""
        errors.append(f"group '{master_group}' must hold exactly one host, it holds {len(masters)}{held}. "
                      f"Put the one node that launches jobs under '{master_group}'.")
    for master in masters:
        if master not in names:
            errors.append(f"master host '{master}' is not in group '{cluster_group}'. "
                          f"Add it to '{cluster_group}' as well.")
    for field, fix in (("ansible_host", "Give each node its own address."),
                       ("cluster_address", "Give each node its own cluster_address.")):
        holders = defaultdict(list)
        for node in nodes:
            if node.get(field):
                holders[str(node[field])].append(node["name"])
        for address, hosts in holders.items():
            if len(hosts) > 1:
                errors.append(f"hosts {' and '.join(hosts)} share the {field} address {address}. {fix}")
    for node in nodes:
        gpus = node.get("gpus")
        if gpus is None:
            continue
        if isinstance(gpus, bool) or not str(gpus).isdigit() or int(gpus) < 1:
            errors.append(f"host '{node['name']}' has gpus={gpus!r}; it must be a positive whole number of "
                          "slots (the GPUs the job may use on that node).")
    return errors
