"""Facts about this node that must agree across the cluster, as one JSON line.

Run on every node through pdsh by the preflight, with the training environment's interpreter:
    python -m dsmesh.probe --path model=/models/x --path data=/data/train.jsonl --disk /var/lib/dsmesh
Reads only; changes nothing on the node.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata

from ansible_collections.dsmesh.cluster.plugins.module_utils import gpus

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "datasets")


def package_versions():
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def torch_facts():
    """The CUDA torch was built for and the NCCL it ships with (None on a CPU build), read from the
    installed files: importing torch would cost seconds per node, and the preflight must be quick."""
    facts = {"cuda": None, "nccl": None}
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return facts
    version_py = dist.locate_file("torch/version.py")
    try:
        text = open(version_py).read()
    except OSError:
        text = ""
    m = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    facts["cuda"] = m.group(1) if m else None
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl"):
            facts["nccl"] = d.version
    return facts


GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu,driver_version"


def gpu_facts():
    """GPUs from nvidia-smi: index, name, memory, use; [] where there is none; what nvidia-smi said
    when it failed (an NVML error: driver and library versions that differ, say)."""
    if not shutil.which("nvidia-smi"):
        return {"driver": None, "gpus": []}
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).strip().splitlines()
        return {"driver": None, "gpus": [], "gpu_error": said[0] if said else f"nvidia-smi exit {proc.returncode}"}
    try:
        rows = gpus.parse_query(proc.stdout, GPU_QUERY)
    except gpus.GpuFactsError as e:
        return {"driver": None, "gpus": [], "gpu_error": str(e)}
    found = [{"index": gpus.as_int(r["index"]), "name": r["name"], "memory_total_mib": gpus.as_int(r["memory.total"]),
              "memory_used_mib": gpus.as_int(r["memory.used"]), "utilization_pct": gpus.as_int(r["utilization.gpu"])}
             for r in rows]
    return {"driver": rows[0]["driver_version"] if rows else None, "gpus": found}


def prefix_facts():
    """The interpreter's environment: its prefix, and whether that is a conda environment."""
    return {"path": sys.prefix, "conda": os.path.isdir(os.path.join(sys.prefix, "conda-meta"))}


def read_markers(paths):
    """{path: its text, or None when missing}: the shared-storage check reads the master's marker."""
    out = {}
    for path in paths:
        try:
            with open(path) as f:
                out[path] = f.read().strip()
        except OSError:
            out[path] = None
    return out


def manifest(path, checksum=True):
    """{relative file: [size, sha256 or None]} for a file or a directory tree."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        files = [path]
    else:
        files = []
        for d, dirs, names in os.walk(path):
            # caches (.cache/huggingface, __pycache__) are not part of the model
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            files += [os.path.join(d, f) for f in names]
        files.sort()
    out = {}
    for f in files:
        rel = os.path.basename(path) if f == path else os.path.relpath(f, path)
        digest = None
        if checksum:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
        out[rel] = [os.path.getsize(f), digest]
    return out


def free_gib(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return round(shutil.disk_usage(path or "/").free / 2**30, 1)


def probe(paths, disk, checksum, markers=()):
    facts = {
        "hostname": socket.gethostname(),
        "python_executable": sys.executable,
        "prefix": prefix_facts(),
        "markers": read_markers(markers),
        "versions": package_versions(),
        "torch": torch_facts(),
        **gpu_facts(),
        "paths": {name: manifest(p, checksum) for name, p in paths.items()},
        "disk_free_gib": free_gib(disk) if disk else None,
        "time": time.time(),
    }
    return facts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                   help="a file or directory whose manifest (sizes, sha256) is reported under NAME")
    p.add_argument("--disk", help="report the free space of the filesystem holding this path")
    p.add_argument("--no-checksum", action="store_true", help="sizes only (for very large models)")
    p.add_argument("--marker", action="append", default=[], metavar="PATH",
                   help="report the text of this file (the shared-storage check)")
    args = p.parse_args(argv)
    paths = dict(item.split("=", 1) for item in args.path)
    print(json.dumps(probe(paths, args.disk, not args.no_checksum, args.marker), sort_keys=True))


if __name__ == "__main__":
    main()
