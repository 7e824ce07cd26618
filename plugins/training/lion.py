"""Lion (EvoLved Sign Momentum, Chen et al. 2023), written for llmforge.

The update is the sign of an interpolation between the gradient and a momentum buffer, so every
parameter moves by exactly +-lr per step (plus decoupled weight decay). It keeps one state tensor per
parameter (AdamW keeps two), which is why it is attractive on small machines. Typical settings: a
learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.
"""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                # The step direction uses beta1; the stored momentum uses beta2 (the two differ on purpose).
                direction = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.add_(direction, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
