"""Source preparation on the real files: counts match PROVENANCE.md, texts are what a user reads."""

from __future__ import annotations

from unisrec_x.data.domain import load_domain
from unisrec_x.data.prepare import prepare_amazon, prepare_lastfm, prepare_ml100k, prepare_office


def test_office(real_root, tmp_path):
    domain = load_domain(prepare_office(real_root, tmp_path))
    assert (len(domain.users), domain.num_items, sum(map(len, domain.sequences))) == (4905, 2420, 53258)
    calculator = domain.item_tokens.index("1")  # LRD item 1 = ASIN B0000AG93P in Office.item2index
    assert domain.item_texts[calculator]


def test_ml100k_from_the_recbole_package(tmp_path):
    domain = load_domain(prepare_ml100k(tmp_path))
    assert (len(domain.users), domain.num_items, sum(map(len, domain.sequences))) == (943, 1682, 100000)
    assert domain.item_texts[domain.item_tokens.index("1")] == "Toy Story. Animation Children's Comedy. 1995"


def test_lastfm_deduplicated_to_first_tagging(real_root, tmp_path, caplog):
    prefix = prepare_lastfm(real_root, tmp_path)
    assert "dropped 2 rows dated before 1970" in caplog.text
    rows = (prefix.parent / "lastfm.inter").read_text().splitlines()[1:]
    assert len(rows) == 15674 - 1  # PROVENANCE.md counts 15,674 pairs; one exists only in a 1956/57 row
    domain = load_domain(prefix)
    assert len(domain.users) == 1362 - 256  # users with >= 3 distinct artists
    assert "Diary of Dreams" in domain.item_texts


def test_amazon_sources_keep_their_order_and_join_title_categories_brand(real_root, tmp_path):
    for source, interactions, items in (("games", 342_329, 17_332), ("toys", 167_597, 11_924)):
        prefix = prepare_amazon(source, real_root, tmp_path)
        assert len((prefix.parent / f"{prefix.name}.inter").read_text().splitlines()) - 1 == interactions
        domain = load_domain(prefix)
        assert domain.num_items <= items and all(domain.item_texts)
    games = load_domain(tmp_path / "games" / "Games")
    assert games.item_texts[games.item_tokens.index("B00004DSDE")] == \
        "X: Beyond the Frontier - PC. Video Games; PC; Games. Southpeak Interactive"
    user = games.users.index("A1JGAP0185YJI6")  # timestamps are positions: the file's order is kept
    assert [games.item_tokens[i - 1] for i in games.sequences[user][:2]] == ["B00004DSDE", "0700026657"]
