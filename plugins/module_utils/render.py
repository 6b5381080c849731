"""The one renderer of a run: from the job's settings and the cluster's nodes, the plan and every file
its launch needs - hostfile, ds_config.json, .deepspeed_env, plan.json and launch.sh - with the launch
command. The launch stage and the preview (playbooks/render.yml) both call it through the
deepspeed_render module (standard library only)."""

import json
import os
from dataclasses import dataclass, field

from .gpus import gpu_spec, supports_bf16
from .hostfile import render_hostfile, resolve_nodes
from .launch import launch_command, launch_script, split_train_args
from .planner import ADAPTER_TARGETS, Cluster, Job, build_ds_config, load_model_shape, plan, summary_lines, trainer_args
from .rank_env import build_env, omp_threads, render_env

FILES = ("hostfile", "ds_config.json", ".deepspeed_env", "plan.json", "launch.sh")


@dataclass
class RunSpec:
    """The job's settings, as the deepspeed_job role's variables give them."""
    python: str
    code_dir: str
    run_dir: str
    output_dir: str
    model_dir: str
    datasets: list
    max_seq_length: int
    global_batch_size: int
    model_shape: dict = None
    eval_datasets: list = field(default_factory=list)
    finetune: str = "full"
    lora: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)
    plan_overrides: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)
    planner_settings: dict = field(default_factory=dict)
    shared_storage: bool = False
    cache_dir: str = "/var/cache/dsmesh"
    # The training environment: a virtualenv (training_env_mode venv, or an existing one), a conda env.
    env_kind: str = "venv"
    env: dict = field(default_factory=dict)
    launcher_args: list = field(default_factory=list)
    master_port: int = 29500

    def __post_init__(self):
        # the values come from Ansible variables: -e key=value gives strings
        self.max_seq_length, self.global_batch_size = int(self.max_seq_length), int(self.global_batch_size)
        self.master_port = int(self.master_port)
        self.shared_storage = as_bool(self.shared_storage, "shared_storage")


def as_bool(value, name):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"job setting {name}: {value!r} is not true or false")


@dataclass
class Rendered:
    plan: object
    files: dict  # file name -> text
    argv: list
    env: dict
    hosts: list
    summary: list
    warnings: list


def cluster_facts(nodes):
    """What the planner needs of the nodes that run the job: the smallest GPU and host memory (a rank
    must fit on every node), the GPU model(s), bf16 on all of them, the CPU cores, each one's
    interface. A node reports what it has (gathered facts) or the inventory says it."""
    warnings = []
    models = sorted({n["gpu_model"] for n in nodes if n.get("gpu_model")})
    gpu_model = " / ".join(models) or None
    memories = [float(n["gpu_memory_gib"]) for n in nodes if n.get("gpu_memory_gib")]
    if not memories and gpu_model and all(gpu_spec(m) for m in models):
        memories = [float(gpu_spec(m)["memory_gib"]) for m in models]
        warnings.append(f"gpu_memory_gib taken from the GPU table for {gpu_model}; set it in the inventory or "
                        "gather GPU facts for the exact figure")
    device = "gpu" if memories or any(int(n.get("gpu_count") or 0) > 0 for n in nodes) else "cpu"
    bf16 = None
    if device == "gpu":
        flags = [n.get("bf16") if n.get("bf16") is not None else supports_bf16(n.get("gpu_model"),
                                                                               n.get("compute_capability"))
                 for n in nodes]
        bf16 = None if None in flags else all(flags)
        if bf16 is None:
            warnings.append(f"cannot tell whether {gpu_model!r} has bf16: planning fp16; set gpu_bf16 in the "
                            "inventory to decide")
            bf16 = False
    hosts = [float(n["host_memory_gib"]) for n in nodes if n.get("host_memory_gib")]
    cores = [int(n["cpu_cores"]) for n in nodes if n.get("cpu_cores")]
    return {"device": device, "gpu_model": gpu_model, "gpu_memory_gib": min(memories) if memories else None,
            "host_memory_gib": min(hosts) if hosts else None, "bf16": bf16, "cpu_cores": min(cores) if cores else None,
            "interfaces": [n.get("interface") for n in nodes]}, warnings


