"""AdaDiag (one-sided) and AdaDiag++ (two-sided): Adam in an orthogonal basis that
nearly diagonalizes the preconditioner (Nguyen et al., arXiv 2502.07488).

Per matrix W (m x n) with gradient G:
  every ``update_freq`` steps (and at t = 1) refresh the basis P (m x m) and/or Q (n x n)
  from the SVD of G (``basis="grad"``, the paper), of the first moment (``basis="momentum"``:
  the EMA of the gradient, this step's included) or from EMA factors GG^T / G^TG
  (``basis="ema"``, as SOAP); then G~ = P^T G Q, Adam (or Adafactor) moments on G~,
  U = P D Q^T, W <- W - lr (U + wd W).
At a refresh the moments are kept as they are (``moments="rotated"``, the paper's reading),
the first moment rotated into the new basis (``"reproject"``), both rotated (``"reproject_both"``:
the second moment as the diagonal of the rotated diagonal, (R o R) V (S o S)^T), or reset
(``"reset"``, bias correction restarted).
AdaDiag rotates only the small side; AdaDiag++ both (``nonsquare="small_side"``: only the small
side of a non-square matrix, whose large side's basis beyond min(m, n) is an arbitrary
completion). A side longer than ``max_precond_dim`` is never rotated.
Defaults: AdaDiag the paper's reading; AdaDiag++ ``basis="ema"``, ``moments="reproject"``, chosen by
the paper-regime suite (docs/benchmarks.md; ``preset="paper"`` restores the reading). basis="ema"
takes its first bases (the factors then hold one gradient) from that gradient's paired SVD.

State per matrix (self-contained, so a distributed owner can carry it alone):
step, P/Q (None = not rotated), exp_avg, exp_avg_sq or row_sq/col_sq,
L/R (EMA basis factors), refreshes, decomp_failures, consecutive_failures,
identity_fallbacks, nonfinite_skips, rotate_left/rotate_right.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import Tensor

from . import linalg
from . import validation as v
from .base import StepSizes, StructuredOptimizer
from .batching import buckets, chunks, stack
from .moments import adam_directions, factored_directions
from .refresh import DECOMP_FLOPS_PER_CUBE, first_refresh_window, refresh_due
from .registry import register

State = MutableMapping[str, Any]


@register
class AdaDiag(StructuredOptimizer):
    """AdaDiag: Adam moments in the singular basis of the gradient's small side.

    One optimizer serves a whole model: matrices (2-D+, in groups with
    ``structured=True``) get the rotated update; other parameters get AdamW
    with ``adam_betas`` (default: ``betas``), ``adam_eps`` and
    ``adam_weight_decay`` (default: ``weight_decay``).
    """

    NAME = "AdaDiag"
    TWO_SIDED = False
    DEFAULTS: dict[str, Any] = dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        update_freq=200,
        basis="grad",
        nonsquare="both",
        decomposition="auto",
        basis_beta=0.95,
        power_qr=False,
        moments="rotated",
        max_precond_dim=10000,
        factored=False,
        factored_eps=1e-30,
        clip_threshold=1.0,
        beta2_decay=None,
        relative_step=False,
        max_decomp_failures=3,
        stagger_refresh=False,
        first_refresh_window=None,
        refresh_from="current",
        refresh_ahead_steps=1,
        structured=True,
        adam_betas=None,
        adam_eps=1e-8,
        adam_weight_decay=None,
    )

    #: The paper's literal reading: bases from the SVD of the current gradient, moments kept as they
    #: are in the rotated space across refreshes, both sides rotated, Adam's betas.
    PRESETS: dict[str, dict[str, Any]] = {
        "paper": dict(betas=(0.9, 0.999), basis="grad", moments="rotated", nonsquare="both"),
    }

    @classmethod
    def _validate(cls, group: State) -> None:
        super()._validate(group)
        name = cls.NAME
        v.check_betas(name, "betas", group["betas"])
        v.check_nonneg(name, "eps", group["eps"])
        v.check_refresh_options(name, group)
        v.check_choice(name, "basis", group["basis"], BASES)
        v.check_choice(name, "nonsquare", group["nonsquare"], ("both", "small_side"))
        v.check_choice(name, "decomposition", group["decomposition"], linalg.GRAD_DECOMPOSITIONS)
        v.check_beta(name, "basis_beta", group["basis_beta"])
        v.check_bool(name, "power_qr", group["power_qr"])
        v.check_choice(name, "moments", group["moments"], MOMENTS)
        v.check_bool(name, "factored", group["factored"])
        v.check_positive(name, "factored_eps", group["factored_eps"])
        v.check_positive(name, "clip_threshold", group["clip_threshold"])
        if group["beta2_decay"] is not None:
            decay = group["beta2_decay"]
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay < 0:
                raise ValueError(f"{name}: beta2_decay must be a negative number (e.g. -0.8) or None, got {decay!r}")
        v.check_bool(name, "relative_step", group["relative_step"])
        if group["basis"] == "momentum" and (group["betas"][0] == 0 or group["refresh_from"] != "current"):
            raise ValueError(f"{name}: basis='momentum' needs betas[0] > 0 and refresh_from='current', got "
                             f"betas={tuple(group['betas'])}, refresh_from={group['refresh_from']!r}")
        if group["relative_step"] and not group["factored"]:
            raise ValueError(f"{name}: relative_step=True needs factored=True (it is Adafactor's step-size rule)")

    # ----- state ----------------------------------------------------------
    @classmethod
    def _sides(cls, m: int, n: int, max_dim: int, nonsquare: str = "both") -> tuple[bool, bool]:
        if cls.TWO_SIDED and (m == n or nonsquare == "both"):
            return m <= max_dim, n <= max_dim
        left = m <= n
        return left and m <= max_dim, (not left) and n <= max_dim

    @classmethod
    def step_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """Rotations into and out of the basis on each rotated side (and the EMA factors' Gram
        products with ``basis="ema"``), plus the elementwise moment work."""
        left, right = cls._sides(m, n, group["max_precond_dim"], group.get("nonsquare", "both"))
        per_side = (m * m * n if left else 0.0) + (m * n * n if right else 0.0)
        return (6.0 if group.get("basis") == "ema" else 4.0) * per_side + 10.0 * m * n

    @classmethod
    def refresh_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """An SVD/eigh with vectors per rotated side."""
        left, right = cls._sides(m, n, group["max_precond_dim"], group.get("nonsquare", "both"))
        return DECOMP_FLOPS_PER_CUBE * ((m**3 if left else 0) + (n**3 if right else 0))

    def _init_state(self, st: State, grad: Tensor, group: dict[str, Any]) -> None:
        if "step" in st:
            return
        m, n = grad.shape
        left, right = self._sides(m, n, group["max_precond_dim"], group.get("nonsquare", "both"))
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=grad.device)  # noqa: E731
        st.update(step=0, rotate_left=left, rotate_right=right, P=None, Q=None)
        if not group["factored"] or group["betas"][0] > 0:
            st["exp_avg"] = zeros(m, n)
        if group["factored"]:
            st["row_sq"], st["col_sq"] = zeros(m), zeros(n)
        else:
            st["exp_avg_sq"] = zeros(m, n)
        if group["basis"] == "ema":
            st["L"] = zeros(m, m) if left else None
            st["R"] = zeros(n, n) if right else None
        for key in ("refreshes", "decomp_failures", "consecutive_failures", "identity_fallbacks"):
            st[key] = 0
        st.setdefault("nonfinite_skips", 0)

    @classmethod
    def state_elements(cls, m: int, n: int, group: dict[str, Any]) -> int:
        """fp32 elements an m x n matrix's state holds after its first step (for the planner;
        tests check it against real states)."""
        left, right = cls._sides(m, n, group["max_precond_dim"], group.get("nonsquare", "both"))
        out = m * n if (not group["factored"] or group["betas"][0] > 0) else 0
        out += (m + n) if group["factored"] else m * n
        out += (m * m if left else 0) + (n * n if right else 0)  # P, Q
        if group["basis"] == "ema":
            out += (m * m if left else 0) + (n * n if right else 0)  # L, R
        return out

    # ----- the update -----------------------------------------------------
    def _matrix_updates(
        self,
        group: dict[str, Any],
        grads: Sequence[Tensor],
        states: Sequence[State],
        weights: Optional[Sequence[Tensor]] = None,
        scratch: bool = False,
    ) -> tuple[list[Tensor], StepSizes]:
        for g, st in zip(grads, states):
            self._init_state(st, g, group)
            st["step"] += 1
        if group["basis"] == "ema":
            self._accumulate_factors(grads, states, group["basis_beta"])
        self.assign_refresh_phases(group, states, [g.shape for g in grads])
        due = self._due(states, group, step_offset=0)
        if group["refresh_from"] == "previous":
            due = self._install_ahead(due, grads, states, group)  # computed last step; what is left runs now
        fresh = self._refresh([grads[i] for i in due], [states[i] for i in due], group) if due else []
        if group["refresh_from"] == "previous":  # before scratch gradients are overwritten
            self._submit_ahead(grads, states, group)

        out = grads if scratch else None  # where the rotations and moments may write
        rotated = rotate(grads, states, to_basis=True, out=out)
        # In a two-sided basis fresh from this gradient's SVD (basis="grad", or "ema" at its
        # first step, when it takes the gradient's paired SVD: _ema_bases) P^T G Q is exactly diag(S):
        # drop the fp32 round-off elsewhere, which Adam's normalization would blow up to
        # +-1 (worst in the null-space columns when m != n).
        for i, ok in zip(due, fresh):
            st = states[i]
            if ok and st["rotate_left"] and st["rotate_right"] and (group["basis"] == "grad" or st["step"] == 1):
                rotated[i] = _keep_diagonal(rotated[i], in_place=scratch)
        if group["factored"]:
            directions = factored_directions(rotated, states, tuple(group["betas"]), group["factored_eps"],
                                             group["clip_threshold"], group["beta2_decay"], out=out)
        else:
            directions = adam_directions(rotated, states, tuple(group["betas"]), group["eps"], out=out)
        del rotated  # freed before the rotation back allocates the updates (transient memory)
        updates = rotate(directions, states, to_basis=False, out=out)
        return updates, self._step_sizes(group, states, weights)

    @staticmethod
    def _due(states: Sequence[State], group: dict[str, Any], step_offset: int) -> list[int]:
        """Indices of the rotated matrices whose basis refreshes at step ``st["step"] + step_offset``."""
        return [i for i, st in enumerate(states)
                if (st["rotate_left"] or st["rotate_right"])
                and refresh_due(st["step"] + step_offset, group["update_freq"], st.get("refresh_phase", 0),
                                first_refresh_window(group))]

    def _install_ahead(self, due: list[int], grads: Sequence[Tensor], states: Sequence[State],
                       group: dict[str, Any]) -> list[int]:
        """Install the bases computed from the previous step; returns the due matrices that have none
        (step 1, or the first step after loading a checkpoint written before this option)."""
        left = []
        for i in due:
            found, cand = self.refresh_ahead.take(states[i])
            if not found:
                left.append(i)
            elif cand is None:
                self._on_failure(states[i], grads[i], group["max_decomp_failures"])
            else:
                self._install(states[i], cand[0], cand[1], group["moments"])
        return left

    def _submit_ahead(self, grads: Sequence[Tensor], states: Sequence[State], group: dict[str, Any]) -> None:
        """Start, in the background, the decompositions of the matrices due next step, from this
        step's inputs (copies: DeepSpeed reuses its gradient buffers, our factors change in place)."""
        due = self._due(states, group, step_offset=group["refresh_ahead_steps"])
        if not due:
            return
        targets = [states[i] for i in due]
        if group["basis"] == "grad":
            inputs = [grads[i].clone() for i in due]
            sides = [{"rotate_left": st["rotate_left"], "rotate_right": st["rotate_right"]} for st in targets]
            method = _decomposition(group)
            compute = lambda: self._grad_bases(inputs, sides, method)  # noqa: E731
        else:
            snapshots = [{"L": None if st["L"] is None else st["L"].clone(),
                          "R": None if st["R"] is None else st["R"].clone(), "P": st["P"], "Q": st["Q"]}
                         for st in targets]
            compute = lambda: self._factor_bases(snapshots, group["power_qr"])  # noqa: E731
        tensors = inputs if group["basis"] == "grad" else [s[k] for s in snapshots for k in ("L", "R", "P", "Q")]
        self.refresh_ahead.submit(targets, compute, grads[due[0]].device, inputs=tensors)

    @classmethod
    def step_size_is_lr(cls, group: Mapping[str, Any]) -> bool:
        return not group["relative_step"]

    def _step_sizes(self, group: dict[str, Any], states: Sequence[State], weights: Optional[Sequence[Tensor]]
                    ) -> StepSizes:
        lr = group["lr"]
        if not group["relative_step"]:
            return [lr] * len(states)
        if weights is None:
            raise ValueError(f"{self.NAME}: relative_step=True needs the weights to size the step")
        # Adafactor: min(lr, 1/sqrt(t)) * max(1e-3, RMS(W)), left on the device (no host read)
        rms = [w.float().square().mean().sqrt().clamp_min(1e-3) for w in weights]
        return torch.stack([r * min(lr, st["step"] ** -0.5) for st, r in zip(states, rms)])

    # ----- bases ----------------------------------------------------------
    def _accumulate_factors(self, grads: Sequence[Tensor], states: Sequence[State], beta: float) -> None:
        """L <- b L + (1-b) G G^T and R <- b R + (1-b) G^T G, batched per shape."""
        keys = [(tuple(g.shape), st["L"] is not None, st["R"] is not None) for g, st in zip(grads, states)]
        for (shape, left, right), idx in buckets(keys).items():
            m, n = shape
            for part in chunks(idx, 4 * (m * n + m * m + n * n)):
                g = stack([grads[i] for i in part])
                if left:
                    gram = torch.bmm(g, g.mT)
                    for j, i in enumerate(part):
                        states[i]["L"].lerp_(gram[j], 1.0 - beta)
                if right:
                    gram = torch.bmm(g.mT, g)
                    for j, i in enumerate(part):
                        states[i]["R"].lerp_(gram[j], 1.0 - beta)

    def _refresh(self, grads: Sequence[Tensor], states: Sequence[State], group: dict[str, Any]) -> list[bool]:
        """Recompute the bases of the given matrices; failures keep the old basis. Returns successes."""
        if group["basis"] == "grad":
            candidates = self._grad_bases(grads, states, _decomposition(group))
        elif group["basis"] == "momentum":
            candidates = self._grad_bases(_momentum(grads, states, group["betas"][0]), states, _decomposition(group))
        else:
            candidates = self._ema_bases(grads, states, group)
        for g, st, cand in zip(grads, states, candidates):
            if cand is None:
                self._on_failure(st, g, group["max_decomp_failures"])
            else:
                self._install(st, cand[0], cand[1], group["moments"])
        return [cand is not None for cand in candidates]

    def _ema_bases(self, grads: Sequence[Tensor], states: Sequence[State],
                   group: dict[str, Any]) -> list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]:
        """Eigenbases of the EMA factors, except where the factors hold one gradient (step 1).

        Then L and R are G G^T and G^T G, whose eigenvectors are G's singular pairs; two
        independent eighs mix a near-repeated pair differently on each side (and fill the null
        space arbitrarily), so P^T G Q is not diagonal and reduction-order round-off in G moves
        the first update by O(1) inside such a cluster. The gradient's paired SVD
        (``linalg.svd_bases``) is the same basis without that freedom, as ``basis="grad"``."""
        first = [i for i, st in enumerate(states) if st["step"] == 1]
        later = [i for i, st in enumerate(states) if st["step"] != 1]
        out: list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]] = [None] * len(states)
        if first:
            for i, cand in zip(first, self._grad_bases([grads[i] for i in first], [states[i] for i in first],
                                                       _decomposition(group))):
                out[i] = cand
        if later:
            for i, cand in zip(later, self._factor_bases([states[i] for i in later], group["power_qr"])):
                out[i] = cand
        return out

    def _grad_bases(self, grads: Sequence[Tensor], states: Sequence[State],
                    method: str = "auto") -> list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]:
        """Singular bases of the gradients, only the rotated sides computed (``linalg.svd_bases``)."""
        out: list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]] = [(None, None)] * len(grads)
        keys = [(tuple(g.shape), st["rotate_left"], st["rotate_right"]) for g, st in zip(grads, states)]
        for (shape, left, right), idx in buckets(keys).items():  # callers pass rotated matrices only
            m, n = shape
            for part in chunks(idx, 4 * (m * n + m * m + n * n)):
                for i, res in zip(part, linalg.svd_bases(stack([grads[i] for i in part]), left, right, method)):
                    out[i] = res
        return out

    def _factor_bases(self, states: Sequence[State], power_qr: bool) -> list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]:
        """Eigenbases of the EMA factors (or one warm-started power/QR step)."""
        found: dict[tuple[int, str], Optional[Tensor]] = {}
        for side, fkey, bkey in (("left", "L", "P"), ("right", "R", "Q")):
            keys = []
            for i, st in enumerate(states):
                if st[fkey] is None:
                    keys.append(None)
                    continue
                warm = power_qr and st[bkey] is not None
                keys.append((tuple(st[fkey].shape), warm))
            for key, idx in buckets(keys).items():
                if key is None:
                    continue
                (d, _), warm = key
                for part in chunks(idx, 4 * 3 * d * d):
                    factors = stack([states[i][fkey] for i in part])
                    if warm:
                        res = linalg.power_qr_bases(factors, stack([states[i][bkey] for i in part]))
                    else:
                        res = linalg.eigen_bases(factors)
                    for i, basis in zip(part, res):
                        found[(i, side)] = basis
        out: list[Optional[tuple[Optional[Tensor], Optional[Tensor]]]] = []
        for i, st in enumerate(states):
            p = found.get((i, "left")) if st["L"] is not None else None
            q = found.get((i, "right")) if st["R"] is not None else None
            failed = (st["L"] is not None and p is None) or (st["R"] is not None and q is None)
            out.append(None if failed else (p, q))
        return out

    def _install(self, st: State, new_p: Optional[Tensor], new_q: Optional[Tensor], moments: str) -> None:
        old_p, old_q = st["P"], st["Q"]
        if new_p is not None and old_p is not None:
            new_p = linalg.align_signs(new_p, old_p)
        if new_q is not None and old_q is not None:
            new_q = linalg.align_signs(new_q, old_q)
        if moments != "rotated" and st["step"] > 1:  # at step 1 the moments are still zero
            _carry_moments(st, new_p, new_q, moments)
        st["P"], st["Q"] = new_p, new_q
        st["refreshes"] += 1
        st["consecutive_failures"] = 0

    def _on_failure(self, st: State, grad: Tensor, max_failures: int) -> None:
        """Keep the previous basis; the identity once failures repeat (or if there is none yet)."""
        st["decomp_failures"] += 1
        st["consecutive_failures"] += 1
        m, n = grad.shape
        never_had_basis = (st["rotate_left"] and st["P"] is None) or (st["rotate_right"] and st["Q"] is None)
        if never_had_basis or st["consecutive_failures"] >= max_failures:
            if st["rotate_left"]:
                st["P"] = torch.eye(m, device=grad.device)
            if st["rotate_right"]:
                st["Q"] = torch.eye(n, device=grad.device)
            st["identity_fallbacks"] += 1
            warnings.warn(
                f"{self.NAME}: basis decomposition of a {m}x{n} matrix failed "
                f"{st['consecutive_failures']} time(s) in a row; using the identity basis for it",
                RuntimeWarning,
                stacklevel=4,
            )


