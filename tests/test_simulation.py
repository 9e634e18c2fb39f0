"""The in-process run end to end: resume equivalence, stragglers, simulated clock arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import assert_same, content

from distrain.checkpoint import list_checkpoints
from distrain.runtime.resume import checkpoint_dir
from distrain.runtime.simulation import Simulation, SimulationPool


def final_weights(sim: Simulation) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sim.workers[0].model.state_dict().items()}


def losses(run_dir) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


MIXED = "--topology.replica=[{count=2}, {kind='pipeline', stages=2, compress={k=8}}]"
FOLLOWING = "--topology.replica=[{count=2}, {kind='pipeline', stages=2, compress={k=8, basis='embedding'}}]"


@pytest.mark.parametrize("algo,topology", [
    ("none", "--topology.replicas=1"), ("sparseloco", "--topology.replicas=2"),
    ("sparseloco", MIXED),  # the default's shape: a compressed pipeline's stages rebuild from the global weights
    ("sparseloco", FOLLOWING),  # its U rebuilt from the global embedding every round: the same U after a resume
    ("sparseloco", "--outer.apply_delay=1"),  # each replica keeps its own progress: stored per worker
    ("diloco", MIXED),  # outer momentum, stored once with the global weights
], ids=["none", "sparseloco", "mixed", "mixed-following", "delayed", "diloco-mixed"])
def test_resume_gives_the_same_run(tiny_config, monkeypatch, algo, topology):
    common = [f"--outer.algorithm={algo}", topology, "--train.steps=12",
              "--outer.inner_steps=3", "--logging.log_every=3", "--train.eval_every=6", "--checkpoint.every=6"]
    if "replica" not in topology:
        common.append("--topology.replicas=2")
    straight = Simulation(tiny_config(*common, "--run.name=straight"))
    s1 = straight.run()
    w_straight = final_weights(straight)

    first = Simulation(tiny_config(*common, "--run.name=cut"))
    n_rounds = first.loop.total
    # kill the run during its third round, after the checkpoint at step 6
    done = {"rounds": 0}
    original = SimulationPool.run_round

    def crash_in_round_three(self, *args, **kwargs):
        if done["rounds"] == 2:
            raise RuntimeError("killed")
        done["rounds"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SimulationPool, "run_round", crash_in_round_three)
    with pytest.raises(RuntimeError, match="killed"):
        first.run()
    monkeypatch.setattr(SimulationPool, "run_round", original)
    assert [p.name for p in list_checkpoints(checkpoint_dir(first.run_dir))][0] == "step-6"
    resumed_cfg = tiny_config(*common, "--run.name=cut", "--checkpoint.resume=auto")
    resumed = Simulation(resumed_cfg)
    resumed.loop.start()
    assert resumed.loop.state.round == n_rounds // 2 and resumed.loop.resumed_from == 6
    resumed.loop.start = lambda: None  # started above
    s2 = resumed.run()
    for k, v in w_straight.items():
        assert torch.equal(v, resumed.workers[0].model.state_dict()[k]), k
    for a, b in zip(straight.workers, resumed.workers):  # every worker, a pipeline's stages too
        assert_same(a.global_state(), b.global_state())
        assert_same(dict(a.model.named_parameters()), dict(b.model.named_parameters()))
    assert_same(content(straight.run_dir), content(resumed.run_dir))  # and all the state it would save
    assert s2.final_val_loss == s1.final_val_loss
    assert s2.first_val_loss == s1.first_val_loss  # the real first validation loss, not nan
    assert losses(resumed.run_dir) == losses(straight.run_dir)
    assert s2.tokens == s1.tokens


def test_single_replica_loss_falls(tiny_config):
    s = Simulation(tiny_config("--train.steps=40", "--train.lr=3e-3", "--train.eval_every=40")).run()
    assert s.final_val_loss < s.first_val_loss - 1.0


def test_simulated_clock_is_compute_plus_bytes_over_bandwidth(tiny_config):
    """One round, 2 replicas: clock = H·step_time + latency + max(up, down) bytes / bandwidth."""
    cfg = tiny_config("--outer.algorithm=sparseloco", "--topology.replicas=2", "--train.steps=3",
                      "--outer.inner_steps=3", "--network.up_mbps=1.0", "--network.down_mbps=2.0",
                      "--network.latency_ms=50.0", "--network.step_time_s=0.5")
    sim = Simulation(cfg)
    sim.run()
    sent = [sim.hub.stats(r).bytes_sent for r in range(2)]
    got = [sim.hub.stats(r).bytes_received for r in range(2)]
    assert got == [sent[1], sent[0]]
    expected = 3 * 0.5 + 0.05 + max(max(s * 8 / 1e6 for s in sent), max(g * 8 / 2e6 for g in got))
    assert sim.clock_s() == pytest.approx(expected, rel=1e-12)
    assert sim.utilisation() == pytest.approx(1.5 / expected)


def test_straggler_policies(tiny_config):
    from distrain.metrics import read_metrics
    from distrain.optim import lr_multiplier

    common = ["--outer.algorithm=sparseloco", "--topology.replica=[{speed=1.0}, {speed=0.5}]",
              "--train.steps=8", "--outer.inner_steps=4", "--network.step_time_s=1.0", "--network.latency_ms=0.0",
              "--network.up_mbps=1000.0", "--network.down_mbps=1000.0"]
    runs = {}
    for policy in ("wait", "fewer_steps", "window"):
        runs[policy] = Simulation(tiny_config(*common, f"--topology.straggler_policy={policy}", f"--run.name={policy}"))
        runs[policy].run()
    counts = {p: [r["replica_steps"] for r in read_metrics(sim.run_dir) if r.get("kind") == "train"]
              for p, sim in runs.items()}
    assert counts == {"wait": [[4, 4], [4, 4]], "fewer_steps": [[4, 2], [4, 2]], "window": [[4, 2], [4, 2]]}
    # waiting: the fast replica idles half of each round; fewer steps or a window: both finish together
    assert runs["wait"].utilisation() == pytest.approx(0.75, abs=0.01)
    assert runs["fewer_steps"].utilisation() == pytest.approx(1.0, abs=0.01)
    assert runs["window"].utilisation() == pytest.approx(1.0, abs=0.01)
    assert runs["window"].clock_s() < runs["wait"].clock_s()
    # both replicas follow the run's progress: the slow one's last step (its 2nd of the last round)
    # sits at progress 4 + 1 x 4/2 = 6, the fast one's (its 4th) at 7
    cfg = runs["window"].cfg
    fast, slow = (w.schedule.optimizer.param_groups[0]["lr"] for w in runs["window"].workers)
    assert slow == pytest.approx(cfg.train.lr * lr_multiplier(6.0, cfg.train), rel=1e-12)
    assert fast == pytest.approx(cfg.train.lr * lr_multiplier(7.0, cfg.train), rel=1e-12)


def test_replicas_end_rounds_on_identical_weights(tiny_config):
    sim = Simulation(tiny_config("--outer.algorithm=diloco", "--outer.momentum=0.9", "--outer.nesterov=true",
                                 "--outer.lr=0.7", "--topology.replicas=3", "--train.steps=6", "--outer.inner_steps=3"))
    sim.run()
    ref = sim.workers[0].model.state_dict()
    for w in sim.workers[1:]:
        for k, v in w.model.state_dict().items():
            assert torch.equal(v, ref[k])


def test_plots_of_a_run(tiny_config):
    from distrain.plots import plot_run

    sim = Simulation(tiny_config("--outer.algorithm=sparseloco", "--topology.replicas=2", "--train.steps=6",
                                 "--outer.inner_steps=3", "--train.eval_every=3"))
    sim.run()
    written = {p.name for p in plot_run(sim.run_dir)}
    assert written == {"loss_vs_step.png", "loss_vs_tokens.png", "loss_vs_bytes.png", "loss_vs_sim_time.png",
                       "utilisation.png", "time_per_replica.png"}
    assert all((sim.run_dir / "plots" / n).stat().st_size > 1000 for n in written)


def test_plot_of_a_directory_without_metrics_is_an_error(tmp_path):
    from distrain.plots import plot_run

    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_resuming_with_another_model_names_the_differing_keys(tiny_config, capsys):
    from distrain.cli import main
    from distrain.config import save_config

    common = ["--outer.algorithm=sparseloco", "--topology.replicas=2", "--train.steps=6", "--outer.inner_steps=3",
              "--checkpoint.every=3", "--run.name=mismatch"]
    first = Simulation(tiny_config(*common))
    first.run()
    cfg = tiny_config(*common, "--model.dim=32", "--checkpoint.resume=auto")
    save_config(cfg, first.run_dir.parent / "other.toml")
    assert main(["simulate", "--config", str(first.run_dir.parent / "other.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrain: cannot resume:") and "model.dim: 64 (checkpoint) vs 32 (config)" in err
    # a longer run of the same model resumes (train.steps may change)
    longer = Simulation(tiny_config(*common, "--train.steps=9", "--checkpoint.resume=auto"))
    s = longer.run()
    assert longer.loop.resumed_from == 6 and s.steps == 9


def test_a_hostile_replica_cannot_derail_the_run(tiny_config):
    """Replica 3 of 4 sends valid, finite frames 1e30 times too large from round 0: every round
    rejects exactly its frame, the weights stay finite and the run ends near the honest one."""
    from distrain.runtime.faults import Fault

    common = ["--outer.algorithm=sparseloco", "--topology.replicas=4", "--train.steps=15", "--outer.inner_steps=3",
              "--train.eval_every=15", "--train.lr=3e-3"]
    honest = Simulation(tiny_config(*common, "--run.name=honest")).run()
    sim = Simulation(tiny_config(*common, "--run.name=hostile"), [Fault.parse("hostile:rank=3,round=0")])
    attacked = sim.run()
    rounds = [json.loads(l) for l in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rounds if r["kind"] == "train"]
    assert [r["rejected"] for r in train] == [4] * 5  # one frame, seen by each of the 4 members
    assert [r["contributors"] for r in train] == [3] * 5
    assert all(torch.isfinite(t).all() for w in sim.workers for t in w.global_state().values())
    improvement = honest.first_val_loss - honest.final_val_loss
    assert abs(attacked.final_val_loss - honest.final_val_loss) < 0.25 * improvement


def test_a_sign_flipping_replica_is_set_aside_and_reported(tiny_config):
    """Replica 3 of 4 sends its own pseudo-gradient negated at 1.9x its norm (under the norm clip)
    from round 0: every round's record names it as set aside, with a negative cosine, and nobody
    else; the honest run sets nobody aside."""
    from distrain.runtime.faults import Fault

    common = ["--outer.algorithm=sparseloco", "--topology.replicas=4", "--train.steps=15", "--outer.inner_steps=3",
              "--train.eval_every=15", "--train.lr=3e-3"]

    def records(sim: Simulation) -> list[dict]:
        return [r for r in map(json.loads, (sim.run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    honest = Simulation(tiny_config(*common, "--run.name=honest"))
    assert honest.run().set_aside == 0
    assert [r["down_weighted"] for r in records(honest)] == [[]] * 5
    assert all(c > 0 for r in records(honest) for c in r["sender_cosine"]["0"].values())
    sim = Simulation(tiny_config(*common, "--run.name=flip"), [Fault.parse("flip:rank=3,round=0")])
    assert sim.run().set_aside == 5
    train = records(sim)
    assert [r["down_weighted"] for r in train] == [["0:3"]] * 5
    assert all(r["sender_cosine"]["0"]["3"] < 0 for r in train)
    assert [r["contributors"] for r in train] == [3] * 5 and [r["rejected"] for r in train] == [0] * 5
