"""Issue 28's goals measured from the report's rows: per target and regime, the strongest training-free ranker
against the best trained arm, and the long tail at full data.

The strongest training-free ranker is the baseline whose knobs scored best on validation (the floor and its
mean-pooled twin both choose there; a baseline without a validation score, such as text-kNN, is one of the
floor's grid points and never beats it there). Choosing it on test would flatter the trained arms whenever the
two floors disagree. The best trained arm is the one the goals name: the highest mean test N@10 of the
trained arms, as the issue states them. That is a choice on test, so each entry also names the trained arm a
user would deploy, the one validation picks (the highest mean validation N@10 on the regime's validation rows;
rows that kept no score, or scored on part of the rows, cannot be picked, and the entry says how many of the
trained arms could), and its gap to the floor. Zero-shot has no target validation rows, so no pick. Probes
(diagnostics, superseded designs, often one seed) are candidates for neither.
"""

from __future__ import annotations

from typing import Sequence

#: Arm kinds that train nothing (``Arm.kind`` of the benchmark's baselines).
TRAINING_FREE = ("popularity", "text_knn", "floor")
#: What the best trained arm must reach over the floor, per regime (issue 28): a relative margin, or ``spread``
#: (beyond the seeds' std), or ``None`` (at least equal).
MARGINS = {"zero-shot": None, "5%": "spread", "20%": 0.10, "100%": 0.10}


def strongest_floor(rows: list[dict], kinds: dict[str, str]) -> dict | None:
    """The training-free row (slice ``all``) with the best validation N@10 among those that kept one."""
    scored = [r for r in rows if kinds.get(r["arm"]) in TRAINING_FREE and r["slice"] == "all"
              and "validation_ndcg@10_mean" in r]
    return max(scored, key=lambda r: r["validation_ndcg@10_mean"], default=None)


def trained_rows(rows: list[dict], kinds: dict[str, str], slice_name: str = "all") -> list[dict]:
    """The rows of candidate arms (``kinds``) that train something, in one slice."""
    return [r for r in rows if r["arm"] in kinds and kinds[r["arm"]] not in TRAINING_FREE and r["slice"] == slice_name]


def best_trained(rows: list[dict], kinds: dict[str, str], slice_name: str = "all") -> dict | None:
    return max(trained_rows(rows, kinds, slice_name), key=lambda r: r["ndcg@10_mean"], default=None)


def validation_pick(rows: list[dict], kinds: dict[str, str]) -> tuple[dict | None, int, int]:
    """The trained row (slice ``all``) with the best mean validation N@10 (what selection without test chooses),
    how many trained rows could be picked, and how many there are."""
    trained = trained_rows(rows, kinds)
    scored = [r for r in trained if "validation_ndcg@10_mean" in r and r.get("validation_rows") != "apart"]
    return max(scored, key=lambda r: r["validation_ndcg@10_mean"], default=None), len(scored), len(trained)


def verdict(regime: str, best: dict, floor: dict) -> tuple[float, bool | None]:
    """The relative gap of ``best`` over ``floor`` and whether the regime's goal is met (``None``: a one-seed
    row cannot say whether it is beyond the seeds' spread)."""
    gap = best["ndcg@10_mean"] / floor["ndcg@10_mean"] - 1
    margin = MARGINS[regime]
    if margin == "spread":
        if len(best["seeds"]) < 2:
            return gap, None
        return gap, best["ndcg@10_mean"] - floor["ndcg@10_mean"] > best["ndcg@10_std"]
    return gap, gap >= (margin or 0.0)


