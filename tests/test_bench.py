"""The performance benchmarks: analytic FLOPs against torch's FLOP counter, the
`network` and `overhead` reports on a tiny config, profiler attribution, and the `gpu`
command's refusal on a machine without CUDA."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch
from tiny import NET, as_sets
from torch.utils.flop_counter import FlopCounterMode

from engine.baseline import PlainDiT
from engine.bench import main as bench_main
from engine.config import load_preset
from engine.flops import PARTS, baseline_flops, pixelhdm_flops
from engine.model import PixelHDM, TextCond
from engine.perf import Inputs, TrainStep, dense_peak, kernel_family, part_modules, profile_parts

# a smaller tiny-cpu: a training step takes milliseconds
TINY = [*NET, "train.batch_size=4", "train.cpu_threads=1",
        "train.compile=false",
        "data.min_side=16", "data.max_side=32", "data.bucket_step=8", "data.val_images=0"]


def sets(*extra: str) -> list[str]:
    return as_sets([*TINY, *extra])


def measured_flops(net: PixelHDM, z, t, text) -> dict[str, int]:
    """FLOPs of one forward pass per part, from torch's FLOP counter per submodule."""
    with FlopCounterMode(display=False) as counter:
        net(z, t, text)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    names = {id(m): f"{type(net).__name__}.{n}" for n, m in net.named_modules()}
    out = dict.fromkeys(PARTS, 0)
    for part, module in part_modules(net):
        out[part] += per_module.get(names[id(module)], 0)
    out["other"] = counter.get_total_flops() - sum(out.values())
    return out


@pytest.mark.parametrize("gate, self_cond", [("headwise", False), ("elementwise", False),
                                             ("none", False), ("headwise", True)])
def test_analytic_flops_match_the_flop_counter_per_part(gate, self_cond):
    # the explicit attention kernel runs matmuls the counter sees (CPU SDPA is not counted);
    # non-square image, GQA, a mlp_ratio whose hidden width is rounded down; self_cond
    # widens the two input embeddings
    cfg = load_preset("tiny-cpu", ["model.attention=math", f"model.gate={gate}",
                                   "model.mlp_ratio=2.7", "model.num_kv_heads=2",
                                   f"model.self_cond={str(self_cond).lower()}"])
    B, T, W, H, C = 2, 5, 32, 16, 40
    torch.manual_seed(0)
    text = TextCond(torch.randn(B, T, C), torch.ones(B, T, dtype=torch.bool), torch.randn(B, C))
    z, t = torch.randn(B, 3, H, W), torch.rand(B)
    measured = measured_flops(PixelHDM(cfg.model, C), z, t, text)
    analytic = pixelhdm_flops(cfg.model, C, W, H, T)
    for part in PARTS:   # the counts are exact; any formula error shows
        assert measured[part] > 0
        assert analytic[part] * B == pytest.approx(measured[part], rel=1e-9), part
    with FlopCounterMode(display=False) as counter:
        PlainDiT(cfg.model, C)(z, t, text)
    assert sum(baseline_flops(cfg.model, C, W, H, T).values()) * B == pytest.approx(
        counter.get_total_flops(), rel=1e-9)


