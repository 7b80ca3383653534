"""Deterministic training of the shipped demo weights (``ttaserve train-demo``).

``expert`` — the demo model — is trained from scratch on clean Fashion-MNIST.
``generalist``, its twin for T3, is the expert fine-tuned with augmentations (random shifts,
flips, noise, contrast and brightness changes): more robust, slightly less accurate on
clean data. Fine-tuning from the expert keeps both in one loss basin, so their weights can
be interpolated, which T3 relies on (two independently trained networks cannot be: a 50/50
average of such a pair had 34 % clean error). Same seed, same thread count -> same weights.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ttaserve.data import load_split
from ttaserve.models.resnet import DemoResNet

log = logging.getLogger(__name__)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving perturbations for the generalist twin (applied per sample)."""
    b = x.shape[0]
    shifts = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    contrast = 0.3 + 0.9 * torch.rand(b, 1, 1, 1, generator=gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + 0.3 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.15 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (x + noise).clamp(0.0, 1.0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 error in percent, eval mode (source statistics)."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            wrong += int((model(x[i : i + batch]).argmax(1) != y[i : i + batch]).sum())
    return 100.0 * wrong / len(x)


def train(
    kind: str = "expert",
    epochs: int = 4,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 0.1,
    data: str | None = None,
    init: str | None = None,
) -> tuple[DemoResNet, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_split("train", data)
    x_test, y_test = load_split("test", data)
    model = DemoResNet()
    if init is not None:
        from ttaserve.models import load_state

        load_state(model, init)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        start = time.perf_counter()
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if kind == "generalist":
                xb = augment(xb, gen)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        err = evaluate(model, x_test, y_test)
        log.info("%s epoch %d: test error %.2f %% (%.0f s)", kind, epoch + 1, err, time.perf_counter() - start)
    model.eval()
    return model, evaluate(model, x_test, y_test)


def save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
