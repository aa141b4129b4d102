"""Flow-matching Euler scheduler with timestep shift (rectified flow, SD3/SANA convention).

Convention: ``x_sigma = (1 - sigma) * x0 + sigma * eps``; the model predicts the velocity ``v = eps - x0``; sampling
integrates from sigma = 1 (noise) to sigma = 0 (data) with Euler steps ``x <- x + (sigma_next - sigma) * v``.

Sigma grid: ``T + 1`` values ``s_k = 1 - k / T`` (k = 0..T), shifted by
``sigma_k = shift * s_k / (1 + (shift - 1) * s_k)``, so ``sigma_0 = 1`` and ``sigma_T = 0`` exactly. (diffusers'
``FlowMatchEulerDiscreteScheduler``, used by the paper's code with shift 3, spaces its grid down to 1/1000 before
appending the final 0; the difference is one tiny last step.) The DiT receives ``timestep = 1000 * sigma``, the
scale SANA was trained with. The same :meth:`sigmas` list is what the RL side turns into an SDE (Flow-GRPO).

Training draws ``sigma = sigmoid(N(0, 1))`` (logit-normal) WITHOUT the shift: the paper's code samples
``u = sigmoid(randn)`` and uses ``sigma = u`` directly (its ``get_sigmas`` is ``timesteps / 1000`` with
``timesteps = u * 1000``); the shift only shapes the sampling grid.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``; maps [0, 1] onto [0, 1] monotonically, identity at shift 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


class FlowMatchEulerScheduler:
    def __init__(self, shift: float = 3.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)

    def sigmas(self, steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``steps + 1`` shifted sigmas from 1 down to 0 (float32)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # (T+1,)
        return shift_sigma(s, self.shift).to(device=device, dtype=torch.float32)

    @staticmethod
    def timestep(sigma: torch.Tensor) -> torch.Tensor:
        """DiT timestep for a noise level: ``1000 * sigma``."""
        return sigma * NUM_TRAIN_TIMESTEPS

    @staticmethod
    def step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor) -> torch.Tensor:
        """One Euler step of the probability-flow ODE: ``x + (sigma_next - sigma) * v``."""
        return latents + (sigma_next - sigma) * velocity

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) * x0 + sigma * noise`` with ``sigma`` of shape (B,) broadcast over the latent dims."""
        s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1.0 - s) * x0 + s * noise
