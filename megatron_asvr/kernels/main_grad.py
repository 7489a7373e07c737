"""megatron's gradient-accumulation fusion protocol, for kernels that add weight gradients to ``main_grad``."""

from typing import Optional

import torch


def added_to_main_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient a layer returns for ``param`` once its gradient is in ``param.main_grad``, as
    megatron's linear layers do: under megatron's DDP a dummy, with ``grad_added_to_main_grad`` set
    so that DDP's hook runs for the parameter but does not add the dummy; elsewhere None."""
    if not hasattr(param, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(param, "zero_out_wgrad", False) else torch.empty
    param.grad_added_to_main_grad = True
    return make(param.shape, dtype=param.dtype, device=param.device)
