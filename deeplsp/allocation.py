"""Per-group keep counts that minimise accuracy damage under a latency budget.

Choosing one option (keep k channels) per prunable group, minimising the summed
sensitivity subject to ``base + sum(latency) <= budget``, is a multiple-choice knapsack.
``allocate(method="dp")`` solves it by dynamic programming over a discretised latency
axis; ``method="lagrangian"`` is a fast convex-hull heuristic, also used as a cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deeplsp.errors import DeepLSPError

METHODS = ("dp", "lagrangian")
_MAX_CELLS = 20_000_000  # (groups + options) * latency bins: bounds the DP's memory
_REL = 1e-9  # relative budget slack for float rounding of summed milliseconds
_EPS = 1e-9  # in bins: float error, e.g. (0.4 - 0.1) / 0.1 = 3.0000000000000004


@dataclass(frozen=True)
class Option:
    """One candidate for a group: keep ``keep`` channels at ``cost`` loss and ``latency`` ms."""

    keep: int
    cost: float
    latency: float


@dataclass(frozen=True)
class Allocation:
    """The chosen option per group, with the true (not discretised) totals."""

    choice: dict[str, Option]
    cost: float
    latency: float
    budget: float
    method: str

    def keeps(self) -> dict[str, int]:
        """Group id -> channels kept, what the pruner applies."""
        return {g: o.keep for g, o in self.choice.items()}

    def to_dict(self) -> dict:
        """JSON-ready form for reports."""
        return {
            "method": self.method,
            "budget_ms": self.budget,
            "latency_ms": self.latency,
            "cost": self.cost,
            "keeps": self.keeps(),
            "choice": {
                g: {"keep": o.keep, "cost": o.cost, "latency": o.latency}
                for g, o in self.choice.items()
            },
        }


class InfeasibleBudget(DeepLSPError):
    """Even the fastest option of every group misses the budget."""

    def __init__(self, budget_ms: float, min_latency: float) -> None:
        self.budget_ms, self.min_latency = budget_ms, min_latency
        super().__init__(
            f"budget {budget_ms:g} ms is below the smallest reachable latency {min_latency:g} ms"
        )


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise DeepLSPError(f"{name} must be a finite number >= 0, got {value!r}")


def _validate(options: Mapping[str, Sequence[Option]], base_ms: float) -> None:
    _finite("base_ms", base_ms)
    for g, opts in options.items():
        if len(opts) == 0:
            raise DeepLSPError(f"group {g!r} has no options")
        for o in opts:
            _finite(f"cost of group {g!r} keep={o.keep}", o.cost)
            _finite(f"latency of group {g!r} keep={o.keep}", o.latency)


def _result(choice: dict[str, Option], base_ms: float, budget_ms: float, method: str) -> Allocation:
    cost = math.fsum(o.cost for o in choice.values())
    latency = base_ms + math.fsum(o.latency for o in choice.values())
    return Allocation(choice, cost, latency, budget_ms, method)


def min_latency(options: Mapping[str, Sequence[Option]], base_ms: float = 0.0) -> float:
    """The smallest reachable latency: base plus every group's fastest option."""
    _validate(options, base_ms)
    return base_ms + math.fsum(min(o.latency for o in opts) for opts in options.values())


def allocate(
    options: Mapping[str, Sequence[Option]],
    budget_ms: float,
    base_ms: float = 0.0,
    *,
    method: str = "dp",
    resolution_ms: float | None = None,
) -> Allocation:
    """Pick one option per group minimising total cost with ``base + latency <= budget_ms``.

    ``dp`` is exact on a latency grid of ``resolution_ms`` (default ``(budget - base) / 4000``,
    at least 1e-6). Each option's latency above its group's fastest one is rounded *up* to the
    grid, so a grid-feasible answer is feasible on the true latencies: rounding can only make
    it conservative, optimal to within one bin per group (its cost is at most the optimum for
    ``budget - groups * resolution``). The latency the rounding left unused is then spent on
    cheaper swaps. ``lagrangian`` is feasible but may be suboptimal (convex-hull points only).
    Equal costs go to the faster option; groups are visited in the given order. Budgets are met up
    to float rounding (relative 1e-9), so ``0.1 + 0.2`` ms fits a 0.3 ms budget.
    """
    if method not in METHODS:
        raise DeepLSPError(
            f"unknown allocation method {method!r}; choose from: {', '.join(METHODS)}"
        )
    if not math.isfinite(budget_ms) or budget_ms <= 0:
        raise DeepLSPError(f"budget_ms must be a finite number > 0, got {budget_ms!r}")
    if resolution_ms is not None and not (math.isfinite(resolution_ms) and resolution_ms > 0):
        raise DeepLSPError(f"resolution_ms must be a finite number > 0, got {resolution_ms!r}")
    lo = min_latency(options, base_ms)
    cap = budget_ms * (1 + _REL)
    if lo > cap:
        raise InfeasibleBudget(budget_ms, lo)
    if method == "lagrangian":
        return _result(_lagrangian(options, cap, base_ms), base_ms, budget_ms, method)
    res = resolution_ms if resolution_ms is not None else max((budget_ms - base_ms) / 4000, 1e-6)
    choice = _spend_slack(_dp(options, cap - lo, res), options, cap, base_ms)
    return _result(choice, base_ms, budget_ms, method)


