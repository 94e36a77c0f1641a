"""The imbalance (moment map) ``mu`` and the pair masses behind the Gram matrix ``K``.

For a gauge neuron ``n``, ``mu_n = sum_{in(n)} theta^2 - sum_{out(n)} theta^2``. Everything here is
a few vectorised operations per parameter over the index maps of a :class:`GaugeStructure`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gaugefix.structure import GaugeStructure
from gaugefix.structure.gauge_structure import DeviceMap


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_to(values: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Sum ``values`` over the dims where ``shape`` has size 1 (keeping them), giving ``shape``."""
    dims = [d for d, s in enumerate(shape) if s == 1 and values.shape[d] > 1]
    if not dims:
        return values
    if dims[0] == 0 and len(dims) > 1 and values.is_contiguous():
        # Several reduced dims with a leading one (a conv weight onto its input channels):
        # one contiguous column reduction over the leading run first, then the rest on the
        # smaller result. A multi-dim sum over strided dims is several times slower.
        lead = 1
        while lead < len(dims) and dims[lead] == lead:
            lead += 1
        out_shape = [1 if d in dims else n for d, n in enumerate(values.shape)]
        rest = values.view(-1, *values.shape[lead:]).sum(0)
        later = [d - lead for d in dims[lead:]]
        if later:
            rest = rest.sum(later)
        return rest.view(out_shape)
    return values.sum(dims, keepdim=True)


def scatter_slots(acc: Tensor, slots: Tensor, values: Tensor, sign: float = 1.0) -> None:
    """``acc[slots[i]] += sign * values[i]`` with ``values`` reduced onto the shape of ``slots``."""
    v = reduce_to(values, slots.shape).reshape(-1)
    acc.index_add_(0, slots.reshape(-1), v if sign == 1.0 else -v)


