"""What the studio shows, computed without a browser: number formats, override text,
plot data frames, tables, crop-box thumbnails and the progress bar.

Every function here takes engine objects or plain values and returns text, rows, a
pandas DataFrame or a PIL image, so the tabs only wire them to components and the tests
can check them directly.
"""

from __future__ import annotations

import html
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from engine import config
from engine.buckets import BucketPlan, PlannedImage, make_buckets
from engine.checkpoint import retention_victims
from engine.data import DataError, HealthReport, Scan
from engine.images import (
    MAX_PIXELS,
    open_image,
    read_header,
    srgb_of_part,
    upright_rgb,
)
from engine.train_io import format_duration
from studio.liveness import ACTIVE_STATES

MAX_PLOT_POINTS = 600
LOSS_SERIES = {"loss": "total", "loss_v": "velocity", "loss_freq": "frequency",
               "loss_repa": "iREPA", "loss_sra": "self-alignment", "loss_gamma": "gamma L2"}
# the settings the Dataset tab edits and hands to the Train tab, in its input order
DATASET_KEYS = ("data.min_side", "data.max_side", "data.bucket_step", "data.max_aspect",
                "train.batch_size", "data.drop_last", "data.missing_caption", "data.include_reg")


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------

def fmt_count(n: float | None) -> str:
    """1234 -> '1.2 k', 1.8e6 -> '1.8 M', 3.4e9 -> '3.4 B'; below 1000 as is."""
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def fmt_bytes(n: float | None) -> str:
    """Binary units: 512 -> '512 B', 3.4 * 2**30 -> '3.4 GiB'."""
    if n is None:
        return "-"
    for power, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 2 ** power:
            return f"{n / 2 ** power:.1f} {unit}"
    return f"{int(n)} B"