def _dp(options: Mapping[str, Sequence[Option]], slack: float, res: float) -> dict[str, Option]:
    """Min cost over groups, f[b] = best cost using at most b bins above the fastest choices."""
    bins = math.floor(max(slack, 0.0) / res)
    widest = max((len(opts) for opts in options.values()), default=1)
    if (len(options) + widest) * (bins + 1) > _MAX_CELLS:
        raise DeepLSPError(f"resolution_ms={res:g} is too fine ({bins} latency bins); coarsen it")
    f = np.zeros(bins + 1)
    back = np.empty((len(options), bins + 1), dtype=np.min_scalar_type(widest))
    steps: list[list[int]] = []
    for gi, opts in enumerate(options.values()):
        fastest = min(o.latency for o in opts)
        d = [math.ceil((o.latency - fastest) / res - _EPS) for o in opts]
        order = sorted(range(len(opts)), key=lambda j: (opts[j].latency, opts[j].cost, j))
        cand = np.full((len(opts), bins + 1), np.inf)
        for r, j in enumerate(order):  # ties go to the earliest row: the faster option
            if d[j] <= bins:
                cand[r, d[j] :] = f[: bins + 1 - d[j]] + opts[j].cost
        rows = np.argmin(cand, axis=0)
        back[gi] = np.asarray(order)[rows]
        f = cand[rows, np.arange(bins + 1)]
        steps.append(d)
    choice: dict[str, Option] = {}
    b = bins
    for gi, (g, opts) in reversed(list(enumerate(options.items()))):
        j = int(back[gi, b])
        choice[g] = opts[j]
        b -= steps[gi][j]
    return {g: choice[g] for g in options}


def _spend_slack(
    choice: dict[str, Option], options: Mapping[str, Sequence[Option]], budget: float, base: float
) -> dict[str, Option]:
    """Rounding up leaves up to a bin per group unused: spend it on the best cheaper swaps.

    Each swap lowers the cost and keeps the true latency within budget, so this only helps.
    """
    while True:
        used = base + math.fsum(o.latency for o in choice.values())
        swaps = [
            (choice[g].cost - o.cost, g, o)
            for g, opts in options.items()
            for o in opts
            if o.cost < choice[g].cost and o.latency - choice[g].latency <= budget - used
        ]
        if not swaps:
            return choice
        _, g, o = max(swaps, key=lambda s: s[0])  # the first of equal gains: deterministic
        choice = {**choice, g: o}


def _lagrangian(
    options: Mapping[str, Sequence[Option]], budget_ms: float, base_ms: float
) -> dict[str, Option]:
    """Smallest lambda >= 0 whose per-group argmin of cost + lambda * latency fits the budget."""

    def pick(lam: float) -> dict[str, Option]:
        return {
            g: min(opts, key=lambda o: (o.cost + lam * o.latency, o.cost, o.latency))
            for g, opts in options.items()
        }

    def fits(choice: dict[str, Option]) -> bool:
        return base_ms + math.fsum(o.latency for o in choice.values()) <= budget_ms

    if fits(best := pick(0.0)):
        return best
    lo, hi = 0.0, 1.0
    while not fits(best := pick(hi)):
        lo, hi = hi, hi * 2
        if hi > 1e300:  # costs dwarf any lambda: fall back to the fastest options
            return {g: min(os, key=lambda o: (o.latency, o.cost)) for g, os in options.items()}
    for _ in range(100):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        if fits(choice := pick(mid)):
            hi, best = mid, choice
        else:
            lo = mid
    return best
