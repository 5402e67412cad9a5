"""Weight transforms T of the paper: how a safety-attribute logit becomes a fine-tuning weight."""

from __future__ import annotations

import torch


def softmax_weights(z: torch.Tensor) -> torch.Tensor:
    """N * softmax over the set (last dim): weights sum to N, so a sample only gains what another loses."""
    return z.shape[-1] * torch.softmax(z, dim=-1)


def sigmoid_weights(z: torch.Tensor) -> torch.Tensor:
    """Independent weights in (0, 1): a set with no harmful rows can keep every row."""
    return torch.sigmoid(z)


def identity_weights(z: torch.Tensor) -> torch.Tensor:
    return z


TRANSFORMS = {"softmax": softmax_weights, "sigmoid": sigmoid_weights, "identity": identity_weights}


def get_transform(name: str):
    if name not in TRANSFORMS:
        raise ValueError(f"unknown weight transform '{name}'; expected one of {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name]


@torch.no_grad()
def posterior_weights(mu: torch.Tensor, sigma: torch.Tensor, transform: str, n_samples: int = 256,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of T(z) for z ~ N(mu, sigma^2), normalised to mean weight 1.

    `mu` and `sigma` of shape (members, N) describe an equal mixture (an ensemble); the moments are the
    mixture's. Monte Carlo with a fixed seed, so scoring the same rows twice gives the same numbers.
    Computed in float64 on the CPU (returned there): in float32 a sigmoid saturates to exactly 1 above a
    logit of about 17, which the scoring shift reaches for most rows of a set, and the rows it saturates tie,
    harmful and benign alike (AUROC 0.953 instead of 0.969 on one validation fold). Float64 keeps their order
    up to a logit of about 36.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n_samples, *mu.shape), generator=generator).double()
    mu, sigma = mu.detach().to("cpu", torch.float64), sigma.detach().to("cpu", torch.float64)
    weights = get_transform(transform)(mu + sigma * noise).reshape(-1, mu.shape[-1])
    mean, std = weights.mean(0), weights.std(0)
    scale = mean.mean().clamp(min=1e-12)
    return mean / scale, std / scale
