"""The workspace as the studio sees it, apart from the UI: its folders and the checks on
paths typed into the page, the ids the page names checkpoints by, what is done with a
checkpoint (pin, delete, export), uploads into a dataset and the settings of a new run
that starts from a checkpoint's weights. The tabs hold a `Studio` and only wire it to
components; whether a run is alive is studio.liveness's one rule, asked through RunInfo
and Runner.ensure_stopped.

Uploads arrive as temporary files (each under app.py's --max-upload-mb). Only images the
engine can train and UTF-8 caption files are copied, into workspace/datasets/<name>/ and
nowhere else, under a cleaned-up version of their own file name; a file already there is
never overwritten. Every file that is not copied is named with the reason.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import threading
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from engine import config
from engine.checkpoint import (
    CheckpointError,
    damage,
    delete_checkpoint,
    export_inference,
    list_checkpoints,
    pinned_steps,
    read_meta,
    read_modelspec,
    set_pinned,
    step_name,
)
from engine.conventions import CAPTION_EXTENSIONS, decode_caption
from engine.distributed import PRECISIONS
from engine.fileio import atomic_target, ensure_free
from engine.generate_io import checkpoint_config, resolve_checkpoint
from engine.images import (
    BROKEN_FILE_ERRORS,
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    inspect_image,
    problem_text,
)
from engine.init_from import differences
from studio import views
from studio.paths import NAME_MAX, PathError, names_local_path, resolve_inside, safe_name
from studio.runner import PROJECT_ROOT, Runner, RunnerError

MAX_FILES = 20_000              # per upload
MAX_CAPTION_BYTES = 64 * 1024   # a caption longer than this is not a caption


# --------------------------------------------------------------------------------------
# Checkpoint ids
# --------------------------------------------------------------------------------------

RUN_PREFIX, MODEL_PREFIX = "run/", "model/"
_STEP = re.compile(r"[0-9]+")


def format_run_checkpoint(run_id: str, step: int) -> str:
    """The id of step `step` (a whole number, or its digits) of run `run_id`:
    'run/<run-id>/<step>'; ValueError for an empty run id or a step that is not one."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"{run_id!r} is not a run id")
    if isinstance(step, bool) or not isinstance(step, (int, str)) or \
            not _STEP.fullmatch(str(step)):
        raise ValueError(f"{step!r} is not a step number")
    return f"{RUN_PREFIX}{run_id}/{int(step)}"


def format_model(file_name: str) -> str:
    """The id of an exported model in workspace/models: 'model/<file name>'."""
    return f"{MODEL_PREFIX}{file_name}"


@dataclass(frozen=True)
class CheckpointId:
    """What the page names a checkpoint by: a step checkpoint of a run ('run/<run-id>/
    <step>') or an exported model ('model/<file name>'). Only the form is checked here;
    Studio.checkpoint_path finds the file and checks the names."""
    run_id: str = ""            # a run checkpoint: its run and step
    step: int | None = None
    model: str = ""             # an exported model: its file name

    @staticmethod
    def written_as_id(text) -> bool:
        """Whether `text` is written like a checkpoint id rather than a path."""
        return isinstance(text, str) and text.startswith((RUN_PREFIX, MODEL_PREFIX))

    @classmethod
    def parse(cls, text) -> CheckpointId:
        """The id `text` stands for; PathError when it is not one."""
        if isinstance(text, str) and text.startswith(RUN_PREFIX):
            run_id, _, step = text[len(RUN_PREFIX):].rpartition("/")
            if run_id and _STEP.fullmatch(step):
                return cls(run_id=run_id, step=int(step))
        elif isinstance(text, str) and text.startswith(MODEL_PREFIX) and text != MODEL_PREFIX:
            return cls(model=text[len(MODEL_PREFIX):])
        raise PathError(f"'{text}' is not a checkpoint id ({RUN_PREFIX}<run>/<step> or "
                        f"{MODEL_PREFIX}<file>)")

    def __str__(self) -> str:
        return format_model(self.model) if self.model else \
            format_run_checkpoint(self.run_id, self.step)


