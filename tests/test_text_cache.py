"""The disk cache of a frozen text encoder's features: a lookup gives what the encoder
gives, builds are incremental, keyed by the encoder, locked and robust to damage, and a
training run reads it with the encoder unloaded."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from tiny import LEARNER, as_sets

from engine.config import TextConfig
from engine.encoders import Qwen3TextEncoder, load_text_encoder
from engine.text_features import (
    TextFeatureCache,
    TextFeatureError,
    build_text_features,
    cached_text_encoder,
    text_cache_root,
)

LONG = "a small yellow star on a purple background " * 12   # over max_tokens below
CAPS = ["a red circle on a white background", "a blue square at the top left", "a cat",
        "a large green triangle", "a photo of a cat", "an apple on a wooden table",
        "a lighthouse at sunset", "cat", LONG, "ünïcödé caption ✓"]


def qwen_cfg(folder, cache, **kw) -> TextConfig:
    return TextConfig(encoder="qwen3", name_or_path=str(folder), cache_dir=str(cache),
                      max_tokens=kw.pop("max_tokens", 16), **kw)


def counting(enc: Qwen3TextEncoder) -> list[str]:
    """Record every caption `enc` encodes."""
    seen: list[str] = []
    encode = enc.encode

    def wrapped(prompts):
        seen.extend(prompts)
        return encode(prompts)

    enc.encode = wrapped
    return seen


def shards(cache: TextFeatureCache) -> list[Path]:
    return sorted(cache.folder.glob("shard-*.safetensors"))


@pytest.fixture(scope="module")
def enc(tiny_qwen3):
    return load_text_encoder(qwen_cfg(tiny_qwen3, "unused"))


def test_a_lookup_is_what_the_encoder_gives(enc, tiny_qwen3, tmp_path):
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    cache = build_text_features(enc, CAPS + [""], cfg, log=lambda _: None, batch_size=3)
    assert len(cache) == len(CAPS) and cache.dim == enc.dim and not cache.missing(CAPS + [""])
    batches = [CAPS, ["a cat", "", LONG, "a cat"], [""], ["", ""], ["cat"], CAPS[::-1][:5]]
    for batch in batches:
        got, want = cache.encode(batch), enc.encode(batch)
        assert got.tokens.shape == want.tokens.shape and got.tokens.dtype == want.tokens.dtype
        assert torch.equal(got.mask, want.mask), batch
        assert got.mask.device.type == "cpu" and got.dense == bool(want.mask.all())
        # padding rows and the empty prompt are exactly zero, as the encoder's
        assert torch.equal(got.tokens[~got.mask], want.tokens[~want.mask])
        for i, c in enumerate(batch):
            if not c:
                assert got.tokens[i].abs().sum() == 0 and got.pooled[i].abs().sum() == 0
        # real tokens: equal up to float summation order (the encoder ran other batches)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)
    # a caption encoded alone gives its stored features bit for bit
    for c in ("a cat", LONG):
        alone = enc.encode([c])
        got = cache.encode([c])
        assert torch.equal(got.tokens, alone.tokens) and torch.equal(got.pooled, alone.pooled)
    assert cache.encode([LONG]).tokens.shape[1] == 16   # truncated like the encoder


def test_features_for_a_gpu_are_built_in_pinned_memory(enc, tiny_qwen3, tmp_path,
                                                       monkeypatch):
    """Every micro-batch's features go from the cache to the GPU: from pinned memory and
    non-blocking, since CUDA may drain the GPU's queue to stage a copy from pageable
    memory. (No GPU here: the pinning and the copy are recorded, not made.)"""
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    build_text_features(enc, CAPS, cfg, log=lambda _: None)
    want = TextFeatureCache(text_cache_root(cfg), enc.folder, 16, enc.model.dtype).encode(
        ["a cat", CAPS[0]])
    pinned, copies = [], []
    real_zeros, real_to = torch.zeros, torch.Tensor.to

    def zeros(*args, pin_memory=False, **kwargs):
        t = real_zeros(*args, **kwargs)
        pinned.append(pin_memory)
        return t

    def to(t, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if device is not None and torch.device(device).type == "cuda":
            copies.append(kwargs.get("non_blocking", False))
            return t
        return real_to(t, *args, **kwargs)
    cache = TextFeatureCache(text_cache_root(cfg), enc.folder, 16, enc.model.dtype, "cuda")
    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.Tensor, "to", to)
    got = cache.encode(["a cat", CAPS[0]])
    assert pinned == [True, True, True] and copies == [True, True, True]
    assert torch.equal(got.mask, want.mask) and torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.pooled, want.pooled)


def test_a_second_build_encodes_nothing_and_new_captions_add_a_shard(enc, tiny_qwen3,
                                                                      tmp_path):
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    seen = counting(enc)
    try:
        first = build_text_features(enc, CAPS[:6] + [""], cfg, log=lambda _: None)
        assert sorted(seen) == sorted(CAPS[:6]) and len(shards(first)) == 1
        old = shards(first)[0]
        stamp = (old.stat().st_size, old.stat().st_mtime_ns)
        seen.clear()
        again = build_text_features(enc, CAPS[:6] + [""], cfg, log=lambda _: None)
        assert seen == [] and again.folder == first.folder and len(again) == 6
        more = build_text_features(enc, CAPS, cfg, log=lambda _: None)
        assert sorted(seen) == sorted(CAPS[6:])            # only the new ones
        assert len(shards(more)) == 2 and (old.stat().st_size, old.stat().st_mtime_ns) == stamp
        index = json.loads((more.folder / "index.json").read_text())
        assert sorted(s["file"] for s in index["shards"]) == [p.name for p in shards(more)]
        assert sum(s["captions"] for s in index["shards"]) == len(CAPS) == len(more)
    finally:
        del enc.encode


def test_an_interrupted_build_keeps_its_shards_and_reports_progress(enc, tiny_qwen3, tmp_path,
                                                                   monkeypatch):
    import engine.shard_store as shard_store

    monkeypatch.setattr(shard_store, "PROGRESS_SECONDS", 0.0)
    cache = TextFeatureCache(tmp_path, tiny_qwen3, 16, torch.float32, encoder=enc,
                             log=lambda _: None)
    captions = [f"caption {i} " + "word " * (i % 3) for i in range(12)]
    seen = counting(enc)
    encode, calls = enc.encode, []

    def failing(prompts):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return encode(prompts)

    enc.encode = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.add(captions, batch_size=2, shard_bytes=1)   # a shard after every batch
        assert len(shards(cache)) == 3
        kept = set(seen)
        enc.encode = encode
        seen.clear()
        logs: list[str] = []
        cache.log = logs.append
        assert cache.add(captions, batch_size=2, shard_bytes=1) == len(captions) - len(kept)
        assert sorted(seen) == sorted(set(captions) - kept) and not cache.missing(captions)
        assert any(f"/{len(captions) - len(kept)} captions encoded (" in m and "ETA" in m
                   for m in logs), logs
    finally:
        del enc.encode


def test_a_changed_encoder_gets_its_own_folder(enc, tiny_qwen3, tmp_path):
    from transformers import Qwen3Model

    def folder(path, **kw):
        return TextFeatureCache(tmp_path / "cache", path, kw.get("max_tokens", 16),
                                kw.get("dtype", torch.float32)).folder

    base = folder(tiny_qwen3)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_qwen3, moved)
    assert folder(moved) == base                         # the files count, not where they are
    assert folder(tiny_qwen3, max_tokens=8) != base
    assert folder(tiny_qwen3, dtype=torch.bfloat16) != base
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_qwen3, retrained)
    model = Qwen3Model.from_pretrained(retrained)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)                      # one tensor, same file size
    model.save_pretrained(retrained)
    assert folder(retrained) != base
    retok = tmp_path / "retok"
    shutil.copytree(tiny_qwen3, retok)
    cfg = json.loads((retok / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 64
    (retok / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert folder(retok) != base


def test_a_caption_missing_without_an_encoder_is_an_error(enc, tiny_qwen3, tmp_path,
                                                         monkeypatch):
    import engine.text_features as tf
    handed_back = []
    monkeypatch.setattr(tf, "release_memory", lambda dev: handed_back.append(dev.type))
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    built = build_text_features(enc, CAPS[:3], cfg, log=lambda _: None)
    assert built.encode(["a brand new caption"]).tokens.shape[0] == 1   # encoder attached:
    assert not built.missing(["a brand new caption"])                   # encoded and added
    built.unload_encoder()
    assert handed_back == ["cpu"]   # the encoder's memory goes back to the system
    with pytest.raises(TextFeatureError, match="never seen before"):
        built.encode(["a cat", "never seen before"])
    cache = TextFeatureCache(cfg.cache_dir, tiny_qwen3, 16, torch.float32)
    assert cache.encode(["a brand new caption", ""]).mask.shape[0] == 2
    with pytest.raises(TextFeatureError, match="never seen before"):
        cache.encode(["never seen before"])
    with pytest.raises(TextFeatureError, match="no text encoder"):
        cache.add(["never seen before"])


def test_builds_at_the_same_time_take_turns(enc, tiny_qwen3, tmp_path):
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    probe = TextFeatureCache(tmp_path, tiny_qwen3, 16, torch.float32)
    probe.folder.mkdir(parents=True)
    logs: list[str] = []
    done = threading.Event()

    def build():
        build_text_features(enc, CAPS[:4], cfg, log=logs.append)
        done.set()

    with FileLock(str(probe.folder / ".lock")):   # another process writing the folder
        worker = threading.Thread(target=build)
        worker.start()
        time.sleep(3.0)
        assert not done.is_set() and not shards(probe)
        assert any("waiting for another process" in m for m in logs)
    worker.join(60)
    assert done.is_set() and len(shards(probe)) == 1

    # two builders with overlapping captions: each caption is encoded once in all
    enc2 = load_text_encoder(qwen_cfg(tiny_qwen3, tmp_path))
    seen1, seen2 = counting(enc), counting(enc2)
    try:
        captions = [f"caption number {i}" for i in range(40)]
        threads = [threading.Thread(target=build_text_features,
                                    args=(e, part, cfg), kwargs={"log": lambda _: None})
                   for e, part in ((enc, captions[:30]), (enc2, captions[10:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(seen1 + seen2) == sorted(captions)
        final = TextFeatureCache(tmp_path, tiny_qwen3, 16, torch.float32)
        assert not final.missing(captions) and len(final) == 44
    finally:
        del enc.encode


def test_a_damaged_shard_or_index_is_rebuilt(enc, tiny_qwen3, tmp_path):
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    cache = build_text_features(enc, CAPS[:5], cfg, log=lambda _: None)
    build_text_features(enc, CAPS[5:], cfg, log=lambda _: None)
    want = enc.encode(CAPS)
    first = next(p for p in shards(cache)
                 if json.loads((cache.folder / "index.json").read_text())["shards"][0]["file"]
                 == p.name)
    first.write_bytes(first.read_bytes()[:-100])         # truncated
    logs: list[str] = []
    seen = counting(enc)
    try:
        rebuilt = build_text_features(enc, CAPS, cfg, log=logs.append)
        assert any("damaged" in m and first.name in m for m in logs), logs
        assert sorted(seen) == sorted(CAPS[:5]) and not first.exists()
        got = rebuilt.encode(CAPS)
        assert torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)

        (rebuilt.folder / "index.json").write_text("{not json")
        logs.clear()
        seen.clear()
        again = build_text_features(enc, CAPS, cfg, log=logs.append)
        assert any("index" in m and "damaged" in m for m in logs), logs
        assert sorted(seen) == sorted(CAPS) and len(shards(again)) == 1   # strays removed
        torch.testing.assert_close(again.encode(CAPS).tokens, want.tokens, rtol=1e-5,
                                   atol=1e-5)
    finally:
        del enc.encode


def test_a_lookup_is_fast(enc, tiny_qwen3, tmp_path):
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    captions = [f"a picture of thing {i} on a table" for i in range(64)]
    cache = build_text_features(enc, captions, cfg, log=lambda _: None)
    cache.encode(captions)
    t0 = time.perf_counter()
    for _ in range(5):
        cache.encode(captions)
    per_caption = (time.perf_counter() - t0) / (5 * len(captions))
    assert per_caption < 1e-3, per_caption


def test_cached_text_encoder_loads_the_encoder_only_when_needed(tiny_qwen3, tmp_path,
                                                                monkeypatch):
    created = []
    init = Qwen3TextEncoder.__init__

    def counted(self, *a, **kw):
        init(self, *a, **kw)
        created.append(weakref.ref(self))

    monkeypatch.setattr(Qwen3TextEncoder, "__init__", counted)
    cfg = qwen_cfg(tiny_qwen3, tmp_path)
    logs: list[str] = []
    cache = cached_text_encoder(cfg, CAPS + [""], "cpu", torch.float32, logs.append)
    gc.collect()
    assert len(created) == 1 and created[0]() is None and cache.encoder is None
    assert any(m.startswith("text encoder unloaded; 11 captions") for m in logs), logs
    again = cached_text_encoder(cfg, CAPS, "cpu", torch.float32, logs.append)
    assert len(created) == 1 and "not loaded" in logs[-1] and again.folder == cache.folder
    other = cached_text_encoder(dataclasses.replace(cfg, max_tokens=8), CAPS[:2], "cpu",
                                torch.float32, logs.append)
    assert len(created) == 2 and other.folder != cache.folder


def test_training_reads_the_cache_with_the_encoder_unloaded(tiny_qwen3, tmp_path,
                                                            monkeypatch):
    from engine.demo_data import write_demo_dataset
    from engine.train import main as train_main
    from engine.trainable import Trainable

    alive = weakref.WeakSet()
    created = []
    init = Qwen3TextEncoder.__init__

    def tracked(self, *a, **kw):
        init(self, *a, **kw)
        alive.add(self)
        created.append(1)

    forward = Trainable.forward
    during = []

    def checked(self, *a, **kw):
        gc.collect()
        during.append(len(alive))
        return forward(self, *a, **kw)

    monkeypatch.setattr(Qwen3TextEncoder, "__init__", tracked)
    monkeypatch.setattr(Trainable, "forward", checked)
    data = write_demo_dataset(tmp_path / "demo", count=12, seed=3)
    run = tmp_path / "run"
    fast = [*LEARNER, "train.batch_size=4", "train.log_every=1",
            "train.warmup_steps=1", "train.save_every=1000", "data.min_side=32",
            "data.max_side=32", "train.cpu_threads=1", "data.val_images=2",
            "train.val_every=2", "train.sample_every=3", "sample.steps=2",
            "sample.prompts=[a red circle, a blue square]", "sample.negative=blurry",
            "text.encoder=qwen3", f"text.name_or_path={tiny_qwen3}",
            f"text.cache_dir={tmp_path / 'features'}", "text.max_tokens=16"]
    args = as_sets(fast)
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "3", *args]) == 0
    log = (run / "log.txt").read_text()
    assert "text encoder unloaded; " in log and str(tmp_path / "features") in log
    assert len(created) == 1 and len(during) >= 3 and set(during) == {0}, during
    assert list((run / "samples").glob("*.png"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in metrics) and any("loss" in r for r in metrics)
    # a resume finds every caption cached: the encoder is not even loaded
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    assert len(created) == 1 and "the text encoder is not loaded" in (run / "log.txt").read_text()
