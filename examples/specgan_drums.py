"""SpecGAN drum synthesis on 128 x 128 STFT images, with vcfast as a drop-in.

Reproduces the SpecGAN drum system: a DCGAN-shaped generator turns a 100-d uniform noise
vector into a 128 x 128 log-magnitude STFT image (a fully connected layer to 4 x 4, then five
5x5 stride-2 transposed convolutions with ReLU, tanh at the end) and a mirrored critic (five
5x5 stride-2 convolutions with LeakyReLU 0.2, then a fully connected score) learns to tell
them from the STFTs of ~1 s drum one-shots. The STFT images are log magnitudes standardised
per frequency bin over the training set, divided by 3 and clipped to [-1, 1]. The GAN is
trained as a Wasserstein GAN with gradient penalty (5 critic steps per generator step, Adam
1e-4, betas 0.5 / 0.9); generated images are turned back into audio with Griffin-Lim.

vcfast replaces three pieces: the STFT front end (`vcfast.log_spectrogram` with its `specgan`
preset and per-bin statistics from `vcfast.measure_bin_stats`, docs/ops.md#presets), the
WGAN-GP penalty (`vcfast.gradient_penalty(..., mode="lean")`: the exact penalty gradients
without a double backward, docs/ops.md#gradient-penalty), and the inversion
(`vcfast.spectrogram_to_wave`: undo the standardisation and the log, Fast Griffin-Lim,
docs/ops.md#inverse).

Data: `--data DIR`, any folder of audio files (searched recursively; each file's first 16 384
samples at 16 kHz, zero-padded if shorter); otherwise, and always with `--smoke`, synthetic
kick / snare / hi-hat hits made here. At the end a few generated drums are written as WAV
files under `--out` (with `--smoke` only when `--out` is given).

    python examples/specgan_drums.py --smoke
    python examples/specgan_drums.py --data drums/ --steps 20000 --out runs/specgan
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import soundfile
import torch
import torch.nn as nn

import vcfast
import vcfast.data
from vcfast.train.loop import resolve_device

SAMPLES = 16384  # specgan preset: 16 384 samples at 16 kHz -> 128 bins x 128 frames
SR = 16000
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3"}


def generator(d: int = 64, z_dim: int = 100) -> nn.Sequential:
    def up(c_in, c_out, last=False):
        conv = nn.ConvTranspose2d(c_in, c_out, 5, 2, 2, output_padding=1)
        return [conv, nn.Tanh() if last else nn.ReLU()]

    return nn.Sequential(
        nn.Linear(z_dim, 16 * d * 4 * 4), nn.Unflatten(1, (16 * d, 4, 4)), nn.ReLU(),
        *up(16 * d, 8 * d), *up(8 * d, 4 * d), *up(4 * d, 2 * d), *up(2 * d, d),
        *up(d, 1, last=True),
    )


def critic(d: int = 64) -> nn.Sequential:
    # Only Conv2d / LeakyReLU / Flatten / Linear: the layers the lean penalty supports.
    chans = [1, d, 2 * d, 4 * d, 8 * d, 16 * d]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 5, 2, 2), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * d * 4 * 4, 1))


def synthetic_drums(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 16384] kicks (decaying pitch sweep), snares (tone + noise), hi-hats (short noise)."""
    t = torch.arange(SAMPLES) / SR
    out = torch.zeros(n, SAMPLES)
    for i in range(n):
        kind = i % 3
        r = torch.rand(4, generator=gen)
        noise = torch.randn(SAMPLES, generator=gen)
        if kind == 0:
            f = 40 + 60 * r[0] + 150 * torch.exp(-t * (20 + 30 * r[1]))
            x = torch.sin(2 * math.pi * torch.cumsum(f, 0) / SR) * torch.exp(-t * (6 + 6 * r[2]))
        elif kind == 1:
            tone = torch.sin(2 * math.pi * (150 + 100 * r[0]) * t)
            x = (0.5 * tone + noise) * torch.exp(-t * (15 + 15 * r[1]))
        else:
            hp = noise - torch.roll(noise, 1)  # first difference: tilts the noise up
            x = hp * torch.exp(-t * (40 + 60 * r[1]))
        onset = int(r[3] * 2000)
        x = torch.roll(x, onset)
        x[:onset] = 0
        out[i] = x / x.abs().max().clamp_min(1e-6)
    return out


