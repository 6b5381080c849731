"""The preflight's report from what the nodes and NCCL said: NCCL's transport from its real log lines,
nvidia-smi's [N/A] fields and NVML errors reported as what they are, the conda and shared-storage
checks, the fabric and bandwidth against the inventory's."""

import json
import os
import subprocess
import sys

from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus
from ansible_collections.dsmesh.cluster.plugins.module_utils.nccl import describe, transport
from ansible_collections.dsmesh.cluster.plugins.module_utils.preflight import (
    FAIL,
    OK,
    WARN,
    build_report,
    collective_row,
    network_row,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NCCL_DEBUG=INFO lines as clusters printed them (NVIDIA/nccl-tests#185, NVIDIA/nccl#302, siderolabs/docs#566,
# NVIDIA/nccl#226), with the node prefix pdsh puts in front of a remote rank's output.
ROCE = """\
dgxh100-4: dgxh100-4:460770:460770 [0] NCCL INFO Bootstrap : Using enp220s0np0:11.1.128.136<0>
dgxh100-4: dgxh100-4:460770:460842 [0] NCCL INFO NET/IB : Using [0]mlx5_10:1/RoCE [1]mlx5_11:1/RoCE [RO]; OOB enp220s0np0:11.1.128.136<0>
dgxh100-4: dgxh100-4:460770:460842 [0] NCCL INFO Using network IB
dgxh100-3: dgxh100-3:2152176:2152299 [0] NCCL INFO NET/IB : Using [0]mlx5_10:1/RoCE [1]mlx5_11:1/RoCE [RO]; OOB enp220s0np0:11.1.128.128<0>
dgxh100-3: dgxh100-3:2152176:2152299 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA
dgxh100-3: dgxh100-3:2152176:2152299 [0] NCCL INFO Channel 00 : 0[0] -> 1[1] via P2P/IPC
"""
SOCKETS = """\
ip-172-31-12-21: ip-172-31-12-21:45361:45361 [0] NCCL INFO NET/IB : No device found.
ip-172-31-12-21: ip-172-31-12-21:45361:45361 [0] NCCL INFO NET/Socket : Using [0]ens3:172.31.12.21<0>
ip-172-31-12-21: ip-172-31-12-21:45361:45400 [0] NCCL INFO Using network Socket
ip-172-31-12-21: ip-172-31-12-21:45361:45400 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
"""


def test_nccl_transport_from_its_own_lines():
    roce = transport(ROCE)
    assert roce["network"] == "IB" and roce["ib_devices"] == [("mlx5_10:1", "RoCE"), ("mlx5_11:1", "RoCE")]
    assert roce["between_nodes"] == ["IB"] and roce["within_node"] == ["P2P"] and roce["gpudirect_rdma"]
    assert describe(roce) == "NCCL between nodes: RoCE verbs over mlx5_10:1, mlx5_11:1 with GPUDirect RDMA"
    sockets = transport(SOCKETS)
    assert sockets["network"] == "Socket" and sockets["ib_found"] is False and sockets["socket_devices"] == ["ens3"]
    assert describe(sockets) == "NCCL between nodes: TCP sockets over ens3"
    assert transport("rank0: gloo all-reduce done\n")["network"] is None


def test_nccl_on_the_h200_node():
    """NCCL 2.28.9's own lines on the one-GPU H200 machine (bench/results/h200_node_probe.txt)."""
    with open(os.path.join(ROOT, "bench", "results", "h200_node_probe.txt")) as f:
        lines = f.read()
    t = transport(lines)
    assert t["network"] == "Socket" and t["ib_found"] is False and t["ib_devices"] == []
    assert t["socket_devices"] == ["eth0"]
    row = network_row(t, nodes=1, fabric="unknown")
    assert row["status"] == OK and row["detail"].startswith("NCCL on one node")
    nvsmi = [line for line in lines.splitlines() if line.startswith("0, NVIDIA H200, 143771, 0")][0]
    assert gpus.parse_nvidia_smi(nvsmi) == [{"index": 0, "name": "NVIDIA H200", "memory_mib": 143771}]
    assert gpus.summarize(gpus.parse_nvidia_smi("0, NVIDIA H200, 143771, 9.0"))["gpu_memory_gib"] == 140.4


def test_network_row_warns_on_a_fallback_to_sockets_and_on_low_bandwidth():
    row = network_row(transport(SOCKETS), nodes=2, fabric="infiniband", busbw_gbps=2.1, expected_busbw_gbps=40)
    assert row["status"] == WARN and "fell back to Socket" in row["detail"] and "5% of the expected 40" in row["detail"]
    good = network_row(transport(ROCE), nodes=2, fabric="roce", busbw_gbps=38.0, expected_busbw_gbps=40)
    assert good["status"] == OK and "95% of the expected" in good["detail"]
    assert network_row(transport(""), nodes=2) is None  # gloo on CPUs: nothing to say


def test_nvidia_smi_fields_it_cannot_tell():
    rows = gpus.parse_query("0, NVIDIA H200, 143771, 4, [N/A], 580.159.04\n",
                            "index,name,memory.total,memory.used,utilization.gpu,driver_version")
    assert rows == [{"index": "0", "name": "NVIDIA H200", "memory.total": "143771", "memory.used": "4",
                     "utilization.gpu": None, "driver_version": "580.159.04"}]
    assert gpus.as_int(rows[0]["memory.total"]) == 143771 and gpus.as_int(None) is None


def _probe(tmp_path, smi_body):
    """dsmesh.probe on this machine with a given nvidia-smi first on PATH (a real program)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + smi_body)
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = subprocess.run([sys.executable, "-m", "dsmesh.probe"], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _report(facts, **kwargs):
    nodes = {"node1": {"address": "node1", "slots": 1, "facts": facts}}
    return {r["check"]: r for r in build_report("node1", nodes, {"node1": (True, None)}, {}, **kwargs)}


def test_an_nvml_error_is_reported_as_such(tmp_path):
    facts = _probe(tmp_path, "echo 'Failed to initialize NVML: Driver/library version mismatch'\n"
                             "echo 'NVML library version: 580.159'\nexit 18\n")
    assert facts["gpus"] == [] and facts["gpu_error"] == "Failed to initialize NVML: Driver/library version mismatch"
    row = _report(facts)["gpus"]
    assert row["status"] == FAIL and "Driver/library version mismatch" in row["detail"]


def test_an_na_utilization_is_no_use(tmp_path):
    facts = _probe(tmp_path, "echo '0, NVIDIA H200, 143771, 4, [N/A], 580.159.04'\n")
    assert facts["gpus"][0]["utilization_pct"] is None and facts["driver"] == "580.159.04"
    assert _report(facts)["gpus"]["status"] == OK


def test_conda_and_shared_storage_checks(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("token-1\n")
    facts = _probe(tmp_path, "exit 0\n")
    facts["markers"] = {str(marker): "token-1"}
    rows = _report(facts, env_kind="conda", shared={"path": str(marker), "token": "token-1"})
    assert rows["shared storage"]["status"] == OK
    assert rows["conda"]["status"] == (OK if facts["prefix"]["conda"] else FAIL)
    assert "not a conda environment" in rows["conda"]["detail"]  # this venv has no conda-meta
    facts["markers"] = {str(marker): None}
    rows = _report(facts, shared={"path": str(marker), "token": "token-1"})
    assert rows["shared storage"]["status"] == FAIL and "not shared" in rows["shared storage"]["detail"]


# the preflight's all-reduce on the H200 node (bench/gpu_node_e2e.sh, preflight.json), and on two 8-GPU nodes
H200_COLLECTIVE = {"backend": "nccl", "world_size": 1, "hosts": ["vm"], "rank_hosts": ["vm"], "size_mb": 64.0,
                   "seconds_per_iter": 8e-05, "busbw_gbps": 0.0, "correct": True}


def test_one_rank_all_reduce_reports_no_bus_bandwidth():
    row = collective_row(H200_COLLECTIVE, ["vm"], 1)
    assert row["status"] == OK
    assert row["detail"] == "nccl over 1 rank(s) on 1 node(s): 64 MB in 0.1 ms, no bus bandwidth with one rank"


def test_sixteen_rank_all_reduce_reports_its_bus_bandwidth_and_a_missing_node():
    result = dict(H200_COLLECTIVE, world_size=16, hosts=["node1", "node2"], seconds_per_iter=0.0031, busbw_gbps=40.6)
    assert collective_row(result, ["node1", "node2"], 16)["detail"].endswith("in 3.1 ms, bus bandwidth 40.60 GB/s")
    row = collective_row(dict(result, world_size=8, hosts=["node1"]), ["node1", "node2"], 16)
    assert row["status"] == FAIL and "world size 8, expected 16; no rank ran on node2" in row["detail"]
