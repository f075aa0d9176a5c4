"""ESC-50 environmental-sound classifier on log-mel images, with vcfast as a drop-in.

Reproduces the ESC-50 CNN system: each 5 s clip (44.1 kHz) becomes a 1 x 128 x 431 log-mel
image (128 mel bands, 1024-point STFT, hop 512), standardised with one mean and one standard
deviation measured on the training clips. Four blocks of 3x3 convolution, BatchNorm, ReLU and
2x2 max-pooling widen 64 -> 512 channels; the features are pooled to a 2 x 11 grid, flattened
and mapped to the 50 classes by a fully connected layer, trained with softmax cross-entropy.
Against overfitting on so few clips, training uses only two augmentations that keep the
time axis meaningful (no flips): a random crop (100 bands x 384 frames) and masking, which
blanks a random band range and a random frame range of each crop. Evaluation takes the
centre crop of each held-out clip.

vcfast replaces the log-mel front end, `vcfast.log_mel_spectrogram(wave,
preset="esc50_mel")` (docs/ops.md#log-mel-spectrogram), when this vcfast has it; otherwise
(or with `--mel torch`) a small plain-PyTorch log-mel defined below runs instead
(torch.stft, power spectrum, an HTK-formula triangular mel filterbank, natural log), and the
first line printed says which path ran. The two differ in the mel scale: at these numbers
HTK's scale leaves the lowest band between two STFT bins, always at the log floor, which is
why the `esc50_mel` preset uses Slaney's scale and area norm instead (docs/ops.md#mel-scales);
the fallback keeps HTK's formula, the common plain-PyTorch choice. The loss is vcfast's
per-group softmax cross-entropy in its single-group case
(`vcfast.masked_multigroup_softmax_ce` with one group of 50 classes,
docs/ops.md#softmax-cross-entropy), and `vcfast.multigroup_accuracy` scores it.

Data: `--data DIR`, a folder in the ESC-50 layout (a meta CSV with at least the columns
filename, fold, target, found as DIR/meta/esc50.csv or the one .csv directly in DIR, and the
audio files in DIR/audio/ or DIR); fold `--val-fold` is held out. With `--smoke`, short
synthetic clips of a few tone-and-noise classes.

    python examples/esc50_classifier.py --smoke
    python examples/esc50_classifier.py --data ESC-50-master --steps 3000 --device auto
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import vcfast
import vcfast.data
from vcfast.train.loop import resolve_device

SR, N_FFT, HOP, N_MELS = 44100, 1024, 512, 128  # the esc50_mel numbers
CLIP = 5 * SR


# --- fallback log-mel in plain PyTorch (used when vcfast.log_mel_spectrogram is missing) ---

def htk_mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SR) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangles evenly spaced on the HTK mel scale, 0 Hz to Nyquist."""
    def hz_to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    fft_hz = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(sr / 2.0))), n_mels + 2,
                                     dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (fft_hz - lo) / (mid - lo)
    down = (hi - fft_hz) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0).float()


