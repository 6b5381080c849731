"""train.deepcompile_cache: DeepCompile's graphs keyed the same way in every process, and a relaunch
replaying the first start's profiles so that DeepSpeed's passes build the same graphs again."""

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.fx

from train import deepcompile_cache as dcc

GRAPH_KEYS_SCRIPT = """
import json, torch
from train.deepcompile_cache import deepcompile_graph_key
keys = []
def backend(gm, example_inputs):
    keys.append(deepcompile_graph_key(gm.graph))
    return gm.forward
@torch.compile(backend=backend, dynamic=False)
def f(x):
    return x.sin() + 1
@torch.compile(backend=backend, dynamic=False)
def g(x):
    return x.cos() * 2
f(torch.ones(3)); g(torch.ones(3)); f(torch.ones(4))
print(json.dumps(keys))
"""


def test_graph_keys_are_the_same_in_every_process():
    """Dynamo's graphs get the same keys in two processes running the same compiles (id() gives
    addresses that differ), one per graph, a recompile included; anything else keeps its id()."""

    def keys():
        out = subprocess.run([sys.executable, "-c", GRAPH_KEYS_SCRIPT], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = keys(), keys()
    assert first == second and len(set(first)) == 3, (first, second)
    assert all(dcc.GRAPH_KEY_BASE <= k < 1 << 31 for k in first), first
    graph = torch.fx.Graph()
    assert dcc.deepcompile_graph_key(graph) == id(graph)


class Layers(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.lins = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))

    def forward(self, x):
        for lin in self.lins:
            x = torch.relu(lin(x))
        return x


class Profiler:
    """Stands in for DeepSpeed's ProfilingInterpreter (which needs its CUDA op): run() writes this
    start's timing noise into node.meta, as the real one does."""

    def __init__(self, gm):
        self.module, self.graph, self.process_group = gm, gm.graph, None
        self.runs = 0

    def run(self, *args):
        self.runs += 1
        for n in self.graph.nodes:
            n.meta.update({f: random.random() for f in dcc.OPERATOR_FIELDS})
        return "out"


class MemoryProfiler(Profiler):
    profile_complete = True

    def run(self, *args):  # (the real one writes only the memory figures)
        self.runs += 1
        for n in self.graph.nodes:
            n.meta.update({f: random.randint(0, 99) for f in dcc.MEMORY_FIELDS})
        self.mem_record = [(n.name, random.randint(0, 99), 0, random.randint(0, 99)) for n in self.graph.nodes]


def figures(graph):
    return [(n.name, dict(n.meta)) for n in graph.nodes]


def test_a_second_start_replays_the_first_starts_profiles(tmp_path):
    """Start 1 records its figures; start 2 of the same graph, with other timings, ends with start 1's
    figures in every node (what DeepSpeed's scheduler reads) and start 1's memory record."""
    starts = []
    for _ in range(2):
        record = dcc.ProfileRecord(str(tmp_path), "salt")
        gm = torch.fx.symbolic_trace(Layers())
        op = dcc.replaying_profile(Profiler.run, record, dcc.OperatorProfile)
        mem = dcc.replaying_profile(MemoryProfiler.run, record, dcc.MemoryProfile)
        prof, mprof = Profiler(gm), MemoryProfiler(gm)
        assert op(prof, torch.ones(4)) == "out" and prof.runs == 1  # DeepSpeed's profiler always runs
        ops = figures(gm.graph)
        mem(mprof, torch.ones(4))
        starts.append((ops, figures(gm.graph), mprof.mem_record, record.replayed, record.recorded))
    (ops1, mem1, rec1, replayed1, recorded1), (ops2, mem2, rec2, replayed2, recorded2) = starts
    assert (replayed1, recorded1, replayed2, recorded2) == (0, 2, 2, 0)
    assert ops2 == ops1 and mem2 == mem1 and rec2 == rec1
    assert len(list(tmp_path.glob("*.json"))) == 2 and not list(tmp_path.glob("*.tmp*"))


