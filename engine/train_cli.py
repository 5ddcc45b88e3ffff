"""The trainer's command line: which config a run trains (a preset, the run's own
config.yaml, or a checkpoint's config for --init-from), one trainer per run (the run
lock), and failures reported as one line plus the run's status.

    python -m engine.train --preset NAME|PATH --data DIR --run-dir DIR [--set k=v ...]
    python -m engine.train --run-dir DIR --resume [--max-steps N] [--set k=v ...]
    python -m engine.train --init-from RUN_DIR|FILE --data DIR --run-dir DIR [--set k=v ...]

Exit codes: 0 done (also stopped or paused), 1 failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from engine.buckets import plan_buckets
from engine.checkpoint import CheckpointError, latest_resumable
from engine.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_preset,
    save_config,
)
from engine.data import DataError, scan_dataset
from engine.distributed import DeviceError, RankSyncError
from engine.encoders import EncoderLoadError
from engine.fileio import DiskFull, readable_output
from engine.generate_io import checkpoint_config, resolve_checkpoint
from engine.init_from import check_source
from engine.job import RunBusy, RunDir, RunLock
from engine.sample_prompts import caption_prompts
from engine.train import TrainError, resume_config, resume_point, train
from engine.train_io import JobReporter, StoppedEarly
from engine.train_state import RestoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train",
                                description="Train a PixelHDM model into a run directory.")
    p.add_argument("--preset", help="preset name (see presets/) or a YAML config path")
    p.add_argument("--data", help="dataset folder (images with .txt captions)")
    p.add_argument("--run-dir", required=True, help="the run directory (created if needed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps, with a "
                   "final checkpoint (the schedule still follows train.max_steps)")
    p.add_argument("--seed", type=int, help="seed (overrides train.seed)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument("--init-from", metavar="RUN_DIR|FILE",
                   help="start the new run from the weights of this checkpoint (or a run "
                        "folder's newest one), with fresh optimizer state; without --preset "
                        "the checkpoint's own config is the starting point")
    p.add_argument("--init-weights", choices=("ema", "raw"),
                   help="which weights --init-from takes (default ema)")
    p.add_argument("--prompts-from-data", action="store_true",
                   help="a new run's sample prompts: four of the dataset's own captions, "
                        "held-out images' first (the studio's \"Use the dataset's captions\")")
    return p


def prompts_from_data(cfg: RunConfig) -> RunConfig:
    """The config with four of its dataset's captions as the sample prompts, chosen from
    the plan the trainer will make (every rank alike: the choice is a function of it)."""
    scan = scan_dataset(cfg.data.path, cfg.data)
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, cfg.train.batch_size)
    found = caption_prompts([im.caption for im in plan.val_images],
                            [im.caption for im in plan.images])
    if not found:
        raise TrainError(f"--prompts-from-data: no image of {cfg.data.path} has a caption "
                         f"that can be a prompt line; give the prompts with --set "
                         f"sample.prompts=[...] instead")
    return replace(cfg, sample=replace(cfg.sample, prompts=found))


def _resolve_config(args, run: RunDir) -> RunConfig:
    """The run's config: from --preset for a new run directory, else from the run
    directory's config.yaml (a resumed run, or one whose config the studio wrote)."""
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.data:
        overrides.append(f"data.path={Path(args.data).resolve()}")
    main_rank = int(os.environ.get("RANK", 0)) == 0   # other ranks may see rank 0's config.yaml
    if args.init_from or args.init_weights:
        if args.resume:
            raise TrainError("--init-from starts a new run from a checkpoint's weights; a "
                             "--resume continues its own checkpoints: drop one of the two")
        if args.init_weights and not args.init_from:
            raise TrainError("--init-weights needs --init-from RUN_DIR|FILE")
        overrides.append(f"train.init_from={Path(args.init_from).expanduser().resolve()}")
        if args.init_weights:
            overrides.append(f"train.init_weights={args.init_weights}")
        if not args.preset:   # the checkpoint's own config is the preset
            if run.config.is_file() and main_rank:
                raise TrainError(f"'{run.root}' already holds a run; choose a new --run-dir "
                                 f"for a run started from a checkpoint")
            _, src_cfg, _ = checkpoint_config(resolve_checkpoint(args.init_from))
            raw = config_to_dict(src_cfg)
            raw["data"]["stages"] = []   # its weights have been through them; --set may add
            raw = apply_overrides(raw, overrides, source="--set")
            cfg = config_from_dict(raw, f"{args.init_from} (config) with --set")
            if not args.data:
                raise TrainError("--data is required with --init-from (the folder of images "
                                 "and .txt captions of the new run)")
            return cfg
    if args.resume and args.preset:
        extra = [f"--preset {args.preset}"]
        if args.data:
            extra.append(f"--data {args.data}")
        raise TrainError(f"--resume continues the run in '{run.root}' with its saved "
                         f"config.yaml: drop {' and '.join(extra)} (change single values with "
                         f"--set key=value)")
    if args.preset:
        if run.config.is_file() and main_rank:
            raise TrainError(f"'{run.root}' already holds a run; continue it with "
                             f"`--run-dir {run.root} --resume` (without --preset and --data), "
                             f"or choose a new --run-dir")
        cfg = load_preset(args.preset, overrides)
    else:
        if not run.config.is_file():
            raise TrainError(f"'{run.root}' holds no config.yaml: give --preset (and --data) "
                             f"to start a new run there")
        damaged: list = []
        last = latest_resumable(run.checkpoints, damaged)
        if not args.resume and main_rank and (last is not None or damaged):
            raise TrainError(f"'{run.root}' already has checkpoints; add --resume to continue it")
        cfg, note = resume_config(run, overrides)
        if note and main_rank:   # (into the log: the trainer's stderr)
            print(f"note: {note}", file=sys.stderr)
        if args.resume:
            resume_point(run, cfg, args.max_steps)
    if not cfg.data.path:
        raise TrainError("--data is required (the folder of images and .txt captions)")
    return cfg


