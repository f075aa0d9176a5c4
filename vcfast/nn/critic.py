"""Critics the lean gradient penalty can differentiate exactly."""

from __future__ import annotations

import torch
from torch import nn

from vcfast.ops.gradient_penalty import gradient_penalty


class PiecewiseLinearCritic(nn.Module):
    """A critic ``D(x) = head(trunk(x))`` that declares its layers for the lean penalty.

    ``trunk`` and ``head`` are ``nn.Sequential``s of Conv2d / ConvTranspose2d / Linear /
    LeakyReLU / ReLU / Flatten. Extra heads (StarGAN's domain classifier) can hang off
    ``features()``; the penalty only sees ``trunk`` + ``head``, which is what
    ``gradient_penalty_layers()`` returns. Any module defining that method works the same way.
    """

    def __init__(self, trunk: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def gradient_penalty_layers(self) -> list[nn.Module]:
        head = list(self.head) if isinstance(self.head, nn.Sequential) else [self.head]
        return [*self.trunk, *head]


class GradientPenalty(nn.Module):
    """The WGAN-GP penalty as a module, with StyleGAN2-style lazy regularisation.

    With ``interval=k`` the penalty is computed on every k-th call only and multiplied by k
    (so its average strength is unchanged); the other calls return a zero that costs nothing.
    The call counter is part of ``state_dict`` so a resumed run keeps the same schedule.
    """

    def __init__(
        self, weight: float = 10.0, target: float = 1.0, mode: str = "lean", interval: int = 1
    ):
        super().__init__()
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"GradientPenalty: interval must be an int >= 1, got {interval!r}")
        self.weight, self.target, self.mode, self.interval = weight, target, mode, interval
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(
        self,
        critic: nn.Module,
        x_real: torch.Tensor,
        x_fake: torch.Tensor,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.interval == 1:  # every call: no host read, so it compiles with fullgraph=True
            self.calls += 1
            return gradient_penalty(
                critic,
                x_real,
                x_fake,
                weight=self.weight,
                target=self.target,
                eps=eps,
                mode=self.mode,
            )
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "GradientPenalty(interval>1) decides on the host whether the penalty is due on "
                "this call, which a torch.compile(fullgraph=True) graph cannot do; call it "
                "outside the compiled region, or use interval=1 there"
            )
        due = int(self.calls) % self.interval == 0
        self.calls += 1
        if not due:
            return x_real.new_zeros(())
        return gradient_penalty(
            critic,
            x_real,
            x_fake,
            weight=self.weight * self.interval,
            target=self.target,
            eps=eps,
            mode=self.mode,
        )

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, target={self.target}, mode={self.mode!r}, "
                f"interval={self.interval}")