@dataclass
class CheckpointEntry:
    """One step checkpoint of a run, as the Checkpoints tab lists it."""
    step: int
    saved: float                # modification time of its weights file
    size: int                   # bytes, weights and training state
    meta: dict                  # its metadata ({} when it cannot be read)
    pinned: bool                # listed in keep.txt: retention keeps it
    resumable: bool             # its training state is there
    sample: Path | None         # the sample grid of that step, when one was made
    damage: str = ""            # what is wrong with its files ('' = they open)


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (files that vanish meanwhile are left out)."""
    total = 0
    for p in Path(path).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------------------
# The studio's workspace
# --------------------------------------------------------------------------------------

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

    def own_dataset(self, path: str) -> tuple[str | None, str] | None:
        """A run's dataset folder as the Train tab chooses it: (its name in the list, "")
        or (None, the folder) when it is not one of workspace/datasets; None when it is gone
        or outside the folders the studio may use."""
        try:
            folder = resolve_inside(path, self.roots)
        except PathError:
            return None
        if not folder.is_dir():
            return None
        for name in self.dataset_names():
            if (self.datasets_dir / name).resolve() == folder:
                return name, ""
        return None, str(folder)

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
        is False), loss.repa_teacher, text.cache_dir and data.cache_dir when set, and
        text.name_or_path when it names a local folder rather than a hub id (the default
        cache folders, the user's cache folder, stay allowed). Every config the studio
        starts or dry-runs passes here (a resume reuses the config.yaml written at the
        start), so an override line cannot point the trainer anywhere else. PathError
        naming the setting and the allowed folders otherwise."""
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
            out.loss.repa_teacher = self._model_folder("loss.repa_teacher",
                                                       out.loss.repa_teacher)
        if out.text.cache_dir:
            out.text.cache_dir = inside("text.cache_dir", out.text.cache_dir)
        if out.data.cache_dir:
            out.data.cache_dir = inside("data.cache_dir", out.data.cache_dir)
        # the folders a loader may resolve a relative name in: the workspace, the trainer's
        # working folder and this process's
        if names_local_path(out.text.name_or_path, [self.workspace, PROJECT_ROOT, Path.cwd()]):
            out.text.name_or_path = self._model_folder("text.name_or_path",
                                                       out.text.name_or_path)
        if out.train.init_from:
            out.train.init_from = str(self.init_source(out.train.init_from, out))
        return out

    def _model_folder(self, key: str, value: str) -> str:
        """The real path of a folder of model weights a setting names, which must exist:
        PathError naming the setting, the path it led to and how relative paths are read."""
        try:
            folder = resolve_inside(value, self.roots)
        except PathError as e:
            raise PathError(f"{key}: {e}") from None
        if not folder.is_dir():
            raise PathError(f"{key}: no folder {folder}. In the studio a relative path is "
                            f"read inside the workspace {self.workspace} (write "
                            f"models/NAME for {self.workspace.name}/models/NAME), or give the "
                            f"whole path")
        return str(folder)

    def init_source(self, value: str, cfg: config.RunConfig) -> Path:
        """The weights file train.init_from names (a checkpoint id from the Checkpoints
        tab, or a file or run folder inside the allowed folders), checked to fit `cfg`'s
        network and text encoder. PathError or ConfigError naming what is wrong."""
        try:
            if CheckpointId.written_as_id(value):
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
                            format_run_checkpoint(run.run_id, info.step)))
        if self.models_dir.is_dir():
            for p in sorted(self.models_dir.glob("*.safetensors"),
                            key=lambda p: p.stat().st_mtime, reverse=True):
                out.append((f"exported · {p.stem}", format_model(p.name)))
        return out

    def checkpoint_path(self, cid: str | CheckpointId) -> Path:
        """The weights file of a checkpoint id; PathError/RunnerError when it is not one."""
        ck = cid if isinstance(cid, CheckpointId) else CheckpointId.parse(cid)
        if ck.model:
            if ck.model not in {p.name for p in self.models_dir.glob("*.safetensors")}:
                raise PathError(f"the exported model '{ck.model}' no longer exists in "
                                f"{self.models_dir} (deleted or renamed); pick another")
            path = resolve_inside(str(self.models_dir / ck.model), self.roots)   # links too
        else:
            folder = self.runner.info(ck.run_id).path / "checkpoints"
            path = folder / f"{step_name(ck.step)}.safetensors"
        if not path.is_file():
            raise PathError(f"the checkpoint '{ck}' no longer exists (deleted by retention or "
                            f"by hand); pick another")
        return path

    def run_checkpoints(self, run_id: str) -> list[CheckpointEntry]:
        """The step checkpoints of a run, oldest first; RunnerError for a run that is not
        there."""
        run = self.runner.info(run_id).path
        folder = run / "checkpoints"
        pinned = pinned_steps(folder)
        out = []
        for c in list_checkpoints(folder):
            try:
                meta = read_meta(c.path)
            except CheckpointError:
                meta = {}
            sample = run / "samples" / f"{step_name(c.step)}.png"
            out.append(CheckpointEntry(c.step, c.mtime, c.size, meta, c.step in pinned,
                                       c.state_path is not None,
                                       sample if sample.is_file() else None, damage(c)))
        return out

    def toggle_pin(self, run_id: str, step: int) -> bool:
        """Pin a checkpoint of a run (retention keeps it) or unpin it; whether it is
        pinned now. Allowed while the run trains: the trainer reads the pins at each save."""
        folder = self.runner.info(run_id).path / "checkpoints"
        pinned = int(step) not in pinned_steps(folder)
        set_pinned(folder, int(step), pinned)
        return pinned

    def delete_checkpoint(self, run_id: str, step: int) -> None:
        """Delete a checkpoint of a run that is not alive (weights, training state, pin).
        RunnerError while the run trains, CheckpointError when the step is not there."""
        info = self.runner.ensure_stopped(run_id, "deleting its checkpoints")
        delete_checkpoint(info.path / "checkpoints", int(step))

    def export(self, cid: str | CheckpointId, name: str, precision: str = "bf16",
               ema: bool = True, title: str = "") -> Path:
        """Write an inference file of a checkpoint into workspace/models as `name` (a plain
        file name; .safetensors added) in `precision` (engine.distributed.PRECISIONS). PathError
        for a bad or taken name, CheckpointError for an unreadable checkpoint."""
        src = self.checkpoint_path(cid)
        fname = safe_name(name)
        if not fname.endswith(".safetensors"):
            fname += ".safetensors"
        dst = self.models_dir / fname
        if dst.exists():
            raise PathError(f"{fname} already exists in workspace/models: choose another name")
        if precision not in PRECISIONS:
            raise CheckpointError(f"unknown precision '{precision}' (allowed: "
                                  f"{', '.join(PRECISIONS)})")
        return export_inference(src, dst, PRECISIONS[precision], ema=ema,
                                title=title if isinstance(title, str) else "")

    def exported_models(self) -> list[tuple[Path, dict, dict]]:
        """(file, metadata, modelspec) of every readable exported model, by file name."""
        out = []
        for p in sorted(self.models_dir.glob("*.safetensors")):
            try:
                out.append((p, read_meta(p), read_modelspec(p)))
            except CheckpointError:
                continue
        return out


