"""The prompts of a run's sample grids: a text file in the run folder that a person may
edit at any time, also while the run trains (engine/job.py: `sample_prompts.txt`).

One prompt per line, its options after it, in the form other trainers use too:

    a red apple on a table --n blurry, dark --w 64 --h 48 --d 1234 --l 4.5 --s 28

    --n  negative prompt (text up to the next option; empty = unconditional)
    --w  width,  --h  height   (multiples of model.patch_size, at most the run's max side)
    --d  seed    --l  CFG scale    --s  sampler steps

Blank lines and lines starting with `#` are ignored. An option a line leaves out comes
from the run's config (section `sample`): the negative prompt, CFG scale and steps, the
size `RunConfig.sample_size(trained)`, and seed `sample.seed + i` for the i-th prompt
(counted from 0). Anything else starting with `--` (an unknown option, a value that is
not allowed, an option given twice) is refused with one message naming the line and
the option.

A new run writes the file from `sample.prompts`, so the file and the config agree; to start
a run with prompts of your own, put them in the run folder as `sample_prompts.txt` before
starting it (the studio does that with the prompts typed for a new run): the run then
uses the file and lists its prompts in config.yaml. The trainer reads the file again
before every grid: an edit is used from the next grid on; an edit that does not parse is
logged once and the grid keeps the last good prompts, so a half-typed line never stops a
run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from engine.checkpoint import CheckpointError, list_checkpoints, read_meta
from engine.config import MAX_SAMPLER_STEPS, ConfigError, RunConfig, load_preset
from engine.fileio import atomic_write_text
from engine.generate_io import trained_sizes
from engine.job import RunDir

MAX_PROMPTS = 64          # cells of one grid: each is a full sampling run mid-training
MAX_SEED = 2**63 - 1      # torch generators take 64-bit seeds
OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed",
           "l": "CFG scale", "s": "steps"}
KNOWN = ", ".join(f"--{k} {v}" for k, v in OPTIONS.items())
# an option: `--name` at the start of the line or after white space, then white space or
# the end; `a--b` or `-- ` inside a prompt stay text
_OPTION = re.compile(r"(?:^|(?<=\s))--([A-Za-z][\w-]*)(?=\s|$)")
_WHOLE = re.compile(r"^[+-]?\d+$")


class PromptsError(ValueError):
    """A sample-prompts text does not parse; the message names the line and the option."""


@dataclass(frozen=True)
class PromptDefaults:
    """What a line gets for an option it leaves out, and the limits of the options."""
    negative: str
    width: int
    height: int
    seed: int          # the i-th prompt (from 0) gets seed + i
    cfg: float
    steps: int
    patch: int         # sizes are multiples of it ...
    max_side: int      # ... up to this


@dataclass(frozen=True)
class SamplePrompt:
    """One cell of a sample grid, every option resolved."""
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    cfg: float
    steps: int
    line: int = 0                  # its line in the file (0 = not from a file)
    given: tuple[str, ...] = ()    # the options its line set, e.g. ("w", "d")

    def as_dict(self) -> dict:
        return dict(asdict(self), given=list(self.given))


def prompt_defaults(cfg: RunConfig, trained: dict[str, int] | None = None) -> PromptDefaults:
    """The defaults of a run's prompt lines; `trained` as RunConfig.sample_size takes it."""
    s = cfg.sample
    w, h = cfg.sample_size(trained)
    return PromptDefaults(negative=s.negative, width=w, height=h, seed=s.seed, cfg=s.cfg,
                          steps=s.steps, patch=cfg.model.patch_size,
                          max_side=max(cfg.data.max_side, w, h))


# --------------------------------------------------------------------------------------
# Parsing and writing the text
# --------------------------------------------------------------------------------------

