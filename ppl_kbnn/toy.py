"""Small, fully reproducible problems used by the tests, examples and validation.

Everything is made in-process: no data or weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["pretrained_mlp", "regression_stream", "shifted_sine", "sine", "teacher_student_transformer"]


def sine(x: torch.Tensor) -> torch.Tensor:
    """The pre-training function ``f0(x) = sin(x)``."""
    return torch.sin(x)


def shifted_sine(x: torch.Tensor) -> torch.Tensor:
    """The shifted function ``f1(x) = sin(x) + 0.3 x`` the pre-trained network must adapt to."""
    return torch.sin(x) + 0.3 * x


def pretrained_mlp(
    width: int = 16,
    f: Callable[[torch.Tensor], torch.Tensor] = sine,
    *,
    steps: int = 3000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """``Linear(1, width) → ReLU → Linear(width, 1)`` fit to ``f`` on 200 points of ``[-3, 3]`` (Adam, full batch)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, 1)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():  # default init, drawn from our generator for reproducibility
            bound = 1.0 / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 1.0
            p.uniform_(-bound, bound, generator=gen)
    x = torch.linspace(-3, 3, 200, dtype=dtype)[:, None]
    y = f(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return net.requires_grad_(False)


def regression_stream(
    n: int,
    f: Callable[[torch.Tensor], torch.Tensor] = shifted_sine,
    *,
    noise: float = 0.1,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``x ~ U[-3, 3]``, ``y = f(x) + N(0, noise²)``, shapes ``(n, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    x = 6 * torch.rand(n, 1, generator=gen, dtype=dtype) - 3
    return x, f(x) + noise * torch.randn(n, 1, generator=gen, dtype=dtype)


def teacher_student_transformer(
    n_train: int = 40,
    n_test: int = 20,
    *,
    T: int = 6,
    d_model: int = 8,
    n_layer: int = 1,
    n_head: int = 1,
    shift: float = 0.05,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
):
    """A tiny sequence-regression problem: a "student" transformer (the pre-trained network whose
    weights centre the prior) and a "teacher" (the student with every parameter shifted by
    ``shift · N(0, 1)``) that generates the data.

    Inputs ``x`` ``(n, T, 2)`` are standard normal; targets are the teacher's output at the last token
    plus ``N(0, noise²)``, ``(n, 1)``.

    Returns:
        ``(student, teacher, x_train, y_train, x_test, y_test)``.
    """
    import copy

    from .nn import Transformer, TransformerConfig

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation
    cfg = TransformerConfig(d_in=2, d_out=1, d_model=d_model, n_layer=n_layer, n_head=n_head, max_len=T)
    student = Transformer(cfg).to(dtype).requires_grad_(False)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(shift * torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(n_train + n_test, T, 2, generator=gen, dtype=dtype)
    with torch.no_grad():
        y = teacher(x)[:, -1] + noise * torch.randn(n_train + n_test, 1, generator=gen, dtype=dtype)
    return student, teacher, x[:n_train], y[:n_train], x[n_train:], y[n_train:]
