"""The studio in a real browser, the way a person uses it on a fresh workspace: the
first-start demo, the Dataset tab's bucket preview, a short tiny-cpu run watched live
and stopped, its checkpoint in the Checkpoints tab, and an image generated from it whose
settings are shown and recalled. The tests share one page and run in file order.

A full-page screenshot of each tab goes to $PIXELHDM_TEST_OUTPUT/screenshots (default
./test-output/screenshots).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Small enough to reach a checkpoint and a sample grid in seconds on two CPU cores; the
# step count is far away so that the run is still going when Stop is pressed.
SHORT_RUN = "\n".join([
    "train.max_steps=5000", "model.patch_layers=2", "model.pixel_layers=1",
    "train.batch_size=4", "train.log_every=5", "train.sample_every=20", "train.save_every=20",
    "train.val_every=20", "data.val_images=4", "data.max_side=32", "sample.steps=6",
    "train.cpu_threads=1"])


def expect(target):
    """Playwright's retrying assertions (imported here: without playwright the tests are
    skipped, not broken)."""
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(target)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    expect(page.get_by_role("tab", name=name, selected=True)).to_be_visible(timeout=30_000)


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, pattern: str, timeout: float = 30_000) -> None:
    """Wait until the text of `selector` matches the regular expression `pattern`."""
    page.wait_for_function(
        "([sel, pat]) => { const e = document.querySelector(sel);"
        " return !!e && new RegExp(pat).test(e.innerText); }",
        arg=[selector, pattern], timeout=timeout)


def fill_and_wait(page, box, text: str, selector: str, pattern: str, tries: int = 3) -> None:
    """Type `text` into `box` and wait for `selector` to match `pattern`, typing again if
    the box lost the text meanwhile: on a loaded machine an update of the previous test's
    (the Dataset tab's edits, which merge into the Train tab's overrides) can land over
    text typed in the first seconds."""
    for attempt in range(tries):
        box.fill(text)
        try:
            wait_text(page, selector, pattern, timeout=15_000)
            return
        except Exception:
            if attempt == tries - 1 or box.input_value() == text:
                raise


def test_first_start_offers_the_one_click_demo(page, studio_server, screenshots):
    _, workspace = studio_server
    demo = page.get_by_role("button", name="Start the demo")
    demo.wait_for(state="visible")
    page.screenshot(path=str(screenshots / "0-first-start.png"), full_page=True)
    demo.click()
    # the demo dataset is written, the tiny-cpu run starts and the Train tab opens, with
    # the run's monitor in place of "No run yet" in the same update
    page.get_by_role("tab", name="Train", selected=True).wait_for(timeout=60_000)
    assert not page.get_by_text("No run yet").is_visible()
    page.wait_for_selector(".phdm-progress.phdm-running, .phdm-progress.phdm-starting",
                           timeout=60_000)
    assert page.get_by_role("tab", name="Train", selected=True).is_visible()
    assert (workspace / "datasets" / "demo-shapes" / "README.txt").is_file()
    runs = list((workspace / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("tiny-cpu")
    config = (runs[0] / "config.yaml").read_text()
    assert "max_side: 32" in config and "rope_grid: 8" in config and "max_steps: 8000" in config
    assert "description: 'The demo: tiny-cpu on the demo shapes at 16-32 px" in config
    assert not demo.is_visible()
    # this one would train for minutes: stop it at once, the short run follows below
    page.get_by_role("button", name="Force stop").click()
    page.wait_for_selector(".phdm-progress.phdm-stopped, .phdm-progress.phdm-crashed",
                           timeout=90_000)


def test_dataset_tab_previews_buckets_crops_and_health(page, screenshots):
    open_tab(page, "Dataset")
    page.get_by_role("button", name="Create the demo dataset").click()
    wait_text(page, "#plan-summary", "training images of 4800 found",
                           timeout=60_000)
    summary = text_of(page, "#plan-summary")
    assert re.search(r"\d+ optimizer steps", summary)
    assert "Aspect error" in summary
    table = text_of(page, "#bucket-table")
    assert "64x64" in table and "total" in table
    page.wait_for_selector("#bucket-plot canvas, #bucket-plot svg")
    assert page.get_by_text("No problems in 4800 images").is_visible()
    assert page.get_by_text("decoded already").first.is_visible()      # the crop cache
    assert page.get_by_text("page 1 of").is_visible()
    thumbs = page.locator("button.thumbnail-item, .thumbnail-item")
    assert thumbs.count() >= 8
    # a live edit re-plans: a batch bigger than the demo's 4:3 buckets (about 960 images
    # each) leaves them under-filled
    batch = page.get_by_label("Batch size", exact=True)
    batch.fill("2048")
    batch.press("Enter")
    wait_text(page, "#plan-summary", "Warning:", timeout=30_000)
    batch.fill("16")
    batch.press("Enter")
    wait_text(page, "#plan-summary", "batches of up to 16", timeout=30_000)
    page.screenshot(path=str(screenshots / "1-dataset.png"), full_page=True)


def test_train_tab_validates_starts_watches_and_stops_a_run(page, screenshots):
    open_tab(page, "Train")
    page.get_by_text("New run", exact=True).click()        # the set-up box was folded
    overrides = page.get_by_label("Overrides: section.key=value, one per line")
    overrides.wait_for(state="visible")
    start = page.get_by_role("button", name="Start training")
    fill_and_wait(page, overrides, "train.nope=1", "#train-validity", "unknown key 'train.nope'")
    assert start.is_disabled()
    # path settings typed as overrides are held to the workspace like typed folders
    overrides.fill("loss.repa_layer=1\nloss.repa_teacher=/")
    wait_text(page, "#train-validity", "loss.repa_teacher: the path '/' is outside")
    assert start.is_disabled()
    overrides.fill("data.path=/")
    wait_text(page, "#train-validity", "data.path cannot be set by an override")
    assert start.is_disabled()
    overrides.fill(SHORT_RUN)
    wait_text(page, "#train-validity", "Valid settings")
    # sample prompts from the dataset's own captions, held-out images' first
    prompts = page.get_by_label("Sample prompts (empty: sample.prompts)")
    page.get_by_role("button", name="Use the dataset's captions").click()
    wait_text(page, "#train-validity", "Sample prompts: Valid: 4 prompts")
    assert all(line.endswith("background") for line in prompts.input_value().splitlines())
    prompts.fill("")
    expect(page.locator("#train-validity")).not_to_contain_text("Sample prompts")
    assert "demo-shapes" in text_of(page, "#train-validity")
    assert start.is_enabled()
    assert page.get_by_text("trained parameters").is_visible()
    page.get_by_role("button", name="Dry run (three real steps at the largest bucket)").click()
    wait_text(page, "#dry-run", r"s/step", timeout=120_000)
    start.click()
    wait_text(page, "#sample-note", r"step \d{7}", timeout=120_000)
    progress = text_of(page, ".phdm-progress")
    assert re.search(r"step \d[\d,]* / 5,000", progress)
    assert page.locator(".phdm-log pre").inner_text().count("\n") > 3
    # pause saves and exits; resume continues from that checkpoint
    page.get_by_role("button", name="Pause").click()
    page.wait_for_selector(".phdm-progress.phdm-paused", timeout=90_000)
    paused_at = int(re.search(r"step (\d+)", text_of(page, ".phdm-progress")).group(1))
    page.get_by_role("button", name="Resume").click()
    page.wait_for_selector(".phdm-progress.phdm-running", timeout=90_000)
    wait_text(page, ".phdm-log pre", f"resumed from step_{paused_at:07d}", timeout=60_000)
    page.get_by_role("button", name="Stop", exact=True).click()
    page.wait_for_selector(".phdm-progress.phdm-stopped", timeout=90_000)
    expect(page.get_by_role("button", name="Resume")).to_be_enabled(timeout=30_000)
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled(timeout=30_000)
    # a stopped run resumes to a step of one's choosing
    until = page.locator("#resume-until")
    expect(until).to_contain_text("to its end, step 5,000", timeout=30_000)
    stopped_at = int(re.search(r"step ([\d,]+)", text_of(page, ".phdm-progress"))
                     .group(1).replace(",", ""))
    until.locator("input").fill(str(stopped_at + 2))
    page.get_by_role("button", name="Resume").click()
    page.wait_for_selector(".phdm-progress.phdm-completed", timeout=120_000)
    end = f"{stopped_at + 2:,}"
    # the bar measures the schedule, not the step given
    wait_text(page, ".phdm-progress", f"Reached the step asked for[\\s\\S]*step {end} / 5,000")
    # stopped by the step given, it still resumes to the end of its schedule
    expect(until).to_contain_text("to its end, step 5,000", timeout=30_000)
    page.wait_for_timeout(2500)          # one more poll: plots and the final log lines
    page.screenshot(path=str(screenshots / "2-train.png"), full_page=True)


def test_checkpoints_tab_lists_pins_and_exports(page, studio_server, screenshots):
    _, workspace = studio_server
    open_tab(page, "Checkpoints")
    wait_text(page, "#checkpoint-table", "MiB")
    table = text_of(page, "#checkpoint-table")
    assert "yes" in table                       # EMA, resumable
    page.get_by_role("button", name="Pin / unpin (retention keeps pinned)").click()
    wait_text(page, "#checkpoint-message", "pinned")
    assert "pinned" in text_of(page, "#checkpoint-table")
    page.get_by_text("Export an inference file").click()
    page.get_by_role("button", name="Export", exact=True).click()
    wait_text(page, "#checkpoint-message", "Exported", timeout=60_000)
    exported = list((workspace / "models").glob("*.safetensors"))
    assert len(exported) == 1
    # the file can be downloaded from the page (a browser on another machine)
    link = page.locator("#exported-files a").first
    expect(link).to_have_text(exported[0].name, timeout=30_000)
    with page.expect_download() as got:
        link.click()
    assert got.value.suggested_filename == exported[0].name
    # a delete answers beside its buttons (unconfirmed here: nothing is deleted)
    page.get_by_text("Delete", exact=True).click()
    page.get_by_role("button", name="Delete this checkpoint").click()
    wait_text(page, "#delete-message", "Tick the confirmation box first")
    page.screenshot(path=str(screenshots / "3-checkpoints.png"), full_page=True)


def test_generate_from_the_checkpoint_and_recall_its_settings(page, studio_server, screenshots):
    _, workspace = studio_server
    open_tab(page, "Checkpoints")
    page.get_by_role("button", name="Generate with this").click()
    expect(page.get_by_role("tab", name="Generate", selected=True)).to_be_visible(timeout=30_000)
    page.wait_for_selector("text=default size 32x32")
    page.wait_for_selector("text=/trained at 32x32 \\(\\d+ images\\)/")   # what the run trained at
    # the run's sample settings, in place before the images are made with them
    expect(page.get_by_label("Width")).to_have_value("32", timeout=30_000)
    page.get_by_label("Prompt", exact=True).fill("a red circle on a white background")
    cancel = page.locator("#generate-cancel")
    expect(cancel).to_be_disabled()   # nothing to cancel yet
    page.get_by_role("button", name="Generate", exact=True).click()
    wait_text(page, "#generate-status", "Done:", timeout=120_000)
    expect(cancel).to_be_disabled(timeout=30_000)
    status = text_of(page, "#generate-status")
    seed = int(re.search(r"seed (\d+)", status).group(1))
    params = text_of(page, "#generate-params")
    assert "a red circle on a white background" in params and str(seed) in params
    outputs = sorted((workspace / "outputs").glob("*.png"))
    assert len(outputs) == 4
    with Image.open(outputs[0]) as image:
        assert image.size == (32, 32)
    page.screenshot(path=str(screenshots / "4-generate.png"), full_page=True)

    # dropping the first image back in restores its settings, seed included; a start image
    # left from an img2img generation is cleared (the first image was text to image)
    page.get_by_text("Image to image").click()
    page.locator("#start-image input[type=file]").set_input_files(str(outputs[1]))
    expect(page.locator("#start-image img")).to_have_count(1, timeout=30_000)
    page.locator("#recall-file input[type=file]").set_input_files(str(outputs[0]))
    wait_text(page, "#recalled-params", str(seed))
    page.get_by_label("Seed").fill("")
    page.get_by_role("button", name="Use these settings").click()
    wait_text(page, "#generate-status", "the start image is cleared")
    expect(page.locator("#start-image img")).to_have_count(0, timeout=30_000)
    assert page.locator("#generate-seed textarea, #generate-seed input").first.input_value() \
        == str(seed)
    assert Path(outputs[0]).stat().st_size > 0


def test_images_dropped_into_the_dataset_tab_become_a_dataset(page, studio_server, tmp_path,
                                                              screenshots):
    _, workspace = studio_server
    open_tab(page, "Dataset")
    page.get_by_text("Add images from this computer").click()
    files = []
    for i, colour in enumerate([(200, 20, 20), (20, 20, 200)]):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"pic {i}.png")
        (tmp_path / f"pic {i}.txt").write_text(f"picture number {i}")
        files += [str(tmp_path / f"pic {i}.png"), str(tmp_path / f"pic {i}.txt")]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    files.append(str(tmp_path / "broken.png"))
    page.get_by_label("Into the dataset").fill("my-pictures")
    page.locator("#upload-files input[type=file]").set_input_files(files)
    page.get_by_role("button", name="Add to the dataset").click()
    wait_text(page, "#upload-result", "Added 2 image", timeout=60_000)
    assert "broken.png" in text_of(page, "#upload-result")
    folder = workspace / "datasets" / "my-pictures"
    assert sorted(p.name for p in folder.iterdir()) == ["pic_0.png", "pic_0.txt", "pic_1.png",
                                                        "pic_1.txt"]
    wait_text(page, "#plan-summary", "2 training images of 2 found", timeout=60_000)
    page.screenshot(path=str(screenshots / "5-upload.png"), full_page=True)


def test_dataset_tab_shows_kohya_repeats_captions_and_reg_folders(page, studio_server,
                                                                  screenshots):
    _, workspace = studio_server
    root = workspace / "datasets" / "kohya-pets"
    for i in range(3):
        (root / "10_cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (200, 40 * i, 40)).save(root / "10_cat" / f"cat{i}.png")
        (root / "10_cat" / f"cat{i}.txt").write_text(f"a cat, number {i}")
    (root / "3_dog style").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 32), (40, 40 * i, 200)).save(root / "3_dog style" / f"dog{i}.png")
        (root / "3_dog style" / f"dog{i}.caption").write_text(f"a dog, number {i}")
    (root / "hf").mkdir()
    Image.new("RGB", (48, 48), (30, 160, 30)).save(root / "hf" / "leaf.png")
    (root / "hf" / "metadata.jsonl").write_text('{"file_name": "leaf.png", "text": "a leaf"}\n'
                                                 'not json\n')
    (root / "reg").mkdir()
    for i in range(2):
        Image.new("RGB", (48, 48), (90, 90, 20 * i)).save(root / "reg" / f"r{i}.png")
        (root / "reg" / f"r{i}.txt").write_text("an animal")
    open_tab(page, "Dataset")
    page.get_by_role("button", name="Refresh list").click()
    choice = page.get_by_label("Dataset in workspace/datasets")
    choice.click()
    page.get_by_role("option", name="kohya-pets").click()
    # 3 cats x10 + 2 dogs x3 + 1 leaf = 37 samples an epoch, less the one image that
    # tiny-cpu holds out for validation (a fifth of 6, rounded down)
    wait_text(page, "#plan-summary", r"of 6 found, 1\s+held out", timeout=60_000)
    wait_text(page, "#plan-summary", r"kohya repeats: \d+ samples per epoch")
    samples = int(re.search(r"kohya repeats: (\d+) samples",
                            text_of(page, "#plan-summary")).group(1))
    assert samples in (37 - 10, 37 - 3, 37 - 1)
    wait_text(page, "#health-summary", "Dataset conventions found")
    health = text_of(page, "#health-summary")
    assert "kohya repeats: 10_cat/ ×10 (3 images), 3_dog style/ ×3 (2 images)" in health
    assert "captions: 3 .txt, 2 .caption, 1 from metadata.jsonl" in health
    assert "regularisation folders left out (set data.include_reg = true" in health
    assert "reg/ (2 images)" in health
    table = text_of(page, "#bucket-table")
    assert "Samples (images × repeats)" in table
    assert str(samples) in table
    assert "reg/r0.png" in text_of(page, "#health-table")       # errors come first
    page.screenshot(path=str(screenshots / "6-conventions.png"), full_page=True)
    # asked for, the regularisation images train as ordinary ones
    page.get_by_label("Train regularisation folders").check()
    wait_text(page, "#health-summary", "trained as ordinary images", timeout=30_000)
    wait_text(page, "#plan-summary", r"of 8 found")
    assert "reg/ (2 images)" in text_of(page, "#health-summary")
    page.get_by_label("Train regularisation folders").uncheck()     # back to the default
    wait_text(page, "#health-summary", "regularisation folders left out", timeout=30_000)


def test_an_export_with_a_title_travels_and_generate_takes_a_text_encoder(page, studio_server,
                                                                          screenshots):
    from engine.checkpoint import read_modelspec
    from tests.test_export import header, strings

    _, workspace = studio_server
    open_tab(page, "Checkpoints")
    title_box = page.locator("#export-title textarea, #export-title input").first
    if not title_box.is_visible():
        page.get_by_text("Export an inference file").click()
    page.get_by_label("File name (letters, digits, - _ .)").fill("travel-test")
    title_box.fill("Shapes that travel")
    page.get_by_role("button", name="Export", exact=True).click()
    wait_text(page, "#checkpoint-message", "travel-test.safetensors.*Shapes that travel",
              timeout=60_000)
    assert "titled" in text_of(page, "#checkpoint-message")
    exported = workspace / "models" / "travel-test.safetensors"
    spec = read_modelspec(exported)
    assert spec["title"] == "Shapes that travel" and spec["resolution"] == "32x32"
    assert not [v for v in strings(header(exported)) if str(workspace) in v]

    open_tab(page, "Generate")
    field = page.get_by_label("Text encoder (folder or hub id, optional)")
    expect(field).to_be_visible(timeout=30_000)
    page.locator("#generate-checkpoint input").first.click()
    page.get_by_role("option", name="exported · travel-test").click()
    wait_text(page, "#generate-model-info", "Shapes that travel", timeout=30_000)
    assert "builtin text encoder" in text_of(page, "#generate-model-info")
    page.screenshot(path=str(screenshots / "8-export.png"), full_page=True)
    # the field is a path typed into the page: one outside the workspace is refused
    field.fill("../../outside")
    page.get_by_role("button", name="Generate", exact=True).click()
    wait_text(page, "#generate-status", "Text encoder: the path", timeout=30_000)
    assert "outside the folders the studio may use" in text_of(page, "#generate-status")
    field.fill("")


def test_sample_prompts_are_edited_for_a_run_and_for_a_new_one(page, studio_server, screenshots):
    _, workspace = studio_server
    open_tab(page, "Train")
    editor = page.locator("#sample-prompts textarea")
    expect(editor).to_have_value(re.compile("a red circle on a white background"),
                                 timeout=30_000)   # the short run's file, as it wrote it
    editor.fill("a red circle on a white background --d 5 --x 1\na blue square")
    wait_text(page, "#sample-prompts-validity", "Not valid: line 1: unknown option --x")
    edited = ("# edited in the studio\na red circle on a white background --w 32 --h 32 --d 5"
              "\na blue square on a yellow background --l 3 --s 4\n")
    editor.fill(edited)
    wait_text(page, "#sample-prompts-validity", "Valid: 2 prompts")
    page.get_by_role("button", name="Save prompts").click()
    wait_text(page, "#sample-prompts-validity", "Saved: 2 prompts .* seeds 5, 1")
    saved = [p for p in (workspace / "runs").glob("*/sample_prompts.txt")
             if p.read_text() == edited]
    assert len(saved) == 1   # in the folder of the run shown, nowhere else
    shown = [r.input_value() for r in page.get_by_label("Run", exact=True).all()
             if r.is_visible()]
    assert len(shown) == 1 and saved[0].parent.name in shown[0]
    # a new run takes prompts too: checked with the rest of its settings
    if not page.get_by_label("Sample prompts (empty: sample.prompts)").is_visible():
        page.get_by_text("New run", exact=True).click()
    new = page.get_by_label("Sample prompts (empty: sample.prompts)")
    new.fill("a green star --w 33")
    wait_text(page, "#train-validity", "Sample prompts: Not valid: line 1: --w 33")
    assert page.get_by_role("button", name="Start training").is_disabled()
    new.fill("a green star --w 16 --d 3")
    wait_text(page, "#train-validity", "Sample prompts: Valid: 1 prompt")
    expect(page.get_by_role("button", name="Start training")).to_be_enabled(timeout=30_000)
    editor.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshots / "7-sample-prompts.png"), full_page=True)
    new.fill("")


def test_a_new_run_starts_from_a_checkpoint_of_the_checkpoints_tab(page, studio_server,
                                                                     screenshots):
    open_tab(page, "Checkpoints")
    run_box = page.get_by_label("Run", exact=True).locator("visible=true").first
    expect(run_box).not_to_have_value("", timeout=30_000)
    expect(page.get_by_label("Checkpoint", exact=True).locator("visible=true").first
           ).not_to_have_value("", timeout=30_000)
    page.get_by_role("button", name="Train from this").click()
    expect(page.get_by_role("tab", name="Train", selected=True)).to_be_visible(timeout=30_000)
    overrides = page.get_by_label("Overrides: section.key=value, one per line")
    expect(overrides).to_have_value(re.compile(r"train\.init_from=run/[^/\n]+/\d+"),
                                    timeout=30_000)
    wait_text(page, "#train-validity", "Valid settings")
    assert "init_from" in text_of(page, "#train-validity") or \
        "train.init_from" in overrides.input_value()
    # the checkpoint's own dataset replaces the one chosen before (kohya-pets): the demo's
    expect(page.get_by_label("Dataset", exact=True).locator("visible=true").first
           ).to_have_value("demo-shapes", timeout=30_000)
    page.screenshot(path=str(screenshots / "9-train-from-checkpoint.png"), full_page=True)
    # a change of the network's shape is refused by name before anything starts
    overrides.fill(overrides.input_value() + "\nmodel.pixel_layers=3")
    wait_text(page, "#train-validity", r"model\.pixel_layers .* in the checkpoint")
    assert page.get_by_role("button", name="Start training").is_disabled()
    overrides.fill("")


def test_a_gpu_preset_on_a_cpu_only_machine_is_warned_about(page, screenshots):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    open_tab(page, "Train")
    if not page.get_by_role("button", name="Start training").is_visible():
        page.get_by_text("New run", exact=True).click()
    page.get_by_label("Preset", exact=True).locator("visible=true").first.click()
    page.get_by_role("option", name="home-8gb").click()
    wait_text(page, "body", "Warning: this config is sized for a GPU", timeout=60_000)
    page.screenshot(path=str(screenshots / "10-gpu-preset-on-cpu.png"), full_page=True)

