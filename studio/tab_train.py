"""The Train tab: set up a run (preset, dataset, overrides with inline validation, cost
estimate, dry run), start it in the background through the Runner, and watch it.

Watching never holds an event open: a gr.Timer asks every two seconds for what changed
in the run folder (status, new metric lines, sample grids, the log) and updates only the
parts that changed. Closing the page or restarting the studio does not touch the run;
the tab re-attaches to the active run (or the newest one) when the page loads.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import yaml

from engine import config, preflight
from engine import sample_prompts as prompts_file
from engine.data import DataError
from engine.distributed import DeviceError
from engine.job import RunDir
from studio import quality, tab_dataset, views
from studio.paths import PathError
from studio.runner import RunInfo, RunnerError
from studio.train_setup import (
    FORM,
    MERGE_OVERRIDES_JS,
    dry_run_markdown,
    estimate_markdown,
    warm_up,
)
from studio.workspace import Studio

POLL_SECONDS = 2.0
LOG_LINES = 200
WATCHED_PAGES = 256   # browser pages whose choice of run is remembered (the latest ones)
# what starting or resuming a run may refuse with, shown as a message on the page
EXPECTED_ERRORS = (config.ConfigError, PathError, RunnerError, DeviceError,
                   prompts_file.PromptsError)
PROMPTS_HELP = ("One prompt per line, then its options: `--n` negative prompt, `--w` / `--h` "
                "size, `--d` seed, `--l` CFG scale, `--s` steps; a line without one takes the "
                "run's sample settings. Lines starting with `#` are notes.")


def empty_watch(run_id: str = "") -> dict:
    """What the monitor remembers about the run it shows (kept per browser session);
    `prompts_of`: the run whose prompts file is in the editor; `until`: what the resume
    field was last set up for."""
    return {"run_id": run_id, "offset": 0, "records": [], "log": None, "state": "",
            "samples": None, "prompts_of": None, "until": None}


def prompts_check(text: str, defaults: prompts_file.PromptDefaults) -> tuple[str, bool]:
    """(the validity line of a sample-prompts text, whether it parses)."""
    try:
        return f"Valid: {prompts_file.summary(prompts_file.parse_prompts(text, defaults))}.", True
    except prompts_file.PromptsError as e:
        return f"**Not valid:** {views.md(e)}", False


def run_choices(runs: list[RunInfo]) -> list[tuple[str, str]]:
    return [(f"{r.run_id} · {views.STATE_TEXT.get(r.state, r.state).lower()}"
             + (f" · pid {r.pid}" if r.alive and r.pid else ""), r.run_id) for r in runs]


def sample_files(run_path: Path) -> list[Path]:
    """The run's sample grids, oldest first."""
    folder = Path(run_path) / "samples"
    return sorted(folder.glob("step_*.png")) if folder.is_dir() else []


