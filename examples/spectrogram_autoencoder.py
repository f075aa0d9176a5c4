"""Convolutional autoencoder for short log-spectrogram windows, with vcfast as a drop-in.

Reproduces the spectrogram-autoencoder system: a window of 32 frames x 256 frequency bins
(1 x 32 x 256) is squeezed into a latent code of 16 time steps, each a 4096-vector in (-1, 1),
and rebuilt. The encoder halves time and frequency once (4x4 stride 2), then only frequency
three times (1x4 stride 1x2), and two frequency-only convolutions (1x9, then 1x8) collapse the
remaining 16 bins, which works as a fully connected layer over frequency applied at every time
step. The decoder mirrors it with transposed convolutions and ends in a softplus, since
spectrogram values are non-negative. Every hidden layer is conv -> LeakyReLU -> BatchNorm; the
latent layer is conv -> BatchNorm -> tanh. The loss is the L1 or L2 reconstruction error.

vcfast replaces the spectrogram front end: `vcfast.log_spectrogram` (preset `stargan_vc`,
docs/ops.md#log-spectrogram) turns 8 960-sample audio crops into the 256-bin x 32-frame
windows in [0, 1] on the training device, in one fused op; `vcfast.data.random_crop` draws the
crops (docs/ops.md#crops).

Data: with `--smoke`, crops of synthetic speech-like audio (`vcfast.data.synthetic_speech`)
and a narrow model; otherwise crops of the bundled demo corpus (or `--data DIR`, a corpus
folder `vcfast.data.load_corpus` reads). `--width 32` (the default) is the full model
(about 100 M parameters, most of them in the two 4096-channel layers).

    python examples/spectrogram_autoencoder.py --smoke
    python examples/spectrogram_autoencoder.py --steps 2000 --loss l1 --device auto
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import vcfast
import vcfast.data
from vcfast.train.loop import resolve_device

FRAMES = 32
CROP = 1024 + (FRAMES - 1) * 256  # stargan_vc framing: exactly 32 frames


def enc(c_in, c_out, k, s, p):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2), nn.BatchNorm2d(c_out))


def dec(c_in, c_out, k, s, p):
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2), nn.BatchNorm2d(c_out)
    )


class SpectrogramAutoencoder(nn.Module):
    """[B, 1, 32, 256] (time, frequency) -> latent [B, 128*w, 16, 1] -> [B, 1, 32, 256]."""

    def __init__(self, width: int = 32):
        c1, c2, fc, latent = width, 2 * width, 32 * width, 128 * width
        super().__init__()
        self.encoder = nn.Sequential(
            enc(1, c1, 7, 1, 3),                     # c1 x 32 x 256
            enc(c1, c2, 4, 2, 1),                    # c2 x 16 x 128
            enc(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 64
            enc(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 32
            enc(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 16
            enc(c2, fc, (1, 9), 1, 0),               # fc x 16 x 8
            enc(fc, latent, (1, 8), 1, 0),           # latent x 16 x 1
            nn.Conv2d(latent, latent, 1), nn.BatchNorm2d(latent), nn.Tanh(),
        )
        self.decoder = nn.Sequential(
            enc(latent, latent, 1, 1, 0),
            dec(latent, fc, (1, 8), 1, 0),           # fc x 16 x 8
            dec(fc, c2, (1, 9), 1, 0),               # c2 x 16 x 16
            dec(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 32
            dec(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 64
            dec(c2, c2, (1, 4), (1, 2), (0, 1)),     # c2 x 16 x 128
            dec(c2, c1, 4, 2, 1),                    # c1 x 32 x 256
            nn.Conv2d(c1, 1, 7, 1, 3), nn.Softplus(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on synthetic audio with a narrow model")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 2000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="optional folder for the trained weights")
    p.add_argument("--data", default=None,
                   help="corpus folder (default: the bundled demo corpus)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="first conv's channels (32 = full)")
    p.add_argument("--loss", choices=["l1", "l2"], default="l1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    steps = args.steps if args.steps is not None else (3 if smoke else 2000)
    batch = args.batch if args.batch is not None else (2 if smoke else 16)
    width = args.width if args.width is not None else (2 if smoke else 32)
    dev = resolve_device(args.device)  # "auto": CUDA when available; a clear error otherwise
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if smoke:
        waves = [vcfast.data.synthetic_speech(2 * CROP, seed=i) for i in range(2)]
        source = "synthetic speech"
    else:
        corpus = vcfast.data.load_corpus(args.data or vcfast.data.demo_corpus_dir())
        waves = [vcfast.data.load_audio(u.path) for u in corpus.utterances]
        source = f"{len(waves)} utterances of {corpus.root}"

    model = SpectrogramAutoencoder(width).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = F.l1_loss if args.loss == "l1" else F.mse_loss
    n_params = sum(q.numel() for q in model.parameters())
    print(f"spectrogram_autoencoder: {n_params / 1e6:.2f} M parameters, {args.loss} loss, "
          f"data: {source}, device {dev}")

    t0, loss_v = time.perf_counter(), float("nan")
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(waves), (batch,), generator=gen)
        clips = torch.stack(
            [vcfast.data.random_crop(waves[i], CROP, generator=gen) for i in pick]
        ).to(dev)
        # [B, 256 bins, 32 frames] in [0, 1] -> [B, 1, 32 (time), 256 (frequency)]
        x = vcfast.log_spectrogram(clips, preset="stargan_vc").transpose(1, 2).unsqueeze(1)
        y, z = model(x)
        loss = loss_fn(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if step % every == 0 or step == steps:
            print(f"step {step:5d}  {args.loss} {loss_v:.5f}  latent {tuple(z.shape[1:])}")

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(args.out) / "spectrogram_autoencoder.pt")
    print(f"done: {steps} steps in {time.perf_counter() - t0:.1f} s, "
          f"final {args.loss} loss {loss_v:.5f}")
    return 0 if math.isfinite(loss_v) else 1


if __name__ == "__main__":
    raise SystemExit(main())
