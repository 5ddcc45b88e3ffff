"""Measuring the network: bare training and inference steps on random inputs, the
matmul peak of the device, achieved FLOP/s against it, peak memory, the plain baseline
measured alongside, where the time goes (torch.profiler, attributed to the network's
parts), and which attention kernel runs on a GPU. `python -m engine.bench network`
and `gpu` print what these return.

A *bare* training step is what the network itself costs: forward, the v-space loss
of engine/flow.py (x-prediction is turned into a velocity as in training), backward
and the trainer's optimizer (engine/optim.py), on random images, noise, times and
text tokens. Everything else the trainer does per step (data loading, the text
encoder, the frequency, iREPA and gamma losses, clipping, EMA) is trainer overhead.
With model.self_cond a step also runs, on average, loss.self_cond_p inference forwards
(the estimate fed back): their time and FLOPs are added to the training step's.

FLOPs are the analytic counts of engine/flops.py; a training step counts 3x the
forward (the backward computes two matmuls per forward matmul). Recomputation under
gradient checkpointing is not counted, so utilisation is model-FLOPs utilisation.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from engine.attention import attention
from engine.baseline import PlainDiT
from engine.config import RunConfig
from engine.distributed import (
    PRECISIONS,
    autocast_for,
    compiler_problem,
    compute_precision,
    peak_rss_mb,
    release_memory,
    reset_peak_memory,
)
from engine.flops import PARTS, baseline_flops, extra_forward_share, pixelhdm_flops
from engine.flow import interpolate, resolution_shift, sample_t, to_velocity, v_loss
from engine.model import PixelHDM, TextCond
from engine.optim import build_optimizer

# Dense bf16 tensor-core peaks in FLOP/s by GPU name (vendor data sheets, no sparsity;
# GeForce cards at their fp32-accumulate rate). First match wins.
KNOWN_PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100.*NVL", 835e12), (r"H100.*PCIe", 756e12), (r"H100", 989e12),
    (r"H200.*NVL", 835e12), (r"H200", 989e12), (r"A100", 312e12), (r"L40S", 362e12),
    (r"RTX 4090 D", 147e12), (r"RTX 4090", 165e12), (r"RTX 4080(?! SUPER)", 97.5e12),
    (r"RTX 4070 Ti(?! SUPER)", 80.2e12), (r"RTX 3090 Ti", 80e12), (r"RTX 3090", 71e12),
)


def dense_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by its name; None when unknown."""
    for pattern, peak in KNOWN_PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of fn(), with the GPU's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_seconds(fns: dict[str, Callable[[], object]], steps: int, device: torch.device,
                   warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function after `warmup` calls each. The calls
    are interleaved (a, b, a, b, ...), so load that drifts during the run (other
    processes, clocks) weighs on all of them alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(device: torch.device, precision: str) -> tuple[float, int]:
    """(FLOP/s, n) of the best of a few n x n matmuls in the precision's dtype: what
    this device reaches on the easiest large workload, right now. n = 4096 on a GPU,
    1024 on the CPU (a 4096 matmul takes seconds there)."""
    n, reps = (4096, 10) if device.type == "cuda" else (1024, 1)
    gen = torch.Generator().manual_seed(0)
    dtype = PRECISIONS[precision]
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)
    run()
    best = min(timed(run, device) for _ in range(5))
    return 2 * n ** 3 * reps / best, n


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) while fn() runs, after a first call (so optimizer state exists,
    as in every step but the first). On CUDA what tensors allocated; on the CPU the
    process's resident high-water mark (Linux; None where it cannot be started afresh),
    which also counts Python, the libraries and whatever else the process holds, as the
    trainer's logged `mem_mb` on the CPU does."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        release_memory(device)   # what earlier measurements freed is not this one's
    if not reset_peak_memory(device):
        return None
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


# --------------------------------------------------------------------------------------
# Bare steps
# --------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One random training batch: images x, noise eps, times t, z_t and text."""
    x: Tensor
    eps: Tensor
    t: Tensor
    z: Tensor
    text: TextCond

    @staticmethod
    def random(cfg: RunConfig, text_dim: int, batch: int, width: int, height: int,
               tokens: int, device: torch.device, seed: int = 0) -> "Inputs":
        """Times drawn as in training (logit-normal, shifted for the size); `tokens`
        real text tokens of width `text_dim` per image."""
        gen = torch.Generator().manual_seed(seed)
        x = (torch.rand(batch, 3, height, width, generator=gen) * 2 - 1).to(device)
        eps = torch.randn(batch, 3, height, width, generator=gen).to(device)
        lo = cfg.loss
        shift = resolution_shift(width, height, lo.time_shift, lo.shift_reference)
        t = sample_t(batch, lo.p_mean, lo.p_std, shift, uniform=lo.t_uniform,
                     generator=gen).to(device)
        tok = torch.randn(batch, tokens, text_dim, generator=gen).to(device)
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        text = TextCond(tok, mask, tok[:, -1], dense=True)   # as the trainer's, no GPU read
        return Inputs(x, eps, t, interpolate(x, eps, t), text)


