import itertools
import json
import math
import random

import pytest

from deeplsp.allocation import (
    Allocation,
    InfeasibleBudget,
    Option,
    allocate,
    min_latency,
)
from deeplsp.errors import DeepLSPError

REL = 1e-9  # budgets are met up to this relative float rounding


def brute_force(options, budget, base=0.0):
    """Optimal cost by enumeration, or None when nothing fits."""
    best = None
    for combo in itertools.product(*options.values()):
        if base + math.fsum(o.latency for o in combo) <= budget * (1 + REL):
            cost = math.fsum(o.cost for o in combo)
            best = cost if best is None else min(best, cost)
    return best


def random_instance(seed, tenths=False):
    """2-5 groups of 1-5 options, keep-all first at cost 0; latencies on a 0.1 ms grid if tenths."""
    rng = random.Random(seed)
    options = {}
    for g in range(rng.randint(2, 5)):
        n = rng.randint(1, 5)
        keeps = sorted(rng.sample(range(1, 65), n), reverse=True)
        opts = []
        for i, k in enumerate(keeps):
            lat = rng.randint(0, 50) / 10 if tenths else rng.uniform(0.0, 5.0)
            opts.append(Option(k, 0.0 if i == 0 else rng.uniform(0.0, 2.0), lat))
        options[f"g{g}"] = opts
    base = rng.randint(0, 20) / 10 if tenths else rng.uniform(0.0, 2.0)
    lo = min_latency(options, base)
    hi = base + sum(max(o.latency for o in opts) for opts in options.values())
    budget = lo + rng.random() * (hi - lo)
    if tenths:
        return options, max(math.floor(budget * 10) / 10, 0.1), base
    return options, max(budget, 1e-3), base


def check_valid(alloc, options, budget, base, method):
    assert isinstance(alloc, Allocation) and alloc.method == method and alloc.budget == budget
    assert list(alloc.choice) == list(options)
    assert all(alloc.choice[g] in opts for g, opts in options.items())
    assert alloc.cost == pytest.approx(sum(o.cost for o in alloc.choice.values()))
    assert alloc.latency == pytest.approx(base + sum(o.latency for o in alloc.choice.values()))
    assert alloc.latency <= budget * (1 + REL)


@pytest.mark.parametrize("bins", [None, 7])
@pytest.mark.parametrize("seed", range(200))
def test_dp_matches_brute_force_within_one_bin_per_group(seed, bins):
    options, budget, base = random_instance(seed)
    res = (budget - base) / bins if bins else max((budget - base) / 4000, 1e-6)
    dp = allocate(options, budget, base, resolution_ms=res if bins else None)
    check_valid(dp, options, budget, base, "dp")
    assert dp.cost >= brute_force(options, budget, base) - 1e-12
    tightened = brute_force(options, budget - len(options) * res, base)
    if tightened is not None:
        assert dp.cost <= tightened + 1e-12


@pytest.mark.parametrize("seed", range(200))
def test_dp_is_exact_on_grid_latencies_and_lagrangian_is_feasible_and_no_better(seed):
    options, budget, base = random_instance(seed, tenths=True)
    dp = allocate(options, budget, base, resolution_ms=0.1)
    lag = allocate(options, budget, base, method="lagrangian")
    check_valid(dp, options, budget, base, "dp")
    check_valid(lag, options, budget, base, "lagrangian")
    assert dp.cost == pytest.approx(brute_force(options, budget, base), abs=1e-12)
    assert lag.cost >= dp.cost - 1e-12


@pytest.mark.parametrize("seed", range(100))
def test_lagrangian_on_float_latencies_is_feasible_and_not_below_optimum(seed):
    options, budget, base = random_instance(seed + 1000)
    lag = allocate(options, budget, base, method="lagrangian")
    check_valid(lag, options, budget, base, "lagrangian")
    assert lag.cost >= brute_force(options, budget, base) - 1e-12


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_float_rounding_of_summed_milliseconds_does_not_break_the_budget(method):
    options = {"a": [Option(8, 0.0, 0.1), Option(4, 1.0, 0.0)], "b": [Option(8, 0.0, 0.2)]}
    assert 0.1 + 0.2 > 0.3
    assert allocate(options, 0.3, method=method).keeps() == {"a": 8, "b": 8}


