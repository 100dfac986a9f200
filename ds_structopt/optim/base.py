"""Shared machinery of the structured optimizers.

`StructuredOptimizer` owns what every family needs: option validation, the
split between matrices (preconditioned by the subclass) and everything else
(AdamW), skipping non-finite gradients, applying updates in fp32 with
decoupled weight decay, counters, and an fp32-preserving ``load_state_dict``.

Subclasses implement one method, ``_matrix_updates``, which maps full 2-D
fp32 gradients plus their self-contained per-matrix state dicts to 2-D fp32
updates. It never touches parameters, so a distributed wrapper can run it on
whichever rank owns a matrix; callers use the public :meth:`matrix_updates`,
which runs it with fp32 matmuls pinned to full precision (a user's TF32 setting
would otherwise leave 10 mantissa bits to the Gram products and rotations).
"""
from __future__ import annotations

import abc
import copy
import difflib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, MutableMapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import validation as v
from .adamw import adamw_step
from .names import DEFAULT_ELEMENTWISE_PATTERNS, matches
from .precision import full_fp32_matmul
from .update_counts import UpdateCounts

if TYPE_CHECKING:
    from .refresh import PhasePlanner, RefreshAhead

# Keys a param group may carry that are metadata, not optimizer options.
_GROUP_METADATA = {"params", "param_names", "name", "initial_lr"}

COUNTERS = ("refreshes", "decomp_failures", "identity_fallbacks", "nonfinite_skips")

#: Options every family has on top of its own DEFAULTS.
COMMON_DEFAULTS: dict[str, Any] = {"elementwise_patterns": DEFAULT_ELEMENTWISE_PATTERNS}


def as_matrix(t: Tensor) -> Tensor:
    """View a 2-D+ tensor as (out, rest): conv/3-D weights are preconditioned as matrices."""
    return t.reshape(t.shape[0], -1)


def grad_flags(tensors: Sequence[Tensor]) -> list[tuple[bool, bool]]:
    """(entirely finite, not all zero) per tensor, from one max-abs pass and one host sync.

    An all-zero gradient is treated like a missing one (as torch optimizers treat
    ``grad is None``): DeepSpeed's wrappers call ``step()`` once with zero
    gradients just to create state, and that must not count as a first step.
    """
    if not tensors:
        return []
    maxes = torch.stack([m.float() for m in torch._foreach_norm(list(tensors), float("inf"))])
    return list(zip(torch.isfinite(maxes).tolist(), (maxes != 0).tolist()))


