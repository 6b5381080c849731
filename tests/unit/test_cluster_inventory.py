import pytest

from ansible_collections.dsmesh.cluster.plugins.filter.cluster import (
    cluster_address,
    cluster_node,
    key_login_targets,
    node_names,
)
from ansible_collections.dsmesh.cluster.plugins.module_utils.cluster_inventory import inventory_errors


def node(name, host, address=None, gpus=8):
    return {"name": name, "ansible_host": host, "cluster_address": address or host, "gpus": gpus}


GOOD = [node("a", "10.0.0.1"), node("b", "10.0.0.2")]


def test_a_good_cluster_has_no_errors():
    assert inventory_errors(GOOD, ["a"]) == []


@pytest.mark.parametrize("masters,expected", [
    ([], "group 'master' must hold exactly one host, it holds 0."),
    (["a", "b"], "group 'master' must hold exactly one host, it holds 2: a, b."),
    (["c"], "master host 'c' is not in group 'cluster'. Add it to 'cluster' as well."),
])
def test_master_errors_name_the_hosts(masters, expected):
    assert any(expected in e for e in inventory_errors(GOOD, masters))


def test_shared_addresses_name_both_hosts():
    errors = inventory_errors([node("a", "10.0.0.1"), node("b", "10.0.0.1")], ["a"])
    assert "hosts a and b share the ansible_host address 10.0.0.1. Give each node its own address." in errors
    assert "hosts a and b share the cluster_address address 10.0.0.1. Give each node its own cluster_address." in errors


def test_distinct_controller_addresses_may_share_nothing_else():
    nodes = [node("a", "192.0.2.1", "n1"), node("b", "192.0.2.2", "n1")]
    assert inventory_errors(nodes, ["a"]) == [
        "hosts a and b share the cluster_address address n1. Give each node its own cluster_address."]


@pytest.mark.parametrize("gpus", [0, -1, "eight", 1.5, True])
def test_bad_slot_counts(gpus):
    errors = inventory_errors([node("a", "10.0.0.1", gpus=gpus)], ["a"])
    assert errors == [f"host 'a' has gpus={gpus!r}; it must be a positive whole number of slots "
                      "(the GPUs the job may use on that node)."]


def test_slots_may_come_from_the_nodes():
    assert inventory_errors([node("a", "10.0.0.1", gpus=None)], ["a"]) == []


def test_empty_cluster():
    assert inventory_errors([], [])[0].startswith("group 'cluster' has no hosts.")


def test_cluster_address_falls_back_to_ansible_host_then_name():
    assert cluster_address({"inventory_hostname": "n", "ansible_host": "10.0.0.9", "cluster_address": "n-ib"}) == "n-ib"
    assert cluster_address({"inventory_hostname": "n", "ansible_host": "10.0.0.9"}) == "10.0.0.9"
    assert cluster_address({"inventory_hostname": "n"}) == "n"
    assert cluster_node({"inventory_hostname": "n", "gpus": 2}) == {
        "name": "n", "ansible_host": None, "cluster_address": "n", "gpus": 2}


NODES = [f"n{i}" for i in range(1, 6)]
ADDRESSES = [f"10.0.0.{i}" for i in range(1, 6)]


def test_ring_login_plan_is_linear_and_covers_every_node_both_ways():
    plan = key_login_targets(NODES, ADDRESSES, hub="n3")
    assert plan["n3"] == ADDRESSES  # the master reaches everyone, as pdsh and DeepSpeed's runner do
    assert plan["n1"] == ["10.0.0.2"] and plan["n5"] == ["10.0.0.1"]  # the ring wraps around
    assert sum(len(targets) for targets in plan.values()) == 2 * len(NODES) - 1
    # every node logs in somewhere, and every node's sshd is logged in to by some other node
    assert all(plan[node] for node in NODES)
    reached_from_others = {a for node, targets in plan.items() for a in targets if a != ADDRESSES[NODES.index(node)]}
    assert reached_from_others == set(ADDRESSES)


def test_full_login_plan_is_every_pair():
    plan = key_login_targets(NODES, ADDRESSES, hub="n1", mode="full")
    assert all(plan[node] == ADDRESSES for node in NODES)


def test_login_plan_edge_cases():
    assert key_login_targets([], []) == {}
    assert key_login_targets(["a"], ["1.1.1.1"]) == {"a": ["1.1.1.1"]}
    assert key_login_targets(["a", "b"], ["1", "2"], hub="nobody") == {"a": ["1", "2"], "b": ["1"]}
    with pytest.raises(ValueError, match="mode must be"):
        key_login_targets(["a"], ["1"], mode="star")
    with pytest.raises(ValueError, match="2 nodes but 1 addresses"):
        key_login_targets(["a", "b"], ["1"])


def test_node_names_lists_every_name_once_in_order():
    hv = {"inventory_hostname": "n1", "ansible_host": "10.0.0.1", "cluster_address": "n1",
          "ansible_facts": {"hostname": "gpu-a"}}
    assert node_names(hv) == ["n1", "10.0.0.1", "gpu-a"]
    assert node_names({"inventory_hostname": "n2"}) == ["n2"]
