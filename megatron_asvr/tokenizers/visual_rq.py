"""Residual quantization over per-depth codebooks, computed as DualToken's ``RQBottleneck``.

For a feature x [C] and codebooks C_0 .. C_{D-1} (one per depth, not shared)::

    r = x
    for d in 0..D-1:  c_d = argmin_j ||r - C_d[j]||^2;  r -= C_d[c_d]

Distances use the released expansion ``||r||^2 + ||c||^2 - 2 r.c`` (one
``torch.addmm``) in the precision of the mode: ``fp32``, or ``bf16`` as the
released code runs it (bf16 flips a few argmins against fp32). A codebook here
holds its V_d real codes only: the checkpoint's extra padding row is dropped on
loading, so it can never be selected.
"""

import math
from typing import List, Sequence

import torch

from megatron_asvr.runtime.device import dtype_of

PRECISIONS = ("fp32", "bf16")  # the released codes are bf16's
CHUNK_ROWS = 4096  # feature rows per distance matrix: [4096, V_d] at most


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return dtype_of(precision)


@torch.no_grad()
def nearest_codes(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_j ||r - codebook[j]||^2 per row, as the released ``VQEmbedding.compute_distances``.

    residual [n, C] and codebook [V, C] in the same dtype; returns int64 [n].
    """
    codebook_t = codebook.t()  # [C, V]
    codebook_norms = codebook_t.pow(2.0).sum(dim=0, keepdim=True)  # [1, V]
    codes = torch.empty(residual.shape[0], dtype=torch.long, device=residual.device)
    for start in range(0, residual.shape[0], CHUNK_ROWS):
        rows = residual[start : start + CHUNK_ROWS]  # [m, C]
        distances = torch.addmm(rows.pow(2.0).sum(dim=1, keepdim=True) + codebook_norms, rows, codebook_t, alpha=-2.0)
        codes[start : start + CHUNK_ROWS] = distances.argmin(dim=-1)  # [m]
    return codes


class ResidualQuantizer(torch.nn.Module):
    """Frozen residual quantizer: features [..., C] -> codes [..., D]."""

    def __init__(self, codebooks: Sequence[torch.Tensor]):
        super().__init__()
        if not codebooks:
            raise ValueError("a residual quantizer needs at least one codebook")
        widths = sorted({book.shape[1] for book in codebooks})
        if len(widths) != 1 or any(book.ndim != 2 for book in codebooks):
            shapes = [tuple(b.shape) for b in codebooks]
            raise ValueError(f"codebooks must be [V_d, C] with one width C, got shapes {shapes}")
        self.depth = len(codebooks)
        self.width = widths[0]
        for d, book in enumerate(codebooks):
            self.register_buffer(f"codebook_{d}", book.detach().to(torch.float32).clone())  # [V_d, C]

    @property
    def sizes(self) -> List[int]:
        """V_d per depth."""
        return [book.shape[0] for book in self.codebook_vectors()]

    def codebook_vectors(self) -> List[torch.Tensor]:
        """The D codebooks, [V_d, C] fp32 each, without padding rows (the visual head's teacher forcing)."""
        return [getattr(self, f"codebook_{d}") for d in range(self.depth)]

    @torch.no_grad()
    def codes(self, features: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """features [..., C] -> int64 codes [..., D], greedy residual nearest neighbours."""
        dtype = check_precision(precision)
        if features.shape[-1] != self.width:
            raise ValueError(f"features have width {features.shape[-1]}, the codebooks {self.width}")
        residual = features.reshape(-1, self.width).to(dtype).clone()  # [n, C]
        codes = []
        for book in self.codebook_vectors():
            book = book.to(device=residual.device, dtype=dtype)  # [V_d, C]
            chosen = nearest_codes(residual, book)  # [n]
            residual.sub_(book[chosen])
            codes.append(chosen)
        return torch.stack(codes, dim=-1).reshape(*features.shape[:-1], self.depth)  # [..., D]

    @torch.no_grad()
    def squared_errors(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """[D + 1] float64: sum over rows of ||x - x_hat_{<=d}||^2 for each depth d, then sum ||x||^2."""
        x = features.reshape(-1, self.width).to(torch.float32)  # [n, C]
        codes = codes.reshape(-1, self.depth)  # [n, D]
        residual, errors = x.clone(), []
        for d, book in enumerate(self.codebook_vectors()):
            residual.sub_(book.to(x.device)[codes[:, d]])
            errors.append(residual.double().pow(2).sum())
        errors.append(x.double().pow(2).sum())
        return torch.stack(errors).cpu()


def relative_errors(squared_errors: torch.Tensor) -> List[float]:
    """Relative reconstruction error per depth, sum ||x - x_hat_{<=d}||^2 / sum ||x||^2, from
    ``ResidualQuantizer.squared_errors`` (summed over any number of batches)."""
    return [float(e / squared_errors[-1]) for e in squared_errors[:-1]]


def code_counts(codes: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """How often each code is used, per depth: codes [..., D] -> D int64 tensors [V_d]."""
    flat = codes.reshape(-1, len(sizes))
    return [torch.bincount(flat[:, d].cpu(), minlength=size) for d, size in enumerate(sizes)]


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code-usage distribution: V for uniform use, 1 for a single code."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
