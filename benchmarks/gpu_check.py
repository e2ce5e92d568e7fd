"""A prepared GPU check: what the model does on one CUDA GPU, in at most ~6 minutes, as one JSON line.

    python benchmarks/gpu_check.py                        # one CUDA GPU: XL/2 and G/2 at the paper's shapes
    python benchmarks/gpu_check.py --smoke                # CPU, tiny T/2 and shapes, seconds: the same code paths
    python benchmarks/gpu_check.py --smoke --device cuda  # tiny shapes on the GPU: a seconds-long pre-check
    python benchmarks/gpu_check.py --only peak,t2i_eager,sdpa --deadline 120

Parts, in this order (each one's figures under its name in "figures"; "parts" says ok / skipped / error):

  peak              bf16 matmul TFLOP/s measured here (an 8192^2 GEMM), and the datasheet's dense bf16 peak
  t2i_eager         XL/2 T2I training step (loss, backward, fused AdamW) at 256 px (32x32x4 latents, 77 CLIP-L
                    768-d + 120 T5-XXL 4096-d tokens) under bf16 autocast, at the largest power-of-two batch that
                    fits (CUDA OOM caught, cache emptied between tries): samples/s, TFLOP/s by the FLOP count
                    `gentron info` uses (pipelines/model/flops.py: 3 x the counted forward), MFU against both
                    peaks, peak memory (torch.cuda.max_memory_allocated)
  sdpa              which scaled_dot_product_attention backend ran for each attention of the T2V model (spatial,
                    cross to text, temporal), checked two ways: each backend alone under sdpa_kernel([...]) on the
                    call's real arguments (does it raise?), and the aten op / kernels the profiler saw by default
  t2i_checkpointing the t2i_eager figures with activation checkpointing (enable_gradient_checkpointing())
  t2v_memory        XL/2 T2V at 512 px (64x64x4 latents, 8 frames): activation memory per sample, with and
                    without checkpointing
  fsdp_estimate     G/2 T2V per-GPU memory under FSDP over 8 GPUs, estimated from the sharded state's share and
                    activations measured on one- and two-block G/2 models here (the formula is in the JSON)
  mfg_sampling      one 50-step sampling call (DDIM, CFG 7.5, MFG 1.1: one 3-way batched forward a step) of a
                    512 px 8-frame video with the real XL/2 T2V model (random weights and text tensors): seconds
  t2i_compile       the t2i_eager figures with torch.compile (the model's compile()), at t2i_eager's batch,
                    compile time apart; last, as it takes longest

A global deadline (--deadline, 330 s from the first part) stops the part under way (a timer signal) and
skips the rest, each reported as "skipped: time"; an error in one part is reported and the next one runs.
The goal (issue 16) is XL/2 T2I training at >= 50 % MFU in bf16 (against the datasheet peak) on an H100/H200.
Without CUDA (and without --smoke) the JSON line says "skipped". Weights are random: the figures are speed
and memory only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STARTED = time.perf_counter()  # the deadline counts from here when run as a script: imports and CUDA start-up included

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit, ratio, result, skipped  # noqa: E402

GIB = 2**30
GOALS = {"t2i_mfu.best": ">= 0.5"}  # XL/2 T2I training in bf16, MFU against the datasheet peak (H100/H200 class)
PARTS = ("peak", "t2i_eager", "sdpa", "t2i_checkpointing", "t2v_memory", "fsdp_estimate", "mfg_sampling", "t2i_compile")

# Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets, by a pattern of
# torch.cuda.get_device_name().
# First match wins: the more specific names come first. Unknown devices get None (MFU then only against the measured
# peak).
DATASHEET_BF16_TFLOPS = (
    (r"H200 NVL|H100 NVL", 835.5),
    (r"GH200|H200|H100 SXM|H100 80GB HBM3|H100$|H800", 989.4),
    (r"H100 PCIe", 756.5),
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.05),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.2),
)


def datasheet_peak(device_name: str) -> float | None:
    for pattern, tflops in DATASHEET_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


@dataclass(frozen=True)
class Settings:
    t2i_model: str = "XL/2"
    t2v_model: str = "XL/2"
    fsdp_model: str = "G/2"
    t2i_latent: int = 32  # 256 px
    t2v_latent: int = 64  # 512 px
    frames: int = 8
    sdpa_latent: int = 32  # the attention check runs the T2V model at 256 px, 8 frames, batch 1
    max_batch: int = 1024  # the batch search stops here (reported as capped)
    warmup_steps: int = 2
    timed_steps: int = 5
    sampling_steps: int = 50
    fsdp_gpus: int = 8
    matmul_size: int = 8192
    deadline: float = 330.0
    compile_backend: str = (
        "inductor"  # torch.compile's default; the CPU smoke mode uses "eager" (dynamo's capture, no codegen)
    )


SMOKE = Settings(
    t2i_model="T/2",
    t2v_model="T/2",
    fsdp_model="T/2",
    t2i_latent=8,
    t2v_latent=8,
    frames=2,
    sdpa_latent=8,
    max_batch=4,
    warmup_steps=1,
    timed_steps=2,
    sampling_steps=2,
    matmul_size=256,
    deadline=300.0,
)


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- device, time


class Device:
    """The few things that differ between CUDA and CPU: sync, memory statistics, autocast, OOM."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        self.name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def empty(self) -> None:
        """Free what the last step left (on CUDA: collect cycles, return cached blocks; nothing to measure on a CPU)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> dict:
        info = {"name": self.name, "type": self.device.type, "torch": torch.__version__}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info |= {
                "memory_gib": props.total_memory / GIB,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            }
        else:
            info["threads"] = torch.get_num_threads()
        return info


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def gib(n: int | float | None) -> float | None:
    return None if n is None else n / GIB


class OutOfTime(BaseException):
    """Raised by the deadline timer; a BaseException so that no `except Exception` on the way swallows it."""


class Clock:
    def __init__(self, deadline: float, start: float | None = None):
        self.start, self.deadline = time.perf_counter() if start is None else start, deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.deadline - self.elapsed()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in this (main) thread after `seconds`, where the platform has SIGALRM."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def seconds_of(fn, dev: Device) -> float:
    dev.sync()
    start = time.perf_counter()
    fn()
    dev.sync()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the model and its inputs


def build(config: dict, dev: Device, dtype: torch.dtype | None = None):
    """The real GenTron model with random weights, created directly on the device (no CPU init of 1-3 B params)."""
    from pipelines.model.gentron import GenTronTransformer

    with torch.device(dev.device):
        model = GenTronTransformer.from_config(config)
    if dtype is not None:
        torch.nn.Module.to(model, dtype=dtype)  # (diffusers' own to() warns about float32 modules; there are none)
    return model.train()


def config_of(spec: str, temporal: bool, **overrides) -> dict:
    from pipelines.model.configs import model_config

    return model_config(spec, temporal=temporal, **overrides)


def inputs(config: dict, latent: int, frames: int, batch: int, dev: Device, seed: int = 0):
    """(x0, t, text, motion_free): random latents, DDPM timesteps, text tensors of CLIP_LENGTH + T5_LENGTH tokens
    at the config's widths (as `gentron info` counts them); motion_free for videos: every other sample."""
    from pipelines.model.flops import example_inputs

    torch.manual_seed(seed)
    x, t, text = example_inputs(config, latent, frames, batch, device=dev.device)
    motion_free = (torch.arange(batch, device=dev.device) % 2 == 1) if frames > 1 else None
    return x, t, text, motion_free


