"""Adaptive SP planning: the cost formula, bounds, the planner against brute force, errors, plan-sp."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from distrain.parallel.sp.bounds import relaxed_lower_bound
from distrain.parallel.sp.cost import REFERENCE_7B, CostModelError, SPCosts, check_plan, lower_bound, makespan, mape
from distrain.parallel.sp.plan import PlanAhead, PlanError, SequenceTooLongError, SPPlan
from distrain.parallel.sp.planner import (
    allowed_degrees,
    best_homogeneous,
    bucket_lengths,
    homogeneous_plan,
    plan_step,
)

# Small made-up costs where communication, compute and the fixed cost all matter.
COSTS = SPCosts(alpha1=2e-6, alpha2=1e-3, beta1=0.05, alltoall_gbps={2: 2.0, 4: 1.0, 8: 0.5},
                bytes_per_token_alltoall=4e6, memory_per_token=1e6)


# ---- the formula ------------------------------------------------------------------------------


def test_group_time_follows_the_documented_formula():
    c = COSTS
    lens = [100, 300]
    d, v = 2, 0.5
    by_hand = (c.beta1 + sum(c.alpha1 * s * s + c.alpha2 * s for s in lens) / d) / v + \
        sum(c.bytes_per_token_alltoall * s / (d * 2.0 * 1e9) for s in lens)
    assert c.group_s(lens, d, v) == pytest.approx(by_hand, rel=1e-12)
    assert c.group_s([], 4) == 0.0
    assert c.comm_s(1000, 1) == 0.0  # one device: no all-to-all
    # not profiled: the next larger size's bandwidth; beyond the largest: the largest's
    assert c.bandwidth_gbps(3) == 1.0 and c.bandwidth_gbps(16) == 0.5
    # group of devices 1,3 (speeds 1.0 and 0.5) runs at 0.5; the makespan is the slowest group
    groups, asg = [[0], [1, 3]], [0, 1, 1]
    speeds = [1.0, 1.0, 1.0, 0.5]
    assert makespan(groups, asg, [50, 100, 300], c, speeds, 4) == pytest.approx(max(c.group_s([50], 1), by_hand))
    assert mape([1.1, 0.8], [1.0, 1.0]) == pytest.approx(0.15)


def test_costs_json_roundtrip_and_errors(tmp_path):
    p = COSTS.save(tmp_path / "c.json")
    assert SPCosts.load(p) == COSTS
    d = COSTS.to_dict()
    with pytest.raises(CostModelError, match="missing cost keys"):
        SPCosts.from_dict({k: v for k, v in d.items() if k != "beta1"})
    with pytest.raises(CostModelError, match="unknown cost keys"):
        SPCosts.from_dict({**d, "gamma": 1.0})
    with pytest.raises(CostModelError, match="alpha2 must be a finite number >= 0"):
        SPCosts.from_dict({**d, "alpha2": -1.0})
    with pytest.raises(CostModelError, match=r"alltoall_gbps\[2\] must be a positive number"):
        SPCosts.from_dict({**d, "alltoall_gbps": {"2": 0}})
    with pytest.raises(CostModelError, match="group size >= 2"):
        SPCosts.from_dict({**d, "alltoall_gbps": {"1": 3.0}})
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CostModelError, match="not JSON"):
        SPCosts.load(tmp_path / "bad.json")


# ---- brute force ------------------------------------------------------------------------------


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part  # first in a block of its own
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def brute_force(lengths, n, costs, degrees, speeds=None, capacity=None):
    """The optimum over every partition of every subset of devices and every assignment."""
    speeds = np.ones(n) if speeds is None else np.asarray(speeds, float)
    cap = np.full(n, np.inf) if capacity is None else np.broadcast_to(np.asarray(capacity, float), (n,))
    L = np.asarray(lengths)
    best = np.inf
    seen = set()
    for part in _set_partitions(list(range(n)) + [None]):  # the block holding None is "idle devices"
        groups = [sorted(b) for b in part if None not in b]
        if not groups or any(len(g) not in degrees for g in groups):
            continue
        key = tuple(sorted((len(g), speeds[g].min(), cap[g].min()) for g in groups))
        if key in seen:
            continue
        seen.add(key)
        G = len(groups)
        T = np.array([[costs.seq_s(s, len(g), speeds[g].min()) for g in groups] for s in L])
        oh = np.array([costs.beta1 / speeds[g].min() for g in groups])
        room = np.array([len(g) * cap[g].min() for g in groups])
        A = np.array(list(itertools.product(range(G), repeat=L.size)))
        onehot = A[:, :, None] == np.arange(G)[None, None, :]  # (n_asg, B, G)
        load = (onehot * T[None]).sum(1) + onehot.any(1) * oh
        tok = (onehot * L[None, :, None]).sum(1)
        load[(tok > room[None]).any(1)] = np.inf
        best = min(best, load.max(1).min())
    return best


CASES = [
    # (lengths, n devices, degrees, speeds, capacity)
    ([900, 60, 60, 50, 40], 4, [1, 2, 3, 4], None, None),
    ([1200, 700, 300, 80, 80], 4, [1, 2, 4], None, 700),
    ([400, 400, 390, 20, 10], 3, [1, 2, 3], None, 450),
    ([1500, 100, 90, 80, 70, 60], 4, [1, 2, 3, 4], None, 600),
    ([800, 500, 200, 100, 50], 4, [1, 2, 4], [1.0, 1.0, 0.5, 0.5], None),
    ([1000, 300, 200, 150, 100], 4, [1, 2], [1.0, 1.0, 0.5, 0.5], 600),
]


@pytest.mark.parametrize("solver", ["highspy", "scipy"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_plan_equals_the_brute_force_optimum_on_small_instances(case, solver):
    if solver == "highspy":
        pytest.importorskip("highspy")
    lengths, n, degrees, speeds, cap = CASES[case]
    plan = plan_step(lengths, n, COSTS, degrees=degrees, speeds=speeds, capacity=cap, time_limit_s=20, mip_gap=1e-9,
                     solver=solver)
    check_plan(plan.groups, plan.assignment, lengths, n, cap, degrees)
    opt = brute_force(lengths, n, COSTS, degrees, speeds, cap)
    assert plan.predicted_step_s == pytest.approx(opt, rel=1e-6)
    assert plan.status == "optimal"
    cheap = lower_bound(lengths, COSTS, n, degrees, speeds, cap)
    tight = relaxed_lower_bound(lengths, COSTS, n, degrees, speeds, cap)
    assert cheap <= tight <= opt * (1 + 1e-9)


def test_plan_on_a_real_batch_is_feasible_and_its_prediction_is_the_formula():
    rng = np.random.default_rng(3)
    pool = np.minimum(rng.pareto(1.1, 2000) * 300 + 16, 40_000).astype(int)
    n, cap = 16, 6000
    lengths = pool[: np.searchsorted(np.cumsum(pool), 0.7 * n * cap)].tolist()  # a token-budget batch
    degrees = allowed_degrees(32, n)
    plan = plan_step(lengths, n, REFERENCE_7B, degrees=degrees, capacity=cap, time_limit_s=0.5)
    check_plan(plan.groups, plan.assignment, lengths, n, cap, degrees)
    assert sorted(k for g in range(len(plan.groups)) for k in plan.sequences_of(g)) == list(range(len(lengths)))
    assert sum(len(g) for g in plan.groups) <= n
    assert plan.predicted_step_s == makespan(plan.groups, plan.assignment, lengths, REFERENCE_7B, None, n)
    lb = lower_bound(lengths, REFERENCE_7B, n, degrees, capacity=cap)
    hom = best_homogeneous(lengths, n, REFERENCE_7B, degrees, capacity=cap)
    assert lb <= plan.predicted_step_s <= hom[1].predicted_step_s
    assert plan.status in ("optimal", "time_limit", "greedy")


def test_non_power_of_two_and_size_one_groups_are_used_when_they_pay():
    # 6 devices with memory for 500 tokens each; groups of 4+ cross a slow link. The 1400-token
    # sequence needs 3 devices, each 400-token one fits a device of its own: 3 + 1 + 1 + 1.
    costs = SPCosts(alpha1=2e-6, alpha2=1e-3, beta1=0.05, alltoall_gbps={2: 2.0, 3: 2.0, 4: 0.2, 8: 0.2},
                    bytes_per_token_alltoall=4e6)
    lengths = [1400, 400, 400, 400]
    plan = plan_step(lengths, 6, costs, capacity=500, time_limit_s=10, mip_gap=1e-9)
    assert 3 in [len(g) for g in plan.groups], plan.groups  # (3,3) ties with (3,1,1,1): both optimal
    assert plan.predicted_step_s == pytest.approx(brute_force(lengths, 6, costs, range(1, 7), None, 500), rel=1e-9)
    shorts = plan_step([300] * 8, 4, costs, capacity=1000, time_limit_s=10, mip_gap=1e-9)
    assert [len(g) for g in shorts.groups] == [1, 1, 1, 1]  # short sequences skip the all-to-all


def test_speed_aware_plan_beats_a_speed_oblivious_one_on_half_speed_devices():
    rng = np.random.default_rng(1)
    lengths = rng.integers(100, 3000, 60).tolist()
    speeds = [1.0] * 4 + [0.5] * 4
    aware = plan_step(lengths, 8, COSTS, speeds=speeds, time_limit_s=1)
    blind = plan_step(lengths, 8, COSTS, time_limit_s=1)
    blind_real = makespan(blind.groups, blind.assignment, lengths, COSTS, speeds, 8)
    assert aware.predicted_step_s == makespan(aware.groups, aware.assignment, lengths, COSTS, speeds, 8)
    assert aware.predicted_step_s < 0.85 * blind_real


def test_a_sequence_longer_than_any_group_is_named():
    with pytest.raises(SequenceTooLongError, match=r"sequence 2 has 5000 tokens, more than the largest group can hold \(4000"):
        plan_step([100, 200, 5000, 10], 4, COSTS, capacity=1000)
    with pytest.raises(SequenceTooLongError, match="sequence 0 has 2100 tokens"):
        plan_step([2100], 4, COSTS, degrees=[1, 2], capacity=1000)  # groups of 4 not allowed
    with pytest.raises(PlanError, match="more than all devices hold together"):
        plan_step([900] * 5, 4, COSTS, capacity=1000)


@pytest.mark.parametrize("lengths, msg", [([], "non-empty"), ([10, 0], "sequence 1 has length 0"),
                                           ([10, 2.5], "sequence 1 has length 2.5")])
def test_bad_lengths_are_named(lengths, msg):
    with pytest.raises(PlanError, match=msg):
        plan_step(lengths, 2, COSTS)


def test_bad_devices_and_speeds():
    with pytest.raises(PlanError, match="n_devices must be a positive integer"):
        plan_step([10], 0, COSTS)
    with pytest.raises(ValueError, match="speeds has 3 entries for 2 devices"):
        plan_step([10], 2, COSTS, speeds=[1, 1, 1])
    with pytest.raises(ValueError, match="speeds must be positive"):
        plan_step([10], 2, COSTS, speeds=[1, 0])
    with pytest.raises(PlanError, match="solver 'gurobi'"):
        plan_step([10], 2, COSTS, solver="gurobi")


def test_bucketing_is_exact_for_few_lengths_and_never_straddles_a_capacity():
    L = np.array([5, 7, 5, 9])
    assert bucket_lengths(L, 4, lambda s: s).tolist() == [0, 1, 0, 2]
    rng = np.random.default_rng(0)
    L = rng.integers(1, 10_000, 500)
    b = bucket_lengths(L, 8, lambda s: s * s, breaks=[2500, 5000])
    assert b.max() + 1 <= 8
    for k in range(b.max() + 1):
        lo, hi = L[b == k].min(), L[b == k].max()
        assert not (lo <= 2500 < hi) and not (lo <= 5000 < hi)
    # buckets are contiguous ranges of the sorted lengths
    order = np.argsort(L, kind="stable")
    assert np.all(np.diff(b[order]) >= 0)


def test_homogeneous_and_static_baselines():
    lengths = [3000, 200, 200, 100]
    assert homogeneous_plan(lengths, 4, COSTS, 1, capacity=1000) is None  # 3000 tokens fit no single device
    d, plan = best_homogeneous(lengths, 4, COSTS, [1, 2, 4], capacity=1000)
    assert d == 4 and [len(g) for g in plan.groups] == [4]


def test_plan_ahead_runs_in_the_background_and_plans_survive_json():
    with PlanAhead(lambda ls: plan_step(ls, 4, COSTS, time_limit_s=0.5)) as ahead:
        ahead.submit(1, [500, 40, 30])
        ahead.submit(2, [10, 20])
        p1, p2 = ahead.result(1, timeout=30), ahead.result(2, timeout=30)
        with pytest.raises(PlanError, match="no plan was submitted for step 3"):
            ahead.result(3)
    assert len(p1.assignment) == 3 and len(p2.assignment) == 2
    again = SPPlan.from_dict(json.loads(json.dumps(p1.to_dict())))
    assert again == p1
    with pytest.raises(PlanError, match="status 'maybe'"):
        SPPlan.from_dict({**p1.to_dict(), "status": "maybe"})


# ---- distrain plan-sp -------------------------------------------------------------------------


def test_plan_sp_json_contract(tmp_path):
    lengths_file = tmp_path / "lens.txt"
    lengths_file.write_text("\n".join(str(x) for x in [30, 5000, 700, 120, 64, 2200, 9000, 350]) + "\n")
    costs = REFERENCE_7B.save(tmp_path / "costs.json")
    cmd = [sys.executable, "-m", "distrain.cli", "plan-sp", "--lengths", str(lengths_file), "--devices", "8",
           "--batch", "12", "--seed", "3", "--capacity", "6000", "--speeds", "1,1,1,1,0.5,0.5,0.5,0.5",
           "--costs", str(costs), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert set(r) == {"groups", "assignment", "lengths", "costs", "predicted_step_s", "best_static",
                      "best_homogeneous_per_batch", "lower_bound_s", "solve_s", "status"}
    assert set(r["costs"]) == {"alpha1", "alpha2", "beta1", "alltoall_gbps", "bytes_per_token_alltoall", "memory_per_token"}
    assert len(r["lengths"]) == 12 and len(r["assignment"]) == 12
    speeds = [1.0] * 4 + [0.5] * 4
    costs_back = SPCosts.from_dict(r["costs"])
    assert r["predicted_step_s"] == makespan(r["groups"], r["assignment"], r["lengths"], costs_back, speeds, 8)
    check_plan(r["groups"], r["assignment"], r["lengths"], 8, 6000)
    assert r["lower_bound_s"] <= r["predicted_step_s"] <= r["best_homogeneous_per_batch"]["predicted_step_s"] + 1e-12
    assert r["best_homogeneous_per_batch"]["predicted_step_s"] <= r["best_static"]["predicted_step_s"] + 1e-12
    assert r["best_static"]["degree"] * 6000 >= 9000  # a static degree must hold the file's longest length
    assert r["status"] in ("optimal", "time_limit", "greedy")
    # the same seed samples the same lengths
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
    assert again["lengths"] == r["lengths"]


def test_plan_sp_errors_are_one_line(tmp_path):
    f = tmp_path / "lens.txt"
    f.write_text("10\nabc\n")
    out = subprocess.run([sys.executable, "-m", "distrain.cli", "plan-sp", "--lengths", str(f), "--devices", "2",
                          "--batch", "4", "--seed", "0", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "line 2" in out.stderr and "abc" in out.stderr
    f.write_text("10\n90000\n")
    out = subprocess.run([sys.executable, "-m", "distrain.cli", "plan-sp", "--lengths", str(f), "--devices", "2",
                          "--batch", "4", "--seed", "0", "--capacity", "1000", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "90000 tokens" in out.stderr and "Traceback" not in out.stderr
