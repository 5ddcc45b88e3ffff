"""The Generate tab's settings as text and back: the seed field, the settings table of a
generated image, and an image's stored settings put back into the tab's fields.

Plain functions of plain values (the parameters come from PNG files anyone could have
written), so the tests check them without a browser.
"""

from __future__ import annotations

import html
import math

from engine.sampling import SAMPLERS, STOCHASTIC


def parse_seed(text) -> int | None:
    """None (random) for empty text or -1; else a whole number >= 0."""
    if text is None or str(text).strip() in ("", "-1"):
        return None
    try:
        seed = int(str(text).strip())
    except ValueError:
        raise ValueError(f"seed '{text}' is not a whole number (leave it empty for a random "
                         f"seed)") from None
    if seed < 0:
        raise ValueError(f"seed {seed} is negative (leave it empty for a random seed)")
    return seed


PARAM_LABELS = [("prompt", "Prompt"), ("negative", "Negative prompt"), ("seed", "Seed"),
                ("width", "Width"), ("height", "Height"), ("steps", "Steps"),
                ("sampler", "Sampler"), ("cfg", "CFG"), ("rescale", "CFG rescale"),
                ("interval", "CFG interval"), ("ramp", "CFG ramp"), ("pag", "PAG scale"),
                ("coarse", "CFG of coarse structure"), ("coarse_sigma", "Coarse blur (px)"),
                ("noise_interval", "Fresh noise for t in"), ("shift", "Shift"),
                ("strength", "Strength"), ("run_id", "Run"), ("checkpoint_step", "Step"),
                ("weights", "Weights"), ("checkpoint_hash", "Model hash")]


def _number(value, lo: float, hi: float, whole: bool = False) -> float | int | None:
    """`value` when it is a finite number in [lo, hi] (a whole one when `whole`), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if not lo <= value <= hi or (whole and value != int(value)):
        return None
    return int(value) if whole else float(value)


def recall_values(params: dict) -> list:
    """The Generate tab's settings from an image's recalled parameters, in the order
    prompt, negative, sampler, steps, cfg, rescale, guidance from t, guidance until t,
    guidance ramp, PAG scale, CFG of coarse structure, coarse blur, fresh noise from t, fresh
    noise until t, shift, width, height, seed (text), strength. A value that is missing, of
    the wrong type or out of its control's range is None (the control is left as it is):
    the parameters come from a file anyone could have written."""
    p = params if isinstance(params, dict) else {}
    interval = p.get("interval")
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
        interval = (None, None)
    seed = _number(p.get("seed"), 0, 2 ** 63 - 1, whole=True)
    # images of ours made before the ramp, PAG or coarse guidance existed say nothing of
    # them: they had none
    ours = interval[0] is not None and "engine_version" in p
    ramp, pag, coarse = (p.get(key, 0.0 if ours else None) for key in ("ramp", "pag", "coarse"))
    # ... nor of the fresh-noise interval: their stochastic samplers drew it at every step
    noise = p.get("noise_interval")
    if not (isinstance(noise, (list, tuple)) and len(noise) == 2):
        stochastic = ours and "noise_interval" not in p and p.get("sampler") in STOCHASTIC
        noise = (0.0, 1.0) if stochastic else (None, None)
    return [p.get("prompt") if isinstance(p.get("prompt"), str) else None,
            p.get("negative") if isinstance(p.get("negative"), str) else None,
            p.get("sampler") if isinstance(p.get("sampler"), str) and p["sampler"] in SAMPLERS
            else None,
            _number(p.get("steps"), 1, 200, whole=True), _number(p.get("cfg"), 0.0, 15.0),
            _number(p.get("rescale"), 0.0, 1.0), _number(interval[0], 0.0, 1.0),
            _number(interval[1], 0.0, 1.0), _number(ramp, 0.0, 1.0), _number(pag, 0.0, 5.0),
            _number(coarse, 0.0, 15.0), _number(p.get("coarse_sigma"), 0.1, 64.0),
            _number(noise[0], 0.0, 1.0), _number(noise[1], 0.0, 1.0),
            _number(p.get("shift"), 0.0, 1e6), _number(p.get("width"), 1, 65536, whole=True),
            _number(p.get("height"), 1, 65536, whole=True),
            str(seed) if seed is not None else None, _number(p.get("strength"), 0.0, 1.0)]


def params_markdown(params: dict) -> str:
    """The settings of a generated image as a short Markdown table."""
    if not params:
        return "No parameters stored in this image."
    rows = [f"| {label} | {html.escape(str(params[key]))} |" for key, label in PARAM_LABELS
            if params.get(key) not in (None, "")]
    return "| Setting | Value |\n|---|---|\n" + "\n".join(rows)
