"""The Train tab's New-run form as text: its common settings, the override merge that
runs in the browser, the cost estimate and the dry run's result line.

Plain functions of plain values, so the tests check them without a browser.
"""

from __future__ import annotations

import torch

from engine import config, preflight
from studio import views

# the form's common settings: (key, label, kind)
FORM = (("train.max_steps", "Max steps", int), ("train.batch_size", "Batch size", int),
        ("train.lr", "Learning rate", float), ("train.warmup_steps", "Warm-up steps", int),
        ("train.save_every", "Save every", int), ("train.sample_every", "Sample every", int))
# Applies a patch, a list of [key, "key=value" line or null], to the override text in the
# browser, the way views.set_override does: the line replaces every line of its key (or is
# added at the end), null removes them; a patch that changes nothing leaves the text as it
# is. Done there because the text is read when the patch arrives: a patch computed from a
# copy of the text taken earlier would undo what was typed meanwhile.
MERGE_OVERRIDES_JS = """(patch, text) => {
  const original = (text || "").split(/\\r?\\n/);
  let lines = original;
  for (const [key, line] of (patch || [])) {
    const out = [];
    let placed = false;
    for (const ln of lines) {
      if (ln.split("=")[0].trim() === key) {
        if (line !== null && !placed) { out.push(line); placed = true; }
        continue;
      }
      out.push(ln);
    }
    if (line !== null && !placed) out.push(line);
    lines = out;
  }
  if (lines.join("\\n") === original.join("\\n")) return text;
  return lines.join("\\n").replace(/^\\n+|\\n+$/g, "");
}"""


def estimate_markdown(cfg: config.RunConfig, gpus: int) -> str:
    """The New-run form's cost line: sizes, FLOPs and the memory of a step on the device
    this machine trains on (its GPUs, or its own memory on the CPU)."""
    cpu = not torch.cuda.is_available()
    est = preflight.estimate(cfg, gpus, device="cpu" if cpu else "cuda")
    mem = est["memory_gib"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in mem.items()
                      if k != "total" and v > 0.005)
    w, h = est["bucket"]
    return (f"**{views.fmt_count(est['parameters'])}** trained parameters"
            + (f" (+{views.fmt_count(est['frozen_parameters'])} frozen text encoder)"
               if est["frozen_parameters"] else "")
            + f" · largest bucket {w}x{h} = **{est['image_tokens']}** image tokens"
            f" · {est['gflops_per_image']:.2f} GFLOPs per image forward"
            f"\n\n{'Memory on this CPU' if cpu else 'Memory per GPU'} about "
            f"**{mem['total']:.2f} GiB** ({parts} GiB)"
            + (f": {est['fits']}." if est["fits"] else ".")
            + (f"\n\n**Warning:** {warning}." if (warning := cpu_warning_here(cfg)) else ""))


def cpu_warning_here(cfg: config.RunConfig) -> str:
    """preflight.cpu_warning for this machine: '' when it trains on a GPU."""
    return "" if torch.cuda.is_available() else preflight.cpu_warning(cfg, "cpu")


def dry_run_markdown(res: dict) -> str:
    peak = views.fmt_bytes(res["peak_memory_mib"] * 2 ** 20)
    what = "process memory" if res.get("peak_is_process_rss") else "peak GPU memory"
    w, h = res["bucket"]
    return (f"Dry run on **{res['device']}** at {w}x{h}, batch {res['batch_size']}: "
            f"**{res['seconds_per_step']:.3f} s/step**, {res['images_s']:.1f} images/s"
            + (f", {what} {peak}." if res["peak_memory_mib"] > 0 else "."))


def warm_up(preset_name: str) -> None:
    """Make one estimate now: the first one builds a model on the meta device, which
    imports torch's compiler stack (seconds; tens of seconds on a busy machine, holding up
    the other handlers meanwhile). At start-up nobody waits for it."""
    try:
        estimate_markdown(config.load_preset(preset_name), 1)
    except (config.ConfigError, RuntimeError, ValueError, OSError):
        pass