# warm-up calls of a compiled network at a new shape: the first compiles, and the next
# one is still slow on the CPU (measured: 5-7x a settled step)
WARMUP_COMPILED = 3


def compile_status(cfg: RunConfig, device: torch.device) -> str:
    """How the trainer would run the blocks: 'compiled' (train.compile and a working
    compiler), 'eager (train.compile off)' or 'eager (<why the compiler cannot run>)'."""
    if not cfg.train.compile:
        return "eager (train.compile off)"
    problem = compiler_problem(device)
    return f"eager ({problem})" if problem else "compiled"


def build_network(cls: type[nn.Module], cfg: RunConfig, text_dim: int, device: torch.device,
                  compile_blocks: bool) -> nn.Module:
    """PixelHDM or PlainDiT for the config, seeded, with its gradient checkpointing and,
    with `compile_blocks`, its blocks compiled as in training (the first call compiles)."""
    torch.manual_seed(cfg.train.seed)
    net = cls(cfg.model, text_dim).to(device)
    net.grad_checkpointing = cfg.train.grad_checkpointing
    if compile_blocks:
        net.compile_blocks()
    return net


class TrainStep:
    """One bare optimizer step of `net` (see the module docstring)."""

    def __init__(self, net: nn.Module, cfg: RunConfig, precision: str, device: torch.device):
        self.net, self.cfg, self.precision, self.device = net, cfg, precision, device
        self.optimizer, _ = build_optimizer(net, cfg.train, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, b: Inputs) -> None:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.precision, self.device):
            pred = self.net(b.z, b.t, b.text)
        m = self.cfg.model
        loss = v_loss(to_velocity(pred.float(), b.z, b.t, m.prediction, self.cfg.loss.t_eps),
                      b.x - b.eps)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def forward_only(net: nn.Module, b: Inputs, precision: str, device: torch.device) -> None:
    """One inference forward pass of `net` on the batch."""
    net.eval()
    with torch.no_grad(), autocast_for(precision, device):
        net(b.z, b.t, b.text)


# --------------------------------------------------------------------------------------
# The network measurement
# --------------------------------------------------------------------------------------