def test_another_graph_or_a_disagreeing_rank_profiles_anew(tmp_path):
    """A recorded profile is replayed only for a graph with the same code and nodes, and only when
    every rank can replay (agree: the MIN all-reduce across ranks); else this start's figures stand."""
    dcc.replaying_profile(Profiler.run, dcc.ProfileRecord(str(tmp_path), "salt"), dcc.OperatorProfile)(
        Profiler(torch.fx.symbolic_trace(Layers(3))))
    other = dcc.ProfileRecord(str(tmp_path), "salt")
    dcc.replaying_profile(Profiler.run, other, dcc.OperatorProfile)(Profiler(torch.fx.symbolic_trace(Layers(2))))
    assert (other.replayed, other.recorded) == (0, 1)

    gm = torch.fx.symbolic_trace(Layers(3))
    refused = dcc.ProfileRecord(str(tmp_path), "salt")
    dcc.replaying_profile(Profiler.run, refused, dcc.OperatorProfile, agree=lambda flag, group=None: False)(Profiler(gm))
    assert (refused.replayed, refused.recorded) == (0, 1)  # a start that did not replay records its own
    recorded = figures(gm.graph)
    again = dcc.ProfileRecord(str(tmp_path), "salt")
    dcc.replaying_profile(Profiler.run, again, dcc.OperatorProfile)(Profiler(gm))
    assert again.replayed == 1 and figures(gm.graph) == recorded


def test_the_allgather_profile_is_replayed_without_running_it(tmp_path):
    """DeepSpeed's all-gather timing is a collective: on replay no rank runs it."""
    calls = []

    def run_all_gather(device, dtype, maxsize, warmup=5):
        calls.append(maxsize)
        return [(2 ** i, random.random()) for i in range(maxsize)]

    first = dcc.replaying_allgather_profile(run_all_gather, dcc.ProfileRecord(str(tmp_path), "s"), world_size=1)
    second = dcc.replaying_allgather_profile(run_all_gather, dcc.ProfileRecord(str(tmp_path), "s"), world_size=1)
    got = first("cuda:0", torch.bfloat16, 4)
    assert second("cuda:0", torch.bfloat16, 4) == got and calls == [4]
    other_world = dcc.replaying_allgather_profile(run_all_gather, dcc.ProfileRecord(str(tmp_path), "s"), 2)
    other_world("cuda:0", torch.bfloat16, 4)
    assert calls == [4, 4]


def test_a_graph_profiled_twice_in_a_start_replays_each_profile_in_turn(tmp_path):
    """DeepSpeed profiles memory again after a pass that kept the graph's code (what changed is the
    state, e.g. parameters made persistent): within a start that is a new profile, not a replay, and
    the next start replays the first and the second profile each as it was."""
    runs = []
    for _ in range(2):
        record = dcc.ProfileRecord(str(tmp_path), "salt")
        gm = torch.fx.symbolic_trace(Layers())
        mem = dcc.replaying_profile(MemoryProfiler.run, record, dcc.MemoryProfile)
        taken = []
        for _ in range(2):
            mprof = MemoryProfiler(gm)
            mem(mprof)
            taken.append(mprof.mem_record)
        runs.append((taken, record.replayed, record.recorded))
    (first, replayed1, recorded1), (second, replayed2, recorded2) = runs
    assert (replayed1, recorded1, replayed2, recorded2) == (0, 2, 2, 0)
    assert second == first and first[0] != first[1]


def test_a_broken_record_is_profiled_anew(tmp_path):
    gm = torch.fx.symbolic_trace(Layers())
    key = dcc.ProfileRecord(str(tmp_path), "salt").key("operators", gm.code)
    (tmp_path / f"{key}.json").write_text("{not json")
    record = dcc.ProfileRecord(str(tmp_path), "salt")
    dcc.replaying_profile(Profiler.run, record, dcc.OperatorProfile)(Profiler(gm))
    assert (record.replayed, record.recorded) == (0, 1)
    assert dcc.fits(record.load(key), gm.graph)