def folder_drums(root: Path) -> torch.Tensor:
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"specgan_drums: no audio files under {root}")
    clips = torch.zeros(len(files), SAMPLES)
    for i, f in enumerate(files):
        w = vcfast.data.load_audio(f)[:SAMPLES]
        clips[i, : w.numel()] = w
    return clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on synthetic drums with tiny networks")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default 20000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="folder for generated WAVs and weights")
    p.add_argument("--data", default=None, help="folder of drum audio files")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dim", type=int, default=None, help="model dimension d (64 = full)")
    p.add_argument("--n-critic", type=int, default=None, help="critic steps per G step")
    p.add_argument("--samples", type=int, default=4, help="drums to write at the end")
    p.add_argument("--gl-iters", type=int, default=None, help="Griffin-Lim iterations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    steps = args.steps if args.steps is not None else (2 if smoke else 20000)
    batch = args.batch if args.batch is not None else (2 if smoke else 64)
    d = args.dim if args.dim is not None else (2 if smoke else 64)
    n_critic = args.n_critic if args.n_critic is not None else (2 if smoke else 5)
    gl_iters = args.gl_iters if args.gl_iters is not None else (4 if smoke else 32)
    dev = resolve_device(args.device)  # "auto": CUDA when available; a clear error otherwise
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if args.data and not smoke:
        clips, source = folder_drums(Path(args.data)), f"audio files under {args.data}"
    else:
        clips, source = synthetic_drums(6 if smoke else 384, gen), "synthetic drums"
    # Per-bin statistics of the log magnitude over the training set, then the standardised,
    # clipped [N, 1, 128, 128] STFT images.
    mean, std = vcfast.measure_bin_stats(clips.split(64), preset="specgan")
    mean, std = mean.to(dev), std.to(dev)
    real_all = vcfast.log_spectrogram(clips.to(dev), preset="specgan", mean=mean, std=std)
    real_all = real_all.unsqueeze(1)

    G, D = generator(d).to(dev), critic(d).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
    n_g = sum(q.numel() for q in G.parameters()) / 1e6
    n_d = sum(q.numel() for q in D.parameters()) / 1e6
    print(f"specgan_drums: G {n_g:.2f} M, D {n_d:.2f} M parameters, {len(clips)} clips of "
          f"{source} -> {tuple(real_all.shape[1:])}, device {dev}")

    def noise(n: int) -> torch.Tensor:
        return torch.rand(n, 100, device=dev) * 2 - 1

    t0, d_loss_v, g_loss_v, gp_v = time.perf_counter(), float("nan"), float("nan"), float("nan")
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        for _ in range(n_critic):
            real = real_all[torch.randint(0, len(real_all), (batch,), generator=gen).to(dev)]
            with torch.no_grad():
                fake = G(noise(batch))
            # Penalty first: its backward then runs last (docs/ops.md#the-lean-pass).
            gp = vcfast.gradient_penalty(D, real, fake, weight=10.0, mode="lean")
            d_loss = D(fake).mean() - D(real).mean() + gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        g_loss = -D(G(noise(batch))).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d_loss_v, g_loss_v, gp_v = d_loss.item(), g_loss.item(), gp.item()
        if step % every == 0 or step == steps:
            print(f"step {step:5d}  D {d_loss_v:.4f}  G {g_loss_v:.4f}  gp {gp_v:.4f}")

    written = []
    if args.out and args.samples > 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        G.eval()
        with torch.no_grad():
            spec = G(noise(args.samples)).squeeze(1)
            audio, sc = vcfast.spectrogram_to_wave(spec, preset="specgan", mean=mean, std=std,
                                                   n_iter=gl_iters, return_convergence=True)
        for i, wave in enumerate(audio.cpu()):
            path = out / f"drum_{i:02d}.wav"
            soundfile.write(str(path), (wave / wave.abs().max().clamp_min(1e-6)).numpy(), SR)
            written.append(path)
        torch.save({"G": G.state_dict(), "mean": mean.cpu(), "std": std.cpu()},
                   out / "specgan_generator.pt")
        print(f"wrote {len(written)} drums to {out} (Griffin-Lim {gl_iters} iterations, "
              f"spectral convergence {sc.mean().item():.3f})")
    print(f"done: {steps} G steps x {n_critic} D steps in {time.perf_counter() - t0:.1f} s, "
          f"final D loss {d_loss_v:.4f}, G loss {g_loss_v:.4f}, gp {gp_v:.4f}")
    ok = all(math.isfinite(v) for v in (d_loss_v, g_loss_v, gp_v))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
