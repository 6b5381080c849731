# -*- coding: utf-8 -*-
"""GPU and host facts: nvidia-smi and /proc/meminfo parsing, bf16 support (stdlib only)."""

from __future__ import absolute_import, division, print_function

import re

NVIDIA_SMI_FIELDS = "index,name,memory.total,compute_cap"
NVIDIA_SMI_FIELDS_OLD = "index,name,memory.total"  # drivers before compute_cap was a field

# bf16 needs compute capability 8.0 (Ampere) or newer. Used when only the name is known.
_BF16_NAMES = re.compile(r"\b(A100|A800|A10G?|A16|A2|A30|A40|A[4-6]000|RTX\s*(30|40|50)\d\d|L4|L20|L40S?|"
                         r"H100|H800|H20|H200|GH200|B100|B200|GB200|RTX\s*(PRO|\d+\s*Ada))\b", re.I)
_NO_BF16_NAMES = re.compile(r"\b(V100|T4|P100|P40|P4|K80|M60|TITAN\s*V|RTX\s*20\d\d|Quadro)\b", re.I)


class GpuFactsError(Exception):
    pass


def parse_nvidia_smi(text):
    """GPUs from `nvidia-smi --query-gpu=index,name,memory.total[,compute_cap] --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            raise GpuFactsError("unexpected nvidia-smi line: %r" % line)
        try:
            gpu = {"index": int(fields[0]), "name": fields[1], "memory_mib": int(float(fields[2]))}
        except ValueError:
            raise GpuFactsError("unexpected nvidia-smi line: %r" % line)
        if len(fields) > 3 and re.match(r"^\d+\.\d+$", fields[3]):
            gpu["compute_capability"] = fields[3]
        gpus.append(gpu)
    return gpus


def supports_bf16(gpu_model=None, compute_capability=None):
    """True/False, or None when neither the capability nor the name tells."""
    if compute_capability:
        major = int(str(compute_capability).split(".")[0])
        return major >= 8
    if gpu_model:
        if _NO_BF16_NAMES.search(gpu_model):
            return False
        if _BF16_NAMES.search(gpu_model):
            return True
    return None


def summarize(gpus):
    """Facts for the planner: count, model, smallest memory (GiB), bf16."""
    if not gpus:
        return {"gpu_count": 0, "gpu_model": None, "gpu_memory_gb": None, "gpu_bf16": None,
                "gpu_compute_capability": None, "gpus": []}
    names = sorted(set(g["name"] for g in gpus))
    caps = sorted(set(g.get("compute_capability") for g in gpus if g.get("compute_capability")))
    bf16_each = [supports_bf16(g["name"], g.get("compute_capability")) for g in gpus]
    bf16 = None if None in bf16_each else all(bf16_each)
    return {
        "gpu_count": len(gpus),
        "gpu_model": names[0] if len(names) == 1 else "mixed: " + " / ".join(names),
        # nvidia-smi reports MiB; memory_gb facts are GiB (an "80 GB" H100 shows 81559 MiB = 79.6).
        "gpu_memory_gb": round(min(g["memory_mib"] for g in gpus) / 1024.0, 2),
        "gpu_bf16": bf16,
        "gpu_compute_capability": caps[0] if len(caps) == 1 else (caps or None),
        "gpus": gpus,
    }


def parse_meminfo(text):
    """MemTotal from /proc/meminfo, in GiB."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
            return round(kib / 1024.0 / 1024.0, 2)
    raise GpuFactsError("no MemTotal in /proc/meminfo")