def train_flops_per_sample(config: dict, latent: int, frames: int) -> int:
    """FLOPs of one training step per sample, as `gentron info` counts them (3 x the forward, meta device)."""
    from pipelines.model.flops import VAE_DOWNSAMPLE, model_cost

    return model_cost(config, resolution=latent * VAE_DOWNSAMPLE, frames=frames, batch_size=1).train_step_flops


# --------------------------------------------------------------------------- parts


def part_peak(dev: Device, s: Settings, clock: Clock, out: dict) -> None:
    """Best of 3 runs of 20 bf16 GEMMs of size n^2 (n^3 multiply-adds each)."""
    n = s.matmul_size
    a = torch.randn(n, n, device=dev.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev.device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev.device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    iters, best = 20, 0.0
    for _ in range(3):
        seconds = seconds_of(lambda: [torch.mm(a, b, out=c) for _ in range(iters)], dev)
        best = max(best, 2 * n**3 * iters / seconds / 1e12)
    out |= {"measured_bf16_tflops": best, "matmul": f"{n}x{n} @ {n}x{n} bf16, best of 3 x {iters}"}
    out["datasheet_bf16_tflops"] = datasheet_peak(dev.name) if dev.cuda else None
    out["datasheet_note"] = "dense bf16, by device name" if dev.cuda else "not applicable on cpu"


class Trainer:
    """One real training step: the DDPM objective's loss (learned sigma: MSE + VLB), backward, fused AdamW."""

    def __init__(
        self,
        config: dict,
        dev: Device,
        latent: int,
        frames: int,
        checkpointing: bool = False,
        compile: str | None = None,
        optimizer: bool = True,
    ):
        from pipelines.diffusion import make_objective

        self.config, self.dev, self.latent, self.frames = config, dev, latent, frames
        self.model = build(config, dev)
        if checkpointing:
            self.model.enable_gradient_checkpointing()
        if compile:
            # One eager forward first: it fills the model's position-embedding cache, which a compiled first call
            # would fill inside the graph and then recompile on the second call (a guard on the cache's keys).
            x, t, text, motion_free = inputs(config, latent, frames, 1, dev)
            with torch.no_grad():
                self.model(x, t, text, motion_free=motion_free)
            self.model.compile(backend=compile)  # in place, as train.py's --compile
        self.objective = make_objective()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=dev.cuda) if optimizer else None

    def batch(self, size: int):
        return inputs(self.config, self.latent, self.frames, size, self.dev)

    def step(self, batch) -> torch.Tensor:
        x, t, text, motion_free = batch
        with self.dev.autocast():
            loss = self.objective.loss(self.model, x, t, text, motion_free=motion_free)["loss"].mean()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def release(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


def try_batch(trainer: Trainer, batch: int, steps: int = 1) -> tuple[bool, list[float], float | None]:
    """(fits, seconds of each step, last loss); a CUDA out-of-memory error means it does not fit."""
    dev, fits, times, loss = trainer.dev, True, [], None
    try:
        data = trainer.batch(batch)
        for _ in range(steps):
            start = time.perf_counter()
            loss = trainer.step(data)
            dev.sync()
            times.append(time.perf_counter() - start)
        loss = float(loss)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        fits = False
    if not fits:  # outside the except block: its traceback no longer holds the step's tensors
        data = None
        trainer.release()
        dev.empty()
    return fits, times, loss


def throughput(trainer: Trainer, s: Settings, clock: Clock, out: dict, batch: int | None) -> None:
    """Largest power-of-two batch that fits (or `batch`), then samples/s, TFLOP/s, MFU and peak memory there."""
    dev = trainer.dev
    out |= {"latent": trainer.latent, "frames": trainer.frames, "autocast": "bf16"}
    if batch is None:
        tried, best, b = {}, None, 1
        while b <= s.max_batch and clock.left() > 5:
            fits, times, _ = try_batch(trainer, b)
            tried[str(b)] = f"ok {times[0]:.2f} s" if fits else "out of memory"
            out["batch_search"] = tried
            log(f"  batch {b}: {tried[str(b)]}")
            if not fits:
                break
            best, b = b, 2 * b
        if best is None:
            raise RuntimeError("not even batch 1 fits")
        batch = best
        out["capped_at_max_batch"] = best == s.max_batch
    dev.empty()
    while True:  # a batch found at the edge of memory can fail on the next steps: halve then
        dev.reset_peak()
        fits, times, loss = try_batch(trainer, batch, steps=s.warmup_steps + s.timed_steps)
        if fits or batch == 1:
            break
        out.setdefault("halved_after_oom", []).append(batch)
        batch //= 2
    if not fits:
        raise RuntimeError("batch 1 ran out of memory while timing")
    step_s = statistics.median(times[s.warmup_steps :])
    flops = train_flops_per_sample(trainer.config, trainer.latent, trainer.frames)
    tflops = flops * batch / step_s / 1e12
    out |= {
        "batch": batch,
        "first_step_s": times[0],
        "step_s": step_s,
        "step_s_timed": times[s.warmup_steps :],
        "samples_per_s": batch / step_s,
        "train_flops_per_sample": flops,
        "tflops": tflops,
        "peak_memory_gib": gib(dev.peak()),
        "loss": loss,
    }


def mfu(out: dict, peak: dict) -> None:
    if "tflops" in out:
        out["mfu_measured_peak"] = ratio(out["tflops"], peak.get("measured_bf16_tflops"))
        out["mfu_datasheet"] = ratio(out["tflops"], peak.get("datasheet_bf16_tflops"))


def part_t2i(
    dev: Device, s: Settings, clock: Clock, out: dict, peak: dict, checkpointing=False, compile=False, batch=None
) -> None:
    config = config_of(s.t2i_model, temporal=False)
    out["model"] = s.t2i_model
    backend = s.compile_backend if compile else None
    out["gradient_checkpointing"], out["compiled"] = checkpointing, compile
    if compile:
        out["compile_backend"] = backend
    trainer = Trainer(config, dev, s.t2i_latent, 1, checkpointing=checkpointing, compile=backend)
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    if compile:  # the first step compiles forward and backward: timed on its own, at the batch given
        fits, times, _ = try_batch(trainer, batch)
        if not fits:
            batch //= 2
            out["halved_after_oom"] = [batch * 2]
            fits, times, _ = try_batch(trainer, batch)
        out["compile_and_first_step_s"] = times[0] if fits else None
        log(f"  compiled and ran the first step in {times[0]:.1f} s" if fits else "  out of memory after compiling")
        out["dynamo"] = dynamo_counters()
    throughput(trainer, s, clock, out, batch)
    if compile:
        out["dynamo_after_timing"] = dynamo_counters()  # more graphs than after the first step: it recompiled
    mfu(out, peak)


def dynamo_counters() -> dict:
    """Graphs dynamo captured and graph breaks so far (torch._dynamo's counters; a private API, so best effort)."""
    try:
        from torch._dynamo.utils import counters

        return {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }
    except Exception as err:
        return {"unavailable": f"{type(err).__name__}: {err}"}


SDPA_OPS = {  # aten op -> backend; the op names are the same on every device
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}


def kernel_family(name: str) -> str | None:
    """The attention family of a CUDA kernel name (cuDNN's fused kernels contain "flash" too: checked first)."""
    n = name.lower()
    if "cudnn" in n and ("sdpa" in n or "fmha" in n or "flash" in n or "attention" in n):
        return "cudnn"
    if "flash" in n:
        return "flash"
    if "fmha" in n or "cutlass" in n and "attention" in n or "efficient_attention" in n or "mem_eff" in n:
        return "memory-efficient"
    return None


def profiled_names(fn, dev: Device) -> list[str]:
    """Names of every op and kernel the profiler records while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        dev.sync()
    names = []
    for event in prof.events():
        names.append(event.name)
        names.extend(k.name for k in getattr(event, "kernels", None) or [])
    return names


def inspect_attention(fn, args: tuple, kwargs: dict, dev: Device) -> dict:
    """Which backends accept this exact call alone, and which one runs by default (aten op and kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = args[0], args[1]
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    record = {
        "query": list(q.shape),
        "key": list(k.shape),
        "dtype": str(q.dtype).removeprefix("torch."),
        "mask": None if mask is None else list(mask.shape),
        "requires_grad": q.requires_grad,
        "calls": 0,
    }
    accepts, reasons = {}, {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    fn(*args, **kwargs)
                dev.sync()
                accepts[name] = True
            except RuntimeError as err:
                accepts[name] = False
                why = [
                    str(w.message).strip()
                    for w in caught
                    if "scaled_dot_product" in str(w.message) or "ttention" in str(w.message)
                ]
                reasons[name] = (why[0] if why else str(err).strip().splitlines()[0])[:200]
    record["accepted_alone"], record["refusal_reasons"] = accepts, reasons
    names = profiled_names(lambda: fn(*args, **kwargs), dev)
    ops = [n for n in names if n in SDPA_OPS]
    families = sorted({f for f in map(kernel_family, names) if f})
    record["default_op"] = ops[0] if ops else None
    record["ran"] = SDPA_OPS[ops[0]] if ops else "unknown"
    record["kernel_families"] = families if dev.cuda else "not applicable on cpu"
    record["kernels"] = sorted({n for n in names if kernel_family(n)})[:4] if dev.cuda else "not applicable on cpu"
    return record


def part_sdpa(dev: Device, s: Settings, clock: Clock, out: dict) -> None:
    """Runs one training-mode forward of the T2V model with scaled_dot_product_attention wrapped by a probe."""
    import torch.nn.functional as F

    config = config_of(s.t2v_model, temporal=True)
    model = build(config, dev)
    x, t, text, motion_free = inputs(config, s.sdpa_latent, s.frames, 1, dev)
    tokens = (s.sdpa_latent // config["patch_size"]) ** 2
    original = F.scaled_dot_product_attention
    seen: dict[str, dict] = {}

    def probe(*args, **kwargs):
        nq, nk = args[0].shape[-2], args[1].shape[-2]
        kind = "cross (to text)" if nq != nk else "temporal" if nq == s.frames and nq != tokens else "spatial"
        if kind not in seen:
            seen[kind] = inspect_attention(original, args, kwargs, dev)
        seen[kind]["calls"] += 1
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = probe
    try:
        with dev.autocast():
            model(x, t, text, motion_free=motion_free)
    finally:
        F.scaled_dot_product_attention = original

    # the whole forward once more, unwrapped, under the profiler: the attention ops and kernel families it ran
    def forward():
        with dev.autocast():
            model(x, t, text, motion_free=motion_free)

    names = profiled_names(forward, dev)
    out |= {
        "model": f"{s.t2v_model} T2V",
        "latent": s.sdpa_latent,
        "frames": s.frames,
        "autocast": "bf16",
        "attention": seen,
        "forward_profile_ops": dict(Counter(SDPA_OPS[n] for n in names if n in SDPA_OPS)),
        "forward_profile_kernel_families": dict(Counter(f for f in map(kernel_family, names) if f))
        if dev.cuda
        else "not applicable on cpu",
        "flash_ran_for": sorted(k for k, r in seen.items() if r["ran"].startswith("flash")),
    }


def activation_bytes(trainer: Trainer, batch_data) -> tuple[int | None, float]:
    """(peak allocated during forward + backward minus allocated before it, seconds); gradients already allocated."""
    dev = trainer.dev
    dev.empty()
    before = dev.allocated()
    dev.reset_peak()
    seconds = seconds_of(lambda: trainer.step(batch_data), dev)
    peak = dev.peak()
    return (None if peak is None else peak - before), seconds


def per_sample_activations(trainer: Trainer, batches=(1, 2)) -> dict:
    """Activation memory at batch 1 and 2 (out of memory stops); per sample = the difference (or batch 1's alone)."""
    trainer.step(trainer.batch(1))  # allocates the gradients (kept: no optimizer)
    act, seconds = {}, {}
    for b in batches:
        try:
            act[b], seconds[b] = activation_bytes(trainer, trainer.batch(b))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            act[b] = "out of memory"
            break
        finally:
            trainer.dev.empty()
    numbers = {b: v for b, v in act.items() if isinstance(v, int)}
    if 1 in numbers and 2 in numbers:
        per_sample, how = numbers[2] - numbers[1], "activations(batch 2) - activations(batch 1)"
    elif 1 in numbers:
        per_sample, how = numbers[1], "activations(batch 1) (batch 2 did not fit)"
    else:
        per_sample, how = (
            None,
            "not measured" if trainer.dev.cuda else "not applicable on cpu (no allocator statistics)",
        )
    flops = train_flops_per_sample(trainer.config, trainer.latent, trainer.frames)
    return {
        "activations_gib": {str(b): gib(v) if isinstance(v, int) else v for b, v in act.items()},
        "per_sample_gib": gib(per_sample),
        "per_sample": how,
        "step_s": {str(b): v for b, v in seconds.items()},
        "tflops_batch1": flops / seconds[1] / 1e12 if 1 in seconds else None,
    }


def part_t2v_memory(dev: Device, s: Settings, clock: Clock, out: dict) -> None:
    config = config_of(s.t2v_model, temporal=True)
    out |= {
        "model": f"{s.t2v_model} T2V",
        "latent": s.t2v_latent,
        "frames": s.frames,
        "autocast": "bf16",
        "definition": "activations(b) = peak allocated during forward + backward at batch b minus allocated before it "
        "(fp32 weights and gradients); no optimizer",
    }
    for checkpointing in (False, True):
        trainer = Trainer(config, dev, s.t2v_latent, s.frames, checkpointing=checkpointing, optimizer=False)
        name = "checkpointing" if checkpointing else "no_checkpointing"
        out[name] = per_sample_activations(trainer)
        log(f"  {name}: {out[name]['per_sample_gib']} GiB per sample")
        del trainer
        dev.empty()
    out["checkpointing_over_none"] = ratio(
        out["checkpointing"]["per_sample_gib"], out["no_checkpointing"]["per_sample_gib"]
    )


class Bf16Inputs(torch.nn.Module):
    """Casts floating inputs to bf16 before the model, as FSDP's MixedPrecisionPolicy(param_dtype=bf16) does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timestep, text, motion_free=None):
        return self.model(x.to(torch.bfloat16), timestep, text.to(dtype=torch.bfloat16), motion_free=motion_free)


def fsdp_estimate(params: int, block_params: int, depth: int, gpus: int, act_one: dict, act_two: dict) -> dict:
    """Per-GPU bytes of FSDP training (train.py's layout), from the sharded state and activations measured on 1 and 2
    blocks.

    act_one / act_two: {"checkpointing": bytes or None, "no_checkpointing": bytes or None} of 1- and 2-block models."""
    root = params - depth * block_params
    terms = {
        "sharded_state": params * (4 + 4 + 8 + 4) / gpus,
        "unsharded_root": root * 2,
        "unsharded_blocks": 2 * block_params * (2 + 2 + 4),
    }
    fixed = sum(terms.values())
    estimate = {"terms_gib": {k: v / GIB for k, v in terms.items()}}
    for mode in ("checkpointing", "no_checkpointing"):
        one, two = act_one.get(mode), act_two.get(mode)
        activations = None if one is None or two is None else one + (depth - 1) * (two - one)
        estimate["terms_gib"][f"activations_{mode}"] = gib(activations)
        estimate[f"per_gpu_gib_{mode}"] = gib(None if activations is None else fixed + activations)
    return estimate


FSDP_FORMULA = (
    "per_gpu = params * (4 fp32 weights + 4 fp32 grads + 8 AdamW moments + 4 fp32 EMA) / gpus [sharded_state]"
    " + root_params * 2 [unsharded_root: bf16 embedders and final layer, kept through the step]"
    " + 2 * block_params * (2 bf16 weights + 2 bf16 grads + 4 fp32 reduce-scatter copy) [unsharded_blocks: the block"
    " at work and the prefetched one] + activations(depth); activations(depth) = A(1) + (depth - 1) * (A(2) - A(1)),"
    " A(d) = peak allocated during forward + backward of a d-block model with bf16 weights and inputs, batch 1,"
    " minus allocated before it, measured on this GPU; root_params = params - depth * block_params"
)


def part_fsdp(dev: Device, s: Settings, clock: Clock, out: dict) -> None:
    from pipelines.model.flops import count_parameters, meta_model

    config = config_of(s.fsdp_model, temporal=True)
    params, _ = count_parameters(meta_model(config))
    block_params = sum(p.numel() for p in meta_model({**config, "depth": 1}).blocks[0].parameters())
    measured = {}
    for depth in (1, 2):
        for checkpointing in (False, True):
            trainer = Trainer(
                {**config, "depth": depth}, dev, s.t2v_latent, s.frames, checkpointing=checkpointing, optimizer=False
            )
            trainer.model = Bf16Inputs(torch.nn.Module.to(trainer.model, dtype=torch.bfloat16))
            data = trainer.batch(1)
            step = _no_autocast_step(trainer)
            step(data)  # allocates the gradients
            dev.empty()
            before = dev.allocated()
            dev.reset_peak()
            step(data)
            dev.sync()
            peak = dev.peak()
            measured[(depth, checkpointing)] = None if peak is None else peak - before
            del trainer, data
            dev.empty()
    act = {d: {"checkpointing": measured[(d, True)], "no_checkpointing": measured[(d, False)]} for d in (1, 2)}
    estimate = fsdp_estimate(params, block_params, config["depth"], s.fsdp_gpus, act[1], act[2])
    out |= {
        "model": f"{s.fsdp_model} T2V",
        "latent": s.t2v_latent,
        "frames": s.frames,
        "batch_per_gpu": 1,
        "gpus": s.fsdp_gpus,
        "params": params,
        "block_params": block_params,
        "depth": config["depth"],
        "root_params": params - config["depth"] * block_params,
        "formula": FSDP_FORMULA,
        "measured_activations_gib": {f"blocks{d}.{m}": gib(v) for d in (1, 2) for m, v in act[d].items()},
        **estimate,
    }
    if not dev.cuda:
        out["activations"] = "not applicable on cpu (no allocator statistics): the activation terms and totals are null"


def _no_autocast_step(trainer: Trainer):
    """FSDP's mixed precision computes in the bf16 weights' dtype: no autocast (as train.py under --fsdp)."""

    def step(batch):
        x, t, text, motion_free = batch
        loss = trainer.objective.loss(trainer.model, x, t, text, motion_free=motion_free)["loss"].mean()
        loss.backward()
        return loss.detach()

    return step


def part_sampling(dev: Device, s: Settings, clock: Clock, out: dict) -> None:
    from pipelines.diffusion import make_scheduler, sample
    from pipelines.model.flops import VAE_DOWNSAMPLE, model_cost

    config = config_of(s.t2v_model, temporal=True)
    model = build(config, dev).eval()
    _, _, text, _ = inputs(config, s.t2v_latent, s.frames, 1, dev, seed=1)
    _, _, uncond, _ = inputs(config, s.t2v_latent, s.frames, 1, dev, seed=2)
    noise = torch.randn(1, s.frames, config["in_channels"], s.t2v_latent, s.t2v_latent, device=dev.device)
    scheduler = make_scheduler(learned_sigma=config["learn_sigma"])  # the DDPM objective's default: DDIM
    dev.empty()
    dev.reset_peak()
    latents = None

    def call():
        nonlocal latents
        with dev.autocast():  # as `gentron sample` on cuda: bf16 autocast around the model
            latents = sample(
                model, scheduler, noise, text, uncond, steps=s.sampling_steps, cfg_scale=7.5, mfg_scale=1.1
            )

    seconds = seconds_of(call, dev)
    forward = model_cost(config, resolution=s.t2v_latent * VAE_DOWNSAMPLE, frames=s.frames, batch_size=3).forward_flops
    out |= {
        "model": f"{s.t2v_model} T2V",
        "latent": s.t2v_latent,
        "frames": s.frames,
        "steps": s.sampling_steps,
        "scheduler": type(scheduler).__name__,
        "cfg": 7.5,
        "mfg": 1.1,
        "batch_per_forward": 3,
        "autocast": "bf16",
        "seconds": seconds,
        "seconds_per_step": seconds / s.sampling_steps,
        "tflops": forward * s.sampling_steps / seconds / 1e12,
        "peak_memory_gib": gib(dev.peak()),
        "finite": bool(torch.isfinite(latents).all()),
    }


# --------------------------------------------------------------------------- main


def run_parts(dev: Device, s: Settings, only: set[str], started: float | None = None) -> tuple[dict, dict, float]:
    clock = Clock(s.deadline, started)
    figures, status = {}, {}
    peak: dict = {}
    figures["peak"] = peak

    def run(name, fn, *args, **kwargs):
        out = figures.setdefault(name, {})
        if name not in only:
            status[name] = "skipped: not in --only"
            return out
        if clock.left() < 3:
            status[name] = "skipped: time"
            out["skipped"] = "time"
            log(f"{name}: skipped (deadline)")
            return out
        log(f"{name} ({clock.left():.0f} s left)")
        start = time.perf_counter()
        try:
            with time_limit(clock.left()):
                fn(dev, s, clock, out, *args, **kwargs)
            status[name] = "ok"
        except OutOfTime:
            status[name] = "skipped: time (stopped at the deadline)"
            out["skipped"] = "time"
        except Exception as err:  # one part's failure is reported; the next part runs
            status[name] = f"error: {type(err).__name__}: {str(err).strip()[:300]}"
            out["error"] = status[name]
            traceback.print_exc(file=sys.stderr)
        finally:
            out["part_seconds"] = time.perf_counter() - start
            dev.empty()
        log(f"{name}: {status[name]} ({out['part_seconds']:.1f} s)")
        return out

    run("peak", part_peak)
    eager = run("t2i_eager", part_t2i, peak)
    run("sdpa", part_sdpa)
    run("t2i_checkpointing", part_t2i, peak, checkpointing=True)
    run("t2v_memory", part_t2v_memory)
    run("fsdp_estimate", part_fsdp)
    run("mfg_sampling", part_sampling)
    compile_batch = eager.get("batch") or (64 if dev.cuda else 2)
    run("t2i_compile", part_t2i, peak, compile=True, batch=compile_batch)
    return figures, status, clock.elapsed()


def main(argv: list[str] | None = None, started: float | None = None) -> bool:
    """Run the check and print its JSON line; True when a part was stopped at the deadline."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny T/2 model and shapes, 2 steps: seconds (on the CPU by default)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cpu with --smoke, else cuda)")
    parser.add_argument(
        "--deadline", type=float, help="seconds for all parts (default 330; smoke 300, generous for a loaded CPU)"
    )
    parser.add_argument("--max-batch", type=int, help="largest batch the T2I search tries (default 1024; smoke 4)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 for the smoke mode on the CPU)"
    )
    parser.add_argument(
        "--compile-backend", help="torch.compile backend of t2i_compile (default inductor; CPU smoke: eager)"
    )
    parser.add_argument("--only", help=f"comma-separated parts (of {', '.join(PARTS)}; default all)")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else Settings()
    if args.deadline:
        s = replace(s, deadline=args.deadline)
    if args.max_batch:
        s = replace(s, max_batch=args.max_batch)
    if args.compile_backend:
        s = replace(s, compile_backend=args.compile_backend)
    only = set(args.only.split(",")) if args.only else set(PARTS)
    if only - set(PARTS):
        parser.error(f"unknown part(s) {sorted(only - set(PARTS))}; choose from {', '.join(PARTS)}")
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        emit(
            skipped(
                "gpu_check",
                "no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs the CPU smoke mode",
                threads=torch.get_num_threads(),
                device="cpu",
                smoke=args.smoke,
            )
        )
        return False
    if not device.startswith("cuda") and not args.smoke:
        parser.error("the full check needs a CUDA GPU; on the CPU use --smoke")
    before = torch.get_num_threads()
    threads = args.threads or (1 if args.smoke and not device.startswith("cuda") else None)
    if threads:
        torch.set_num_threads(threads)  # tiny models: one thread is fastest, more only contend with other processes
    try:
        return run_check(args, s, device, only, started)
    finally:
        torch.set_num_threads(before)


def run_check(args, s: Settings, device: str, only: set[str], started: float | None) -> bool:
    dev = Device(device)
    if args.smoke and not dev.cuda:
        s = replace(
            s, compile_backend=args.compile_backend or "eager"
        )  # inductor would build C++ for minutes: capture only
    log(
        f"{dev.name}, torch {torch.__version__}, {'smoke' if args.smoke else 'full'} settings, deadline "
        f"{s.deadline:.0f} s"
    )
    figures, status, seconds = run_parts(dev, s, only, started)
    figures = {"device": dev.describe(), "settings": asdict(s), **figures}

    ratios = {}
    for name in ("t2i_eager", "t2i_checkpointing", "t2i_compile"):
        key = name.removeprefix("t2i_").replace("compile", "compiled")
        ratios[f"t2i_mfu.{key}"] = figures[name].get("mfu_datasheet")
        ratios[f"t2i_mfu_measured_peak.{key}"] = figures[name].get("mfu_measured_peak")
    known = [v for k, v in ratios.items() if k.startswith("t2i_mfu.") and v is not None]
    ratios["t2i_mfu.best"] = max(known) if known else None
    ratios["t2v_checkpointing_memory_over_none"] = figures["t2v_memory"].get("checkpointing_over_none")
    emit(
        result(
            "gpu_check",
            ratios,
            GOALS,
            figures,
            threads=torch.get_num_threads(),
            device=dev.name,
            smoke=args.smoke,
            seconds=round(seconds, 1),
            parts=status,
        )
    )
    return any(v.startswith("skipped: time (stopped") for v in status.values())


if __name__ == "__main__":
    if main(started=STARTED):
        # A part was interrupted (torch.compile's worker pool, say): leave now rather than wait on its clean-up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