@register
class AdaDiagPP(AdaDiag):
    """AdaDiag++ ("AdaDiag++" in configs): both sides rotated, G~ = P^T G Q.

    Defaults differ from the paper's reading by two options chosen in the paper-regime suite
    (README, Benchmarks): bases from EMA factors (``basis="ema"``; the first from the gradient's
    paired SVD) and the first moment rotated into each new basis (``moments="reproject"``).
    ``preset="paper"`` gives the reading back."""

    NAME = "AdaDiag++"
    TWO_SIDED = True
    DEFAULTS: dict[str, Any] = {**AdaDiag.DEFAULTS, "basis": "ema", "moments": "reproject"}


BASES = ("grad", "momentum", "ema")
MOMENTS = ("rotated", "reproject", "reproject_both", "reset")


def _momentum(grads: Sequence[Tensor], states: Sequence[State], beta1: float) -> list[Tensor]:
    """The first moment this step will have, in the parameter's own coordinates:
    b1 P M~ Q^T + (1 - b1) G (the basis source of ``basis="momentum"``)."""
    current = rotate([st["exp_avg"] for st in states], states, to_basis=False)
    return [torch.lerp(m, g.float(), 1.0 - beta1) for m, g in zip(current, grads)]


def _carry_moments(st: State, new_p: Optional[Tensor], new_q: Optional[Tensor], moments: str) -> None:
    """Bring the moments of the old basis into the new one (``moments`` option).

    With A = P_new^T P_old and B = Q_old^T Q_new, coordinates change as X~ -> A X~ B: the first
    moment exactly; the second, as the diagonal of the rotated diagonal covariance,
    V -> (A o A) V (B o B) (factored: rows by A o A, columns by (B o B)^T). No basis yet is the
    identity (a staggered first refresh). "reset" zeroes both and restarts bias correction.
    """
    if moments == "reset":
        for key in ("exp_avg", "exp_avg_sq", "row_sq", "col_sq"):
            if key in st:
                st[key].zero_()
        st["moment_t0"] = st["step"] - 1  # this step's gradient is the first of the new moments
        return
    a = None if new_p is None else (new_p.mT @ st["P"] if st["P"] is not None else new_p.mT)
    b = None if new_q is None else (st["Q"].mT @ new_q if st["Q"] is not None else new_q)
    if "exp_avg" in st:
        m = st["exp_avg"]
        m = m if a is None else a @ m
        st["exp_avg"] = (m if b is None else m @ b).contiguous()
    if moments != "reproject_both":
        return  # "reproject": second moments carried over as they are (as SOAP)
    a2 = None if a is None else a.square()
    b2 = None if b is None else b.square()
    if "exp_avg_sq" in st:
        v = st["exp_avg_sq"]
        v = v if a2 is None else a2 @ v
        st["exp_avg_sq"] = (v if b2 is None else v @ b2).contiguous()
    else:
        if a2 is not None:
            st["row_sq"] = a2 @ st["row_sq"]
        if b2 is not None:
            st["col_sq"] = b2.mT @ st["col_sq"]


