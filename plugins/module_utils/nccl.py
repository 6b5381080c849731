"""What NCCL says it uses (standard library only): the transport between nodes and within one, from
its own NCCL_DEBUG=INFO lines, as the preflight's all-reduce prints them through the launcher."""

import re

_NETWORK = re.compile(r"NCCL INFO Using network (?P<name>\w+)")
_IB_DEVICES = re.compile(r"NCCL INFO NET/IB : Using (?P<devices>.+?)(?: ?\[RO\])?(?: ?;|$)")
_IB_DEVICE = re.compile(r"\[\d+\](?P<name>[\w.-]+:\d+)/(?P<kind>IB|RoCE)")
_SOCKET_DEVICES = re.compile(r"NCCL INFO NET/Socket : Using (?P<devices>.+)$")
_SOCKET_DEVICE = re.compile(r"\[\d+\](?P<name>[\w.-]+):")
# "Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA", "Ring 00 : 155[3d000] -> 157[b2000] via P2P/IPC"
_CHANNEL = re.compile(r"NCCL INFO (?:Channel|Ring) \d+(?:/\d+)? : .* via (?P<via>\S+)")
_NO_IB = "NET/IB : No device found"

# What a cluster's inventory may declare its fabric to be, and the NCCL transport each one should give.
FABRICS = {"infiniband": "IB", "roce": "IB", "ethernet": "Socket"}


def transport(output):
    """{"network": IB | Socket | None, "ib_devices": [(device, IB | RoCE)], "socket_devices": [...],
    "between_nodes": sorted NET/... channel kinds, "within_node": sorted P2P/SHM/NVLS kinds,
    "gpudirect_rdma": bool, "ib_found": False when NCCL said it found no IB device}."""
    out = {"network": None, "ib_devices": [], "socket_devices": [], "between_nodes": [], "within_node": [],
           "gpudirect_rdma": False, "ib_found": None}
    between, within = set(), set()
    for line in output.splitlines():
        m = _NETWORK.search(line)
        if m:
            out["network"] = m.group("name")
        m = _IB_DEVICES.search(line)
        if m:
            # NCCL 2.28 prints "NET/IB : Using [RO]; OOB ..." with no device after "No device found"
            for d in _IB_DEVICE.finditer(m.group("devices")):
                out["ib_found"] = True
                if (d.group("name"), d.group("kind")) not in out["ib_devices"]:
                    out["ib_devices"].append((d.group("name"), d.group("kind")))
        if _NO_IB in line and out["ib_found"] is None:
            out["ib_found"] = False
        m = _SOCKET_DEVICES.search(line)
        if m:
            for d in _SOCKET_DEVICE.finditer(m.group("devices")):
                if d.group("name") not in out["socket_devices"]:
                    out["socket_devices"].append(d.group("name"))
        m = _CHANNEL.search(line)
        if m:
            via = m.group("via")
            if via.startswith("NET/"):
                between.add(via.split("/")[1])
                out["gpudirect_rdma"] = out["gpudirect_rdma"] or via.endswith("/GDRDMA")
            else:
                within.add(via.split("/")[0])
    out["between_nodes"], out["within_node"] = sorted(between), sorted(within)
    if out["network"] is None and len(between) == 1:
        out["network"] = next(iter(between))
    return out


def describe(t, nodes=2):
    """One line: the transport between nodes, over which devices (one node: within it)."""
    if nodes == 1:
        within = ", ".join(t["within_node"]) or "one rank per node, nothing between GPUs"
        return f"NCCL on one node ({within}); network {t['network'] or 'none'} between nodes, unused"
    if t["network"] == "IB":
        kinds = sorted({kind for _, kind in t["ib_devices"]}) or ["IB"]
        devices = ", ".join(name for name, _ in t["ib_devices"]) or "?"
        line = f"NCCL between nodes: {'/'.join(kinds)} verbs over {devices}"
        return line + (" with GPUDirect RDMA" if t["gpudirect_rdma"] else "")
    if t["network"] == "Socket":
        return f"NCCL between nodes: TCP sockets over {', '.join(t['socket_devices']) or '?'}"
    if t["within_node"]:
        return f"NCCL within one node: {', '.join(t['within_node'])}"
    return "NCCL named no transport (no NCCL_DEBUG output: a CPU cluster uses gloo)"
