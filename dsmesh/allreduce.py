"""A short all-reduce across every rank, launched by `deepspeed --hostfile` like the training job.

Proves that the launcher, the rendezvous and the collective backend work across the nodes and
measures the bus bandwidth (NCCL on GPUs, gloo on CPUs). Rank 0 prints one JSON line prefixed
with DSMESH_ALLREDUCE. Touches nothing on disk.
"""
import argparse
import json
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_mb", type=float, default=64.0, help="tensor size per all-reduce")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout_s", type=int, default=120)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(args.local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", args.local_rank) if cuda else torch.device("cpu")

    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())

    numel = int(args.size_mb * 2**20 / 4)
    x = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(x)  # warm-up, and the check below
    ok = bool(torch.allclose(x[:8], torch.full((8,), float(world), device=device)))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    # Bus bandwidth as nccl-tests defines it: each rank sends and receives 2(n-1)/n of the data.
    busbw = (numel * 4) * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0
    if rank == 0:
        print("DSMESH_ALLREDUCE " + json.dumps({
            "backend": backend, "world_size": world, "hosts": sorted(set(hosts)), "rank_hosts": hosts,
            "size_mb": args.size_mb, "seconds_per_iter": round(seconds, 6), "busbw_gbps": round(busbw, 3),
            "correct": ok}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
