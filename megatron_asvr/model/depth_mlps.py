"""The D per-depth MLPs of one depth-transformer layer (model/head.py), in two forms that compute the same.

- ``DepthMLPs``: D megatron ``MLP``s, run one after the other (2D GEMMs and, under TP, D all-reduces).
- ``BatchedDepthMLPs`` (``train.fast_paths.batched_head_mlp``): the same weights stacked,
  fc1 [D, F/tp, E] and fc2 [D, E, F/tp], two batched GEMMs and one all-reduce per layer.

Both are built from the same D MLPs (so the initialisation is one), and both save and load the same
tensors: the batched form's parameters appear in its state dict, its dist checkpoint (a megatron
``ShardedTensorFactory`` per stacked weight, optimizer states included) and the canonical form
(model/canonical.py ``stacked_names``) as the D per-depth tensors ``{d}.linear_fc{1,2}.weight``. A
checkpoint of either form loads into the other.
"""

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_asvr.kernels.main_grad import added_to_main_grad
from megatron_asvr.model.containers import ShardedModuleList
from megatron_asvr.runtime.fast_paths import WgradAccumulation

# The per-depth name of each stacked weight, and the dimension TP splits (of the stacked tensor)
STACKED = {"fc1_weight": ("linear_fc1.weight", 1), "fc2_weight": ("linear_fc2.weight", 2)}


class DepthMLPs(ShardedModuleList):
    """D megatron MLPs (bias-free), depth d's on the depth slot d."""

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [D, N, E] -> [D, N, E]
        return torch.stack([mlp(r[d])[0] for d, mlp in enumerate(self)])


class BatchedLinear(torch.autograd.Function):
    """y[d] = x[d] @ W[d]^T: x [D, N, in], W [D, out, in] -> [D, N, out]. With ``accumulate`` the weight
    gradient goes straight into ``W.main_grad`` (megatron's gradient-accumulation fusion protocol)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, accumulate: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.accumulate = accumulate
        return torch.bmm(x, weight.mT)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # [D, N, out]
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad_out, weight) if ctx.needs_input_grad[0] else None  # [D, N, in]
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        if ctx.accumulate:
            WgradAccumulation.wgrad_gemm_accum_fp32(x, grad_out, weight.main_grad)
            return grad_x, added_to_main_grad(weight), None
        return grad_x, torch.bmm(grad_out.mT, x), None  # [D, out, in]


def _per_depth_key(key: str, depth: int) -> str:
    """'<prefix>linear_fc1.weight' -> '<prefix><depth>.linear_fc1.weight'."""
    stem, layer, param = key.rsplit(".", 2)
    return f"{stem}.{depth}.{layer}.{param}"


class BatchedDepthMLPs(MegatronModule):
    """The D MLPs' weights stacked: two batched GEMMs (and under TP one all-reduce) per layer."""

    def __init__(self, mlps: List[MLP]):
        super().__init__(config=mlps[0].config)
        if any(mlp.config.add_bias_linear or mlp.config.gated_linear_unit for mlp in mlps):
            raise ValueError("the batched depth MLPs take bias-free, ungated MLPs (the released head's)")
        self.activation = mlps[0].activation_func
        for name, (per_depth, tp_dim) in STACKED.items():
            layer, _ = per_depth.split(".")
            weight = torch.stack([getattr(mlp, layer).weight.detach() for mlp in mlps])
            param = torch.nn.Parameter(weight)
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=tp_dim, stride=1)
            param.stacked_names = [f"{d}.{per_depth}" for d in range(len(mlps))]  # model/canonical.py
            self.register_parameter(name, param)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [D, N, E] -> [D, N, E]
        accumulate = self.config.gradient_accumulation_fusion and hasattr(self.fc1_weight, "main_grad")
        x = copy_to_tensor_model_parallel_region(r)  # backward: the all-reduce of the input's gradient
        hidden = self.activation(BatchedLinear.apply(x, self.fc1_weight, accumulate))  # [D, N, F/tp]
        partial = BatchedLinear.apply(hidden, self.fc2_weight, accumulate)  # [D, N, E], this rank's sum
        return reduce_from_tensor_model_parallel_region(partial)

    # -- the same tensors as DepthMLPs in every saved form --------------------------------------------

    def _extra_state_keys(self, prefix: str) -> List[str]:
        """megatron's linears save an (empty) extra state each: kept, so both forms save the same keys."""
        return [f"{prefix}{sub.rsplit('.', 1)[0]}._extra_state"
                for param in self.parameters(recurse=False) for sub in param.stacked_names]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for param in self.parameters(recurse=False):
            value = param if keep_vars else param.detach()
            for sub, piece in zip(param.stacked_names, value.unbind(0)):
                destination[prefix + sub] = piece
        destination.update(dict.fromkeys(self._extra_state_keys(prefix)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        known = set(self._extra_state_keys(prefix))
        for name, param in self.named_parameters(recurse=False):
            keys = [prefix + sub for sub in param.stacked_names]
            known.update(keys + [prefix + name])
            if prefix + name in state_dict:  # a dist checkpoint's factory merged the D tensors
                pieces = list(state_dict[prefix + name].unbind(0))
            elif all(k in state_dict for k in keys):
                pieces = [state_dict[k] for k in keys]
            else:
                missing_keys.extend(k for k in keys if k not in state_dict)
                continue
            if any(p.shape != param.shape[1:] for p in pieces):
                error_msgs.append(f"{prefix}{name}: per-depth shape {tuple(pieces[0].shape)} "
                                  f"!= {tuple(param.shape[1:])}")
                continue
            with torch.no_grad():
                param.copy_(torch.stack(pieces))
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[Dict] = None):
        """One factory per stacked weight, building the D per-depth ShardedTensors DepthMLPs saves (keys,
        TP axis and replicas as megatron's column / row parallel linears make them), and their extra states."""
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        state = {key: make_sharded_object_for_checkpoint(None, key, sharded_offsets)
                 for key in self._extra_state_keys(prefix)}
        for name, param in self.named_parameters(recurse=False):
            per_depth, tp_dim = STACKED[name]

            def build(key, data, replica_id, flattened_range, tp_axis=tp_dim - 1):  # axis of one [out, in]
                if flattened_range is not None:
                    raise ValueError(f"{key}: a flattened optimizer state; save with fully_reshardable")
                return {d: make_tp_sharded_tensor_for_checkpoint(
                            piece, _per_depth_key(key, d), tp_axis=tp_axis, replica_id=replica_id,
                            prepend_offsets=sharded_offsets)
                        for d, piece in enumerate(data.unbind(0))}

            def merge(loaded):
                return torch.stack([loaded[d] for d in range(len(loaded))])

            state[prefix + name] = ShardedTensorFactory(
                prefix + per_depth, param, build, merge, replica_id=(0, 0, dp_rank))
        return state
