"""``unisrec-x recommend | add-items | export | serve``: a trained model from the shell."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unisrec_x.errors import DataError

log = logging.getLogger(__name__)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"unisrec-x {prog}", description=description)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) or model directory")
    parser.add_argument("--data_root", default=None, help="data root for a checkpoint's dataset (default: "
                        "$UNISREC_X_DATA_ROOT or ../shared/data)")
    return parser


def _load(args: argparse.Namespace):
    from unisrec_x.serving.recommender import Recommender

    return Recommender.from_checkpoint(args.ckpt, args.data_root)


def _run(body, words: list[str]) -> int:
    """Bad input ends with one line naming the file or value, exit status 2, no traceback."""
    from unisrec_x.serving.recommender import RequestError

    try:
        body(words)
    except (DataError, RequestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def recommend(words: list[str]) -> int:
    parser = _parser("recommend", "Print the top-k next items for one history.")
    parser.add_argument("--history", required=True, help='item ids, oldest first, separated by spaces: "ID ID ID"')
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--exclude_seen", action="store_true", help="never recommend an item of the history")

    def body(words: list[str]) -> None:
        args = parser.parse_args(words)
        rows = _load(args).recommend([args.history.split()], args.k, args.exclude_seen)[0]
        alias = any(rec.alias for rec in rows)
        print(f"{'rank':>4}  {'item':<14} " + (f"{'alias':<12} " if alias else "") + f"{'score':>8}  text")
        for rank, rec in enumerate(rows, 1):
            text = rec.text if len(rec.text) <= 90 else rec.text[:87] + "..."
            print(f"{rank:>4}  {rec.item:<14} " + (f"{rec.alias:<12} " if alias else "") + f"{rec.score:>8.4f}  {text}")

    return _run(body, words)


def add_items(words: list[str]) -> int:
    parser = _parser("add-items", "Add items from their text alone and write an updated model directory.")
    parser.add_argument("--items", required=True, help="RecBole atomic file with item_id and text fields "
                        "(.item or .text)")
    parser.add_argument("--text_fields", nargs="+", default=None,
                        help="fields joined into the text (default: text, else title)")
    parser.add_argument("--out", required=True, help="model directory to write (replaced atomically)")

    def body(words: list[str]) -> None:
        from unisrec_x.data.atomic import read_atomic
        from unisrec_x.data.text import read_item_fields

        args = parser.parse_args(words)
        path = Path(args.items)
        fields = args.text_fields
        if fields is None:
            header = read_atomic(path, required=["item_id"])
            fields = ["text"] if "text" in header.fields else ["title"]
        items = read_item_fields(path, fields)
        recommender = _load(args)
        added = recommender.add_items(items)
        out = recommender.save(args.out)
        print(f"added {len(added)} items; {recommender.num_items} items in {out}")

    return _run(body, words)


def export(words: list[str]) -> int:
    parser = _parser("export", "Write item_vectors.npy, item_ids.txt and a TorchScript query encoder.")
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically)")

    def body(words: list[str]) -> None:
        args = parser.parse_args(words)
        out = _load(args).export(args.out)
        print(f"exported to {out}")

    return _run(body, words)


def serve_parser() -> argparse.ArgumentParser:
    parser = _parser("serve", "Serve POST /recommend, POST /items and GET /health over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch", type=int, default=64, help="requests answered by one forward pass")
    parser.add_argument("--max_wait_ms", type=float, default=2.0, help="how long a request waits for others")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def serve(words: list[str]) -> int:
    parser = serve_parser()

    def body(words: list[str]) -> None:
        import torch
        import uvicorn

        from unisrec_x.serving.service import create_app

        args = parser.parse_args(words)
        if args.threads:
            torch.set_num_threads(args.threads)
        app = create_app(_load(args), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")

    return _run(body, words)


COMMANDS = {"recommend": recommend, "add-items": add_items, "export": export, "serve": serve}
