"""deepspeed_hostfile: entries from the inventory, read back by DeepSpeed's own parser."""

import pytest
from deepspeed.launcher.runner import _parse_hostfile, fetch_hostfile

from ansible_collections.dsmesh.cluster.plugins.module_utils.hostfile import (
    HostfileError,
    render_hostfile,
    resolve_nodes,
)

NODES = [
    {"name": "gpu-node-31", "address": "172.16.80.31", "slots": 8},
    {"name": "gpu-node-33", "address": "172.16.80.33", "slots": 8},
    {"name": "gpu-node-35", "address": "node35.cluster", "slots": None, "gpu_count": 4},
]


def test_master_first_addresses_and_slots_parse_with_deepspeed(tmp_path):
    entries = resolve_nodes(NODES, master="gpu-node-33")
    path = tmp_path / "hostfile"
    path.write_text(render_hostfile(entries))
    pool = fetch_hostfile(str(path))
    assert list(pool.items()) == [("172.16.80.33", 8), ("172.16.80.31", 8), ("node35.cluster", 4)]


def test_include_and_exclude():
    only = resolve_nodes(NODES, master="gpu-node-33", include=["gpu-node-33", "172.16.80.31"])
    assert [e["name"] for e in only] == ["gpu-node-33", "gpu-node-31"]
    without = resolve_nodes(NODES, master="gpu-node-33", exclude=["gpu-node-35"])
    assert _parse_hostfile(render_hostfile(without).splitlines()) == {"172.16.80.33": 8, "172.16.80.31": 8}


@pytest.mark.parametrize("nodes,master,kwargs,message", [
    (NODES + [{"name": "gpu-node-31", "address": "10.0.0.9", "slots": 8}], "gpu-node-33", {},
     "gpu-node-31 appears twice"),
    (NODES + [{"name": "alias", "address": "172.16.80.31", "slots": 8}], "gpu-node-33", {},
     "gpu-node-31 and alias both have the address 172.16.80.31"),
    ([{"name": "a", "address": "10.0.0.1", "slots": 8}, {"name": "b", "address": "10.0.0.2", "slots": 0}], "a", {},
     "b: zero slots"),
    ([{"name": "a", "address": "10.0.0.1", "slots": None, "gpu_count": 0}], "a", {}, "a: zero slots"),
    ([{"name": "a", "address": "10.0.0.1"}], "a", {}, "a: no slots"),
    ([{"name": "a", "address": "10.0.0.1", "slots": 8, "gpu_count": 4}], "a", {},
     "a: the inventory says gpus=8 but nvidia-smi found 4"),
    (NODES, "gpu-node-99", {}, "master gpu-node-99 is not in the cluster group"),
    (NODES, "gpu-node-33", {"exclude": ["gpu-node-33"]}, "master gpu-node-33 is excluded"),
    (NODES, "gpu-node-33", {"include": ["nowhere"]}, "nowhere, which is not in the cluster group"),
    ([{"name": "a", "address": "10.0.0.1 x", "slots": 1}], "a", {}, "a: address"),
])
def test_refusals_name_the_host(nodes, master, kwargs, message):
    with pytest.raises(HostfileError) as err:
        resolve_nodes(nodes, master, **kwargs)
    assert message in str(err.value)
