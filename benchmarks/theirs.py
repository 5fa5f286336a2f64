"""Their side: the same sampler, log-prob and PRDP update written in plain PyTorch, on diffusers'
`UNet2DConditionModel` with our weights (converted with `params_to_state_dict`), NCHW.

It is what a careful PyTorch trainer (ddpo-pytorch's structure) does: the sampler loops over
steps with CFG in one batched UNet call per step; the update scores the minibatch's transitions
without grad, takes the PRDP loss's gradient with respect to those log-probs, then
backpropagates the weighted log-likelihood tile by tile (the same tiles as ours) into the
parameters' .grad, clips the global norm and steps AdamW. `torch.compile` wraps the UNet.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from benchmarks.cases import Case
from prdp_jax.core import diffusion
from prdp_jax.models.convert import params_to_state_dict


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_unet(case: Case, params) -> torch.nn.Module:
    """diffusers' UNet of `case` holding our Flax params."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**case.diffusers_config())
    state = {k: torch.from_numpy(np.array(v))
             for k, v in params_to_state_dict(params).items()}
    unet.load_state_dict(state, strict=True)
    return unet.eval()


class Policy:
    """The DDIM(eta) Gaussian policy of `coeffs` around a torch UNet, with CFG, on `device`;
    with `autocast` (a dtype) the UNet runs under torch.autocast and the log-probs in float32."""

    def __init__(self, unet, coeffs: diffusion.StepCoefficients, guidance: float,
                 uncond: torch.Tensor, device: str = "cpu", autocast=None):
        self.device, self.autocast = torch.device(device), autocast
        self.unet, self.guidance, self.uncond = unet, guidance, uncond.to(self.device)
        on = lambda v, dtype=None: torch.as_tensor(np.asarray(v), dtype=dtype).to(self.device)
        self.t = on(coeffs.t, torch.long)
        self.c_x, self.c_out, self.sigma = on(coeffs.c_x), on(coeffs.c_out), on(coeffs.sigma)

    def guided(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        uncond = self.uncond.expand(b, -1, -1)
        with torch.autocast(self.device.type, dtype=self.autocast,
                            enabled=self.autocast is not None):
            out = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([uncond, context])).sample
        out = out.float()
        return out[:b] + self.guidance * (out[b:] - out[:b])

    def log_prob(self, x_t, x_prev, k: torch.Tensor, context) -> torch.Tensor:
        """Mean over elements of log N(x_prev; mean, sigma^2) for transitions at step indices k."""
        out = self.guided(x_t, self.t[k], context)
        view = lambda v: v[k].view(-1, 1, 1, 1)
        mean = view(self.c_x) * x_t + view(self.c_out) * out
        sigma = view(self.sigma)
        log_density = (-(x_prev - mean) ** 2 / (2 * sigma ** 2) - torch.log(sigma)
                       - 0.5 * math.log(2 * math.pi))
        return log_density.mean(dim=(1, 2, 3))

    @torch.no_grad()
    def sample(self, context: torch.Tensor, generator: torch.Generator, shape: tuple):
        """-> (latents [B, T+1, C, H, W], log_probs [B, T])."""
        b = context.shape[0]
        x = torch.randn((b,) + shape, generator=generator, device=self.device)
        chain, log_probs = [x], []
        for k in range(len(self.t)):
            out = self.guided(x, self.t[k].expand(b), context)
            mean = self.c_x[k] * x + self.c_out[k] * out
            x_prev = mean + self.sigma[k] * torch.randn(mean.shape, generator=generator,
                                                        device=self.device)
            log_probs.append((-(x_prev - mean) ** 2 / (2 * self.sigma[k] ** 2)
                              - torch.log(self.sigma[k]) - 0.5 * math.log(2 * math.pi)
                              ).mean(dim=(1, 2, 3)))
            chain.append(x_prev)
            x = x_prev
        return torch.stack(chain, 1), torch.stack(log_probs, 1)