def test_latencies_on_the_grid_are_not_pushed_up_a_bin_by_float_error():
    # (0.4 - 0.1) / 0.1 == 3.0000000000000004 must stay 3 bins, or the optimum a8+b6 (0.6 ms)
    # looks 4 + 1 > 3 bins and the DP settles for a4+b8 at cost 1.0
    options = {
        "a": [Option(8, 0.0, 0.4), Option(4, 1.0, 0.1)],
        "b": [Option(8, 0.0, 0.3), Option(6, 0.3, 0.2)],
    }
    alloc = allocate(options, 0.6, resolution_ms=0.1)
    assert alloc.keeps() == {"a": 8, "b": 6} and alloc.cost == pytest.approx(0.3)


def sensitivity_table():
    def group(costs):
        return [Option(64, costs[0], 4.0), Option(32, costs[1], 2.0), Option(16, costs[2], 1.0)]

    return {"conv1": group([0.0, 0.5, 2.0]), "conv2": group([0.0, 0.05, 0.2])}


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_groups_with_different_sensitivity_get_different_keep_ratios(method):
    # group latency <= 5 ms: uniform 32/32 costs 0.55, but keeping the sensitive conv1 whole
    # and pruning the robust conv2 to 16 costs 0.2
    alloc = allocate(sensitivity_table(), 6.0, base_ms=1.0, method=method)
    assert alloc.keeps() == {"conv1": 64, "conv2": 16}
    assert alloc.cost == pytest.approx(0.2) and alloc.latency == 6.0


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_budget_equal_to_min_latency_returns_the_fastest_choices(method):
    options = sensitivity_table()
    options["fc"] = [Option(10, 0.0, 0.3)]  # a single option is fine
    budget = min_latency(options, 0.7)
    assert budget == pytest.approx(3.0)
    alloc = allocate(options, budget, 0.7, method=method)
    assert alloc.keeps() == {"conv1": 16, "conv2": 16, "fc": 10}
    assert alloc.latency == budget and alloc.cost == pytest.approx(2.2)


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_fastest_choice_prefers_lower_cost_among_equally_fast_options(method):
    options = {"g": [Option(8, 0.0, 3.0), Option(4, 0.9, 1.0), Option(6, 0.4, 1.0)]}
    assert allocate(options, 1.0, method=method).keeps() == {"g": 6}


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_equal_cost_goes_to_the_faster_option(method):
    # pruning 64 -> 48 measured no loss: take the latency for free
    options = {"g": [Option(64, 0.0, 4.0), Option(48, 0.0, 3.0), Option(32, 0.3, 2.0)]}
    alloc = allocate(options, 100.0, method=method)
    assert alloc.keeps() == {"g": 48} and alloc.latency == 3.0


def test_lagrangian_stays_feasible_when_costs_dwarf_any_lambda():
    # no finite lambda makes 1.5e308 + lambda < 2 * lambda: it falls back to the fastest options
    g = [Option(8, 0.0, 2.0), Option(5, 1.7e308, 1.0), Option(4, 1.5e308, 1.0)]
    alloc = allocate({"g": g, "h": [Option(2, 0.0, 0.0)]}, 1.0, method="lagrangian")
    assert alloc.keeps() == {"g": 4, "h": 2} and alloc.latency == 1.0


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_budget_below_min_latency_raises_with_the_smallest_reachable_latency(method):
    options = sensitivity_table()
    with pytest.raises(InfeasibleBudget) as info:
        allocate(options, 2.5, base_ms=0.75, method=method)
    assert isinstance(info.value, DeepLSPError)
    assert info.value.min_latency == pytest.approx(2.75)
    assert str(info.value) == "budget 2.5 ms is below the smallest reachable latency 2.75 ms"


@pytest.mark.parametrize("method", ["dp", "lagrangian"])
def test_generous_budget_keeps_everything(method):
    alloc = allocate(sensitivity_table(), 100.0, base_ms=1.0, method=method)
    assert alloc.keeps() == {"conv1": 64, "conv2": 64}
    assert alloc.cost == 0.0 and alloc.latency == 9.0


