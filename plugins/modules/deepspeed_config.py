#!/usr/bin/python
"""Ansible module: plan a DeepSpeed ZeRO job and write its ds_config.json."""



DOCUMENTATION = r"""
---
module: deepspeed_config
short_description: Plan DeepSpeed ZeRO training that fits and write its ds_config.json
description:
  - Reads the model's shape (its C(config.json), or a shape given inline), the cluster (nodes,
    slots, GPU and host memory, bf16 support) and the job (sequence length, global batch size,
    full fine-tune or LoRA), and picks the fastest plan that fits in GPU and host memory -
    ZeRO stage 0-3, optimizer/parameter offload, gradient checkpointing, micro-batch and
    gradient accumulation that give the global batch.
  - Writes a C(ds_config.json) with concrete values only (no C(auto)), consistent with the
    returned I(trainer_args), so HF Trainer's DeepSpeed integration accepts it.
  - Returns the plan with the estimated GPU memory per rank and host memory per node, broken
    down, and why faster plans were rejected. An impossible job fails with the numbers and what
    would make it fit.
  - The memory formulas are in docs/planner.md.
  - Writes atomically and only when the content or mode differs.
version_added: "1.0.0"
author:
  - ML infrastructure team
options:
  dest:
    description: Path of the ds_config.json to write. Its directory must exist.
    type: path
    required: true
  model_dir:
    description: Directory with the model's config.json (only config.json is read).
    type: path
  model_shape:
    description:
      - The model as a Hugging Face config dict (C(hidden_size), C(intermediate_size),
        C(num_hidden_layers), C(num_attention_heads), C(num_key_value_heads), C(vocab_size),
        C(tie_word_embeddings), C(model_type), optional C(head_dim), C(num_parameters)).
      - Used when I(model_dir) is not given.
    type: dict
  model_name:
    description: Name shown in the plan (default the model directory's name).
    type: str
  slots:
    description: Ranks per node, one entry per node (the hostfile's slots).
    type: list
    elements: int
  nodes:
    description: Number of nodes, when I(slots) is not given.
    type: int
  gpus_per_node:
    description: Ranks per node, when I(slots) is not given.
    type: int
  device:
    description: C(gpu), or C(cpu) for CPU-only ranks (fp32, memory from the host).
    type: str
    choices: [gpu, cpu]
    default: gpu
  gpu_memory_gb:
    description: Memory of one GPU in GiB (the smallest, if they differ).
    type: float
  host_memory_gb:
    description: Host RAM of one node in GiB (the smallest, if they differ).
    type: float
    required: true
  gpu_model:
    description: GPU model name; used to decide bf16 when I(bf16) and I(compute_capability) are not given.
    type: str
  compute_capability:
    description: CUDA compute capability (C(9.0)); bf16 needs 8.0 or newer.
    type: str
  bf16:
    description: Whether the GPUs have bf16. Default from I(compute_capability) or I(gpu_model); fp16 otherwise.
    type: bool
  seq_len:
    description: Tokens per training sequence (sequences are packed or padded to this length).
    type: int
    required: true
  global_batch_size:
    description: Sequences per optimizer step over all ranks (micro-batch x accumulation x ranks).
    type: int
    required: true
  finetune:
    description: C(full) fine-tune or C(lora) (peft adapters, base model frozen).
    type: str
    choices: [full, lora]
    default: full
  lora:
    description:
      - LoRA settings - C(rank) (16), C(alpha) (32), C(dropout) (0.05), C(target_modules) (all
        linear layers). peft's names C(r), C(lora_alpha), C(lora_dropout) are accepted too.
    type: dict
    default: {}
  optimizer:
    description: AdamW settings - C(lr) (1e-5 full, 2e-4 LoRA), C(betas) ([0.9, 0.999]), C(eps) (1e-8), C(weight_decay) (0.0).
    type: dict
    default: {}
  max_grad_norm:
    description: Gradient clipping (ds C(gradient_clipping), Trainer C(max_grad_norm)).
    type: float
    default: 1.0
  shared_storage:
    description:
      - Whether the nodes share the output directory. When false each node saves its own
        checkpoint shards (ds C(checkpoint.use_node_local_storage), Trainer C(save_on_each_node)).
    type: bool
    default: false
  plan_overrides:
    description:
      - Force planner choices - C(engine) (C(deepspeed), or C(torch) on one GPU), C(zero_stage),
        C(offload_optimizer), C(offload_param), C(gradient_checkpointing), C(checkpoint_layers) (how
        many decoder layers are checkpointed), C(micro_batch_size). The planner still checks that the
        plan fits.
    type: dict
    default: {}
  config_overrides:
    description:
      - Merged into the generated ds_config.json last (nested dicts merge, C(null) deletes a key).
        Batch sizes are re-checked; C(auto) is refused.
    type: dict
    default: {}
  planner_settings:
    description: Override constants of the memory and speed models (see docs/planner.md).
    type: dict
    default: {}
  mode:
    description: Permission bits of the file, as an octal string.
    type: raw
    default: "0644"
notes:
  - Supports check mode and diff mode.
  - Pass I(trainer_argv) (or I(trainer_args)) to the training package (C(python -m train)) with
    C(--deepspeed ds_config.json); HF refuses a config whose batch sizes, clipping, precision or
    optimizer settings differ from its arguments.
  - On one GPU the planner may choose the C(torch) engine (plan C(engine)) - plain PyTorch with
    fused AdamW and compiled layers, no partitioning, measured 1.8x faster than DeepSpeed ZeRO-3 on
    an H100. Then launch without C(--deepspeed) - I(trainer_args) carry everything (ds_config.json is
    still written, for reference and for C(plan_overrides) C(engine=deepspeed)).
seealso:
  - module: deepspeed_hostfile
  - module: deepspeed_env
"""

