"""``unisrec-x``: LightningCLI for fit/validate/test, with data-derived sizes linked into the model."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Optional

from jsonargparse.typing import PositiveInt
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from unisrec_x.runtime.allocator import fix_mmap_threshold
from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.errors import DataError
from unisrec_x.training.checkpoint import read_state_dict
from unisrec_x.training.floor_blend import blended_checkpoint, choose_floor_blend_on
from unisrec_x.training.guards import (AtomicCheckpointIO, KeptWeights, NonFiniteLossError, ResumingModelCheckpoint,
                                      RNGStateCheckpoint)
from unisrec_x.training.heap import HeapTrim
from unisrec_x.training.initial import InitialWeights, tested_checkpoint
from unisrec_x.training.results import TestMetricsWriter

MONITOR = "val/ndcg@10"
PATIENCE = 10
#: Blocks above this are mmapped and returned to the system when freed (allocator.py; benchmarks/README.md, "Peak memory").
MMAP_THRESHOLD = 32 << 20


def _experiment():
    def run(words: list[str]) -> None:
        """Bad input and refused run folders end in one line and status 2, a failed arm in its log's
        tail and status 1: a traceback of the runner would bury what to do."""
        from unisrec_x.experiments.runner import REFUSALS, ArmFailed

        try:
            if words[:1] == ["transfer"]:
                from unisrec_x.experiments.transfer import main as transfer

                return transfer(words[1:])
            from unisrec_x.experiments.foundation import main as foundation

            return foundation(words)
        except (DataError, *REFUSALS) as err:
            logging.getLogger("unisrec-x").error("%s", err)
            sys.exit(2)
        except ArmFailed as err:
            logging.getLogger("unisrec-x").error("%s", err)
            sys.exit(1)

    return run


def _prepare():
    from unisrec_x.data.prepare import main as run

    return run


def _serving(name: str):
    def load():
        from unisrec_x.serving.commands import COMMANDS as SERVING

        return lambda words: sys.exit(SERVING[name](words))

    return load


#: Commands beside LightningCLI's fit/validate/test/predict (imported lazily: they need no Lightning).
COMMANDS = {"experiment": _experiment, "prepare": _prepare,
            **{name: _serving(name) for name in ("recommend", "add-items", "export", "serve")}}


DESCRIPTION = ("unisrec-x: train (fit; pretraining is `fit -c configs/pretrain/...`), validate and test with "
               "LightningCLI. Other commands, each with --help: " + ", ".join(COMMANDS) + ".")


#: Modules that moved in the layout of issue 27 (``lit/`` became ``training/``): configs written before
#: it name their classes by the old paths, which resolve to the same classes.
RENAMED_MODULES = {"unisrec_x.lit": "unisrec_x.training", "unisrec_x.lit.module": "unisrec_x.training.module",
                   "unisrec_x.lit.pretrain": "unisrec_x.training.pretrain"}


def alias_renamed_modules() -> None:
    for old, new in RENAMED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


class FlagPatience(EarlyStopping):
    """The default early stopping, whose patience is the run's ``--patience`` also when it resumes
    (EarlyStopping's own state would restore the checkpoint's)."""

    stopped_before = False

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "patience": self.patience})
        # a run cut after it stopped (during its test, say) would otherwise train on until its next validation
        # and could end on another checkpoint than the uninterrupted run
        self.stopped_before = self.wait_count >= self.patience

    def on_train_start(self, trainer, pl_module) -> None:
        if self.stopped_before:
            trainer.should_stop = True


class UniSRecCLI(LightningCLI):
    """Links ``num_items``/``feature_dim`` from the data, and tests the best checkpoint after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_items", "model.init_args.net.init_args.num_items", apply_on="instantiate")
        parser.link_arguments("data.feature_dim", "model.init_args.net.init_args.plm_dim", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, evaluate the best checkpoint on the test split")
        parser.add_argument("--select_initial", type=bool, default=False,
                            help="keep the weights fit starts from (untrained or pretrained) as a candidate: "
                            "validated once after fit, tested when no epoch beat them (training/initial.py)")
        parser.add_argument("--floor_blend_on", type=Optional[list[str]], default=None,
                            help="test only, for a model with floor_blend tested as it starts (zero-shot): choose the "
                            "floor's weight and decay on these datasets' validation rows (the pretraining sources: a "
                            "zero-shot user has no target labels) before testing (training/floor_blend.py)")
        parser.add_argument("--last_every_n_steps", type=Optional[PositiveInt], default=None,
                            help="fit only: also rewrite last.ckpt every this many training steps, so a run whose "
                            "validations are far apart resumes after a kill with little lost (default: at validations)")
        parser.add_argument("--keep_every_n_steps", type=Optional[PositiveInt], default=None,
                            help="fit only: keep the weights every this many training steps (checkpoints/step=N.ckpt, "
                            "never deleted), e.g. to measure what a pretraining's first quarter and half already buy")
        parser.add_argument("--patience", type=Optional[PositiveInt], default=None,
                            help=f"fit only: validations without a better {MONITOR} before early stopping (default "
                            f"{PATIENCE}); few-shot runs take few steps per epoch, so a model whose score dips before "
                            "it climbs may need more")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, writing checkpoints whole or not at all (``AtomicCheckpointIO``) unless a user gave a
        checkpoint plugin of their own."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    @staticmethod
    def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):
        """LightningCLI's, with a text top's layers in their own parameter group at the module's ``text_top_lr``
        (a pretrained Transformer fine-tunes at ~1e-5, the rest of the model at ~1e-3)."""
        if hasattr(lightning_module, "text_top_parameter_group"):
            lightning_module.text_top_parameter_group(optimizer)
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def _parse_ckpt_path(self) -> None:
        """Open ``--ckpt_path`` through our reader first: a missing, truncated or code-carrying file
        gets a one-line error naming it instead of a torch traceback."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("best", "last", "hpc", "registry"):
            read_state_dict(path)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        if self.config.fit.get("floor_blend_on") is not None:
            raise DataError("--floor_blend_on is for test (zero-shot); a fit chooses the floor on its own validation rows")
        patience = self.config.fit.get("patience")
        if patience is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, FlagPatience):  # an EarlyStopping a YAML adds keeps its own
                    callback.patience = int(patience)  # a plain int: checkpoints load with weights_only
        every = self.config.fit.get("last_every_n_steps")
        if every is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, ResumingModelCheckpoint):
                    callback.last_every_n_steps = int(every)
        keep = self.config.fit.get("keep_every_n_steps")
        if keep is not None:
            self.trainer.callbacks.append(KeptWeights(filename="{step}", every_n_train_steps=int(keep), save_top_k=-1,
                                                      save_weights_only=True, monitor=None))
        if self.config.fit.get("select_initial", False):
            self.trainer.callbacks.append(InitialWeights())

    def before_test(self) -> None:
        sources = self.config.test.get("floor_blend_on")
        if sources is None:
            return
        if not sources:
            raise DataError("--floor_blend_on names the datasets whose validation rows choose the floor: got none")
        if not getattr(getattr(self.model, "net", None), "floor_blend", False):
            raise DataError("--floor_blend_on chooses the floor a model carries: set "
                            "--model.init_args.net.init_args.floor_blend true")
        if self.config.test.get("ckpt_path"):
            raise DataError("--floor_blend_on is for a model tested as it starts (zero-shot); a checkpoint of a fit "
                            "carries the floor chosen on its own validation rows")
        self.model.floor_blend_choice = choose_floor_blend_on(self.model, self.datamodule.of_other_datasets(sources))

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit", True) and not self.trainer.fast_dev_run:
            if self.config.fit.get("select_initial", False):
                tested = tested_checkpoint(self.trainer, self.model, self.datamodule, MONITOR)
            else:
                tested = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else None
            if getattr(getattr(self.model, "net", None), "floor_blend", False):
                tested = blended_checkpoint(self.trainer, self.model, self.datamodule, tested)
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=tested or None, weights_only=True)


def trainer_defaults(trim_heap: bool = False) -> dict:
    """The Trainer's defaults; ``trim_heap`` when the mmap threshold is fixed (``training/heap.py``)."""
    return {
        "max_epochs": 300,
        "default_root_dir": "runs",
        "use_distributed_sampler": False,  # the DataModule shards its own length-bucketed batches
        "callbacks": [
            FlagPatience(monitor=MONITOR, mode="max", patience=PATIENCE),
            ResumingModelCheckpoint(monitor=MONITOR, mode="max", filename="best-{epoch}", save_last=True),
            TestMetricsWriter(),
            RNGStateCheckpoint(),
            *([HeapTrim()] if trim_heap else []),
        ],
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``unisrec-x`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    words = sys.argv[1:] if args is None else args
    if words and words[0] in COMMANDS:
        return COMMANDS[words[0]]()(words[1:])
    alias_renamed_modules()
    fixed = fix_mmap_threshold(MMAP_THRESHOLD)
    try:
        UniSRecCLI(datamodule_class=SeqRecDataModule, subclass_mode_model=True, trainer_defaults=trainer_defaults(fixed),
                   save_config_kwargs={"overwrite": True}, parser_kwargs={"description": DESCRIPTION}, args=args)
    except (DataError, NonFiniteLossError) as err:
        logging.getLogger("unisrec-x").error("%s", err)
        sys.exit(2)
    except ValueError as err:  # jsonargparse wraps what a module's __init__ raises (a refused pretrained checkpoint)
        inner = data_error_inside(err)
        if inner is None:
            raise
        logging.getLogger("unisrec-x").error("%s", inner)
        sys.exit(2)


def data_error_inside(err: BaseException) -> DataError | None:
    """The ``DataError`` an exception was raised while handling, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