def measure_network(cfg: RunConfig, text_dim: int, sizes: list[tuple[int, int]], batch: int,
                    tokens: int, steps: int, device: torch.device, precision: str,
                    profile_steps: int = 0) -> dict:
    """Throughput, FLOP/s, utilisation and memory of PixelHDM at each (width, height),
    with the plain baseline timed in the same loop, both compiled when training would
    compile. Returns {"rows", "flops", "profile", "blocks" (compile_status),
    "parameters", "baseline_parameters"}; "profile" is empty unless `profile_steps` > 0."""
    blocks = compile_status(cfg, device)
    compiled = blocks == "compiled"
    ours = build_network(PixelHDM, cfg, text_dim, device, compiled)
    ours_step = TrainStep(ours, cfg, precision, device)
    peaks = {}   # before the baseline exists, so that the peak is PixelHDM's alone
    for w, h in sizes:
        b = Inputs.random(cfg, text_dim, batch, w, h, tokens, device)
        peaks[w, h] = peak_memory_mib(lambda: ours_step(b), device)
    base = build_network(PlainDiT, cfg, text_dim, device, compiled)
    base_step = TrainStep(base, cfg, precision, device)
    rows, flop_rows, profile_rows = [], [], []
    for w, h in sizes:
        b = Inputs.random(cfg, text_dim, batch, w, h, tokens, device)
        f_ours = pixelhdm_flops(cfg.model, text_dim, w, h, tokens)
        f_base = baseline_flops(cfg.model, text_dim, w, h, tokens)
        size = f"{w}x{h}"
        flop_rows += [{"size": size, "network": name, **f, "total": sum(f.values())}
                      for name, f in (("PixelHDM", f_ours), ("baseline", f_base))]
        peak, n = matmul_peak(device, precision)
        secs = median_seconds({
            "train": lambda: ours_step(b), "base_train": lambda: base_step(b),
            "infer": lambda: forward_only(ours, b, precision, device),
            "base_infer": lambda: forward_only(base, b, precision, device)}, steps, device,
            warmup=WARMUP_COMPILED if compiled else 1)
        fwd, fwd_base = sum(f_ours.values()) * batch, sum(f_base.values()) * batch
        share = extra_forward_share(cfg, f_ours)
        secs["train"] += share * secs["infer"]
        patches = (w // cfg.model.patch_size) * (h // cfg.model.patch_size)
        row = {"size": size, "batch": batch, "text_tokens": tokens, "patch_tokens": patches,
               "gflop_image": fwd / batch / 1e9, "matmul_peak_flops": peak, "matmul_n": n}
        for kind, work, base_work in (("train", (3 + share) * fwd, 3 * fwd_base),
                                      ("infer", fwd, fwd_base)):
            s = secs[kind]
            row.update({f"{kind}_s": s, f"{kind}_images_s": batch / s,
                        f"{kind}_tokens_s": batch * patches / s, f"{kind}_flops_s": work / s,
                        f"{kind}_util": work / s / peak})
            # seconds per FLOP relative to the baseline's
            row[f"{kind}_vs_baseline"] = (s / work) / (secs[f"base_{kind}"] / base_work)
            row[f"base_{kind}_images_s"] = batch / secs[f"base_{kind}"]
        row["peak_mib"] = peaks[w, h]
        rows.append(row)
        if profile_steps:
            profile_rows += [{"size": size, **r} for r in
                             profile_parts(ours, lambda: ours_step(b), device, profile_steps)]
    params = sum(p.numel() for p in ours.parameters())
    base_params = sum(p.numel() for p in base.parameters())
    ours = ours_step = base = base_step = None   # dropped before the memory is released
    release_memory(device)
    return {"rows": rows, "flops": flop_rows, "profile": profile_rows, "blocks": blocks,
            "parameters": params, "baseline_parameters": base_params}


class BareSteps:
    """Bare training steps of PixelHDM at the trainer's batch shapes (batch, width,
    height), one call at a time: the overhead benchmark times one after each of the
    trainer's steps, so that both see the machine in the same state (back-to-back
    measurements on a 2-core VM drifted by 1.3x in either direction). A step also runs,
    weighted by its share, the inference forward that self-conditioning adds
    (flops.extra_forward_share). The first `warmup` calls at a shape run untimed and
    return None, as the trainer's own first steps at a new shape allocate or compile."""

    def __init__(self, cfg: RunConfig, text_dim: int, tokens: int, device: torch.device,
                 precision: str, compiled: bool):
        self.cfg, self.text_dim, self.tokens = cfg, text_dim, tokens
        self.device, self.precision = device, precision
        self.net = build_network(PixelHDM, cfg, text_dim, device, compiled)
        self.step = TrainStep(self.net, cfg, precision, device)
        self.warmup = WARMUP_COMPILED if compiled else 1
        self.inputs: dict[tuple[int, int, int], tuple[Inputs, float]] = {}
        self.seen: Counter = Counter()

    def __call__(self, shape: tuple[int, int, int]) -> float | None:
        if shape not in self.inputs:
            batch, w, h = shape
            b = Inputs.random(self.cfg, self.text_dim, batch, w, h, self.tokens, self.device)
            share = extra_forward_share(
                self.cfg, pixelhdm_flops(self.cfg.model, self.text_dim, w, h, self.tokens))
            self.inputs[shape] = b, share
        b, share = self.inputs[shape]
        self.seen[shape] += 1
        seconds = timed(lambda: self.step(b), self.device)
        if share:
            seconds += share * timed(lambda: forward_only(self.net, b, self.precision,
                                                          self.device), self.device)
        return seconds if self.seen[shape] > self.warmup else None


def preset_memory(name: str, cfg: RunConfig, budget_gib: float, device: torch.device) -> dict:
    """Peak memory of a bare training step of a preset at its largest square bucket, its
    batch size, precision and gradient checkpointing, with 64 text tokens of width 1024;
    plus the fp32 EMA copy that a run holds too (a frozen text encoder is unloaded once
    its features are cached), against 90% of `budget_gib`. It fits when what PyTorch's
    allocator reserved at the peak (the memory the card really gives the process, with
    the allocator's cached blocks and fragmentation) plus the EMA is inside that budget;
    the rest of the card is the CUDA context and the desktop. The peak is None when the
    step ran out of memory. The blocks run eagerly: an upper bound of the compiled step
    (fused kernels keep fewer intermediates), and what a machine without a working
    compiler trains with."""
    side, batch = cfg.data.max_side, cfg.train.batch_size
    precision = compute_precision(cfg.train.precision, device)[0]   # as the trainer computes
    row = {"preset": name, "size": f"{side}x{side}", "batch": batch,
           "grad_checkpointing": cfg.train.grad_checkpointing, "precision": precision,
           "step_peak_gib": None, "with_ema_gib": None, "reserved_gib": None,
           "budget_gib": 0.9 * budget_gib}
    net = build_network(PixelHDM, cfg, 1024, device, compile_blocks=False)
    step = TrainStep(net, cfg, precision, device)
    b = Inputs.random(cfg, 1024, batch, side, side, 64, device)
    try:
        peak = peak_memory_mib(lambda: step(b), device) / 1024
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30   # since that reset
        ema = 4 * sum(p.numel() for p in net.parameters()) * (cfg.train.ema_decay > 0)
        row.update(step_peak_gib=peak, with_ema_gib=peak + ema / 2 ** 30,
                   reserved_gib=max(reserved, peak) + ema / 2 ** 30)
    except torch.OutOfMemoryError:
        pass                         # the row keeps None: the table says OOM
    finally:
        net = step = b = None
        release_memory(device)
    total = row["reserved_gib"]
    row["fits"] = total is not None and total <= row["budget_gib"]
    return row


# --------------------------------------------------------------------------------------
# Where the time goes
# --------------------------------------------------------------------------------------

def part_modules(net: PixelHDM) -> list[tuple[str, nn.Module]]:
    """(part, submodule) for every submodule that engine.flops counts as a part."""
    out = []
    for block in net.patch_blocks:
        out += [("patch_attn", block.attn), ("patch_mlp", block.mlp)]
    for block in net.pixel_blocks:
        out += [("pixel_adaln", block.cond_expand), ("pixel_adaln", block.ada),
                ("compaction", block.compress), ("compaction", block.expand),
                ("pixel_attn", block.attn), ("pixel_mlp", block.mlp)]
    return out


RANGE = "part::"
# profile parts beyond engine.flops.PARTS: what the blocks do around their parts (norms,
# modulation, residuals, and the patch blocks' AdaLN projection) and the optimizer step
PROFILE_PARTS = PARTS[:2] + ("patch_glue",) + PARTS[2:6] + ("pixel_glue", "optimizer", "other")


@contextlib.contextmanager
def part_ranges(net: PixelHDM):
    """Forward hooks that open a torch.profiler range `part::<part>` around each part's
    submodules (and `part::patch_glue` / `part::pixel_glue` around whole blocks, so
    their own ops count apart); the innermost range names an op's part."""
    ranges = ([("patch_glue", b) for b in net.patch_blocks]
              + [("pixel_glue", b) for b in net.pixel_blocks] + part_modules(net))
    handles, open_ranges = [], {}

    def hooks(part: str, module: nn.Module):
        def enter(mod, args):
            rf = record_function(RANGE + part)
            rf.__enter__()
            open_ranges.setdefault(id(mod), []).append(rf)

        def leave(mod, args, output):
            open_ranges[id(mod)].pop().__exit__(None, None, None)
        return (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))

    for part, module in ranges:
        handles += hooks(part, module)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _self_time(e, on_gpu: bool) -> float:
    return e.self_device_time_total if on_gpu else e.self_cpu_time_total


