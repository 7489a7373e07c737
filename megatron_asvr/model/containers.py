"""Module containers whose children keep their tensor-parallel sharding in dist checkpoints.

megatron's default ``sharded_state_dict`` treats a plain ``nn.ModuleList`` /
``nn.ModuleDict`` child as replicated: the TP shards of the linears inside
would be saved as if each rank held the whole tensor (wrong global shapes; one
rank's shard silently wins). These containers recurse into their children
instead, the way ``TransformerBlock`` does for its layers.
"""

import torch
from megatron.core.transformer.utils import sharded_state_dict_default


def _children_sharded_state_dict(container, prefix, sharded_offsets, metadata):
    state = {}
    for name, child in container.named_children():
        state.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata))
    return state


class ShardedModuleList(torch.nn.ModuleList):
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return _children_sharded_state_dict(self, prefix, sharded_offsets, metadata)


class ShardedModuleDict(torch.nn.ModuleDict):
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return _children_sharded_state_dict(self, prefix, sharded_offsets, metadata)
