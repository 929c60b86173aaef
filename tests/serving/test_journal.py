"""Items added through the service survive a crash (the journal), and concurrent writers of one
model directory never lose an item (the model lock). Issue 27 #2, issue 31 #3.

The model is tiny and untrained (5 items, the 32-wide random BERT of ``tiny_encoder``), so the real
``unisrec-x serve`` and ``add-items`` processes start in seconds and encode for real.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.serving.conftest import wait_until_healthy
from unisrec_x.cli import main
from unisrec_x.data.atomic import write_atomic
from unisrec_x.errors import DataError
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.journal import (JOURNAL_NAME, JournalUnavailable, default_journal, encode_record,
                                       model_lock)
from unisrec_x.serving.model_dir import MODEL_DIR
from unisrec_x.serving.recommender import Recommender, TextSettings

TOKENS, TEXTS = list("abcde"), ["red filament", "blue filament", "a soldering iron", "pliers", "a multimeter"]
DEADLINE = 240  # seconds any one server or add-items process may take before the test gives up on it


@pytest.fixture
def model(tmp_path, tiny_encoder) -> Path:
    """An inductive model directory whose text encoder is the tiny local BERT (plm_dim 32), its item
    vectors that encoder's own (a model directory checks its encoder against them)."""
    from unisrec_x.items.encoder import TextEncoder

    torch.manual_seed(0)
    net = UniSRec(num_items=5, plm_dim=32, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=8, n_experts=2)
    settings = TextSettings(tiny_encoder, batch_size=8)
    encoded = TextEncoder(settings.encoder, settings.pooling, settings.max_tokens, settings.batch_size).encode(TEXTS)
    features = torch.cat([torch.zeros(1, 32), torch.from_numpy(np.asarray(encoded, np.float32))])
    return Recommender(net, TOKENS, TEXTS, features, settings).save(tmp_path / "model")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _die_with_this_process() -> None:
    """In the child: a SIGKILL when the test process dies, so no server outlives a killed pytest (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def _cli(*words: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unisrec_x.cli", *words], env=_env(),
                            preexec_fn=_die_with_this_process if sys.platform == "linux" else None, **kwargs)


@contextlib.contextmanager
def serving(model: Path, log: Path):
    """A real ``unisrec-x serve`` on 127.0.0.1; yields (process, client); killed at the end whatever happens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "a") as out:
        proc = _cli("serve", "--ckpt", str(model), "--port", str(port), "--threads", "1",
                    stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, log, DEADLINE)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_an_acknowledged_item_survives_kill_9_and_a_restart(model, tmp_path):
    """Issue 27 #2: 201 means the item is on disk; a restart (and every command) sees it, ranked the same."""
    log = tmp_path / "server.log"
    history = {"history": ["NEWITEM1", "a"], "k": 3}
    with serving(model, log) as (proc, client):
        added = client.post("/items", json={"items": {"NEWITEM1": "a purple filament, 1 kg spool"}})
        assert added.status_code == 201 and added.json()["added"] == ["NEWITEM1"]
        before = client.post("/recommend", json=history).json()["items"]
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown hook, no flush: only what was fsync'd is left
        proc.wait(timeout=30)
    with serving(model, log) as (proc, client):
        after = client.post("/recommend", json=history)
        assert after.status_code == 200, after.text
        assert [i["item"] for i in after.json()["items"]] == [i["item"] for i in before]
        np.testing.assert_allclose([i["score"] for i in after.json()["items"]], [i["score"] for i in before], rtol=1e-5)
        assert client.get("/health").json()["items"] == 6
        # while add-items holds the model (here: this test), a POST /items waits, then 503, adding nothing
        with model_lock(model):
            busy = client.post("/items", json={"items": {"NEWITEM2": "a green filament"}})
        assert busy.status_code == 503 and "being rewritten" in busy.json()["error"]
        assert client.get("/health").json()["items"] == 6
        assert client.post("/items", json={"items": {"NEWITEM2": "a green filament"}}).status_code == 201
    # every command loads the same catalog
    assert Recommender.from_checkpoint(model).item_tokens == [*TOKENS, "NEWITEM1", "NEWITEM2"]
    with pytest.raises(SystemExit) as done:
        main(["recommend", "--ckpt", str(model), "--history", "NEWITEM1 NEWITEM2", "-k", "2"])
    assert done.value.code == 0