def rank_environment(spec, facts, ranks_per_node):
    """.deepspeed_env's variables: the training environment's prefix, threads per rank, the node-local
    caches, the cluster interfaces for NCCL, then the user's. The preflight's all-reduce runs in it too."""
    cache = spec.cache_dir.rstrip("/")
    return build_env(user_vars=spec.env, venv=os.path.dirname(os.path.dirname(spec.python)),
                     prefix_kind=spec.env_kind,
                     omp_num_threads=omp_threads(facts["cpu_cores"], ranks_per_node),
                     hf_home=f"{cache}/huggingface", torch_extensions_dir=f"{cache}/torch_extensions",
                     compile_cache_dir=cache, interfaces=facts["interfaces"])


def _lora_settings(spec):
    lora = dict(spec.lora or {})
    return {"r": int(lora.get("r", 16)), "alpha": lora.get("alpha", 32), "dropout": float(lora.get("dropout", 0.05)),
            "target_modules": list(lora.get("target_modules") or [])}


def render_run(spec, nodes, master):
    """Plan the job on the nodes and render its files. Raises HostfileError, PlanError, LaunchError
    or EnvError (all ValueErrors naming the setting) before anything is written."""
    hosts = resolve_nodes(nodes, master)
    used = [n for n in nodes if n["name"] in {h["name"] for h in hosts}]
    facts, warnings = cluster_facts(used)
    optimizer, extra_args = split_train_args(spec.train_args)
    lora = _lora_settings(spec) if spec.finetune == "lora" else None
    model = load_model_shape(model_dir=None if spec.model_shape else spec.model_dir, config=spec.model_shape,
                             name=os.path.basename(os.path.normpath(spec.model_dir)))
    job = Job(seq_len=spec.max_seq_length, global_batch_size=spec.global_batch_size, finetune=spec.finetune,
              lora_rank=(lora or {}).get("r", 16), lora_alpha=(lora or {}).get("alpha", 32),
              lora_dropout=(lora or {}).get("dropout", 0.05),
              lora_targets=(lora or {}).get("target_modules") or ADAPTER_TARGETS,
              shared_storage=spec.shared_storage, **optimizer)
    cluster = Cluster([h["slots"] for h in hosts], gpu_memory_gib=facts["gpu_memory_gib"],
                      host_memory_gib=facts["host_memory_gib"], bf16=facts["bf16"], device=facts["device"],
                      gpu_model=facts["gpu_model"])
    chosen = plan(model, cluster, job, overrides=spec.plan_overrides, settings=spec.planner_settings)
    chosen.warnings += warnings
    config = build_ds_config(chosen, job, model, spec.config_overrides)
    argv = launch_command(python=spec.python, run_dir=spec.run_dir, output_dir=spec.output_dir,
                          master_addr=hosts[0]["address"], master_port=spec.master_port,
                          launcher_args=spec.launcher_args, engine=chosen.engine, model_dir=spec.model_dir,
                          datasets=spec.datasets, eval_datasets=spec.eval_datasets,
                          max_seq_length=spec.max_seq_length, lora=lora, trainer_args=trainer_args(config, chosen),
                          extra_args=extra_args)
    env = rank_environment(spec, facts, max(h["slots"] for h in hosts))
    env_file = os.path.join(spec.run_dir, ".deepspeed_env")
    files = {
        "hostfile": render_hostfile(hosts),
        "ds_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        ".deepspeed_env": render_env(env),
        "plan.json": json.dumps(chosen.as_dict(), indent=2, sort_keys=True) + "\n",
        "launch.sh": launch_script(argv, spec.code_dir, env_file, master, chosen.label),
    }
    return Rendered(plan=chosen, files=files, argv=argv, env=dict(env), hosts=hosts, summary=summary_lines(chosen),
                    warnings=chosen.warnings)