def in_out_sums(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> tuple[Tensor, Tensor]:
    """``(S_in, S_out)``, each ``[num_neurons]``: the squared norms of every neuron's incoming
    entries (rows) and outgoing entries (columns) in ``source`` (a model, or name -> tensor)."""
    tensors = structure.bind(source)
    n = structure.num_neurons
    first = next(iter(tensors.values()), None)
    dtype = accumulation_dtype(first.dtype) if first is not None else torch.float64
    s_in, s_out, _ = slot_sums(tensors, structure, dtype)
    return s_in[:n], s_out[:n]


def slot_sums(
    tensors: Mapping[str, Tensor], structure: GaugeStructure, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``(S_in, S_out, ||theta||^2)`` of bound ``tensors`` accumulated in ``dtype``, the sums
    with the dummy slot ``num_neurons`` kept (``[num_neurons + 1]``): every entry lands in a
    slot, so all three are finite exactly when every entry is (barring overflow)."""
    n = structure.num_neurons
    first = next(iter(tensors.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    s_in = torch.zeros(n + 1, dtype=dtype, device=device)
    s_out = torch.zeros(n + 1, dtype=dtype, device=device)
    totals = []
    for m in structure.device_maps(device):
        t = tensors[m.name]
        sides = [(a, slots) for a, slots in ((s_in, m.rows), (s_out, m.cols)) if slots is not None]
        pair = tuple(map(max, zip(*(slots.shape for _, slots in sides), strict=True)))
        # Squares summed over the trailing dims no map depends on (a conv's kernel taps) in
        # one fused pass where possible, then onto each side's slots.
        sq = _trailing_sum_of_squares(t, pair, dtype)
        blocks = leading_chunks(t, m.rows, m.cols) if sq is None else None
        if blocks is not None:
            reduced = _chunked_sums_of_squares(t, blocks, [slots for _, slots in sides], dtype)
        else:
            if sq is None:
                sq = t.to(dtype).square()
            reduced = [reduce_to(sq, slots.shape).reshape(-1) for _, slots in sides]
        for (acc, slots), v in zip(sides, reduced, strict=True):
            acc.index_add_(0, slots.reshape(-1), v)
        totals.append(reduced[0].sum())  # every entry has a row or a column slot
    total = torch.stack(totals).sum() if totals else torch.zeros((), dtype=dtype, device=device)
    return s_in, s_out, total


CHUNK = 1 << 18  # entries per block of a large tensor (1 MiB of float32: stays in cache)


def leading_chunks(t: Tensor, rows: Tensor | None, cols: Tensor | None) -> list[slice] | None:
    """Blocks of ``CHUNK`` entries along dim 0 of a large tensor whose row map (if any) varies
    only along dim 0 and whose column map (if any) does not: per block, every pass over the
    entries then reads them from cache instead of memory. ``None`` for a small tensor, another
    layout, or when a gradient is recorded."""
    if t.numel() < 2 * CHUNK or t.dim() < 2 or torch.is_grad_enabled() and t.requires_grad:
        return None
    if rows is not None and any(k > 1 for k in rows.shape[1:]):
        return None
    if cols is not None and cols.shape[0] > 1:
        return None
    step = max(1, CHUNK // (t.numel() // t.shape[0]))
    return [slice(i, i + step) for i in range(0, t.shape[0], step)]


_scratch = threading.local()  # per thread: {(device, dtype): buffer of CHUNK entries}


def _block_square(block: Tensor, dtype: torch.dtype) -> Tensor:
    """``block.to(dtype).square()`` written into a reused per-thread buffer when the dtypes
    agree: a fresh allocation per block would be returned to the system and faulted back in
    page by page at every call, which costs more than the squaring."""
    if block.dtype != dtype or block.numel() > CHUNK:
        return block.to(dtype).square()
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (block.device, dtype)
    if key not in buffers or buffers[key].numel() < block.numel():
        buffers[key] = torch.empty(CHUNK, dtype=dtype, device=block.device)
    out = buffers[key][: block.numel()].view(block.shape)
    return torch.mul(block, block, out=out)


def _chunked_sums_of_squares(
    t: Tensor, blocks: list[slice], sides: list[Tensor], dtype: torch.dtype
) -> list[Tensor]:
    """``reduce_to(t.square(), slots.shape).reshape(-1)`` for the ``slots`` of each side, one
    block of :func:`leading_chunks` at a time: a single read of ``t``, the squares of one block
    staying in cache."""
    out: list[list[Tensor] | Tensor] = []
    for slots in sides:
        if slots.shape[0] > 1:
            out.append([])
        else:
            out.append(torch.zeros(slots.shape, dtype=dtype, device=t.device))
    for block in blocks:
        sq = _block_square(t[block], dtype)
        for k, slots in enumerate(sides):
            if slots.shape[0] > 1:  # varies along dim 0: this block's own slots
                out[k].append(reduce_to(sq, (sq.shape[0], *slots.shape[1:])))
            else:
                out[k] += reduce_to(sq, slots.shape)
    return [(torch.cat(v) if isinstance(v, list) else v).reshape(-1) for v in out]


def _trailing_sum_of_squares(
    t: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> Tensor | None:
    """``t.square()`` in ``dtype`` summed over the trailing dims where ``shape`` (the broadcast
    shape of a parameter's maps) has size 1 (kept with size 1), in one pass without a squared
    temporary (a norm); ``None`` when those dims hold fewer than 64 entries (a norm over a short
    dim is slower than squaring and summing), or a gradient is recorded (a norm's backward is
    undefined at 0), or ``t`` is not contiguous."""
    if torch.is_grad_enabled() and t.requires_grad or not t.is_contiguous():
        return None
    shape = tuple(shape) if len(shape) == t.dim() else (1,) * (t.dim() - len(shape)) + tuple(shape)
    lead = t.dim()
    while lead > 0 and shape[lead - 1] == 1:
        lead -= 1
    if t.shape[lead:].numel() < 64:  # a norm over a short trailing dim is slower than sums
        return None
    norms = torch.linalg.vector_norm(t.reshape(*t.shape[:lead], -1), dim=-1, dtype=dtype)
    return norms.square_().view(*t.shape[:lead], *[1] * (t.dim() - lead))


def imbalance(source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure) -> Tensor:
    """The imbalance ``mu``, shape ``[num_neurons]``: ``mu_n = sum_in theta^2 - sum_out theta^2``.

    ``source`` is a model or a mapping from parameter names to tensors (so ``imbalance(grads, s)``
    is ``mu(g)``). Accumulated in float64 for float64 tensors and in float32 otherwise.
    Differentiable when the tensors require grad.
    """
    s_in, s_out = in_out_sums(source, structure)
    return s_in - s_out


class PairMasses:
    """Squared parameter mass per (row neuron, column neuron) pair, in float64.

    For each parameter, ``w[e] = sum theta^2`` over the entries that share one row slot and one
    column slot (a conv kernel's spatial taps collapse into one pair). Under the gauge ``h`` the
    mass becomes ``w exp(2 (h_r - h_c))``; from these masses come the objective
    ``F(h) = ||g(h) theta||^2``, the imbalance ``mu(g(h) theta)`` and products with the Gram matrix
    ``K(g(h) theta) = sum_e w_e (e_r - e_c)(e_r - e_c)^T`` (a missing side dropped), without
    touching the parameters again.
    """

    def __init__(self, tensors: Mapping[str, Tensor], structure: GaugeStructure) -> None:
        first = next(iter(tensors.values()))
        self.n = structure.num_neurons
        self.device = first.device
        self.terms: list[tuple[Tensor, Tensor, Tensor]] = []
        for m in structure.device_maps(self.device):
            self.terms.append(self._term(m, tensors[m.name]))

    def _term(self, m: DeviceMap, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dummy = torch.full([1] * t.dim(), self.n, device=self.device)
        rows = dummy if m.rows is None else m.rows
        cols = dummy if m.cols is None else m.cols
        shape = torch.broadcast_shapes(rows.shape, cols.shape)
        w = reduce_to(t.detach().to(torch.float64).square(), shape)
        return w, rows, cols

    def weighted(self, h: Tensor) -> list[Tensor]:
        """The masses at gauge ``h`` (``[num_neurons]``): ``w exp(2 (h_r - h_c))`` per term."""
        ex = torch.exp(2 * torch.cat([h, h.new_zeros(1)]))
        inv = 1 / ex  # rows and columns factor separately: two small exps, no full-size one
        return [w * ex[r] * inv[c] for w, r, c in self.terms]

    def total(self, masses: list[Tensor]) -> Tensor:
        """``F = sum of all masses`` (a 0-dim tensor)."""
        return torch.stack([u.sum() for u in masses]).sum()

    def sums(self, masses: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(S_in, S_out)`` per neuron at these masses; entries whose row and column are the
        same neuron are gauge invariant and count in neither. Then ``mu = S_in - S_out`` and
        ``K_nn = S_in + S_out``."""
        s_in = torch.zeros(self.n + 1, dtype=torch.float64, device=self.device)
        s_out = torch.zeros_like(s_in)
        for u, (_, r, c) in zip(masses, self.terms, strict=True):
            moving = u * (r != c)
            scatter_slots(s_in, r, moving)
            scatter_slots(s_out, c, moving)
        return s_in[: self.n], s_out[: self.n]

    def gram_matvec(self, masses: list[Tensor], v: Tensor) -> Tensor:
        """``K v`` for ``v`` of shape ``[num_neurons]``."""
        vx = torch.cat([v, v.new_zeros(1)])
        out = torch.zeros(self.n + 1, dtype=torch.float64, device=self.device)
        for u, (_, r, c) in zip(masses, self.terms, strict=True):
            t = u * (vx[r] - vx[c])
            scatter_slots(out, r, t)
            scatter_slots(out, c, t, -1.0)
        return out[: self.n]


class MassMatrices:
    """The pair masses of :class:`PairMasses` (float64), arranged for evaluation at a gauge
    ``h`` by matrix-vector products, without forming the masses at ``h``.

    A parameter whose row map varies along some dims and column map along others is held as a
    matrix ``M[i, j]`` with row neurons ``rho[i]`` and column neurons ``gamma[j]``; its masses
    at ``h`` are ``e_i M_ij f_j`` with ``e = exp(2 h)[rho]``, ``f = exp(-2 h)[gamma]``, so the
    row sums are ``e * (M f)``, the column sums ``f * (M^T e)`` and a product with the Gram
    matrix two more matrix-vector products: each a single read of ``M``. Matrices of one shape
    are stacked and multiplied together (``bmm``). Every other term (one side only, maps
    sharing a dim, or entries whose row and column are the same neuron) is concatenated into
    one flat list of masses. ``h`` is taken relative to a base gauge that is moved (the masses
    rescaled) when it drifts far, so that the exponentials never overflow.
    """

    REBASE = 30.0  # |h - base| beyond which the masses are rescaled to the new base

    def __init__(self, tensors: Mapping[str, Tensor], structure: GaugeStructure) -> None:
        first = next(iter(tensors.values()))
        self.n = n = structure.num_neurons
        self.device = first.device
        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor, Tensor]]] = {}
        flat: list[tuple[Tensor, Tensor, Tensor]] = []
        for m in structure.device_maps(self.device):
            t = tensors[m.name].detach()
            dummy = torch.full([1] * t.dim(), n, device=self.device)
            rows = dummy if m.rows is None else m.rows
            cols = dummy if m.cols is None else m.cols
            shape = torch.broadcast_shapes(rows.shape, cols.shape)
            sq = _trailing_sum_of_squares(t, shape, torch.float64)
            if sq is None:
                sq = t.square() if t.dtype == torch.float64 else t.to(torch.float64).square_()
            w = reduce_to(sq, shape)
            a = [d for d, k in enumerate(rows.shape) if k > 1]
            b = [d for d, k in enumerate(cols.shape) if k > 1]
            if a and b and not set(a) & set(b):
                rho, gamma = rows.reshape(-1), cols.reshape(-1)
                live_rho, live_gamma = rho[rho < n], gamma[gamma < n]
                if not bool(torch.isin(live_rho, live_gamma).any()):
                    rest = [d for d in range(w.dim()) if d not in a and d not in b]
                    mat = w.permute(*a, *b, *rest).reshape(rho.numel(), gamma.numel())
                    by_shape.setdefault(tuple(mat.shape), []).append((mat, rho, gamma))
                    continue
            flat.append(
                (w.reshape(-1), rows.expand(shape).reshape(-1), cols.expand(shape).reshape(-1))
            )
        # Stacks [G, a, b] of equally shaped matrices with their neurons [G, a] and [G, b].
        self.stacks = [
            tuple(torch.stack(parts) for parts in zip(*group, strict=True))
            for group in by_shape.values()
        ]
        # (matrix, rho, gamma) per parameter: views into the stacks.
        self.matrices = [(m[i], r[i], c[i]) for m, r, c in self.stacks for i in range(len(m))]
        if flat:
            w, r, c = (torch.cat(parts) for parts in zip(*flat, strict=True))
        else:
            w = torch.zeros(0, dtype=torch.float64, device=self.device)
            r = c = torch.zeros(0, dtype=torch.long, device=self.device)
        self.flat = (w, r, c, (r != c).to(torch.float64))
        # Whether some entry has its row and column at the same neuron (gauge invariant).
        self.same_neuron = bool(((r == c) & (r < n)).any())
        self.base = torch.zeros(n, dtype=torch.float64, device=self.device)

    def _factors(self, h: Tensor) -> tuple[Tensor, Tensor]:
        up = torch.exp(2 * torch.cat([h - self.base, h.new_zeros(1)]))
        return up, 1 / up

    def rebase(self, h: Tensor) -> None:
        """Rescale the stored masses to the base gauge ``h`` when ``h`` is far from the base."""
        if self.n == 0 or float((h - self.base).abs().max()) <= self.REBASE:
            return
        up, down = self._factors(h)
        for mat, rho, gamma in self.stacks:
            mat.mul_(up[rho][:, :, None]).mul_(down[gamma][:, None, :])
        w, r, c, moving = self.flat
        self.flat = (w * up[r] * down[c], r, c, moving)
        self.base = h.clone()

    def at(self, h: Tensor, sums: bool = True) -> MassState:
        """The masses at gauge ``h``: ``F`` always, ``(S_in, S_out)`` when ``sums``."""
        return MassState(self, h, sums)


def _bmv(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, a, b] @ [G, b] -> [G, a]``."""
    return torch.bmm(mat, v.unsqueeze(-1)).squeeze(-1)


def _bmv_t(mat: Tensor, v: Tensor) -> Tensor:
    """``[G, a, b]^T @ [G, a] -> [G, b]`` (one matrix at a time: a transposed ``bmm`` is
    slower than the loop)."""
    return torch.stack([m.T @ x for m, x in zip(mat, v, strict=True)])


class MassState:
    """:class:`MassMatrices` evaluated at one gauge ``h``: ``total`` (``F``), and after
    :meth:`complete` (or ``sums=True``) ``s_in`` and ``s_out`` (``[num_neurons]``, entries whose
    row and column are the same neuron counting in neither), and :meth:`gram_matvec`."""

    def __init__(self, masses: MassMatrices, h: Tensor, sums: bool) -> None:
        self.masses = masses
        self.h = h
        self.up, self.down = masses._factors(h)
        self.row_sums = [
            self.up[rho] * _bmv(mat, self.down[gamma]) for mat, rho, gamma in masses.stacks
        ]
        self.col_sums: list[Tensor] | None = None
        w, r, c, _ = masses.flat
        self.u = w * self.up[r] * self.down[c]
        self.total = torch.stack([*(x.sum() for x in self.row_sums), self.u.sum()]).sum()
        self.s_in = self.s_out = None
        if sums:
            self.complete()

    def complete(self) -> MassState:
        """Compute ``(S_in, S_out)`` (one more read of each matrix)."""
        if self.s_in is not None:
            return self
        m = self.masses
        self.col_sums = [
            self.down[gamma] * _bmv_t(mat, self.up[rho]) for mat, rho, gamma in m.stacks
        ]
        s_in = torch.zeros(m.n + 1, dtype=torch.float64, device=m.device)
        s_out = torch.zeros_like(s_in)
        for (_, rho, gamma), rs, cs in zip(m.stacks, self.row_sums, self.col_sums, strict=True):
            s_in.index_add_(0, rho.reshape(-1), rs.reshape(-1))
            s_out.index_add_(0, gamma.reshape(-1), cs.reshape(-1))
        _, r, c, moving = m.flat
        u = self.u * moving
        s_in.index_add_(0, r, u)
        s_out.index_add_(0, c, u)
        self.s_in, self.s_out = s_in[: m.n], s_out[: m.n]
        return self

    def gram_matvec(self, v: Tensor) -> Tensor:
        """``K v`` at this gauge (after :meth:`complete`)."""
        m = self.masses
        assert self.col_sums is not None
        vx = torch.cat([v, v.new_zeros(1)])
        out = torch.zeros(m.n + 1, dtype=torch.float64, device=m.device)
        for (mat, rho, gamma), rs, cs in zip(m.stacks, self.row_sums, self.col_sums, strict=True):
            e, f = self.up[rho], self.down[gamma]
            vr, vc = vx[rho], vx[gamma]
            to_rows = vr * rs - e * _bmv(mat, f * vc)
            to_cols = vc * cs - f * _bmv_t(mat, e * vr)
            out.index_add_(0, rho.reshape(-1), to_rows.reshape(-1))
            out.index_add_(0, gamma.reshape(-1), to_cols.reshape(-1))
        _, r, c, _ = m.flat
        t = self.u * (vx[r] - vx[c])
        out.index_add_(0, r, t)
        out.index_add_(0, c, -t)
        return out[: m.n]


@torch.no_grad()
def imbalance_stats(
    source: nn.Module | Mapping[str, Tensor], structure: GaugeStructure
) -> dict[str, float]:
    """Cheap imbalance statistics for logging, as Python floats.

    With ``(S_in, S_out)`` from :func:`in_out_sums`, ``mu = S_in - S_out`` and
    ``S = S_in + S_out``:

    - ``mu_rel_rms``, ``mu_rel_max``: RMS and maximum of ``|mu_n| / S_n`` over the neurons with
      ``S_n > 0`` (0 for a balanced neuron, 1 for one whose incoming or outgoing side is zero);
    - ``log_ratio_rms``, ``log_ratio_max``: RMS and maximum of ``|0.5 log(S_in,n / S_out,n)|``
      (the gauge distance to the neuron's local balance, up to a factor 2) over the neurons with
      both sides non-zero;
    - ``mu_norm``: ``||mu||_2``; ``norm_sq``: ``||theta||^2`` over the parameters the structure
      touches; ``dead_neurons``: how many neurons have an empty (all-zero) side.

    A handful of vectorised operations and a single device-to-host transfer.
    """
    params = structure.bind(source)
    names = ("mu_rel_rms", "mu_rel_max", "log_ratio_rms", "log_ratio_max", "mu_norm")
    names += ("norm_sq", "dead_neurons")
    if not params:
        return dict.fromkeys(names, 0.0)
    dtype = accumulation_dtype(next(iter(params.values())).dtype)
    s_in, s_out, norm_sq = slot_sums(params, structure, dtype)
    s_in, s_out = s_in[: structure.num_neurons], s_out[: structure.num_neurons]
    mu, s = s_in - s_out, s_in + s_out
    rel = torch.where(s > 0, mu.abs() / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
    alive = (s_in > 0) & (s_out > 0)
    log_ratio = torch.where(alive, 0.5 * torch.log(s_in / s_out).abs(), 0.0)
    n_rel = (s > 0).sum().clamp_min(1)
    n_alive = alive.sum().clamp_min(1)
    values = torch.stack(
        [
            (rel.square().sum() / n_rel).sqrt(),
            rel.max() if rel.numel() else rel.new_zeros(()),
            (log_ratio.square().sum() / n_alive).sqrt(),
            log_ratio.max() if log_ratio.numel() else rel.new_zeros(()),
            torch.linalg.vector_norm(mu),
            norm_sq,
            (~alive).sum().to(s.dtype),
        ]
    )
    return dict(zip(names, values.tolist(), strict=True))
