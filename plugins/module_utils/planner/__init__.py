"""The ZeRO planner: the fastest way to run a fine-tune of a decoder-only LM that fits in GPU and
host memory, and the ds_config.json and training arguments that run it (standard library only).

model.py reads the model's shape, cluster.py the cluster and the job, memory.py is the memory model,
search.py weighs every candidate with the speed model and returns result.Plan, ds_config.py turns a
plan into ds_config.json and the training package's arguments. docs/planner.md explains the formulas.
"""

from .cluster import Cluster, Job
from .ds_config import PACKAGE_ARGS, build_ds_config, trainer_args, validate_ds_config
from .errors import PlanError
from .model import ADAPTER_TARGETS, ModelShape, load_model_shape
from .result import Plan, summary_lines
from .search import COMPILE_MODES, ENGINES, PLAN_OVERRIDE_KEYS, plan

__all__ = ["ADAPTER_TARGETS", "COMPILE_MODES", "ENGINES", "PACKAGE_ARGS", "PLAN_OVERRIDE_KEYS", "Cluster", "Job", "ModelShape",
           "Plan", "PlanError", "build_ds_config", "load_model_shape", "plan", "summary_lines",
           "trainer_args", "validate_ds_config"]
