"""Knowledge features: each ``.item`` field encoded and cached on its own, on a real slice of Games."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import assert_close_f32
from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.data.datamodule import SeqRecDataModule, source_item_file
from unisrec_x.errors import DataError
from unisrec_x.items.feature_cache import FeatureCache

FIELDS = ["title", "categories", "brand"]


def write_games_slice(real_root: Path, folder: Path, users: int = 25) -> Path:
    """The first ``users`` users of the real Games release (Amazon 2018 Video Games, with title, categories
    and brand per item) and their items, as ``Games.inter`` + ``Games.item`` under ``folder``."""
    inter = read_atomic(real_root / "games" / "Games.inter")
    kept: list[str] = []
    rows = []
    for user, item, stamp in zip(*(inter.column(f) for f in ("user_id", "item_id", "timestamp"))):
        if user not in kept:
            if len(kept) == users:
                break
            kept.append(user)
        rows.append((user, item, stamp))
    items = {item for _, item, _ in rows}
    table = read_atomic(real_root / "games" / "Games.item")
    item_rows = [cells for cells in zip(*(table.column(f) for f in table.fields)) if cells[0] in items]
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "Games.inter", [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")], rows)
    write_atomic(folder / "Games.item", list(zip(table.fields, table.types)), item_rows)
    return folder / "Games"


def edit_field(prefix: Path, item: str, field: str, value: str) -> None:
    """Set one item's field in ``<prefix>.item``."""
    table = read_atomic(f"{prefix}.item")
    column = table.column(field)
    column[table.column("item_id").index(item)] = value
    write_atomic(f"{prefix}.item", list(zip(table.fields, table.types)),
                 zip(*(table.column(f) for f in table.fields)))


@pytest.fixture
def games(real_root, tmp_path) -> Path:
    return write_games_slice(real_root, tmp_path / "games")


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The cache names encoded (cache misses), in order."""
    names: list[str] = []
    build = FeatureCache._build

    def counted(self, texts, key, npy, meta_path, make_encoder):
        names.append(npy.stem.rsplit("-", 1)[0])
        return build(self, texts, key, npy, meta_path, make_encoder)

    monkeypatch.setattr(FeatureCache, "_build", counted)
    return names


def _data(prefix: Path, encoder: str) -> SeqRecDataModule:
    return SeqRecDataModule(dataset=str(prefix), text_encoder=encoder, batch_size=64)


def test_each_field_is_its_own_encoding_of_its_own_text(games, tiny_encoder, builds):
    from unisrec_x.items.encoder import TextEncoder

    data = _data(games, tiny_encoder)
    features = data.knowledge_features(FIELDS)
    assert features.shape == (data.num_items + 1, 3, 32) and features.dtype == torch.float32
    assert (features[0] == 0).all()  # padding
    assert sorted(builds) == ["games-brand", "games-categories", "games-title"]
    domain = data.data.domains[0]
    texts = domain.field_texts(FIELDS)
    encoder = TextEncoder(tiny_encoder)
    for item in (1, data.num_items):
        fresh = encoder.encode([texts[f][item - 1] for f in FIELDS])
        assert_close_f32(features[item], fresh, rtol=1e-4)
    assert data.knowledge_features(FIELDS) is features  # one build per data module


def test_a_changed_field_re_encodes_only_that_field(games, tiny_encoder, builds):
    before = _data(games, tiny_encoder).knowledge_features(FIELDS)
    builds.clear()
    assert torch.equal(_data(games, tiny_encoder).knowledge_features(FIELDS), before) and builds == []  # all cached
    data = _data(games, tiny_encoder)
    item = data.data.domains[0].item_tokens[4]
    edit_field(games, item, "brand", "A Brand Nobody Had")
    after = _data(games, tiny_encoder).knowledge_features(FIELDS)
    assert builds == ["games-brand"]
    assert torch.equal(after[:, :2], before[:, :2])  # title, categories: the cached vectors
    changed = (after[:, 2] != before[:, 2]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [5]  # only that item's brand moved


def test_an_empty_field_is_a_zero_vector(games, tiny_encoder):
    """Games item B0016C3260 has neither title nor brand in the release, only its categories."""
    data = _data(games, tiny_encoder)
    item = data.data.domains[0].item_tokens.index("B0016C3260") + 1
    features = data.knowledge_features(FIELDS)
    assert (features[item, 0] == 0).all() and (features[item, 2] == 0).all() and (features[item, 1] != 0).any()
    texts = data.data.domains[0].field_texts(FIELDS)
    empty = torch.tensor([[not texts[f][row] for f in FIELDS] for row in range(data.num_items)])
    assert torch.equal((features[1:] == 0).all(dim=-1), empty)  # zero exactly where a field is empty


def test_a_field_the_item_file_lacks_is_a_data_error_naming_file_and_field(games, tiny_encoder):
    with pytest.raises(DataError, match="missing column 'colour'") as err:
        _data(games, tiny_encoder).knowledge_features(["title", "colour"])
    assert err.value.path == str(games.parent / "Games.item")


def test_a_dataset_without_an_item_file_says_so(real_root, tiny_encoder):
    data = SeqRecDataModule(dataset="scientific/Scientific", data_root=str(real_root), text_encoder=tiny_encoder,
                            max_users=20)
    with pytest.raises(DataError, match="knowledge fields title are read from an .item file, and Scientific.item "
                                        "does not exist") as err:
        data.knowledge_features(["title"])
    assert err.value.path == str(real_root / "scientific" / "Scientific.item")


def test_the_text_field_is_the_items_own_text_where_there_is_no_item_file(real_root, tiny_encoder):
    """A UniSRec ``.text`` release has one text per item: the knowledge field ``text`` is that text, so
    SASRec-ID + knowledge runs on Scientific, and it encodes to the text path's own vectors."""
    data = SeqRecDataModule(dataset="scientific/Scientific", data_root=str(real_root), text_encoder=tiny_encoder,
                            max_users=20)
    features = data.knowledge_features(["text"])
    assert features.shape == (data.num_items + 1, 1, 32)
    assert_close_f32(features[1:, 0], data.item_features[1:])
    assert (features[0] == 0).all()


