"""Training throughput: medvit's ``Trainer.fit`` path against a bare PyTorch loop, side by side.

Both paths train the same model (two copies with the same initial weights), on the same
pre-built batches, with the same optimiser and schedule (the module's own
``configure_optimizers``), the same precision, gradient clipping and optional ``torch.compile``.
The fit path is built exactly as ``medvit fit`` builds it (``MedViTCLI``: callbacks, CSV logger,
checkpoint callback, progress bar); only its data is replaced by in-memory batches so that the
comparison isolates Lightning's per-step overhead. Repeats alternate the order (fit, bare,
bare, fit, ...) so that drift on a shared machine hits both paths alike; the ratio reported is
the median of the per-repeat ratios of images per second (fit / bare).

A step is timed from the moment its batch is on the device until the next one is (so data
transfer, callbacks, logging and the progress bar count), with a device synchronisation at
the two ends of the timed window only. On a GPU the model FLOPs (an analytic formula, checked
against ``FlopCounterMode``) give the model FLOP utilisation against the bf16 dense peak.

    python benchmarks/throughput.py --model vit_tiny --img-size 28 --patch-size 4 \\
        --batch-size 64 --steps 30 --repeats 5 --threads 1
    python benchmarks/throughput.py --model vit_base --img-size 224 --batch-size 256 \\
        --precision bf16-mixed --compile --pipeline-workers 12      # one GPU
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, on CPUs shared with DataLoader workers and others.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")

import argparse  # noqa: E402
import copy  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

# ``python benchmarks/X.py`` puts benchmarks/ first on sys.path, so sibling scripts import by
# name; that is also why no script may share a package's name (no benchmarks/medmnist.py).
from pipeline import SIZES, ensure_data, machine_info, measure_pipeline, write_report  # noqa: E402

from medvit.train.progress import DEFAULT_REFRESH_RATE  # noqa: E402

MODELS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
# Dense bf16 tensor-core peaks in FLOP/s (vendor data sheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


# --------------------------------------------------------------------------------- FLOPs
def _register_cpu_sdpa_flops() -> None:
    """Count PyTorch's CPU flash-attention kernels too (FlopCounterMode knows only CUDA's)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = [
        ("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop),
    ]
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)  # already shape-wrapped


