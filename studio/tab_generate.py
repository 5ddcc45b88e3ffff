"""The Generate tab: pick a run checkpoint or an exported model, set the prompt and the
sampler, and watch the image form step by step; every image is saved with its settings
in workspace/outputs and can be recalled later (from the history, or by dropping a PNG).

Sampling runs in a worker thread that reports previews through a queue; the event that
started it streams them to the page and ends with the results. Cancel sets a flag that
the sampler's callback turns into generate.Cancelled. The loaded pipeline is kept for
the next request with the same checkpoint and freed when another one is chosen.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from pathlib import Path

import gradio as gr
import torch

from engine import config, generate, pngmeta
from engine.checkpoint import CheckpointError, read_modelspec
from engine.distributed import DeviceError, release_memory
from engine.encoders import EncoderLoadError
from engine.generate_io import (
    TextEncoderNeeded,
    checkpoint_config,
    describe_sizes,
    trained_sizes,
)
from engine.images import BROKEN_FILE_ERRORS
from engine.preflight import count_parameters, text_shape
from engine.sampling import SAMPLER_LABELS, SAMPLERS, STOCHASTIC
from studio import gen_settings, views
from studio.paths import PathError, names_local_path, resolve_inside
from studio.runner import PROJECT_ROOT, RunnerError
from studio.workspace import Studio, format_run_checkpoint

HISTORY_LIMIT = 48
EXPECTED_ERRORS = (generate.GenerateError, CheckpointError, EncoderLoadError, PathError,
                   RunnerError, config.ConfigError, DeviceError)
# what reading the settings of a PNG from the history or the browser may raise: the file
# may be broken or hostile (MetadataError is the engine's word for it)
RECALL_ERRORS = (pngmeta.MetadataError, *BROKEN_FILE_ERRORS)
# a hub id: 'name' or 'owner/name' of letters, digits, '-', '_' and '.'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class PipelineCache:
    """One loaded pipeline, keyed by (file, modification time, EMA, text encoder)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loaded: tuple | None = None
        self._pipe: generate.Pipeline | None = None

    @staticmethod
    def key(path: Path, ema: bool, text_encoder: str | None = None) -> tuple:
        try:
            return (str(path), path.stat().st_mtime_ns, bool(ema), text_encoder)
        except OSError as e:   # deleted since it was chosen
            raise CheckpointError(f"the checkpoint '{path.name}' is no longer on disk "
                                  f"({e.strerror}); choose another") from e

    def drop_unless(self, path: Path, ema: bool, text_encoder: str | None = None) -> bool:
        """Whether `get` would return the pipeline already loaded (no new memory); if not,
        the loaded one, which `get` would drop anyway, is dropped now, so that the GPU's free
        memory counts its share before a new one is weighed against it."""
        key = self.key(path, ema, text_encoder)
        with self._lock:
            if key == self._loaded:
                return True
            if self._loaded is not None:
                self.free_locked()
            return False

    def get(self, path: Path, ema: bool, text_encoder: str | None = None) -> generate.Pipeline:
        key = self.key(path, ema, text_encoder)
        with self._lock:
            if key != self._loaded:
                self.free_locked()
                self._pipe = generate.Pipeline.load(path, ema=ema, text_encoder=text_encoder)
                self._loaded = key
            return self._pipe

    def keep_only(self, path: Path) -> None:
        """Free the loaded pipeline unless it is `path`'s (another checkpoint was chosen)."""
        with self._lock:
            if self._loaded is not None and self._loaded[0] != str(path):
                self.free_locked()

    def free_locked(self) -> None:
        self._pipe, self._loaded = None, None
        release_memory()


GENERATION_HEADROOM = 1.0   # GiB for a request's activations beside the weights