def build(studio: Studio, selection: gr.State) -> dict:
    presets = config.list_presets()
    docs = config.field_docs()
    warm_up("tiny-cpu" if "tiny-cpu" in presets else presets[0])
    with gr.Tab("Train", id="train"):
        with gr.Accordion("New run", open=True) as setup_box:
            with gr.Row():
                preset = gr.Dropdown(presets, value="tiny-cpu" if "tiny-cpu" in presets
                                     else presets[0], label="Preset", scale=2)
                ds_choice = gr.Dropdown(studio.dataset_names(), label="Dataset", scale=2,
                                        info="from the Dataset tab, or pick one here")
                ds_path = gr.Textbox(label="Or a folder path", scale=3,
                                     placeholder="inside the workspace or an --allow-dir folder")
                gpus = gr.Number(value=max(1, studio.gpu_count), precision=0, minimum=1,
                                 maximum=max(1, studio.gpu_count), label="GPUs",
                                 visible=studio.gpu_count > 1, scale=1,
                                 info="more than one starts torchrun")
            preset_info = gr.Markdown(elem_classes="phdm-help")
            with gr.Accordion("All presets", open=False):
                gr.Dataframe(value=views.preset_rows(), headers=views.PRESET_HEADERS,
                             interactive=False, wrap=True,
                             column_widths=["15%", "30%", "55%"])
            with gr.Row():
                form = [gr.Number(label=label, precision=0 if kind is int else None,
                                  info=docs[key].split(" (")[0][:48], min_width=120)
                        for key, label, kind in FORM]
            with gr.Row():
                overrides = gr.Textbox(label="Overrides: section.key=value, one per line",
                                       lines=5, max_lines=20, scale=3,
                                       placeholder="train.max_steps=2000\nmodel.patch_layers=2")
                with gr.Column(scale=2):
                    help_key = gr.Dropdown(sorted(docs), label="What does a key do?",
                                           value=None, allow_custom_value=False)
                    help_text = gr.Markdown()
            with gr.Row():
                new_prompts = gr.Textbox(label="Sample prompts (empty: sample.prompts)", lines=2,
                                         max_lines=12, scale=4, placeholder="a red apple on a "
                                         "table --n blurry --w 32 --h 24 --d 7 --l 4.5 --s 20 "
                                         "(one a line)")
                from_captions = gr.Button("Use the dataset's captions", size="sm", scale=1,
                                          min_width=160)
            validity = gr.Markdown(elem_classes="phdm-status", elem_id="train-validity")
            estimate = gr.Markdown()
            with gr.Accordion("Resolved config (YAML)", open=False):
                changes = gr.Markdown()
                yaml_view = gr.Code(language="yaml", interactive=False, max_lines=40)
            with gr.Row():
                dry = gr.Button("Dry run (three real steps at the largest bucket)", size="md")
                start = gr.Button("Start training", variant="primary", interactive=False)
            dry_out = gr.Markdown(elem_id="dry-run")

        gr.Markdown("### Run")
        no_run = gr.Markdown("No run yet: set one up above, or start the demo.",
                             elem_classes="phdm-help")
        with gr.Row(equal_height=True):
            run_select = gr.Dropdown([], label="Run", scale=4,
                                     info="the active run is chosen when the page opens")
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
        with gr.Column(visible=False) as monitor:
            progress = gr.HTML(views.progress_html("none", 0, 0, None, None))
            numbers = gr.Markdown()
            with gr.Row():
                b_stop = gr.Button("Stop", interactive=False, min_width=90)
                b_pause = gr.Button("Pause", interactive=False, min_width=90)
                b_resume = gr.Button("Resume", interactive=False, variant="primary", min_width=90)
                b_save = gr.Button("Save now", interactive=False, min_width=90)
                b_sample = gr.Button("Sample now", interactive=False, min_width=90)
                b_force = gr.Button("Force stop", interactive=False, variant="stop", min_width=90)
            with gr.Row():
                # shown while Resume is possible: empty resumes to the run's own end
                until = gr.Number(label="Resume until step", precision=0, minimum=1,
                                  visible=False, elem_id="resume-until", min_width=260, scale=1)
                run_msg = gr.Markdown(elem_classes="phdm-status", scale=3)
            with gr.Row():
                with gr.Column(scale=3):
                    loss_plot = gr.LinePlot(x="step", y="value", color="series", label="Loss",
                                            y_title="loss", color_title="term")
                    smoothing = gr.Slider(0.0, 0.99, value=0.6, step=0.01, label="Smoothing")
                with gr.Column(scale=2):
                    sample_img = gr.Image(label="Sample grid", type="filepath", interactive=False,
                                          height=300, buttons=["download", "fullscreen"],
                                          elem_classes="phdm-pixels")
                    with gr.Row():
                        scrub = gr.Slider(1, 2, value=1, step=1, label="Grid", scale=3,
                                          visible=False)
                        follow = gr.Checkbox(value=True, label="Follow the latest", scale=1)
                    sample_note = gr.Markdown(elem_id="sample-note")
            with gr.Accordion("Sample prompts of this run", open=True):
                gr.Markdown(PROMPTS_HELP + " Saved while the run trains, they are used from its "
                            "next sample grid.", elem_classes="phdm-help")
                prompts_box = gr.Textbox(show_label=False, lines=4, max_lines=20,
                                         elem_id="sample-prompts")
                with gr.Row(equal_height=True):
                    prompts_save = gr.Button("Save prompts", size="sm", scale=0, min_width=140)
                    prompts_state = gr.Markdown(elem_classes="phdm-status",
                                                elem_id="sample-prompts-validity")
            with gr.Row():
                lr_plot = gr.LinePlot(x="step", y="value", label="Learning rate", height=240,
                                      y_title="lr")
                grad_plot = gr.LinePlot(x="step", y="value", color="series", label="Gradient norm",
                                        y_title="norm", color_title="")
                speed_plot = gr.LinePlot(x="step", y="value", label="Throughput", height=240,
                                         y_title="images / s")
            with gr.Row():
                t_plot = gr.BarPlot(x="t", y="loss", label="Loss by time t (0 = noise, 1 = data), "
                                    "latest window", height=220, sort="x", y_lim=[0, None])
                # not the training loss's scale: a plain velocity error at evenly spread
                # times, where training weights its times and adds the frequency terms
                val_plot = gr.LinePlot(x="step", y="value", label="Validation loss (EMA weights, "
                                       "fixed noise, evenly spread times; a plain velocity "
                                       "error, on another scale than the training loss: "
                                       "compare it with itself)", height=220, y_title="loss")
                quality_plot = gr.LinePlot(x="step", y="value", color="series",
                                           label=quality.PLOT_TITLE, color_title="",
                                           y_title="x real", elem_id="quality-plot")
            events = gr.Dataframe(headers=views.EVENT_HEADERS, label="Events (skipped batches, "
                                  "rollbacks, notes)", interactive=False, max_height=220, wrap=True)
            gr.Markdown("Log (last lines)", elem_classes="phdm-help")
            log = gr.HTML(elem_classes="phdm-log")
        watch = gr.State(empty_watch())
        # what the Dataset tab changed, as [key, line or None] pairs for MERGE_OVERRIDES_JS,
        # and the line (or None) of each of its settings as last sent
        selection_patch = gr.JSON(visible=False)
        selection_sent = gr.State({})
        timer = gr.Timer(POLL_SECONDS)

    # ---- set-up ----------------------------------------------------------------------
    def check(preset_name, text, choice, typed, n_gpus, new_text) -> dict:
        """Resolve and validate: the validity line, the start button, the resolved YAML,
        the changes from the preset, the estimate and the form's values."""
        try:
            base = config.load_preset(preset_name)
            path = studio.chosen_dataset(choice, typed)
            cfg = studio.check_paths(views.resolve_config(preset_name, text, path),
                                     require_data=False)
        except (config.ConfigError, PathError) as e:
            return {validity: f"**Not valid:** {views.md(e)}", start: gr.Button(interactive=False),
                    estimate: ""}
        form_values = {comp: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])
                       for comp, (k, _, _) in zip(form, FORM)}
        diff = views.config_diff(cfg, base)
        diff = [d for d in diff if not d.startswith("data.path")]
        changes_md = ("Changed from the preset: " + "; ".join(f"`{d}`" for d in diff)
                      if diff else "No changes from the preset.")
        try:
            est = estimate_markdown(cfg, max(1, int(n_gpus or 1)))
        except (RuntimeError, ValueError, OSError) as e:
            est = f"No estimate: {views.md(e)}"
        if not path:
            msg = "Valid settings. **Choose a dataset** (above or in the Dataset tab) to start."
            ok = False
        else:
            msg = f"Valid settings · dataset `{path}`."
            ok = True
        for note in preflight.schedule_notes(cfg):
            msg += f" Note: {note}."
        if new_text and new_text.strip():    # Gradio sends None for a box without a value
            note, good = prompts_check(new_text, prompts_file.prompt_defaults(cfg))
            msg, ok = f"{msg} Sample prompts: {note}", ok and good
        return {validity: msg, start: gr.Button(interactive=ok), yaml_view: config.dump_yaml(cfg),
                changes: changes_md, estimate: est, **form_values}

    def preset_description(name):
        try:
            return config.load_preset(name).description
        except config.ConfigError as e:
            return f"**Invalid preset:** {views.md(e)}"

    def form_edit(key, kind):
        def edit(value, text):
            if value is None:
                return gr.skip()
            return views.set_override(text, key, kind(value))
        return edit

    def from_selection(sel, sent):
        """Take the Dataset tab's folder, preset and edits. Each of its settings stands
        for an override line: `key=value` when it differs from the preset, none when not.
        Those that changed since the last time come as a patch that MERGE_OVERRIDES_JS
        applies; the others are left as they are in the text, typed over or not."""
        skip = {selection_patch: []}
        if not sel or not sel.get("path"):
            return skip
        edits = views.override_values(sel.get("overrides", ""))
        try:
            base = config.load_preset(sel["preset"])
        except config.ConfigError:
            return skip
        lines, patch = {}, []
        for key in views.DATASET_KEYS:
            section, name = key.split(".")
            preset_value = views.yaml_value(getattr(getattr(base, section), name))
            value = edits.get(key)
            lines[key] = (None if value in (None, preset_value)
                          else views.override_line(key, yaml.safe_load(value)))
            if lines[key] != (sent or {}).get(key):
                patch.append([key, lines[key]])
        names = studio.dataset_names()
        in_list = sel.get("name") in names
        return {ds_choice: gr.Dropdown(choices=names, value=sel["name"] if in_list else None),
                ds_path: "" if in_list else sel["path"], preset: sel["preset"],
                selection_patch: patch, selection_sent: lines}

    def start_run(preset_name, text, choice, typed, n_gpus, new_text, request: gr.Request
                  ) -> dict:
        try:
            cfg = studio.run_config(preset_name, text, choice, typed)
            if new_text and new_text.strip():  # the run's prompts file; config.yaml lists them
                cells = prompts_file.parse_prompts(new_text, prompts_file.prompt_defaults(cfg))
                cfg.sample.prompts = [c.prompt for c in cells]
            run = studio.runner.start(cfg, studio.runner.new_run_id(preset_name),
                                      gpus=max(1, int(n_gpus or 1)), sample_prompts=new_text or "")
        except EXPECTED_ERRORS as e:
            return {validity: f"**Not started:** {views.md(e)}"}
        return {validity: f"Started run `{run.run_id}`.", run_select: select_update(run.run_id),
                watch: watch_run(run.run_id, request), setup_box: gr.Accordion(open=False),
                **monitor_shown()}

    def captions_as_prompts(preset_name, text, choice, typed, n_gpus) -> dict:
        """Four captions of the chosen dataset into the prompts box, held-out images'
        first (the plan the trainer will make, from the Dataset tab's cached scan)."""
        try:
            cfg = studio.run_config(preset_name, text, choice, typed)
            plan = tab_dataset.preview(Path(cfg.data.path), cfg, max(1, int(n_gpus or 1)),
                                       studio.cache_dir).plan
        except (config.ConfigError, PathError, DataError, OSError) as e:
            return {validity: f"**No captions to use:** {views.md(e)}"}
        found = prompts_file.caption_prompts([im.caption for im in plan.val_images],
                                             [im.caption for im in plan.images])
        if not found:
            return {validity: "**No captions to use:** no image of the dataset has a caption "
                              "that can be a prompt line"}
        return {new_prompts: "\n".join(found)}

    def run_dry(preset_name, text, choice, typed, progress=gr.Progress()):
        try:
            cfg = studio.run_config(preset_name, text, choice, typed)
        except (config.ConfigError, PathError) as e:
            return f"**Not valid:** {views.md(e)}"
        progress(0.1, desc="Building the model and running three training steps")
        try:
            with studio.runner.gate.dry_run():
                res = preflight.dry_run(cfg)
        except (RunnerError, DeviceError) as e:
            return f"**Dry run not started:** {views.md(e)}"
        except (RuntimeError, ValueError, OSError) as e:
            return f"**Dry run failed:** {views.md(e)}"
        return dry_run_markdown(res)

    # ---- monitor -----------------------------------------------------------------------
    # the run each page (browser session) last chose to watch. The watch state goes
    # through every timer tick, so a tick that read the previous choice and ends after a
    # new one was made writes the old run back; the next tick puts this choice back. The
    # pages that chose most recently are remembered (each opened page is a session).
    watching: dict[str, str] = {}

    def watch_run(run_id: str | None, request: gr.Request | None) -> dict:
        """A fresh watch state for `run_id`, remembered as the page's choice."""
        if request is not None and request.session_hash:
            watching.pop(request.session_hash, None)
            watching[request.session_hash] = run_id or ""
            while len(watching) > WATCHED_PAGES:
                watching.pop(next(iter(watching)))   # the page that chose longest ago
        return empty_watch(run_id or "")

    def monitor_shown() -> dict:
        """The monitor in place of "No run yet" at once, for a run just started (the next
        tick fills it in; without this the page said "No run yet" until then)."""
        return {monitor: gr.Column(visible=True), no_run: gr.Markdown(visible=False)}

    def select_update(run_id=None):
        runs = studio.runner.runs()
        return gr.Dropdown(choices=run_choices(runs), value=run_id)

    def attach(request: gr.Request):
        """On page load: the active run, else the newest."""
        runs = studio.runner.runs()
        active = next((r for r in runs if r.alive), None)
        chosen = active or (runs[0] if runs else None)
        run_id = chosen.run_id if chosen else None
        return (gr.Dropdown(choices=run_choices(runs), value=run_id), watch_run(run_id, request),
                gr.Accordion(open=chosen is None or not chosen.alive))

    def plots(records, smooth_w) -> dict:
        train, val, evs = views.split_records(records)
        frames = {loss_plot: views.series_frame(train, views.LOSS_SERIES, smooth_w),
                  lr_plot: views.series_frame(train, {"lr": "lr"}),
                  grad_plot: views.series_frame(train, {"grad_norm": "before clipping",
                                                        "grad_norm_clipped": "after clipping"},
                                                smooth_w),
                  speed_plot: views.series_frame(train, {"images_s": "images/s"}, smooth_w),
                  t_plot: views.loss_t_frame(train[-1] if train else None),
                  val_plot: views.series_frame(val, {"val_loss": "validation"}),
                  quality_plot: views.series_frame(quality.plot_records(records),
                                                   quality.PLOT_SERIES)}
        # an empty frame would fix the plot's colour legend before any series exists
        return {**{plot: f if len(f) else None for plot, f in frames.items()},
                events: views.event_rows(evs), numbers: views.latest_numbers(train, val)}

    # each run button and the key of views.control_states that enables it
    button_keys = {b_stop: "stop", b_pause: "pause", b_resume: "resume", b_save: "save",
                   b_sample: "sample", b_force: "force"}

    def poll(w, smooth_w, follow_v, scrub_v, request: gr.Request) -> dict:
        """One timer tick: the parts that changed since the last one (the others are left
        as they are)."""
        chosen = watching.get(request.session_hash) if request is not None else None
        if chosen is not None and chosen != w.get("run_id"):
            w = empty_watch(chosen)
        run_id = w.get("run_id")
        if not run_id:
            return {watch: w}
        try:
            info = studio.runner.info(run_id)
        except RunnerError as e:
            return {watch: watch_run("", request),
                    progress: views.progress_html("none", 0, 0, None, None, str(e))}
        new, offset = studio.runner.metrics(run_id, w["offset"])
        new_state = w["state"] != info.state
        w = dict(w, offset=offset, records=views.fold_records(w["records"], new),
                 state=info.state)
        note = info.error or info.message
        can = views.control_states(info.state, info.resumable)
        out = {watch: w,
               progress: views.progress_html(info.state, info.step, info.total, info.eta_s,
                                             info.loss, note),
               **{b: gr.Button(interactive=can[k]) for b, k in button_keys.items()}}
        if new or new_state:
            out.update(plots(w["records"], smooth_w))
        if info.state == "crashed":
            out[run_msg] = views.died_message(info.error, info.message, info.resumable)
        elif info.state == "failed":
            out[run_msg] = f"**Training failed:** {info.error}"
        elif new_state:
            out[run_msg] = ""
        samples = [str(p) for p in sample_files(info.path)]
        if samples != w["samples"]:
            w["samples"] = samples
            n = max(1, len(samples))
            index = n if follow_v or not scrub_v else min(int(scrub_v), n)
            out[scrub] = gr.Slider(1, max(2, n), value=index, step=1, visible=n > 1,
                                   label=f"Grid ({len(samples)} saved; drag to see earlier ones)")
            out[sample_img], out[sample_note] = sample_at(samples, index)
        tail = studio.runner.log_tail(run_id, LOG_LINES)
        if tail != w["log"]:
            out[log] = f"<pre>{html.escape(tail)}</pre>"
        w["log"] = tail
        if new_state:
            out.update({run_select: select_update(run_id), monitor: gr.Column(visible=True),
                        no_run: gr.Markdown(visible=False)})
        # the resume field follows the Resume button, which can change after the state
        # does (a stopped run becomes resumable once its process has exited)
        until_key = (can["resume"], info.step if can["resume"] else 0, info.resume_to,
                     info.finished)
        if w.get("until") != list(until_key):
            w["until"] = list(until_key)
            out[until] = gr.Number(value=None, visible=can["resume"],
                                   info=views.resume_until_info(info.step, info.resume_to,
                                                                info.finished))
        out.update(load_prompts(info, w))   # (notes in w which run's file the editor holds)
        return out

    def load_prompts(info: RunInfo, w: dict) -> dict:
        """The run's prompts file into the editor, once per run watched (a run that is
        starting may not have written it yet: asked again at the next tick). A run
        without one (older than the file) gets its config's prompts, to save."""
        if w.get("prompts_of") == info.run_id:
            return {}
        run = RunDir(info.path)
        if info.alive and not run.sample_prompts.exists():
            return {}
        w["prompts_of"] = info.run_id
        try:
            defaults = prompts_file.run_defaults(run)
            if run.sample_prompts.exists():
                text = prompts_file.run_prompts_text(run)
                return {prompts_box: text, prompts_state: prompts_check(text, defaults)[0]}
            text = prompts_file.format_prompts(config.load_preset(run.config).sample.prompts,
                                               defaults)
        except (config.ConfigError, prompts_file.PromptsError) as e:
            return {prompts_box: "", prompts_state: f"**{views.md(e)}**"}
        return {prompts_box: text,
                prompts_state: "This run has no sample_prompts.txt yet: these are its config's "
                               "prompts; Save writes them."}

    def run_defaults(run_id: str) -> tuple[RunDir, prompts_file.PromptDefaults]:
        run = RunDir(studio.runner.info(run_id).path)   # only runs inside the workspace
        return run, prompts_file.run_defaults(run)

    def check_prompts(w, text):
        if not w.get("run_id") or w.get("prompts_of") != w["run_id"]:
            return gr.skip()
        try:
            return prompts_check(text, run_defaults(w["run_id"])[1])[0]
        except EXPECTED_ERRORS as e:
            return f"**{views.md(e)}**"

    def save_prompts(w, text):
        run_id = w.get("run_id")
        if not run_id or w.get("prompts_of") != run_id:   # (another run's text, until loaded)
            return "No run's prompts are loaded yet."
        try:
            run, defaults = run_defaults(run_id)
            cells = prompts_file.save_prompts(run, text, defaults)
            alive = studio.runner.info(run_id).alive
        except EXPECTED_ERRORS as e:
            return f"**Not saved:** {views.md(e)}"
        except OSError as e:
            return f"**Not saved:** cannot write the run's sample_prompts.txt ({views.md(e)})"
        return (f"Saved: {prompts_file.summary(cells)}. "
                + ("The run uses them from its next sample grid." if alive else
                   "A resumed run uses them."))

    def sample_at(samples, index):
        if not samples:
            return None, "No sample grid yet."
        index = min(max(1, int(index)), len(samples))
        path = Path(samples[index - 1])
        return str(path), f"{path.stem.replace('_', ' ')} ({index} of {len(samples)})"

    def pick_run(run_id, request: gr.Request):
        return watch_run(run_id, request)

    def resmooth(w, smooth_w):
        return plots(w.get("records", []), smooth_w)

    def control(kind):
        def act(w, until_v=None):
            run_id = w.get("run_id")
            if not run_id:
                return "No run selected."
            try:
                if kind == "resume":   # on the device and GPUs of its latest launch
                    target = int(until_v) if until_v else None
                    studio.runner.resume(run_id, max_steps=target)
                    return (f"Resuming `{run_id}` from its last checkpoint"
                            + (f" until step {target:,}." if target else "."))
                if kind == "force":
                    if studio.runner.force_stop(run_id):
                        return f"`{run_id}` was stopped."
                    info = studio.runner.info(run_id)
                    return (f"**`{run_id}` is still running** (process {info.pid or '?'}): "
                            f"it outlived the kill, or its process is not a trainer this "
                            f"studio can stop; end it with the system's tools")
                studio.runner.request(run_id, kind)
            except EXPECTED_ERRORS as e:
                return f"**{views.md(e)}**"
            return {"stop": "Stop requested: the trainer saves a checkpoint and stops.",
                    "pause": "Pause requested: the trainer saves its state and exits; Resume "
                             "continues exactly where it stopped.",
                    "save-now": "A checkpoint will be saved after the current step.",
                    "sample-now": "A sample grid will be made after the current step."}[kind]
        return act

    # ---- wiring ------------------------------------------------------------------------
    check_inputs = [preset, overrides, ds_choice, ds_path, gpus, new_prompts]
    check_outputs = [validity, start, yaml_view, changes, estimate, *form]
    # every trigger of the check shares one queue, taken in order: the result shown is
    # that of the newest settings (checks of separate listeners would run side by side
    # and could finish in any order)
    check_args = dict(fn=check, inputs=check_inputs, outputs=check_outputs,
                      trigger_mode="always_last", show_progress="hidden",
                      concurrency_id="train-check", concurrency_limit=1)
    preset.change(preset_description, inputs=preset, outputs=preset_info).then(**check_args)
    overrides.change(**check_args)
    ds_choice.input(lambda: "", outputs=ds_path).then(**check_args)
    ds_path.blur(**check_args)
    ds_path.submit(**check_args)
    gpus.change(**check_args)
    new_prompts.change(**check_args)
    from_captions.click(captions_as_prompts, inputs=check_inputs[:5],
                        outputs=[new_prompts, validity], concurrency_limit=1)
    for comp, (key, _, kind) in zip(form, FORM):
        comp.input(form_edit(key, kind), inputs=[comp, overrides], outputs=overrides,
                   trigger_mode="always_last")
    help_key.change(lambda k: f"`{k}`: {docs[k]}" if k else "", inputs=help_key,
                    outputs=help_text)
    selection.change(from_selection, inputs=[selection, selection_sent],
                     outputs=[ds_choice, ds_path, preset, selection_patch, selection_sent]
                     ).then(None, inputs=[selection_patch, overrides], outputs=overrides,
                            js=MERGE_OVERRIDES_JS).then(**check_args)
    started = start.click(start_run, inputs=check_inputs,
                          outputs=[validity, run_select, watch, setup_box, monitor, no_run],
                          concurrency_limit=1)
    dry.click(run_dry, inputs=check_inputs[:4], outputs=dry_out, concurrency_limit=1)

    plot_outputs = [loss_plot, lr_plot, grad_plot, speed_plot, t_plot, val_plot, quality_plot,
                    events, numbers]
    monitor_outputs = [watch, progress, *button_keys, run_msg, *plot_outputs, scrub, sample_img,
                       sample_note, log, run_select, monitor, no_run, until, prompts_box,
                       prompts_state]
    timer.tick(poll, inputs=[watch, smoothing, follow, scrub], outputs=monitor_outputs,
               show_progress="hidden", concurrency_limit=4)
    run_select.input(pick_run, inputs=run_select, outputs=watch)
    prompts_box.change(check_prompts, inputs=[watch, prompts_box], outputs=prompts_state,
                       trigger_mode="always_last", show_progress="hidden")
    prompts_save.click(save_prompts, inputs=[watch, prompts_box], outputs=prompts_state,
                       concurrency_limit=1)
    refresh.click(lambda w: select_update(w.get("run_id") or None), inputs=watch,
                  outputs=run_select)
    smoothing.release(resmooth, inputs=[watch, smoothing], outputs=plot_outputs)
    scrub.release(lambda w, i: (*sample_at(w.get("samples", []), i), False),
                  inputs=[watch, scrub], outputs=[sample_img, sample_note, follow])
    for button, kind in ((b_stop, "stop"), (b_pause, "pause"), (b_save, "save-now"),
                         (b_sample, "sample-now"), (b_force, "force")):
        button.click(control(kind), inputs=watch, outputs=run_msg, concurrency_limit=2)
    b_resume.click(control("resume"), inputs=[watch, until], outputs=run_msg,
                   concurrency_limit=2)
    return {"started": started, "preset": preset, "preset_info": preset_info,
            "preset_description": preset_description, "check_args": check_args,
            "run_select": run_select, "watch": watch, "setup_box": setup_box, "attach": attach,
            "select_update": select_update, "watch_run": watch_run, "overrides": overrides,
            "monitor": monitor, "no_run": no_run, "monitor_shown": monitor_shown,
            "ds_choice": ds_choice, "ds_path": ds_path}