def test_a_directory_that_cannot_take_the_record_does_not_stop_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    record = dcc.ProfileRecord(str(blocker / "profiles"), "salt")  # a path under a file: not creatable
    prof = Profiler(torch.fx.symbolic_trace(Layers()))
    assert dcc.replaying_profile(Profiler.run, record, dcc.OperatorProfile)(prof) == "out"
    assert (record.recorded, record.unwritable) == (0, True)


def test_installed_in_deepspeed_and_undone(tmp_path, monkeypatch):
    """On DeepSpeed 0.19.8 the graph key and the three replaying profilers go in, and come out again;
    a DeepSpeed that no longer keys graphs by id(gm.graph) would be left alone (and this test says so).
    The records are of one layout: ranks per node as the launcher says (all-gathers time otherwise)."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "8")
    from deepspeed.compile import backend
    from deepspeed.compile.profilers import comm_profile, graph_profile

    original = (graph_profile.ProfilingInterpreter.run, graph_profile.MemoryProfilingInterpreter.run,
                comm_profile.run_all_gather)
    try:
        record = dcc.stable_deepcompile_graphs(str(tmp_path))
        assert record is not None and record.salt.endswith(" rank 0/1, 8 per node")
        assert backend.id is dcc.deepcompile_graph_key
        for fn in (graph_profile.ProfilingInterpreter.run, graph_profile.MemoryProfilingInterpreter.run,
                   comm_profile.run_all_gather):
            assert getattr(fn, dcc.WRAPPED, False)
        dcc.stable_deepcompile_graphs(str(tmp_path))  # twice wraps once
        assert graph_profile.ProfilingInterpreter.run.__wrapped__ is original[0]
    finally:
        dcc.restore_deepspeed()
    assert "id" not in backend.__dict__
    assert (graph_profile.ProfilingInterpreter.run, graph_profile.MemoryProfilingInterpreter.run,
            comm_profile.run_all_gather) == original


@pytest.mark.parametrize("flag", [True, False])
def test_one_process_agrees_with_itself(flag):
    assert dcc.all_ranks_agree(flag) is flag


def test_reuse_replays_without_running_deepspeeds_profilers(tmp_path):
    """--deepcompile_profiles reuse: a start whose every profile is recorded takes the figures and does
    not run DeepSpeed's profilers; a profile not recorded yet is taken and recorded as with rerun."""
    first = dcc.ProfileRecord(str(tmp_path), "salt")
    gm = torch.fx.symbolic_trace(Layers())
    prof, mprof = Profiler(gm), MemoryProfiler(gm)
    dcc.replaying_profile(Profiler.run, first, dcc.OperatorProfile)(prof)
    dcc.replaying_profile(MemoryProfiler.run, first, dcc.MemoryProfile)(mprof)
    want, want_mem = figures(gm.graph), mprof.mem_record

    reuse = dcc.ProfileRecord(str(tmp_path), "salt", rerun=False)
    gm2 = torch.fx.symbolic_trace(Layers())
    prof2, mprof2 = Profiler(gm2), MemoryProfiler(gm2)
    assert dcc.replaying_profile(Profiler.run, reuse, dcc.OperatorProfile)(prof2) is None
    dcc.replaying_profile(MemoryProfiler.run, reuse, dcc.MemoryProfile)(mprof2)
    assert prof2.runs == 0 and mprof2.runs == 0
    assert figures(gm2.graph) == want and mprof2.mem_record == want_mem and mprof2.profile_complete
    assert reuse.summary() == "DeepCompile profiles: 2 replayed without running DeepSpeed's profiler, 0 recorded"

    new = Profiler(torch.fx.symbolic_trace(Layers(2)))
    assert dcc.replaying_profile(Profiler.run, reuse, dcc.OperatorProfile)(new) == "out" and new.runs == 1
    assert reuse.recorded == 1