def gpu_room(path: Path, run_device: str | None) -> str:
    """'' when loading the checkpoint `path` for generation fits in what the GPU a running
    run trains on has free; else why not, in words. Loading it regardless could take the
    memory the run needs next and stop the run, not the generation. Off a GPU, or with no
    run on one, always ''. The need: the network in fp32, a frozen text encoder in bf16
    and GENERATION_HEADROOM for the images."""
    if not run_device or not run_device.startswith("cuda") or not torch.cuda.is_available():
        return ""
    _, cfg, _ = checkpoint_config(path)
    need = (count_parameters(cfg) * 4 + text_shape(cfg.text)[1] * 2) / 2 ** 30 \
        + GENERATION_HEADROOM
    free, total = torch.cuda.mem_get_info(torch.device(run_device))
    free_gib = free / 2 ** 30
    if free_gib >= need:
        return ""
    return (f"the GPU ({run_device}) has {free_gib:.1f} of {total / 2 ** 30:.1f} GiB free beside "
            f"the training run, and this model needs about {need:.1f} GiB to generate: "
            f"pause the run (Train tab) to generate, or generate when it has finished")


def whole(value, label: str) -> int:
    """A number field's value as an int; GenerateError naming the field otherwise."""
    x = number(value, label)
    if x != int(x):
        raise generate.GenerateError(f"{label} = {value!r} is not a whole number")
    return int(x)


def number(value, label: str) -> float:
    """A number field's finite value; GenerateError naming the field when it is empty or
    not a number (the page sends None for an emptied box)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise generate.GenerateError(f"{label} is empty: type a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise generate.GenerateError(f"{label} = {value!r} is not a number") from None
    if not math.isfinite(x):
        raise generate.GenerateError(f"{label} = {value!r} is not a finite number")
    return x


def text_encoder_choice(text, studio: Studio) -> str | None:
    """The Text encoder field: None when empty, a hub id as typed, a folder (relative ones
    in the workspace) checked with the studio's path rules: links resolved, inside the
    workspace or an --allow-dir folder. PathError otherwise."""
    name = text.strip() if isinstance(text, str) else ""
    if not name:
        return None
    # the folders a relative name may be found in, as for the Train tab's settings
    if names_local_path(name, [studio.workspace, PROJECT_ROOT, Path.cwd()]):
        try:
            return str(resolve_inside(name, studio.roots))
        except PathError as e:
            raise PathError(f"Text encoder: {e}") from None
    if not HUB_ID.fullmatch(name):
        raise PathError(f"Text encoder: {name!r} is neither a folder nor a hub id (such as "
                        f"Qwen/Qwen3-0.6B); type the folder of a Qwen3 model or its hub id")
    return name


def needs_encoder(e: TextEncoderNeeded) -> str:
    """What the page says when a checkpoint's Qwen3 is not on this machine."""
    return (f"this model needs its Qwen3 text encoder '{e.name}', which is not on this "
            f"machine: type the folder of that model (inside the workspace) or its hub id in "
            f"the Text encoder field; it must be the model it was trained with (hidden size "
            f"{e.width})")


def encoder_markdown(meta: dict, cfg: config.RunConfig) -> str:
    if cfg.text.encoder == "builtin":
        return "builtin text encoder"
    folder = meta.get("text_encoder_folder")
    if isinstance(folder, str) and folder:
        return (f"text encoder `{folder}`, a folder of the training machine: put it next to "
                f"the file or give it in the Text encoder field")
    return f"text encoder `{cfg.text.name_or_path}`"


def model_markdown(meta: dict, cfg: config.RunConfig, title: str = "") -> str:
    trained = trained_sizes(meta)
    w, h = cfg.sample_size(trained)
    weights = "EMA and raw weights" if meta.get("has_ema") else \
        f"{meta.get('exported_weights', 'raw')} weights"
    at = (f"trained at {describe_sizes(trained)}" if trained else
          f"buckets {cfg.data.min_side}-{cfg.data.max_side} px")
    head = f"**{title}** · " if title else ""
    return (f"{head}Run `{meta.get('run_id', '?')}`, step {meta.get('step', '?')} · {weights} · "
            f"patch {cfg.model.patch_size} · {at} · default size {w}x{h}, up to "
            f"{generate.max_side(cfg)} px per side · {encoder_markdown(meta, cfg)}")


