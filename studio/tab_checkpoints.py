"""The Checkpoints tab: every run with its checkpoints (step, time, size, EMA, validation
loss, sample grid, pinned), disk usage and the retention rule, and what to do with a
checkpoint: generate with it, resume its run, export an inference file, pin it so
retention keeps it, or delete it (or the whole run) after a confirmation.

Runs and checkpoints are chosen by name and step; the files behind them are found in
the workspace by the studio, never taken from the browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from engine import config
from engine.checkpoint import (
    CheckpointError,
    export_inference,
    list_checkpoints,
    pinned_steps,
    read_meta,
    read_modelspec,
    step_name,
)
from engine.model import PRECISIONS
from studio import views
from studio.paths import PathError, safe_name
from studio.runner import RunnerError

if TYPE_CHECKING:
    from studio.ui import Studio

RUN_HEADERS = ["Run", "State", "Step", "Checkpoints", "Disk", "Created", "Description"]


def folder_size(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def write_pins(ckpt_dir: Path, steps: set[int]) -> None:
    """keep.txt: the pinned steps, one per line (engine.checkpoint reads it)."""
    config.atomic_write_text(Path(ckpt_dir) / "keep.txt",
                             "".join(f"{s}\n" for s in sorted(steps)))


def best_val_step(records: list[dict]) -> int | None:
    vals = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    return min(vals, key=lambda r: r["val_loss"])["step"] if vals else None


def build(studio: Studio) -> dict:
    with gr.Tab("Checkpoints", id="checkpoints"):
        runs_df = gr.Dataframe(headers=RUN_HEADERS, label="Runs", interactive=False,
                               max_height=240, wrap=True,
                               column_widths=["24%", "9%", "8%", "11%", "9%", "14%", "25%"])
        with gr.Row(equal_height=True):
            run = gr.Dropdown([], label="Run", scale=3)
            ckpt = gr.Dropdown([], label="Checkpoint", scale=3)
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
        with gr.Row():
            generate_btn = gr.Button("Generate with this", variant="primary")
            resume_btn = gr.Button("Resume this run")
            train_btn = gr.Button("Train from this",
                                  elem_id="train-from-checkpoint")
            pin_btn = gr.Button("Pin / unpin (retention keeps pinned)")
        message = gr.Markdown(elem_classes="phdm-status", elem_id="checkpoint-message")
        ckpt_df = gr.Dataframe(headers=views.CHECKPOINT_HEADERS, label="Checkpoints of the run",
                               interactive=False, max_height=260, elem_id="checkpoint-table")
        retention = gr.Markdown(elem_classes="phdm-help")
        samples = gr.Gallery(label="Sample grid at each checkpoint", columns=4, height=260,
                             object_fit="contain", allow_preview=True, fit_columns=False,
                             elem_classes="phdm-pixels")
        with gr.Accordion("Export an inference file", open=False):
            gr.Markdown("One set of weights (EMA when the checkpoint has them) with the run's "
                        "config in the metadata, written to `workspace/models/`. The file "
                        "holds no paths of this machine (dataset, caches, a local text encoder "
                        "keeps only its folder name) and carries `modelspec.*` keys (title, "
                        "architecture, resolution, date) that other tools show.",
                        elem_classes="phdm-help")
            with gr.Row():
                export_name = gr.Textbox(label="File name (letters, digits, - _ .)", scale=3)
                export_title = gr.Textbox(label="Title", scale=3, elem_id="export-title",
                                          placeholder="default: the run and step")
                export_dtype = gr.Radio(list(PRECISIONS), value="bf16", label="Precision", scale=2)
                export_ema = gr.Checkbox(value=True, label="EMA weights", scale=1)
                export_btn = gr.Button("Export", scale=1)
            models_df = gr.Dataframe(headers=["File", "Title", "Size", "From", "Weights",
                                              "Precision"],
                                     label="Exported models", interactive=False, max_height=200)
        with gr.Accordion("Delete", open=False):
            gr.Markdown("Deleting cannot be undone. A run that is training cannot be deleted.",
                        elem_classes="phdm-help")
            with gr.Row():
                confirm = gr.Checkbox(label="Yes, delete what I click next", value=False)
                delete_ckpt = gr.Button("Delete this checkpoint", variant="stop")
                delete_run = gr.Button("Delete the whole run", variant="stop")
        checkpoint_id = gr.State("")
        picked = gr.State(False)   # the user chose the run: keep it; else show the newest

    # ---- reading -----------------------------------------------------------------------
    def run_rows():
        rows = []
        for r in studio.runner.runs():
            n = len(list_checkpoints(r.path / "checkpoints"))
            rows.append([r.run_id, views.STATE_TEXT.get(r.state, r.state), r.step, n,
                         views.fmt_bytes(folder_size(r.path)), views.fmt_time(r.created),
                         r.description])
        return rows

    def model_rows():
        rows = []
        for p in sorted(studio.models_dir.glob("*.safetensors")):
            try:
                meta = read_meta(p)
            except CheckpointError:
                continue
            rows.append([p.name, read_modelspec(p).get("title", ""),
                         views.fmt_bytes(p.stat().st_size),
                         f"{meta.get('run_id', '')} {meta.get('exported_from', '')}".strip(),
                         meta.get("exported_weights", ""), meta.get("exported_dtype", "")])
        return rows

    def refresh_all(run_id=None, keep=True):
        runs = studio.runner.runs()
        ids = [r.run_id for r in runs]
        run_id = run_id if keep and run_id in ids else (ids[0] if ids else None)
        return (run_rows(), gr.Dropdown(choices=ids, value=run_id), model_rows(),
                *show_run(run_id))

    def show_run(run_id, step=None):
        """checkpoint dropdown, table, retention text, samples, checkpoint id, export name."""
        if not run_id:
            return (gr.Dropdown(choices=[], value=None), [], "No runs yet.", [], "", "")
        try:
            info = studio.runner.info(run_id)
        except RunnerError as e:
            return (gr.Dropdown(choices=[], value=None), [], str(e), [], "", "")
        folder = info.path / "checkpoints"
        infos = list_checkpoints(folder)
        pinned = pinned_steps(folder)
        rows, gallery = [], []
        for c in reversed(infos):
            try:
                meta = read_meta(c.path)
            except CheckpointError:
                meta = {}
            sample = info.path / "samples" / f"{step_name(c.step)}.png"
            rows.append(views.checkpoint_row(c.step, c.mtime, c.size, meta, c.step in pinned,
                                             c.state_path is not None, sample.is_file()))
            if sample.is_file():
                gallery.append((str(sample), f"step {c.step}"))
        steps = [c.step for c in infos]
        step = step if step in steps else (steps[-1] if steps else None)
        retention_text = retention_markdown(info, steps, pinned)
        cid = f"run/{run_id}/{step}" if step is not None else ""
        choices = [(f"step {s}" + (" (pinned)" if s in pinned else ""), s) for s in reversed(steps)]
        return (gr.Dropdown(choices=choices, value=step), rows, retention_text, gallery, cid,
                f"{run_id}-step{step}" if step is not None else "")

    def retention_markdown(info, steps, pinned) -> str:
        try:
            keep_last = config.load_preset(info.path / "config.yaml").train.keep_last
        except config.ConfigError:
            return ""
        records, _ = studio.runner.metrics(info.run_id, 0)
        best = best_val_step(records)
        gone = views.retention_preview(steps, keep_last, pinned | ({best} if best else set()))
        total = sum(c.size for c in list_checkpoints(info.path / "checkpoints"))
        text = (f"Retention (train.keep_last = {keep_last}): the newest {keep_last} checkpoints "
                f"stay, pinned ones and the best validation step are never deleted. "
                f"Checkpoints use {views.fmt_bytes(total)}.")
        if gone and info.alive:
            text += " The next save removes step " + ", ".join(map(str, gone)) + "."
        return text

    # ---- actions -----------------------------------------------------------------------
    def toggle_pin(run_id, step):
        if not run_id or step is None:
            return "Choose a checkpoint first.", *show_run(run_id, step)
        try:
            folder = studio.runner.info(run_id).path / "checkpoints"
        except RunnerError as e:
            return str(e), *show_run(run_id, step)
        pins = pinned_steps(folder)
        pins ^= {int(step)}
        write_pins(folder, pins)
        state = "pinned" if int(step) in pins else "unpinned"
        return f"Step {step} {state}.", *show_run(run_id, step)

    def export(run_id, step, name, dtype, ema, title=""):
        if not run_id or step is None:
            return "Choose a checkpoint first.", gr.skip()
        try:
            src = studio.checkpoint_path(f"run/{run_id}/{step}")
            fname = safe_name(name)
            if not fname.endswith(".safetensors"):
                fname += ".safetensors"
            dst = studio.models_dir / fname
            if dst.exists():
                return f"**{fname} already exists** in workspace/models: choose another name.", \
                    gr.skip()
            export_inference(src, dst, PRECISIONS[dtype], ema=ema,
                             title=title if isinstance(title, str) else "")
        except (PathError, RunnerError, CheckpointError, OSError) as e:
            return f"**Not exported:** {e}", gr.skip()
        return (f"Exported `{dst.name}` ({views.fmt_bytes(dst.stat().st_size)}), titled "
                f"\"{read_modelspec(dst).get('title', '')}\".", model_rows())

    def remove_checkpoint(run_id, step, sure):
        if not sure:
            return "Tick the confirmation box first.", gr.skip(), *[gr.skip()] * 6
        try:
            info = studio.runner.info(run_id)
            if info.alive:
                raise RunnerError(f"run '{run_id}' is {info.state}: stop it before deleting "
                                  f"its checkpoints")
            base = info.path / "checkpoints" / step_name(int(step))
            for p in (base.with_suffix(".safetensors"),
                      base.with_name(base.name + ".state.safetensors")):
                p.unlink(missing_ok=True)
            folder = info.path / "checkpoints"
            write_pins(folder, pinned_steps(folder) - {int(step)})
        except (RunnerError, OSError, TypeError, ValueError) as e:
            return f"**Not deleted:** {e}", gr.skip(), *[gr.skip()] * 6
        return f"Deleted step {step} of `{run_id}`.", False, *show_run(run_id)

    def remove_run(run_id, sure):
        if not sure:
            return "Tick the confirmation box first.", gr.skip(), *[gr.skip()] * 9
        try:
            studio.runner.delete_run(run_id)
        except RunnerError as e:
            return f"**Not deleted:** {e}", gr.skip(), *[gr.skip()] * 9
        return f"Deleted run `{run_id}`.", False, *refresh_all()

    show_outputs = [ckpt, ckpt_df, retention, samples, checkpoint_id, export_name]
    refresh_outputs = [runs_df, run, models_df, *show_outputs]
    refresh.click(refresh_all, inputs=[run, picked], outputs=refresh_outputs)
    run.input(show_run, inputs=run, outputs=show_outputs).then(lambda: True, outputs=picked)
    ckpt.input(lambda r, s: (f"run/{r}/{s}" if r and s is not None else "",
                             f"{r}-step{s}" if r and s is not None else ""),
               inputs=[run, ckpt], outputs=[checkpoint_id, export_name])
    pin_btn.click(toggle_pin, inputs=[run, ckpt], outputs=[message, *show_outputs])
    export_btn.click(export, inputs=[run, ckpt, export_name, export_dtype, export_ema,
                                     export_title],
                     outputs=[message, models_df], concurrency_limit=1)
    delete_ckpt.click(remove_checkpoint, inputs=[run, ckpt, confirm],
                      outputs=[message, confirm, *show_outputs])
    delete_run.click(remove_run, inputs=[run, confirm],
                     outputs=[message, confirm, *refresh_outputs])
    return {"generate_btn": generate_btn, "resume_btn": resume_btn, "train_btn": train_btn,
            "run": run,
            "message": message, "checkpoint_id": checkpoint_id, "refresh_fn": refresh_all,
            "refresh_inputs": [run, picked], "refresh_outputs": refresh_outputs}
