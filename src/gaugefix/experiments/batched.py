"""Gauge operations on ``R`` stacked copies of one architecture.

A *stack* maps each parameter name to a tensor ``[R, *shape]``: run ``r`` of a sweep is slice
``r``. Every operation here is the batched form of the library's single-model one (the same
index maps, one extra leading dim), so a whole grid of runs is trained as one computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gaugefix.fixing import _RESOLUTION
from gaugefix.moment import reduce_to
from gaugefix.structure import GaugeStructure

Stack = dict[str, Tensor]


class BatchedGauge:
    """Imbalance, gauge action, soft and hard gauge fixing for stacks of parameters."""

    def __init__(self, structure: GaugeStructure, device: torch.device) -> None:
        self.structure = structure
        self.n = structure.num_neurons
        self.maps = [(m.name, m.rows, m.cols) for m in structure.device_maps(torch.device(device))]

    # -- the moment map -----------------------------------------------------------------------
    def _scatter(self, acc: Tensor, slots: Tensor, values: Tensor, sign: float = 1.0) -> None:
        v = reduce_to(values, (values.shape[0], *slots.shape)).reshape(values.shape[0], -1)
        acc.index_add_(1, slots.reshape(-1), v if sign == 1.0 else -v)

    def sums(self, stack: Stack, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(S_in, S_out)``, each ``[R, N]``, accumulated in ``dtype``."""
        first = next(iter(stack.values()))
        s_in = torch.zeros(first.shape[0], self.n + 1, dtype=dtype, device=first.device)
        s_out = torch.zeros_like(s_in)
        for name, rows, cols in self.maps:
            sq = stack[name].detach().to(dtype).square()
            if rows is not None:
                self._scatter(s_in, rows, sq)
            if cols is not None:
                self._scatter(s_out, cols, sq)
        return s_in[:, : self.n], s_out[:, : self.n]

    def stats(self, stack: Stack) -> tuple[Tensor, Tensor]:
        """Per run: the RMS over neurons of ``0.5 log(S_in / S_out)`` and ``max |mu| / S``."""
        s_in, s_out = self.sums(stack)
        log_ratio = 0.5 * torch.log(s_in / s_out)
        rel = (s_in - s_out).abs() / (s_in + s_out)
        return log_ratio.square().mean(1).sqrt(), rel.amax(1)

    # -- the action ---------------------------------------------------------------------------
    def _gathered(self, h: Tensor, idx: Tensor | None) -> Tensor | None:
        if idx is None:
            return None
        hx = torch.cat([h, h.new_zeros(h.shape[0], 1)], 1)
        return hx[:, idx]

    @torch.no_grad()
    def transform_(self, stack: Stack, h: Tensor, states: list[tuple[Stack, int]]) -> None:
        """Apply ``g(h[r])`` to run ``r`` in place (``h``: ``[R, N]``) and transport each
        optimizer buffer stack ``(buffers, power)``: a buffer scales by ``factor**power``
        (``-1`` for gradient-like buffers, ``-2`` for squared ones)."""
        for name, rows, cols in self.maps:
            p = stack[name]
            row, col = self._gathered(h, rows), self._gathered(h, cols)
            for t, power in [(p, 1)] + [(b[name], k) for b, k in states if name in b]:
                if row is not None:
                    t.mul_(torch.exp(power * row).to(t.dtype))
                if col is not None:
                    t.mul_(torch.exp(-power * col).to(t.dtype))

    # -- soft gauge fixing ----------------------------------------------------------------------
    def penalty_grad(self, stack: Stack, strength: Tensor) -> Stack:
        """The gradient of ``P = (strength/4) sum_n mu_n^2`` per run: for each entry,
        ``strength (mu_row - mu_col) theta``. ``strength``: ``[R]``."""
        s_in, s_out = self.sums(stack, torch.float64)
        mu = (s_in - s_out) * strength[:, None].to(torch.float64)
        out = {}
        for name, rows, cols in self.maps:
            coef = _difference(self._gathered(mu, rows), self._gathered(mu, cols))
            p = stack[name].detach()
            out[name] = coef.to(p.dtype) * p
        return out

    @torch.no_grad()
    def relax_log_alpha(self, stack: Stack, rate: Tensor) -> Tensor:
        """The bounded exact orbit step of :func:`gaugefix.relax_` for every run (``rate``:
        ``[R]``): ``h = -rate mu``, each neuron clamped between 0 and its local balance
        ``(1/4) log(S_out / S_in)``; a run whose step would raise ``||mu||`` or ``F`` halves
        its rate and tries again (64 times at most, then it does not move)."""
        masses = _Masses(self, stack)
        zero = torch.zeros(masses.r, self.n, dtype=torch.float64, device=masses.device)
        u = masses.weighted(zero)
        s_in, s_out = masses.sums(u)
        active = (s_in > 0) & (s_out > 0)
        mu = torch.where(active, s_in - s_out, 0.0)
        local = torch.where(active, 0.25 * torch.log(s_out / s_in), 0.0)
        low, high = local.clamp(max=0.0), local.clamp(min=0.0)
        mu_norm, f0 = torch.linalg.vector_norm(mu, dim=1), masses.total(u)
        scale = rate.to(torch.float64).clone()
        done = (mu_norm == 0) | (scale == 0) | ~torch.isfinite(f0)
        h = zero.clone()
        for _ in range(64):
            trial = torch.minimum(torch.maximum(-scale[:, None] * mu, low), high)
            trial_u = masses.weighted(trial)
            t_in, t_out = masses.sums(trial_u)
            t_norm = torch.linalg.vector_norm(torch.where(active, t_in - t_out, 0.0), dim=1)
            ok = ~done & (t_norm <= mu_norm) & (masses.total(trial_u) <= f0)
            h = torch.where(ok[:, None], trial, h)
            done = done | ok
            if bool(done.all()):
                break
            scale = torch.where(done, scale, 0.5 * scale)
        return h

    # -- hard gauge fixing ----------------------------------------------------------------------
    @torch.no_grad()
    def balance_log_alpha(self, stack: Stack, tol: float = 1e-10, max_iter: int = 50) -> Tensor:
        """``h`` ``[R, N]`` that balances every run (``mu = 0``), by the same safeguarded
        Jacobi / Newton iteration as :func:`gaugefix.balance_`, batched over runs."""
        masses = _Masses(self, stack)
        r = masses.r
        h = torch.zeros(r, self.n, dtype=torch.float64, device=masses.device)
        u = masses.weighted(h)
        s_in, s_out = masses.sums(u)
        active = (s_in > 0) & (s_out > 0)
        for _ in range(max_iter):
            mu, s = s_in - s_out, s_in + s_out
            err = torch.where(active, mu.abs() / s, torch.zeros_like(s)).amax(1)
            if float(err.max()) <= tol:
                break
            log_ratio = torch.where(active, torch.log(s_in / s_out), torch.zeros_like(s))
            far = log_ratio.abs().amax(1) > 1.0
            newton = _batched_pcg(
                lambda v, u=u: masses.gram_matvec(u, v * active) * active,
                -0.5 * mu * active,
                torch.where(active, s, torch.ones_like(s)),
                rtol=torch.clamp(err, max=0.1),
            )
            direction = torch.where(far[:, None], -0.25 * log_ratio, newton)
            direction = direction * (err > tol)[:, None]
            h, u = masses.line_search(h, u, direction, mu)
            s_in, s_out = masses.sums(u)
        return h


