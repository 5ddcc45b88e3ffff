"""The Checkpoints tab: every run with its checkpoints (step, time, size, EMA, validation
loss, live quality figures, sample grid, pinned), the best one by a chosen figure, disk
usage and the retention rule, and what to do with a checkpoint: generate with it, resume
its run, export an inference file, pin it so retention keeps it, or delete it (or the
whole run) after a confirmation.

Runs and checkpoints are chosen by name and step; the studio's workspace layer
(studio.workspace.Studio) finds the files behind them and does the work, this tab wires
it to the page.
"""

from __future__ import annotations

import gradio as gr

from engine import config
from engine.checkpoint import CheckpointError, list_checkpoints, read_modelspec
from engine.distributed import PRECISIONS
from studio import quality, views
from studio.paths import PathError
from studio.runner import RunnerError
from studio.workspace import Studio, folder_size, format_run_checkpoint

RUN_HEADERS = ["Run", "State", "Step", "Checkpoints", "Disk", "Created", "Dataset",
               "Description"]
BEST_DEFAULT = "validation loss"


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
            best_by = gr.Dropdown(list(quality.BEST_BY), value=BEST_DEFAULT, label="Best by",
                                  elem_id="best-by", scale=2)
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
        with gr.Row():
            generate_btn = gr.Button("Generate with this", variant="primary")
            resume_btn = gr.Button("Resume this run")
            train_btn = gr.Button("Train from this",
                                  elem_id="train-from-checkpoint")
            pin_btn = gr.Button("Pin / unpin (retention keeps pinned)")
        message = gr.Markdown(elem_classes="phdm-status", elem_id="checkpoint-message")
        ckpt_df = gr.Dataframe(headers=quality.CHECKPOINT_HEADERS, label="Checkpoints of the run",
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
            # the files themselves, to download from a browser on another machine: links
            # to the workspace files the server already serves (a gr.File would copy each
            # model into Gradio's cache at every refresh)
            models_files = gr.HTML(elem_id="exported-files")
        with gr.Accordion("Delete", open=False):
            gr.Markdown("Deleting cannot be undone. A run that is training cannot be deleted.",
                        elem_classes="phdm-help")
            with gr.Row():
                confirm = gr.Checkbox(label="Yes, delete what I click next", value=False)
                delete_ckpt = gr.Button("Delete this checkpoint", variant="stop")
                delete_run = gr.Button("Delete the whole run", variant="stop")
            # what a delete did, beside its buttons (the tab's message is far above them)
            delete_message = gr.Markdown(elem_id="delete-message")
        checkpoint_id = gr.State("")
        picked = gr.State(False)   # the user chose the run: keep it; else show the newest

    # ---- reading -----------------------------------------------------------------------
    def run_rows():
        rows = []
        for r in studio.runner.runs():
            n = len(list_checkpoints(r.path / "checkpoints"))
            rows.append([r.run_id, views.STATE_TEXT.get(r.state, r.state), r.step, n,
                         views.fmt_bytes(folder_size(r.path)), views.fmt_time(r.created),
                         r.dataset, views.first_words(r.description)])
        return rows

    def model_rows():
        return [[p.name, spec.get("title", ""), views.fmt_bytes(p.stat().st_size),
                 f"{meta.get('run_id', '')} {meta.get('exported_from', '')}".strip(),
                 meta.get("exported_weights", ""), meta.get("exported_dtype", "")]
                for p, meta, spec in studio.exported_models()]

    def model_files() -> str:
        return views.download_links([p for p, _, _ in studio.exported_models()])

    def refresh_all(run_id=None, keep=True, by=BEST_DEFAULT) -> dict:
        runs = studio.runner.runs()
        ids = [r.run_id for r in runs]
        run_id = run_id if keep and run_id in ids else (ids[0] if ids else None)
        return {runs_df: run_rows(), run: gr.Dropdown(choices=ids, value=run_id),
                models_df: model_rows(), models_files: model_files(),
                **show_run(run_id, None, by)}

    def show_run(run_id, step=None, by=BEST_DEFAULT, pick=False) -> dict:
        """The chosen run's checkpoint list, table (the best by `by` marked; chosen when
        `pick`), retention text, sample grids, and the chosen checkpoint's id and default
        export name."""
        empty = {ckpt: gr.Dropdown(choices=[], value=None), ckpt_df: [], samples: [],
                 checkpoint_id: "", export_name: ""}
        if not run_id:
            return {**empty, retention: "No runs yet."}
        try:
            info = studio.runner.info(run_id)
            entries = studio.run_checkpoints(run_id)
            records = views.fold_records([], studio.runner.metrics(run_id, 0)[0])
        except RunnerError as e:
            return {**empty, retention: str(e)}
        figures = quality.figures_by_step(records)
        best = quality.best_checkpoint([c.step for c in entries], [c.meta for c in entries],
                                       figures, by if by in quality.BEST_BY else BEST_DEFAULT)
        rows = [quality.checkpoint_row(
            views.checkpoint_row(c.step, c.saved, c.size, c.meta, c.pinned, c.resumable,
                                 c.sample is not None, c.damage), figures.get(c.step, {}),
            c.step == best)
            for c in reversed(entries)]
        gallery = [(str(c.sample), f"step {c.step}") for c in reversed(entries) if c.sample]
        steps = [c.step for c in entries]
        pinned = {c.step for c in entries if c.pinned}
        step = (best if pick and best is not None else step if step in steps
                else (steps[-1] if steps else None))
        choices = [(f"step {s}" + (" (pinned)" if s in pinned else ""), s) for s in reversed(steps)]
        by_label = by if by in quality.BEST_BY else BEST_DEFAULT
        note = quality.no_best_note(by_label) + "\n\n" if best is None and entries else ""
        return {ckpt: gr.Dropdown(choices=choices, value=step), ckpt_df: rows,
                retention: note + retention_markdown(info, steps, pinned, records),
                samples: gallery, **chosen(run_id, step)}

    def chosen(run_id, step) -> dict:
        """The checkpoint id and default export name of the chosen run and step."""
        if not run_id or step is None:
            return {checkpoint_id: "", export_name: ""}
        return {checkpoint_id: format_run_checkpoint(run_id, step),
                export_name: f"{run_id}-step{step}"}

    def retention_markdown(info, steps, pinned, records) -> str:
        try:
            keep_last = config.load_preset(info.path / "config.yaml").train.keep_last
        except config.ConfigError:
            return ""
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
    def toggle_pin(run_id, step, by=BEST_DEFAULT) -> dict:
        if not run_id or step is None:
            return {message: "Choose a checkpoint first.", **show_run(run_id, step, by)}
        try:
            pinned = studio.toggle_pin(run_id, step)
        except (RunnerError, OSError) as e:
            return {message: str(e), **show_run(run_id, step, by)}
        return {message: f"Step {step} {'pinned' if pinned else 'unpinned'}.",
                **show_run(run_id, step, by)}

    def export(run_id, step, name, dtype, ema, title="") -> dict:
        if not run_id or step is None:
            return {message: "Choose a checkpoint first."}
        try:
            dst = studio.export(format_run_checkpoint(run_id, step), name, dtype, ema, title)
        except (PathError, RunnerError, CheckpointError, OSError, TypeError, ValueError) as e:
            return {message: f"**Not exported:** {views.md(e)}"}
        return {message: f"Exported `{dst.name}` ({views.fmt_bytes(dst.stat().st_size)}), "
                         f"titled \"{read_modelspec(dst).get('title', '')}\".",
                models_df: model_rows(), models_files: model_files()}

    def remove_checkpoint(run_id, step, sure, by=BEST_DEFAULT) -> dict:
        if not sure:
            return {delete_message: "Tick the confirmation box first."}
        try:
            studio.delete_checkpoint(run_id, step)
        except (RunnerError, CheckpointError, OSError, TypeError, ValueError) as e:
            return {delete_message: f"**Not deleted:** {views.md(e)}"}
        return {delete_message: f"Deleted step {step} of `{run_id}`.", confirm: False,
                **show_run(run_id, None, by)}

    def remove_run(run_id, sure, by=BEST_DEFAULT) -> dict:
        if not sure:
            return {delete_message: "Tick the confirmation box first."}
        try:
            studio.runner.delete_run(run_id)
        except RunnerError as e:
            return {delete_message: f"**Not deleted:** {views.md(e)}"}
        return {delete_message: f"Deleted run `{run_id}`.", confirm: False,
                **refresh_all(None, True, by)}

    show_outputs = [ckpt, ckpt_df, retention, samples, checkpoint_id, export_name]
    refresh_outputs = [runs_df, run, models_df, models_files, *show_outputs]
    refresh.click(refresh_all, inputs=[run, picked, best_by], outputs=refresh_outputs)
    run.input(lambda r, by: show_run(r, None, by), inputs=[run, best_by],
              outputs=show_outputs).then(lambda: True, outputs=picked)
    best_by.input(lambda r, by: show_run(r, None, by, pick=True), inputs=[run, best_by],
                  outputs=show_outputs)
    ckpt.input(chosen, inputs=[run, ckpt], outputs=[checkpoint_id, export_name])
    pin_btn.click(toggle_pin, inputs=[run, ckpt, best_by], outputs=[message, *show_outputs])
    export_btn.click(export, inputs=[run, ckpt, export_name, export_dtype, export_ema,
                                     export_title],
                     outputs=[message, models_df, models_files], concurrency_limit=1)
    delete_ckpt.click(remove_checkpoint, inputs=[run, ckpt, confirm, best_by],
                      outputs=[delete_message, confirm, *show_outputs])
    delete_run.click(remove_run, inputs=[run, confirm, best_by],
                     outputs=[delete_message, confirm, *refresh_outputs])
    return {"generate_btn": generate_btn, "resume_btn": resume_btn, "train_btn": train_btn,
            "run": run,
            "message": message, "checkpoint_id": checkpoint_id, "refresh_fn": refresh_all,
            "refresh_inputs": [run, picked, best_by], "refresh_outputs": refresh_outputs}