# --------------------------------------------------------------------------------------
# Uploads and runs from a checkpoint
# --------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    folder: Path
    images: list[str] = field(default_factory=list)      # file names added
    captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (uploaded name, why)
    unpaired: list[str] = field(default_factory=list)   # captions added with no picture yet

    def markdown(self) -> str:
        added = (f"Added **{len(self.images)} image(s)** and **{len(self.captions)} "
                 f"caption(s)** to `{self.folder.name}`.")
        if self.unpaired:
            names = ", ".join(f"`{n}`" for n in self.unpaired[:10])
            more = f" and {len(self.unpaired) - 10} more" if len(self.unpaired) > 10 else ""
            added += (f" {len(self.unpaired)} caption(s) have no picture of the same name yet "
                      f"({names}{more}): add the pictures, or they caption nothing.")
        if not self.skipped:
            return added
        rows = "\n".join(f"- `{name}`: {why}" for name, why in self.skipped[:50])
        more = f"\n- ... and {len(self.skipped) - 50} more" if len(self.skipped) > 50 else ""
        return f"{added} **{len(self.skipped)} not added:**\n{rows}{more}"


def clean_file_name(name: str) -> str:
    """A file name reduced to letters, digits, '-', '_' and '.' (others become '_'), so an
    image and its caption still pair up; PathError when nothing usable is left. Accents
    are dropped from their letters (café -> cafe); a name that loses other characters
    (猫, 犬) keeps a short hash of them, so that two such names stay two files and an
    image and its caption still pair up."""
    base = re.split(r"[\\/]", name)[-1]          # a browser may send a relative path
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    if f".{ext.lower()}" in CAPTION_EXTENSIONS and Path(stem).suffix.lower() in IMAGE_EXTENSIONS:
        # a sidecar, x.jpg.txt: named after its picture's cleaned name, so they pair up
        return safe_name(f"{clean_file_name(stem)}.{ext.lower()}")
    plain = "".join(c for c in unicodedata.normalize("NFKD", stem)
                    if not unicodedata.combining(c))
    lost = "".join(c for c in plain if ord(c) > 127)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", plain).strip("._") or "file"
    if lost:
        tag = hashlib.blake2b(lost.encode(), digest_size=4).hexdigest()
        stem = f"{stem[:NAME_MAX - 24]}-{tag}"
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext).lower()
    keep = NAME_MAX - len(ext) - 1
    return safe_name(f"{stem[:keep]}.{ext}" if ext else stem[:NAME_MAX])


def _caption_problem(path: Path) -> str:
    data = path.read_bytes()
    if len(data) > MAX_CAPTION_BYTES:
        return f"{len(data) // 1024} KB is too long for a caption (the most is 64 KB)"
    try:
        decode_caption(data)   # as the trainer reads it
    except UnicodeDecodeError as e:
        return (f"not UTF-8 text (byte {e.start} is 0x{data[e.start]:02X}): save it again "
                f"as UTF-8")
    return ""


