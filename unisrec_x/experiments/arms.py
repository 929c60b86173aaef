"""The transfer benchmark's arms: each a training-free baseline or a ``unisrec-x`` command, and the flags they share.

An arm's ``args`` are part of its result's key (``transfer.keyed_command``): changing them re-runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REGIMES = {"zero-shot": 0.0, "5%": 0.05, "20%": 0.20, "100%": 1.0}
FEW_SHOT = ("5%", "20%")
#: Every text arm, pretrained or not, uses the same architecture: the pretrained arms differ only by their start.
TEXT_MODEL = ["--model.init_args.net.init_args.last_item_residual", "true"]


@dataclass
class Arm:
    """One line of the plot: a training-free baseline (``kind``) or a ``unisrec-x`` command."""

    name: str
    label: str
    args: list[str] = field(default_factory=list)
    kind: str = "fit"  # fit | test | one of BASELINES (whose ``args`` are ``--data.NAME VALUE`` pairs)
    pretrained: bool = False
    regimes: tuple[str, ...] = ("5%", "20%", "100%")
    in_quick: bool = False  # part of ``--quick`` (the main job: minutes, so only the arms its findings need)
    #: a fit run first in the same regime (CTRL's alignment stage); its checkpoint is ``{first_stage}`` in ``args``:
    #: the best on validation, as any fit's, or with ``first_stage_passes`` the last of a run that long (in full
    #: training splits' worth of epochs, validation not stopping it)
    first_stage: list[str] = field(default_factory=list)
    first_stage_passes: int | None = None
    #: only these targets (an arm that reads item fields only they have); ``None``: every target
    targets: tuple[str, ...] | None = None
    #: which pretraining a pretrained arm starts from (a key of ``PRETRAININGS``)
    pretraining: str = ""
    #: a candidate for "the best trained arm" of the goals table (not a point of a curve, such as the weights a
    #: pretraining kept half-way)
    in_goals: bool = True
    #: a diagnostic or a design variant another arm superseded: its records stay in the report, but the default
    #: plan (no ``--arms``) leaves it out, so "every arm x every seed" means the benchmark's arms
    probe: bool = False


_PRE = ["--model.init_args.pretrained", "{pretrained}"]
HISTORY_DECAY = ["--model.init_args.net.init_args.history_decay", "0.25",
                 "--model.init_args.net.init_args.learn_history_decay", "true"]
#: issue 29: the text encoder's last layer trained with the model (``tuned`` in the arm id), 256 of each step's
#: target items through it (benchmarks/README.md: a step's cost grows with them)
TEXT_TOP = ["--model.init_args.net.init_args.text_top_layers", "1", "--model.init_args.text_fresh_max", "256"]
#: the item vector from the knowledge adaptor over separately encoded fields alone (no joined text); the fields follow
FIELDS_ONLY = ["--model.init_args.net.init_args.use_text", "false", "--model.init_args.net.init_args.knowledge_fields"]
FLOOR_BLEND = ["--model.init_args.net.init_args.floor_blend", "true"]
#: issue 29: the pretrainings arms start from, by name, each the flags it adds to the benchmark's pretraining
#: command: "" is the frozen encoder's; "tuned1" trains the encoder's last layer with the rest on the sources'
#: sequences (item-drop views only: a word-drop view swaps in frozen vectors that a trained top replaces)
#: (its validations are ~2 hours apart on one CPU core: last.ckpt every 25 steps, so a cut run resumes near where it was)
#: tuned1 keeps its weights every quarter of its ~900 steps (3 epochs of 302): the zero-shot curve against source
#: sequences seen (1,024 training targets a step)
TUNED1_CURVE_STEPS = (225, 450, 675, 900)
#: (tuned1 with ``text_straight_through`` was tried and dropped: its source validation collapsed, docs/results.md)
PRETRAININGS = {"": [], "tuned1": [*TEXT_TOP, "--model.init_args.item_drop_view_prob", "1", "--last_every_n_steps", "25",
                                   "--keep_every_n_steps", str(TUNED1_CURVE_STEPS[0])]}
POPULARITY_PRIOR = ["--model.init_args.net.init_args.popularity_prior", "true",
                    "--model.init_args.net.init_args.popularity_weight", "0.43"]
#: issue 30 (after CTRL): SASRec-ID aligned with a text model (the text arms' architecture over the frozen
#: vectors, both training), then fine-tuned alone from the aligned weights; the served model reads no text
CTRL_ALIGN = ["-c", "configs/ctrl/align.yaml", "--model.init_args.text_net_args", "{last_item_residual: true}"]
CTRL_FINETUNE = ["-c", "configs/ctrl/finetune.yaml", "--model.init_args.pretrained", "{first_stage}"]
#: the first alignment arms' fixed length in full training splits' worth of epochs (before the ID model's validation
#: ranking was seen to mean something during the alignment: it peaks within the first two passes, then falls)
ALIGN_PASSES = 20
#: arms computed in this process, without training
BASELINES = ("popularity", "text_knn", "floor")
ARMS = [
    Arm("popularity", "Popularity (training counts)", kind="popularity", in_quick=True),
    Arm("text_knn", "Text-kNN (no training)", kind="text_knn", regimes=tuple(REGIMES), in_quick=True),
    # issue 28: the strongest training-free ranker, its two knobs chosen on the regime's validation rows
    Arm("floor", "Floor: decayed-history text-kNN + popularity (no training)", kind="floor", regimes=tuple(REGIMES),
        in_quick=True),
    # issue 28 #3: all-MiniLM-L6-v2 was trained for mean pooling; the project encodes with [CLS]
    Arm("text_knn_mean", "Text-kNN, mean-pooled text vectors", ["--data.pooling", "mean"], kind="text_knn",
        regimes=tuple(REGIMES)),
    Arm("floor_mean", "Floor, mean-pooled text vectors", ["--data.pooling", "mean"], kind="floor", regimes=tuple(REGIMES)),
    Arm("zero_shot", "Pretrained, zero-shot", ["-c", "configs/transfer/zero_shot.yaml", *TEXT_MODEL, *_PRE],
        kind="test", pretrained=True, regimes=("zero-shot",), in_quick=True),
    # issue 28 #4, zero-shot: the pretrained model carrying the floor, its weight and decay chosen on the sources'
    # validation rows (the zero-shot floor's own choice is made there too)
    Arm("zero_shot_floorblend", "Pretrained, zero-shot, carrying the floor (chosen on the sources' validation)",
        ["-c", "configs/transfer/zero_shot.yaml", *TEXT_MODEL, *FLOOR_BLEND, "--floor_blend_on", "{sources}", *_PRE],
        kind="test", pretrained=True, regimes=("zero-shot",)),
    Arm("sasrec", "SASRec-ID", ["-c", "configs/scientific/sasrec.yaml"]),
    Arm("scratch_inductive", "Scratch, inductive (text)", ["-c", "configs/scientific/unisrec_inductive.yaml", *TEXT_MODEL]),
    Arm("scratch_transductive", "Scratch, transductive (text + ID)",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *TEXT_MODEL]),
    Arm("pretrained_inductive_adapter", "Pretrained, inductive, adapter only",
        ["-c", "configs/transfer/finetune_inductive.yaml", *TEXT_MODEL, *_PRE], pretrained=True),
    Arm("pretrained_inductive_full", "Pretrained, inductive, all parameters",
        ["-c", "configs/transfer/finetune_inductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false", *_PRE],
        pretrained=True),
    Arm("pretrained_transductive", "Pretrained, transductive (text + ID), all parameters",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false", *_PRE],
        pretrained=True),
    # semantic IDs (issue 14): codes are per domain, so the pretrained arm transfers the text path and
    # learns the target's code embeddings from scratch (OPQ codes fitted on the target's item texts)
    Arm("scratch_text_codes", "Scratch, text + codes",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL], in_quick=True),
    Arm("pretrained_text_codes", "Pretrained, text + codes, all parameters",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false",
         "--model.init_args.net.init_args.use_item_id", "false", "--model.init_args.net.init_args.use_codes", "true", *_PRE],
        pretrained=True, in_quick=True),
    # issue 14 at 5%: both memories (ID rows, code digits) with the memory dropout that validation chose
    # for each on Scientific 5%, seed 1, from the same grid (docs/results.md, semantic item IDs)
    Arm("scratch_transductive_md", "Scratch, text + ID, memory dropout 0.75",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *TEXT_MODEL,
         "--model.init_args.net.init_args.memory_dropout", "0.75"], regimes=("5%",)),
    Arm("scratch_text_codes_md", "Scratch, text + codes, memory dropout 0.75",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL,
         "--model.init_args.net.init_args.memory_dropout", "0.75"], regimes=("5%",)),
    # issue 28 #6: the grid's other points, re-run once ID rows and code digits are dropped alike (no rescale),
    # each selected on the sampled users' validation rows: probes (run as `--arms ... --seeds 1`)
    *[Arm(f"scratch_{memory}_md{round(100 * p)}", f"Scratch, {label}, memory dropout {p}",
          ["-c", f"configs/scientific/unisrec_{memory}.yaml", *TEXT_MODEL,
           "--model.init_args.net.init_args.memory_dropout", str(p)], regimes=("5%",), probe=True)
      for memory, label in (("transductive", "text + ID"), ("text_codes", "text + codes")) for p in (0.5, 0.9)],
    # issue 28 #4: models that start at the floor, each switch alone and both, measured on validation before
    # either becomes the default: the query carries the decayed history (learned, from the floor's usual 0.25),
    # the score a learned popularity prior (from the floor's beta 0.03 on the logit scale: 0.03 / temperature 0.07)
    # (decided where the floor is close: few-shot; at 100% the model is 12-90% above it)
    Arm("scratch_text_codes_decay", "Scratch, text + codes, learned history decay",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *HISTORY_DECAY], regimes=FEW_SHOT),
    Arm("scratch_text_codes_prior", "Scratch, text + codes, popularity prior",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *POPULARITY_PRIOR], regimes=FEW_SHOT),
    Arm("scratch_text_codes_floorstart", "Scratch, text + codes, history decay + popularity prior",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *HISTORY_DECAY, *POPULARITY_PRIOR],
        regimes=FEW_SHOT),
    # issue 28 #3: the best from-scratch arm on mean-pooled text vectors (the encoder's own pooling)
    Arm("scratch_text_codes_mean", "Scratch, text + codes, mean-pooled text vectors",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, "--data.pooling", "mean"]),
    # issue 28 #4: the trained model plus the floor, its weight (0 included) chosen on validation after the fit
    Arm("scratch_text_codes_floorblend", "Scratch, text + codes, carrying the floor (weight chosen on validation)",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *FLOOR_BLEND]),
    # the same with the weight chosen on half of the validation rows, kept apart from early stopping (whose best
    # epoch's score on its own rows is optimistic, so the blend chosen there leans to the model)
    Arm("scratch_text_codes_floorblend_apart", "Scratch, text + codes, carrying the floor chosen on validation rows "
        "kept apart", ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *FLOOR_BLEND,
                       "--data.blend_rows", "0.5"], probe=True),
    # ... and on users held out of training as well: few-shot validation rows are the training users', whose
    # histories the model fit, while most test users are unseen; the floor knows no user either way
    Arm("scratch_text_codes_floorblend_unseen", "Scratch, text + codes, carrying the floor chosen on users held out "
        "of training", ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *FLOOR_BLEND,
                        "--data.blend_rows", "0.3", "--data.blend_rows_train", "false"], regimes=FEW_SHOT,
                        probe=True),
    # the blend on mean-pooled vectors: on Scientific the mean-pooled floor wins validation, so it is the floor to
    # beat there, and the model's floor coordinates come from its own (here mean-pooled) text vectors
    Arm("scratch_text_codes_mean_floorblend", "Scratch, text + codes, mean-pooled, carrying the floor",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, "--data.pooling", "mean", *FLOOR_BLEND]),
    Arm("pretrained_text_codes_floorblend", "Pretrained, text + codes, carrying the floor (weight chosen on validation)",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false",
         "--model.init_args.net.init_args.use_item_id", "false", "--model.init_args.net.init_args.use_codes", "true",
         *FLOOR_BLEND, *_PRE], pretrained=True),
    # issue 29 #3: the encoder's last layer pretrained on the sources, then zero-shot and fine-tuned with it
    Arm("zero_shot_tuned1", "Pretrained with the encoder's last layer trained, zero-shot",
        ["-c", "configs/transfer/zero_shot.yaml", *TEXT_MODEL, "--model.init_args.net.init_args.text_top_layers", "1",
         *_PRE], kind="test", pretrained=True, regimes=("zero-shot",), pretraining="tuned1"),
    # ... and from the weights it kept every quarter of its steps: zero-shot against the source sequences seen
    *[Arm(f"zero_shot_tuned1_step{step}", f"Pretrained with the encoder's last layer trained, zero-shot, after {step} steps",
          ["-c", "configs/transfer/zero_shot.yaml", *TEXT_MODEL, "--model.init_args.net.init_args.text_top_layers", "1",
           "--model.init_args.pretrained", f"{{pretrained_step:{step}}}"], kind="test", pretrained=True,
          regimes=("zero-shot",), pretraining="tuned1", in_goals=False) for step in TUNED1_CURVE_STEPS],
    Arm("pretrained_text_codes_tuned1", "Pretrained with the encoder's last layer trained, text + codes, all parameters",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false",
         "--model.init_args.net.init_args.use_item_id", "false", "--model.init_args.net.init_args.use_codes", "true",
         *TEXT_TOP, *_PRE], pretrained=True, pretraining="tuned1"),
    Arm("scratch_text_codes_tuned1", "Scratch, text + codes, encoder's last layer trained",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL, *TEXT_TOP]),
    Arm("scratch_inductive_tuned1", "Scratch, inductive (text), encoder's last layer trained",
        ["-c", "configs/scientific/unisrec_inductive.yaml", *TEXT_MODEL, *TEXT_TOP]),
    # issue 30: text helping an ID model that stays ID-based. KAR: the item text's knowledge vector added to the
    # ID embedding (the targets have one text per item, so one field: the item's text); CTRL: alignment first
    Arm("sasrec_knowledge", "SASRec-ID + knowledge vector (KAR)",
        ["-c", "configs/scientific/sasrec.yaml", "--model.init_args.net.init_args.knowledge_fields", "[text]"]),
    # the text path over an item's fields encoded one by one (KAR's hybrid-expert adaptor) instead of one joined
    # string: Office only (its optional APAO text, data/prepare.py); Scientific's release has one text per item.
    # The first has the fields Office.text joins (title, categories, brand), the second adds the description
    Arm("scratch_fields", "Scratch, inductive, fields encoded one by one (title, categories, brand)",
        ["-c", "configs/scientific/unisrec_inductive.yaml", *TEXT_MODEL, *FIELDS_ONLY, "[title,categories,brand]"],
        targets=("office",)),
    Arm("scratch_fields_description", "Scratch, inductive, fields one by one, with the description",
        ["-c", "configs/scientific/unisrec_inductive.yaml", *TEXT_MODEL, *FIELDS_ONLY,
         "[title,categories,brand,description]"], targets=("office",), probe=True),
    # the first three CTRL designs (a fixed-length alignment), superseded by ``sasrec_ctrl``: probes
    Arm("sasrec_aligned", "SASRec-ID aligned with text, served ID-only (CTRL)", CTRL_FINETUNE, first_stage=CTRL_ALIGN,
        first_stage_passes=ALIGN_PASSES, probe=True),
    # the alignment over a draw of the whole catalog (items in no training history too), the text model trained
    # with it or held fixed
    Arm("sasrec_aligned_catalog", "SASRec-ID aligned with text over the catalog, served ID-only",
        CTRL_FINETUNE, first_stage=[*CTRL_ALIGN, "--model.init_args.align_items", "catalog"],
        first_stage_passes=ALIGN_PASSES, probe=True),
    Arm("sasrec_aligned_catalog_fixed", "SASRec-ID aligned with a fixed text model over the catalog, served ID-only",
        CTRL_FINETUNE, first_stage=[*CTRL_ALIGN, "--model.init_args.align_items", "catalog",
                                    "--model.init_args.freeze_text_net", "true"], first_stage_passes=ALIGN_PASSES,
        probe=True),
    # the alignment early-stopped on the aligned ID model's own validation ranking, the fine-tune from its best
    # checkpoint, which it keeps unless it validates better (--select_initial)
    Arm("sasrec_ctrl", "SASRec-ID after CTRL (catalog alignment, then fine-tune; each selected on validation)",
        [*CTRL_FINETUNE, "--select_initial", "true"], first_stage=[*CTRL_ALIGN, "--model.init_args.align_items", "catalog"]),
]
