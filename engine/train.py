"""Training: the loop, readable top to bottom (its command line: engine/train_cli.py).

    python -m engine.train --preset NAME|PATH --data DIR --run-dir DIR [--set k=v ...]
                           [--max-steps N] [--seed N] [--device D]
    python -m engine.train --run-dir DIR --resume [--max-steps N] [--set k=v ...]
    python -m engine.train --run-dir DIR          (a new run whose config.yaml is already there)
    torchrun --nproc_per_node=G -m engine.train ...            (several GPUs, DDP)

The run directory follows engine/job.py. A run stopped, paused or killed and resumed
yields, on the CPU, the same per-step losses as the run never interrupted: every random
draw (times, noise, caption dropout, crops, data order) comes from state that the
checkpoint saves.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import Tensor, nn

from engine import __version__
from engine.buckets import plan_buckets, stage_plans
from engine.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    apply_retention,
    latest_resumable,
    read_meta,
    read_state_info,
    save_checkpoint,
)
from engine.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    field_docs,
    read_yaml,
    save_config,
)
from engine.crop_cache import stored_crops, uncached_advice
from engine.data import DataError, scan_dataset
from engine.dataset import make_loader, validation_batches
from engine.distributed import (
    PRECISIONS,
    Dist,
    any_rank,
    autocast_for,
    barrier,
    check_ranks_in_sync,
    compiler_problem,
    compute_precision,
    frozen_dtype,
    main_rank_first,
    read_step,
    release_memory,
    reset_peak_memory,
    setup_device,
    sum_over_ranks,
)
from engine.encoders import DinoTeacher, load_text_encoder
from engine.flow import (
    drop_captions,
    repa_active,
    resolution_shift,
    sample_t,
    t_bin_index,
    validation_loss,
)
from engine.init_from import apply as apply_init
from engine.init_from import check_fits, load_init
from engine.job import FINAL_STATES, REQUESTS, RunDir, resume_target
from engine.model import PixelHDM, patch_grid
from engine.optim import (
    EMA,
    ZClip,
    all_finite,
    build_optimizer,
    clip_gradients,
    grad_norm,
    lr_at,
)
from engine.preflight import cpu_warning, schedule_notes
from engine.report import why_nothing_trains
from engine.sample_grid import save_sample_grid
from engine.sample_prompts import RunPrompts
from engine.self_align import SelfAlignTeacher
from engine.stages import resolution_stages, stage_index, stage_scale, stage_text, steps_left
from engine.text_features import cached_text_encoder
from engine.train_io import (
    DataWaitHint,
    JobReporter,
    MetricWindow,
    StopSignals,
    dataset_fingerprint,
    oom_message,
    run_captions,
    shell_arg,
    start_compile_clock,
)
from engine.train_state import (
    Parts,
    TrainState,
    host_generator,
    payload,
    restore,
    rollback,
)
from engine.trainable import Trainable

T_BINS = 10
MIN_LOSS_SCALE = 1.0   # fp16: below this, non-finite gradients are not the scale's overflow
MAX_ROLLBACKS = 3   # rollbacks without a good step in between before the run gives up


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why and what to change."""


class RunFinished(TrainError):
    """A resume with nothing left to train: the run is already at `step`, the step it
    would train to."""

    def __init__(self, step: int):
        super().__init__(f"the run is already at step {step}; pass a --max-steps above "
                         f"{step}, or raise train.max_steps above it, to continue")
        self.step = step


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

# after_step(shapes, seconds, epoch): each optimizer step's micro-batch shapes (batch,
# width, height), its seconds and the epoch of its last batch, called outside its timing
AfterStep = Callable[[list[tuple[int, int, int]], float, int], None]


def train(cfg: RunConfig, run: RunDir, *, resume: bool = False, stop_at: int | None = None,
          device_name: str | None = None, after_step: AfterStep | None = None) -> str:
    """Train `cfg` in `run` until `stop_at` optimizer steps (default: what the run was
    started with, at least train.max_steps), a stop or pause request, Ctrl+C or SIGTERM,
    or an error. Returns the final state. `after_step` is the overhead benchmark's: it
    times a bare network step between the trainer's, so that both see the machine alike."""
    d, device = setup_device(device_name)
    report = JobReporter(run, main=d.main, world=d.world, device=str(device))
    signals = StopSignals()
    # every rank watches (torchrun's ranks stop together); ranks other than 0 read what
    # rank 0 has handled from status.json
    signals.watch(report.requests if d.main else
                  lambda: run.pending_requests(getattr(run.read_status(), "handled", {})))
    try:
        return _train(cfg, run, report, d, device, resume, stop_at, signals, after_step)
    except Exception as e:
        # raised inside a library's C code (reading a checkpoint, say), the stop can come
        # back as that library's error: a good file would be called damaged
        if signals.early is not None and e is not signals.early:
            raise signals.early from e
        raise
    finally:
        signals.restore()
        report.close()