def test_network_reports_rates_utilisation_and_the_baseline_ratio(capsys):
    code = bench_main(["network", "--preset", "tiny-cpu", *sets(), "--sizes", "16x16,24x16",
                       "--batch", "2", "--tokens", "4", "--steps", "1", "--device", "cpu",
                       "--json", "--profile"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] > report["baseline_parameters"] > 0
    assert report["blocks"] == "eager (train.compile off)"
    rows = report["rows"]
    assert [r["size"] for r in rows] == ["16x16", "24x16"]
    cfg = load_preset("tiny-cpu", TINY)
    for row in rows:
        w, h = map(int, row["size"].split("x"))
        assert row["gflop_image"] * 1e9 == pytest.approx(
            sum(pixelhdm_flops(cfg.model, 32, w, h, 4).values()))
        assert row["patch_tokens"] == (w // 8) * (h // 8)
        for kind in ("train", "infer"):
            assert row[f"{kind}_images_s"] > 0 and row[f"{kind}_flops_s"] > 0
            assert row[f"{kind}_tokens_s"] == pytest.approx(
                row[f"{kind}_images_s"] * row["patch_tokens"])
            assert 0 < row[f"{kind}_util"] < 1.5
            assert row[f"{kind}_vs_baseline"] > 0 and row[f"base_{kind}_images_s"] > 0
        # training counts 3x the forward FLOPs
        assert row["train_flops_s"] == pytest.approx(
            3 * row["gflop_image"] * 1e9 * row["train_images_s"])
        assert row["matmul_peak_flops"] > 0
        # the process's resident peak on Linux (Python and the libraries alone hold more)
        assert row["peak_mib"] is None if not sys.platform.startswith("linux") else (
            row["peak_mib"] > 100)
    assert {(r["size"], r["network"]) for r in report["flops"]} == {
        (s, n) for s in ("16x16", "24x16") for n in ("PixelHDM", "baseline")}
    shares = [r["share"] for r in report["profile"] if r["size"] == "16x16"]
    assert sum(shares) == pytest.approx(1.0) and all(s >= 0 for s in shares)


def test_profile_puts_backward_ops_in_the_part_of_their_forward_op(tiny_config):
    cfg = tiny_config(*TINY[len(NET):])
    torch.manual_seed(0)
    net = PixelHDM(cfg.model, 32)
    step = TrainStep(net, cfg, "fp32", torch.device("cpu"))
    b = Inputs.random(cfg, 32, 2, 16, 16, 4, torch.device("cpu"))
    rows = {r["part"]: {o["op"] for o in r["top_ops"]}
            for r in profile_parts(net, lambda: step(b), torch.device("cpu"), 1, top=100)}
    # compress/expand are bias-free linears: their matmuls forward and backward
    assert "aten::mm" in rows["compaction"]
    assert any("MmBackward0" in op for op in rows["compaction"])
    assert any("silu_backward" in op for op in rows["pixel_mlp"])
    assert not any("silu_backward" in op for op in rows["compaction"])
    assert any(op.startswith("Optimizer.step") for op in rows["optimizer"])


def test_profile_reports_its_quickest_session(tiny_config):
    """A session slowed by work that is not the step's (here an operator the network never
    runs, in the first and last sessions) is not the one reported."""
    cfg = tiny_config(*TINY[len(NET):])
    torch.manual_seed(0)
    net = PixelHDM(cfg.model, 32)
    step = TrainStep(net, cfg, "fp32", torch.device("cpu"))
    b = Inputs.random(cfg, 32, 2, 16, 16, 4, torch.device("cpu"))
    calls = []

    def slowed_but_once():
        if len(calls) != 1:
            for _ in range(20):
                torch.special.erfinv(torch.rand(1024, 1024))
        calls.append(1)
        step(b)

    def ops(sessions):
        calls.clear()
        rows = profile_parts(net, slowed_but_once, torch.device("cpu"), 1, top=100,
                             sessions=sessions)
        return {o["op"] for r in rows for o in r["top_ops"]}

    assert "aten::erfinv" in ops(sessions=1)
    assert "aten::erfinv" not in ops(sessions=3)
    assert len(calls) == 3


def test_overhead_compares_the_trainer_with_the_bare_network(tmp_path, capsys, monkeypatch):
    """A bare step of the same batch shape is timed after each of the trainer's steps,
    except at a shape's first step (both sides warm up there). Without --out the run
    (checkpoints included) lives in a temporary folder that is gone afterwards, and the
    report says so instead of naming a removed path."""
    import tempfile

    import engine.bench_runs as bench
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    trainer_steps, bare_calls = [], []
    real_train, real_bare = bench.train, bench.BareSteps.__call__

    def train(*a, after_step=None, **k):
        def spy(shapes, seconds, epoch):
            trainer_steps.append((tuple(shapes), seconds, epoch))
            after_step(shapes, seconds, epoch)
        return real_train(*a, after_step=spy, **k)

    def bare(self, shape):
        bare_calls.append(shape)
        return real_bare(self, shape)
    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench.BareSteps, "__call__", bare)
    code = bench_main(["overhead", "--steps", "10", "--count", "24", "--device", "cpu",
                       "--json", *sets()])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert not list(tmp_path.glob("pixelhdm-bench-*"))
    assert "removed" in report["run"] and "removed" in report["data"]
    assert "sample_grid" not in report
    # one bare step per trainer step, of the same shape, in the same order
    assert len(trainer_steps) == 10
    assert bare_calls == [shape for shapes, _, _ in trainer_steps for shape in shapes]
    timed = [ts for i, ts in enumerate(trainer_steps)      # a shape's first step is not
             if any(shapes == ts[0] for shapes, _, _ in trainer_steps[:i])]
    row = report["rows"][0]
    assert row["epochs"] == "all" and report["blocks"] == "eager (train.compile off)"
    assert row["steps"] == len(timed)
    assert row["trainer_step_s"] == pytest.approx(sum(s for _, s, _ in timed) / len(timed))
    # 24 images in batches of up to 4: the run crosses epochs, and the first epoch (which
    # decodes every image) is told from the later ones (which read the decoded images)
    first = trainer_steps[0][2]
    assert [(r["epochs"], r["steps"]) for r in report["rows"][1:]] == [
        ("first", sum(e == first for *_, e in timed)), ("later", sum(e > first for *_, e in timed))]
    assert report["rows"][2]["steps"] > 0
    for key in ("trainer_images_s", "bare_step_s", "bare_images_s"):
        assert row[key] > 0
    assert row["overhead"] == pytest.approx(row["bare_images_s"] / row["trainer_images_s"])
    assert row["overhead"] == pytest.approx(row["trainer_step_s"] / row["bare_step_s"])
    buckets = report["buckets"]
    assert sum(b["steps"] for b in buckets) == row["steps"]
    assert all(1 <= int(b["batch"]) <= 4 and b["bare_step_s"] > 0 for b in buckets)
    assert all(int(s) % 8 == 0 and 16 <= int(s) <= 32
               for b in buckets for s in b["size"].split("x"))


def test_overhead_needs_a_timed_step(tmp_path, capsys, monkeypatch):
    import engine.bench_runs as bench
    monkeypatch.setattr(bench.BareSteps, "__call__", lambda self, shape: None)
    assert bench_main(["overhead", "--steps", "10", "--count", "24", "--device", "cpu",
                       "--out", str(tmp_path / "o"), *sets()]) == 2
    assert "every step met a batch shape for the first time" in capsys.readouterr().err


def test_overhead_measures_both_sides_in_what_the_cpu_computes(tmp_path, capsys, monkeypatch):
    """On a CPU without bf16 arithmetic a bf16 config trains in fp32, so the bare steps it
    is compared with run in fp32 too, and the report says fp32; an explicit --dtype bf16
    is refused as `network` refuses it."""
    import engine.bench_runs as bench
    import engine.distributed as distributed
    monkeypatch.setattr(distributed, "native_half", lambda precision: False)
    used = []
    real = bench.BareSteps.__init__
    monkeypatch.setattr(bench.BareSteps, "__init__",
                        lambda self, *a: used.append(a[4]) or real(self, *a))
    code = bench_main(["overhead", "--steps", "10", "--count", "24",
                       "--out", str(tmp_path / "o"), "--device", "cpu", "--json",
                       *sets("train.precision=bf16")])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32" and used == ["fp32"]
    assert bench_main(["train", "--steps", "10", "--dtype", "bf16", "--device", "cpu",
                       "--out", str(tmp_path / "t")]) == 2
    assert "dtype = bf16: this CPU has no bf16 arithmetic" in capsys.readouterr().err


def test_a_failed_benchmark_run_leaves_no_temporary_folder(tmp_path, capsys, monkeypatch):
    import tempfile

    import engine.bench_runs as bench
    from engine.train import TrainError
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fail(cfg, run, device_name=None, after_step=None):
        (run.root / "checkpoints" / "step_1.pt").write_bytes(b"x" * 1000)
        raise TrainError("disk full")
    monkeypatch.setattr(bench, "train", fail)
    assert bench_main(["train", "--steps", "10", "--count", "24", "--device", "cpu"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not list(tmp_path.glob("pixelhdm-bench-*"))
    # with --out the folder is the user's and stays
    assert bench_main(["train", "--steps", "10", "--count", "24", "--device", "cpu",
                       "--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept" / "run" / "checkpoints" / "step_1.pt").is_file()


def test_data_times_decoding_against_the_crop_cache_and_leaves_the_users_cache(
        tmp_path, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("PIXELHDM_CACHE_DIR", str(tmp_path / "cache"))
    for i in range(5):
        Image.new("RGB", (96, 64), (50 * i, 20, 90)).save(tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    assert bench_main(["data", "--data", str(tmp_path), "--images", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == report["stored"] == 4 and report["sizes"] == "64x40"
    assert [r["source"] for r in report["rows"]] == [
        "decoding the files", "building the crop cache", "reading the crop cache"]
    assert all(r["ms_per_image"] > 0 and r["images_s"] > 0 for r in report["rows"])
    assert not (tmp_path / "cache").exists()            # a temporary cache, removed after
    assert bench_main(["data", "--data", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jpg").write_bytes(b"not a picture")
    assert bench_main(["data", "--data", str(tmp_path / "empty")]) == 2
    assert "no trainable images" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_refuses_without_cuda(capsys):
    assert bench_main(["gpu", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident peak: Linux")
def test_cpu_peak_memory_is_the_measured_calls_own():
    """On the CPU the peak is the resident high-water mark while the measured call ran:
    blocks freed before it do not count (they are handed back first), the call's own
    allocation does."""
    import engine.perf as perf
    from engine.distributed import release_memory, reuse_freed_memory
    cpu = torch.device("cpu")

    def resident() -> float:
        return next(int(line.split()[1]) / 1024 for line in
                    Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:"))
    reuse_freed_memory()   # as the benchmarks run: freed memory kept by the process
    release_memory(cpu)
    bare = resident()
    # 768 MiB in heap-sized blocks (glibc keeps those once freed), touched, then freed
    blocks = [torch.ones(2 ** 22) for _ in range(48)]
    del blocks
    assert resident() > bare + 600                   # still held by the process

    def step():
        block = torch.ones(2 ** 26)   # 256 MiB, touched
        return float(block[-1])
    peak = perf.peak_memory_mib(step, cpu)
    assert bare + 200 <= peak < bare + 450, (bare, peak)   # the call's own, not the freed


def test_peak_table_and_kernel_names():
    assert dense_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert dense_peak("NVIDIA H100 PCIe") == 756e12
    assert dense_peak("NVIDIA GeForce RTX 4090") == 165e12
    assert dense_peak("NVIDIA GeForce RTX 4090 D") == 147e12     # a cut-down card of its own
    assert dense_peak("NVIDIA H200 NVL") == 835e12
    assert dense_peak("NVIDIA H200") == 989e12
    assert dense_peak("NVIDIA GeForce RTX 3090 Ti") == 80e12
    assert dense_peak("NVIDIA GeForce RTX 4080 SUPER") is None
    assert dense_peak("Some Future GPU") is None
    assert kernel_family(["pytorch_flash::flash_fwd_kernel<...>"]) == "flash"
    assert kernel_family(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "efficient"
    assert kernel_family(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]) == "cudnn"
    assert kernel_family(["ampere_bf16_s16816gemm", "softmax_warp_forward"]) == "math"


def test_gpu_report_computes_mfu_and_survives_a_failing_part(monkeypatch, capsys):
    # no GPU here: the measurements are stubbed, the assembly and the MFU are real
    import engine.bench as bench
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    monkeypatch.setattr(bench, "release_memory", lambda device: None)
    monkeypatch.setattr(bench, "attention_kernels", lambda *a: [
        {"call": "patch", "seq": 1088, "mask": True, "backend": "auto", "kernel": "efficient",
         "top_kernels": ["fmha_cutlassF_bf16"]}])
    row = {"size": "256x256", "batch": 16, "train_images_s": 100.0, "train_tokens_s": 25600.0,
           "train_flops_s": 378e12, "train_util": 0.6, "matmul_peak_flops": 630e12,
           "train_vs_baseline": 1.2, "peak_mib": 9000.0}
    monkeypatch.setattr(bench, "measure_network", lambda *a, **k: {"rows": [dict(row)]})

    def out_of_luck(*args):
        raise RuntimeError("no memory today")
    monkeypatch.setattr(bench, "preset_memory", out_of_luck)
    asked = []

    def sample(args):
        asked.append(vars(args))
        return {"rows": [{"sampler": "heun", "size": "512x512", "steps": 50, "model_evals": 99,
                          "batch": 1, "weights": "bfloat16", "seconds_per_image": 1.5,
                          "peak_mib": 4000.0}]}
    monkeypatch.setattr(bench, "bench_sample", sample)
    assert bench_main(["gpu", "--quick", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["device_name"] == "NVIDIA H100 PCIe" and report["dense_bf16_peak"] == 756e12
    assert report["throughput"][0]["mfu"] == pytest.approx(0.5)
    assert report["memory"] == [] and report["errors"] == ["memory: RuntimeError: no memory today"]
    assert report["kernels"][0]["kernel"] == "efficient" and report["sampling"]
    assert [(a["sizes"], a["steps"], a["samplers"]) for a in asked] == [("512x512", 50, "heun")] * 2
    # as generation runs, then with the weights kept in fp32 to compare
    assert [a.get("fp32_weights", False) for a in asked] == [False, True]
    assert len(report["sampling"]) == 2
    assert report["torch"] == torch.__version__ and report["date"]
    assert bench_main(["gpu", "--quick"]) == 1
    text = capsys.readouterr().out
    assert "MFU (data sheet)" in text and "50%" in text and "Heun-50 + CFG" in text


def test_gpu_report_on_a_gpu_older_than_ampere_measures_in_fp16(monkeypatch, capsys):
    """Such a GPU has no bf16 arithmetic and its one attention kernel takes no bf16: every
    part of the report computes in fp16, as the trainer and the generator do there."""
    import engine.attention as attention
    import engine.bench as bench
    import engine.perf as perf
    monkeypatch.setattr(attention, "_CAPABILITY", {0: (7, 5)})
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(bench, "release_memory", lambda device: None)
    asked = {}
    monkeypatch.setattr(bench, "attention_kernels",
                        lambda *a: asked.update(kernels=a[-1]) or [])
    monkeypatch.setattr(bench, "measure_network",
                        lambda *a, **k: asked.update(network=a[7]) or {"rows": []})
    monkeypatch.setattr(bench, "bench_sample",
                        lambda args: asked.update(sample=args.dtype) or {"rows": []})

    class Stop(Exception):
        pass

    def train_step(net, cfg, precision, device):
        asked.setdefault("memory", []).append(precision)
        raise Stop
    monkeypatch.setattr(perf, "build_network", lambda *a, **k: None)
    monkeypatch.setattr(perf, "TrainStep", train_step)
    monkeypatch.setattr(bench, "preset_memory",
                        lambda *a: pytest.raises(Stop, perf.preset_memory, *a) and [])
    assert bench_main(["gpu", "--quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and report["errors"] == []
    assert asked == {"kernels": "fp16", "network": "fp16", "sample": "fp16",
                     "memory": ["fp16"] * 3}


def test_a_preset_fits_its_card_by_what_the_allocator_reserves(monkeypatch):
    """PyTorch's allocator holds more than it has allocated (cached blocks,
    fragmentation), and the card gives the process what is reserved: a preset whose
    allocated peak fits but whose reserved peak does not is reported as not fitting."""
    import engine.perf as perf
    from engine.config import load_preset
    monkeypatch.setattr(perf, "build_network", lambda *a, **k: torch.nn.Linear(10, 10))
    monkeypatch.setattr(perf, "TrainStep", lambda *a: (lambda b: None))
    monkeypatch.setattr(perf.Inputs, "random", staticmethod(lambda *a: None))
    monkeypatch.setattr(perf, "peak_memory_mib", lambda fn, device: 2048.0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2 ** 30)
    monkeypatch.setattr(perf, "release_memory", lambda device: None)
    cfg, cuda = load_preset("home-8gb"), torch.device("cuda", 0)
    row = perf.preset_memory("home-8gb", cfg, 3.2, cuda)       # budget 2.88 GiB
    assert row["step_peak_gib"] == 2 and row["reserved_gib"] == pytest.approx(3, abs=1e-5)
    assert not row["fits"]
    assert perf.preset_memory("home-8gb", cfg, 3.5, cuda)["fits"]   # budget 3.15 GiB


_FAULTS_SCRIPT = """
import resource, sys, torch
torch.set_num_threads(1)
from engine.config import load_preset
from engine.distributed import resolve_device
from engine.model import PixelHDM, TextCond
if sys.argv[1] == "cpu":
    resolve_device("cpu")
torch.manual_seed(0)
net = PixelHDM(load_preset("tiny-cpu").model, 32).train()
B = 4
z, t = torch.randn(B, 3, 64, 64), torch.rand(B)
text = TextCond(torch.randn(B, 5, 32), torch.ones(B, 5, dtype=torch.bool), torch.randn(B, 32))
def step():
    out = net.forward_train(z, t, text)
    (out.pred.square().mean() + out.gamma_sq).backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """Choosing the CPU keeps freed tensor memory in the heap: a tiny-cpu step at 64x64
    then page-faults a fraction of what it did with glibc's defaults, which unmap each
    large freed tensor and fault the next step's activations in afresh."""
    import subprocess

    def faults(device: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, device], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        return int(out.stdout.split()[-1])

    default, reused = faults("none"), faults("cpu")
    assert reused * 3 < default, (default, reused)


_RSS_SCRIPT = """
import gc, torch
from engine.distributed import release_memory, reuse_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
assert reuse_freed_memory()
start = rss_mib()
weights = [torch.ones(2 << 20) for _ in range(40)]   # 320 MiB in 8 MiB tensors
del weights
gc.collect()
kept = rss_mib()
release_memory(torch.device("cpu"))
print(start, kept, rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_dropped_model_can_be_handed_back_to_the_system():
    """With freed memory kept for reuse, a dropped model's memory stays with the process
    until `release_memory`, which the studio calls when it drops a pipeline."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1])
    start, kept, returned = map(int, out.stdout.split())
    assert kept - start > 250, (start, kept, returned)
    assert returned - start < 50, (start, kept, returned)
