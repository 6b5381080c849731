"""ZeRO-3's gradient norm with torch's foreach kernels (--zero_grad_norm foreach).

DeepSpeed 0.19.8's ZeRO-3 optimizer takes the norm for gradient clipping one tensor at a time, each
gradient first copied whole to fp64 (get_grad_norm_direct): per parameter a launch, an fp64 copy
(8 bytes written and read again per element) and a reduction. torch._foreach_norm with dtype fp64
accumulates in fp64 as it reads each gradient, with no copy. The same arithmetic, so the same norm;
what is summed across ranks, and the -1 that marks an inf/nan norm, stay as DeepSpeed has them.
Layouts this does not cover (tensor or expert parallel, another norm type, gradients off the device)
keep DeepSpeed's code.
"""

import types


def foreach_norm_applies(optimizer, gradients, params, norm_type):
    """Whether the foreach path computes exactly what DeepSpeed's would sum (else DeepSpeed's runs)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    return (float(norm_type) == 2.0 and len(gradients) > 0 and getattr(optimizer, "model_parallel_group", 0) is None
            and optimizer._autoep_expert_parallel_group(params) is None
            and all(isinstance(g, torch.Tensor) and g.device == device for g in gradients))


def foreach_grad_norm(gradients):
    """The squared 2-norm of all gradients, before the sum across ranks: fp64 per tensor, as DeepSpeed's."""
    import torch

    return torch.stack(torch._foreach_norm(gradients, 2, dtype=torch.float64)).pow(2).sum()


def use_foreach_grad_norm(optimizer):
    """Installs the foreach norm on one ZeRO-3 optimizer (an instance attribute: the class is left as
    it is). False where the optimizer is not DeepSpeed's ZeRO-3 one of the version this knows."""
    import torch

    original = getattr(optimizer, "get_grad_norm_direct", None)
    needed = ("_get_param_partition_group", "_assert_same_partition_group", "_autoep_expert_parallel_group")
    if getattr(original, "foreach", False):
        return True  # installed already
    if original is None or not all(hasattr(optimizer, n) for n in needed):
        return False

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if not foreach_norm_applies(self, gradients, params, norm_type):
            return original(gradients, params, norm_type)
        import deepspeed.comm as dist

        self._assert_same_partition_group(params)
        total = foreach_grad_norm(list(gradients))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._get_param_partition_group(params[0]))
        total = total.sqrt()  # (DeepSpeed: total ** (1 / norm_type))
        err = torch.tensor(-1.0, device=total.device, dtype=torch.float)
        return torch.where(total.isinf().logical_or(total.isnan()), err, total)

    get_grad_norm_direct.foreach = True
    optimizer.get_grad_norm_direct = types.MethodType(get_grad_norm_direct, optimizer)
    return True
