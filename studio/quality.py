"""The live quality figures as the studio shows them: the Train tab's quality plot, the
Checkpoints tab's quality column and its "best by" choice.

The trainer writes one metrics.jsonl line per sample grid with the q_* figures of
engine/evaluate.py (LiveQuality): the flat-area noise and the seed diversity as
multiples of the real images' (1 is the target), the prompt adherence as a share (demo
dataset only) and a Fréchet distance on cheap features (lower is closer to the real
images). Pure functions of records and numbers, as in studio/views.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from studio import views

QUALITY_SERIES = {"q_noise_ratio": "flat-area noise (x real)",
                  "q_diversity_ratio": "diversity (x real)",
                  "q_adherence": "prompt adherence (share)",
                  "q_fid": "Fréchet distance (cheap features)"}
# the Train tab's plot: every figure scaled so that 1 is what the real images score
PLOT_SERIES = {"q_noise_ratio": "flat-area noise", "q_diversity_ratio": "diversity",
               "fid": "Fréchet distance", "q_adherence": "prompt adherence"}
PLOT_CAP = 4.0      # a figure above this is drawn at it: early figures reach 50x and more
PLOT_TITLE = (f"Image quality at each sample grid, 1 = like the real images (values above "
              f"{PLOT_CAP:g} drawn at {PLOT_CAP:g}; EMA weights, fixed prompts and seeds)")
# "best by" choices: label -> (figure, what is best: "low", "high" or "one" = nearest 1x)
BEST_BY = {"validation loss": ("val_loss", "low"),
           "Fréchet distance": ("q_fid", "low"),
           "prompt adherence": ("q_adherence", "high"),
           "flat-area noise (nearest 1x real)": ("q_noise_ratio", "one"),
           "diversity (nearest 1x real)": ("q_diversity_ratio", "one")}
CHECKPOINT_HEADERS = [*views.CHECKPOINT_HEADERS[:5], "Quality (noise, diversity, adherence, FD)",
                      *views.CHECKPOINT_HEADERS[5:], "Best"]


def figures_by_step(records: Iterable[dict]) -> dict[int, dict[str, float]]:
    """Step -> the quality figures recorded at it (folded records; the last line of a
    step wins)."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if views.record_kind(r) == "quality" and isinstance(r.get("step"), int):
            out[r["step"]] = {k: r[k] for k in QUALITY_SERIES if _finite(r.get(k))}
    return out


def plot_records(records: Iterable[dict]) -> list[dict]:
    """The quality lines as PLOT_SERIES values: the noise and diversity ratios and the
    adherence share as they are, the Fréchet distance over the real halves' distance
    (q_fid_real), each capped at PLOT_CAP."""
    out = []
    for r in records:
        if views.record_kind(r) != "quality" or not isinstance(r.get("step"), int):
            continue
        row = {k: r[k] for k in ("q_noise_ratio", "q_diversity_ratio", "q_adherence")
               if _finite(r.get(k))}
        if _finite(r.get("q_fid")) and _finite(r.get("q_fid_real")) and r["q_fid_real"] > 0:
            row["fid"] = r["q_fid"] / r["q_fid_real"]
        out.append({"step": r["step"], **{k: min(v, PLOT_CAP) for k, v in row.items()}})
    return out


def quality_text(figures: dict[str, float]) -> str:
    """'1.31x · 0.62x · 92% · 0.412' (noise, diversity, adherence, Fréchet); '-' for a
    figure not measured, '' when there is none."""
    if not figures:
        return ""
    parts = [f"{figures['q_noise_ratio']:.2f}x" if "q_noise_ratio" in figures else "-",
             f"{figures['q_diversity_ratio']:.2f}x" if "q_diversity_ratio" in figures else "-",
             f"{figures['q_adherence']:.0%}" if "q_adherence" in figures else "-",
             f"{figures['q_fid']:.3g}" if "q_fid" in figures else "-"]
    return " · ".join(parts)


def best_step(values: dict[int, float], best: str) -> int | None:
    """The step whose value is best ("low", "high", or "one": nearest 1 on a log scale);
    the earlier step on a tie; None when no value is a finite number."""
    score = {"low": lambda v: v, "high": lambda v: -v,
             "one": lambda v: abs(math.log(max(v, 1e-9)))}[best]
    finite = {s: v for s, v in values.items() if _finite(v)}
    return min(finite, key=lambda s: (score(finite[s]), s)) if finite else None


def best_checkpoint(steps: Sequence[int], metas: Sequence[dict],
                    figures: dict[int, dict[str, float]], by: str) -> int | None:
    """The best of the checkpoints at `steps` (with their metadata) by a BEST_BY label:
    validation loss as each checkpoint recorded it at its own step (views.val_loss_at), a
    quality figure as recorded at the checkpoint's step. None when no checkpoint has that
    figure."""
    key, best = BEST_BY[by]
    if key == "val_loss":
        values = {s: views.val_loss_at(m, s) for s, m in zip(steps, metas)}
    else:
        values = {s: figures.get(s, {}).get(key) for s in steps}
    return best_step(values, best)


def no_best_note(by: str) -> str:
    """Why no checkpoint is marked best by a BEST_BY label, and what gives it a figure."""
    if BEST_BY[by][0] == "val_loss":
        return ("No checkpoint is marked best by validation loss: none was validated at its "
                "own step (set train.val_every to a divisor of train.save_every, and keep "
                "data.val_images above 0).")
    if BEST_BY[by][0] == "q_adherence":
        return ("No checkpoint is marked best by prompt adherence: it is measured on the demo "
                "dataset only, whose captions say what to read back from the pixels.")
    return (f"No checkpoint is marked best by {by}: quality figures are measured at each "
            f"sample grid (train.sample_every), and no checkpoint's step has one yet.")


def checkpoint_row(row: list, figures: dict[str, float], best: bool) -> list:
    """views.checkpoint_row's cells with the quality text and the best mark (the columns
    of CHECKPOINT_HEADERS)."""
    return [*row[:5], quality_text(figures), *row[5:], "best" if best else ""]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
