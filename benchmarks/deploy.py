"""Deployment: model size, latency and test AUC of PyTorch fp32, ONNX fp32 and ONNX int8.

For each model the four variants are built from the same weights: the PyTorch module (fp32),
its ``medvit export`` ONNX model (fp32, parity-checked), and onnxruntime int8 quantizations,
dynamic and static (per-channel, calibrated on the validation split when a checkpoint is
given, else on random images). Latency is one forward pass of a batch of normalised images
(no decoding), measured per (batch size, threads) with the variants **interleaved**: each
repeat runs every variant once, in an order rotated per repeat, so that load from other work
on a shared machine hits all of them alike. p50 and p95 are over the repeats.

Size: the ONNX file for ONNX variants; the PyTorch state dict (``torch.save``) for PyTorch.
Test AUC (with ``--ckpt``): medvit's test AUC of each variant on the checkpoint's test split.

    python benchmarks/deploy.py --ckpt runs/breastmnist/<run>/checkpoints/best.ckpt \\
        --out benchmarks/results/deploy/vit_tiny4_28.json --repeats 50
    python benchmarks/deploy.py --model vit_small_patch16_224 --img-size 224 --patch-size 16 \\
        --in-chans 3 --out benchmarks/results/deploy/vit_small16_224.json --repeats 20
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from medvit.export.metadata import ModelInfo  # noqa: E402
from medvit.export.onnx_export import (  # noqa: E402
    export_onnx,
    load_for_export,
    parity,
    session,
    set_metadata,
)
from medvit.export.quantize import (  # noqa: E402
    datamodule_for,
    evaluate,
    quantize,
    split_batches,
)

VARIANTS = ("pytorch fp32", "onnx fp32", "onnx int8 dynamic", "onnx int8 static")


def _random_model(args: argparse.Namespace) -> tuple[torch.nn.Module, ModelInfo]:
    """A randomly initialised medvit ViT (latency does not depend on the weights)."""
    from medvit.models.vit import create_vit

    torch.manual_seed(0)
    net = create_vit(
        args.model,
        num_classes=2,
        in_chans=args.in_chans,
        img_size=args.img_size,
        patch_size=args.patch_size,
        pos_embed="sincos",
    ).eval()
    info = ModelInfo("binary", 2, ["0", "1"], in_chans=args.in_chans, img_size=args.img_size)
    return net, info


def _percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def measure_latency(
    module: torch.nn.Module,
    models: dict[str, bytes],
    info: ModelInfo,
    batch: int,
    threads: int,
    repeats: int,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """p50/p95 milliseconds per forward of each variant, interleaved (see the module docstring)."""
    torch.set_num_threads(threads)
    runners = {name: session(data, threads=threads) for name, data in models.items()}
    x = torch.randn(info.input_shape(batch), generator=torch.Generator().manual_seed(batch))
    xn = x.numpy()

    def pytorch() -> None:
        with torch.inference_mode():
            module(x)

    calls: dict[str, Any] = {"pytorch fp32": pytorch}
    for name, runner in runners.items():
        calls[name] = lambda runner=runner: runner.run(None, {"image": xn})
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {
        n: {"p50_ms": _percentile(t, 50), "p95_ms": _percentile(t, 95), "n": len(t)}
        for n, t in times.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="a medvit checkpoint (else random weights)")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args(argv)

    dm = None
    if args.ckpt:
        module, data_hp, info = load_for_export(args.ckpt)
        dm = datamodule_for(args.ckpt, data_hp)
        dm.prepare_data()
        name = f"{module.hparams.model_name}/{module.hparams.patch_size} {info.img_size} px"
    else:
        module, info = _random_model(args)
        name = f"{args.model}/{args.patch_size} {args.img_size} px (random weights)"
    module = module.eval().float()
    fp32 = export_onnx(module, info)
    info.checks["parity"] = parity(module, fp32, info)
    set_metadata(fp32, info)
    if dm is not None:
        calibration = [x for x, _ in split_batches(dm, "val", args.calibration_samples)]
    else:
        gen = torch.Generator().manual_seed(1)
        calibration = [torch.randn(info.input_shape(8), generator=gen).numpy() for _ in range(8)]
    protos = {
        "onnx fp32": fp32,
        "onnx int8 dynamic": quantize(fp32, "dynamic"),
        "onnx int8 static": quantize(fp32, "static", calibration),
    }
    models = {k: p.SerializeToString() for k, p in protos.items()}
    buffer = io.BytesIO()
    torch.save(module.state_dict() if dm is None else module.net.state_dict(), buffer)
    sizes = {"pytorch fp32": buffer.tell(), **{k: len(v) for k, v in models.items()}}

    auc: dict[str, float] = {}
    if dm is not None:
        from medvit.export.metadata import auroc, probabilities

        test = list(split_batches(dm, "test"))
        with torch.inference_mode():
            logits = np.concatenate([module(torch.from_numpy(x)).numpy() for x, _ in test])
        target = np.concatenate([y for _, y in test])
        auc["pytorch fp32"] = auroc(probabilities(logits, info), target, info)
        for k, data in models.items():
            auc[k] = evaluate(onnx.load_from_string(data), test, info)

    latency = {}
    for threads in args.threads:
        for batch in args.batches:
            key = f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}"
            latency[key] = measure_latency(
                module, models, info, batch, threads, args.repeats, args.warmup
            )
            print(key, json.dumps(latency[key]), flush=True)

    result = {
        "model": name,
        "ckpt": args.ckpt,
        "repeats": args.repeats,
        "command": "python benchmarks/deploy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "parity_max_abs_logit_diff": info.checks["parity"]["max_abs_logit_diff"],
        "size_bytes": sizes,
        "test_auc": auc,
        "latency": latency,
    }
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per variant; speed-ups against PyTorch fp32."""
    latency = result["latency"]
    keys = list(latency)
    ones = [k for k in keys if k.startswith("batch 1,")]
    lines = [
        f"**{result['model']}**",
        "",
        "| variant | size MiB (x PyTorch) | "
        + " | ".join(f"{k}: p50 / p95 ms" for k in keys)
        + "".join(f" | speed-up, {k}" for k in ones)
        + " | test AUC (Δ vs PyTorch) |",
        "|---|---|" + "---|" * (len(keys) + len(ones)) + "---|",
    ]
    ref_size = result["size_bytes"]["pytorch fp32"]
    auc = result["test_auc"]
    for v in VARIANTS:
        size = result["size_bytes"][v]
        cells = [f"{latency[k][v]['p50_ms']:.2f} / {latency[k][v]['p95_ms']:.2f}" for k in keys]
        cells += [
            f"{latency[k]['pytorch fp32']['p50_ms'] / latency[k][v]['p50_ms']:.2f}x" for k in ones
        ]
        if v in auc:
            quality = f"{auc[v]:.4f} ({auc[v] - auc['pytorch fp32']:+.4f})"
        else:
            quality = "n/a (random weights)"
        lines.append(
            f"| {v} | {size / 2**20:.2f} ({size / ref_size:.2f}) | "
            + " | ".join(cells)
            + f" | {quality} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
