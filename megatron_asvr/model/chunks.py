"""This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""

from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

# (pre_process, post_process, vp_stage) -> this chunk's module
ChunkBuilder = Callable[[bool, bool, Optional[int]], MegatronModule]


def build_model_chunks(make_chunk: ChunkBuilder, device: torch.device) -> List[MegatronModule]:
    """One chunk per virtual pipeline stage (one without interleaving), on ``device``."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vp) if vp else [None]:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(make_chunk(pre, post, vp_stage).to(device))
    return chunks