def torch_log_mel(wave: torch.Tensor, fbank: torch.Tensor) -> torch.Tensor:
    window = torch.hann_window(N_FFT, device=wave.device)
    spec = torch.stft(wave, N_FFT, HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [B, n_fft/2 + 1, frames]
    return torch.log(torch.clamp(fbank.to(wave.device) @ power, min=1e-10))


def make_log_mel(choice: str):
    """Returns (function wave -> [B, 128, frames], description of the path)."""
    has_vcfast = hasattr(vcfast, "log_mel_spectrogram")
    if choice == "vcfast" and not has_vcfast:
        raise SystemExit("esc50_classifier: this vcfast has no log_mel_spectrogram")
    if choice != "torch" and has_vcfast:
        preset = getattr(vcfast, "MEL_PRESETS", {}).get("esc50_mel")
        if preset is not None and preset.sample_rate != SR:  # clips are loaded at SR
            raise SystemExit(f"esc50_classifier: esc50_mel expects {preset.sample_rate} Hz")
        return (lambda w: vcfast.log_mel_spectrogram(w, preset="esc50_mel"),
                'vcfast.log_mel_spectrogram(preset="esc50_mel")')
    fbank = htk_mel_filterbank()
    return (lambda w: torch_log_mel(w, fbank),
            "plain-PyTorch fallback (torch.stft + HTK mel filterbank)")


# --- data ---

def synthetic_clips(n: int, n_classes: int, samples: int, gen: torch.Generator):
    """Class k: a tone at 300 * (k + 1) Hz in noise bursts at a class-specific rate."""
    t = torch.arange(samples) / SR
    targets = torch.arange(n) % n_classes
    clips = torch.empty(n, samples)
    for i, k in enumerate(targets.tolist()):
        tone = torch.sin(2 * math.pi * 300 * (k + 1) * t + 6.28 * torch.rand(1, generator=gen))
        bursts = (torch.sin(2 * math.pi * (2 + 2 * k) * t) > 0).float()
        clips[i] = 0.5 * tone * bursts + 0.1 * torch.randn(samples, generator=gen)
    return clips, targets


def esc50_folder(root: Path, val_fold: int):
    meta = root / "meta" / "esc50.csv"
    if not meta.exists():
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise SystemExit(f"esc50_classifier: no meta/esc50.csv and not one .csv in {root}")
        meta = found[0]
    audio_dir = root / "audio" if (root / "audio").is_dir() else root
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    clips = torch.zeros(len(rows), CLIP)
    for i, row in enumerate(rows):
        w = vcfast.data.load_audio(audio_dir / row["filename"], sample_rate=SR)[:CLIP]
        clips[i, : w.numel()] = w
    targets = torch.tensor([int(r["target"]) for r in rows])
    val = torch.tensor([int(r["fold"]) == val_fold for r in rows])
    return clips, targets, val


# --- model and augmentation ---

class FourConvCNN(nn.Module):
    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d((2, 11)))
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(chans[-1] * 22, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def crop_and_mask(x: torch.Tensor, mels: int, frames: int, gen: torch.Generator,
                  train: bool) -> torch.Tensor:
    """[B, M, T] -> [B, 1, mels, frames]: random (train) or centre crop; training also
    blanks one random band range and one random frame range per sample (to the mean, 0)."""
    B, M, T = x.shape
    out = torch.empty(B, mels, frames, device=x.device)
    for b in range(B):
        if train:
            m0 = int(torch.randint(0, M - mels + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, T - frames + 1, (1,), generator=gen))
        else:
            m0, t0 = (M - mels) // 2, (T - frames) // 2
        out[b] = x[b, m0:m0 + mels, t0:t0 + frames]
        if train:
            fm = int(torch.randint(0, mels // 8 + 1, (1,), generator=gen))
            tm = int(torch.randint(0, frames // 8 + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, mels - fm + 1, (1,), generator=gen))
            s0 = int(torch.randint(0, frames - tm + 1, (1,), generator=gen))
            out[b, f0:f0 + fm, :] = 0
            out[b, :, s0:s0 + tm] = 0
    return out.unsqueeze(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on short synthetic clips with a tiny model")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="optional folder for the trained weights")
    p.add_argument("--data", default=None, help="ESC-50-layout folder (required without --smoke)")
    p.add_argument("--val-fold", type=int, default=5)
    p.add_argument("--mel", choices=["auto", "vcfast", "torch"], default="auto",
                   help="log-mel path: vcfast's op when present (auto), or the fallback")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None, help="first conv's channels (64 = full)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    if not smoke and not args.data:
        p.error("--data DIR is required without --smoke (ESC-50 is not bundled)")
    steps = args.steps if args.steps is not None else (3 if smoke else 3000)
    batch = args.batch if args.batch is not None else (4 if smoke else 32)
    width = args.width if args.width is not None else (4 if smoke else 64)
    crop_mels, crop_frames = (100, 32) if smoke else (100, 384)
    dev = resolve_device(args.device)  # "auto": CUDA when available; a clear error otherwise
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log_mel, mel_path = make_log_mel(args.mel)

    if smoke:
        n_classes = 5
        clips, targets = synthetic_clips(12, n_classes, SR // 2, gen)  # 0.5 s -> 44 frames
        val = torch.arange(len(clips)) >= 8
        source = "synthetic clips"
    else:
        clips, targets, val = esc50_folder(Path(args.data), args.val_fold)
        n_classes = int(targets.max()) + 1
        source = f"{len(clips)} clips of {args.data}, fold {args.val_fold} held out"
    with torch.no_grad():
        feats = torch.cat([log_mel(c.to(dev)) for c in clips.split(64)])
    mu, sd = feats[~val].mean(), feats[~val].std()
    feats = (feats - mu) / sd
    train_idx, val_idx = (~val).nonzero().squeeze(1), val.nonzero().squeeze(1)
    print(f"esc50_classifier: log-mel via {mel_path}; {source}; {n_classes} classes, "
          f"features {tuple(feats.shape[1:])}, device {dev}")

    model = FourConvCNN(n_classes, width).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    groups = [("class", n_classes)]

    t0, loss_v = time.perf_counter(), float("nan")
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        model.train()
        pick = train_idx[torch.randint(0, len(train_idx), (batch,), generator=gen)]
        x = crop_and_mask(feats[pick.to(dev)], crop_mels, crop_frames, gen, train=True)
        y = targets[pick].to(dev)
        logits = model(x)
        # One group of n_classes: the single-group case of vcfast's per-group softmax CE.
        loss = vcfast.masked_multigroup_softmax_ce(logits, F.one_hot(y, n_classes).float(),
                                                   [n_classes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if step % every == 0 or step == steps:
            acc = vcfast.multigroup_accuracy(logits.detach(), y[:, None], groups)
            print(f"step {step:5d}  loss {loss_v:.4f}  train acc {acc['class']['accuracy']:.2f}")

    val_acc = float("nan")
    if len(val_idx):
        model.eval()
        with torch.no_grad():
            x = crop_and_mask(feats[val_idx.to(dev)], crop_mels, crop_frames, gen, train=False)
            val_acc = vcfast.multigroup_accuracy(model(x), targets[val_idx, None].to(dev),
                                                 groups)["class"]["accuracy"]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "mean": mu.item(), "std": sd.item()},
                   Path(args.out) / "esc50_classifier.pt")
    print(f"done: {steps} steps in {time.perf_counter() - t0:.1f} s, final loss {loss_v:.4f}, "
          f"held-out accuracy {val_acc:.2f} ({len(val_idx)} clips); log-mel: {mel_path}")
    return 0 if math.isfinite(loss_v) else 1


if __name__ == "__main__":
    raise SystemExit(main())
