"""Merge several domains into one contiguous item space; sequences never cross domains."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from unisrec_x.data.domain import Domain

log = logging.getLogger(__name__)


@dataclass
class MergedDomains:
    """Domain ``d``'s local item ``i`` is global item ``offsets[d] + i``; 0 stays padding."""

    domains: list[Domain]
    offsets: np.ndarray  # (D,)
    sequences: list[np.ndarray]  # global ids
    sequence_domain: np.ndarray  # (S,) domain index of each sequence

    @property
    def num_items(self) -> int:
        return int(self.offsets[-1] + self.domains[-1].num_items)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def item_domain(self) -> np.ndarray:
        """(num_items + 1,) domain index of each global item; -1 for padding."""
        out = np.full(self.num_items + 1, -1, dtype=np.int64)
        for d, (domain, offset) in enumerate(zip(self.domains, self.offsets)):
            out[offset + 1: offset + 1 + domain.num_items] = d
        return out


def merge_domains(domains: list[Domain]) -> MergedDomains:
    """Stack domains' item ids by offset; each item keeps its text and its domain."""
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique to keep their items apart, got {names}")
    shared = shared_tokens(domains)
    if shared:
        log.warning("%d item ids appear in more than one domain (e.g. %s); they stay separate items, one per domain",
                    len(shared), sorted(shared)[:3])
    sizes = np.array([d.num_items for d in domains], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    sequences = [seq + offset for domain, offset in zip(domains, offsets) for seq in domain.sequences]
    sequence_domain = np.repeat(np.arange(len(domains)), [len(d.sequences) for d in domains])
    return MergedDomains(list(domains), offsets, sequences, sequence_domain)


def shared_tokens(domains: list[Domain]) -> set[str]:
    """Item ids present in several domains (e.g. Amazon ASINs listed in two categories)."""
    seen: set[str] = set()
    shared: set[str] = set()
    for domain in domains:
        tokens = set(domain.item_tokens)
        shared |= seen & tokens
        seen |= tokens
    return shared