def test_latency_left_unused_by_rounding_up_is_spent_on_cheaper_options():
    # on a 0.3 ms grid the 1 ms option rounds up to 4 bins > the 3 that fit; it still fits truly
    options = {"a": [Option(8, 0.0, 1.0), Option(4, 1.0, 0.0)], "b": [Option(2, 0.0, 0.0)]}
    alloc = allocate(options, 1.0, resolution_ms=0.3)
    assert alloc.keeps() == {"a": 8, "b": 2} and alloc.cost == 0.0 and alloc.latency == 1.0


def test_to_dict_is_json_ready():
    alloc = allocate(sensitivity_table(), 6.0, base_ms=1.0)
    d = json.loads(json.dumps(alloc.to_dict()))
    assert d["method"] == "dp" and d["budget_ms"] == 6.0 and d["latency_ms"] == 6.0
    assert d["keeps"] == {"conv1": 64, "conv2": 16}
    assert d["choice"]["conv2"] == {"keep": 16, "cost": 0.2, "latency": 1.0}


def test_same_input_same_output_in_group_order():
    options, budget, base = random_instance(7)
    a, b = allocate(options, budget + 1, base), allocate(options, budget + 1, base)
    assert a == b and list(a.choice) == list(options)


@pytest.mark.parametrize(
    ("options", "budget", "kwargs", "match"),
    [
        ({"g": []}, 5.0, {}, "group 'g' has no options"),
        ({"g": [Option(4, -0.1, 1.0)]}, 5.0, {}, "cost of group 'g' keep=4 must be"),
        ({"g": [Option(4, 0.1, -1.0)]}, 5.0, {}, "latency of group 'g' keep=4 must be"),
        ({"g": [Option(4, math.nan, 1.0)]}, 5.0, {}, "cost of group 'g'"),
        ({"g": [Option(4, 0.0, math.nan)]}, 5.0, {}, "latency of group 'g'"),
        ({"g": [Option(4, 0.0, 1.0)]}, 0.0, {}, "budget_ms must be a finite number > 0"),
        ({"g": [Option(4, 0.0, 1.0)]}, -3.0, {}, "budget_ms must be"),
        ({"g": [Option(4, 0.0, 1.0)]}, math.nan, {}, "budget_ms must be"),
        ({"g": [Option(4, 0.0, 1.0)]}, 5.0, {"base_ms": math.nan}, "base_ms must be"),
        ({"g": [Option(4, 0.0, 1.0)]}, 5.0, {"resolution_ms": 0.0}, "resolution_ms must be"),
        ({"g": [Option(4, 0.0, 1.0)]}, 5.0, {"method": "greedy"}, "choose from: dp, lagrangian"),
        ({"g": [Option(4, 0.0, 0.0)]}, 100.0, {"resolution_ms": 1e-6}, "too fine"),
    ],
)
def test_bad_input_is_a_one_line_error(options, budget, kwargs, match):
    with pytest.raises(DeepLSPError, match=match) as info:
        allocate(options, budget, **kwargs)
    assert not isinstance(info.value, InfeasibleBudget)
    assert "\n" not in str(info.value)


def test_min_latency_validates_too():
    with pytest.raises(DeepLSPError, match="group 'g' has no options"):
        min_latency({"g": []})


def test_large_instance_is_solved_feasibly_and_no_worse_than_lagrangian():
    rng = random.Random(0)
    options = {}
    for g in range(60):
        scale = rng.uniform(0.01, 1.0)  # per-group sensitivity
        lat_full = rng.uniform(0.5, 3.0)
        keeps = [256 - 20 * i for i in range(12)]
        options[f"layer{g}"] = [
            Option(k, scale * (1 - k / 256) ** 2, lat_full * (0.2 + 0.8 * k / 256)) for k in keeps
        ]
    base = 5.0
    full = base + sum(opts[0].latency for opts in options.values())
    budget = base + 0.6 * (full - base)
    dp = allocate(options, budget, base)
    check_valid(dp, options, budget, base, "dp")
    res = (budget - base) / 4000
    # the DP is optimal to within one bin per group, so it beats any answer that fits a budget
    # tightened by that much, the Lagrangian's included
    lag = allocate(options, budget - len(options) * res, base, method="lagrangian")
    assert lag.latency <= (budget - len(options) * res) * (1 + REL)
    assert dp.cost <= lag.cost + 1e-12
    assert dp.cost > 0  # the budget forces pruning