EXAMPLES = r"""
- name: Plan a full fine-tune of a 32B model on 2 x 8 H20
  deepspeed_config:
    dest: /srv/train/ds_config.json
    model_dir: /models/DeepSeek-R1-Distill-Qwen-32B
    slots: [8, 8]
    gpu_model: NVIDIA H20
    gpu_memory_gb: 96
    host_memory_gb: 1024
    seq_len: 4096
    global_batch_size: 64
  register: ds

- name: LoRA on the same cluster, ZeRO stage forced, a DeepSpeed field overridden
  deepspeed_config:
    dest: /srv/train/ds_config.json
    model_dir: /models/DeepSeek-R1-Distill-Qwen-32B
    slots: [8, 8]
    gpu_memory_gb: 96
    host_memory_gb: 1024
    bf16: true
    seq_len: 4096
    global_batch_size: 64
    finetune: lora
    lora: {rank: 64, alpha: 128}
    plan_overrides: {zero_stage: 3}
    config_overrides: {steps_per_print: 10}
"""

RETURN = r"""
plan:
  description:
    - The chosen plan - engine (C(deepspeed) or C(torch)), stage, offload, checkpointing (and
      C(checkpoint_layers)), micro-batch, accumulation, the GPU memory
      per rank (C(gpu_memory_gib), broken down) and host memory per node (C(host_memory_gib)),
      predicted peaks, the faster plans that do not fit and why (C(rejected_faster_plans)).
  returned: success
  type: dict
summary:
  description: The plan as readable lines.
  returned: success
  type: list
  elements: str
config:
  description: The ds_config.json content.
  returned: success
  type: dict
trainer_args:
  description:
    - Arguments of the training package that match the config - HF TrainingArguments (batch sizes,
      checkpointing, precision, optimizer) and, where the plan needs them, C(checkpoint_layers),
      C(compile_regions).
  returned: success
  type: dict
  sample: {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "bf16": true}
trainer_argv:
  description: I(trainer_args) as command-line flags.
  returned: success
  type: list
  elements: str
dest:
  description: The path written.
  returned: success
  type: str
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ..module_utils.files import FileWriteError, parse_mode, write_file
from ..module_utils.gpus import supports_bf16
from ..module_utils.ds_planner import (ADAPTER_TARGETS, Cluster, Job, PlanError, build_ds_config,
                                             load_model_shape, plan, summary_lines, trainer_args,
                                             trainer_argv)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            model_dir=dict(type="path"),
            model_shape=dict(type="dict"),
            model_name=dict(type="str"),
            slots=dict(type="list", elements="int"),
            nodes=dict(type="int"),
            gpus_per_node=dict(type="int"),
            device=dict(type="str", choices=["gpu", "cpu"], default="gpu"),
            gpu_memory_gb=dict(type="float"),
            host_memory_gb=dict(type="float", required=True),
            gpu_model=dict(type="str"),
            compute_capability=dict(type="str"),
            bf16=dict(type="bool"),
            seq_len=dict(type="int", required=True),
            global_batch_size=dict(type="int", required=True),
            finetune=dict(type="str", choices=["full", "lora"], default="full"),
            lora=dict(type="dict", default={}),
            optimizer=dict(type="dict", default={}),
            max_grad_norm=dict(type="float", default=1.0),
            shared_storage=dict(type="bool", default=False),
            plan_overrides=dict(type="dict", default={}),
            config_overrides=dict(type="dict", default={}),
            planner_settings=dict(type="dict", default={}),
            mode=dict(type="raw", default="0644"),
        ),
        mutually_exclusive=[("model_dir", "model_shape"), ("slots", "nodes")],
        required_one_of=[("model_dir", "model_shape"), ("slots", "nodes")],
        required_together=[("nodes", "gpus_per_node")],
        supports_check_mode=True,
    )
    p = module.params
    warnings = []
    slots = p["slots"] or [p["gpus_per_node"]] * p["nodes"]
    bf16 = p["bf16"]
    if bf16 is None and p["device"] == "gpu":
        bf16 = supports_bf16(p["gpu_model"], p["compute_capability"])
        if bf16 is None:
            warnings.append("cannot tell whether {!r} has bf16: planning fp16; set bf16 to decide".format(p["gpu_model"]))
            bf16 = False
    lora = dict(p["lora"])
    opt = dict(p["optimizer"])
    try:
        model = load_model_shape(model_dir=p["model_dir"], config=p["model_shape"], name=p["model_name"])
        cluster = Cluster(slots, gpu_memory_gib=p["gpu_memory_gb"], host_memory_gib=p["host_memory_gb"],
                          bf16=bf16, device=p["device"], gpu_model=p["gpu_model"])
        betas = opt.get("betas", [0.9, 0.999])
        job = Job(
            seq_len=p["seq_len"],
            global_batch_size=p["global_batch_size"],
            finetune=p["finetune"],
            lora_rank=lora.get("rank", lora.get("r", 16)),
            lora_alpha=lora.get("alpha", lora.get("lora_alpha", 32)),
            lora_dropout=lora.get("dropout", lora.get("lora_dropout", 0.05)),
            lora_targets=lora.get("target_modules", ADAPTER_TARGETS),
            learning_rate=opt.get("lr"),
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            adam_epsilon=opt.get("eps", 1e-8),
            weight_decay=opt.get("weight_decay", 0.0),
            max_grad_norm=p["max_grad_norm"],
            shared_storage=p["shared_storage"],
        )
        chosen = plan(model, cluster, job, overrides=p["plan_overrides"], settings=p["planner_settings"])
        config = build_ds_config(chosen, job, model, p["config_overrides"])
        content = json.dumps(config, indent=2, sort_keys=True) + "\n"
        written = write_file(p["dest"], content, parse_mode(p["mode"]), check_mode=module.check_mode)
    except PlanError as exc:
        module.fail_json(msg=str(exc), plan_error=str(exc).splitlines())
    except FileWriteError as exc:
        module.fail_json(msg=str(exc))
    chosen["warnings"] = chosen["warnings"] + warnings
    args = trainer_args(config, chosen)
    result = dict(
        changed=written["changed"],
        dest=p["dest"],
        plan=chosen,
        summary=summary_lines(chosen),
        config=config,
        trainer_args=args,
        trainer_argv=trainer_argv(args),
    )
    for w in chosen["warnings"]:
        module.warn(w)
    if module._diff:
        result["diff"] = written["diff"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
