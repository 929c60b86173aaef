"""Whether a result file may be reused: made by this very command, under today's defaults, config files (by
what they mean, not their bytes) and validation protocol."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from unisrec_x.experiments.arms import REGIMES
from unisrec_x.experiments.runner import DEFAULTS_VERSION, config_paths, resolve_config

#: Class paths moved by the issue-27 layout (``unisrec_x.cli.RENAMED_MODULES``, which experiments/ may not import;
#: a test keeps the two equal): a config naming either path means the same.
RENAMED_MODULES = {"unisrec_x.lit": "unisrec_x.training", "unisrec_x.lit.module": "unisrec_x.training.module",
                   "unisrec_x.lit.pretrain": "unisrec_x.training.pretrain"}
#: Results recorded before config digests were of the configs' meaning carry the sha256 of the file's bytes as it
#: was then (before the layout moved its class path and a comment): each such digest -> the meaning digest of that
#: very file. A record is reused while the config still means that.
LEGACY_CONFIG_DIGESTS = {
    "0c0797736c8c6939": "78fb9c9b69ad6b5c",  # configs/pretrain/pretrain.yaml
    "e6208a829a62f420": "5ee902c4629505b6",  # configs/scientific/sasrec.yaml
    "60cc23fe79396974": "6a051a2877dcde93",  # configs/scientific/unisrec_inductive.yaml
    "ea9b70c95664e5a6": "1be398dcb478b036",  # configs/scientific/unisrec_text_codes.yaml
    "9a90950ea1d929e4": "75b92ddaeb8494f9",  # configs/scientific/unisrec_transductive.yaml
    "2dea0d2c1e1e6ea5": "d01dd9e23e9e502a",  # configs/transfer/finetune_inductive.yaml
    "220c98fa57286079": "6485829b37f41f8a",  # configs/transfer/finetune_transductive.yaml
    "36f0cd0c725c7b2f": "08ebceb8f2ce9fe7",  # configs/transfer/zero_shot.yaml
}


def _canonical(node):
    """A parsed config with every class path under its current module."""
    if isinstance(node, dict):
        return {k: _current_class_path(v) if k == "class_path" and isinstance(v, str) else _canonical(v)
                for k, v in node.items()}
    return [_canonical(v) for v in node] if isinstance(node, list) else node


def _current_class_path(path: str) -> str:
    module, _, name = path.rpartition(".")
    return f"{RENAMED_MODULES.get(module, module)}.{name}"


def config_digest(path: Path) -> str:
    """What a config file means, hashed: its parsed YAML with class paths made current, so a comment or a moved
    module leaves it alone while any changed setting changes it."""
    import yaml

    meaning = _canonical(yaml.safe_load(path.read_text(encoding="utf-8")))
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_digests(command: str) -> dict[str, str]:
    """The meaning digest of each config file a command reads (``-c FILE``, found by ``runner.resolve_config``):
    editing a config changes what the same command line means, so it must not reuse results made under the old one."""
    files = {f: resolve_config(f) for f in config_paths(shlex.split(command))}
    return {f: config_digest(path) for f, path in files.items() if path.is_file()}


def same_configs(recorded: dict | None, command: str) -> bool:
    """A record's config digests against today's files, legacy byte digests through ``LEGACY_CONFIG_DIGESTS``."""
    if recorded is None:
        return False
    now = config_digests(command)
    return recorded.keys() == now.keys() and all(
        digest == now[f] or LEGACY_CONFIG_DIGESTS.get(digest) == now[f] for f, digest in recorded.items())


def validation_users(regime: str) -> str:
    """Whose validation rows select a fit (early stopping, ``--select_initial``) and the floor's knobs: a
    few-shot user has only the sampled users' labels (issue 28; ``--data.valid_users train_users``), a
    full-data user everyone's. Records made before issue 28 validated few-shot fits on all users."""
    return "sampled" if 0 < REGIMES.get(regime, 1.0) < 1 else "all"


def finished(path: Path, command: str, regime: str | None = None) -> dict | None:
    """A result file made by exactly this command, under today's defaults, config files and validation
    protocol, else ``None``."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = (record.get("command") == command and record.get("defaults") == DEFAULTS_VERSION
            and same_configs(record.get("configs"), command)
            and (regime is None or record.get("validation_users", "all") == validation_users(regime)))
    return record if same else None