def add_files(datasets_dir: Path, name: str, files: Sequence[str | Path], *,
              roots: Sequence[Path] = (), max_pixels: int = MAX_PIXELS) -> ImportReport:
    """Copy the uploaded `files` that are images or captions into the dataset folder
    `name` under `datasets_dir` (created when new). PathError for a bad dataset name or
    a folder outside the workspace; problems with single files go into the report."""
    folder_name = safe_name(name)
    datasets_dir = Path(datasets_dir)
    folder = datasets_dir / folder_name
    # a dataset folder that is a link leading elsewhere is not written through
    resolve_inside(str(folder), [datasets_dir.resolve(), *roots])
    files = [Path(f) for f in files]
    if len(files) > MAX_FILES:
        raise PathError(f"{len(files)} files in one upload; the most is {MAX_FILES}: upload "
                        f"them in parts")
    total = sum(f.stat().st_size for f in files if f.is_file())
    datasets_dir.mkdir(parents=True, exist_ok=True)
    ensure_free(folder / "upload", total)
    folder.mkdir(exist_ok=True)
    report = ImportReport(folder)
    checked = []   # (source, uploaded name, name in the dataset, why it is not added)
    taken: dict[str, str] = {}   # lower-cased name -> the name a file of this upload takes
    for src in files:
        original = src.name
        try:
            target = clean_file_name(original)
        except PathError as e:
            report.skipped.append((original, str(e)))
            continue
        ext = Path(target).suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            try:
                inspect_image(str(src), max_pixels)
                why = ""
            except BROKEN_FILE_ERRORS as e:
                why = problem_text(e, src)
        elif ext in CAPTION_EXTENSIONS:
            why = _caption_problem(src)
        else:
            why = (f"not an image or a caption (allowed: "
                   f"{' '.join(sorted(IMAGE_EXTENSIONS | set(CAPTION_EXTENSIONS)))})")
        dst = folder / target
        if not why and dst.exists():
            why = (f"'{target}' is already in the dataset: the one there is kept (rename the "
                   f"new file to add it)")
        # two uploaded files of one name (from two folders, 'a b.png' and 'a_b.png', or
        # A.png and a.png where letter case does not count): the first is added
        if not why and target.lower() in taken:
            why = (f"another file of this upload is added as '{taken[target.lower()]}': "
                   f"rename one of them to add both")
        if not why:
            taken[target.lower()] = target
        checked.append((src, original, target, why))
    # a caption whose picture this upload brought but did not add would caption nothing.
    # A caption's key is its name less .txt or .caption: x for x.txt, x.png for the
    # sidecar x.png.txt; a picture answers to both of its keys
    def stem(name: str) -> str:
        return Path(name).stem.lower()

    def keys(picture: str) -> tuple[str, str]:
        return stem(picture), picture.lower()
    pictures = {k for _, _, t, why in checked
                if not why and Path(t).suffix.lower() in IMAGE_EXTENSIONS for k in keys(t)}
    pictures |= {k for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                 for k in keys(p.name)}
    refused = {k: o for _, o, t, why in checked
               if why and Path(t).suffix.lower() not in CAPTION_EXTENSIONS for k in keys(t)}
    orphaned = refused.keys() - pictures
    for src, original, target, why in checked:
        ext = Path(target).suffix.lower()
        if not why and ext in CAPTION_EXTENSIONS and stem(target) in orphaned:
            why = (f"its picture {refused[stem(target)]} was not added (see its line): add the "
                   f"caption again with a picture it can caption")
        if why:
            report.skipped.append((original, why))
            continue
        with atomic_target(folder / target, src.stat().st_size) as tmp:
            shutil.copyfile(src, tmp)
        (report.images if ext in IMAGE_EXTENSIONS else report.captions).append(target)
    report.unpaired = [c for c in report.captions if stem(c) not in pictures]
    return report


def init_overrides(source: config.RunConfig, checkpoint_id: str) -> tuple[str, str]:
    """(preset, override text) for a new run from a checkpoint's weights: the preset whose
    network and text encoder are nearest the checkpoint's, lines for the keys that still
    differ (so the run keeps the checkpoint's shape), and the train.init_from line."""
    best = None
    for name in config.list_presets():
        try:
            diff = differences(source, config.load_preset(name))
        except config.ConfigError:
            continue
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    name, diff = best
    keys = [d.split(" ", 1)[0] for d in diff]
    lines = [f"{k}={views.yaml_value(getattr(getattr(source, k.split('.')[0]), k.split('.')[1]))}"
             for k in keys]
    return name, "\n".join(["# the network and text encoder of the checkpoint:", *lines,
                             f"train.init_from={checkpoint_id}"] if lines else
                            [f"train.init_from={checkpoint_id}"])
