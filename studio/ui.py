"""The studio page: a header, a first-start demo banner and four tabs (Dataset, Train,
Checkpoints, Generate). Each tab lives in its own module; this one builds the shared
context, puts the tabs together and wires the few events that cross tabs.

The browser addresses datasets, runs and checkpoints by name; the only paths it may
type are checked by studio.paths.resolve_inside against the workspace and the folders
given with --allow-dir, and every file it is shown comes from those folders.
"""

from __future__ import annotations

import copy
import html
import threading
from functools import cached_property
from pathlib import Path

import gradio as gr

import engine
from engine import config
from engine.checkpoint import CheckpointError, list_checkpoints, read_meta, step_name
from engine.distributed import DeviceError
from engine.generate_io import checkpoint_config, resolve_checkpoint
from engine.init_from import differences
from studio import tab_checkpoints, tab_dataset, tab_generate, tab_train, views
from studio.paths import PathError, names_local_path, resolve_inside
from studio.runner import PROJECT_ROOT, Runner, RunnerError
from studio.workspace import init_overrides

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
"""

RUN_PREFIX, MODEL_PREFIX = "run/", "model/"


class Studio:
    """What every tab shares: the workspace folders, the runner and the path checks."""

    def __init__(self, workspace: Path, allow_dirs=()):
        self.workspace = Path(workspace).expanduser().resolve()
        self.allow_dirs = [Path(d).expanduser().resolve() for d in allow_dirs]
        self.runner = Runner(self.workspace, self.allow_dirs)
        self.datasets_dir = self.runner.datasets_root
        self.outputs_dir = self.runner.outputs_root
        self.models_dir = self.runner.models_root
        self.cache_dir = self.workspace / "cache"
        # one writer of the demo dataset at a time (the first-start banner, the Dataset tab)
        self.demo_lock = threading.Lock()

    @property
    def roots(self) -> list[Path]:
        """Folders typed paths may point into."""
        return [self.workspace, *self.allow_dirs]

    @cached_property
    def gpu_count(self) -> int:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    # ---- datasets ----------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        """Folders in workspace/datasets (hidden and half-written ones left out)."""
        if not self.datasets_dir.is_dir():
            return []
        return sorted(p.name for p in self.datasets_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def dataset_dir(self, name: str) -> Path:
        """The folder of a dataset chosen by name: one of dataset_names(), and (links
        resolved) inside the workspace or an allowed folder."""
        if name not in self.dataset_names():
            raise PathError(f"there is no dataset '{name}' in {self.datasets_dir}; refresh the "
                            f"list or type its folder path")
        return resolve_inside(str(self.datasets_dir / name), self.roots)

    def chosen_dataset(self, choice: str | None, typed: str | None) -> str:
        """The dataset folder chosen in the page: a typed path (checked), else a name
        from the list; "" when neither is given."""
        if typed and typed.strip():
            return str(resolve_inside(typed, self.roots))
        if choice:
            return str(self.dataset_dir(choice))
        return ""

    # ---- run configs -------------------------------------------------------------------
    def check_paths(self, cfg: config.RunConfig, *, require_data: bool = True
                    ) -> config.RunConfig:
        """A copy of `cfg` whose path-valued settings lie inside the workspace or an
        --allow-dir folder, written as real absolute paths (relative ones are taken in
        the workspace): data.path (an existing folder; required unless `require_data`
        is False), loss.repa_teacher and text.cache_dir when set, and text.name_or_path
        when it names a local folder rather than a hub id (the default text.cache_dir, the
        user's cache folder, stays allowed). Every config the studio starts or dry-runs
        passes here (a resume reuses the config.yaml written at the start), so an
        override line cannot point the trainer anywhere else. PathError naming the
        setting and the allowed folders otherwise."""
        out = copy.deepcopy(cfg)
        allowed = ", ".join(str(r) for r in self.roots)

        def inside(key: str, value: str) -> str:
            try:
                return str(resolve_inside(value, self.roots))
            except PathError as e:
                raise PathError(f"{key}: {e}") from None

        if out.data.path or require_data:
            if not out.data.path:
                raise PathError(f"data.path: no dataset chosen: pick one in the Dataset tab or "
                                f"the Dataset list, or type a folder inside {allowed}")
            out.data.path = inside("data.path", out.data.path)
            if not Path(out.data.path).is_dir():
                raise PathError(f"data.path: the dataset folder {out.data.path} does not exist "
                                f"(folders the studio may use: {allowed})")
        if out.loss.repa_teacher:
            out.loss.repa_teacher = inside("loss.repa_teacher", out.loss.repa_teacher)
        if out.text.cache_dir:
            out.text.cache_dir = inside("text.cache_dir", out.text.cache_dir)
        # the folders a loader may resolve a relative name in: the workspace, the trainer's
        # working folder and this process's
        if names_local_path(out.text.name_or_path, [self.workspace, PROJECT_ROOT, Path.cwd()]):
            out.text.name_or_path = inside("text.name_or_path", out.text.name_or_path)
        if out.train.init_from:
            out.train.init_from = str(self.init_source(out.train.init_from, out))
        return out

    def init_source(self, value: str, cfg: config.RunConfig) -> Path:
        """The weights file train.init_from names (a checkpoint id from the Checkpoints
        tab, or a file or run folder inside the allowed folders), checked to fit `cfg`'s
        network and text encoder. PathError or ConfigError naming what is wrong."""
        try:
            if value.startswith((RUN_PREFIX, MODEL_PREFIX)):
                path = self.checkpoint_path(value)
            else:
                path = resolve_checkpoint(resolve_inside(value, self.roots))
            _, source, _ = checkpoint_config(path)
        except (PathError, RunnerError, CheckpointError) as e:
            raise PathError(f"train.init_from: {e}") from None
        diff = differences(source, cfg)
        if diff:
            raise config.ConfigError(
                f"train.init_from {value}: a run from a checkpoint keeps its network and text "
                f"encoder, and these differ: {'; '.join(diff)}")
        return path

    def run_config(self, preset: str, overrides: str, choice: str | None = None,
                   typed: str | None = None) -> config.RunConfig:
        """The config a Train-tab start or dry run uses: the preset with the override
        lines, data.path the chosen dataset (required), every path through check_paths.
        ConfigError or PathError."""
        cfg = views.resolve_config(preset, overrides, self.chosen_dataset(choice, typed))
        return self.check_paths(cfg)

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint_choices(self) -> list[tuple[str, str]]:
        """(label, id) of every run checkpoint (newest run and step first) and every
        exported model; ids are 'run/<run-id>/<step>' and 'model/<file name>'."""
        out = []
        for run in self.runner.runs():
            for info in reversed(list_checkpoints(run.path / "checkpoints")):
                out.append((f"{run.run_id} · step {info.step}",
                            f"{RUN_PREFIX}{run.run_id}/{info.step}"))
        if self.models_dir.is_dir():
            for p in sorted(self.models_dir.glob("*.safetensors"),
                            key=lambda p: p.stat().st_mtime, reverse=True):
                out.append((f"exported · {p.stem}", f"{MODEL_PREFIX}{p.name}"))
        return out

    def checkpoint_path(self, cid: str) -> Path:
        """The weights file of a checkpoint id; PathError/RunnerError when it is not one."""
        if cid.startswith(RUN_PREFIX):
            run_id, _, step = cid[len(RUN_PREFIX):].rpartition("/")
            if not step.isdigit():
                raise PathError(f"'{cid}' is not a checkpoint id")
            folder = self.runner.info(run_id).path / "checkpoints"
            path = folder / f"{step_name(int(step))}.safetensors"
        elif cid.startswith(MODEL_PREFIX):
            name = cid[len(MODEL_PREFIX):]
            if name not in {p.name for p in self.models_dir.glob("*.safetensors")}:
                raise PathError(f"the exported model '{name}' no longer exists in "
                                f"{self.models_dir} (deleted or renamed); pick another")
            path = resolve_inside(str(self.models_dir / name), self.roots)   # links judged too
        else:
            raise PathError(f"'{cid}' is not a checkpoint id")
        if not path.is_file():
            raise PathError(f"the checkpoint '{cid}' no longer exists (deleted by retention or "
                            f"by hand); pick another")
        return path

    def checkpoint_meta(self, cid: str) -> dict:
        return read_meta(self.checkpoint_path(cid))


def banner_markdown() -> str:
    return ("**New here?** One click creates a small built-in dataset of coloured shapes "
            "(`datasets/demo-shapes`), starts the `tiny-cpu` preset on it (it trains on a CPU "
            "in minutes) and opens the Train tab. When the first checkpoint appears, generate "
            "from it in the Generate tab.")


def build_ui(workspace: Path, allow_dirs: list[Path] = ()) -> gr.Blocks:
    """The studio as a Blocks app; the caller launches it."""
    studio = Studio(workspace, allow_dirs)
    with gr.Blocks(title="PixelHDM Studio") as demo:
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
                tab_dataset.create_demo(studio)
                cfg = studio.run_config(preset_name, "", tab_dataset.DEMO_NAME)
                run = studio.runner.start(cfg, studio.runner.new_run_id(preset_name))
            except (tab_dataset.DemoBusy, OSError, config.ConfigError, PathError, RunnerError,
                    DeviceError) as e:
                return (f"**The demo did not start:** {e}", gr.skip(), gr.skip(), gr.skip(),
                        gr.skip(), gr.skip(), gr.Dropdown(choices=studio.dataset_names()))
            return ("", gr.Row(visible=False), gr.Tabs(selected="train"),
                    tr["select_update"](run.run_id), tr["watch_run"](run.run_id, request),
                    gr.Accordion(open=False),
                    gr.Dropdown(choices=studio.dataset_names(), value=tab_dataset.DEMO_NAME))

        demo.load(show_banner, outputs=banner)
        tr["started"].then(show_banner, outputs=banner)
        demo.load(tr["attach"], outputs=[tr["run_select"], tr["watch"], tr["setup_box"]])
        demo.load(tr["preset_description"], inputs=tr["preset"], outputs=tr["preset_info"]
                  ).then(**tr["check_args"])
        demo_btn.click(start_demo, outputs=[banner_msg, banner, tabs, tr["run_select"],
                                            tr["watch"], tr["setup_box"], ds["choice"]],
                       concurrency_limit=1).then(**ds["plan_args"])

        # ---- cross-tab actions ---------------------------------------------------------
        def generate_with(cid):
            if not cid:
                return "Choose a checkpoint first.", gr.skip(), gr.skip()
            return gr.skip(), gen["select"](cid), gr.Tabs(selected="generate")

        ck["generate_btn"].click(
            generate_with, inputs=ck["checkpoint_id"],
            outputs=[ck["message"], gen["checkpoint"], tabs], **gen["model_queue"]
        ).then(**gen["model_args"])

        def resume_from_checkpoints(run_id, request: gr.Request):
            try:
                studio.runner.resume(run_id)   # on its launch's device and GPUs
            except (RunnerError, DeviceError) as e:
                return f"**Not resumed:** {e}", gr.skip(), gr.skip(), gr.skip()
            return (f"Resuming `{run_id}`.", tr["select_update"](run_id),
                    tr["watch_run"](run_id, request), gr.Tabs(selected="train"))

        def train_from(cid):
            """A new run from the checkpoint's weights: the Train tab's set-up with the
            nearest preset and the lines that keep the checkpoint's network."""
            if not cid:
                return "Choose a checkpoint first.", *[gr.skip()] * 4
            try:
                _, source, _ = checkpoint_config(studio.checkpoint_path(cid))
            except (PathError, RunnerError, CheckpointError) as e:
                return f"**Cannot train from it:** {e}", *[gr.skip()] * 4
            preset_name, text = init_overrides(source, cid)
            return (f"New run from `{cid}`: choose its dataset and settings in the Train tab.",
                    gr.Dropdown(value=preset_name), text, gr.Accordion(open=True),
                    gr.Tabs(selected="train"))

        ck["train_btn"].click(train_from, inputs=ck["checkpoint_id"],
                              outputs=[ck["message"], tr["preset"], tr["overrides"],
                                       tr["setup_box"], tabs])
        ck["resume_btn"].click(resume_from_checkpoints, inputs=ck["run"],
                               outputs=[ck["message"], tr["run_select"], tr["watch"], tabs],
                               concurrency_limit=1)
        tabs.select(ck["refresh_fn"], inputs=ck["refresh_inputs"], outputs=ck["refresh_outputs"])
        tabs.select(gen["refresh_fn"], inputs=gen["checkpoint"], outputs=gen["refresh_outputs"],
                    **gen["model_queue"]).then(**gen["model_args"])
    return demo
