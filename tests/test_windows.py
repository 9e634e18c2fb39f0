"""Rounds with participants of different speeds: windows, step-aware merges, per-step robust bounds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distrain.comm.codecs import Merge, make_codec
from distrain.comm.errors import RoundLateError, SchemaError
from distrain.comm.robust import RobustPolicy, robust_aggregate_inputs
from distrain.comm.simulated import SimulatedHub, SimulatedTransport, run_ranks
from distrain.comm.wire import FrameMeta, decode_frame, encode_frame
from distrain.config import ConfigError, load_config
from distrain.inner.schedule import Window
from distrain.layout import Layout
from distrain.metrics import read_metrics
from distrain.outer.base import Contribution
from distrain.outer.exchange import FrameExchange, merge_of
from distrain.runtime.simulation import Simulation
from distrain.runtime.steps import StepPlanner, update_estimates
from distrain.worker.worker import RoundReport

SHAPES = {"w": (4, 8)}


def plain(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(4, 8)


# ----- the step plan ------------------------------------------------------------------------------
def planner(*overrides: str) -> StepPlanner:
    cfg = load_config(None, ["--outer.algorithm=sparseloco", "--outer.inner_steps=15", "--train.steps=100",
                             "--network.step_time_s=0.25",
                             "--topology.replica=[{count=2}, {speed=0.5}, {kind='pipeline', stages=2}]", *overrides])
    return StepPlanner(cfg, Layout.from_config(cfg))


def test_a_window_gives_each_replica_the_steps_that_fit_at_its_measured_pace():
    p = planner()
    first = p.plan(0, 0.0, [])  # nothing measured: configured speeds, nothing cut short
    assert first.steps == [15, 15, 7, 15] and not first.enforce and first.source == "configured"
    # measured: replica 1 is a little slower than the fastest (still 15: a step may end 1/4 step late),
    # replica 2 at half speed, the pipeline at 0.36 s a step (its bubble and boundaries)
    plan = p.plan(1, 15.0, [0.25, 0.2525, 0.5, 0.36])
    assert plan.window_s == pytest.approx(15 * 0.25)
    assert plan.steps == [15, 15, 7, 10] and plan.enforce and plan.source == "measured"
    assert plan.for_replica(2).steps == 7 and plan.for_replica(2).window_s == pytest.approx(3.75)
    # the last round stands for fewer full-speed steps (100 = 6 x 15 + 10): every count shrinks with it
    last = p.plan(6, 90.0, [0.25, 0.25, 0.5, 0.36])
    assert last.span == 10 and last.steps == [10, 10, 5, 7]
    # a replica's i-th step sits at the run's progress: the slow one's steps are spread over the round
    r = plan.for_replica(2)
    assert [r.progress_at(i) for i in (0, 1, 7)] == pytest.approx([15.0, 15 + 15 / 7, 30.0])


def test_an_explicit_window_and_the_other_policies():
    assert planner("--topology.window_s=5.0").plan(1, 15.0, [0.25, 0.25, 0.5, 0.5]).steps == [20, 20, 10, 10]
    assert planner("--topology.straggler_policy=wait").plan(1, 15.0, [0.25, 0.3, 0.5, 0.36]).steps == [15] * 4
    fewer = planner("--topology.straggler_policy=fewer_steps").plan(6, 90.0, [0.25, 0.3, 0.5, 0.36])
    assert fewer.steps == [10, 10, 5, 10]  # configured speeds, scaled to the last round's 10 steps
    configured = planner("--topology.step_times=configured").plan(1, 15.0, [0.25, 0.3, 0.5, 0.36])
    assert configured.steps == [15, 15, 7, 15] and not configured.enforce


def test_step_time_estimates_average_each_replicas_slowest_worker():
    def rep(rank, replica, steps, steps_s):
        return RoundReport(rank, replica, 0, steps, steps, 0, 0.0, 0.0, 0.0, steps_s=steps_s)

    est = update_estimates([], [rep(0, 0, 10, 2.5), rep(1, 1, 4, 2.0), rep(2, 1, 4, 2.4)], 3)
    assert est == pytest.approx([0.25, 0.6, 0.0])  # replica 2 ran nothing: not measured
    est = update_estimates(est, [rep(0, 0, 10, 3.5), rep(1, 1, 0, 0.0)], 3)
    assert est == pytest.approx([0.3, 0.6, 0.0])


def test_logged_step_counts_are_replayed(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "val", "round": 0}, {"kind": "train", "round": 1, "replica_steps": [15, 15, 6, 9]},
        {"kind": "train", "round": 2, "replica_steps": [15, 14, 7, 10]}]) + "\n{torn")
    p = planner(f"--topology.step_plan={log}")
    assert p.plan(1, 15.0, [0.25] * 4).steps == [15, 14, 7, 10]
    with pytest.raises(ValueError, match="no step counts for round 2"):
        p.plan(2, 30.0, [])


def test_the_window_check_stops_a_replica_that_runs_slower_than_planned():
    w = Window(start=10.0, length_s=3.75, step_s=0.5)  # planned: 7 steps
    assert not w.overrun(10.0 + 6 * 0.5, 0.5)  # after 6 steps the 7th still fits
    assert w.overrun(10.0 + 7 * 0.5, 0.5)  # after 7 an 8th would end 0.25 s (half a step) past the window
    # a worker throttled to 1 s a step: its next step is expected to take as long as its last
    assert not w.overrun(10.0 + 2 * 1.0, 1.0) and w.overrun(10.0 + 3 * 1.0 + 0.01, 1.0)
    assert not w.overrun(10.0 + 3 * 1.0 + 0.01, 0.0)  # judged by the usual pace alone it would go on


@pytest.mark.parametrize("bad,needle", [
    ("--topology.straggler_policy=hurry", "straggler_policy"), ("--topology.window_s=-1", "window_s"),
    ("--topology.grace_s=0", "grace_s"), ("--topology.grace_s=700", "must not exceed"),
    ("--topology.step_times=guessed", "step_times"), ("--topology.step_plan=/no/such/file", "step_plan"),
    ("--outer.merge=median", "outer.merge")])
def test_window_settings_are_checked_at_load(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["--outer.algorithm=sparseloco", "--topology.replicas=2", bad])


# ----- merging unequal work -------------------------------------------------------------------------
def test_merges_of_unequal_work_equal_hand_computed_ones():
    kept = [Contribution(0, {}, 4, 400), Contribution(1, {}, 2, 100), Contribution(2, {}, 1, 100)]
    assert merge_of("mean", kept) is None
    steps = merge_of("steps", kept)  # FedNova: divided by own steps, times the mean count 7/3
    assert steps.scales == pytest.approx((7 / 12, 7 / 6, 7 / 3)) and steps.weights == (1.0, 1.0, 1.0)
    tokens = merge_of("tokens", kept)
    assert tokens.scales == (1.0, 1.0, 1.0) and tokens.weights == pytest.approx((2.0, 0.5, 0.5))
    equal = [Contribution(m, {}, 15, 1000) for m in range(3)]
    assert merge_of("steps", equal) is None and merge_of("tokens", equal) is None  # exactly as without
    # dense: Σ wᵢ·sᵢ·vᵢ / Σ wᵢ
    dense = make_codec("dense", dtype="fp32")
    vals = [torch.full((4, 8), 1.0), torch.full((4, 8), 2.0), torch.full((4, 8), 4.0)]
    parts = [dense.encode("w", v, {}) for v in vals]
    got = dense.decode_aggregate(parts, (4, 8), merge=steps)
    assert torch.allclose(got, torch.full((4, 8), (7 / 12 * 1 + 7 / 6 * 2 + 7 / 3 * 4) / 3))
    got = dense.decode_aggregate(parts, (4, 8), merge=tokens)
    assert torch.allclose(got, torch.full((4, 8), (2.0 * 1 + 0.5 * 2 + 0.5 * 4) / 3.0))
    assert torch.equal(dense.decode_aggregate(parts, (4, 8), merge=Merge((1.0,) * 3, (1.0,) * 3)),
                       dense.decode_aggregate(parts, (4, 8)))


def test_sparse_merges_weigh_each_coordinate_over_its_selectors():
    """mean_selected with weights: Σ over the selectors of wᵢ·sᵢ·vᵢ / Σ over the selectors of wᵢ."""
    codec = make_codec("sparseloco", topk=2, chunk=64, beta=0.0, quantizer="none", aggregation="mean_selected",
                       index_coding="packed")  # one 64x64 block, the 2 largest values of each contribution
    a = torch.zeros(64, 64)
    a[0, 0], a[0, 1] = 3.0, -2.0
    b = torch.zeros(64, 64)
    b[0, 0], b[0, 2] = 1.0, 5.0
    parts = [codec.encode("w", a, {}), codec.encode("w", b, {})]
    assert [len(codec.decode(p)[0]) for p in parts] == [2, 2]
    merge = Merge((0.5, 2.0), (3.0, 1.0))
    got = codec.decode_aggregate(parts, (64, 64), merge=merge)
    assert got[0, 0] == pytest.approx((3 * 0.5 * 3.0 + 1 * 2.0 * 1.0) / 4.0)  # both selected it
    assert got[0, 1] == pytest.approx(0.5 * -2.0)  # only a selected it: its weight cancels
    assert got[0, 2] == pytest.approx(2.0 * 5.0)
    assert float(got.abs().sum()) == pytest.approx(abs(float(got[0, 0])) + 1.0 + 10.0)


def exchange_round(merge: str, steps: list[int], values: list[float]) -> torch.Tensor:
    hub = SimulatedHub(3, {"g": [0, 1, 2]}, timeout_s=30)
    codec = make_codec("dense", dtype="fp32")

    def body(t: SimulatedTransport) -> torch.Tensor:
        ex = FrameExchange(codec, SHAPES, t, "g", "run", t.rank, torch.device("cpu"), RobustPolicy(), merge=merge)
        got = ex.exchange(0, {"w": torch.full((4, 8), values[t.rank])}, {}, steps[t.rank], 100 * steps[t.rank])
        return got.aggregate["w"]

    out = run_ranks(hub, body)
    assert all(torch.equal(out[0], o) for o in out)  # every member merges the same
    return out[0]


def test_the_exchange_merges_what_the_frames_state():
    # replica 2 ran 4 steps and moved 4x as far: per step it is like the others, so it is not clipped
    steps, values = [1, 1, 4], [0.1, 0.1, 0.4]
    assert torch.allclose(exchange_round("mean", steps, values), torch.full((4, 8), 0.2))
    fednova = (1.0 * 2 / 1 * 0.1 * 2 + 2 / 4 * 0.4) / 3  # mean count 2: scales 2, 2, 1/2
    assert torch.allclose(exchange_round("steps", steps, values), torch.full((4, 8), fednova))
    tokens = (0.1 * 100 + 0.1 * 100 + 0.4 * 400) / 600
    assert torch.allclose(exchange_round("tokens", steps, values), torch.full((4, 8), tokens))


def test_more_steps_are_never_clipped():
    codec = make_codec("dense", dtype="fp32")
    contributions = [(m, {"w": codec.encode("w", torch.full((4, 8), v), {})}) for m, v in enumerate([0.1, 0.1, 0.4])]
    per_step = robust_aggregate_inputs(codec, contributions, RobustPolicy(), steps={0: 1, 1: 1, 2: 4})
    assert not per_step.clipped and not per_step.rejected
    as_sent = robust_aggregate_inputs(codec, contributions, RobustPolicy())  # without the work: 4x the median
    assert len(as_sent.clipped) == 1 and as_sent.clipped[0].startswith("member 2")
    # the absolute bound still applies to the whole norm
    huge = [(0, {"w": codec.encode("w", torch.full((4, 8), 1e17), {})})] + contributions[1:]
    assert robust_aggregate_inputs(codec, huge, RobustPolicy(max_norm=1e17), steps={0: 1000, 1: 1, 2: 4}).rejected


def test_frames_carry_their_work_and_reject_forged_work():
    codec = make_codec("dense", dtype="fp32")
    et = {"w": codec.encode("w", torch.ones(4, 8), {})}
    meta, _ = decode_frame(encode_frame(FrameMeta.for_codec("run", 3, 1, codec, 12, 4096), et), SHAPES, "run", 3,
                           codec=codec)
    assert (meta.steps, meta.tokens) == (12, 4096)
    for steps, tokens in ((-1, 10), (1 << 40, 10), (1, 1 << 60)):
        with pytest.raises(SchemaError, match="work"):
            decode_frame(encode_frame(FrameMeta.for_codec("run", 3, 1, codec, steps, tokens), et), SHAPES, "run", 3,
                         codec=codec)


class LateTransport:
    """A transport whose exchange has already completed without this worker."""

    rank = 0

    def all_gather_bytes(self, group, payload):
        raise RoundLateError("late")

    def members(self, group):
        return [0, 1]


def test_a_late_frame_puts_what_it_carried_back_into_the_error_buffer():
    codec = make_codec("sparseloco", topk=4, chunk=8, beta=0.9, quantizer="reference", aggregation="mean_selected",
                       index_coding="packed")
    ex = FrameExchange(codec, SHAPES, LateTransport(), "g", "run", 0, torch.device("cpu"))
    torch.manual_seed(0)
    e0, delta = torch.randn(4, 8), torch.randn(4, 8)
    state = {"w": e0.clone()}
    with pytest.raises(RoundLateError):
        ex.exchange(0, {"w": delta}, state, 5, 100)
    torch.testing.assert_close(state["w"], 0.9 * e0 + delta, rtol=0, atol=1e-6)  # nothing was lost


# ----- whole runs in the simulation ------------------------------------------------------------------
COMMON = ["--outer.algorithm=sparseloco", "--train.steps=32", "--outer.inner_steps=8", "--train.eval_every=16",
          "--network.step_time_s=0.25", "--topology.replicas=2"]


def counts(sim: Simulation) -> list[list[int]]:
    return [r["replica_steps"] for r in read_metrics(sim.run_dir) if r.get("kind") == "train"]


def test_a_replica_throttled_2x_does_about_half_the_steps(tiny_config):
    sim = Simulation(tiny_config(*COMMON, "--run.name=throttled"), faults=_slow(1, 2.0))
    sim.run()
    got = counts(sim)
    assert got[0] == [8, 8]  # the first round calibrates (nothing measured yet)
    assert all(c == [8, 4] for c in got[1:]), got  # then half the steps, within one
    # and nobody waits after that: a round takes the window (2 s), not the slow replica's 8 steps (4 s)
    assert 4.0 + 3 * 2.0 <= sim.clock_s() < 4.0 + 3 * 2.0 + 0.5


def test_a_worker_that_slows_down_mid_run_stops_at_its_window(tiny_config):
    """Measured at full speed, planned 8 steps, then throttled 3x: it stops when its window closes."""
    sim = Simulation(tiny_config(*COMMON, "--run.name=slowed"), faults=_slow(1, 3.0, round_idx=2))
    sim.run()
    got = counts(sim)
    assert got[:2] == [[8, 8], [8, 8]]
    assert got[2] == [8, 2]  # 0.75 s steps in a 2 s window: it stopped at a step boundary
    planned = [r["plan"]["steps"] for r in read_metrics(sim.run_dir) if r.get("kind") == "train"]
    assert planned[3] == [8, 4] and got[3] == [8, 2]  # the plan follows (an average of the old and new pace)


def test_resume_mid_run_under_windows_continues_exactly(tiny_config, monkeypatch):
    from distrain.runtime.simulation import SimulationPool

    common = [*COMMON, "--topology.replica=[{}, {speed=0.5}]", "--checkpoint.every=16"]
    full = Simulation(tiny_config(*common, "--run.name=win-a"))  # names of one length: frames of one size
    full.run()
    cut = Simulation(tiny_config(*common, "--run.name=win-b"))
    original, done = SimulationPool.run_round, {"rounds": 0}

    def crash_in_round_three(self, *args, **kwargs):  # after the checkpoint at step 16
        if done["rounds"] == 2:
            raise RuntimeError("killed")
        done["rounds"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SimulationPool, "run_round", crash_in_round_three)
    with pytest.raises(RuntimeError, match="killed"):
        cut.run()
    monkeypatch.setattr(SimulationPool, "run_round", original)
    resumed = Simulation(tiny_config(*common, "--run.name=win-b", "--checkpoint.resume=auto"))
    resumed.run()
    assert counts(full) == [[8, 4]] * 4 and counts(resumed)[-2:] == counts(full)[-2:]
    for a, b in zip(full.workers, resumed.workers):
        for k, v in a.global_state().items():
            assert torch.equal(v, b.global_state()[k]), k
        assert a.schedule.optimizer.param_groups[0]["lr"] == b.schedule.optimizer.param_groups[0]["lr"]
    assert resumed.loop.state.step_s == full.loop.state.step_s
    assert resumed.loop.state.replica_steps == full.loop.state.replica_steps == [32, 16]


def test_a_measured_run_is_replayed_from_its_log(tiny_config):
    measured = Simulation(tiny_config(*COMMON, "--run.name=measured"), faults=_slow(1, 3.0, round_idx=2))
    measured.run()
    log = measured.run_dir / "metrics.jsonl"
    replay = Simulation(tiny_config(*COMMON, "--run.name=replay", f"--topology.step_plan={log}"))  # no fault
    replay.run()
    assert counts(replay) == counts(measured)
    for a, b in zip(measured.workers, replay.workers):
        for k, v in a.global_state().items():
            assert torch.equal(v, b.global_state()[k]), k


def test_round_records_say_where_each_replicas_time_went(tiny_config):
    sim = Simulation(tiny_config(*COMMON, "--topology.replica=[{}, {speed=0.5}]", "--topology.straggler_policy=wait",
                                 "--run.name=split", "--network.latency_ms=0.0", "--network.up_mbps=1000.0",
                                 "--network.down_mbps=1000.0"))
    summary = sim.run()
    rec = [r for r in read_metrics(sim.run_dir) if r.get("kind") == "train"][-1]
    t = rec["time"]
    assert t["compute"] == pytest.approx([2.0, 4.0], rel=1e-6)  # 8 steps at 0.25 s, at speed 1 and 0.5
    assert t["idle"][0] == pytest.approx(2.0, abs=0.01) and t["idle"][1] == pytest.approx(0.0, abs=1e-9)
    assert t["pipeline"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert rec["step_share"] == pytest.approx(6.0 / 8.0, abs=0.01)
    assert summary.replica_step_share == pytest.approx([0.5, 1.0], abs=0.01)


def _slow(rank: int, factor: float, round_idx: int = 0):
    from distrain.runtime.faults import Fault

    return [Fault("slow", rank, round_idx, factor=factor)]


def test_slow_fault_specs():
    from distrain.runtime.faults import Fault

    assert Fault.parse("slow:rank=2,factor=3") == Fault("slow", 2, 0, factor=3.0)
    assert Fault.parse(Fault.parse("slow:rank=2,factor=3,round=4").spec()) == Fault("slow", 2, 4, factor=3.0)
    for bad in ("slow:rank=1", "slow:rank=1,factor=0.5", "slow:rank=1,factor=x"):
        with pytest.raises(ValueError, match="fault"):
            Fault.parse(bad)
    assert math.isfinite(Fault.parse("slow:rank=0,factor=1e5").factor)
