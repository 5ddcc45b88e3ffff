"""The Dataset tab: choose a folder (or create the demo), edit the bucket settings and see
exactly what training will do with it: the bucket histogram and table, steps per epoch,
aspect errors, every image's crop box and the health report.

The plan comes from engine.data.scan_dataset and engine.buckets.plan_buckets, the code
the trainer runs, so the preview cannot disagree with training. The chosen dataset and
the edited settings are published in a gr.State that the Train tab reads.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import astuple, dataclass
from pathlib import Path

import gradio as gr

from engine import config
from engine.buckets import BucketPlan, plan_buckets
from engine.crop_cache import cache_status
from engine.data import (
    DataError,
    HealthReport,
    Scan,
    health_report,
    scan_dataset,
)
from engine.demo_data import outdated_demo, write_demo_dataset
from engine.images import BROKEN_FILE_ERRORS
from engine.report import token_counter, why_nothing_trains
from studio import views
from studio.paths import PathError
from studio.workspace import Studio, add_files

DEMO_NAME = "demo-shapes"
DEFAULT_PRESET = "tiny-cpu"
# What "Start the demo" adds to the preset: every step at up to 32 px, where a step costs
# about a third of a 64 px one, and RoPE positions on a fixed 8 x 8 grid (places keep their
# meaning when the model is sampled at other sizes). A 64 px stage at the end undid the
# outlines the 32 px steps had learned (33 / 40 shapes as prompted before it, 13 / 40 after
# 1500 steps at 64 px), so the demo stays at 32 px and gives the time to more steps there;
# data.min_side=16 admits the 24 px short side of its 4:3 images at that size.
# Measured on the demo (docs/demo-quality.md, "Why the demo trains at 32 px"): shapes,
# places, colours and backgrounds as prompted, and seed diversity near the dataset's own.
# A learning rate of 2e-3 for the demo only (the preset's 1e-3 stays for its own 64 px
# runs, where 2e-3 is unmeasured): over four training seeds 96.7 % of shapes as prompted
# against 92.9 %, less grain (0.36 against 0.51 levels); one run of four drew a black
# background for "white" in 3 of 12 images of one prompt (docs/demo-quality.md, "The
# demo's learning rate").
DEMO_OVERRIDES = ("data.max_side=32", "data.min_side=16", "train.max_steps=8000",
                  "model.rope_grid=8", "train.lr=2e-3")
# the demo run's own line in the Runs table (the preset's would describe its 32-64 px)
DEMO_DESCRIPTION = ("The demo: tiny-cpu on the demo shapes at 16-32 px, 8000 steps at twice "
                    "the preset's learning rate")
THUMBS_PER_PAGE = 24
THUMB_SIZE = 160
EDITED_KEYS = views.DATASET_KEYS
ORDERS = ("dataset", "worst crop", "bucket")


class DemoBusy(RuntimeError):
    """The demo dataset is being written by another request."""


@dataclass
class Preview:
    scan: Scan
    plan: BucketPlan
    health: HealthReport
    key: tuple                  # what was planned with which settings (see preview_key)
    crops: str = ""             # what the crop cache holds of it (engine.crop_cache)


_PREVIEWS: OrderedDict[tuple, Preview] = OrderedDict()   # the last few plans, for paging


@functools.lru_cache(maxsize=4)
def _token_counter(text: tuple):
    """The text encoder's token counter for the health report, loaded once per encoder
    (engine.data's own: the encoder's tokenizer, or a labelled estimate offline)."""
    cfg = config.RunConfig(text=config.TextConfig(*text))
    return token_counter(cfg)


def preview_key(root: Path, cfg: config.RunConfig, gpus: int) -> tuple:
    return (str(root), repr(cfg.data), cfg.model.patch_size, cfg.train.batch_size,
            cfg.train.grad_accum, gpus, repr(cfg.text))


def preview(root: Path, cfg: config.RunConfig, gpus: int, cache_dir: Path) -> Preview:
    """Scan (headers only, cached on disk by file size and time), plan and check a dataset
    with `cfg`'s data, patch and batch settings."""
    digest = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    scan = scan_dataset(root, cfg.data, cache_path=cache_dir / f"scan-{digest}.json")
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, cfg.train.batch_size,
                        gpus, cfg.train.grad_accum)
    counter, name = _token_counter(astuple(cfg.text))
    health = health_report(scan, count_tokens=counter, max_tokens=cfg.text.max_tokens,
                           counter_name=name)
    result = Preview(scan, plan, health, preview_key(root, cfg, gpus),
                     cache_status(plan.images, cfg.data))
    key = result.key
    _PREVIEWS[key] = result
    _PREVIEWS.move_to_end(key)
    while len(_PREVIEWS) > 4:
        _PREVIEWS.popitem(last=False)
    return result


