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


def test_office_fields_from_the_optional_apao_text(real_root, tmp_path):
    """Office.item holds APAO's fields one by one under the split's item ids: LRD item 1 (ASIN B0000AG93P)
    gets the APAO item that apao_item_map.tsv maps to it, cleaned (HTML entities unescaped)."""
    import json

    prefix = prepare_office(real_root, tmp_path)
    domain = load_domain(prefix)
    fields = domain.field_texts(["title", "description", "brand", "categories", "text"])
    rows = [line.split("\t") for line in (real_root / "office" / "apao" / "apao_item_map.tsv").read_text().splitlines()[1:]]
    apao = json.loads((real_root / "office" / "apao" / "Office.item.json").read_text())
    index = next(a for a, asin, lrd in rows if lrd == "1" and asin == "B0000AG93P")
    calculator = domain.item_tokens.index("1")
    assert fields["title"][calculator] == apao[index]["title"].strip() and fields["title"][calculator]
    assert fields["text"][calculator] == domain.item_texts[calculator]  # the joined text stays Office.text's
    assert sum(not t for t in fields["title"]) == 3 and sum(not t for t in fields["brand"]) == 485  # PROVENANCE.md
    assert not any("&amp;" in t for t in fields["title"])


def test_office_fields_refuse_a_broken_map(real_root, tmp_path):
    import shutil

    import pytest

    from unisrec_x.data.prepare import office_fields
    from unisrec_x.errors import DataError

    apao = tmp_path / "apao"
    shutil.copytree(real_root / "office" / "apao", apao)
    lines = (apao / "apao_item_map.tsv").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t99999"
    (apao / "apao_item_map.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"apao_item_map.tsv:6: item '99999' is not in Office.item2index"):
        office_fields(apao, {str(i) for i in range(1, 2421)})
    (apao / "Office.item.json").write_text("{not json")
    with pytest.raises(DataError, match="Office.item.json"):
        office_fields(apao, set())
