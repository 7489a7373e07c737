"""Tensor rules: how one canonical tensor is made of HF tensors and back.

A ``TensorRule`` names one canonical tensor (``model.canonical`` names), the HF
tensors it is built from, and the two pure functions between them (fused QKV,
gated-MLP [gate; up], vocabulary rows, ...). A whole model is a list of rules,
so both directions stream: import builds each canonical tensor when the model
asks for it (``LazyCanonical``), export splits each gathered tensor as soon as
it exists. Key checks work on names alone, before any tensor is read.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from megatron_asvr.model.qkv import fuse_qkv, split_qkv


@dataclass(frozen=True)
class TensorRule:
    ours: str  # canonical name
    hf: Tuple[str, ...]  # the HF tensors, in the order to_ours takes them
    to_ours: Callable[[List[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], List[torch.Tensor]]
    # A copy of tensors another rule writes (a tied LM head on the last pipeline stage): imported, not exported.
    import_only: bool = False


def _first(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _single(tensor: torch.Tensor) -> List[torch.Tensor]:
    return [tensor]


def same(ours: str, hf: str) -> TensorRule:
    """A tensor stored identically on both sides."""
    return TensorRule(ours, (hf,), _first, _single)


def reshaped(ours: str, hf: str, ours_shape: Tuple[int, ...], hf_shape: Tuple[int, ...]) -> TensorRule:
    """The same values under another shape (e.g. CLIP's class token [h] vs [1, 1, h])."""
    return TensorRule(ours, (hf,), lambda t: t[0].reshape(ours_shape), lambda t: [t.reshape(hf_shape)])


def fused_qkv(ours: str, q: str, k: str, v: str, heads: int, groups: int) -> TensorRule:
    """megatron's per-group [q_g; k_g; v_g] rows from separate q / k / v (weights or biases)."""
    return TensorRule(
        ours, (q, k, v), lambda t: fuse_qkv(*t, heads, groups), lambda t: list(split_qkv(t, heads, groups))
    )


def stacked_rows(ours: str, parts: Tuple[str, ...]) -> TensorRule:
    """Equal-sized HF tensors stacked by rows (the gated MLP's [gate; up])."""
    return TensorRule(ours, parts, lambda t: torch.cat(t, dim=0), lambda t: list(t.chunk(len(parts), dim=0)))


def by_ours(rules: Iterable[TensorRule]) -> Dict[str, TensorRule]:
    table = {}
    for rule in rules:
        if rule.ours in table:
            raise KeyError(f"two rules make {rule.ours}")
        table[rule.ours] = rule
    return table


def hf_names(rules: Iterable[TensorRule]) -> List[str]:
    return [name for rule in rules for name in rule.hf]


def check_hf_keys(
    rules: Sequence[TensorRule], available: Iterable[str], where: str,
    ignored: Callable[[str], bool] = lambda key: False,
) -> List[str]:
    """Every HF tensor a rule needs exists, and every available one is used or ``ignored``.

    Returns the ignored keys; raises KeyError naming the first missing or unexpected key.
    """
    available = set(available)
    needed = hf_names(rules)
    missing = [key for key in needed if key not in available]
    if missing:
        raise KeyError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    unused = sorted(available - set(needed))
    unexpected = [key for key in unused if not ignored(key)]
    if unexpected:
        raise KeyError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    return unused


class LazyCanonical(Mapping):
    """Canonical tensors built from HF tensors on first access (``model.canonical.load_full_state``
    reads one at a time, so a rank only ever reads its own stage's tensors).

    ``read(hf_name)`` returns one HF tensor. Names the model asked for that no
    rule makes are collected in ``unmatched`` (``load_full_state`` asks about
    every parameter it holds).
    """

    def __init__(self, rules: Sequence[TensorRule], read: Callable[[str], torch.Tensor],
                 on_read: Optional[Callable[[str], None]] = None):
        self._rules = by_ours(rules)
        self._read = read
        self._on_read = on_read
        self.unmatched: Set[str] = set()

    def __contains__(self, name) -> bool:
        if name in self._rules:
            return True
        self.unmatched.add(name)
        return False

    def __getitem__(self, name: str) -> torch.Tensor:
        rule = self._rules[name]
        tensor = rule.to_ours([self._read(key) for key in rule.hf])
        if self._on_read is not None:
            self._on_read(name)
        return tensor

    def __iter__(self):
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)