def test_the_text_field_sits_beside_item_file_fields(games, tiny_encoder):
    data = SeqRecDataModule(dataset=str(games), text_encoder=tiny_encoder, batch_size=64,
                            text_fields=["title", "brand"], missing_text="empty")
    features = data.knowledge_features(["title", "text"])
    texted = torch.tensor([bool(t) for t in data.data.domains[0].item_texts])
    assert 0 < (~texted).sum() < len(texted)  # the slice has an item with neither title nor brand
    assert_close_f32(features[1:, 1][texted], data.item_features[1:][texted])  # the text path's title + brand
    assert (features[1:, 1][~texted] == 0).all()  # an empty field is a zero vector, as for any field
    assert_close_f32(features[:, 0], data.knowledge_features(["title"])[:, 0])
    assert not torch.allclose(features[1:, 0], features[1:, 1])  # a title alone is not the joined text


def test_a_pretraining_source_reads_its_fields_from_the_raw_item_file(real_root):
    assert source_item_file("games", str(real_root)) == real_root / "games" / "Games.item"
    assert source_item_file("toys", str(real_root)) == real_root / "toys" / "Toys.item"
    assert source_item_file("games/Games", str(real_root)) is None  # a path prefix: <prefix>.item


def test_knowledge_vectors_are_no_text_matrix(games, tiny_encoder):
    """The item text (``item_features``: the title by default) and the fields are separate caches: the same
    title gives the same vector, and an empty one is encoded as text but left out as knowledge."""
    data = SeqRecDataModule(dataset=str(games), text_encoder=tiny_encoder, missing_text="empty")
    titles = data.knowledge_features(["title"])[:, 0]
    has_title = (titles != 0).any(dim=1)
    assert int((~has_title[1:]).sum()) == 1  # B0016C3260
    assert_close_f32(data.item_features[has_title], titles[has_title], rtol=1e-4)
    assert (data.item_features[1:][~has_title[1:]] != 0).any()
