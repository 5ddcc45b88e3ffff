"""The dataset conventions other tools use (engine.conventions): kohya N_name repeat
folders through the scan, the plan, the sampler, the loader and the trainer's epoch;
.caption files and metadata.jsonl captions with their precedence and problems;
regularisation and class folders left out unless asked for; and what the report, the
health summary and the bucket views say about each."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from engine.buckets import BucketBatchSampler, plan_buckets
from engine.config import DataConfig, field_docs, load_preset
from engine.conventions import MAX_REPEATS, folder_rule
from engine.data import health_report, main, scan_dataset
from engine.dataset import BucketDataset, make_loader
from engine.report import why_nothing_trains
from engine.train import main as train_main
from studio import views


def cfg(**kw) -> DataConfig:
    return replace(DataConfig(min_side=32, max_side=64, bucket_step=16, val_images=0,
                              workers=0), **kw)


def img(path: Path, caption: str | None = "a caption", size=(64, 64), ext: str = ".txt"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (len(path.name) * 20 % 255, 90, 160)).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")
    return path


def kohya(root: Path) -> Path:
    """10_cat: 3 images x10, '3_dog style': 2 wide images x3, plain/: 2 images x1."""
    for i in range(3):
        img(root / "10_cat" / f"cat{i}.png", f"a cat {i}")
    for i in range(2):
        img(root / "3_dog style" / f"dog{i}.png", f"a dog {i}", size=(64, 32))
    for i in range(2):
        img(root / "plain" / f"p{i}.png", f"plain {i}")
    return root


def problems_of(scan) -> dict:
    return {p.kind: p for p in scan.problems}


# --------------------------------------------------------------------------------------
# Folder names
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder,repeats,repeat_folder,reg,plain", [
    ("", 1, "", "", ""),
    ("plain/sub", 1, "", "", ""),
    ("10_cat", 10, "10_cat/", "", ""),
    ("10_cat/sub", 10, "10_cat/", "", ""),
    ("10_cat/2_close", 2, "10_cat/2_close/", "", ""),    # the innermost N_name folder wins
    ("0_old/3_new", 3, "0_old/3_new/", "", ""),
    ("3_dog style", 3, "3_dog style/", "", ""),
    ("0_old", 0, "0_old/", "", ""),
    ("007_bond", 7, "007_bond/", "", ""),
    (f"{MAX_REPEATS}_max", MAX_REPEATS, f"{MAX_REPEATS}_max/", "", ""),
    ("2024_trip", 1, "", "", "2024_trip/"),             # a year, not a repeat count
    ("5_cat/2024_trip", 5, "5_cat/", "", "5_cat/2024_trip/"),
    ("10_", 1, "", "", ""),
    ("reg/1_person", 1, "reg/1_person/", "reg/", ""),
    ("img/Regularisation", 1, "", "img/Regularisation/", ""),
    ("regularization_images/x", 1, "", "regularization_images/", ""),
    ("1_reg dog", 1, "1_reg dog/", "1_reg dog/", ""),
    ("class_images", 1, "", "class_images/", ""),
    ("CLASS", 1, "", "CLASS/", ""),
    ("classic cars", 1, "", "", ""),
    ("my reg", 1, "", "", ""),
    ("regatta", 1, "", "", ""),
])
def test_folder_rule(folder, repeats, repeat_folder, reg, plain):
    rule = folder_rule(folder)
    assert (rule.repeats, rule.repeat_folder, rule.reg_folder) == (repeats, repeat_folder, reg)
    assert rule.plain == ((plain,) if plain else ())


# --------------------------------------------------------------------------------------
# Repeats: scan -> plan -> sampler -> loader -> trainer
# --------------------------------------------------------------------------------------

def test_repeats_count_in_the_plan_and_the_epoch(tmp_path):
    root = kohya(tmp_path / "data")
    cache = tmp_path / "index.json"
    scan = scan_dataset(root, cfg(), cache_path=cache)
    assert {r.rel: r.repeats for r in scan.records} == {
        **{f"10_cat/cat{i}.png": 10 for i in range(3)},
        **{f"3_dog style/dog{i}.png": 3 for i in range(2)},
        "plain/p0.png": 1, "plain/p1.png": 1}
    assert scan_dataset(root, cfg(), cache_path=cache).records == scan.records  # cached headers
    assert scan.conventions.repeat_folders == {"10_cat/": [10, 3], "3_dog style/": [3, 2]}
    plan = plan_buckets(scan.records, cfg(), 8, 4)
    by = {b.size: b for b in plan.buckets if b.images}
    assert (by[(64, 64)].images, by[(64, 64)].samples, by[(64, 64)].batches) == (5, 32, 8)
    assert (by[(64, 32)].images, by[(64, 32)].samples, by[(64, 32)].batches) == (2, 6, 2)
    assert by[(64, 32)].last_batch == 2
    assert plan.batches_per_epoch == 10 and plan.samples_per_epoch == 38 and plan.repeated
    # 2 images x3 fill a batch of 4: not reported as an under-filled bucket
    assert not any("fewer images than a global batch" in w for w in plan.warnings)
    assert plan_buckets(scan.records, cfg(), 8, 4, grad_accum=2).steps_per_epoch == 5
    assert json.loads(json.dumps(plan.to_dict()))["images"][0]["repeats"] == 10
    held = plan_buckets(scan.records, cfg(val_images=1), 8, 4)      # held out: once, no repeats
    assert len(held.val_images) == 1 and held.samples_per_epoch == 38 - held.val_images[0].repeats


def test_sampler_repeats_each_image_and_resumes_mid_epoch():
    buckets = [(64, 64)] * 5 + [(64, 32)] * 3
    repeats = [10, 10, 1, 1, 2, 3, 3, 1]
    s = BucketBatchSampler(buckets, 4, seed=5, repeats=repeats)
    epoch0 = [list(b) for b in s]
    counts = Counter(k.index for b in epoch0 for k in b)
    assert counts == Counter({i: r for i, r in enumerate(repeats)})
    copies = {i: sorted(k.copy for b in epoch0 for k in b if k.index == i) for i in range(8)}
    assert copies[0] == list(range(10)) and copies[5] == [0, 1, 2]
    assert len(s) == len(epoch0) == plan_len(buckets, repeats, 4)
    for b in epoch0:
        assert len({buckets[k.index] for k in b}) == 1
    s.set_epoch(0)
    assert [list(b) for b in s] == epoch0                          # deterministic per epoch
    s.set_epoch(1)
    epoch1 = [list(b) for b in s]
    assert [[k.index for k in b] for b in epoch1] != [[k.index for k in b] for b in epoch0]
    # exact resume in the middle of an epoch
    s.set_epoch(3)
    it = iter(s)
    [next(it) for _ in range(4)]
    state = json.loads(json.dumps(s.state_dict()))
    rest = list(it)
    fresh = BucketBatchSampler(buckets, 4, seed=5, repeats=repeats)
    fresh.load_state_dict(state)
    assert list(fresh) == rest and state["position"] == 4
    # other repeats are other data; all ones are the plain sampler, fingerprint included
    with pytest.raises(ValueError, match="repeats"):
        BucketBatchSampler(buckets, 4, seed=5, repeats=[1] * 8).load_state_dict(state)
    plain = BucketBatchSampler(buckets, 4, seed=5)
    ones = BucketBatchSampler(buckets, 4, seed=5, repeats=[1] * 8)
    assert plain.fingerprint == ones.fingerprint and list(plain) == list(ones)
    with pytest.raises(ValueError, match="one repeat count >= 1 per image"):
        BucketBatchSampler(buckets, 4, repeats=[1] * 7)
    with pytest.raises(ValueError, match="one repeat count >= 1 per image"):
        BucketBatchSampler(buckets, 4, repeats=[0] + [1] * 7)
    # two ranks in step, every copy trained once between them
    ranks = [list(BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2,
                                     repeats=repeats)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    both = Counter((k.index, k.copy) for r in ranks for b in r for k in b)
    assert set(both) == {(i, c) for i, r in enumerate(repeats) for c in range(r)}


def plan_len(buckets, repeats, batch) -> int:
    per = Counter()
    for b, r in zip(buckets, repeats):
        per[b] += r
    return sum(-(-n // batch) for n in per.values())


def test_loader_trains_every_copy_with_its_own_crop(tmp_path):
    root = tmp_path / "data"
    img(root / "4_wide" / "w.png", "a wide one", size=(120, 64))
    img(root / "x.png", "a square")
    c = cfg(crop="random", flip=True)
    plan = plan_buckets(scan_dataset(root, c).records, c, 8, 2)
    loader, sampler = make_loader(plan, c, seed=3)
    sampler.set_epoch(2)
    batches = list(loader)
    assert len(batches) == plan.batches_per_epoch == len(sampler)
    paths = Counter(Path(p).name for b in batches for p in b.paths)
    assert paths == Counter({"w.png": 4, "x.png": 1})
    ds = BucketDataset(plan.images, crop="random", flip=True, seed=3)
    w = [im.rel for im in plan.images].index("4_wide/w.png")
    boxes = {ds.crop_at(w, 2, copy) for copy in range(4)}
    assert len(boxes) == 4                                         # four different crops
    assert ds.augmentation(w, 2) == ds.augmentation(w, 2, 0)


def test_trainer_epoch_length_counts_repeats(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(2):
        img(root / "3_things" / f"t{i}.png", f"thing {i}")
    # 2 images x3 = 6 samples at batch 2: an epoch is 3 steps
    assert train_main(["--preset", "tiny-cpu", "--data", str(root), "--run-dir",
                       str(tmp_path / "run"), "--max-steps", "4",
                       "--set", "train.sample_every=0", "--set", "train.batch_size=2",
                       "--set", "data.val_images=0", "--set", "train.save_every=1000"]) == 0
    err = capsys.readouterr().err
    assert "3 batches per epoch" in err and "epoch 1 begins at step 3" in err


# --------------------------------------------------------------------------------------
# Folders left out: 0_name and regularisation sets
# --------------------------------------------------------------------------------------

def test_zero_repeat_and_plain_number_folders(tmp_path):
    root = kohya(tmp_path / "data")
    img(root / "0_old" / "o.png", "old")
    img(root / "0_old" / "2_keep" / "k.png", "kept")
    img(root / "2024_trip" / "t.png", "trip")
    scan = scan_dataset(root, cfg())
    rels = {r.rel: r.repeats for r in scan.records}
    assert "0_old/o.png" not in rels and rels["0_old/2_keep/k.png"] == 2
    assert rels["2024_trip/t.png"] == 1
    found = problems_of(scan)
    zero = found["zero_repeats"]
    assert zero.severity == "error" and zero.files == {"0_old/o.png": "in 0_old/"}
    assert "rename the folder to N_name" in zero.message
    assert "orphan_caption" not in found                       # o.txt belongs to o.png
    assert found["not_repeats"].files == {"2024_trip/": "not a repeat count: a plain folder"}
    assert scan.conventions.zero_folders == {"0_old/": 1}
    only_zero = tmp_path / "zero"
    img(only_zero / "0_x" / "a.png")
    scan = scan_dataset(only_zero, cfg())
    why = why_nothing_trains(scan, plan_buckets(scan.records, cfg(), 8, 4))
    assert why.startswith("none of the 1 image file(s)") and "1 zero repeats" in why


def test_regularisation_folders_are_left_out_unless_included(tmp_path):
    root = kohya(tmp_path / "data")
    for i in range(3):
        img(root / "reg" / "1_person" / f"r{i}.png", "a person")
    img(root / "class_images" / "c.png", "a cat")
    scan = scan_dataset(root, cfg())
    assert not any(r.rel.startswith(("reg/", "class_images/")) for r in scan.records)
    reg = problems_of(scan)["regularisation"]
    assert reg.severity == "error" and "data.include_reg = true" in reg.message
    assert reg.files["reg/1_person/r0.png"] == "in reg/" and len(reg.files) == 4
    assert scan.conventions.reg_folders == {"reg/": 3, "class_images/": 1}
    assert any("left out (set data.include_reg = true" in line and "reg/ (3 images)" in line
               for line in scan.conventions.lines())
    run_cfg = load_preset("tiny-cpu", ["data.include_reg=true"])
    assert run_cfg.data.include_reg and field_docs()["data.include_reg"].strip()
    included = scan_dataset(root, replace(cfg(), include_reg=True))
    rels = {r.rel: r.repeats for r in included.records}
    assert rels["reg/1_person/r2.png"] == 1 and "class_images/c.png" in rels
    assert "regularisation" not in problems_of(included)
    assert any(line.startswith("regularisation folders trained as ordinary images")
               for line in included.conventions.lines())


# --------------------------------------------------------------------------------------
# Captions: .txt, .caption, metadata.jsonl
# --------------------------------------------------------------------------------------

def test_caption_files_txt_wins_over_caption(tmp_path):
    img(tmp_path / "a.png", "from caption", ext=".caption")
    img(tmp_path / "b.png", None)
    (tmp_path / "b.txt").write_bytes(b"from\r\n  txt\t\r\n")      # on one line as it trains
    (tmp_path / "b.caption").write_text("ignored")
    img(tmp_path / "c.png", None)
    (tmp_path / "c.CAPTION").write_bytes("caf\xe9".encode("utf-16"))
    (tmp_path / "lost.caption").write_text("no image")
    scan = scan_dataset(tmp_path, cfg())
    caps = {r.rel: r.caption for r in scan.records}
    assert caps == {"a.png": "from caption", "b.png": "from txt", "c.png": "caf\xe9"}
    found = problems_of(scan)
    assert found["caption_conflict"].files == {"b.png": "b.txt is used; ignored: b.caption"}
    assert found["caption_conflict"].severity == "warning"
    assert found["orphan_caption"].files == {"lost.caption": "no image with this name"}
    assert scan.conventions.captions == {".caption": 2, ".txt": 1}
    assert "captions: 1 .txt, 2 .caption" in scan.conventions.lines()


def test_metadata_jsonl_captions_and_its_problems(tmp_path):
    root = tmp_path / "data"
    for name in ("a.png", "sub/b.png", "sub/c.png", "d.png", "e.png", "sub/f.png"):
        img(root / name, None)
    (root / "d.txt").write_text("d from its own file")
    lines = [{"file_name": "a.png", "text": " a from jsonl "},
             {"file_name": "sub/b.png", "caption": "b by the caption key"},
             "{not json",
             ["a", "list"],
             {"text": "no file name"},
             {"file_name": "e.png"},
             {"file_name": "gone.png", "text": "x"},
             {"file_name": "../outside.png", "text": "x"},
             {"file_name": "a.png", "text": "second time"},
             {"file_name": "d.png", "text": "d from jsonl"},
             {"file_name": "sub/c.png", "text": "c from the root jsonl"},
             {"file_name": "e.png", "text": 5}]
    (root / "metadata.jsonl").write_text("\n".join(
        x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "text": "c from the nearer jsonl"}) + "\n"
        + json.dumps({"file_name": "f.png", "text": ""}) + "\n")
    scan = scan_dataset(root, cfg())
    caps = {r.rel: r.caption for r in scan.records}
    assert caps == {"a.png": "a from jsonl", "sub/b.png": "b by the caption key",
                    "sub/c.png": "c from the nearer jsonl", "d.png": "d from its own file",
                    "e.png": None, "sub/f.png": None}
    found = problems_of(scan)
    bad = found["metadata_line"].files
    assert set(bad) == {f"metadata.jsonl line {n}" for n in (3, 4, 5, 6, 8, 9, 12)}
    assert bad["metadata.jsonl line 3"].startswith("not valid JSON")
    assert "not an object" in bad["metadata.jsonl line 4"]
    assert "no file_name" in bad["metadata.jsonl line 5"]
    assert "no text (or caption) for 'e.png'" == bad["metadata.jsonl line 6"]
    assert "outside the folder" in bad["metadata.jsonl line 8"]
    assert "already on line 1" in bad["metadata.jsonl line 9"]
    assert "text of 'e.png' is not a string" == bad["metadata.jsonl line 12"]
    assert found["metadata_missing_file"].files == {
        "metadata.jsonl line 7": "no image 'gone.png' in the dataset"}
    conflict = found["caption_conflict"].files
    assert conflict == {"d.png": "d.txt is used; ignored: metadata.jsonl line 10",
                        "sub/c.png": "sub/metadata.jsonl line 1 is used; ignored: "
                                     "metadata.jsonl line 11"}
    assert found["empty_caption"].files == {"sub/f.png": "sub/metadata.jsonl line 2 has an "
                                                         "empty text"}
    assert set(found["missing_caption"].files) == {"e.png"}
    assert scan.conventions.captions == {"metadata.jsonl": 3, ".txt": 1}
    assert scan.conventions.metadata_files == {"metadata.jsonl": 4, "sub/metadata.jsonl": 2}
    broken = tmp_path / "broken"
    img(broken / "x.png", "x")
    (broken / "metadata.jsonl").write_bytes(b"\xff\xfe\x00bad")
    note = problems_of(scan_dataset(broken, cfg()))["metadata_line"].files["metadata.jsonl"]
    assert note.startswith("not UTF-8 text")


# --------------------------------------------------------------------------------------
# What the report and the studio say
# --------------------------------------------------------------------------------------

def test_report_and_studio_views_show_the_conventions(tmp_path, capsys):
    root = kohya(tmp_path / "data")
    img(root / "plain" / "q.png", "from caption", ext=".caption")
    img(root / "reg" / "r.png", "a person")
    assert main(["report", str(root), "--preset", "tiny-cpu", "--set", "data.val_images=0"]) == 0
    out = capsys.readouterr().out
    assert ("Found     kohya repeats: 10_cat/ ×10 (3 images), 3_dog style/ ×3 (2 images)"
            in out)
    assert "captions: 7 .txt, 1 .caption" in out and "reg/ (1 image)" in out
    assert "with kohya repeats 39 samples an epoch" in out and "(39 samples over 1" in out
    assert main(["report", str(root), "--preset", "tiny-cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["health"]["conventions"]["repeat_folders"]["10_cat/"] == [10, 3]
    assert data["scan"]["conventions"]["reg_folders"] == {"reg/": 1}

    scan = scan_dataset(root, cfg())
    plan = plan_buckets(scan.records, cfg(), 8, 4)
    text = views.health_summary(health_report(scan))
    assert "**Dataset conventions found**" in text
    assert r"- kohya repeats: 10\_cat/ ×10 (3 images), 3\_dog style/ ×3 (2 images)" in text
    assert "regularisation folders left out" in text and "1 file(s) will not be trained" in text
    assert "kohya repeats: **39** samples per epoch" in views.plan_summary(plan, 9)
    frame = views.bucket_frame(plan)
    assert list(frame["samples"]) == [6, 33] and list(frame["images"]) == [2, 6]
    rows = views.bucket_rows(plan)
    assert len(rows[0]) == len(views.BUCKET_HEADERS)
    samples = views.BUCKET_HEADERS.index("Samples (images × repeats)")
    assert [r[samples] for r in rows] == [6, 33, 39]
    plain = tmp_path / "plain"
    img(plain / "a.png")
    scan = scan_dataset(plain, cfg())
    assert views.health_summary(health_report(scan)) == "No problems in 1 images."
    assert "repeats" not in views.plan_summary(plan_buckets(scan.records, cfg(), 8, 4), 1)