def _size(text: str, d: PromptDefaults) -> int:
    if not _WHOLE.match(text):
        raise ValueError(f"not a whole number of pixels; allowed: a multiple of the patch size "
                         f"{d.patch} from {d.patch} to {d.max_side}")
    v = int(text)
    if v % d.patch or not d.patch <= v <= d.max_side:
        near = sorted({min(max(d.patch, m * d.patch), d.max_side // d.patch * d.patch)
                       for m in (v // d.patch, -(-v // d.patch))})
        raise ValueError(f"allowed: a multiple of the patch size {d.patch} from {d.patch} to "
                         f"{d.max_side} (nearest: {' or '.join(map(str, near))})")
    return v


def _seed(text: str, d: PromptDefaults) -> int:
    if not _WHOLE.match(text) or not 0 <= int(text) <= MAX_SEED:
        raise ValueError(f"allowed: a whole number from 0 to {MAX_SEED}")
    return int(text)


def _cfg(text: str, d: PromptDefaults) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError("allowed: a number >= 0, e.g. 4.5 (1 = no guidance)")
    return v


def _steps(text: str, d: PromptDefaults) -> int:
    if not _WHOLE.match(text) or not 1 <= int(text) <= MAX_SAMPLER_STEPS:
        raise ValueError(f"allowed: a whole number from 1 to {MAX_SAMPLER_STEPS}")
    return int(text)


_READ = {"w": ("width", _size), "h": ("height", _size), "d": ("seed", _seed),
         "l": ("cfg", _cfg), "s": ("steps", _steps)}


def _parse_line(text: str, number: int, index: int, d: PromptDefaults) -> SamplePrompt:
    found = list(_OPTION.finditer(text))
    prompt = (text[:found[0].start()] if found else text).strip()
    values = {"prompt": prompt, "negative": d.negative, "width": d.width, "height": d.height,
              "seed": d.seed + index, "cfg": d.cfg, "steps": d.steps}
    given: list[str] = []
    for m, nxt in zip(found, found[1:] + [None]):
        name = m.group(1)
        value = text[m.end():nxt.start() if nxt else len(text)].strip()
        if name not in OPTIONS:
            raise PromptsError(f"line {number}: unknown option --{name} (known: {KNOWN})")
        if name in given:
            raise PromptsError(f"line {number}: --{name} is given twice")
        given.append(name)
        if name == "n":
            values["negative"] = value
            continue
        if not value:
            raise PromptsError(f"line {number}: --{name} ({OPTIONS[name]}) needs a value, e.g. "
                               f"--{name} {values[_READ[name][0]]}")
        key, read = _READ[name]
        try:
            values[key] = read(value, d)
        except ValueError as e:
            raise PromptsError(f"line {number}: --{name} {value}: {e}") from None
    if not prompt:
        raise PromptsError(f"line {number}: no prompt text before --{found[0].group(1)}; write "
                           f"the prompt first, then its options")
    return SamplePrompt(**values, line=number, given=tuple(given))


def parse_prompts(text: str, defaults: PromptDefaults) -> list[SamplePrompt]:
    """The prompts of a sample-prompts text, in order; PromptsError for the first line
    that does not parse, or a text without any prompt."""
    out: list[SamplePrompt] = []
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(out) == MAX_PROMPTS:
            raise PromptsError(f"line {number}: more than {MAX_PROMPTS} prompts; a sample grid "
                               f"holds at most {MAX_PROMPTS}")
        out.append(_parse_line(line, number, len(out), defaults))
    if not out:
        raise PromptsError("no prompts: write one prompt per line (blank lines and lines "
                           "starting with # are ignored)")
    return out


def summary(prompts: list[SamplePrompt]) -> str:
    """One line about parsed prompts, e.g. '3 prompts · sizes 64x64, 32x48 · seeds 0-2'."""
    sizes = list(dict.fromkeys(f"{p.width}x{p.height}" for p in prompts))
    seeds = [p.seed for p in prompts]
    span = (f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + len(seeds)))
            and len(seeds) > 1 else ", ".join(map(str, seeds[:8])) + (" ..." if len(seeds) > 8
                                                                      else ""))
    return (f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''} · "
            f"size{'s' if len(sizes) > 1 else ''} {', '.join(sizes)} · "
            f"seed{'s' if len(seeds) > 1 else ''} {span}")


def format_prompts(prompts: list[str], defaults: PromptDefaults) -> str:
    """The file text of plain prompts (each line takes every option from the config),
    under a comment that explains the format."""
    d = defaults
    head = [
        "# Sample prompts: one prompt per line, then its options (each optional):",
        "#   --n negative prompt   --w width   --h height   --d seed   --l CFG scale   "
        "--s steps",
        f"# e.g.  a red apple on a table --n blurry --w {d.width} --h {d.height} --d 7 "
        f"--l {d.cfg:g} --s {d.steps}",
        "# Left out, an option takes the run's sample settings (config.yaml, section sample);",
        "# the n-th prompt's seed is sample.seed + n - 1. Sizes: multiples of "
        f"{d.patch} up to {d.max_side}.",
        "# Blank lines and lines starting with # are ignored. The trainer reads this file",
        "# before every sample grid: an edit is used from the next grid on.",
        ""]
    return "\n".join(head + [" ".join(p.split()) for p in prompts]) + "\n"


def from_config(cfg: RunConfig, defaults: PromptDefaults) -> tuple[str, list[SamplePrompt]]:
    """The file text of sample.prompts and its parse; ConfigError when a prompt would not
    read back as itself (it holds an option or starts with #)."""
    text = format_prompts(cfg.sample.prompts, defaults)
    try:
        prompts = parse_prompts(text, defaults)
        same = [p.prompt for p in prompts] == [" ".join(p.split()) for p in cfg.sample.prompts]
    except PromptsError:
        same = False
    if not same:
        bad = next((p for p in cfg.sample.prompts if p.strip().startswith("#")
                    or _OPTION.search(p) or not p.strip()), cfg.sample.prompts[0])
        raise ConfigError(f"sample.prompts: {bad!r} cannot be a line of the sample-prompts "
                          f"file (a line starting with # is a comment, ' --x' starts an "
                          f"option, a prompt cannot be empty); reword it")
    return text, prompts


def caption_prompts(held_out: list[str], trained: list[str], n: int = 4) -> list[str]:
    """Up to `n` distinct captions of a dataset as sample prompts: those of the held-out
    validation images first (never trained, they show whether the model generalises),
    then training captions spread evenly over the dataset. Each is one line of plain words;
    captions that cannot be a line of the file (an option, a leading #) are left out."""
    def usable(caption: str) -> str:
        line = " ".join(caption.split())
        return "" if not line or line.startswith("#") or _OPTION.search(line) else line

    out: list[str] = []
    stride = max(1, len(trained) // max(1, n))
    for caption in [*held_out, *trained[::stride], *trained]:
        line = usable(caption)
        if line and line not in out:
            out.append(line)
            if len(out) == n:
                break
    return out


# --------------------------------------------------------------------------------------
# A run's file
# --------------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    """The text of a prompts file; PromptsError when it cannot be read as UTF-8 text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptsError(f"{Path(path).name} does not exist") from None
    except OSError as e:
        raise PromptsError(f"cannot read {Path(path).name} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PromptsError(f"{Path(path).name} is not UTF-8 text (byte {e.start})") from None


def run_defaults(run: RunDir) -> PromptDefaults:
    """The defaults of a run's prompt lines as its trainer sees them: its config.yaml and
    the trained sizes its newest checkpoint records (the config's sizes before the first
    one). ConfigError when the config cannot be read."""
    cfg = load_preset(run.config)
    ckpts = list_checkpoints(run.checkpoints)
    trained = None
    if ckpts:
        try:
            trained = trained_sizes(read_meta(ckpts[-1].path))
        except (OSError, ValueError, CheckpointError):   # the config's sizes then
            trained = None
    return prompt_defaults(cfg, trained)


def run_prompts_text(run: RunDir) -> str:
    """The text of a run's prompts file, for an editor; PromptsError when it is missing,
    unreadable or a link out of the run folder."""
    path = run.sample_prompts
    if path.exists() and not path.resolve().is_relative_to(run.root.resolve()):
        raise PromptsError(f"{path.name} links out of the run folder; it is not shown")
    return read_text(path)


def save_prompts(run: RunDir, text: str, defaults: PromptDefaults) -> list[SamplePrompt]:
    """Check `text` and write it as the run's prompts file (atomically); PromptsError,
    and nothing written, when it does not parse."""
    prompts = parse_prompts(text, defaults)
    atomic_write_text(run.sample_prompts, text if text.endswith("\n") else text + "\n")
    return prompts


class RunPrompts:
    """The trainer's side of the file: the prompts of the next grid."""

    def __init__(self, path: Path, prompts: list[SamplePrompt], defaults: PromptDefaults):
        self.path, self.prompts, self.defaults = Path(path), prompts, defaults
        self._seen: str | None = None   # the text (or problem) the prompts were last read from

    @classmethod
    def start(cls, run: RunDir, cfg: RunConfig, trained: dict[str, int] | None, *,
              resume: bool, main: bool, log: Callable[[str], None]) -> RunPrompts:
        """The prompts a run starts with (main rank; the other ranks never sample).

        A new run keeps a prompts file already in its folder that a person wrote (the
        studio's editor, or one put there before starting from the command line): its
        prompts become sample.prompts (`cfg` is changed), so config.yaml lists them; one
        that does not parse is refused (ConfigError). Else, or when the file there is
        one this module wrote and nobody edited (left by an earlier try that failed),
        it writes the file from sample.prompts. A resumed run reads its file (writing
        it when missing); one that does not parse is logged and sample.prompts used."""
        d = prompt_defaults(cfg, trained)
        path = run.sample_prompts
        if not main:
            return cls(path, [], d)
        text = None
        try:
            text = read_text(path) if path.exists() else None
            found = parse_prompts(text, d) if text is not None else None
        except PromptsError as e:
            if not resume:
                raise ConfigError(f"{path}: {e}; fix the file or delete it (the run then "
                                  f"writes it from sample.prompts)") from None
            log(f"sample prompts: {path.name}: {e}; the grids use sample.prompts until it is "
                f"fixed")
            out = cls(path, from_config(cfg, d)[1], d)
            out._seen = text if text is not None else f"\0{e}"   # logged once, here
            return out
        if found is not None and (resume or text != format_prompts([p.prompt for p in found], d)):
            if not resume:
                cfg.sample.prompts = [p.prompt for p in found]
                log(f"sample prompts: {summary(found)} from the {path.name} found in the run "
                    f"folder")
            return cls(path, found, d)
        text, prompts = from_config(cfg, d)
        atomic_write_text(path, text)
        return cls(path, prompts, d)

    def captions(self) -> list[str]:
        """The texts the grids encode (for a text-feature cache made before training)."""
        return list(dict.fromkeys(t for p in self.prompts for t in (p.prompt, p.negative)))

    def read(self, log: Callable[[str], None], encoder=None) -> list[SamplePrompt]:
        """The prompts of the next grid: the file as it is now, or the last good prompts
        when it does not parse (logged once per version of the file). With a frozen
        encoder's feature cache (`encoder.missing`), a prompt without features counts as
        a bad edit: the encoder is unloaded while the run trains."""
        try:
            text = read_text(self.path)
        except PromptsError as e:
            text, problem = None, str(e)
        key = text if text is not None else f"\0{problem}"
        if key == self._seen:
            return self.prompts
        self._seen = key
        try:
            if text is None:
                raise PromptsError(problem)
            prompts = parse_prompts(text, self.defaults)
            missing = getattr(encoder, "missing", None)
            absent = missing([t for p in prompts for t in (p.prompt, p.negative)]) if missing \
                else []
            if absent:
                p = next(p for p in prompts if absent[0] in (p.prompt, p.negative))
                raise PromptsError(f"line {p.line}: {absent[0][:80]!r} has no cached text "
                                   f"features (the text encoder is unloaded while the run "
                                   f"trains); it is used once the run is resumed")
        except PromptsError as e:
            log(f"sample prompts: {self.path.name}: {e}; the grid keeps the last good prompts")
            return self.prompts
        if prompts != self.prompts:
            log(f"sample prompts: {summary(prompts)} from {self.path.name}")
        self.prompts = prompts
        return prompts


def cell_labels(prompts: list[SamplePrompt]) -> list[tuple[str, str]]:
    """(prompt, details) under each cell of a grid: details name the size, CFG scale or
    steps where the cells differ in them, and a seed that its line set."""
    vary = {k: len({getattr(p, k) for p in prompts}) > 1 for k in ("cfg", "steps")}
    vary["size"] = len({(p.width, p.height) for p in prompts}) > 1
    out = []
    for p in prompts:
        parts = [f"{p.width}x{p.height}"] if vary["size"] else []
        if "d" in p.given:
            parts.append(f"seed {p.seed}")
        if vary["cfg"]:
            parts.append(f"cfg {p.cfg:g}")
        if vary["steps"]:
            parts.append(f"{p.steps} step{'s' if p.steps != 1 else ''}")
        out.append((p.prompt, ", ".join(parts)))
    return out
