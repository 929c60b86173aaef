"""Leave-one-out examples over flat sequence storage, collated into padded batches.

Sequences are stored once, concatenated; an example is (sequence, target position), so
every training prefix costs two integers instead of a padded row (RecBole materialises
``max_seq_len`` ints per prefix).
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

Split = Literal["train", "valid", "test"]


class SeqBatch(NamedTuple):
    """A batch of histories (right-padded with 0) and their next items."""

    item_seq: torch.Tensor  # (B, L) item ids, 0 = padding after the last item
    seq_len: torch.Tensor  # (B,)
    target: torch.Tensor  # (B,)
    domain: torch.Tensor  # (B,) domain index of each example's sequence


class SequenceExamples(torch.utils.data.Dataset):
    """Examples of one split; indexing with a list of example indices gives a ``SeqBatch``."""

    def __init__(self, sequences: Sequence[np.ndarray], split: Split, max_seq_len: int = 50,
                 domains: Sequence[int] | None = None) -> None:
        """
        Args:
            sequences: full item-id sequences, oldest first.
            split: ``train`` = every prefix whose target is before the last two items (as
                RecBole/UniSRec), ``valid`` = target second to last, ``test`` = last.
            max_seq_len: histories keep their last ``max_seq_len`` items.
            domains: domain index per sequence (all 0 when omitted).
        """
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.items = torch.from_numpy(np.concatenate(sequences) if len(sequences) else np.zeros(0, np.int64))
        starts = np.zeros(len(sequences), dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        usable = np.flatnonzero(lengths >= 3)
        if split == "train":
            counts = lengths[usable] - 3
            seq_idx = np.repeat(usable, counts)
            # position j-th of each sequence's train targets: 1, 2, ..., n - 3
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            target_pos = within + 1
        else:
            seq_idx = usable
            target_pos = lengths[usable] - (2 if split == "valid" else 1)
        self.max_seq_len = max_seq_len
        self.seq_idx = torch.from_numpy(seq_idx)
        self.target_index = torch.from_numpy(starts[seq_idx] + target_pos)
        self.hist_len = torch.from_numpy(np.minimum(target_pos, max_seq_len))
        self.truncated = int((target_pos > max_seq_len).sum())  # histories cut to their last max_seq_len items
        domain_arr = np.zeros(len(sequences), np.int64) if domains is None else np.asarray(domains, np.int64)
        self.domain = torch.from_numpy(domain_arr[seq_idx])

    def __len__(self) -> int:
        return len(self.target_index)

    @property
    def targets(self) -> torch.Tensor:
        """Target item of every example (B,): item popularity for sampled softmax."""
        return self.items[self.target_index]

    def __getitem__(self, index: Sequence[int] | torch.Tensor) -> SeqBatch:
        index = torch.as_tensor(index, dtype=torch.long)
        seq_len = self.hist_len[index]
        end = self.target_index[index]
        item_seq, _, _ = gather_padded(self.items, end - seq_len, seq_len)
        return SeqBatch(item_seq, seq_len, self.items[end], self.domain[index])


def gather_padded(items: torch.Tensor, start: torch.Tensor, length: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``items[start[b] : start[b] + length[b]]`` of the flat store, right-padded with 0 to the longest.

    Returns (item_seq (B, L), their flat positions (B, L), valid (B, L)); one gather for the batch.
    """
    offsets = torch.arange(int(length.max()) if len(length) else 0)
    positions = start.unsqueeze(1) + offsets  # (B, L) positions in the flat store
    valid = offsets < length.unsqueeze(1)
    return torch.where(valid, items[positions.clamp(max=len(items) - 1)], 0), positions, valid


class LengthBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of similar history length, so a batch pads to ~its own length.

    Examples are shuffled, cut into pools of ``pool_batches`` batches, sorted by length inside a
    pool and cut into batches; batch order is shuffled again. With ``pool_batches=1`` this is plain
    random batching. Pools are kept small (a few batches): a pool as large as the epoch would sort
    the whole epoch, so every epoch would repeat the same length slices (only their order random).

    ``weights`` (training targets per example; position-wise windows carry several) make batches
    hold about ``batch_size`` targets rather than examples. Every epoch must have the same number
    of batches (Lightning and mid-epoch resume rely on it), which cutting after every
    ``batch_size`` targets would not give: cuts fall at equal shares of the targets instead,
    first of the shuffled epoch (pools), then of each sorted pool (batches).
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, shuffle: bool = True, pool_batches: int = 4,
                 seed: int = 0, rank: int = 0, world_size: int = 1, weights: torch.Tensor | None = None) -> None:
        """
        Args:
            lengths: (N,) padded width each example needs.
            batch_size: examples per batch; with ``weights``, targets (at least 4 times the heaviest
                example's, so that no batch comes out empty).
            shuffle: ``False`` (evaluation): sorted by length, plain ``batch_size`` cuts, weights unused.
            pool_batches: batches per length-sorted pool.
            seed: with the epoch, fixes each epoch's batches (so a resumed epoch repeats them).
            rank: this process's DDP rank.
            world_size: DDP processes; each takes an equal share of the batches (``shard``).
            weights: (N,) targets per example (default 1 each).
        """
        self.lengths = lengths
        self.weights = None if weights is None else weights.to(torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pool_batches = max(1, pool_batches)
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already trained before a resume
        self.rank, self.world_size = rank, world_size
        if self.weights is not None:
            # Cuts at equal target shares leave no batch empty while a share holds >= 2 of the heaviest
            # examples; a budget of 4 of them gives that for every batch count (share > budget / 2).
            total, heaviest = int(self.weights.sum()), int(self.weights.max()) if len(lengths) else 1
            self.num_batches = -(-total // max(batch_size, 4 * heaviest))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches_done`` batches (same order as before)."""
        self.epoch, self.skip = epoch, batches_done

    def _batches(self) -> list[torch.Tensor]:
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)
            return list(order.split(self.batch_size))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen)
        batches = self._cut(order) if self.weights is None else self._cut_weighted(order)
        perm = torch.randperm(len(batches), generator=gen)
        return [batches[i] for i in perm]

    def _cut(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Pools of ``pool_batches * batch_size`` shuffled examples, each sorted and cut every ``batch_size``."""
        batches: list[torch.Tensor] = []
        for pool in order.split(self.pool_batches * self.batch_size):
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(pool.split(self.batch_size))
        return batches

    def _cut_weighted(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``num_batches`` batches of about equal weight: equal-share pools, each sorted and cut into equal shares."""
        count, pool_size = self.num_batches, self.pool_batches
        if count == 0:
            return []
        slot = _equal_shares(self.weights[order], torch.tensor([count]))  # batch slot in the shuffled epoch
        pool = slot // pool_size
        # sort by length inside each pool (stable: ties keep the shuffled order)
        key = pool * (int(self.lengths.max()) + 1) + self.lengths[order]
        sort = torch.argsort(key, stable=True)
        order, pool = order[sort], pool[sort]
        slots_in_pool = torch.clamp(count - torch.arange(-(-count // pool_size)) * pool_size, max=pool_size)
        batch = pool * pool_size + _equal_shares(self.weights[order], slots_in_pool, pool)
        return list(order.split(torch.bincount(batch, minlength=count).tolist()))

    def __iter__(self) -> Iterator[list[int]]:
        batches = shard(self._batches(), self.rank, self.world_size)
        start, self.skip = self.skip, 0
        for batch in batches[start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.shuffle:
            count = -(-n // self.batch_size)
        elif self.weights is not None:
            count = self.num_batches
        else:
            pool = self.pool_batches * self.batch_size
            count = sum(-(-min(pool, n - s) // self.batch_size) for s in range(0, n, pool))
        return -(-count // self.world_size)


def shard(batches: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of an epoch's batches under DDP: contiguous, of equal count on every rank
    (collectives stay in step), with batches from the epoch's start repeated to fill the last shares
    (as ``DistributedSampler(drop_last=False)``), so every batch is trained each epoch; cutting the
    epoch down to a multiple of ``world_size`` would drop up to ``world_size - 1`` batches every epoch.
    """
    if world_size <= 1 or not batches:
        return batches
    per_rank = -(-len(batches) // world_size)
    padded = [batches[i % len(batches)] for i in range(per_rank * world_size)]
    return padded[rank * per_rank:(rank + 1) * per_rank]


def _equal_shares(weights: torch.Tensor, parts: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """Cut weighted examples into ``parts[g]`` runs of about equal weight per group g (groups consecutive).

    Example i goes to part floor(w_before_i * parts / W) of its group (w_before_i: the group's
    weight before it, W: the group's total), so every part is non-empty while no example outweighs
    a part.
    """
    group = torch.zeros_like(weights) if group is None else group
    group_total = torch.zeros(len(parts), dtype=torch.long).index_add_(0, group, weights)  # (G,), none empty
    before = torch.cumsum(weights, 0) - weights
    before = before - (torch.cumsum(group_total, 0) - group_total)[group]
    return before * parts[group] // group_total[group]


class ResumableLoader(torch.utils.data.DataLoader):
    """A loader whose place inside an epoch is saved in checkpoints (Lightning's ``state_dict`` protocol).

    With it, a run killed mid-epoch resumes at the next unseen batch instead of replaying the
    epoch from its start.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: LengthBucketBatchSampler,
                 batches_done: Callable[[], int], generator: torch.Generator | None = None) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, generator=generator)  # the sampler yields whole batches
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_from(state["epoch"], state["batches_done"])
