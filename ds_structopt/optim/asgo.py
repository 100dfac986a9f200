"""ASGO (one-sided structured AdaGrad-style preconditioner) and DASGO (its diagonal form).

ASGO, practical version of arXiv 2503.20762 (facts from the authors' code):
  side = the smaller dimension (rows < cols: left, else right, square -> right),
  M <- lerp(M, G, 1-b1), V <- lerp(V, GG^T or G^TG, 1-b2) (``cumulative=True``:
  V += ..., the theory version), U = V^{-1/2} M (left) or M V^{-1/2} (right),
  U *= rms_scale sqrt(mn)/||U||_F (``rms_scale=None``: the raw update),
  W <- W (1 - lr wd) - lr U.
V^{-1/2} comes from a coupled Newton-Schulz iteration every step
(``root="newton_schulz"``, the reference) or from eigh every ``update_freq``
steps (``root="eigh"``). ``damping`` (default 1e-6) is relative: to the
largest eigenvalue for eigh, to ||V||_F for Newton-Schulz. The reference code
adds no damping; in fp32 an undamped rank-deficient V makes the Polar Express
iteration diverge (see linalg.newton_schulz_inverse_root), so we keep a tiny
one; ``damping=0`` restores the reference behaviour.

DASGO keeps only a column vector v <- lerp(v, sum_rows(G*G), 1-b2) and uses
U = M (v + eps)^{-1/2} with the same RMS rule. No decomposition.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import Tensor

from . import linalg
from . import validation as v
from .base import StructuredOptimizer
from .batching import buckets, chunks, stack
from .refresh import DECOMP_FLOPS_PER_CUBE, first_refresh_window, refresh_due
from .registry import register

State = MutableMapping[str, Any]


def rms_match_(updates: Sequence[Tensor], target_rms: Optional[float]) -> None:
    """Scale each update in place to entry-RMS ``target_rms`` (Moonlight-style); None leaves it raw."""
    if target_rms is None or not updates:
        return
    norms = torch._foreach_norm(list(updates))
    # a zero update stays zero (not 0 * inf = NaN)
    factors = [torch.where(n > 0, target_rms * math.sqrt(u.numel()) / n, torch.zeros_like(n)) for u, n in zip(updates, norms)]
    torch._foreach_mul_(list(updates), factors)


def inverse_roots(preconds: Sequence[Tensor], damping: float) -> list[Optional[Tensor]]:
    """V^{-1/2} by eigh for each matrix (None where it failed), batched over equal sizes."""
    out: list[Optional[Tensor]] = [None] * len(preconds)
    for d, idx in buckets([p.shape[0] for p in preconds]).items():
        for part in chunks(idx, 4 * 4 * d * d):
            for i, root in zip(part, linalg.eigh_inverse_root(stack([preconds[i] for i in part]), damping)):
                out[i] = root
    return out


class _MomentumRMSOptimizer(StructuredOptimizer):
    """Options shared by ASGO and DASGO (momentum, RMS-matched updates, Adam for the rest)."""

    @classmethod
    def _validate(cls, group: State) -> None:
        super()._validate(group)
        name = cls.NAME
        v.check_betas(name, "betas", group["betas"])
        v.check_nonneg(name, "eps", group["eps"])
        if group["rms_scale"] is not None:
            v.check_positive(name, "rms_scale", group["rms_scale"])


@register
class ASGO(_MomentumRMSOptimizer):
    """ASGO: one-sided full-matrix preconditioner V^{-1/2} on the gradient's small side."""

    NAME = "ASGO"
    DEFAULTS: dict[str, Any] = dict(
        lr=1e-2,
        betas=(0.9, 0.8),
        eps=1e-10,
        weight_decay=0.1,
        cumulative=False,
        root="newton_schulz",
        ns_iterations=10,
        update_freq=200,
        damping=1e-6,
        rms_scale=0.2,
        max_precond_dim=10000,
        max_decomp_failures=3,
        stagger_refresh=False,
        first_refresh_window=None,
        refresh_from="current",
        refresh_ahead_steps=1,
        structured=True,
        adam_betas=(0.9, 0.95),
        adam_eps=1e-8,
        adam_weight_decay=0.0,
    )

    @classmethod
    def _validate(cls, group: State) -> None:
        super()._validate(group)
        name = cls.NAME
        v.check_bool(name, "cumulative", group["cumulative"])
        v.check_choice(name, "root", group["root"], ("newton_schulz", "eigh"))
        v.check_int_at_least(name, "ns_iterations", group["ns_iterations"], 1)
        v.check_refresh_options(name, group)
        v.check_nonneg(name, "damping", group["damping"])

    @classmethod
    def _staggers(cls, group: Mapping[str, Any]) -> bool:
        """Only eigh roots are refreshed (Newton-Schulz recomputes the root every step)."""
        return bool(group["stagger_refresh"]) and group["root"] == "eigh"

    @classmethod
    def step_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """V's update and the preconditioning on the small side d (4 d^2 x the other side), plus
        the Newton-Schulz iterations when the root is computed every step: four d x d products
        each (ZY, (ZY)^2, YT, TZ), 8 d^3."""
        d, other = min(m, n), max(m, n)
        if d > group["max_precond_dim"]:
            return 8.0 * m * n
        flops = 4.0 * d * d * other
        if group["root"] == "newton_schulz":
            flops += group["ns_iterations"] * 8.0 * d**3
        return flops

    @classmethod
    def refresh_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """An eigh of V every ``update_freq`` steps with ``root="eigh"``; none with Newton-Schulz."""
        d = min(m, n)
        return DECOMP_FLOPS_PER_CUBE * d**3 if group["root"] == "eigh" and d <= group["max_precond_dim"] else 0.0

    @classmethod
    def state_elements(cls, m: int, n: int, group: dict[str, Any]) -> int:
        """fp32 elements of an m x n matrix's state after its first step (momentum, V, eigh root)."""
        d = min(m, n)
        if d > group["max_precond_dim"]:
            return m * n
        return m * n + d * d * (2 if group["root"] == "eigh" else 1)

    def _init_state(self, st: State, grad: Tensor, group: dict[str, Any]) -> None:
        if "step" in st:
            return
        m, n = grad.shape
        side = "left" if m < n else "right"
        dim = m if side == "left" else n
        if dim > group["max_precond_dim"]:
            side, dim = None, 0
        st.update(step=0, side=side, exp_avg=torch.zeros(m, n, device=grad.device))
        st["precond"] = torch.zeros(dim, dim, device=grad.device) if side else None
        st["root"] = None
        for key in ("refreshes", "decomp_failures", "consecutive_failures", "identity_fallbacks"):
            st[key] = 0
        st.setdefault("nonfinite_skips", 0)

    def _matrix_updates(
        self,
        group: dict[str, Any],
        grads: Sequence[Tensor],
        states: Sequence[State],
        weights: Optional[Sequence[Tensor]] = None,
        scratch: bool = False,
    ) -> tuple[list[Tensor], list[float]]:
        beta1, beta2 = group["betas"]
        for g, st in zip(grads, states):
            self._init_state(st, g, group)
            st["step"] += 1
        torch._foreach_lerp_([st["exp_avg"] for st in states], list(grads), 1.0 - beta1)
        self._accumulate(grads, states, beta2, group["cumulative"])
        if group["root"] == "newton_schulz":  # the gradients are read: scratch ones are its workspace
            roots = self._newton_schulz_roots(states, group, workspace=grads if scratch else None)
        else:
            self.assign_refresh_phases(group, states, [g.shape for g in grads])
            due = self._due(states, group, step_offset=0)
            if group["refresh_from"] == "previous":
                due = self._install_ahead(due, group)
            self._eigh_roots(due, group)
            roots = [st["root"] for st in states]
        updates = self._precondition(states, roots, out=grads if scratch else None)
        rms_match_(updates, group["rms_scale"])
        if group["root"] == "eigh" and group["refresh_from"] == "previous":
            self._submit_ahead(states, group)
        return updates, [group["lr"]] * len(states)

    @staticmethod
    def _due(states: Sequence[State], group: dict[str, Any], step_offset: int) -> list[State]:
        return [st for st in states if st["side"]
                and refresh_due(st["step"] + step_offset, group["update_freq"], st.get("refresh_phase", 0),
                                first_refresh_window(group))]

    def _install_ahead(self, due: list[State], group: dict[str, Any]) -> list[State]:
        """Install roots computed from the previous step's V; returns the due states that have none."""
        left = []
        for st in due:
            found, root = self.refresh_ahead.take(st)
            if found:
                self._install_root(st, root, group["max_decomp_failures"])
            else:
                left.append(st)
        return left

    def _submit_ahead(self, states: Sequence[State], group: dict[str, Any]) -> None:
        """Background eigh of this step's V (a copy) for the matrices due next step."""
        due = self._due(states, group, step_offset=group["refresh_ahead_steps"])
        if not due:
            return
        snapshots = [st["precond"].clone() for st in due]
        damping = group["damping"]
        self.refresh_ahead.submit(due, lambda: inverse_roots(snapshots, damping), snapshots[0].device, inputs=snapshots)

    def _accumulate(self, grads: Sequence[Tensor], states: Sequence[State], beta2: float, cumulative: bool) -> None:
        keys = [(tuple(g.shape), st["side"]) for g, st in zip(grads, states)]
        for (shape, side), idx in buckets(keys).items():
            if side is None:
                continue
            m, n = shape
            d = m if side == "left" else n
            for part in chunks(idx, 4 * (m * n + d * d)):
                g = stack([grads[i] for i in part])
                gram = torch.bmm(g, g.mT) if side == "left" else torch.bmm(g.mT, g)
                for j, i in enumerate(part):
                    if cumulative:
                        states[i]["precond"].add_(gram[j])
                    else:
                        states[i]["precond"].lerp_(gram[j], 1.0 - beta2)

    def _newton_schulz_roots(self, states: Sequence[State], group: dict[str, Any],
                             workspace: Optional[Sequence[Tensor]] = None) -> list[Optional[Tensor]]:
        """Fresh V^{-1/2} for every matrix (not kept in the state: it is recomputed each step).
        ``workspace``: the matrices' scratch gradients, already read; a matrix computed alone
        runs the iteration in its gradient's memory, as many d x d buffers as it holds
        (m n >= d^2: at least one), so an owner's step adds less than four d x d to its state."""
        roots: list[Optional[Tensor]] = [None] * len(states)
        keys = [st["precond"].shape[0] if st["side"] else None for st in states]
        for d, idx in buckets(keys).items():
            if d is None:
                continue
            for part in chunks(idx, 4 * 6 * d * d):
                precond = stack([states[i]["precond"] for i in part])
                blocks = _square_blocks(workspace[part[0]], d) if workspace is not None and len(part) == 1 else ()
                result, fell_back = linalg.newton_schulz_inverse_root(precond, group["ns_iterations"], group["eps"],
                                                                      group["damping"], workspace=blocks)
                fell = fell_back.float()  # counted on the device: no host read per step
                for j, i in enumerate(part):
                    roots[i] = result[j]
                    states[i]["refreshes"] += 1
                    states[i]["decomp_failures"] = fell[j] + states[i]["decomp_failures"]
                    states[i]["identity_fallbacks"] = fell[j] + states[i]["identity_fallbacks"]
        return roots

    def _eigh_roots(self, states: Sequence[State], group: dict[str, Any]) -> None:
        for st, root in zip(states, inverse_roots([st["precond"] for st in states], group["damping"])):
            self._install_root(st, root, group["max_decomp_failures"])

    def _install_root(self, st: State, root: Optional[Tensor], max_failures: int) -> None:
        if root is not None:
            st["root"] = root
            st["refreshes"] += 1
            st["consecutive_failures"] = 0
            return
        st["decomp_failures"] += 1
        st["consecutive_failures"] += 1
        if st["root"] is None or st["consecutive_failures"] >= max_failures:
            d = st["precond"].shape[0]
            st["root"] = torch.eye(d, device=st["precond"].device)
            st["identity_fallbacks"] += 1
            warnings.warn(
                f"ASGO: inverse root of a {d}x{d} preconditioner failed {st['consecutive_failures']} time(s) "
                "in a row; using the identity for it",
                RuntimeWarning,
                stacklevel=4,
            )

    def _precondition(self, states: Sequence[State], roots: Sequence[Optional[Tensor]],
                      out: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
        """V^{-1/2} M (left) or M V^{-1/2} (right), batched; no side -> a copy of M. Written
        into ``out`` (the scratch gradients) when given.

        No root yet (``root="eigh"`` before a staggered first refresh, see first_refresh_window)
        -> a copy of M too: the identity preconditioner, so the update is the RMS-matched momentum.
        """
        keys = [(tuple(st["exp_avg"].shape), st["side"] if root is not None else None) for st, root in zip(states, roots)]
        res: list[Optional[Tensor]] = [None] * len(states)
        for (shape, side), idx in buckets(keys).items():
            if side is None:
                for i in idx:
                    res[i] = states[i]["exp_avg"].clone() if out is None else out[i].copy_(states[i]["exp_avg"])
                continue
            m, n = shape
            d = m if side == "left" else n
            for part in chunks(idx, 4 * (2 * m * n + d * d)):
                mom = stack([states[i]["exp_avg"] for i in part])
                root = stack([roots[i] for i in part])
                target = out[part[0]].unsqueeze(0) if out is not None and len(part) == 1 else None
                x = torch.bmm(root, mom, out=target) if side == "left" else torch.bmm(mom, root, out=target)
                for j, i in enumerate(part):
                    res[i] = x[j] if out is None else out[i] if target is not None else out[i].copy_(x[j])
        return res  # type: ignore[return-value]


def _square_blocks(buffer: Tensor, d: int) -> list[Tensor]:
    """``buffer``'s memory as (1, d, d) tensors (up to four; none if it is not a contiguous fp32 tensor)."""
    if not buffer.is_contiguous() or buffer.dtype != torch.float32:
        return []
    flat = buffer.view(-1)
    return [flat.narrow(0, j * d * d, d * d).view(1, d, d) for j in range(min(4, flat.numel() // (d * d)))]


@register
class DASGO(_MomentumRMSOptimizer):
    """DASGO: ASGO with only the diagonal of G^T G (one vector over the columns)."""

    NAME = "DASGO"
    DEFAULTS: dict[str, Any] = dict(
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        rms_scale=0.2,
        max_precond_dim=10000,
        structured=True,
        adam_betas=(0.9, 0.95),
        adam_eps=1e-8,
        adam_weight_decay=0.0,
    )

    @classmethod
    def step_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """Elementwise: momentum, the column statistics and the scaling (~8 per element)."""
        return 8.0 * m * n

    @classmethod
    def state_elements(cls, m: int, n: int, group: dict[str, Any]) -> int:
        """fp32 elements of an m x n matrix's state: momentum and one column vector."""
        return m * n + n

    def _matrix_updates(
        self,
        group: dict[str, Any],
        grads: Sequence[Tensor],
        states: Sequence[State],
        weights: Optional[Sequence[Tensor]] = None,
        scratch: bool = False,
    ) -> tuple[list[Tensor], list[float]]:
        beta1, beta2 = group["betas"]
        for g, st in zip(grads, states):
            if "step" not in st:
                st.update(step=0, exp_avg=torch.zeros_like(g), col_sq=torch.zeros(g.shape[1], device=g.device))
                st.setdefault("nonfinite_skips", 0)
            st["step"] += 1
        torch._foreach_lerp_([st["exp_avg"] for st in states], list(grads), 1.0 - beta1)
        # with scratch gradients the squares, then the updates, take the gradients' memory
        col_sums = [(g.square_() if scratch else g.square()).sum(dim=0) for g in grads]
        col_sq = [st["col_sq"] for st in states]
        torch._foreach_lerp_(col_sq, col_sums, 1.0 - beta2)
        scales = torch._foreach_add(col_sq, group["eps"])
        torch._foreach_rsqrt_(scales)
        updates = [torch.mul(st["exp_avg"], s.unsqueeze(0), out=g if scratch else None) for st, s, g in zip(states, scales, grads)]
        rms_match_(updates, group["rms_scale"])
        return updates, [group["lr"]] * len(states)
