"""A relaunch of a DeepCompile plan finds its compiled graphs in Inductor's cache.

DeepSpeed 0.19.8 makes every start's graphs differ from the last start's, so each relaunch compiles
from scratch (W3 on the H200: 181 s with warm caches against 187 s cold):
- it keys each graph by id(gm.graph), an address, and writes that key into the graph as an argument
  of its gather, release and reduce ops;
- its passes order gathers and group prefetches by what they profile at each start (operator times,
  memory readings, all-gather times), so gathers of equal size come out in the order of that start's
  timing noise.
Here graphs are keyed by Dynamo's compile id, and the first start's profiles are recorded beside the
compile caches. A later start of the same graphs (same code, ranks, device and versions) replays the
recorded figures, without running DeepSpeed's profiler (reuse) or after it (rerun), so its passes build
the same graphs and Inductor's cache serves them. Every rank replays or none does: ranks must agree on
one schedule. Skipping the profiler changes nothing else: DeepSpeed runs it in profiling mode on a
forked RNG and frees what it gathered.
"""

import builtins
import collections
import hashlib
import inspect
import json
import logging
import os

logger = logging.getLogger(__name__)

# DeepCompile graph keys from Dynamo's compile ids start here, far from any CPython object address
GRAPH_KEY_BASE = 1 << 20

# the per-node figures DeepSpeed's profilers write into node.meta and its passes read
OPERATOR_FIELDS = ("device_time", "wall_time", "alloc_mem", "max_mem", "tensor_size", "profile_mem_start",
                   "profile_mem_peak")
MEMORY_FIELDS = ("profile_mem_start", "profile_mem_peak")
WRAPPED = "_dsmesh_replays_profiles"


def deepcompile_graph_key(obj):
    """id() as DeepCompile's backend sees it: a graph Dynamo compiled is keyed by its compile id (frame,
    recompile), the same number in every process that compiles the same frames in the same order;
    anything else keeps its id(). Keys stay unique in a process: Dynamo never reuses a compile id."""
    import torch.fx

    if isinstance(obj, torch.fx.Graph) and obj.owning_module is not None:
        cid = getattr(obj.owning_module, "meta", {}).get("dynamo_compile_id")
        if cid is not None and cid.frame_id is not None and cid.compiled_autograd_id is None \
                and 0 <= (cid.frame_compile_id or 0) < 1000:
            return GRAPH_KEY_BASE + 1000 * cid.frame_id + (cid.frame_compile_id or 0)
    return builtins.id(obj)


