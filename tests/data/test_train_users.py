"""Few-shot regimes: a listed share of users trains and validates; everyone is still tested."""

from __future__ import annotations

import pytest
import torch

from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.errors import DataError
from tests.conftest import write


@pytest.fixture(scope="module")
def full(real_root):
    return SeqRecDataModule("scientific/Scientific", data_root=str(real_root))


def test_only_listed_users_train_and_validate_and_everyone_is_tested(full, real_root, tmp_path):
    users = full.data.domains[0].users
    listed = users[::20]  # 5%
    path = write(tmp_path / "users.txt", "\n".join(listed) + "\n")
    few = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path))
    kept = {tuple(s.tolist()) for s, u in zip(full.data.sequences, users) if u in set(listed)}
    # the training targets are exactly those of the listed users' sequences
    expected = torch.cat([torch.as_tensor(s[1:len(s) - 2]) for s in map(list, kept) if len(s) > 3])
    assert sorted(few.examples("train").targets.tolist()) == sorted(expected.tolist())
    assert len(few.examples("train").targets) < len(full.examples("train").targets) / 10
    assert torch.equal(few.examples("test").targets, full.examples("test").targets)
    # validation: only the listed users' rows (a few-shot user has only their labels), in data order
    listed_set = set(listed)
    expected_valid = [int(s[-2]) for s, u in zip(full.data.sequences, users) if u in listed_set]
    assert few.examples("valid").targets.tolist() == expected_valid
    assert 0 < len(expected_valid) < len(full.examples("valid").targets) / 10
    everyone = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path), valid_users="all")
    assert torch.equal(everyone.examples("valid").targets, full.examples("valid").targets)


@pytest.mark.parametrize("text, message", [
    ("nobody-like-this\n", r"users.txt:1: user 'nobody-like-this' is not in the data"),
    ("{u}\n\n{u}\n", r"users.txt:3: user '.*' is listed twice"),
    ("\n  \n", r"users.txt: lists no users"),
])
def test_bad_user_lists_name_the_file_and_line(full, real_root, tmp_path, text, message):
    path = write(tmp_path / "users.txt", text.format(u=full.data.domains[0].users[0]))
    with pytest.raises(DataError, match=message):
        SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path))


def test_missing_user_list_is_named(real_root, tmp_path):
    with pytest.raises(DataError, match="train_users file not found"):
        SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(tmp_path / "none.txt"))


def test_blend_rows_are_a_fixed_part_of_the_sampled_validation_rows_kept_from_early_stopping(full, real_root, tmp_path):
    users = full.data.domains[0].users
    path = write(tmp_path / "users.txt", "\n".join(users[::20]) + "\n")

    def split(seed: int) -> tuple[list[int], list[int], list[int]]:
        data = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path), seed=seed,
                                blend_rows=0.5)
        return ([int(t) for b in data.val_dataloader() for t in b.target], [int(t) for b in data.blend_dataloader()
                                                                           for t in b.target],
                data.examples("valid").targets.tolist() + data.examples("blend").targets.tolist())

    early, blend, both = split(0)
    whole = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path))
    # together they are the sampled users' validation rows, each row in exactly one part, about half each
    assert sorted(both) == sorted(whole.examples("valid").targets.tolist())
    assert abs(len(early) - len(blend)) <= 1 and sorted(early + blend) == sorted(both)
    assert split(7)[:2] == (early, blend)  # the same draw for every training seed
    assert [int(t) for b in whole.blend_dataloader() for t in b.target] == \
        [int(t) for b in whole.val_dataloader() for t in b.target]  # without blend_rows: one set for both
    with pytest.raises(ValueError, match="blend_rows"):
        SeqRecDataModule("scientific/Scientific", data_root=str(real_root), blend_rows=1.0)


def test_blend_users_can_be_held_out_of_training_too(full, real_root, tmp_path):
    users = full.data.domains[0].users
    path = write(tmp_path / "users.txt", "\n".join(users[::20]) + "\n")
    apart = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path), blend_rows=0.5)
    unseen = SeqRecDataModule("scientific/Scientific", data_root=str(real_root), train_users=str(path), blend_rows=0.5,
                              blend_rows_train=False)
    # the same rows are kept apart; held out of training, their users give no training target any more
    assert unseen.examples("blend").targets.tolist() == apart.examples("blend").targets.tolist()
    assert unseen.examples("valid").targets.tolist() == apart.examples("valid").targets.tolist()
    held = unseen._held_for_blend(unseen.train_sequence_mask)
    trained = [s for s, k in zip(full.data.sequences, unseen.train_sequence_mask & ~held) if k]
    expected = torch.cat([torch.as_tensor(s[1:len(s) - 2]) for s in trained if len(s) > 3])
    assert sorted(unseen.examples("train").targets.tolist()) == sorted(expected.tolist())
    assert len(unseen.examples("train").targets) < 0.7 * len(apart.examples("train").targets)
    with pytest.raises(ValueError, match="set blend_rows"):
        SeqRecDataModule("scientific/Scientific", data_root=str(real_root), blend_rows_train=False)