def test_two_concurrent_add_items_on_one_model_directory_keep_both_items(model, tmp_path):
    """Issue 31 #3: two `add-items --out X --overwrite` on one X at once; the second waits for the first."""
    names = ["ADD-A", "ADD-B"]
    procs = []
    for name in names:
        items = tmp_path / f"{name}.item"
        write_atomic(items, [("item_id", "token"), ("text", "token_seq")], [(name, f"the listing of {name}")])
        procs.append(_cli("add-items", "--ckpt", str(model), "--items", str(items), "--out", str(model), "--overwrite",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outcomes = [(p.wait(timeout=DEADLINE), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert Recommender.from_checkpoint(model).item_tokens[5:] in (names, names[::-1])


def _served(model: Path, **kwargs) -> Recommender:
    return Recommender.from_checkpoint(model, record=True, **kwargs)


def test_a_servers_journal_is_taken_in_by_add_items_and_a_rewritten_model_refuses_more(model, tmp_path, monkeypatch):
    """The journal lives in the model directory (so --overwrite accepts it) and is compacted away; a
    server whose directory add-items replaced refuses to journal into the new one (409) until restarted."""
    assert JOURNAL_NAME in MODEL_DIR.files
    monkeypatch.setattr("unisrec_x.serving.recommender.SERVE_LOCK_WAIT", 0.2)
    served = _served(model)
    errors = []

    def add_while_locked():
        try:
            served.add_items({"S1": "a spool holder"})
        except JournalUnavailable as err:
            errors.append(err)

    with model_lock(model):  # another thread: what a concurrent add-items is to the server
        worker = threading.Thread(target=add_while_locked)
        worker.start()
        worker.join(timeout=60)
    assert [e.status for e in errors] == [503] and served.num_items == 5 and not (model / JOURNAL_NAME).exists()
    served.add_items({"S1": "a spool holder"})
    assert len((model / JOURNAL_NAME).read_bytes().splitlines()) == 1
    items = tmp_path / "c.item"
    write_atomic(items, [("item_id", "token"), ("text", "token_seq")], [("C1", "a nozzle cleaning kit")])
    with pytest.raises(SystemExit) as done:
        main(["add-items", "--ckpt", str(model), "--items", str(items), "--out", str(model), "--overwrite"])
    assert done.value.code == 0
    assert not (model / JOURNAL_NAME).exists()
    assert [line.split("\t")[0] for line in (model / "items.item").read_text().splitlines()[1:]][5:] == ["S1", "C1"]
    with pytest.raises(JournalUnavailable, match="rewritten since this server loaded it") as refused:
        served.add_items({"S2": "a filament dryer"})
    assert refused.value.status == 409 and "S2" not in served.token_to_id and not (model / JOURNAL_NAME).exists()
    # a Python save over the directory after a server added there since the load refuses, not drops
    stale = Recommender.from_checkpoint(model)
    _served(model).add_items({"S3": "a build plate"})
    with pytest.raises(DataError, match="changed since this model was loaded"):
        stale.save(model, overwrite=True)
    assert Recommender.from_checkpoint(model).item_tokens[-1] == "S3"


def test_replay_skips_items_already_compacted_and_refuses_the_same_id_with_another_text(model, tmp_path):
    """--journal outside the directory: a crash between add-items' swap and its clearing of the journal
    leaves items both in the model and in the journal; loading must neither duplicate nor fail."""
    journal = tmp_path / "outside.jsonl"
    assert default_journal(tmp_path / "last.ckpt") == tmp_path / "last.ckpt.items.jsonl"
    _served(model, journal=journal).add_items({"S1": "a spool holder"})
    journaled = journal.read_bytes()
    items = tmp_path / "c.item"
    write_atomic(items, [("item_id", "token"), ("text", "token_seq")], [("C1", "a nozzle cleaning kit")])
    with pytest.raises(SystemExit) as done:
        main(["add-items", "--ckpt", str(model), "--journal", str(journal), "--items", str(items), "--out", str(model),
              "--overwrite"])
    assert done.value.code == 0 and journal.read_bytes() == b""
    journal.write_bytes(journaled)  # the crash: swapped in, journal not yet cleared
    loaded = Recommender.from_checkpoint(model, journal=journal)
    assert loaded.item_tokens == [*TOKENS, "S1", "C1"]
    vector = np.zeros(32, np.float32)
    with open(journal, "ab") as out:
        out.write(encode_record("S1", "another spool holder", vector))
    with pytest.raises(DataError, match="item 'S1' is already in the model with another text") as err:
        Recommender.from_checkpoint(model, journal=journal)
    assert (err.value.path, err.value.line) == (str(journal), 2)


def test_a_torn_last_record_is_skipped_then_cut_off_and_damage_elsewhere_names_the_line(model, caplog):
    journal = model / JOURNAL_NAME
    lines = [encode_record(f"J{i}", f"journaled item {i}", np.full(32, i, np.float32)) for i in range(3)]
    journal.write_bytes(lines[0] + lines[1] + lines[2][:40])  # killed while writing the third
    with caplog.at_level(logging.WARNING, logger="unisrec_x.serving.journal"):
        served = _served(model)
    assert served.item_tokens[5:] == ["J0", "J1"]
    assert f"{journal}:3: skipping a last record cut short" in caplog.text
    served.add_items({"S1": "a spool holder"})  # starts a fresh line: the torn bytes are cut off first
    assert Recommender.from_checkpoint(model).item_tokens[5:] == ["J0", "J1", "S1"]

    def refused(content: bytes, message: str, line: int) -> None:
        journal.write_bytes(content)
        with pytest.raises(DataError, match=message) as err:
            Recommender.from_checkpoint(model)
        assert (err.value.path, err.value.line) == (str(journal), line)

    refused(lines[0] + lines[1].replace(b"journaled", b"journalled") + lines[2], "checksum .* does not match", 2)
    refused(lines[0] + lines[1][:30] + b"\n" + lines[2], "damaged journal record: not a JSON line", 2)
    refused(lines[0] + b"\xff\xfe\n" + lines[2], "not a JSON line", 2)
    refused(encode_record("J9", "short vector", np.zeros(31, np.float32)), "vector of 31 values, expected 32", 1)
    record = json.loads(lines[0])
    record["vector"] = "not base64!"
    refused(json.dumps(record).encode() + b"\n", "checksum", 1)


def test_serve_refuses_a_journal_in_a_missing_folder_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--ckpt", str(tmp_path / "never-read.ckpt"), "--journal", str(tmp_path / "no" / "j.jsonl")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "j.jsonl: --journal: its folder does not exist" in err
