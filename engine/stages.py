"""Progressive resolution (data.stages): a run trains its first steps at lower
resolutions, where a step costs a fraction, and the rest at data.max_side, with one
schedule, optimizer and EMA. This module reads the entries, says which stage trains a
step, scales sizes to a stage and counts steps for the ETA; engine.buckets.stage_data and
stage_plans plan each stage's buckets, and engine/train.py switches its loader.

Pure: it imports nothing of the engine, so engine.config can check entries on load.
"""

from __future__ import annotations

Stages = list[tuple[int, int | None]]   # (side, until_step), the last (max_side, None)


def resolution_stages(entries: list[str], max_side: int, patch: int) -> Stages:
    """data.stages `entries` as [(side, until_step)], closed by (max_side, None): the
    stage with side s trains the optimizer steps n + 1 for which n < until_step.
    ValueError (with what is allowed) for an entry that is not 'SIDE until STEP', not
    rising, or not a multiple of `patch` below max_side."""
    out: Stages = []
    for entry in entries:
        side, _, step = entry.partition("until")
        side, step = side.strip().removesuffix("px").strip(), step.strip()
        if not (side.isdigit() and step.isdigit()):
            raise ValueError(f"entry '{entry}' is not 'SIDE until STEP' (allowed: e.g. "
                             f"['32 until 4500'])")
        side, step = int(side), int(step)
        if side % patch or not patch <= side < max_side:
            raise ValueError(f"side {side} of '{entry}': allowed multiples of model.patch_size "
                             f"{patch} from {patch} to below data.max_side {max_side} "
                             f"([] trains at data.max_side throughout)")
        if step < 1 or (out and (side <= out[-1][0] or step <= out[-1][1])):
            raise ValueError(f"'{entry}': sides and steps must rise from entry to entry, "
                             f"steps from 1")
        out.append((side, step))
    return [*out, (max_side, None)]


def stage_index(stages: Stages, step: int) -> int:
    """The data.stages entry (resolution_stages) that trains the optimizer step after
    `step` completed ones."""
    return next(k for k, (_, until) in enumerate(stages) if until is None or step < until)


def steps_left(stages: Stages, costs: list[float], step: int, stop_at: int) -> float:
    """For the ETA: the optimizer steps from `step` to `stop_at`, each counted as its
    stage's cost (costs[k]: image tokens per sample) over the cost of the stage training
    now, so that the speed measured in this stage times them gives the time left."""
    now = costs[stage_index(stages, step)]
    total, start = 0.0, 0
    for (_, until), cost in zip(stages, costs):
        end = stop_at if until is None else min(until, stop_at)
        total += max(0, end - max(start, step)) * cost / now
        start = until or stop_at
    return total


def stage_text(stages: Stages, k: int) -> str:
    """'up to 32 px for steps 1-4500' of stage k, for logs."""
    side, until = stages[k]
    start = stages[k - 1][1] if k else 0
    return f"up to {side} px " + (f"for steps {start + 1}-{until}" if until else
                                  f"from step {start + 1}")


def stage_scale(v: int, side: int, max_side: int, patch: int) -> int:
    """A length of the full size at a progressive-resolution stage up to `side` px: scaled
    by side / max_side to the nearest multiple of the patch (at least one patch)."""
    return max(patch, round(v * side / max_side / patch) * patch)