def profile_parts(net: PixelHDM, step: Callable[[], None], device: torch.device,
                  steps: int = 2, top: int = 3, sessions: int = 3) -> list[dict]:
    """Each part's share of `steps` calls of step(), its milliseconds per call and its
    `top` operators by self time (GPU time on CUDA, CPU time otherwise).

    Forward ops belong to the innermost part range around them. A backward op has no
    range around it; it belongs to the part of the forward op that created its autograd
    node, found through the profiler's (forward thread, sequence number) link.

    The profile is taken `sessions` times and the quickest is reported. Time the system
    takes now and then (page faults on memory handed back to a virtual machine's host,
    another process) lands on whichever large operators happen to run then: on a 2-core
    VM one session in two put 2-4x the time of the others on the pixel MLP's products."""
    on_gpu = device.type == "cuda"
    best: dict[str, dict[str, float]] | None = None
    for _ in range(sessions):
        per_op = _profile_session(net, step, device, steps, on_gpu)
        if best is None or _total(per_op) < _total(best):
            best = per_op
    total = _total(best) or 1.0
    rows = []
    for part, ops in best.items():
        spent = sum(ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        rows.append({"part": part, "share": spent / total, "ms_per_step": spent / steps / 1e3,
                     "top_ops": [{"op": name, "share": t / (spent or 1.0)} for name, t in ranked]})
    return rows


def _total(per_op: dict[str, dict[str, float]]) -> float:
    return sum(sum(ops.values()) for ops in per_op.values())


def _profile_session(net: PixelHDM, step: Callable[[], None], device: torch.device,
                     steps: int, on_gpu: bool) -> dict[str, dict[str, float]]:
    """One profile of `steps` calls: {part: {operator: self time in microseconds}}."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    # compiled blocks run eagerly here: the hooks' ranges cannot enter a compiled graph
    with (torch.compiler.set_stance("force_eager"), part_ranges(net),
          profile(activities=activities) as prof):
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]

    def walk(visit) -> None:
        stack = [(e, "other") for e in events if e.cpu_parent is None]
        while stack:
            e, part = stack.pop()
            part = visit(e, part)
            stack += [(c, part) for c in e.cpu_children]

    created_by: dict[tuple[int, int], str] = {}

    def label_forward(e, part: str) -> str:
        if e.name.startswith(RANGE):
            return e.name[len(RANGE):]
        if e.name.startswith("Optimizer.step"):
            return "optimizer"
        if part != "other" and e.sequence_nr >= 0:
            created_by.setdefault((e.thread, e.sequence_nr), part)
        return part
    walk(label_forward)

    per_op: dict[str, dict[str, float]] = {p: {} for p in PROFILE_PARTS}

    def attribute(e, part: str) -> str:
        part = label_forward(e, part)
        if e.name.startswith("autograd::engine::evaluate_function") and part == "other":
            part = created_by.get((e.fwd_thread, e.sequence_nr), part)
        if not e.name.startswith(RANGE):
            ops = per_op[part]
            ops[e.name] = ops.get(e.name, 0.0) + _self_time(e, on_gpu)
        return part
    walk(attribute)
    return per_op


# --------------------------------------------------------------------------------------
# Which attention kernel runs (CUDA)
# --------------------------------------------------------------------------------------

def kernel_family(names: list[str]) -> str:
    """cudnn / flash / efficient from SDPA's kernel names, else math (plain GEMMs and a
    softmax kernel)."""
    low = [n.lower() for n in names]
    for family, keys in (("cudnn", ("cudnn",)), ("flash", ("flash",)),
                         ("efficient", ("fmha", "efficient", "mem_eff"))):
        if any(k in n for n in low for k in keys):
            return family
    return "math"


def attention_kernels(cfg: RunConfig, width: int, height: int, text_tokens: int,
                      batch: int, device: torch.device, precision: str) -> list[dict]:
    """Which kernels one forward + backward of engine.attention.attention launches for
    the network's attention shapes at a size: the patch path with and without padded
    text (a masked call) and the pixel path's compacted tokens."""
    m = cfg.model
    L = (width // m.patch_size) * (height // m.patch_size)
    S = text_tokens + L
    dtype = PRECISIONS[precision]
    rows = []
    for case, seq, masked in (("patch attention, padded text", S, True),
                              ("patch attention, no padding", S, False),
                              ("pixel attention (compacted)", L, False)):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, m.head_dim, generator=gen)
                   .to(device, dtype).requires_grad_()
                   for heads in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
        mask = None
        if masked:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
            mask[0, text_tokens // 2:text_tokens] = False     # the first prompt is shorter

        def run() -> None:
            attention(q, k, v, mask, m.attention).float().sum().backward()
        run()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize(device)
        spent: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                spent[e.name] = spent.get(e.name, 0.0) + e.self_device_time_total
        names = sorted(spent, key=lambda n: -spent[n])
        rows.append({"call": case, "seq": seq, "mask": masked, "backend": m.attention,
                     "kernel": kernel_family(names), "top_kernels": names[:3]})
    return rows


def text_width(cfg, args) -> int:
    """Width of the random text tokens: the builtin encoder's, else --text-dim (the
    hidden size of the frozen Qwen3)."""
    return cfg.text.builtin_dim if cfg.text.encoder == "builtin" else args.text_dim