def rdp_loss(log_probs, old, ref, rewards, images: int, beta: float, eps: float):
    """The PRDP loss (mean over steps), as `prdp_jax.core.rdp.rdp_loss` defines it."""
    ratio, ratio_old = log_probs - ref, old - ref
    clipped = torch.maximum(torch.minimum(ratio, ratio_old + eps), ratio_old - eps)
    groups = lambda v: v.view(-1, images)
    pair = lambda v: v[:, :, None] - v[:, None, :]
    r = groups(rewards)
    target = pair(r) / beta
    err = (pair(groups(ratio.mean(-1))) - target) ** 2
    err_clipped = (pair(groups(clipped.mean(-1))) - target) ** 2
    valid = pair(r) > 0
    return torch.where(valid, torch.maximum(err, err_clipped), 0.0).sum() / valid.sum().clamp(min=1)


class Update:
    """One optimiser step on a minibatch of stored trajectories, tiled like ours: "tiled" scores
    every transition without a graph, then backpropagates tile by tile; "one_pass" runs every
    tile's forward with its graph kept and backpropagates the loss once."""

    def __init__(self, policy: Policy, latents, context, rewards, images: int, tile: tuple,
                 beta: float = 1e-3, eps: float = 1e-2, lr: float = 1e-5, gradient: str = "tiled"):
        on = lambda v: v.to(policy.device)
        self.policy, self.latents, self.context, self.rewards = (policy, on(latents), on(context),
                                                                 on(rewards))
        self.images, self.tile, self.beta, self.eps = images, tile, beta, eps
        self.one_pass = gradient == "one_pass"
        n, T1 = latents.shape[:2]
        self.n, self.T = n, T1 - 1
        self.params = [p for p in policy.unet.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-4, eps=1e-8)
        with torch.no_grad():
            self.old = self.score()
        self.ref = self.old.clone()

    def tiles(self):
        a, s = self.tile
        for j in range(0, self.n, a):
            for c in range(0, self.T, s):
                yield slice(j, j + a), torch.arange(c, min(c + s, self.T),
                                                    device=self.policy.device)

    def tile_log_probs(self, rows: slice, steps: torch.Tensor) -> torch.Tensor:
        """[a, s] log-probs of one tile's transitions, batched as a * s."""
        chain = self.latents[rows]
        a, s = chain.shape[0], steps.numel()
        flat = lambda v: v.reshape((a * s,) + v.shape[2:])
        x_t, x_prev = flat(chain[:, steps]), flat(chain[:, steps + 1])
        context = flat(self.context[rows, None].expand(-1, s, -1, -1))
        k = steps.repeat(a)
        return self.policy.log_prob(x_t, x_prev, k, context).view(a, s)

    def score(self) -> torch.Tensor:
        out = torch.empty(self.n, self.T, device=self.policy.device)
        for rows, steps in self.tiles():
            out[rows, steps] = self.tile_log_probs(rows, steps)  # autograd follows the copy
        return out

    def gradient(self) -> torch.Tensor:
        """Leaves dL/dtheta in the parameters' .grad; returns the loss."""
        if self.one_pass:
            self.opt.zero_grad(set_to_none=True)
            loss = rdp_loss(self.score(), self.old, self.ref, self.rewards, self.images,
                            self.beta, self.eps)
            loss.backward()
            return loss.detach()
        with torch.no_grad():
            log_probs = self.score()
        log_probs.requires_grad_(True)
        loss = rdp_loss(log_probs, self.old, self.ref, self.rewards, self.images, self.beta,
                        self.eps)
        (weights,) = torch.autograd.grad(loss, log_probs)
        self.opt.zero_grad(set_to_none=True)
        for rows, steps in self.tiles():
            (weights[rows][:, steps] * self.tile_log_probs(rows, steps)).sum().backward()
        return loss.detach()

    def step(self) -> float:
        """One optimiser step; returns the gradient's global norm before clipping."""
        self.gradient()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return float(norm)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """[..., H, W, C] numpy -> [..., C, H, W] torch."""
    x = torch.from_numpy(np.array(x))
    return x.movedim(-1, -3).contiguous()