def plan_status(root: Path, pv: Preview) -> str:
    """The status line of a preview; it says so when training would have nothing to train."""
    why = why_nothing_trains(pv.scan, pv.plan)
    return (f"Planned `{root}` in {pv.scan.seconds:.2f} s."
            + (f"\n\n**Nothing would train:** {why}" if why else "")
            + (f"\n\n{pv.crops}" if pv.crops and not why else ""))


def preset_values(name: str) -> tuple:
    """(patch size, then the edited settings in EDITED_KEYS order) of a preset."""
    try:
        cfg = config.load_preset(name)
    except config.ConfigError as e:
        raise gr.Error(str(e)) from e
    d = cfg.data
    return (cfg.model.patch_size, d.min_side, d.max_side, d.bucket_step, d.max_aspect,
            cfg.train.batch_size, d.drop_last, d.missing_caption, d.include_reg)


def create_demo(studio: Studio) -> bool:
    """Write the demo dataset into workspace/datasets unless it is there; True when it was
    written now. One writer at a time (studio.demo_lock): DemoBusy while another request
    writes it, OSError when it cannot be written."""
    if not studio.demo_lock.acquire(blocking=False):
        raise DemoBusy("the demo dataset is being created by an earlier click; wait a few "
                       "seconds and it appears in the list")
    try:
        target = studio.datasets_dir / DEMO_NAME
        if target.exists():
            return False
        write_demo_dataset(target)
        return True
    finally:
        studio.demo_lock.release()


def old_demo_warning(studio: Studio) -> str | None:
    """What to tell the user when the workspace's demo folder is not the demo dataset this
    version writes (an older version's, or edited since); None when it is."""
    note = outdated_demo(studio.datasets_dir / DEMO_NAME)
    if note is None:
        return None
    return (f"{note}. The demo trains on that folder as it is; delete it and press the "
            f"button again for the current demo dataset.")


def thumbnails(plan: BucketPlan, order: str, bucket: str, page: int | None
               ) -> tuple[list[tuple], int, str]:
    """(gallery items, page shown, page text) of one page of crop-box thumbnails. A file
    that cannot be shown (broken, replaced by a huge or hostile one since the scan)
    gets a placeholder and a note instead of ending the page."""
    items = views.planned_order(plan, order, bucket)
    n_pages = max(1, math.ceil(len(items) / THUMBS_PER_PAGE))
    page = min(max(1, int(page or 1)), n_pages)
    gallery, broken = [], 0
    for im in items[(page - 1) * THUMBS_PER_PAGE: page * THUMBS_PER_PAGE]:
        try:
            gallery.append((views.crop_thumbnail(im.record.path, im.box, THUMB_SIZE),
                            views.thumbnail_caption(im)))
        except BROKEN_FILE_ERRORS as e:
            broken += 1
            gallery.append((views.placeholder_thumbnail(THUMB_SIZE),
                            f"{im.rel} · cannot be shown: {str(e) or type(e).__name__}"))
    text = f"page {page} of {n_pages} · {len(items)} images"
    if broken:
        text += f" · {broken} on this page cannot be read (re-run the preview to see why)"
    return gallery, page, text


def settings_overrides(values: dict) -> str:
    """Override lines for the tab's edited settings."""
    text = ""
    for key in EDITED_KEYS:
        if values.get(key) is not None:
            text = views.set_override(text, key, values[key])
    return text


