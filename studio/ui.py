"""The studio page: a header, a first-start demo banner and four tabs (Dataset, Train,
Checkpoints, Generate). Each tab lives in its own module and shares one
studio.workspace.Studio; this one builds it, puts the tabs together and wires the few
events that cross tabs.

The browser addresses datasets, runs and checkpoints by name; the only paths it may
type are checked by studio.paths.resolve_inside against the workspace and the folders
given with --allow-dir, and every file it is shown comes from those folders.
"""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

import gradio as gr

import engine
from engine import config
from engine.checkpoint import CheckpointError
from engine.distributed import DeviceError
from engine.generate_io import checkpoint_config
from studio import tab_checkpoints, tab_dataset, tab_generate, tab_train
from studio.paths import PathError
from studio.runner import RunnerError
from studio.workspace import Studio, init_overrides

CSS = """
.phdm-header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
.phdm-header h2 { margin: 0; font-size: 1.5em; }
.phdm-header span { color: var(--body-text-color-subdued); font-size: 0.9em; }
.phdm-help p { color: var(--body-text-color-subdued); font-size: 0.92em; margin: 0; }
.phdm-status p { margin: 0.2em 0; }
.phdm-banner { border: 1px solid var(--color-accent); border-radius: 8px;
               padding: 10px 16px; background: var(--color-accent-soft); }
.phdm-progress { border: 1px solid var(--border-color-primary); border-radius: 8px;
                 padding: 10px 14px; }
.phdm-progress-head { display: flex; justify-content: space-between; gap: 12px;
                      flex-wrap: wrap; margin-bottom: 6px; }
.phdm-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.phdm-bar > div { height: 100%; background: var(--color-accent); transition: width 0.6s; }
.phdm-completed .phdm-bar > div { background: #16a34a; }
.phdm-crashed .phdm-bar > div, .phdm-failed .phdm-bar > div { background: #dc2626; }
.phdm-paused .phdm-bar > div, .phdm-stopped .phdm-bar > div { background: #9ca3af; }
.phdm-note { margin-top: 6px; font-size: 0.9em; color: var(--body-text-color-subdued); }
.phdm-log { max-height: 320px; overflow: auto; display: flex; flex-direction: column-reverse;
            border: 1px solid var(--border-color-primary); border-radius: 8px; }
.phdm-log pre { margin: 0; padding: 8px 12px; font-size: 0.8em; white-space: pre-wrap; }
.phdm-pixels img { object-fit: contain !important; image-rendering: pixelated; }
/* sliders side by side: label and explanation above the number box, so that a long label
   is never squeezed into a narrow column beside it */
.phdm-options .head { flex-direction: column; align-items: flex-start; gap: 4px; }
"""

def banner_markdown() -> str:
    return ("**New here?** One click creates a small built-in dataset of coloured shapes "
            "(`datasets/demo-shapes`), starts the `tiny-cpu` preset on it (it trains on a CPU "
            "in about ten minutes, at 32 px) and opens the Train "
            "tab. When the first checkpoint appears, generate "
            "from it in the Generate tab.")


# Gradio copies every image a page shows (sample grids, previews, results, uploads) into its
# cache folder and by default never removes them: a studio left running for weeks of sample
# grids filled it without bound. Every hour the copies older than a day go, and all of this
# studio's copies when it stops; the originals in the workspace are not touched.
CACHE_CLEANUP = (3600, 86400)   # (every N seconds, copies older than M seconds)


