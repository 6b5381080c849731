"""gpu_facts: nvidia-smi parsing, bf16 support, and the module on a node with and without GPUs."""


import pytest

from ansible_collections.dsmesh.cluster.plugins.module_utils.gpus import (
    parse_meminfo,
    parse_nvidia_smi,
    summarize,
    supports_bf16,
)

H20_X8 = "".join(f"{i}, NVIDIA H20, 97871, 9.0\n" for i in range(8))
V100_OLD_DRIVER = "0, Tesla V100-SXM2-32GB, 32768\n1, Tesla V100-SXM2-32GB, 32768\n"


def test_parse_h20_node():
    facts = summarize(parse_nvidia_smi(H20_X8))
    assert facts["gpu_count"] == 8 and facts["gpu_model"] == "NVIDIA H20"
    assert facts["gpu_memory_gib"] == 95.58 and facts["gpu_bf16"] is True
    assert facts["gpu_compute_capability"] == "9.0"


def test_parse_old_driver_without_compute_cap():
    facts = summarize(parse_nvidia_smi(V100_OLD_DRIVER))
    assert facts["gpu_count"] == 2 and facts["gpu_memory_gib"] == 32.0 and facts["gpu_bf16"] is False


def test_cpu_only_node_reports_none():
    facts = summarize([])
    assert facts["gpu_count"] == 0 and facts["gpu_model"] is None and facts["gpu_memory_gib"] is None


@pytest.mark.parametrize("name,cap,expected", [
    ("NVIDIA H20", None, True), ("NVIDIA H100 80GB HBM3", None, True), ("NVIDIA A100-SXM4-80GB", None, True),
    ("NVIDIA L40S", None, True), ("NVIDIA GeForce RTX 4090", None, True), ("Tesla T4", None, False),
    ("Tesla V100-SXM2-32GB", None, False), ("Some Future GPU", None, None), ("Some Future GPU", "10.0", True),
    ("NVIDIA H20", "7.5", False),
])
def test_bf16_support(name, cap, expected):
    assert supports_bf16(name, cap) is expected


def test_meminfo():
    assert parse_meminfo("MemTotal:       1056440176 kB\nMemFree: 1 kB\n") == 1007.5