def build(studio: Studio, selection: gr.State) -> dict:
    """The tab's components; returns those other tabs wire to."""
    presets = config.list_presets()
    first = DEFAULT_PRESET if DEFAULT_PRESET in presets else presets[0]
    p0, min0, max0, step0, asp0, bs0, drop0, miss0, reg0 = preset_values(first)
    with gr.Tab("Dataset", id="dataset"):
        gr.Markdown("Pick a folder of images with `.txt` (or `.caption`) captions of the "
                    "same name, or a `metadata.jsonl`; `N_name` folders repeat their images N "
                    "times per epoch, and folders named like regularisation sets (`reg`, "
                    "`class_images`) are left out unless `data.include_reg` is set. The "
                    "preview below runs the trainer's own bucketing code, so it shows "
                    "exactly how each image will be cropped and batched.",
                    elem_classes="phdm-help")
        with gr.Row(equal_height=True):
            ds_choice = gr.Dropdown(studio.dataset_names(), value=None, scale=3,
                                    label="Dataset in workspace/datasets",
                                    info="folders in the workspace's datasets folder")
            ds_path = gr.Textbox(label="Or a folder path", scale=4,
                                 placeholder="a folder inside the workspace or an --allow-dir "
                                             "folder", info="typed paths are checked")
            with gr.Column(scale=2, min_width=180):
                refresh = gr.Button("Refresh list", size="sm")
                demo = gr.Button("Create the demo dataset", size="sm")
        with gr.Accordion("Add images from this computer", open=False):
            with gr.Row(equal_height=True):
                up_name = gr.Textbox(label="Into the dataset", scale=2,
                                     placeholder="a new or existing dataset name",
                                     info="letters, digits, - _ . (created when new)")
                up_files = gr.File(label="Images and their .txt captions", scale=5,
                                   file_count="multiple", type="filepath",
                                   file_types=["image", ".txt", ".caption"],
                                   elem_id="upload-files")
                up_btn = gr.Button("Add to the dataset", scale=1, min_width=160)
            gr.Markdown("Files go into the dataset's own folder, side by side: a browser "
                        "sends no folders. For kohya `N_name` repeat folders, regularisation "
                        "folders or a `metadata.jsonl`, copy the whole folder into "
                        "`workspace/datasets/` instead and press Refresh list.",
                        elem_classes="phdm-help")
            up_result = gr.Markdown(elem_id="upload-result")
        with gr.Row():
            preset = gr.Dropdown(presets, value=first, label="Preset", scale=2,
                                 info="bucket settings start from the preset")
            patch = gr.Number(value=p0, label="Patch size (model)", interactive=False, precision=0,
                              info="sides are multiples of it")
            min_side = gr.Number(value=min0, label="Min side", precision=0,
                                 info="smaller images are skipped")
            max_side = gr.Number(value=max0, label="Max side", precision=0,
                                 info="longest bucket side in pixels")
            step = gr.Number(value=step0, label="Bucket step", precision=0,
                             info="pixels between base sizes")
            aspect = gr.Number(value=asp0, label="Max aspect", minimum=1.0, step=0.25,
                               info="long side / short side")
        with gr.Row():
            batch = gr.Number(value=bs0, label="Batch size", precision=0, minimum=1,
                              info="images per batch and GPU")
            gpus = gr.Number(label="GPUs", precision=0, value=1, minimum=1,
                             visible=studio.gpu_count > 1, info="plan for this many ranks")
            drop_last = gr.Checkbox(value=drop0, label="Drop incomplete last batches",
                                    info="else the last batch of a bucket is smaller")
            missing = gr.Radio(["skip", "default"], value=miss0, label="Images without a caption",
                               info="skip them, or train them with the default caption")
            include_reg = gr.Checkbox(value=reg0, label="Train regularisation folders",
                                      info="reg, class_images, N_reg... are left out unless "
                                           "checked (data.include_reg)")
            plan_btn = gr.Button("Preview buckets", variant="primary", scale=0, min_width=160)
        status = gr.Markdown(elem_classes="phdm-status")
        summary = gr.Markdown(elem_id="plan-summary")
        with gr.Row():
            hist = gr.BarPlot(elem_id="bucket-plot", x="bucket", y="samples",
                              label="Samples per epoch per bucket (images × repeats, smallest "
                                    "area first)", height=260,
                              scale=2, x_label_angle=-45, y_lim=[0, None])
            table = gr.Dataframe(headers=views.BUCKET_HEADERS, label="Buckets", interactive=False,
                                 max_height=300, scale=3, elem_id="bucket-table")
        with gr.Accordion("Health report", open=True):
            health_md = gr.Markdown(elem_id="health-summary")
            health_df = gr.Dataframe(headers=views.HEALTH_HEADERS, interactive=False,
                                     max_height=260, wrap=True, label="Files with problems",
                                     elem_id="health-table",
                                     column_widths=["9%", "38%", "23%", "30%"])
        with gr.Accordion("Crops (the dimmed part is cut off)", open=True):
            with gr.Row():
                order = gr.Radio(list(ORDERS), value="dataset", label="Order",
                                 info="'worst crop' shows the images that lose most first")
                bucket_filter = gr.Dropdown(["all"], value="all", label="Bucket")
                page = gr.Number(value=1, precision=0, minimum=1, label="Page")
                pages = gr.Markdown()
            thumbs = gr.Gallery(label="Crop boxes", columns=8, height="auto",
                                object_fit="contain", format="png", allow_preview=True,
                                fit_columns=False)

    # ---- handlers ------------------------------------------------------------------
    def dataset_root(choice, typed) -> Path | None:
        chosen = studio.chosen_dataset(choice, typed)
        return Path(chosen) if chosen else None

    def edited(min_s, max_s, stp, asp, bs, drop, miss, incl) -> dict:
        vals = dict(zip(EDITED_KEYS, (min_s, max_s, stp, asp, bs, drop, miss, incl)))
        for k in ("data.min_side", "data.max_side", "data.bucket_step", "train.batch_size"):
            if vals[k] is not None:
                vals[k] = int(vals[k])
        return vals

    def run_plan(*args):
        out = plan_outputs_for(*args)
        yield out
        # Gradio draws a bar plot whose category order changes from its previous data;
        # sending the data once more, alone, draws the new one
        pv = _PREVIEWS.get(tuple(out[selection].get("key") or ())) \
            if out.get(hist) is not None else None
        if pv is not None:
            yield {hist: views.bucket_frame(pv.plan)}

    def plan_outputs_for(choice, typed, preset_name, min_s, max_s, stp, asp, bs, drop, miss,
                         incl, n_gpus, order_v, bucket_v, page_v, sel) -> dict:
        vals = edited(min_s, max_s, stp, asp, bs, drop, miss, incl)
        empty = {summary: "", hist: None, table: None, health_md: "", health_df: None,
                 pages: "", thumbs: None, selection: sel}
        try:
            root = dataset_root(choice, typed)
            if root is None:
                return {status: "Choose a dataset above, type a folder path, or create the "
                                "demo dataset.", **empty}
            cfg = views.resolve_config(preset_name, settings_overrides(vals), str(root))
        except (PathError, config.ConfigError) as e:
            return {status: f"**Cannot preview:** {views.md(e)}", **empty}
        try:
            pv = preview(root, cfg, max(1, int(n_gpus or 1)), studio.cache_dir)
        except (DataError, OSError) as e:
            return {status: f"**Cannot read the dataset:** {views.md(e)}", **empty}
        used = ["all"] + [views.bucket_name(b.size) for b in pv.plan.buckets if b.images]
        bucket_v = bucket_v if bucket_v in used else "all"
        gallery, page_v, page_text = thumbnails(pv.plan, order_v, bucket_v, page_v)
        new_sel = {"path": str(root), "name": choice if not (typed or "").strip() else str(root),
                   "preset": preset_name, "overrides": settings_overrides(vals), "key": pv.key}
        return {status: plan_status(root, pv),
                summary: views.plan_summary(pv.plan, len(pv.scan.records),
                                             views.skipped_files(pv.scan)),
                hist: bucket_plot(pv.plan), table: views.bucket_rows(pv.plan),
                health_md: views.health_summary(pv.health),
                health_df: views.health_rows(pv.health),
                bucket_filter: gr.Dropdown(choices=used, value=bucket_v), page: page_v,
                pages: page_text, thumbs: gallery, selection: new_sel}

    def bucket_plot(plan: BucketPlan):
        frame = views.bucket_frame(plan)
        if not len(frame):
            return None
        return gr.BarPlot(frame, sort=list(frame["bucket"]))   # by area, as planned

    def repage(sel, order_v, bucket_v, page_v):
        """Thumbnails of the last plan of this selection (no rescan)."""
        pv = _PREVIEWS.get(tuple(sel.get("key") or ())) if sel else None
        if pv is None:
            return gr.skip()
        gallery, page_v, text = thumbnails(pv.plan, order_v, bucket_v, page_v)
        return {page: page_v, pages: text, thumbs: gallery}

    def make_demo():
        try:
            if create_demo(studio):
                gr.Info(f"Wrote the demo dataset to {studio.datasets_dir / DEMO_NAME}")
            elif (warning := old_demo_warning(studio)) is not None:
                gr.Warning(warning)
        except (DemoBusy, OSError) as e:
            gr.Warning(f"The demo dataset was not created: {e}")
            return {ds_choice: gr.Dropdown(choices=studio.dataset_names())}
        return {ds_choice: gr.Dropdown(choices=studio.dataset_names(), value=DEMO_NAME),
                ds_path: "", preset: DEFAULT_PRESET}

    def add_uploads(name, files):
        if not files:
            return {up_result: "Choose or drop some files first."}
        try:
            report = add_files(studio.datasets_dir, name, files, roots=studio.roots)
        except (PathError, OSError) as e:
            return {up_result: f"**Nothing was added:** {views.md(e)}"}
        return {up_result: report.markdown(), up_files: None,
                ds_choice: gr.Dropdown(choices=studio.dataset_names(), value=report.folder.name),
                ds_path: ""}

    settings = [min_side, max_side, step, aspect, batch, drop_last, missing, include_reg]
    plan_inputs = [ds_choice, ds_path, preset, *settings, gpus, order, bucket_filter, page,
                   selection]
    plan_outputs = [status, summary, hist, table, health_md, health_df, bucket_filter, page,
                    pages, thumbs, selection]
    plan_args = dict(fn=run_plan, inputs=plan_inputs, outputs=plan_outputs,
                     concurrency_limit=2, trigger_mode="always_last")

    refresh.click(lambda: gr.Dropdown(choices=studio.dataset_names()), outputs=ds_choice)
    up_btn.click(add_uploads, inputs=[up_name, up_files],
                 outputs=[up_result, up_files, ds_choice, ds_path],
                 concurrency_limit=1).then(**plan_args)
    ds_choice.change(lambda c: c or gr.skip(), inputs=ds_choice, outputs=up_name)
    demo.click(make_demo, outputs=[ds_choice, ds_path, preset]).then(**plan_args)
    preset.change(preset_values, inputs=preset,
                  outputs=[patch, *settings]).then(**plan_args)
    plan_btn.click(**plan_args)
    ds_choice.input(lambda: "", outputs=ds_path).then(**plan_args)
    ds_path.submit(**plan_args)
    for c in (min_side, max_side, step, aspect, batch, gpus):
        c.submit(**plan_args)
        c.blur(**plan_args)
    for c in (drop_last, missing, include_reg):
        c.input(**plan_args)
    page_inputs = [selection, order, bucket_filter, page]
    for c in (order, bucket_filter):
        c.input(lambda: 1, outputs=page).then(repage, inputs=page_inputs,
                                              outputs=[page, pages, thumbs])
    page.submit(repage, inputs=page_inputs, outputs=[page, pages, thumbs])
    return {"choice": ds_choice, "plan_args": plan_args}