def _difference(row: Tensor | None, col: Tensor | None) -> Tensor:
    if row is None:
        return -col
    return row if col is None else row - col


class _Masses:
    """Float64 pair masses of a stack: ``w [R, *pair_shape]`` per parameter."""

    def __init__(self, gauge: BatchedGauge, stack: Stack) -> None:
        first = next(iter(stack.values()))
        self.gauge = gauge
        self.r = first.shape[0]
        self.device = first.device
        self.terms = []
        for name, rows, cols in gauge.maps:
            t = stack[name]
            dummy = torch.full([1] * (t.dim() - 1), gauge.n, device=self.device)
            rows = dummy if rows is None else rows
            cols = dummy if cols is None else cols
            shape = (self.r, *torch.broadcast_shapes(rows.shape, cols.shape))
            self.terms.append((reduce_to(t.detach().to(torch.float64).square(), shape), rows, cols))

    def _ext(self, h: Tensor) -> Tensor:
        return torch.cat([h, h.new_zeros(self.r, 1)], 1)

    def weighted(self, h: Tensor) -> list[Tensor]:
        ex = torch.exp(2 * self._ext(h))
        inv = 1 / ex  # rows and columns factor separately: two small exps, no full-size one
        return [w * ex[:, r] * inv[:, c] for w, r, c in self.terms]

    def total(self, u: list[Tensor]) -> Tensor:
        return torch.stack([x.reshape(self.r, -1).sum(1) for x in u]).sum(0)

    def sums(self, u: list[Tensor]) -> tuple[Tensor, Tensor]:
        n = self.gauge.n
        s_in = torch.zeros(self.r, n + 1, dtype=torch.float64, device=self.device)
        s_out = torch.zeros_like(s_in)
        for x, (_, r, c) in zip(u, self.terms, strict=True):
            moving = x * (r != c)
            self.gauge._scatter(s_in, r, moving)
            self.gauge._scatter(s_out, c, moving)
        return s_in[:, :n], s_out[:, :n]

    def gram_matvec(self, u: list[Tensor], v: Tensor) -> Tensor:
        n = self.gauge.n
        vx = self._ext(v)
        out = torch.zeros(self.r, n + 1, dtype=torch.float64, device=self.device)
        for x, (_, r, c) in zip(u, self.terms, strict=True):
            t = x * (vx[:, r] - vx[:, c])
            self.gauge._scatter(out, r, t)
            self.gauge._scatter(out, c, t, -1.0)
        return out[:, :n]

    def line_search(
        self, h: Tensor, u: list[Tensor], d: Tensor, mu: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-run backtracking (Armijo) on ``F(h + t d)`` from ``t = 1``. As in
        :func:`gaugefix.balance_`, a step whose predicted decrease of ``F`` is below the rounding
        of ``F`` is accepted when it reduces ``||mu||`` instead."""
        f0 = self.total(u)
        slope = 2 * (mu * d).sum(1)
        mu_norm = torch.linalg.vector_norm(mu, dim=1)
        t = torch.ones(self.r, dtype=torch.float64, device=self.device)
        done = ~torch.isfinite(f0) | (slope == 0)  # overflowed or nothing to do: do not move
        t = torch.where(done, torch.zeros_like(t), t)
        for _ in range(60):
            trial = h + t[:, None] * d
            trial_u = self.weighted(trial)
            ok = self.total(trial_u) <= f0 + 1e-4 * t * slope
            unresolved = -t * slope <= _RESOLUTION * f0
            if bool((~done & ~ok & unresolved).any()):
                s_in, s_out = self.sums(trial_u)
                ok = ok | (unresolved & (torch.linalg.vector_norm(s_in - s_out, dim=1) < mu_norm))
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        t = torch.where(done, t, torch.zeros_like(t))
        h = h + t[:, None] * d
        return h, self.weighted(h)


def _batched_pcg(
    matvec: Callable[[Tensor], Tensor], b: Tensor, diag: Tensor, rtol: Tensor
) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for ``A_r x_r = b_r``, all runs at once; a run
    stops updating once its residual is below ``rtol_r ||b_r||``."""
    x = torch.zeros_like(b)
    res = b.clone()
    z = res / diag
    p = z.clone()
    rz = (res * z).sum(1)
    stop = rtol * torch.linalg.vector_norm(b, dim=1)
    for _ in range(max(50, 4 * int(b.shape[1] ** 0.5))):
        live = torch.linalg.vector_norm(res, dim=1) > stop
        if not bool(live.any()):
            break
        ap = matvec(p)
        curvature = (p * ap).sum(1)
        live = live & (curvature > 0)
        alpha = torch.where(live, rz / torch.where(live, curvature, 1.0), 0.0)
        x = x + alpha[:, None] * p
        res = res - alpha[:, None] * ap
        z = res / diag
        rz_new = (res * z).sum(1)
        beta = torch.where(live, rz_new / torch.where(rz == 0, 1.0, rz), 0.0)
        p = z + beta[:, None] * p
        rz = torch.where(live, rz_new, rz)
    return x
