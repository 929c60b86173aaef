"""The HTTP service, through a real client against `unisrec-x serve` running in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import HELD_OUT, SAME_FILAMENT
from unisrec_x.serving.recommender import Recommender


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(held_out_checkpoint, real_root, shared_cache, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNISREC_X_CACHE", str(shared_cache))
        return Recommender.from_checkpoint(held_out_checkpoint, str(real_root)).save(
            tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    """Start the server, wait for /health, stop it afterwards (and show its log if it died)."""
    port = _free_port()
    log = model_dir.parent / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unisrec_x.cli", "serve", "--ckpt", str(model_dir),
                                 "--port", str(port), "--max_wait_ms", "5"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"server did not come up:\n{log.read_text()}")
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_reports_the_catalog(server, model_dir):
    body = server.get("/health").json()
    assert body["status"] == "ok"
    assert body["items"] == Recommender.from_checkpoint(model_dir).num_items


def test_recommend_answers_as_the_python_api(server, model_dir):
    expected = Recommender.from_checkpoint(model_dir).recommend([SAME_FILAMENT], k=7, exclude_seen=True)[0]
    response = server.post("/recommend", json={"history": SAME_FILAMENT, "k": 7, "exclude_seen": True})
    assert response.status_code == 200
    items = response.json()["items"]
    assert [i["item"] for i in items] == [r.item for r in expected]
    assert [i["score"] for i in items] == pytest.approx([r.score for r in expected], abs=1e-5)
    assert items[0]["text"] == expected[0].text


@pytest.mark.parametrize("body, status, says", [
    ({"history": ["2", "nope", "zilch"]}, 422, "2 unknown item"),
    ({"history": []}, 422, "history is empty"),
    ({"history": ["2"] * 1001}, 422, "at most 1000"),
    ({"history": ["2"], "k": 0}, 422, "k must be between 1 and"),
    ({"history": ["2"], "k": 5000}, 422, "k must be between 1 and"),
    ({"history": "2 4"}, 422, "history"),
    ({"k": 3}, 422, "history: Field required"),
])
def test_bad_requests_get_4xx_saying_why(server, body, status, says):
    response = server.post("/recommend", json=body)
    assert response.status_code == status
    assert says in response.json()["error"]
    if "unknown" in says:
        assert response.json()["items"] == ["nope", "zilch"]


def test_malformed_json_is_a_400(server):
    response = server.post("/recommend", content=b'{"history": ["2", ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, model_dir):
    local = Recommender.from_checkpoint(model_dir)
    histories = [[t] for t in local.item_tokens[:48]]
    expected = [[r.item for r in recs] for recs in local.recommend(histories, k=5)]
    batches_before = server.get("/health").json()["batches"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda h: server.post("/recommend", json={"history": h, "k": 5}), histories))
    assert all(a.status_code == 200 for a in answers)
    assert [[i["item"] for i in a.json()["items"]] for a in answers] == expected
    batches = server.get("/health").json()["batches"] - batches_before
    assert batches < len(histories)  # some requests shared a forward pass


def test_items_added_over_http_are_recommended_at_once(server, held_out_text):
    assert server.post("/recommend", json={"history": [HELD_OUT]}).status_code == 422
    response = server.post("/items", json={"items": {HELD_OUT: held_out_text}})
    assert response.status_code == 201 and response.json()["added"] == [HELD_OUT]
    top = server.post("/recommend", json={"history": SAME_FILAMENT, "k": 3, "exclude_seen": True}).json()["items"]
    assert top[0]["item"] == HELD_OUT
    again = server.post("/items", json={"items": {HELD_OUT: held_out_text}})
    assert again.status_code == 409 and again.json()["items"] == [HELD_OUT]
    assert server.post("/items", json={"items": {}}).status_code == 422


def test_binds_to_loopback_by_default():
    from unisrec_x.serving.commands import serve_parser

    assert serve_parser().parse_args(["--ckpt", "model"]).host == "127.0.0.1"