def _decomposition(group: dict[str, Any]) -> str:
    """The group's ``decomposition`` ("auto" for param groups loaded from checkpoints older than the option)."""
    return group.get("decomposition", "auto")


def _keep_diagonal(x: Tensor, in_place: bool = False) -> Tensor:
    """``x`` with its off-diagonal zeroed (in ``x`` itself when ``in_place``)."""
    if in_place:
        diag = x.diagonal().clone()
        x.zero_().diagonal().copy_(diag)
        return x
    out = torch.zeros_like(x)
    out.diagonal().copy_(x.diagonal())
    return out


def rotate(mats: Sequence[Tensor], states: Sequence[State], to_basis: bool,
           out: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """P^T X Q (``to_basis``) or P X Q^T (back), batched over same-shape matrices.

    A matrix with no rotated side is returned as is (no copy). With ``out`` (scratch matrices,
    which may be ``mats`` themselves) results are written there: a two-sided rotation's
    second product straight into it, so a matrix costs one intermediate, not two.
    """
    keys = [
        (tuple(x.shape), st["rotate_left"] and st["P"] is not None, st["rotate_right"] and st["Q"] is not None)
        for x, st in zip(mats, states)
    ]
    res: list[Optional[Tensor]] = [None] * len(mats)
    for (shape, left, right), idx in buckets(keys).items():
        if not (left or right):
            for i in idx:
                res[i] = mats[i] if out is None or out[i] is mats[i] else out[i].copy_(mats[i])
            continue
        m, n = shape
        item_bytes = 4 * (2 * m * n + (m * m if left else 0) + (n * n if right else 0))
        for part in chunks(idx, item_bytes):
            x = stack([mats[i] for i in part])
            # the last product writes into out unless it would read it (one side, in place)
            target = out[part[0]].unsqueeze(0) if out is not None and len(part) == 1 and (
                left and right or out[part[0]] is not mats[part[0]]) else None
            if left:
                p = stack([states[i]["P"] for i in part])
                x = torch.bmm(p.mT if to_basis else p, x, out=None if right else target)
            if right:
                q = stack([states[i]["Q"] for i in part])
                x = torch.bmm(x, q if to_basis else q.mT, out=target)
            for j, i in enumerate(part):
                res[i] = x[j] if out is None else out[i] if target is not None else out[i].copy_(x[j])
    return res  # type: ignore[return-value]