def goals(rows: list[dict], arms: Sequence, targets: list[str], regimes: list[str]) -> list[dict]:
    """One entry per (target, regime) of ``rows`` (the current protocol's) that has both a floor and a trained
    arm, and a long-tail entry at 100% (the best trained arm's long tail against text-kNN's)."""
    kinds = {a.name: a.kind for a in arms if a.in_goals and not a.probe}  # nor a curve's points, nor probes
    out = []
    for target in targets:
        for regime in regimes:
            mine = [r for r in rows if r["target"] == target and r["regime"] == regime]
            floor, best = strongest_floor(mine, kinds), best_trained(mine, kinds)
            if floor and best:
                gap, met = verdict(regime, best, floor)
                entry = {"target": target, "regime": regime, "slice": "all", "floor_arm": floor["arm"],
                         "floor_ndcg@10": floor["ndcg@10_mean"], "best_arm": best["arm"],
                         "best_ndcg@10": best["ndcg@10_mean"], "best_std": best["ndcg@10_std"],
                         "best_seeds": len(best["seeds"]), "gap": round(gap, 4), "met": met}
                picked, scored, trained = validation_pick(mine, kinds)
                if picked and regime != "zero-shot":
                    entry.update({"picked_arm": picked["arm"], "picked_ndcg@10": picked["ndcg@10_mean"],
                                  "picked_gap": round(picked["ndcg@10_mean"] / floor["ndcg@10_mean"] - 1, 4),
                                  "picked_among": [scored, trained]})
                out.append(entry)
            knn = next((r for r in mine if r["arm"] == "text_knn" and r["slice"] == "long-tail"), None)
            tail = best_trained(mine, kinds, "long-tail")
            if regime == "100%" and knn and tail:
                out.append({"target": target, "regime": regime, "slice": "long-tail", "floor_arm": "text_knn",
                            "floor_ndcg@10": knn["ndcg@10_mean"], "best_arm": tail["arm"],
                            "best_ndcg@10": tail["ndcg@10_mean"], "best_std": tail["ndcg@10_std"],
                            "best_seeds": len(tail["seeds"]),
                            "gap": round(tail["ndcg@10_mean"] / knn["ndcg@10_mean"] - 1, 4),
                            "met": tail["ndcg@10_mean"] >= knn["ndcg@10_mean"]})
    return out


def goals_markdown(entries: list[dict], arms: Sequence) -> str:
    label = {a.name: a.label for a in arms}
    want = {"zero-shot": ">= 0", "5%": "> seeds' std", "20%": ">= +10%", "100%": ">= +10%"}
    lines = ["### Against the floor (issue 28's goals)", "",
             "The floor is the training-free ranker that scored best on validation; the best trained arm is the "
             "highest mean test N@10 among trained arms (a choice on test, as the goals are worded); the last "
             "column is the trained arm validation picks, what a user without test labels would deploy, and its "
             "gap, among the arms whose every seed kept a validation score (a blend's is the best of its weights on "
             "those rows, so it leans its way). Long tail: against text-kNN's.", "",
             "| target | regime | slice | floor (N@10) | best trained arm (N@10) | gap | goal | met "
             "| validation picks (N@10), gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        spread = f" ± {e['best_std']:.4f}" if e["best_seeds"] > 1 else ""
        goal = ">= text-kNN" if e["slice"] == "long-tail" else want[e["regime"]]
        met = {True: "yes", False: "**no**", None: "one seed"}[e["met"]]
        picked = (f"{label.get(e['picked_arm'], e['picked_arm'])} ({e['picked_ndcg@10']:.4f}), {e['picked_gap']:+.1%}"
                  f" (among {e['picked_among'][0]} of {e['picked_among'][1]} trained arms)" if "picked_arm" in e else "")
        lines.append(f"| {e['target']} | {e['regime']} | {e['slice']} | {label.get(e['floor_arm'], e['floor_arm'])} "
                     f"({e['floor_ndcg@10']:.4f}) | {label.get(e['best_arm'], e['best_arm'])} ({e['best_ndcg@10']:.4f}"
                     f"{spread}, {e['best_seeds']} seed{'s' if e['best_seeds'] > 1 else ''}) | {e['gap']:+.1%} | {goal} "
                     f"| {met} | {picked} |")
    return "\n".join(lines) + "\n"