def counted_train_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward of ``net`` on ``x`` (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    net = copy.deepcopy(net).to(x.device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x).float().sum().backward()
    return int(counter.get_total_flops())


def analytic_forward_flops(net: torch.nn.Module, img_size: int) -> dict[str, int]:
    """Forward FLOPs of one image through a timm ViT, by part (a multiply-add is 2 FLOPs).

    Parts: ``patch_embed``, ``blocks`` (qkv, projection, MLP and the two attention matmuls) and
    ``head``. Norms, softmax and activations are left out, as in the MFU convention (PaLM,
    appendix B).
    """
    net = getattr(net, "_orig_mod", net)
    patch = net.patch_embed.patch_size[0]
    d = net.embed_dim
    in_chans = net.patch_embed.proj.in_channels
    patches = (img_size // patch) ** 2
    tokens = patches + net.num_prefix_tokens
    mlp_hidden = net.blocks[0].mlp.fc1.out_features
    per_block = 2 * tokens * (3 * d * d + d * d + 2 * d * mlp_hidden) + 2 * 2 * tokens * tokens * d
    return {
        "patch_embed": 2 * patches * patch * patch * in_chans * d,
        "blocks": len(net.blocks) * per_block,
        "head": 2 * d * net.num_classes,
    }


def analytic_train_flops(net: torch.nn.Module, img_size: int, batch: int) -> int:
    """Model FLOPs of a training step: forward + backward (twice the forward) of ``batch`` images.

    The patch embedding's backward needs no input gradient, so it costs one forward, not two.
    """
    parts = analytic_forward_flops(net, img_size)
    return batch * (3 * (parts["blocks"] + parts["head"]) + 2 * parts["patch_embed"])


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (``--peak-tflops`` wins); ``None`` on CPU/unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ------------------------------------------------------------------------------ the fit path
class Marks:
    """Wall-clock and process CPU time at step boundaries; synchronises only the first and last.

    On a shared CPU the process CPU time per step is far steadier than wall time (time spent
    waiting for a core is not counted), and the fastest step estimates the uncontended cost.
    """

    def __init__(self, count: int, sync: Any) -> None:
        self.count, self.sync = count, sync
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def mark(self) -> bool:
        """Record a boundary; True once the window (``count`` steps) is complete."""
        if not self.wall or len(self.wall) == self.count:
            self.sync()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return len(self.wall) > self.count

    def summary(self) -> dict[str, Any]:
        if len(self.wall) != self.count + 1:
            raise RuntimeError("the timed window did not complete")
        steps = [b - a for a, b in zip(self.wall, self.wall[1:], strict=False)]
        return {
            "wall_s": self.wall[-1] - self.wall[0],
            "cpu_s": self.cpu[-1] - self.cpu[0],
            "min_step_s": min(steps),
        }


class StepTimer(L.Callback):
    """Marks steps ``[start, start + count]`` of a fit, batch-on-device to batch-on-device."""

    def __init__(self, start: int, count: int, sync: Any) -> None:
        self.start = start
        self.marks = Marks(count, sync)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        if idx >= self.start and self.marks.mark():
            trainer.should_stop = True


class BatchList(torch.utils.data.Dataset):
    """Pre-built batches, cycled: a DataLoader with ``batch_size=None`` serves them as they are."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.batches[i % len(self.batches)]


def cli_args(args: argparse.Namespace, run_dir: Path, max_steps: int) -> list[str]:
    """``medvit fit`` arguments of the benchmark's configuration (data is never read)."""
    flag = args.flag or ("pathmnist" if args.in_chans == 3 else "breastmnist")
    size = args.img_size if args.img_size in SIZES else 28
    out = [
        "fit",
        f"--seed_everything={args.seed}",
        f"--data.flag={flag}",
        f"--data.size={size}",
        f"--data.img_size={args.img_size}",
        f"--data.in_chans={args.in_chans}",
        f"--data.global_batch_size={args.batch_size}",
        "--data.num_workers=0",
        "--data.download=false",
        "--data.verify_md5=false",
        f"--model.model_name={MODELS.get(args.model, args.model)}",
        f"--model.patch_size={args.patch_size}",
        "--model.drop_path_rate=0.0",
        f"--model.compile={str(args.compile).lower()}",
        f"--trainer.accelerator={args.accelerator}",
        "--trainer.devices=1",
        f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.log_every_n_steps={args.log_every_n_steps}",
        f"--trainer.enable_progress_bar={str(args.progress_bar).lower()}",
        f"--progress_bar.refresh_rate={args.progress_bar_refresh}",
        "--trainer.enable_model_summary=false",
        # Keep the checkpoint callback's hooks but write nothing: a checkpoint is not a step.
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        f"--run.dir={run_dir}",
        "--run.test_after_fit=false",
    ]
    if args.fused_optimizer is not None:
        out.append(f"--model.fused_optimizer={str(args.fused_optimizer).lower()}")
    if args.clip:
        out.append(f"--trainer.gradient_clip_val={args.clip}")
    return out


def build_cli(argv: list[str]) -> Any:
    """``MedViTCLI`` with model, data module and trainer instantiated, but not run."""
    from medvit.cli import MedViTCLI

    class BuildOnlyCLI(MedViTCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    return BuildOnlyCLI(args=argv)


# ---------------------------------------------------------------------------- the bare loop
def bare_optimizer(module: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The module's own optimiser and scheduler, built without a Trainer."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps, max_epochs=1)
    try:
        config = module.configure_optimizers()
    finally:
        module.trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


class BareLoop:
    """A plain PyTorch training loop over the module's network, loss, optimiser and schedule."""

    def __init__(self, module: Any, args: argparse.Namespace, device: torch.device) -> None:
        self.module = module.to(device)  # fused AdamW is built for the device's parameters
        self.device = device
        self.net = torch.compile(module.net) if args.compile else module.net
        self.optimizer, self.scheduler = bare_optimizer(module, total_steps=10**6)
        self.clip = args.clip
        bf16 = args.precision.startswith("bf16")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        if args.precision not in ("32-true", "32", "bf16-mixed"):
            raise ValueError(f"--precision must be 32-true or bf16-mixed, got '{args.precision}'.")
        module.cpu()  # off the device until its first run, as the fit path's model

    def run(
        self,
        loader: torch.utils.data.DataLoader,
        start: int,
        count: int,
        sync: Any,
        marks_class: type[Marks] = Marks,
    ) -> dict[str, Any]:
        """Train ``start + count`` steps; the timings of the last ``count`` (see ``Marks``).

        Like Lightning's teardown after a fit, the model and optimiser state go back to the CPU
        afterwards, so each path's peak device memory is its own whole footprint.
        """
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        self.module.to(self.device)
        _optimizers_to_device([self.optimizer], self.device)
        try:
            return self._steps(loader, start, count, sync, marks_class)
        finally:
            self.module.cpu()
            _optimizers_to_device([self.optimizer], torch.device("cpu"))

    def _steps(
        self,
        loader: torch.utils.data.DataLoader,
        start: int,
        count: int,
        sync: Any,
        marks_class: type[Marks],
    ) -> dict[str, Any]:
        self.module.train()
        marks = marks_class(count, sync)
        non_blocking = self.device.type == "cuda"
        for i, batch in enumerate(loader):
            x, y, _ = (t.to(self.device, non_blocking=non_blocking) for t in batch)
            if i >= start and marks.mark():
                return marks.summary()
            with self.autocast:
                loss = self.module.loss(self.net(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()
            self.scheduler.step()
        raise RuntimeError(f"the loader ran out before step {start + count}")


# ------------------------------------------------------------------------------- profiling
def _device_us(event: Any, attr: str) -> float:
    """An event's device time in us (torch renamed ``*_cuda_time_total`` to ``*_device_*``)."""
    value = getattr(event, attr.replace("cuda", "device"), None)
    return float(value if value is not None else getattr(event, attr, 0.0))


def profile_summary(prof: Any, wall_s: float, steps: int, top: int = 15) -> dict[str, Any]:
    """What a profiled window spent its time on: the top kernels and how busy the GPU was.

    ``gpu_busy`` is the kernels' summed time over the window's wall time (one stream, so they do
    not overlap): 1 - gpu_busy is the time the GPU waited for the host (CPU gaps: Python, launch
    overhead, host syncs, data). Without CUDA only the top CPU operators are listed.
    """
    from torch.autograd import DeviceType

    events = prof.key_averages()
    # Kernels only. A record_function range (the optimiser's "Optimizer.step#AdamW.step") also
    # shows on the GPU timeline as an annotation spanning its kernels: counting it would count
    # them twice (seen on an H200: "GPU busy 191%"). It shares its name with a CPU event.
    cpu_names = {e.key for e in events if getattr(e, "device_type", None) == DeviceType.CPU}
    kernels = [
        e
        for e in events
        if getattr(e, "device_type", None) == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and e.key not in cpu_names
        and _device_us(e, "self_cuda_time_total") > 0
    ]
    out: dict[str, Any] = {"wall_ms_per_step": 1000.0 * wall_s / steps, "steps": steps}
    if kernels:
        total_us = sum(_device_us(e, "self_cuda_time_total") for e in kernels)
        out["gpu_busy"] = total_us / (1e6 * wall_s)
        out["kernel_ms_per_step"] = total_us / 1000.0 / steps
        kernels.sort(key=lambda e: _device_us(e, "self_cuda_time_total"), reverse=True)
        out["top_kernels"] = [
            {
                "name": e.key[:120],
                "calls_per_step": e.count / steps,
                "ms_per_step": _device_us(e, "self_cuda_time_total") / 1000.0 / steps,
                "share": _device_us(e, "self_cuda_time_total") / total_us,
            }
            for e in kernels[:top]
        ]
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out["top_cpu_ops"] = [
        {
            "name": e.key[:120],
            "calls_per_step": e.count / steps,
            "ms_per_step": e.self_cpu_time_total / 1000.0 / steps,
        }
        for e in cpu
    ]
    return out


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


class ProfileWindow(L.Callback):
    """Profiles steps ``[start, start + count)`` of a fit, then stops it."""

    def __init__(self, start: int, count: int, device: torch.device, sync: Any) -> None:
        self.start, self.count, self.device, self.sync = start, count, device, sync
        self.prof: Any = None
        self.t0 = self.wall_s = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        if idx == self.start:
            self.sync()
            self.prof = _profiler(self.device).__enter__()
            self.t0 = time.perf_counter()
        elif idx == self.start + self.count:
            self.sync()
            self.wall_s = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            trainer.should_stop = True


def profile_paths(
    args: argparse.Namespace, fit_module: Any, bare: BareLoop, loader: Any, tmp: Path, sync: Any
) -> dict[str, Any]:
    """``torch.profiler`` summaries of ``--profile-steps`` steps of each path (after the timing)."""
    device = bare.device
    start, count = args.warmup, args.profile_steps
    cli = build_cli(cli_args(args, tmp / "fit-profile", start + count + 2))
    window = ProfileWindow(start, count, device, sync)
    cli.trainer.callbacks.append(window)
    cli.trainer.fit(fit_module, train_dataloaders=loader())
    out = {"fit": profile_summary(window.prof, window.wall_s, count)}

    prof_bare = _profiler(device)

    class _Marks(Marks):  # the profiler runs exactly over the timed window
        def mark(self) -> bool:
            if not self.wall:
                sync()
                prof_bare.__enter__()
            done = super().mark()
            if done:
                prof_bare.__exit__(None, None, None)
            return done

    window = bare.run(loader(), start, count, sync, marks_class=_Marks)
    out["bare"] = profile_summary(prof_bare, window["wall_s"], count)
    return out


# ------------------------------------------------------------------------------------- run
def make_batches(
    n: int, batch: int, in_chans: int, img_size: int, num_classes: int, pin: bool, seed: int
) -> list[tuple[torch.Tensor, ...]]:
    """Random normalised images and labels, as a training DataLoader would deliver them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(batch, in_chans, img_size, img_size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        idx = torch.arange(i * batch, (i + 1) * batch)
        out.append(tuple(t.pin_memory() if pin else t for t in (x, y, idx)))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both paths; return the report (see ``--out``)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*on_train_epoch_end.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    accel = args.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
        args.accelerator = accel
    device = torch.device("cuda" if accel in ("gpu", "cuda") else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="medvit-throughput-") as tmp:
        tmp = Path(tmp)
        clis = [build_cli(cli_args(args, tmp / f"fit-{r}", total + 1)) for r in range(args.repeats)]
        fit_module = clis[0].model
        bare_module = copy.deepcopy(fit_module)  # same initial weights
        num_classes = fit_module.hparams.num_classes
        batches = make_batches(
            args.distinct_batches,
            args.batch_size,
            args.in_chans,
            args.img_size,
            num_classes,
            pin=device.type == "cuda",
            seed=args.seed,
        )

        def loader() -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                BatchList(batches, total + 2), batch_size=None, shuffle=False, num_workers=0
            )

        bare = BareLoop(bare_module, args, device)
        fit_s, bare_s, fit_mem, bare_mem = [], [], [], []
        for r in range(args.repeats):
            # ABBA order: a slow spell of the shared machine hits both paths alike.
            order = ("fit", "bare") if r % 2 == 0 else ("bare", "fit")
            for path in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                if path == "fit":
                    timer = StepTimer(args.warmup, args.steps, sync)
                    trainer = clis[r].trainer
                    trainer.callbacks.append(timer)
                    trainer.fit(fit_module, train_dataloaders=loader())
                    # setup() compiles the net on every fit; the next fit reuses this one.
                    fit_module.hparams.compile = False
                    fit_s.append(timer.marks.summary())
                    mem = fit_mem
                else:
                    bare_s.append(bare.run(loader(), args.warmup, args.steps, sync))
                    mem = bare_mem
                if device.type == "cuda":
                    mem.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        profile = (
            profile_paths(args, fit_module, bare, loader, tmp, sync) if args.profile_steps else None
        )
        fused_adamw = bool(bare.optimizer.defaults.get("fused"))
        from medvit.models.vit import uses_fused_attention

        fused_attention = uses_fused_attention(
            getattr(bare.module.net, "_orig_mod", bare.module.net)
        )

    images = args.steps * args.batch_size
    ratios = [b["wall_s"] / f["wall_s"] for f, b in zip(fit_s, bare_s, strict=True)]
    cpu_ratios = [b["cpu_s"] / f["cpu_s"] for f, b in zip(fit_s, bare_s, strict=True)]
    result: dict[str, Any] = {
        "fit": _stats(fit_s, images, args.batch_size),
        "bare": _stats(bare_s, images, args.batch_size),
        "ratio_fit_over_bare": statistics.median(ratios),
        "ratios": ratios,
        "fused_attention": fused_attention,
        "fused_adamw": fused_adamw,
    }
    if device.type == "cpu":
        # Steadier on shared CPUs: process CPU time per window, and the fastest single steps.
        result["ratio_cpu_time"] = statistics.median(cpu_ratios)
        result["ratios_cpu_time"] = cpu_ratios
        result["ratio_min_step"] = min(b["min_step_s"] for b in bare_s) / min(
            f["min_step_s"] for f in fit_s
        )
    if profile is not None:
        result["profile"] = profile
    if device.type == "cuda":
        result["fit"]["peak_mem_mb"] = max(fit_mem)
        result["bare"]["peak_mem_mb"] = max(bare_mem)
    else:
        # ru_maxrss is in KiB on Linux; it covers the whole process, both paths included.
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    net = bare_module.net
    net = getattr(net, "_orig_mod", net)
    probe = torch.randn(2, args.in_chans, args.img_size, args.img_size, device=device)
    bf16 = args.precision.startswith("bf16")
    with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        counted = counted_train_flops(net, probe) / 2
    # MFU counts model FLOPs (no recomputation); the counter also sees flash attention's
    # backward recomputing the scores, which is hardware work, not model work.
    analytic = analytic_train_flops(net, args.img_size, 1)
    result["train_flops_per_image"] = analytic
    result["train_flops_per_image_counted"] = counted
    result["flops_counted_over_analytic"] = counted / analytic
    peak = peak_flops(device, args.peak_tflops)
    if peak is not None:
        result["peak_flops"] = peak
        for path in ("fit", "bare"):
            result[path]["mfu"] = result[path]["images_per_s"] * analytic / peak

    if args.pipeline_workers is not None:
        with tempfile.TemporaryDirectory(prefix="medvit-pipeline-") as tmp:
            flag = args.flag or ("pathmnist" if args.in_chans == 3 else "breastmnist")
            size = args.img_size if args.img_size in SIZES else 28
            root = ensure_data(args.pipeline_root, flag, size, args.pipeline_samples, Path(tmp))
            pipe = measure_pipeline(
                root,
                flag,
                size,
                args.batch_size,
                args.pipeline_workers,
                batches=args.pipeline_batches,
                img_size=args.img_size,
                in_chans=args.in_chans,
                cache_dir=Path(tmp) / "mmap",
                pin_memory=device.type == "cuda",
                augment_on=args.pipeline_augment_on,
                device=str(device),
            )
        pipe["over_model_rate"] = pipe["images_per_s"] / result["fit"]["images_per_s"]
        # With augmentation on the device the model waits for it: its share of a training step.
        step_ms = 1000.0 * args.batch_size / result["fit"]["images_per_s"]
        pipe["on_device_share_of_step"] = pipe["on_device_ms_per_batch"] / step_ms
        result["pipeline"] = pipe

    return {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "device": str(device),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}
        | {"model_name": MODELS.get(args.model, args.model)},
        "result": result,
    }


def _stats(windows: list[dict[str, Any]], images: int, batch: int) -> dict[str, Any]:
    ips = [images / w["wall_s"] for w in windows]
    median = statistics.median(ips)
    return {
        "images_per_s": median,
        "step_ms": 1000.0 * batch / median,
        "images_per_s_all": ips,
        "min_step_ms": 1000.0 * min(w["min_step_s"] for w in windows),
        "cpu_s_per_step": statistics.median(w["cpu_s"] for w in windows) * batch / images,
    }


MARKDOWN_HEADER = (
    "| model | px | patch | batch | precision | compile | progress bar | device | fit img/s "
    "| bare img/s | fit/bare | step ms (fit) | peak mem MB | MFU fit | MFU bare "
    "| pipeline img/s (workers) | pipeline/model |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(report: dict[str, Any]) -> str:
    """One row of the throughput table (see ``MARKDOWN_HEADER``)."""
    c, r = report["config"], report["result"]
    mem = r["fit"].get("peak_mem_mb", r.get("peak_rss_mb"))
    mfu = [f"{100 * r[p]['mfu']:.1f}%" if "mfu" in r[p] else "-" for p in ("fit", "bare")]
    pipe = r.get("pipeline")
    pipe_cells = (
        [f"{pipe['images_per_s']:.0f} ({pipe['num_workers']})", f"{pipe['over_model_rate']:.2f}x"]
        if pipe
        else ["-", "-"]
    )
    bar = "off" if not c["progress_bar"] else f"every {c['progress_bar_refresh']}"
    cells = [
        c["model"],
        str(c["img_size"]),
        str(c["patch_size"]),
        str(c["batch_size"]),
        c["precision"],
        "yes" if c["compile"] else "no",
        bar,
        report["device"],
        f"{r['fit']['images_per_s']:.1f}",
        f"{r['bare']['images_per_s']:.1f}",
        f"{r['ratio_fit_over_bare']:.3f}"
        + (f" (CPU time {r['ratio_cpu_time']:.3f})" if "ratio_cpu_time" in r else ""),
        f"{r['fit']['step_ms']:.1f}",
        f"{mem:.0f}",
        *mfu,
        *pipe_cells,
    ]
    return "| " + " | ".join(cells) + " |"


def format_profile(path: str, summary: dict[str, Any], rows: int = 8) -> str:
    """A few lines on one profiled path: GPU busy share, then its top kernels (or CPU ops)."""
    head = f"profile {path}: {summary['wall_ms_per_step']:.2f} ms/step wall"
    if "gpu_busy" in summary:
        head += (
            f", kernels {summary['kernel_ms_per_step']:.2f} ms/step, "
            f"GPU busy {100 * summary['gpu_busy']:.1f}%"
        )
    top = summary.get("top_kernels") or summary["top_cpu_ops"]
    lines = [head] + [
        f"  {t['ms_per_step']:8.3f} ms/step  x{t['calls_per_step']:.1f}  {t['name'][:90]}"
        for t in top[:rows]
    ]
    return "\n".join(lines)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny", help=f"{list(MODELS)} or a timm name.")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--in-chans", type=int, default=3, choices=(1, 3))
    parser.add_argument("--flag", default=None, help="MedMNIST flag (default: by channels).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per repeat.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=3, help="Fit/bare pairs, ABBA order.")
    parser.add_argument("--distinct-batches", type=int, default=4, help="Batches to cycle.")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the network.")
    parser.add_argument("--fused-optimizer", type=_bool, default=None, help="Default: on CUDA.")
    parser.add_argument("--clip", type=float, default=1.0, help="Gradient clipping (0: off).")
    parser.add_argument("--log-every-n-steps", type=int, default=5)
    parser.add_argument("--progress-bar", type=_bool, default=True)
    parser.add_argument(
        "--progress-bar-refresh",
        type=int,
        default=DEFAULT_REFRESH_RATE,
        help="Steps between progress-bar updates (medvit's --progress_bar.refresh_rate).",
    )
    parser.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads value.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Override the bf16 peak.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="After the timing, torch.profiler this many steps of each path (top kernels, GPU busy).",
    )
    parser.add_argument(
        "--pipeline-workers", type=int, default=None, help="Also time the pipeline."
    )
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument(
        "--pipeline-augment-on",
        default="workers",
        choices=("workers", "device"),
        help="Where the pipeline's augmentation runs (device: batched, after the transfer).",
    )
    parser.add_argument("--pipeline-samples", type=int, default=2048, help="Synthetic train size.")
    parser.add_argument("--pipeline-root", default=None, help="Folder with a real file instead.")
    parser.add_argument("--out", default=None, help="Write the report as JSON here.")
    parser.add_argument("--markdown", default=None, help="Append the table row to this file.")
    parser.add_argument("--print-header", action="store_true", help="Print the table header only.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its markdown row (and JSON with ``--out``)."""
    args = build_parser().parse_args(argv)
    if args.print_header:
        print(MARKDOWN_HEADER)
        return {}
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        raise ValueError("--steps, --repeats and --warmup must be >= 1.")
    if args.img_size % args.patch_size:
        raise ValueError(
            f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}."
        )
    report = run(args)
    print(MARKDOWN_HEADER)
    print(markdown_row(report))
    r = report["result"]
    print(
        f"fit/bare ratio {r['ratio_fit_over_bare']:.3f} (per repeat: "
        + ", ".join(f"{x:.3f}" for x in r["ratios"])
        + (
            f"); CPU-time ratio {r['ratio_cpu_time']:.3f} (per repeat: "
            + ", ".join(f"{x:.3f}" for x in r["ratios_cpu_time"])
            + f"), fastest-step ratio {r['ratio_min_step']:.3f}"
            if "ratio_cpu_time" in r
            else ""
        )
        + f"; train FLOPs/image {r['train_flops_per_image'] / 1e9:.3f} G (FlopCounterMode "
        f"{r['train_flops_per_image_counted'] / 1e9:.3f} G); fused attention "
        f"{r['fused_attention']}, fused AdamW {r['fused_adamw']}"
    )
    for path, summary in r.get("profile", {}).items():
        print(format_profile(path, summary))
    if args.out:
        write_report(args.out, report)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(markdown_row(report) + "\n")
    return report


if __name__ == "__main__":
    main()