def build_ui(workspace: Path, allow_dirs: list[Path] = ()) -> gr.Blocks:
    """The studio as a Blocks app; the caller launches it."""
    studio = Studio(workspace, allow_dirs)
    with gr.Blocks(title="PixelHDM Studio", delete_cache=CACHE_CLEANUP) as demo:
        gr.HTML(f'<div class="phdm-header"><h2>PixelHDM Studio</h2><span>Engine '
                f'{engine.__version__} · workspace {html.escape(str(studio.workspace))}'
                f'</span></div>', head=f"<style>{CSS}</style>")
        with gr.Row(visible=False, elem_classes="phdm-banner") as banner:
            gr.Markdown(banner_markdown())
            demo_btn = gr.Button("Start the demo", variant="primary", scale=0, min_width=180)
        banner_msg = gr.Markdown()
        selection = gr.State({})
        with gr.Tabs(selected="dataset") as tabs:
            ds = tab_dataset.build(studio, selection)
            tr = tab_train.build(studio, selection)
            ck = tab_checkpoints.build(studio)
            gen = tab_generate.build(studio)

        # ---- first start ---------------------------------------------------------------
        def show_banner():
            return gr.Row(visible=not studio.runner.runs())

        def start_demo(request: gr.Request):
            preset_name = tab_dataset.DEFAULT_PRESET
            try:
                if (not tab_dataset.create_demo(studio)
                        and (warning := tab_dataset.old_demo_warning(studio)) is not None):
                    gr.Warning(warning)
                cfg = replace(studio.run_config(preset_name,
                                                "\n".join(tab_dataset.DEMO_OVERRIDES),
                                                tab_dataset.DEMO_NAME),
                              description=tab_dataset.DEMO_DESCRIPTION)
                run = studio.runner.start(cfg, studio.runner.new_run_id(preset_name))
            except (tab_dataset.DemoBusy, OSError, config.ConfigError, PathError, RunnerError,
                    DeviceError) as e:
                return {banner_msg: f"**The demo did not start:** {e}",
                        ds["choice"]: gr.Dropdown(choices=studio.dataset_names())}
            return {banner_msg: "", banner: gr.Row(visible=False),
                    tabs: gr.Tabs(selected="train"),
                    tr["run_select"]: tr["select_update"](run.run_id),
                    tr["watch"]: tr["watch_run"](run.run_id, request),
                    tr["setup_box"]: gr.Accordion(open=False), **tr["monitor_shown"](),
                    ds["choice"]: gr.Dropdown(choices=studio.dataset_names(),
                                              value=tab_dataset.DEMO_NAME)}

        tr["started"].then(show_banner, outputs=banner)
        # the banner shows once the page has attached to a run, so that the answer of the
        # attaching, which found no run, cannot arrive after a demo's start and replace it
        demo.load(tr["attach"], outputs=[tr["run_select"], tr["watch"], tr["setup_box"]]
                  ).then(show_banner, outputs=banner)
        demo.load(tr["preset_description"], inputs=tr["preset"], outputs=tr["preset_info"]
                  ).then(**tr["check_args"])
        demo_btn.click(start_demo, outputs=[banner_msg, banner, tabs, tr["run_select"],
                                            tr["watch"], tr["setup_box"], tr["monitor"],
                                            tr["no_run"], ds["choice"]],
                       concurrency_limit=1).then(**ds["plan_args"])

        # ---- cross-tab actions ---------------------------------------------------------
        def generate_with(cid):
            if not cid:
                return {ck["message"]: "Choose a checkpoint first."}
            return {gen["checkpoint"]: gen["select"](cid), tabs: gr.Tabs(selected="generate")}

        ck["generate_btn"].click(
            generate_with, inputs=ck["checkpoint_id"],
            outputs=[ck["message"], gen["checkpoint"], tabs], **gen["model_queue"]
        ).then(**gen["model_args"])

        def resume_from_checkpoints(run_id, request: gr.Request):
            try:
                studio.runner.resume(run_id)   # on its launch's device and GPUs
            except (RunnerError, DeviceError) as e:
                return {ck["message"]: f"**Not resumed:** {e}"}
            return {ck["message"]: f"Resuming `{run_id}`.",
                    tr["run_select"]: tr["select_update"](run_id),
                    tr["watch"]: tr["watch_run"](run_id, request), tabs: gr.Tabs(selected="train")}

        def train_from(cid):
            """A new run from the checkpoint's weights: the Train tab's set-up with the
            nearest preset, the lines that keep the checkpoint's network and the
            checkpoint's own dataset (a list entry, else its folder) when it is still there."""
            if not cid:
                return {ck["message"]: "Choose a checkpoint first."}
            try:
                _, source, _ = checkpoint_config(studio.checkpoint_path(cid))
            except (PathError, RunnerError, CheckpointError) as e:
                return {ck["message"]: f"**Cannot train from it:** {e}"}
            preset_name, text = init_overrides(source, cid)
            out = {tr["preset"]: gr.Dropdown(value=preset_name), tr["overrides"]: text,
                   tr["setup_box"]: gr.Accordion(open=True), tabs: gr.Tabs(selected="train"),
                   ck["message"]: f"New run from `{cid}`: choose its dataset and settings in "
                                  f"the Train tab."}
            own = studio.own_dataset(source.data.path)
            if own is not None:
                name, folder = own
                out.update({tr["ds_choice"]: gr.Dropdown(value=name), tr["ds_path"]: folder,
                            ck["message"]: f"New run from `{cid}` on its own dataset "
                                           f"`{name or folder}`: change it or the settings in "
                                           f"the Train tab."})
            return out

        ck["train_btn"].click(train_from, inputs=ck["checkpoint_id"],
                              outputs=[ck["message"], tr["preset"], tr["overrides"],
                                       tr["setup_box"], tabs, tr["ds_choice"], tr["ds_path"]])
        ck["resume_btn"].click(resume_from_checkpoints, inputs=ck["run"],
                               outputs=[ck["message"], tr["run_select"], tr["watch"], tabs],
                               concurrency_limit=1)
        tabs.select(ck["refresh_fn"], inputs=ck["refresh_inputs"], outputs=ck["refresh_outputs"])
        tabs.select(gen["refresh_fn"], inputs=gen["checkpoint"], outputs=gen["refresh_outputs"],
                    **gen["model_queue"]).then(**gen["model_args"])
    return demo