class StructuredOptimizer(Optimizer, abc.ABC):
    """Base class: a structured preconditioner for matrices, AdamW for the rest."""

    NAME: ClassVar[str] = "StructuredOptimizer"
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: Named sets of options (``preset="paper"``): applied over DEFAULTS, under explicit options.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        defaults = self.resolve_options(options)
        # Parameters routed to AdamW by name (groups built from named_parameters()).
        self._elementwise_by_name: set[Tensor] = set()
        self.counts = UpdateCounts()  # what each step updated how (see update_counts.py)
        super().__init__(params, defaults)

    # ----- options -------------------------------------------------------
    @classmethod
    def resolve_options(cls, options: MutableMapping[str, Any]) -> dict[str, Any]:
        """Defaults, then ``options["preset"]``'s values, then the other ``options``, validated
        (ValueError naming the bad option). No params needed."""
        options = dict(options)
        preset = options.pop("preset", None)
        known = {**COMMON_DEFAULTS, **cls.DEFAULTS}
        v.reject_unknown(cls.NAME, options, known)
        merged = copy.deepcopy(known)
        if preset is not None:
            if preset not in cls.PRESETS:
                choices = f"one of {sorted(cls.PRESETS)}" if cls.PRESETS else "unset (this optimizer has none)"
                raise ValueError(f"{cls.NAME}: preset must be {choices}, got {preset!r}")
            merged.update(copy.deepcopy(cls.PRESETS[preset]))
        merged.update(options)
        if isinstance(merged.get("betas"), list):
            merged["betas"] = tuple(merged["betas"])  # JSON has no tuples
        cls._validate(merged)
        return merged

    @classmethod
    def _validate(cls, group: MutableMapping[str, Any]) -> None:
        """Check the options common to every family; subclasses extend it."""
        name = cls.NAME
        v.check_nonneg(name, "lr", group["lr"])
        v.check_nonneg(name, "weight_decay", group["weight_decay"])
        v.check_bool(name, "structured", group["structured"])
        v.check_int_at_least(name, "max_precond_dim", group["max_precond_dim"], 0)
        if group["adam_betas"] is not None:
            v.check_betas(name, "adam_betas", group["adam_betas"])
        v.check_nonneg(name, "adam_eps", group["adam_eps"])
        if group["adam_weight_decay"] is not None:
            v.check_nonneg(name, "adam_weight_decay", group["adam_weight_decay"])
        v.check_patterns(name, "elementwise_patterns", group["elementwise_patterns"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in param_group:
            if key in self.defaults or key in _GROUP_METADATA:
                continue
            close = difflib.get_close_matches(key, list(self.defaults), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"{self.NAME}: unknown option '{key}' in a param group (did you mean '{close[0]}'?)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group)
        for p, name in zip(group["params"], group.get("param_names", ())):
            if matches(name, group["elementwise_patterns"]):
                self._elementwise_by_name.add(p)
        matrices = sum(1 for p in group["params"] if self.is_matrix(p, group))
        self.counts.eligible_matrices += matrices
        self.counts.elementwise_params += len(group["params"]) - matrices

    # ----- what subclasses provide ---------------------------------------
    def matrix_updates(
        self,
        group: dict[str, Any],
        grads: Sequence[Tensor],
        states: Sequence[MutableMapping[str, Any]],
        weights: Optional[Sequence[Tensor]] = None,
        scratch: bool = False,
    ) -> tuple[list[Tensor], StepSizes]:
        """Return (updates, step sizes) for 2-D fp32 gradients; W <- W(1 - lr wd) - lr U.
        Step sizes are Python floats, or one fp32 tensor on the gradients' device (one entry
        per matrix) where they depend on tensor values, so that nobody reads them to the host.

        ``scratch=True``: the caller no longer needs ``grads`` (buffers it assembled), so the
        math may write intermediates and the update into them: an update is then its gradient
        tensor, and the step allocates about one matrix less per matrix at its peak.

        Runs the family's math with full-precision fp32 matmuls whatever the user's
        TF32 setting, restored on return (also when the math raises).
        """
        with full_fp32_matmul():
            return self._matrix_updates(group, grads, states, weights, scratch)

    @classmethod
    def step_size_is_lr(cls, group: Mapping[str, Any]) -> bool:
        """Whether ``matrix_updates``' step sizes are always ``group["lr"]`` for this group
        (then a rank applying an owner's update needs only the update)."""
        return True

    @abc.abstractmethod
    def _matrix_updates(
        self,
        group: dict[str, Any],
        grads: Sequence[Tensor],
        states: Sequence[MutableMapping[str, Any]],
        weights: Optional[Sequence[Tensor]] = None,
        scratch: bool = False,
    ) -> tuple[list[Tensor], StepSizes]:
        """The family's math behind :meth:`matrix_updates` (called with fp32 matmuls pinned)."""

    @classmethod
    @abc.abstractmethod
    def state_elements(cls, m: int, n: int, group: dict[str, Any]) -> int:
        """fp32 elements in the state of an m x n matrix after its first step (planner's memory model)."""

    # ----- cost model: what owning one m x n matrix costs (ownership, staggering, planner) --
    @classmethod
    @abc.abstractmethod
    def step_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """FLOPs of one plain step of an m x n matrix with these (resolved) options."""

    @classmethod
    def refresh_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """FLOPs of one basis/root refresh of an m x n matrix (0: the family has none)."""
        return 0.0

    @classmethod
    def amortized_flops(cls, m: int, n: int, group: dict[str, Any]) -> float:
        """Per-step work of owning an m x n matrix: a step plus its share of a refresh
        (what ownership balances across ranks)."""
        return cls.step_flops(m, n, group) + cls.refresh_flops(m, n, group) / max(1, int(group.get("update_freq", 1)))

    @property
    def phase_planner(self) -> "PhasePlanner":
        """Refresh phases for ``stagger_refresh`` (one planner per optimizer, across calls)."""
        if getattr(self, "_phase_planner", None) is None:
            from .refresh import PhasePlanner

            self._phase_planner = PhasePlanner()
        return self._phase_planner

    def assign_refresh_phases(self, group: dict[str, Any], states: Sequence[MutableMapping[str, Any]],
                              shapes: Sequence[Sequence[int]]) -> None:
        """Give new matrices their refresh phases (``stagger_refresh``), by refresh cost. A caller
        that splits one step's matrices into several ``matrix_updates`` calls (offload streaming)
        assigns them all first, so the phases do not depend on the split."""
        if self._staggers(group):
            self.phase_planner.assign(states, [self.refresh_flops(m, n, group) for m, n in shapes], group["update_freq"])

    @classmethod
    def _staggers(cls, group: Mapping[str, Any]) -> bool:
        return bool(group.get("stagger_refresh", False))

    @property
    def refresh_ahead(self) -> "RefreshAhead":
        """Background decompositions for ``refresh_from="previous"`` (created on first use)."""
        if getattr(self, "_refresh_ahead", None) is None:
            from .refresh import RefreshAhead

            self._refresh_ahead = RefreshAhead()
        return self._refresh_ahead

    def settle(self) -> None:
        """Finish background decompositions into the states (before saving or inspecting them)."""
        if getattr(self, "_refresh_ahead", None) is not None:
            self._refresh_ahead.settle()

    def adam_betas(self, group: dict[str, Any]) -> tuple[float, float]:
        """The elementwise parameters' AdamW betas: ``adam_betas``, else the family's ``betas``."""
        return tuple(group["adam_betas"] if group["adam_betas"] is not None else group["betas"])

    @staticmethod
    def adam_weight_decay(group: dict[str, Any]) -> float:
        """The elementwise parameters' decay: ``adam_weight_decay``, else ``weight_decay``."""
        return group["adam_weight_decay"] if group["adam_weight_decay"] is not None else group["weight_decay"]

    # ----- the step -------------------------------------------------------
    def is_matrix(self, param: Tensor, group: dict[str, Any]) -> bool:
        """2-D+ params of structured groups, unless their name matches ``elementwise_patterns``."""
        ndim = len(param.ds_shape) if hasattr(param, "ds_shape") else param.dim()  # ZeRO-3: local (0,)
        return group["structured"] and ndim >= 2 and param not in self._elementwise_by_name

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self.counts.begin_step()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grad = {p: p.grad for p in params if p.grad is not None}  # (typed: every one has a gradient)
        if any(g.is_sparse for g in grad.values()):
            raise RuntimeError(f"{self.NAME} does not support sparse gradients")
        matrices: list[Tensor] = []
        elementwise: list[Tensor] = []
        for p, (finite, nonzero) in zip(params, grad_flags([grad[p] for p in params])):
            if not finite:
                st = self.state[p]
                st["nonfinite_skips"] = st.get("nonfinite_skips", 0) + 1
                continue
            if not nonzero:
                continue
            (matrices if self.is_matrix(p, group) else elementwise).append(p)
        self.counts.add(structured=len(matrices), elementwise=len(elementwise))

        if elementwise:
            adamw_step(
                elementwise,
                [grad[p] for p in elementwise],
                [self.state[p] for p in elementwise],
                lr=group["lr"],
                betas=self.adam_betas(group),
                eps=group["adam_eps"],
                weight_decay=self.adam_weight_decay(group),
            )
        if matrices:
            grads = [as_matrix(grad[p].float()) for p in matrices]
            states = [self.state[p] for p in matrices]
            updates, step_sizes = self.matrix_updates(group, grads, states, weights=matrices)
            apply_updates(matrices, updates, step_sizes, group["weight_decay"])

    # ----- introspection --------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters summed over all parameters, the optimizer-state size in bytes, and what the
        last step updated how (``update_counts``)."""
        return {**sum_counters(self.state.values()), "state_bytes": self.state_bytes(), **self.counts.metrics()}

    def state_bytes(self) -> int:
        return state_bytes(self.state.values())

    # ----- checkpoints ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping our fp32 state fp32 (torch would cast it to a bf16 param's dtype) and unaliased."""
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            self.state[p] = {
                k: (val.to(device=p.device).clone() if isinstance(val, Tensor) else copy.deepcopy(val))
                for k, val in saved_state[pid].items()
            }


def sum_counters(states: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """COUNTERS summed over per-parameter states. A counter kept on the device (ASGO's
    Newton-Schulz fallbacks, counted without a host read each step) is read here, all of
    them in one host read."""
    out = {k: 0 for k in COUNTERS}
    on_device: dict[str, list[Tensor]] = {k: [] for k in COUNTERS}
    for st in states:
        for k in COUNTERS:
            v = st.get(k, 0)
            if isinstance(v, Tensor):
                on_device[k].append(v.reshape(()).float())
            else:
                out[k] += int(v)
    keys = [k for k in COUNTERS if on_device[k]]
    if keys:
        totals = torch.stack([torch.stack(on_device[k]).sum() for k in keys]).tolist()
        for k, t in zip(keys, totals):
            out[k] += int(round(t))
    return out


def state_bytes(states: Iterable[Mapping[str, Any]]) -> int:
    """Bytes of the state tensors (counters are bookkeeping, not state, wherever they live)."""
    return sum(t.numel() * t.element_size() for st in states for k, t in st.items()
               if isinstance(t, Tensor) and k not in COUNTERS)


StepSizes = Union[list[float], Tensor]  # see StructuredOptimizer.matrix_updates


def apply_updates(params: Sequence[Tensor], updates: Sequence[Tensor], step_sizes: Union[Sequence[float], Tensor],
                  weight_decay: float, fp32_alike: bool = False) -> None:
    """W <- W (1 - lr_i wd) - lr_i U_i in fp32 (updates are owned scratch tensors, scaled in place).

    ``step_sizes``: Python floats, or one fp32 device tensor with an entry per parameter (sizes
    that live on the device, e.g. Adafactor's relative step or an owner's message: applied
    without reading them back to the host). ``fp32_alike``: the caller knows every parameter is
    fp32 and shaped like its update (a distributed rank's 1-D pieces), so no per-tensor dtype
    read or reshape is made (at ZeRO-3 a rank applies a piece of every matrix)."""
    weights32 = list(params) if fp32_alike else [p if p.dtype == torch.float32 else p.float() for p in params]
    if isinstance(step_sizes, Tensor):
        if weight_decay != 0:
            torch._foreach_mul_(weights32, list((1.0 - step_sizes * weight_decay).unbind()))
        torch._foreach_mul_(list(updates), list((-step_sizes).unbind()))
    else:
        if weight_decay != 0:
            torch._foreach_mul_(weights32, [1.0 - lr * weight_decay for lr in step_sizes])
        torch._foreach_mul_(list(updates), [-lr for lr in step_sizes])
    torch._foreach_add_(weights32, list(updates) if fp32_alike else [u.view_as(w) for u, w in zip(updates, weights32)])
    if not fp32_alike:
        for p, w in zip(params, weights32):
            if w is not p:
                p.copy_(w)