def _train(cfg: RunConfig, run: RunDir, report: JobReporter, d: Dist, device: torch.device,
           resume: bool, stop_at: int | None, signals: StopSignals,
           after_step: AfterStep | None = None) -> str:
    tr, lo = cfg.train, cfg.loss
    if tr.cpu_threads:
        torch.set_num_threads(tr.cpu_threads)
    torch.manual_seed(tr.seed)
    log = report.log
    if d.main:   # what a killed trainer left half-done (this process holds the run lock)
        for note in run.recover():
            log(f"recovery: {note}")

    # ---- data ---------------------------------------------------------------------
    with main_rank_first(d):   # rank 0 reads the image headers; the others, its index of them
        scan = scan_dataset(cfg.data.path, cfg.data, cache_path=run.root / "dataset-index.json")
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, tr.batch_size,
                        world_size=d.world, grad_accum=tr.grad_accum)
    if why := why_nothing_trains(scan, plan):
        raise DataError(why)
    for w in plan.warnings:
        log(f"data: {w}")
    skipped = {f: p.kind.replace("_", " ") for p in scan.problems if p.severity == "error"
               for f in p.files}
    if skipped:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(skipped.values()).items()))
        names = ", ".join(sorted(skipped)[:5]) + (" ..." if len(skipped) > 5 else "")
        log(f"data: {len(skipped)} file(s) not trained ({kinds}): {names}; `python -m "
            f"engine.data report {shell_arg(cfg.data.path)} --preset "
            f"{shell_arg(run.config)}` says why")
    # progressive resolution (data.stages): each stage trains the same images in buckets
    # scaled down from the full plan's; the validation loss keeps the full one throughout
    stages = resolution_stages(cfg.data.stages, cfg.data.max_side, cfg.model.patch_size)
    last = resume_point(run, cfg, stop_at, log if d.main else None) if resume else None
    if last is not None:   # before anything of this trainer is logged (an optimizer note)
        report.purge_from = last.step + 1
    # a resume rebuilds the stage that trained the checkpoint's last batch: its data position
    stage = stage_index(stages, max(last.step - 1, 0) if last else 0)
    plans = stage_plans(plan, cfg.data, stages)

    uncached = [""]   # why the current stage decodes crops every epoch ('' = it does not)

    def crops_log(line: str) -> None:
        log(line)
        report.progress()   # decoding a stage's crops (lines every few seconds) is no stall

    def stage_loader(k: int):
        stored = stored_crops(plans[k].images, cfg.data, crops_log)
        uncached[0] = uncached_advice(cfg.data, stored, len(plans[k].images))
        return make_loader(plans[k], cfg.data, seed=tr.seed, rank=d.rank,
                           pin_memory=device.type == "cuda", stored=stored)

    def trained_at(k: int) -> dict[str, int]:
        """'WxH' -> images of stage k: what its checkpoints record as trained sizes."""
        return {f"{b.size[0]}x{b.size[1]}": b.images for b in plans[k].buckets if b.images}

    costs = [p.tokens_per_sample for p in plans]
    report.steps_left = lambda step, stop_at: steps_left(stages, costs, step, stop_at)
    report.speed_span = max(tr.val_every, tr.sample_every, tr.save_every, tr.log_every)

    loader, sampler = stage_loader(stage)
    if len(stages) > 1:
        log("data: progressive resolution (data.stages): "
            + "; ".join(stage_text(stages, k) for k in range(len(stages))))
    fingerprint = dataset_fingerprint(plan)
    # what the run trains at in the end: the sample prompts' default size
    trained = trained_at(len(stages) - 1)
    prompts = RunPrompts.start(run, cfg, trained, resume=resume, main=d.main, log=log)
    log(f"data: {len(plan.images)} training images in {sum(b.images > 0 for b in plan.buckets)} "
        f"buckets, {len(plan.val_images)} held out, {plan.batches_per_epoch} batches per epoch "
        f"per rank, {len(plan.dropped)} dropped")
    if plan.repeated:
        log(f"data: kohya repeats make {plan.samples_per_epoch} samples per epoch")
    for line in scan.conventions.lines():
        log(f"data: {line}")

    # ---- models ---------------------------------------------------------------------
    precision, why = compute_precision(tr.precision, device)
    if why:
        log(f"note: train.precision = {tr.precision}: {why}; training in {precision}")
        tr = replace(tr, precision=precision)
    frozen = frozen_dtype(PRECISIONS[tr.precision])
    init = None   # the checkpoint a new run starts from, checked before anything is loaded
    if tr.init_from and not (resume and latest_resumable(run.checkpoints)):
        init = load_init(tr.init_from, tr.init_weights)
        check_fits(init, cfg)
    if cfg.text.encoder == "qwen3":   # frozen: its features come from the disk cache
        with main_rank_first(d):   # which rank 0 fills; the others then only read it
            text_encoder = cached_text_encoder(
                cfg.text, run_captions(plan, cfg, prompts.captions(), samples=d.main), device,
                frozen, log)
    else:
        text_encoder = load_text_encoder(cfg.text, device)
    teacher = DinoTeacher(lo.repa_teacher, device, frozen) if lo.repa_teacher else None
    net = PixelHDM(cfg.model, text_encoder.dim).to(device)
    net.grad_checkpointing = tr.grad_checkpointing
    blocks = "eager"
    if tr.compile and (problem := compiler_problem(device)):
        log(f"note: train.compile is on but torch.compile cannot run here ({problem}); "
            f"training uncompiled")
    elif tr.compile:
        start_compile_clock()
        net.compile_blocks()
        blocks = "compiled (slower while it compiles: the first steps, sizes and samples)"
    model = Trainable.for_run(cfg, net, text_encoder, teacher.dim if teacher else None, device)
    sra_on = model.sra is not None
    if init is not None:
        for note in apply_init(init, model):
            log(f"note: {note}")
        origin = init.record()
        log(f"weights: from {init.path} (step {origin['step']} of run '{origin['run_id']}', "
            f"{init.which} weights); optimizer and schedule start fresh")
    else:
        origin = None
    n_params = sum(p.numel() for p in net.parameters())
    if d.main and device.type == "cpu" and (warning := cpu_warning(cfg, device)):
        log(f"warning: {warning}")
    for note in schedule_notes(cfg, stop_at) if d.main and not resume else []:
        log(f"note: {note}")
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    beside = [name for name, part in (("the text encoder", model.text),
                                      ("the iREPA head", model.repa),
                                      ("the self-alignment head", model.sra))
              if part is not None and any(p.requires_grad for p in part.parameters())]
    trained = (f" ({n_trained / 1e6:.2f} M trained in all, with {' and '.join(beside)})"
               if beside else "")
    log(f"model: {n_params / 1e6:.2f} M parameters{trained}, text encoder {cfg.text.encoder} "
        f"({text_encoder.dim}-wide), iREPA {'on' if teacher else 'off'}, self-alignment "
        f"{'on' if sra_on else 'off'}, device {device}, "
        f"{tr.precision}, {d.world} process(es), blocks {blocks}")
    optimizer, note = build_optimizer(model, tr, device)
    if note:
        log(f"note: {note}")
        report.event(0, "optimizer", note)
    ema = EMA(model.ema_params(), tr.ema_decay, tr.ema_warmup) if tr.ema_decay > 0 else None
    sra_teacher = SelfAlignTeacher(cfg, text_encoder, device) if sra_on else None
    zclip = ZClip(tr.zclip_z, tr.zclip_alpha, tr.zclip_warmup) if tr.zclip else None
    scaler = torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16")
    noise_gen = torch.Generator(device=device).manual_seed(tr.seed * 1000 + d.rank)
    host_gen = host_generator(device, tr.seed * 1000 + d.rank)
    ddp_model = (nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        # the model's buffers are constants that every rank builds alike: no broadcast
        # before each forward (torch 2.13's name; broadcast_buffers is deprecated)
        forward_sync_buffers=False,
        # the gradients are views of DDP's all-reduce buckets: no second copy of them (4
        # bytes a parameter) and no copy between the two after every backward
        gradient_as_bucket_view=True,
        # iREPA's projector is idle once loss.repa_until is reached; the rest, self-alignment's
        # projector too, takes part in every step
        find_unused_parameters=model.repa is not None) if d.world > 1 else model)
    # gradients are freed between steps with one process; under DDP they are views of its
    # buckets, which stay: zeroed in place, or every backward would make new gradients and
    # DDP copy them into the buckets (and micro-batches without its exchange keep both)
    free_grads = d.world == 1

    # ---- state that checkpoints carry -------------------------------------------------
    st = TrainState(origin=origin)
    parts = Parts(model, optimizer, ema, zclip, scaler, sampler, noise_gen, host_gen)
    handled: dict = dict(report.status.handled)
    initial_weights = None

    last_save = time.monotonic()

    def latest_due() -> bool:
        """Time for the rotating resume point (train.save_minutes; rank 0's clock)."""
        return (d.main and tr.save_minutes > 0
                and time.monotonic() - last_save >= tr.save_minutes * 60)

    def save(reason: str, latest: bool = False) -> Path | None:
        nonlocal last_save
        last_save = time.monotonic()
        check_ranks_in_sync(d, model, log)
        rng = parts.rng_states(d, device)   # every rank's, for an exact resume
        if not d.main:
            return None
        weights = model.weights()
        if not all_finite([*weights.values(), *(ema.shadow.values() if ema else [])]):
            msg = (f"the weights hold NaN/inf values at step {st.step}; no checkpoint was written, "
                   f"so the last one saved stays the last good one")
            if reason in ("every", "time", "save-now"):   # the guard rolls back on the next step
                log(f"step {st.step}: {msg}")
                report.event(st.step, "not-saved", msg)
                return None
            raise TrainError(f"{msg}. Resume continues from it; lower train.lr if it recurs")
        tensors, info = payload(st, parts, rng, fingerprint)
        meta = {"run_id": run.run_id, "config": dump_yaml(cfg), "dataset_fingerprint": fingerprint,
                "engine_version": __version__, "text_dim": text_encoder.dim,
                "images_seen": st.step * tr.batch_size * tr.grad_accum * d.world,
                "val_loss": st.last_val, "val_step": st.last_val_step, "reason": reason,
                "trained_sizes": trained_at(stage),   # generation's default size
                "init_from": st.origin}
        path = save_checkpoint(run.checkpoints, st.step, weights,
                               ema.shadow if ema else None, meta, tensors, info, latest=latest)
        if latest:   # a resume point only: not a listed checkpoint, outside retention
            log(f"step {st.step}: saved the resume point {path.name}")
            return path
        best = {st.best_step} if st.best_step else set()
        apply_retention(run.checkpoints, tr.keep_last, best)
        report.checkpoint(st.step, path)
        return path

    def resume_event(kind: str, message: str) -> None:   # in the log and the metrics
        log(f"resume: {message}")
        report.event(st.step, kind, message)

    if last is not None:
        restore(last, st, parts, d=d, device=device, fingerprint=fingerprint, seed=tr.seed,
                max_steps=tr.max_steps, requested=stop_at, event=resume_event)
        log(f"resumed from {last.path.name} at step {st.step} (epoch {st.epoch}, batch "
            f"{st.position})")
    else:
        if resume:
            log("resume: the run stopped before its first checkpoint; it starts again from "
                "step 0 with its saved config")
        st.stop_at = stop_at or tr.max_steps
        sampler.set_epoch(0)
        # what a rollback before the first checkpoint returns to
        initial_weights = {k: v.detach().cpu().clone() for k, v in model.weights().items()}
    prev = report.previous
    if resume and prev is not None and prev.state not in FINAL_STATES:   # its end unrecorded
        # how far it got: its status.json lags its metric lines by a few seconds
        ended = max(prev.step, report.previous_logged, st.step)
        again = f"; steps {st.step + 1}-{ended} are trained again" if ended > st.step else ""
        resume_event("crash", f"the previous trainer (process {prev.pid}) ended at step "
                              f"{ended} without saving its state (killed, or the machine "
                              f"stopped); training goes on from step {st.step}{again}")
    if d.main:   # the config this process trains, now that it is known to fit the run
        save_config(cfg, run.config)
    report.start(st.step, st.stop_at, st.epoch, handled)

    # ---- validation and samples (main rank; EMA weights) ---------------------------------
    val_batches = (validation_batches(plan, cfg.data, tr.seed, device)
                   if d.main and plan.val_images else [])

    def with_ema(fn):
        if ema is None:
            return fn()
        params = model.ema_params()
        backup = {k: p.detach().clone() for k, p in params.items()}
        ema.copy_to(params)
        try:
            return fn()
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    def validate() -> float | None:
        if not val_batches:
            return None
        def run_val():
            model.eval()
            total = 0.0
            with torch.no_grad(), autocast_for(tr.precision, device):
                for x, eps, captions in val_batches:
                    text = model.encode(captions)
                    total += float(validation_loss(lambda z, t: net(z, t, text), x, eps,
                                                   cfg.model.prediction, lo.t_eps))
            model.train()
            return total / len(val_batches)
        return with_ema(run_val)

    lives: dict = {}   # the run's fixed quality evaluation per stage, made at its first grid

    def sample() -> Path | None:
        if not d.main:
            return None
        from engine.generate import render_samples
        cells = prompts.read(log, text_encoder)   # edits made while the run trains count
        side = stages[stage][0]
        if side < cfg.data.max_side:   # a low stage samples at the size it trains, where the
            def scaled(v: int, option: str, c) -> int:   # prompt line gives none itself
                return v if option in c.given else stage_scale(v, side, cfg.data.max_side,
                                                               cfg.model.patch_size)
            cells = [replace(c, width=scaled(c.width, "w", c), height=scaled(c.height, "h", c))
                     for c in cells]
        def run_sample():   # the grid and the quality figures in one swap to the EMA weights
            model.eval()
            try:
                images = render_samples(net, model.encode, cells, cfg, device, tr.precision)
                return images, measure_quality() if tr.quality else None
            finally:
                model.train()
        images, figures = with_ema(run_sample)
        path = save_sample_grid(run, st.step, images, cells, cfg)
        if figures is not None:
            report.quality(st.step, *figures)
        return path

    def measure_quality() -> tuple[dict, float] | None:
        """(figures, seconds) of the live quality set (engine/evaluate.py LiveQuality) on
        the weights in place; a failure is one log line, and training goes on."""
        start = time.perf_counter()
        try:
            from engine.evaluate import LiveQuality
            if stage not in lives:
                lives[stage] = LiveQuality(cfg, plans[stage], trained_at(stage))
            return (lives[stage](net, model.encode, device, tr.precision),
                    time.perf_counter() - start)
        except Exception as e:   # noqa: BLE001 - a figure must never stop the training
            log(f"step {st.step}: no quality figures ({type(e).__name__}: "
                f"{' '.join(str(e).split())})")
            return None

    # ---- loop -----------------------------------------------------------------------------
    signals.in_loop = True
    model.train()
    data_iter = iter(loader)
    bad_steps, skipped_total, bad_files_total, rollbacks_in_a_row = 0, 0, 0, 0
    bad_files_named: set[str] = set()
    data_wait = DataWaitHint(cfg.data.workers, device, log, uncached=lambda: uncached[0])
    window = MetricWindow(T_BINS)
    final_state = "completed"

    def next_stage(k: int) -> None:
        """Stage k's loader from the next batch on; its first epoch begins there."""
        nonlocal loader, sampler, data_iter, stage
        loader, sampler = stage_loader(k)
        stage, parts.sampler, data_iter = k, sampler, None   # drops the old loader's workers
        ahead.clear()   # (a batch read ahead at the old stage's size)
        st.epoch, st.position = st.epoch + 1, 0
        # a new resolution has a loss level of its own (a 32 -> 48 px switch raised it about 8x
        # on the demo): the spike guard learns it afresh instead of rolling back the switch
        st.loss_count = 0
        sampler.set_epoch(st.epoch)
        data_iter = iter(loader)
        report.restart_speed(st.step)
        log(f"epoch {st.epoch} begins at step {st.step}: stage {k + 1} of {len(stages)}, "
            f"{stage_text(stages, k)}")

    def read_batch():
        """The loader's next batch (crossing into the next epoch), its failed files logged;
        it may hold no image when all of them failed."""
        nonlocal data_iter, bad_files_total
        while True:
            try:
                batch = next(data_iter)
            except StopIteration:
                st.epoch += 1
                sampler.set_epoch(st.epoch)
                data_iter = iter(loader)
                log(f"epoch {st.epoch} begins at step {st.step}")
                continue
            st.position = batch.position
            for path, why in batch.failed:   # counted every time, named once
                bad_files_total += 1
                if path not in bad_files_named:
                    bad_files_named.add(path)
                    log(f"skipped unreadable image {path}: {why}")
            return batch

    last_batch, ahead = None, []   # this rank's last batch with images; one read ahead

    def next_batch():
        """The next batch with images. One process skips a batch whose images all failed.
        Under DDP that would put this rank a batch ahead of the others for the rest of the
        epoch (other sizes in one step, an epoch that ends at another step): it trains its
        last batch again instead (at its first batch: the next one, which then also trains
        in its own turn)."""
        nonlocal last_batch
        while True:
            batch = ahead.pop() if ahead else read_batch()
            if len(batch):
                last_batch = batch
                return batch
            if d.world > 1:
                if last_batch is None:
                    while not len(last_batch := read_batch()):
                        pass
                    ahead.append(last_batch)
                log(f"step {st.step + 1}: no image of this batch could be read; its last "
                    f"batch is trained again, keeping the ranks in step")
                return last_batch

    def requests() -> tuple[dict, list[bool]]:
        """What this rank asks of every rank: the studio's requests (rank 0 reads them), a
        stop signal (any rank), a time-based save (rank 0's clock)."""
        wanted = report.requests() if d.main else {}
        if signals.hit:
            wanted["stop"] = "signal"
        return wanted, [k in wanted for k in REQUESTS] + [latest_due()]

    params = [p for p in model.parameters() if p.requires_grad]   # what the norm is taken of
    reset_peak_memory(device)   # the logged peak is the training's, not the setup's
    # every rank acts on the requests that any rank asked at the last step's read (here:
    # one collective before the first step)
    wanted, flags = requests()
    *flags, time_save = any_rank(d, flags, device)
    while st.step < st.stop_at:
        report.progress()   # (what came after the last step: validation, samples, saves)
        asked = dict(zip(REQUESTS, flags))
        if asked["stop"] or asked["pause"]:
            final_state = "stopped" if asked["stop"] else "paused"
            report.handled(wanted)
            break
        t_asked = time.perf_counter()
        if asked["save-now"]:
            save("save-now")
        elif time_save and st.step > 0:
            save("time", latest=True)
        if asked["sample-now"]:
            report.sample(st.step, sample())
        if asked["save-now"] or asked["sample-now"]:
            report.handled(wanted)
            report.one_off(time.perf_counter() - t_asked)   # not the speed of the steps

        if (k := stage_index(stages, st.step)) != stage:
            next_stage(k)
        if teacher is not None and st.step >= lo.repa_until:
            teacher = None   # iREPA is over: its teacher's memory goes back to the device
            release_memory(device)
            log(f"step {st.step}: iREPA ends here (loss.repa_until); its DINOv3 teacher is "
                f"unloaded")
        t0 = time.perf_counter()
        lr = lr_at(st.step, tr) * st.lr_scale
        for g in optimizer.param_groups:
            g["lr"] = lr
        # (the gradients are None or zero here: every way out of the last step cleared them)
        # device tensors: the step reads back one pair of numbers (loss, gradient norm)
        terms_sum: dict[str, Tensor] = {}
        images, tokens, step_paths, shapes, waited = 0, 0, [], [], 0.0
        bin_loss = torch.zeros(T_BINS, device=device)
        bin_count = torch.zeros(T_BINS, device=device)
        for micro in range(tr.grad_accum):
            t_data = time.perf_counter()
            batch = next_batch()
            waited += time.perf_counter() - t_data
            x = batch.images.to(device, non_blocking=True)
            B = x.shape[0]
            captions = drop_captions(batch.captions, cfg.data.caption_dropout,
                                     generator=parts.host_draws)
            shift = resolution_shift(x.shape[3], x.shape[2], lo.time_shift, lo.shift_reference)
            t = sample_t(B, lo.p_mean, lo.p_std, shift, uniform=lo.t_uniform,
                         generator=noise_gen, device=device)
            eps = torch.randn(x.shape, generator=noise_gen, device=device)
            # model.self_cond: does this micro-batch feed back its own estimate? (CPU draw)
            self_cond = cfg.model.self_cond and bool(
                torch.rand((), generator=parts.host_draws) < lo.self_cond_p)
            grid = patch_grid(x, cfg.model.patch_size)
            use_repa = teacher is not None and repa_active(lo, st.step)
            teacher_tokens = teacher(x, grid) if use_repa else None
            sra_targets = None
            if sra_teacher is not None:
                if micro == 0:
                    sra_teacher.refresh(ema.shadow)   # this step's teacher: the EMA so far
                with autocast_for(tr.precision, device):
                    sra_targets = sra_teacher(x, eps, t, captions, noise_gen)
            sync = (ddp_model.no_sync() if d.world > 1 and micro < tr.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                try:
                    with autocast_for(tr.precision, device):
                        terms, per_sample = ddp_model(x, captions, t, eps, cfg, st.step,
                                                      teacher_tokens, grid if use_repa else None,
                                                      self_cond, sra_targets=sra_targets)
                    scaler.scale(terms["total"] / tr.grad_accum).backward()
                except torch.OutOfMemoryError as e:
                    raise TrainError(oom_message(cfg, x.shape)) from e
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / tr.grad_accum
            idx = t_bin_index(t.detach(), T_BINS)
            bin_loss.index_add_(0, idx, per_sample.float())
            bin_count.index_add_(0, idx, torch.ones(B, device=device))
            images += B
            tokens += B * (grid[0] * grid[1])
            step_paths += batch.paths
            shapes.append((B, x.shape[3], x.shape[2]))

        # divergence guard: the same decision on every rank. The step's one read from the
        # device: the loss it needs, with the gradient norm that clipping needs.
        if scaler.is_enabled():
            # fp16: the norm, the clipping and the overflow check see the true gradients
            # (the scaler also notes, on the device, whether any is not finite)
            scaler.unscale_(optimizer)
        # (and what the next step starts with: the requests asked meanwhile)
        wanted, flags = requests()
        loss, norm, (*flags, time_save) = read_step(d, terms_sum["total"], grad_norm(params),
                                                    flags)
        spike = (tr.spike_factor > 0 and st.loss_count >= 20
                 and loss > tr.spike_factor * st.loss_avg)
        # fp16's non-finite gradients are overflows of its loss scale, handled below, until
        # the scale is down to MIN_LOSS_SCALE: then they are the gradients' own
        overflow = (not math.isfinite(norm) and scaler.is_enabled()
                    and scaler.get_scale() > MIN_LOSS_SCALE)
        bad_grads = not math.isfinite(norm) and not overflow
        if not math.isfinite(loss) or bad_grads or spike:
            optimizer.zero_grad(set_to_none=free_grads)
            if scaler.is_enabled():
                scaler.update()   # ends this step's unscaling (lowers the scale on an inf)
            bad_steps += 1
            skipped_total += 1
            why = ("non-finite loss" if not math.isfinite(loss) else "non-finite gradients"
                   if bad_grads else
                   f"loss {loss:.4g} > {tr.spike_factor:g} x running average {st.loss_avg:.4g}")
            log(f"step {st.step + 1}: skipped batch ({why}); files: {', '.join(step_paths[:8])}"
                f"{' ...' if len(step_paths) > 8 else ''}")
            report.event(st.step, "skipped-batch", why, files=step_paths)
            if bad_steps >= tr.max_bad_steps:
                rollbacks_in_a_row += 1
                if rollbacks_in_a_row > MAX_ROLLBACKS:
                    raise TrainError(
                        f"training keeps diverging at step {st.step + 1}: {MAX_ROLLBACKS} "
                        f"rollbacks in a row did not help (last: {why}). Lower train.lr (now "
                        f"{tr.lr:g}), "
                        f"check the files named in the log, or raise train.spike_factor "
                        f"(now {tr.spike_factor:g})")
                where = rollback(latest_resumable(run.checkpoints), st, parts,
                                 initial_weights, device)
                bad_steps = 0
                msg = (f"rolled back to {where} after {tr.max_bad_steps} bad batches; learning "
                       f"rate now x{st.lr_scale:g}")
                log(msg)
                report.event(st.step, "rollback", msg)
            continue

        if overflow:
            # fp16's loss scale overflowed (in the first steps, and now and then after it
            # has grown): no update, and the scale is halved. Not a step: the weights, EMA,
            # schedule and logged norms stay as they were
            scale = scaler.get_scale()
            scaler.update()
            optimizer.zero_grad(set_to_none=free_grads)
            log(f"step {st.step + 1}: fp16 gradients overflowed at loss scale {scale:g}; the "
                f"scale is halved and the step taken with the next batch")
            continue
        norm, clipped = clip_gradients(params, zclip, tr.grad_clip, norm)
        scaler.step(optimizer)
        scaler.update()
        # the gradients are freed now (one process), not at the next step: validation, sample
        # grids and checkpoints between the two then have their memory (4 bytes a parameter)
        optimizer.zero_grad(set_to_none=free_grads)
        if ema is not None:
            ema.update()
        st.step += 1
        bad_steps = rollbacks_in_a_row = 0
        st.loss_avg = loss if st.loss_count == 0 else 0.98 * st.loss_avg + 0.02 * loss
        st.loss_count += 1
        seconds = time.perf_counter() - t0
        window.add(terms_sum, norm, clipped, images * d.world, tokens * d.world, seconds,
                   bin_loss, bin_count, waited)
        report.progress(seconds)
        if after_step is not None:
            after_step(shapes, seconds, st.epoch)

        if st.step % tr.log_every == 0 or st.step == st.stop_at:
            means = window.flush(partial(sum_over_ranks, d), d.world)   # all ranks' batches
            if d.main:
                data_wait(means["data_wait"], st.step)
            report.metrics(st.step, st.epoch, lr, {**means, "skipped_batches": skipped_total,
                                                   "bad_files": bad_files_total},
                           st.stop_at, device)
        if tr.val_every and st.step % tr.val_every == 0:
            v = validate()
            if v is not None:
                if v < st.best_val:
                    st.best_val = v
                    st.best_step = st.step
                st.last_val, st.last_val_step = v, st.step
                report.validation(st.step, v)
        if st.step % tr.save_every == 0 and st.step < st.stop_at:
            save("every")
        if tr.sample_every and st.step % tr.sample_every == 0 and st.step < st.stop_at:
            report.sample(st.step, sample())
        # no barrier: while rank 0 validates, samples or writes, the others wait in the next
        # step's first collective (the process group's timeout allows an hour)

    # ---- end ------------------------------------------------------------------------------
    save(final_state)
    if final_state == "completed" and tr.sample_every:
        report.sample(st.step, sample())
    barrier(d)
    report.finish(final_state, st.step)
    return final_state


# --------------------------------------------------------------------------------------
# Small helpers of the loop
# --------------------------------------------------------------------------------------

def resume_point(run: RunDir, cfg: RunConfig, requested: int | None,
                 log: Callable[[str], None] | None = None) -> CheckpointInfo | None:
    """The checkpoint a resume continues from, or None for a run that stopped before its
    first checkpoint (it starts again from step 0); RunFinished when the run already
    reached the step it would train to. Newer checkpoints whose files are damaged are
    passed over, each named to `log`."""
    damaged: list = []
    last = latest_resumable(run.checkpoints, damaged)
    if damaged and last is None:   # starting again from step 0 is the user's call
        names = ", ".join(f"step {c.step} ({why})" for c, why in damaged)
        raise TrainError(f"no checkpoint of {run.root} can be resumed from: {names}. Restore "
                         f"them from a copy, or move them out of {run.checkpoints} to start "
                         f"the run again from step 0")
    for c, why in damaged if log is not None else []:
        log(f"warning: checkpoint step {c.step} cannot be resumed from ({why}): resuming "
            f"from step {last.step}; move or delete its files ({c.path.name} and "
            f"{c.state_path.name}) once the run goes on")
    if last is None:
        return None
    info = read_state_info(last.state_path)
    if info["step"] >= resume_target(info.get("stop_at"), cfg.train.max_steps, requested):
        raise RunFinished(info["step"])
    return last


def resume_config(run: RunDir, overrides=()) -> tuple[RunConfig, str]:
    """(config, note) a run resumes with: its config.yaml with `overrides`. A config.yaml
    that cannot be read, or that lacks settings the newest checkpoint's copy of the config
    holds (a file cut short: the missing settings would silently take their defaults, and
    the file be written back so), is completed from that copy, and the note says so ('':
    nothing was). ConfigError when neither can be read."""
    try:
        raw, problem = read_yaml(run.config), ""
    except ConfigError as e:
        raw, problem = None, " ".join(str(e).split())
    last = latest_resumable(run.checkpoints)
    stored = None
    if last is not None:
        try:
            stored = yaml.safe_load(read_meta(last.path).get("config") or "")
        except (CheckpointError, yaml.YAMLError):
            stored = None
    if not isinstance(stored, dict):
        if raw is None:
            raise ConfigError(problem)
        return config_from_dict(apply_overrides(raw, overrides, f"{run.config} (--set)"),
                                str(run.config)), ""
    # only settings this version knows: one a later version dropped is not brought back
    known = field_docs()
    sections = {k.split(".")[0] for k in known}
    stored = {s: ({k: x for k, x in v.items() if f"{s}.{k}" in known}
                  if isinstance(v, dict) else v)
              for s, v in stored.items() if s in sections or s in known}
    if not raw or not isinstance(raw, dict):
        why = problem or ("empty" if not raw else "not a mapping of settings")
        raw, note = {}, (f"{run.config.name} cannot be read ({why}): restored from the copy "
                         f"in checkpoint step {last.step}")
    else:
        missing = [f"{s}.{k}" if k else s for s, v in stored.items()
                   for k in (v if isinstance(v, dict) else [None])
                   if s not in raw or (k and not (isinstance(raw[s], dict) and k in raw[s]))]
        note = (f"{run.config.name} lacks {len(missing)} setting(s) that the copy in checkpoint "
                f"step {last.step} holds ({', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}): it looks cut short; those come from "
                f"the checkpoint, and {run.config.name} is written whole again"
                if missing else "")
    merged = {s: ({**v, **(raw.get(s) or {})} if isinstance(v, dict)
                  and isinstance(raw.get(s, {}), dict) else raw.get(s, v))
              for s, v in stored.items()}
    merged.update({s: v for s, v in raw.items() if s not in merged})
    return config_from_dict(apply_overrides(merged, overrides, f"{run.config} (--set)"),
                            f"{run.config} (completed from checkpoint step {last.step})"), note


def main(argv=None) -> int:
    """The command line (engine/train_cli.py)."""
    from engine.train_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
