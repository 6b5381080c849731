"""Supervised fine-tuning of Hugging Face causal LMs with Transformers Trainer + DeepSpeed.

Run it as a module: `deepspeed --num_gpus N --module train --model_name_or_path DIR ...`,
`torchrun --nproc_per_node N -m train ...` or `python -m train ...`. See docs/training.md.
"""

__version__ = "0.1.0"
