"""The compile callbacks' order: the run's phase says compiling before the DeepSpeed engine compiles, so
the time engine.compile() takes (DeepSpeed's DeepCompile op built there: 45-60 s of an H200's first
start, silent and counted nowhere) is shown as compiling and counted in the first step's compile line."""

import json
from types import SimpleNamespace

from train.metrics import PhaseFile
from train.trainer import EngineCompileCallback, PhaseCallback, compile_callbacks


class Engine:
    """What EngineCompileCallback calls on DeepSpeed's engine in its torch.compile mode."""

    def __init__(self, phase_path):
        self.phase_path = phase_path
        self.phase_at_compile = None

    def is_deepcompile_enabled(self):
        return False

    def compile(self, schedule=None):
        self.phase_at_compile = json.loads(self.phase_path.read_text())["phase"]


def test_the_phase_is_compiling_while_the_engine_compiles(tmp_path):
    phase = PhaseFile(str(tmp_path), tick_s=3600)
    phase.set("loading")
    engine = Engine(tmp_path / "phase.json")
    trainer = SimpleNamespace(model_wrapped=engine)
    callbacks = compile_callbacks(trainer, phase, True, "torch")
    assert [type(c) for c in callbacks] == [PhaseCallback, EngineCompileCallback]
    args, state = SimpleNamespace(process_index=0), SimpleNamespace(global_step=0)
    for callback in callbacks:  # the order the Trainer calls them in: the order they were added
        callback.on_train_begin(args, state, None)
    phase._stop_ticker()
    assert engine.phase_at_compile == "compiling"


def test_without_an_engine_compile_only_the_phase(tmp_path):
    phase = PhaseFile(str(tmp_path), tick_s=3600)
    callbacks = compile_callbacks(SimpleNamespace(), phase, True, "none")
    assert [type(c) for c in callbacks] == [PhaseCallback]
    assert callbacks[0].recompile_steps() == () and callbacks[0].profiles() is None