def history(outputs_dir: Path) -> list[str]:
    """The newest generated images, newest first (files deleted meanwhile left out)."""
    dated = []
    try:
        for p in outputs_dir.glob("*.png"):
            try:
                dated.append((p.stat().st_mtime, str(p)))
            except OSError:
                continue
    except OSError:
        return []
    return [p for _, p in sorted(dated, reverse=True)[:HISTORY_LIMIT]]


def recall(path) -> tuple[str, dict]:
    """(Markdown, parameters) of an image's stored settings; a file that cannot be read
    gives a message and no parameters."""
    try:
        p = pngmeta.read_png_parameters(path)
    except RECALL_ERRORS as e:
        return f"**Cannot read the settings of this image:** {views.md(e)}", {}
    if not isinstance(p, dict) or not p:
        return "This PNG carries no generation settings.", {}
    return gen_settings.params_markdown(p), p


def build(studio: Studio) -> dict:
    cache = PipelineCache()
    cancels: dict[str, threading.Event] = {}
    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(studio.checkpoint_choices(), label="Checkpoint", scale=4,
                                     info="run checkpoints and exported models",
                                     elem_id="generate-checkpoint")
            text_encoder = gr.Textbox(label="Text encoder (folder or hub id, optional)", scale=3,
                                      placeholder="the one the checkpoint names",
                                      elem_id="generate-text-encoder",
                                      info="another copy of the Qwen3 it was trained with, "
                                           "e.g. for an exported model")
            ema = gr.Checkbox(value=True, label="EMA weights", scale=1,
                              info="smoother; off = the raw weights")
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
        model_info = gr.Markdown(elem_classes="phdm-help", elem_id="generate-model-info")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", lines=1,
                                      info="empty = the unconditional input")
                with gr.Row(elem_classes="phdm-options"):
                    sampler = gr.Dropdown([(SAMPLER_LABELS[k], k) for k in SAMPLERS],
                                          value="heun", label="Sampler")
                    steps = gr.Slider(1, 200, value=20, step=1, label="Steps")
                    count = gr.Slider(1, 16, value=4, step=1, label="Images")
                with gr.Row(elem_classes="phdm-options"):
                    # only the stochastic samplers read them (enabled when one is chosen)
                    noise_lo = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Fresh noise from t",
                                         info="Euler a and DPM++ 2M SDE only",
                                         interactive=False)
                    noise_hi = gr.Slider(0.0, 1.0, value=1.0, step=0.05,
                                         label="Fresh noise until t",
                                         info="deterministic steps outside", interactive=False)
                with gr.Row(elem_classes="phdm-options"):
                    cfg = gr.Slider(0.0, 15.0, value=3.0, step=0.1, label="CFG scale",
                                    info="1 = no guidance")
                    rescale = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="CFG rescale",
                                        info="keeps the spread; 0 = off")
                    lo = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Guidance from t",
                                   info="unguided steps before it")
                    hi = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Guidance until t",
                                   info="t = 0 noise, 1 image")
                with gr.Row(elem_classes="phdm-options"):
                    ramp = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Guidance ramp",
                                     info="full from this t, less before it; 0 = off")
                    pag = gr.Slider(0.0, 5.0, value=0.0, step=0.1, label="PAG scale",
                                    info="perturbed-attention guidance near noise: one "
                                    "layout, not two; 0 = off")
                    coarse = gr.Slider(0.0, 15.0, value=0.0, step=0.1,
                                       label="CFG of coarse structure",
                                       info="where and how large things are; outlines "
                                       "keep the CFG scale; 0 = off")
                    coarse_sigma = gr.Number(value=1.5, minimum=0.1, maximum=64.0, step=0.1,
                                             label="Coarse blur (px)",
                                             info="what counts as coarse structure, with "
                                             "the CFG of coarse structure")
                with gr.Row():
                    size = gr.Dropdown([], label="Size (training buckets)", scale=2)
                    width = gr.Number(value=64, precision=0, label="Width", minimum=1)
                    height = gr.Number(value=64, precision=0, label="Height", minimum=1)
                    shift = gr.Number(value=0.0, label="Shift", minimum=0.0,
                                      info="0 = the default for the size")
                    seed = gr.Textbox(label="Seed", placeholder="random", elem_id="generate-seed",
                                      info="image i uses seed + i")
                with gr.Accordion("Image to image", open=False):
                    with gr.Row():
                        # image_mode None: the engine converts any mode (transparency on
                        # white, 16-bit scaled) where the page's own RGB conversion clips
                        init = gr.Image(label="Start image", type="pil", height=200,
                                        sources=["upload", "clipboard"], image_mode=None,
                                        elem_id="start-image")
                        strength = gr.Slider(0.0, 1.0, value=0.75, step=0.05, label="Strength",
                                             info="0 = keep the image, 1 = ignore it")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    # enabled while this page's images are being made
                    stop = gr.Button("Cancel", variant="stop", interactive=False,
                                     elem_id="generate-cancel")
                status = gr.Markdown(elem_classes="phdm-status", elem_id="generate-status")
            with gr.Column(scale=2):
                live = gr.Image(label="Preview", type="pil", interactive=False, height=320,
                                elem_classes="phdm-pixels")
                results = gr.Gallery(label="Results", columns=4, height=240,
                                     object_fit="contain", fit_columns=False,
                                     elem_classes="phdm-pixels")
                params = gr.Markdown(elem_id="generate-params")
        with gr.Accordion("History (workspace/outputs)", open=True):
            with gr.Row():
                with gr.Column(scale=3):
                    past = gr.Gallery(history(studio.outputs_dir), label="Past images (click one "
                                      "to see its settings)", columns=8, height=280,
                                      object_fit="contain", allow_preview=False,
                                      fit_columns=False, elem_classes="phdm-pixels")
                with gr.Column(scale=2):
                    recall_file = gr.File(label="Drop a PNG here to restore its settings",
                                          file_types=[".png"], type="filepath", height=120,
                                          elem_id="recall-file")
                    past_params = gr.Markdown(elem_id="recalled-params")
                    use_params = gr.Button("Use these settings", size="sm")
        recalled = gr.State({})
        past_files = gr.State(history(studio.outputs_dir))

    setting_fields = [prompt, negative, sampler, steps, cfg, rescale, lo, hi, ramp, pag, coarse,
                      coarse_sigma, noise_lo, noise_hi, shift, width, height, seed, strength]
    # the settings a checkpoint fills in (its run's sample settings), and the values they
    # were last given that way (first: the page's own); None where the user set the value
    sample_fields = setting_fields[:17]
    filled = gr.State(["" if c.value is None else c.value for c in sample_fields])

    # ---- model choice ------------------------------------------------------------------
    def refresh_fn(cid):
        """The current lists; the newest checkpoint when none is chosen yet."""
        choices = studio.checkpoint_choices()
        ids = [c for _, c in choices]
        cid = cid if cid in ids else (ids[0] if ids else None)
        files = history(studio.outputs_dir)
        return gr.Dropdown(choices=choices, value=cid), files, files

    def select(cid=None):
        """The checkpoint list with `cid` chosen; none chosen when it is not (or no
        longer) in the list, which the dropdown would refuse as the next event's input."""
        choices = studio.checkpoint_choices()
        return gr.Dropdown(choices=choices, value=cid if cid in [c for _, c in choices] else None)

    def on_model(cid, *args):
        """Model info, bucket sizes and size limits; the run's sample settings in the
        fields that still hold what was filled in before (by the page or the previously
        chosen checkpoint): the ones the user changed are kept. Inputs: the checkpoint,
        the sample fields and `filled`."""
        current, before = args[:-1], args[-1]
        if not cid:
            return {model_info: "Choose a checkpoint (train a run first, or export a model)."}
        try:
            path = studio.checkpoint_path(cid)
            meta, mcfg, _ = checkpoint_config(path)
        except EXPECTED_ERRORS as e:
            return {model_info: f"**{views.md(e)}**"}
        cache.keep_only(path)
        p, top = mcfg.model.patch_size, generate.max_side(mcfg)
        trained = trained_sizes(meta)
        w, h = mcfg.sample_size(trained)
        sizes = views.size_choices(mcfg, trained)
        default = f"{w}x{h}"
        s = mcfg.sample
        values = [s.prompts[0], s.negative, s.sampler, s.steps, s.cfg, s.cfg_rescale,
                  s.cfg_interval[0], s.cfg_interval[1], s.cfg_ramp, s.pag, s.cfg_coarse,
                  s.cfg_coarse_sigma,
                  *s.noise_interval, s.shift, w, h]
        follow = [unchanged(c, b) for c, b in zip(current, before)]
        info = model_markdown(meta, mcfg, read_modelspec(path).get("title", ""))
        if blocked := studio.runner.gate.generation_blocked():   # said before Generate
            info += f"\n\n**Generation waits:** {blocked}."
        out = {model_info: info,
               size: gr.Dropdown(choices=sizes,
                                 value=default if default in [v for _, v in sizes] else None),
               filled: values}
        # the sample fields (the last two: width and height, which also take their limits)
        out.update({c: v for c, v, f in zip(sample_fields, values[:-2], follow) if f})
        for c, v, f in zip((width, height), values[-2:], follow[-2:]):
            out[c] = gr.Number(value=v, step=p, minimum=p, maximum=top) if f else \
                gr.Number(step=p, minimum=p, maximum=top)
        return out

    def unchanged(value, before) -> bool:
        """Whether a field still holds the value it was filled in with (an empty text
        box reads "" or None)."""
        if before is None:
            return False
        return value == before or (before == "" and value is None)

    model_outputs = [model_info, size, *setting_fields, filled]
    # what chooses the checkpoint and what shows it run one at a time, in the order they
    # were asked for, so that an older request cannot land last and show, or fill in the
    # settings of, a checkpoint that is no longer the chosen one
    model_queue = dict(concurrency_id="generate-model", concurrency_limit=1)
    model_args = dict(fn=on_model, inputs=[checkpoint, *sample_fields, filled],
                      outputs=model_outputs, **model_queue)

    # ---- generating --------------------------------------------------------------------
    def run(cid, use_ema, prompt_v, negative_v, sampler_v, steps_v, cfg_v, rescale_v, lo_v,
            hi_v, ramp_v, pag_v, coarse_v, coarse_sigma_v, noise_lo_v, noise_hi_v, shift_v,
            width_v, height_v, seed_v, strength_v, count_v, init_v, request: gr.Request,
            encoder_v: str = ""):
        key = request.session_hash if request is not None else ""
        cancel = threading.Event()
        cancels[key] = cancel
        try:
            path = studio.checkpoint_path(cid or "")
            encoder = text_encoder_choice(encoder_v, studio)
            seed_i = gen_settings.parse_seed(seed_v)
            w_i, h_i = whole(width_v, "Width"), whole(height_v, "Height")
            steps_i, count_i = whole(steps_v, "Steps"), whole(count_v, "Images")
            floats = [number(v, label) for v, label in (
                (cfg_v, "CFG scale"), (rescale_v, "CFG rescale"), (lo_v, "Guidance from t"),
                (hi_v, "Guidance until t"), (ramp_v or 0.0, "Guidance ramp"),
                (pag_v or 0.0, "PAG scale"), (coarse_v or 0.0, "CFG of coarse structure"),
                (noise_lo_v, "Fresh noise from t"),
                (noise_hi_v, "Fresh noise until t"), (shift_v or 0.0, "Shift"),
                (strength_v, "Strength"))]
            # the blur counts only with coarse guidance (the run's own when left empty)
            sigma_f = (None if not coarse_v or coarse_sigma_v in (None, "")
                       else number(coarse_sigma_v, "Coarse blur (px)"))
        except (ValueError, PathError, RunnerError) as e:   # GenerateError is a ValueError
            yield gone(cid) if cid and not listed(cid) else say(f"**{views.md(e)}**")
            return
        events: queue.Queue = queue.Queue()

        def work():
            beside = ""
            try:
                with studio.runner.gate.generation() as note:
                    if note:
                        beside = note
                        events.put(("note", note))
                        run = studio.runner.active()
                        if (run is not None and not cache.drop_unless(path, use_ema, encoder)
                                and (room := gpu_room(path, run.device))):
                            raise RunnerError(room)
                    pipe = cache.get(path, use_ema, encoder)
                    notes = pipe.notes(prompt_v, negative_v, w_i, h_i, init_image=init_v)
                    events.put(("loaded", None))

                    def progress(step, total, preview):
                        if cancel.is_set():
                            raise generate.Cancelled()
                        events.put(("preview", (step, total, preview)))

                    (cfg_f, rescale_f, lo_f, hi_f, ramp_f, pag_f, coarse_f, noise_lo_f,
                     noise_hi_f, shift_f, strength_f) = floats
                    out = pipe.generate(
                        prompt_v, negative_v, w_i, h_i, steps_i, sampler_v, cfg_f, rescale_f,
                        (lo_f, hi_f), shift_f, seed_i, count_i, init_image=init_v,
                        strength=strength_f if init_v else None, callback=progress,
                        ramp=ramp_f, pag=pag_f, noise_interval=(noise_lo_f, noise_hi_f),
                        coarse=coarse_f, coarse_sigma=sigma_f)
                    saved = [pngmeta.save_png(r.image, r.params, studio.outputs_dir) for r in out]
                events.put(("done", (out, saved, notes)))
            except generate.Cancelled:
                events.put(("cancelled", None))
            except TextEncoderNeeded as e:
                events.put(("error", needs_encoder(e)))
            except EXPECTED_ERRORS as e:
                events.put(("error", str(e)))
            except torch.OutOfMemoryError:
                events.put(("error", "out of memory beside the training run: pause it (Train "
                                     "tab) to generate, or generate fewer images at once or a "
                                     "smaller size" if beside else
                                     "out of memory: generate fewer images at once or a "
                                     "smaller size"))
            except OSError as e:   # saving the images
                events.put(("error", f"cannot save into {studio.outputs_dir} ({e.strerror or e})"
                                     f": free some space"))
            except Exception as e:  # shown on the page instead of dying silently in a thread
                events.put(("error", f"{type(e).__name__}: {e}"))
            finally:
                # the allocator's cached blocks go back to the GPU after every request (the
                # model stays loaded): a training run on the same card may need them
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        threading.Thread(target=work, name="generate", daemon=True).start()
        yield say("Loading the model...")
        note = ""
        try:
            while True:
                kind, value = events.get()
                if kind == "note":
                    note = f" ({value})"
                elif kind == "loaded":
                    yield say(f"Sampling...{note}")
                elif kind == "preview":
                    step, total, image = value
                    text = f"Step {step} of {total}{note}"
                    yield {status: text} if image is None else {live: image, status: text}
                elif kind == "done":
                    yield finished(*value)
                    return
                elif kind == "error" and not path.is_file():
                    yield gone(cid)
                    return
                else:
                    yield say("Cancelled." if kind == "cancelled"
                              else f"**Not generated:** {value}")
                    return
        finally:
            cancel.set()   # the page went away or the event ended: stop the sampler too
            if cancels.get(key) is cancel:
                cancels.pop(key, None)

    def say(text: str) -> dict:
        """Outputs of `run` that change only the status line."""
        return {status: text}

    def listed(cid: str) -> bool:
        return cid in [c for _, c in studio.checkpoint_choices()]

    def gone(cid: str) -> dict:
        """Outputs of `run` when the chosen checkpoint is no longer on disk: the message, and
        the checkpoint list refreshed with nothing chosen."""
        return {status: f"**Not generated:** the checkpoint `{cid}` is no longer on disk "
                        f"(deleted by retention or by hand). The list is refreshed: choose "
                        f"another checkpoint.",
                checkpoint: select(None), model_info: "Choose a checkpoint."}

    def finished(out: list, saved: list, notes: list[str]) -> dict:
        first = out[0].params["seed"]
        seeds = f"seed {first}" + (f" to {first + len(out) - 1}" if len(out) > 1 else "")
        names = saved[0].name + (f" ... {saved[-1].name}" if len(saved) > 1 else "")
        files = history(studio.outputs_dir)
        note = "".join(f"\n\nNote: {n}." for n in notes)
        return {live: out[0].image,
                status: f"Done: {len(out)} image(s), {seeds}, saved to `workspace/outputs/` "
                        f"({names}).{note}",
                results: [(str(p), f"seed {r.params['seed']}") for p, r in zip(saved, out)],
                params: gen_settings.params_markdown(out[0].params), past: files, past_files: files}

    def cancel_run(request: gr.Request):
        ev = cancels.get(request.session_hash if request is not None else "")
        if ev is None:
            return "Nothing is being generated."
        ev.set()
        return "Cancelling after the current step..."

    # ---- recall ------------------------------------------------------------------------
    def fields_from(p: dict):
        """Setting fields from recalled parameters (missing or unusable ones unchanged)."""
        return [gr.skip() if v is None else v for v in gen_settings.recall_values(p)]

    def checkpoint_for(p: dict):
        """The checkpoint an image was made with, when it is still in the list."""
        try:
            cid = format_run_checkpoint(p.get("run_id"), p.get("checkpoint_step"))
        except ValueError:   # settings of another tool, or damaged
            return gr.skip()
        choices = studio.checkpoint_choices()
        return gr.Dropdown(choices=choices, value=cid) if cid in [c for _, c in choices] \
            else gr.skip()

    def on_past(files, evt: gr.SelectData):
        try:
            path = files[evt.index]
        except (IndexError, TypeError, KeyError):
            return "That image is no longer in the history; press Refresh.", {}
        return recall(path)

    def on_recall(path):
        return recall(path) if path else ("", {})

    def apply(p, before):
        if not p:
            return {status: "Choose an image in the history or drop a PNG first."}
        # restored settings count as the user's: the checkpoint shown next keeps them
        restored = gen_settings.recall_values(p)
        # the start image is not stored in a PNG: a text-to-image one clears it, so that
        # Generate makes the same image; an img2img one says what to add
        if p.get("strength") is None:
            said, start = "Settings restored (text to image: the start image is cleared).", None
        else:
            said, start = ("Settings restored. This image was made from a start image, "
                           "which its file does not hold: drop it in Start image to make "
                           "the image again."), gr.skip()
        return {status: said, **dict(zip(setting_fields, fields_from(p))),
                checkpoint: checkpoint_for(p), init: start,
                filled: [b if v is None else None for v, b in zip(restored, before)]}

    def noise_controls(sampler_v):
        """The fresh-noise sliders, enabled for the samplers that draw fresh noise."""
        on = sampler_v in STOCHASTIC
        return gr.Slider(interactive=on), gr.Slider(interactive=on)

    sampler.change(noise_controls, inputs=sampler, outputs=[noise_lo, noise_hi], queue=False)
    checkpoint.input(**model_args)
    refresh.click(refresh_fn, inputs=checkpoint, outputs=[checkpoint, past, past_files],
                  **model_queue).then(**model_args)
    size.input(lambda s: config.parse_wxh(s) if s else (gr.skip(), gr.skip()), inputs=size,
               outputs=[width, height])
    run_outputs = [live, status, results, params, past, past_files, checkpoint, model_info]
    go.click(lambda: gr.Button(interactive=True), outputs=stop, queue=False).then(
        run, inputs=[checkpoint, ema, *setting_fields[:-1], strength, count, init, text_encoder],
        outputs=run_outputs, concurrency_limit=1, concurrency_id="generate").then(
        lambda: gr.Button(interactive=False), outputs=stop, queue=False)
    stop.click(cancel_run, outputs=status, queue=False)
    past.select(on_past, inputs=past_files, outputs=[past_params, recalled])
    recall_file.upload(on_recall, inputs=recall_file, outputs=[past_params, recalled])
    use_params.click(apply, inputs=[recalled, filled],
                     outputs=[status, *setting_fields, checkpoint, init, filled],
                     **model_queue).then(**model_args)

    return {"checkpoint": checkpoint, "select": select, "model_args": model_args, "run": run,
            "noise_controls": noise_controls,
            "run_outputs": run_outputs, "model_info": model_info,
            "model_queue": model_queue, "refresh_fn": refresh_fn,
            "refresh_outputs": [checkpoint, past, past_files]}