class ProfileRecord:
    """One JSON file per profile taken under `directory`, named by a hash of `salt` (versions, device,
    rank), what was profiled and how many times this process profiled the same before: DeepSpeed
    profiles a graph's memory again after a pass that left its code as it was (the state in between
    changed), and each of those is replayed from its own counterpart. Written whole (temporary file,
    then rename)."""

    def __init__(self, directory, salt, rerun=True):
        self.directory = directory
        self.salt = salt
        self.rerun = rerun  # False: a replayed profile is not taken again first (DeepSpeed's run skipped)
        self.replayed = 0
        self.recorded = 0
        self.taken = collections.Counter()
        self.unwritable = False

    def key(self, kind, text):
        """The key of the next profile of `text`: call once per profile taken."""
        self.taken[kind, text] += 1
        return hashlib.sha256(f"{self.salt}\n{kind}\n{self.taken[kind, text]}\n{text}".encode()).hexdigest()[:40]

    def load(self, key):
        try:
            with open(os.path.join(self.directory, key + ".json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save(self, key, data):
        """Records a profile; a directory that cannot take it costs the next start its replay, not this run."""
        path = os.path.join(self.directory, key + ".json")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as e:
            if not self.unwritable:
                logger.warning("DeepCompile profiles not recorded in %s (%s): a relaunch compiles its graphs again",
                               self.directory, e)
            self.unwritable = True
            return
        self.recorded += 1

    def summary(self):
        if not self.replayed + self.recorded:
            return ""
        how = "" if self.rerun or not self.replayed else " without running DeepSpeed's profiler"
        return f"DeepCompile profiles: {self.replayed} replayed{how}, {self.recorded} recorded"


def node_figures(graph, fields):
    """{node name: {field: value}} of the profiled figures in the graph's node.meta."""
    return {n.name: {f: n.meta[f] for f in fields if f in n.meta} for n in graph.nodes}


def fits(saved, graph):
    """Whether a recorded profile names exactly the graph's nodes (else it is of another graph)."""
    return saved is not None and set(saved.get("nodes", {})) == {n.name for n in graph.nodes}


def apply_figures(graph, saved):
    for n in graph.nodes:
        n.meta.update(saved["nodes"][n.name])


def all_ranks_agree(flag, process_group=None):
    """flag on every rank (a MIN all-reduce); flag itself where no process group is up."""
    import deepspeed.comm as dist

    if not dist.is_initialized():
        return bool(flag)
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        t = torch.tensor([1 if flag else 0], device=get_accelerator().current_device_name(), dtype=torch.int)
        dist.all_reduce(t, dist.ReduceOp.MIN, group=process_group)
        return bool(t.item())


class OperatorProfile:
    """What ProfilingInterpreter.run leaves behind: its figures in node.meta."""
    kind, fields = "operators", OPERATOR_FIELDS

    @staticmethod
    def complete(interpreter):
        from deepspeed.compile.profilers.graph_profile import is_profile_incomplete

        return not is_profile_incomplete(interpreter.graph)

    @staticmethod
    def state(interpreter):
        return {}

    @staticmethod
    def restore(interpreter, saved):
        pass


class MemoryProfile:
    """What MemoryProfilingInterpreter.run leaves behind: node figures and its mem_record."""
    kind, fields = "memory", MEMORY_FIELDS

    @staticmethod
    def complete(interpreter):
        return interpreter.profile_complete

    @staticmethod
    def state(interpreter):
        return {"mem_record": [list(r) for r in interpreter.mem_record]}

    @staticmethod
    def restore(interpreter, saved):
        interpreter.mem_record = [tuple(r) for r in saved["mem_record"]]
        interpreter.profile_complete = True


def replaying_profile(run, record, profile, agree=all_ranks_agree):
    """An interpreter's run (OperatorProfile or MemoryProfile says which) that replays a recorded profile
    of the same graph, or records this one. With record.rerun off a replay skips DeepSpeed's run (its
    outputs are not used: the passes read the figures; the gathered parameters it would release are
    none). Every rank takes the same branch: each agree() is a collective all of them reach."""

    def wrapped(self, *args):
        key = record.key(profile.kind, self.module.code)
        saved = record.load(key)
        group = getattr(self, "process_group", None)

        def replay():
            apply_figures(self.graph, saved)
            profile.restore(self, saved)
            record.replayed += 1

        if not record.rerun and agree(fits(saved, self.graph), group):
            replay()
            return None
        out = run(self, *args)
        complete = profile.complete(self)
        if agree(complete and fits(saved, self.graph), group):
            replay()
        elif complete:
            record.save(key, {"nodes": node_figures(self.graph, profile.fields), **profile.state(self)})
        return out

    setattr(wrapped, WRAPPED, True)
    return wrapped


def replaying_allgather_profile(run, record, world_size, agree=all_ranks_agree):
    """comm_profile.run_all_gather (the all-gather times prefetching is planned on): every rank agrees
    before it, since it is itself a collective that all or none must run."""

    def wrapped(device, dtype, maxsize, *args, **kwargs):
        key = record.key("allgather", f"{dtype} {maxsize} {args} {sorted(kwargs.items())} world {world_size}")
        saved = record.load(key)
        if agree(saved is not None and "results" in saved):
            record.replayed += 1
            return [tuple(r) for r in saved["results"]]
        results = run(device, dtype, maxsize, *args, **kwargs)
        record.save(key, {"results": [list(r) for r in results]})
        return results

    setattr(wrapped, WRAPPED, True)
    return wrapped


def profile_dir():
    """Beside Inductor's own cache (TORCHINDUCTOR_CACHE_DIR, on each node's local disk in a cluster)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        base = cache_dir()
    except ImportError:
        import tempfile

        base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor")
    return os.path.join(base, "deepcompile_profiles")


def known_deepspeed():
    """DeepSpeed's code this module patches, or None where it is not what this module knows."""
    try:
        from deepspeed.compile import backend
        from deepspeed.compile.profilers import comm_profile, graph_profile
    except ImportError:
        return None
    if "graph_id = id(gm.graph)" not in inspect.getsource(backend.make_backend):
        return None
    if not (hasattr(comm_profile, "run_all_gather") and hasattr(comm_profile, "profile_results")
            and hasattr(graph_profile, "ProfilingInterpreter") and hasattr(graph_profile, "MemoryProfilingInterpreter")):
        return None
    return backend, comm_profile, graph_profile


def stable_deepcompile_graphs(directory=None, rerun=True):
    """Keys DeepCompile's graphs by compile id and replays recorded profiles (rerun: after running
    DeepSpeed's profiler all the same); the ProfileRecord, or None where DeepSpeed's code is not what
    this module knows (then nothing is changed)."""
    found = known_deepspeed()
    if found is None:
        return None
    backend, comm_profile, graph_profile = found
    import deepspeed
    import deepspeed.comm as dist
    import torch

    from train.distributed import ranks_per_node

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # the all-gather timings are the layout's: 16 ranks on 2 nodes time otherwise than on 4
    layout = f"rank {rank}/{world}, {ranks_per_node(default=world)} per node"
    record = ProfileRecord(directory or profile_dir(),
                           f"torch {torch.__version__} deepspeed {deepspeed.__version__} {device} {layout}", rerun=rerun)
    backend.id = deepcompile_graph_key  # a module global shadows the builtin in that module only
    for cls, profile in ((graph_profile.ProfilingInterpreter, OperatorProfile),
                         (graph_profile.MemoryProfilingInterpreter, MemoryProfile)):
        run = getattr(cls.run, "__wrapped__", cls.run)
        cls.run = replaying_profile(run, record, profile)
        cls.run.__wrapped__ = run
    run = getattr(comm_profile.run_all_gather, "__wrapped__", comm_profile.run_all_gather)
    comm_profile.run_all_gather = replaying_allgather_profile(run, record, world)
    comm_profile.run_all_gather.__wrapped__ = run
    return record


def restore_deepspeed():
    """Undoes stable_deepcompile_graphs (tests)."""
    found = known_deepspeed()
    if found is None:
        return
    backend, comm_profile, graph_profile = found
    backend.__dict__.pop("id", None)
    for cls in (graph_profile.ProfilingInterpreter, graph_profile.MemoryProfilingInterpreter):
        cls.run = getattr(cls.run, "__wrapped__", cls.run)
    comm_profile.run_all_gather = getattr(comm_profile.run_all_gather, "__wrapped__", comm_profile.run_all_gather)