def fmt_time(timestamp: float | None) -> str:
    """Local 'YYYY-MM-DD HH:MM' of a Unix time."""
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def fmt_loss(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


# --------------------------------------------------------------------------------------
# Config overrides
# --------------------------------------------------------------------------------------

def model_size_text(m: config.ModelConfig) -> str:
    """One line naming the size row and the network's shape, e.g. 'tiny: width 128, ...'."""
    row = m.size or "custom"
    return (f"{row}: width {m.hidden_dim}, {m.patch_layers} patch + {m.pixel_layers} pixel "
            f"blocks, patch {m.patch_size} px")


PRESET_HEADERS = ["Preset", "Model size", "Description"]


def preset_rows() -> list[list[str]]:
    """One row per preset in presets/; a preset that fails validation shows its error."""
    rows = []
    for name in config.list_presets():
        try:
            cfg = config.load_preset(name)
        except config.ConfigError as e:
            rows.append([name, "", f"invalid preset: {e}"])
            continue
        rows.append([name, model_size_text(cfg.model), cfg.description])
    return rows


def override_lines(text: str) -> list[str]:
    """`section.key=value` lines of a text box; blank lines and '#' comments are skipped."""
    return [ln.strip() for ln in (text or "").splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def yaml_value(value) -> str:
    """A Python value as the YAML text an override line needs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def override_line(key: str, value) -> str:
    """The `key=value` line of one setting."""
    return f"{key}={yaml_value(value)}"


def set_override(text: str, key: str, value) -> str:
    """The text with `key=value` replacing every line for `key` (added at the end when
    absent); None removes the key's lines."""
    lines = (text or "").splitlines()
    out, placed = [], False
    for ln in lines:
        if ln.split("=", 1)[0].strip() == key:
            if value is not None and not placed:
                out.append(override_line(key, value))
                placed = True
            continue
        out.append(ln)
    if value is not None and not placed:
        out.append(override_line(key, value))
    return "\n".join(out).strip("\n")


def override_values(text: str) -> dict[str, str]:
    """key -> value text of the well-formed lines (later lines win)."""
    out = {}
    for ln in override_lines(text):
        if "=" in ln:
            k, v = ln.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def resolve_config(preset: str, overrides: str, data_path: str = "") -> config.RunConfig:
    """The preset with the override lines applied and validated (raises ConfigError with
    the engine's message); data.path is `data_path`, the dataset chosen in the studio
    (a data.path override line is refused: the folder is chosen, and checked, there)."""
    if not preset:
        raise config.ConfigError("choose a preset")
    lines = override_lines(overrides)
    cfg = config.load_preset(preset, lines)
    if cfg.data.path != config.load_preset(preset).data.path:
        raise config.ConfigError("data.path cannot be set by an override line: choose the "
                                 "dataset in the Dataset tab, the Dataset list or the folder "
                                 "path box, and remove the data.path line")
    cfg.data.path = str(data_path or "")
    return cfg


def config_diff(cfg: config.RunConfig, base: config.RunConfig) -> list[str]:
    """`section.key: base -> value` for every value that differs from `base`."""
    a, b = config.config_to_dict(base), config.config_to_dict(cfg)
    out = []
    for section, values in b.items():
        if not isinstance(values, dict):
            if values != a.get(section):
                out.append(f"{section}: {a.get(section)!r} -> {values!r}")
            continue
        for k, v in values.items():
            if a[section].get(k) != v:
                out.append(f"{section}.{k}: {a[section].get(k)!r} -> {v!r}")
    return out


# --------------------------------------------------------------------------------------
# Bucket plan and health report
# --------------------------------------------------------------------------------------

def bucket_name(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def bucket_frame(plan: BucketPlan) -> pd.DataFrame:
    """One row per used bucket, smallest area first: bucket name, image count and samples
    per epoch (images x their kohya repeats)."""
    rows = [{"bucket": bucket_name(b.size), "images": b.images, "samples": b.samples}
            for b in plan.buckets if b.images]
    return pd.DataFrame(rows, columns=["bucket", "images", "samples"])


BUCKET_HEADERS = ["Bucket", "Aspect", "Images", "Batches", "Last batch",
                  "Samples (images × repeats)", "Padded", "Dropped", "Tokens",
                  "Aspect error mean / worst"]


def bucket_rows(plan: BucketPlan) -> list[list]:
    """The per-bucket table (used buckets only) with a total row."""
    rows = []
    for b in plan.buckets:
        if b.images:
            rows.append([bucket_name(b.size), f"{b.size[0] / b.size[1]:.2f}", b.images, b.batches,
                         b.last_batch, b.samples, b.padded, b.dropped, b.tokens,
                         f"{b.mean_aspect_error:.3f} / {b.worst_aspect_error:.3f}"])
    rows.append(["total", "", len(plan.images), plan.batches_per_epoch, "",
                 sum(b.samples for b in plan.buckets), sum(b.padded for b in plan.buckets),
                 sum(b.dropped for b in plan.buckets), "",
                 f"{plan.mean_aspect_error:.3f} / {plan.worst_aspect_error:.3f}"])
    return rows


def skipped_files(scan: Scan) -> int:
    """Files the scan skipped with an error (cut short, not an image, in a left-out
    regularisation folder, ...): they never reach the plan."""
    found = {r.rel for r in scan.records}
    return len({f for p in scan.problems if p.severity == "error" for f in p.files} - found)


def plan_summary(plan: BucketPlan, images_found: int, skipped: int = 0) -> str:
    """Markdown: counts, steps per epoch, aspect errors and the planner's warnings.
    `skipped`: files the scan skipped, which are not among those found."""
    used = sum(1 for b in plan.buckets if b.images)
    reasons: dict[str, int] = {}
    for d in plan.dropped:
        reasons[d.reason.replace("_", " ")] = reasons.get(d.reason.replace("_", " "), 0) + 1
    dropped = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items()))
    repeats = (f" · kohya repeats: **{sum(plan.repeats())}** samples per epoch"
               if plan.repeated else "")
    lines = [
        f"**{len(plan.images)}** training images of {images_found} found, "
        f"**{len(plan.val_images)}** held out for validation, **{len(plan.dropped)}** dropped"
        + (f" ({dropped})" if dropped else "") + repeats
        + (f" · **{skipped}** more file(s) skipped (health report)" if skipped else ""),
        f"**{used}** of {len(plan.buckets)} buckets used · **{plan.batches_per_epoch}** batches "
        f"of up to {plan.batch_size} per epoch = **{plan.steps_per_epoch:g}** optimizer steps "
        f"(grad accum {plan.grad_accum}, {plan.world_size} GPU(s))",
        f"Aspect error |ln(image aspect / bucket aspect)|: mean **{plan.mean_aspect_error:.3f}**,"
        f" worst **{plan.worst_aspect_error:.3f}** · {plan.upscaled} image(s) upscaled",
    ]
    lines += [f"- Warning: {w}" for w in plan.warnings]
    return "\n\n".join(lines[:3]) + ("\n\n" + "\n".join(lines[3:]) if plan.warnings else "")


HEALTH_HEADERS = ["Severity", "Problem", "File", "Detail"]


def health_rows(health: HealthReport, limit: int = 500) -> list[list[str]]:
    """Every problem file (up to `limit` rows), errors first."""
    rows = []
    for p in sorted(health.problems, key=lambda p: p.severity != "error"):
        for rel, note in p.files.items():
            rows.append([p.severity, f"{p.kind.replace('_', ' ')}: {p.message}", rel, note])
    return rows[:limit]


def health_summary(health: HealthReport) -> str:
    if not health.problems:
        text = f"No problems in {health.images} images."
    else:
        text = (f"{health.errors} file(s) will not be trained, {health.warnings} to check "
                f"({len(health.problems)} kind(s) of problem).")
    t = health.tokens
    if t is not None:
        limit = f"; limit {t.max_tokens}, {t.over} over" if t.max_tokens is not None else ""
        text += (f" Caption length in {t.counter}: min {t.min}, mean {t.mean:.1f}, 95% {t.p95},"
                 f" max {t.max}{limit}.")
    found = health.conventions.lines() if health.conventions else []
    if found:
        text += "\n\n**Dataset conventions found**\n\n" + "\n".join(
            "- " + re.sub(r"([\\`*_\[\]#|~])", r"\\\1", html.escape(line, quote=False))
            for line in found)   # folder names are text, not markdown
    return text


def planned_order(plan: BucketPlan, order: str = "dataset", bucket: str = "all"
                  ) -> list[PlannedImage]:
    """Training images filtered to one bucket ('all' = every bucket) and sorted by
    'dataset' order, 'worst crop' (least of the image kept first) or 'bucket'."""
    images = [im for im in plan.images if bucket in ("all", "", None)
              or bucket_name(im.bucket) == bucket]
    if order == "worst crop":
        return sorted(images, key=lambda im: (im.kept, im.rel))
    if order == "bucket":
        return sorted(images, key=lambda im: (im.bucket[0] * im.bucket[1], im.bucket, im.rel))
    return images


def crop_thumbnail(path: str | Path, box: Sequence[float], size: int = 160) -> Image.Image:
    """A thumbnail of the image (EXIF-rotated, at most `size` px) with the area outside
    the crop box dimmed and the box outlined. `box` is in original-image pixels. Raises
    one of engine.images.BROKEN_FILE_ERRORS for a broken file, and DataError for one over
    engine.images.MAX_PIXELS (a file replaced since the scan)."""
    width, height = read_header(str(path))          # displayed size, before any draft
    if width * height > MAX_PIXELS:
        raise DataError(f"{width}x{height} px is over the limit of {MAX_PIXELS} pixels")
    with open_image(str(path)) as im:
        im.draft("RGB", (size * 2, size * 2))       # JPEG: decode at a reduced scale
        thumb = upright_rgb(im, later_profile=True)
    icc = thumb.info.get("icc_profile")
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    thumb = srgb_of_part(thumb, icc)   # the profile, converted on the thumbnail's pixels
    sx, sy = thumb.width / width, thumb.height / height
    rect = (box[0] * sx, box[1] * sy, box[2] * sx - 1, box[3] * sy - 1)
    mask = Image.new("L", thumb.size, 150)          # how much of the shade covers a pixel
    ImageDraw.Draw(mask).rectangle(rect, fill=0)
    out = Image.composite(Image.new("RGB", thumb.size, (0, 0, 0)), thumb, mask)
    ImageDraw.Draw(out).rectangle(rect, outline=(255, 200, 0), width=max(1, round(size / 80)))
    return out


def placeholder_thumbnail(size: int = 160) -> Image.Image:
    """A plain grey square with a cross, shown in place of an image that cannot be read."""
    out = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(out)
    draw.line((0, 0, size - 1, size - 1), fill=(90, 90, 90), width=max(1, size // 40))
    draw.line((0, size - 1, size - 1, 0), fill=(90, 90, 90), width=max(1, size // 40))
    return out


def thumbnail_caption(im: PlannedImage) -> str:
    return (f"{im.rel} · {im.record.width}x{im.record.height} -> {bucket_name(im.bucket)} · "
            f"kept {im.kept:.0%}{' · upscaled' if im.scale > 1 else ''}"
            f"{f' · ×{im.repeats} per epoch' if im.repeats != 1 else ''}")


# --------------------------------------------------------------------------------------
# Training metrics
# --------------------------------------------------------------------------------------

def record_kind(record: dict) -> str:
    """'event', 'val' (a validation line), 'quality' (live quality figures: q_*), 'train'
    (a training metric line) or '' (other)."""
    if "event" in record:
        return "event"
    if "val_loss" in record:
        return "val"
    if "q_seconds" in record:
        return "quality"
    return "train" if "loss" in record else ""


def fold_records(records: Sequence[dict], new: Iterable[dict]) -> list[dict]:
    """`records` followed by `new`, read in order from the append-only metrics.jsonl.
    A training, validation or quality line whose step is not after the last one of its kind
    comes from a process resumed at an earlier checkpoint: the lines of that kind from
    its step on are stale (the steps after the checkpoint that the lost process
    trained) and are dropped, so the plots never go back. Events are kept as they are."""
    out = list(records)
    last: dict[str, float] = {}
    for r in out:
        kind = record_kind(r)
        if kind in ("train", "val", "quality") and isinstance(r.get("step"), (int, float)):
            last[kind] = r["step"]
    for r in new:
        kind, step = record_kind(r), r.get("step")
        if kind in ("train", "val", "quality") and isinstance(step, (int, float)):
            if kind in last and step <= last[kind]:
                out = [o for o in out if record_kind(o) != kind
                       or not isinstance(o.get("step"), (int, float)) or o["step"] < step]
            last[kind] = step
        out.append(r)
    return out


def split_records(records: Iterable[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(training metric lines, validation lines, event lines) of metrics.jsonl."""
    out: dict[str, list[dict]] = {"train": [], "val": [], "quality": [], "event": [], "": []}
    for r in records:
        out[record_kind(r)].append(r)
    return out["train"], out["val"], out["event"]


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (the TensorBoard slider): weight
    0 returns the values, 0.99 averages over about a hundred points. Missing values
    (None, NaN) pass through and do not disturb the average."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight {weight} outside [0, 1)")
    out, acc, n = [], 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(v)
            continue
        acc = acc * weight + (1 - weight) * v
        n += 1
        out.append(acc / (1 - weight ** n))
    return out


def thin(n: int, max_points: int = MAX_PLOT_POINTS) -> list[int]:
    """Indices of at most `max_points` evenly spread points, the last one always kept."""
    if n <= max_points:
        return list(range(n))
    stride = n / max_points
    idx = sorted({int(i * stride) for i in range(max_points)} | {n - 1})
    return idx


def series_frame(records: Sequence[dict], series: dict[str, str], smoothing: float = 0.0,
                 max_points: int = MAX_PLOT_POINTS) -> pd.DataFrame:
    """Long-format frame (step, value, series) of the keys of `series` (key -> label)
    present in the records, each smoothed, then thinned to `max_points` steps."""
    frames = []
    for key, label in series.items():
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        values = smooth([v for _, v in pts], smoothing) if smoothing else [v for _, v in pts]
        keep = thin(len(pts), max_points)
        frames.append(pd.DataFrame({"step": [pts[i][0] for i in keep],
                                    "value": [values[i] for i in keep],
                                    "series": label}))
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype="int64"),
                             "value": pd.Series(dtype="float64"),
                             "series": pd.Series(dtype="str")})
    return pd.concat(frames, ignore_index=True)


def loss_t_frame(record: dict | None) -> pd.DataFrame:
    """The latest loss by time bin: t from 0 (noise) to 1 (clean data), one bar per bin."""
    values = (record or {}).get("loss_t") or []
    rows = [{"t": f"{i / len(values):.1f}-{(i + 1) / len(values):.1f}", "loss": v}
            for i, v in enumerate(values) if v is not None]
    return pd.DataFrame(rows, columns=["t", "loss"])


EVENT_HEADERS = ["Step", "Time", "Event", "Message", "Files"]


def event_rows(events: Sequence[dict], limit: int = 200) -> list[list]:
    """Newest first: step, time, kind, message and the first files involved."""
    rows = []
    for e in reversed(events[-limit:]):
        files = e.get("files") or []
        rows.append([e.get("step", ""), fmt_time(e.get("time")), e.get("event", ""),
                     e.get("message", ""),
                     ", ".join(files[:3]) + (f" (+{len(files) - 3})" if len(files) > 3 else "")])
    return rows


def latest_numbers(train: Sequence[dict], val: Sequence[dict]) -> str:
    """One line: loss, LR, grad norm, throughput (with the share of the step time spent
    waiting for images, from 5 %), peak memory since training began and validation loss."""
    if not train:
        return "No metrics yet."
    r = train[-1]
    parts = [f"loss {fmt_loss(r.get('loss'))}", f"lr {r.get('lr', 0):.3g}",
             f"grad norm {fmt_loss(r.get('grad_norm'))}"
             + (f" (clipped {r['clip_fraction']:.0%} of steps)" if r.get("clip_fraction") else ""),
             f"{r.get('images_s', 0):.1f} img/s", f"{fmt_count(r.get('tokens_s'))} tokens/s",
             f"{r.get('step_s', 0):.2f} s/step"
             + (f" ({r['data_wait']:.0%} of it waiting for images)"
                if r.get("data_wait", 0) >= 0.05 else "")]
    if r.get("mem_mb"):   # 0 where the system does not say (the CPU on Windows)
        parts.append(f"peak memory {fmt_bytes(r['mem_mb'] * 2**20)}")
    if val:
        parts.append(f"validation {fmt_loss(val[-1]['val_loss'])} (step {val[-1]['step']})")
    if r.get("skipped_batches"):
        parts.append(f"{r['skipped_batches']} skipped batches")
    if r.get("bad_files"):
        parts.append(f"{r['bad_files']} unreadable files")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------
# Run state
# --------------------------------------------------------------------------------------

STATE_TEXT = {"starting": "Starting", "running": "Running", "stopping": "Stopping",
              "paused": "Paused", "stopped": "Stopped", "completed": "Completed",
              "failed": "Failed", "crashed": "Crashed", "none": "Not started"}


def progress_html(state: str, step: int, total: int, eta_s: float | None,
                  loss: float | None, note: str = "") -> str:
    """A progress bar with step, percentage, ETA and loss."""
    frac = min(1.0, step / total) if total else 0.0
    # completed short of the total: a resume's own target step, reached before the schedule's
    label = ("Reached the step asked for" if state == "completed" and step < total
             else STATE_TEXT.get(state, state))
    eta = f"ETA {format_duration(eta_s)}" if state in ACTIVE_STATES and eta_s is not None else ""
    info = " · ".join(x for x in (f"step {step:,} / {total:,}" if total else f"step {step:,}",
                                  f"{frac:.1%}", eta, f"loss {fmt_loss(loss)}"
                                  if loss is not None else "") if x)
    extra = f'<div class="phdm-note">{html.escape(note)}</div>' if note else ""
    return (f'<div class="phdm-progress phdm-{html.escape(state)}">'
            f'<div class="phdm-progress-head"><b>{html.escape(label)}</b>'
            f'<span>{html.escape(info)}</span></div>'
            f'<div class="phdm-bar"><div style="width:{frac * 100:.2f}%"></div></div>'
            f'{extra}</div>')


def resume_until_info(step: int, resume_to: int, finished: bool) -> str:
    """The explanation under the Train tab's 'Resume until step' field (`resume_to`: the
    step a resume without one trains to)."""
    if finished:
        return (f"the run reached its end at step {step:,}: give a later step to train on "
                f"(a cosine learning rate stays at its minimum)")
    end = f", step {resume_to:,}" if resume_to else ""
    return f"empty: to its end{end}; or stop at the step given"


def died_message(error: str, message: str, resumable: bool) -> str:
    """The Train tab's line for a crashed run: what killed it, and where a resume goes on
    from (`message`, the runner's: a checkpoint's step, or step 0 when none was saved) or
    why there is nothing to resume."""
    then = message or "no checkpoint with training state was saved"
    return (f"**The training process died:** {error.rstrip('.')}. "
            + (f"Press Resume ({then})." if resumable else f"{then[0].upper()}{then[1:]}."))


def control_states(state: str, resumable: bool) -> dict[str, bool]:
    """Which run buttons make sense in a state."""
    alive = state in ("starting", "running")
    return {"stop": alive, "pause": state == "running", "save": state == "running",
            "sample": state == "running", "force": state in ACTIVE_STATES,
            "resume": resumable and state in ("paused", "stopped", "completed", "failed",
                                              "crashed")}


# --------------------------------------------------------------------------------------
# Checkpoints and generation
# --------------------------------------------------------------------------------------

CHECKPOINT_HEADERS = ["Step", "Saved", "Size", "EMA", "Validation loss", "Kept", "Resumable",
                      "Sample"]


def val_loss_at(meta: dict, step: int) -> float | None:
    """A checkpoint's validation loss when it was measured at the checkpoint's own step
    (a checkpoint saved between validations, on request or at the end, records the last
    one, of an earlier step); a checkpoint that does not say (older versions) is taken at
    its word."""
    at = meta.get("val_step")
    return meta.get("val_loss") if at is None or at == step else None


def fmt_checkpoint_val(meta: dict, step: int) -> str:
    """The Validation loss cell: the loss, with the step it was measured at when that is
    not the checkpoint's."""
    at = meta.get("val_step")
    if meta.get("val_loss") is None or at is None or at == step:
        return fmt_loss(meta.get("val_loss"))
    return f"{fmt_loss(meta['val_loss'])} (at step {at})"


def checkpoint_row(step: int, saved: float, size: int, meta: dict, pinned: bool,
                   resumable: bool, has_sample: bool, damage: str = "") -> list:
    return [step, fmt_time(saved), fmt_bytes(size), "yes" if meta.get("has_ema") else "no",
            fmt_checkpoint_val(meta, step), "pinned" if pinned else "",
            f"no: {damage}" if damage else "yes" if resumable else "weights only",
            "yes" if has_sample else ""]


def md(text: object) -> str:
    """Text (an error message) as Markdown shows it literally: backslashes outside `code`
    spans doubled, so that a Windows path such as C:\\Users\\me\\.cache keeps them (Markdown
    reads a backslash before punctuation as an escape and drops it)."""
    parts = str(text).split("`")
    return "`".join(p if i % 2 else p.replace("\\", "\\\\") for i, p in enumerate(parts))


def first_words(text: str, limit: int = 60) -> str:
    """A description shortened for a table cell: its first clause, at most `limit`
    characters (the preset's description is a paragraph)."""
    head = re.split(r"[.:;]\s", text.strip(), maxsplit=1)[0]
    return head if len(head) <= limit else head[:limit - 1].rstrip() + "…"


def download_links(paths: Sequence[Path]) -> str:
    """HTML links that download files the server serves (the workspace), relative to the
    page so that they work behind a proxy's path too. The path is not resolved: on Windows
    that turns a mapped drive into a UNC path, which the server does not serve."""
    if not paths:
        return ""
    items = "".join(
        f'<li><a href="gradio_api/file={urllib.parse.quote(os.path.abspath(p))}" '
        f'download="{html.escape(p.name)}">{html.escape(p.name)}</a> '
        f'({fmt_bytes(p.stat().st_size)})</li>' for p in paths)
    return f"<p>Download:</p><ul>{items}</ul>"


def retention_preview(steps: Sequence[int], keep_last: int, pinned: Iterable[int]) -> list[int]:
    """Steps that engine.checkpoint.apply_retention deletes at the next save: its rule
    (engine.checkpoint.retention_victims) applied with that save's newer step added."""
    steps = sorted(steps)
    after = (steps[-1] + 1) if steps else 1
    return [s for s in retention_victims([*steps, after], keep_last, set(pinned)) if s != after]


def size_choices(cfg: config.RunConfig, trained: dict[str, int] | None = None
                 ) -> list[tuple[str, str]]:
    """(label, 'WxH') choices: the sizes the run trained at first, most images first and
    labelled with their count, then the model's other bucket sizes (engine.buckets.
    make_buckets with its data settings), smallest first."""
    d = cfg.data
    trained = trained or {}
    first = [(f"{k} · trained, {n} image{'' if n == 1 else 's'}", k)
             for k, n in sorted(trained.items(), key=lambda kv: (-kv[1], kv[0]))]
    rest = [(bucket_name(b), bucket_name(b)) for b in make_buckets(
        d.min_side, d.max_side, d.bucket_step, cfg.model.patch_size, d.max_aspect)
        if bucket_name(b) not in trained]
    return first + rest