STOPPED_EARLY_RANK = 3   # a torchrun rank stopped before training began (see main)


def main(argv=None) -> int:
    readable_output()
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    if args.max_steps is not None and args.max_steps < 1:
        print("error: --max-steps must be at least 1", file=sys.stderr)
        return 2
    try:   # nothing is written before the request is known to make sense
        cfg = _resolve_config(args, run)
        if cfg.train.init_from and not args.resume:
            check_source(cfg.train.init_from, cfg)
    except (ConfigError, TrainError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    lock = RunLock(run) if int(os.environ.get("RANK", 0)) == 0 else None
    try:   # held until this process ends: one trainer per run
        if lock is not None:
            lock.acquire()
    except RunBusy as e:   # refused: the other trainer's files are left alone
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:   # the lock's owner file on a full or read-only disk
        print(f"error: cannot take the run's lock in {run.root} ({e}): free some disk space, "
              f"or check that the folder is writable", file=sys.stderr)
        return 1
    try:
        if args.prompts_from_data:
            if args.resume:
                raise TrainError("--prompts-from-data chooses a new run's sample prompts; a "
                                 "resumed run keeps its own (edit its sample_prompts.txt)")
            cfg = prompts_from_data(cfg)
        if lock is not None:
            run.create()
            if args.preset:   # a new run: resumable (from step 0) from its first moment
                save_config(cfg, run.config)
        state = train(cfg, run, resume=args.resume, stop_at=args.max_steps, device_name=args.device)
    except StoppedEarly as e:
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            _fail(run, str(e), state="stopped")
            return 0
        if not e.requested and (why := run.rank_error()):
            # torchrun signals every rank when one of them fails: that failure, not a stop
            _fail(run, f"ended by torchrun before training began: {why}")
            return 1
        _fail(run, str(e), state="stopped")
        # under torchrun the other ranks may be waiting in a collective for this one, where
        # no stop request or signal reaches them (until the process group's timeout, an
        # hour): torchrun ends them when a rank fails, and only then
        return STOPPED_EARLY_RANK
    except (ConfigError, TrainError, RestoreError, DataError, EncoderLoadError, CheckpointError,
            DeviceError, RankSyncError, DiskFull) as e:
        _fail(run, str(e), new_run=bool(args.preset or args.init_from))
        return 2 if isinstance(e, ConfigError) else 1
    except Exception as e:   # unexpected: the traceback goes to the log, one line to stderr
        import traceback
        traceback.print_exc()
        _fail(run, f"{type(e).__name__}: {e}", new_run=bool(args.preset or args.init_from))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
    print(f"{state} at {run.root}", file=sys.stderr)
    return 0


def _fail(run: RunDir, message: str, state: str = "failed", new_run: bool = False) -> None:
    """One line on stderr; the run's status (and log, unless the studio captures stderr
    into it) records the failure (or an early stop). A new run that failed before its
    first step forgets its config, so the same command can be tried again."""
    message = " ".join(message.split())
    rank = int(os.environ.get("RANK", 0))
    tag = f"[rank {rank}] " if rank else ""   # (what the studio looks for after a crash)
    print(f"{tag}{'error' if state == 'failed' else state}: {message}", file=sys.stderr)
    if rank != 0 or not run.root.is_dir():
        return
    try:
        if new_run and not run.metrics_file.exists() and latest_resumable(run.checkpoints) is None:
            run.config.unlink(missing_ok=True)
        JobReporter.record_end(run, state, message)
    except OSError as e:   # a full disk, most likely what ended the run
        print(f"{tag}note: could not record this in {run.status_file} ({e}); the studio "
              f"tells the run's end from its process", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
