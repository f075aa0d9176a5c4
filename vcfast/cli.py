"""The ``vcfast`` command.

    vcfast info                         which kernels were built and can run here
    vcfast demo [--out DIR]             spectrogram round trip on a synthetic utterance
    vcfast roundtrip IN.wav OUT.wav     wave -> log-spectrogram -> Griffin-Lim -> wave
    vcfast memory --batch 16            memory of one StarGAN-VC training iteration

The demo is what the README's first command runs: it exercises the fused spectrogram op
(against the torch.stft reference), the Griffin-Lim inverse and the audio I/O, and writes a
WAV, a PNG and a short report. It grows into the StarGAN-VC train-and-convert demo as the
trainer lands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int = 3) -> tuple[object, float]:
    """Result and best wall time in seconds of ``fn()`` (first call is a warm-up)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_png(path: Path, panels: list[tuple[str, torch.Tensor]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, spec) in zip(axes[0], panels):
        ax.imshow(spec.cpu().numpy(), origin="lower", aspect="auto", vmin=0, vmax=1, cmap="magma")
        ax.set_title(title)
        ax.set_xlabel("frame (16 ms hop)")
        ax.set_ylabel("bin (15.6 Hz .. 4 kHz)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def cmd_info(_args: argparse.Namespace) -> int:
    import vcfast

    print(json.dumps({"backends": vcfast.backends(), "build": vcfast.build_info()}, indent=2))
    return 0


def _round_trip(wave: torch.Tensor, n_iter: int):
    import vcfast

    backend = "cpu" if vcfast.backends()["cpu"] else "reference"
    spec, fused_s = _timed(lambda: vcfast.log_spectrogram(wave, backend=backend))
    _, reference_s = _timed(lambda: vcfast.log_spectrogram(wave, backend="reference"))
    start = time.perf_counter()
    rebuilt, convergence = vcfast.spectrogram_to_wave(spec, n_iter=n_iter, return_convergence=True)
    inverse_s = time.perf_counter() - start
    rebuilt_spec = vcfast.log_spectrogram(rebuilt, backend=backend)
    return dict(
        backend=backend, spec=spec, rebuilt=rebuilt, rebuilt_spec=rebuilt_spec,
        fused_ms=fused_s * 1e3, reference_ms=reference_s * 1e3, inverse_s=inverse_s,
        spectral_convergence=float(convergence),
        round_trip_mean_abs_error=float((rebuilt_spec - spec).abs().mean()),
    )


def cmd_demo(args: argparse.Namespace) -> int:
    import vcfast
    from vcfast.data import CROP_SAMPLES, load_audio, random_crop, save_audio, synthetic_speech

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    if args.input:
        source = load_audio(args.input)
        origin = str(args.input)
    else:
        source = synthetic_speech(CROP_SAMPLES * 2, seed=args.seed)
        origin = "synthetic speech-like utterance (vcfast.data.synthetic_speech)"
    clip = random_crop(source, generator=generator)
    print(f"vcfast demo: {origin}, crop of {clip.numel()} samples at 16 kHz")
    print(f"backends here: {vcfast.backends()}")
    result = _round_trip(clip, args.n_iter)
    save_audio(out / "original.wav", clip)
    save_audio(out / "reconstructed.wav", result["rebuilt"])
    png = out / "spectrogram.png"
    has_png = _save_png(png, [("log spectrogram (stargan_vc)", result["spec"]),
                              (f"after Griffin-Lim x{args.n_iter}", result["rebuilt_spec"])])
    report = {
        "input": origin,
        "spectrogram_shape": list(result["spec"].shape),
        "backend": result["backend"],
        "fused_spectrogram_ms": round(result["fused_ms"], 2),
        "torch_stft_chain_ms": round(result["reference_ms"], 2),
        "griffin_lim_iterations": args.n_iter,
        "griffin_lim_seconds": round(result["inverse_s"], 3),
        "spectral_convergence": round(result["spectral_convergence"], 4),
        "round_trip_mean_abs_error": round(result["round_trip_mean_abs_error"], 4),
        "files": {
            "original": str(out / "original.wav"),
            "reconstructed": str(out / "reconstructed.wav"),
            "spectrogram_png": str(png) if has_png else None,
        },
        "torch_threads": torch.get_num_threads(),
    }
    _write_atomically(out / "report.json", json.dumps(report, indent=2).encode())
    print(f"spectrogram {tuple(result['spec'].shape)}: fused '{result['backend']}' "
          f"{result['fused_ms']:.1f} ms vs torch.stft chain {result['reference_ms']:.1f} ms")
    print(f"Griffin-Lim x{args.n_iter}: {result['inverse_s']:.2f} s, spectral convergence "
          f"{result['spectral_convergence']:.3f}, round-trip mean |error| "
          f"{result['round_trip_mean_abs_error']:.4f}")
    print(f"wrote {out}/original.wav, reconstructed.wav, "
          f"{'spectrogram.png, ' if has_png else ''}report.json")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from vcfast.data import load_audio, save_audio

    wave = load_audio(args.input)
    result = _round_trip(wave, args.n_iter)
    save_audio(args.output, result["rebuilt"])
    print(f"{args.input}: {wave.numel()} samples -> spectrogram {tuple(result['spec'].shape)} -> "
          f"{args.output}; spectral convergence {result['spectral_convergence']:.3f}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from vcfast.estimate import estimate_iteration, largest_batches

    gib = 2**30
    print(f"one training iteration ({args.n_critic} D steps with gradient penalty + 1 G step), paper-size "
          f"StarGAN, batch {args.batch}, {args.dtype}, 1x{args.image_size}x{args.image_size}; "
          "estimated on the meta device (tensor bytes; no allocator rounding or kernel workspaces)")
    results = {impl: estimate_iteration(args.batch, implementation=impl, dtype=args.dtype,
                                        image_size=args.image_size, n_critic=args.n_critic)
               for impl in ("reference", "vcfast")}
    print(f"{'':34}{'reference (official)':>22}{'vcfast':>10}")
    rows = [("weights + grads + optimizer", "baseline_bytes", None),
            ("D step peak", "phases", "d_step"), ("G step peak", "phases", "g_step"),
            ("iteration peak", "peak_bytes", None)]
    for label, key, sub in rows:
        ref = results["reference"][key] if sub is None else results["reference"][key][sub]
        lean = results["vcfast"][key] if sub is None else results["vcfast"][key][sub]
        print(f"{label:34}{ref / gib:>19.2f} GiB{lean / gib:>6.2f} GiB")
    if args.fits:
        budgets = [int(float(g) * gib) for g in args.fits.split(",")]
        fits = {impl: largest_batches(budgets, implementation=impl, dtype=args.dtype,
                                      image_size=args.image_size, n_critic=args.n_critic)
                for impl in ("reference", "vcfast")}
        print(f"\n{'largest batch that fits':34}{'reference (official)':>22}{'vcfast':>10}")
        for budget in budgets:
            print(f"{budget / gib:>10.0f} GiB{'':20}{fits['reference'][budget]:>22}{fits['vcfast'][budget]:>10}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcfast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show which backends were built and can run").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="spectrogram round trip on a synthetic utterance")
    demo.add_argument("--out", default="vcfast-demo", help="output folder (default: vcfast-demo)")
    demo.add_argument("--input", help="use this audio file instead of the synthetic utterance")
    demo.add_argument("--n-iter", type=int, default=32, help="Griffin-Lim iterations (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    mem = sub.add_parser("memory", help="memory of one StarGAN-VC training iteration, official vs vcfast")
    mem.add_argument("--batch", type=int, default=16)
    mem.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    mem.add_argument("--image-size", type=int, default=256)
    mem.add_argument("--n-critic", type=int, default=5, help="D steps per G step (default 5)")
    mem.add_argument("--fits", default="6,8,12,24",
                     help="GiB budgets for the largest-batch table ('' to skip; default 6,8,12,24)")
    mem.set_defaults(func=cmd_memory)
    rt = sub.add_parser("roundtrip", help="wave -> spectrogram -> Griffin-Lim -> wave")
    rt.add_argument("input")
    rt.add_argument("output")
    rt.add_argument("--n-iter", type=int, default=32)
    rt.set_defaults(func=cmd_roundtrip)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"vcfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
