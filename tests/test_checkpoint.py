"""Checkpoints by content: the atomic store (safetensors parts, manifest, verification, fallback,
no pickle), the configuration check, and resuming a run into the same or a changed topology."""

import json
import os
import pickle

import pytest
import torch
from checkpoints import global_weights, parts

from distrain.checkpoint import (
    RESUME_MAY_CHANGE,
    CheckpointError,
    Part,
    begin_step,
    check_checkpoint_dir,
    check_config,
    checkpoint_steps,
    commit_step,
    comparable_config,
    config_differences,
    list_checkpoints,
    read_all,
    read_manifest,
    read_part,
    write_part,
)
from distrain.config import Config
from distrain.runtime.resume import ResumeMismatchError, saved_steps
from distrain.runtime.simulation import Simulation


def save(tmp_path, step: int, v: float, keep: int = 3, **manifest):
    tmp = begin_step(tmp_path, step)
    files = {"global/segment-0.safetensors": write_part(tmp, "global/segment-0.safetensors",
                                                        Part({"weight/w": torch.full((4, 4), v)}, {"step": step})),
             "replica-0/stage-0-device-0.safetensors": write_part(
                 tmp, "replica-0/stage-0-device-0.safetensors",
                 Part({"rng/torch": torch.get_rng_state()}, {"sampler": {"epoch": 0, "position": step}}))}
    return commit_step(tmp_path, tmp, step, manifest, files, keep=keep)


def weight(path) -> torch.Tensor:
    return read_part(path, read_manifest(path), "global/segment-0.safetensors").tensors["weight/w"]


# ----- the store ---------------------------------------------------------------------------------
def test_atomic_save_latest_pointer_and_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, step, round=step // 10)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-40", "step-30", "step-20"]
    assert (tmp_path / "latest").read_text().strip() == "step-40"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    got = read_all(tmp_path / "step-40")
    assert torch.equal(got["global/segment-0.safetensors"].tensors["weight/w"], torch.full((4, 4), 40.0))
    assert got["replica-0/stage-0-device-0.safetensors"].meta == {"sampler": {"epoch": 0, "position": 40}}
    m = read_manifest(tmp_path / "step-40")
    assert m["format_version"] == 2 and m["step"] == 40 and m["round"] == 4 and len(m["files"]) == 2
    assert checkpoint_steps(tmp_path) == [40, 30, 20] and checkpoint_steps(tmp_path / "nothing") == []


def test_a_commit_missing_a_part_leaves_nothing(tmp_path):
    tmp = begin_step(tmp_path, 5)
    entry = write_part(tmp, "global/segment-0.safetensors", Part({"weight/w": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="missing or of the wrong size"):
        commit_step(tmp_path, tmp, 5, {}, {"global/segment-0.safetensors": entry,
                                           "replica-0/stage-0-device-0.safetensors": entry})
    assert list(tmp_path.iterdir()) == []  # no temp directory, no step, no pointer


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing", "pickle", "garbage"])
def test_a_damaged_part_is_a_one_line_error(tmp_path, damage):
    bad = save(tmp_path, 2, 2)
    f = bad / "global/segment-0.safetensors"
    m = json.loads((bad / "manifest.json").read_text())
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "bitflip":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40
        f.write_bytes(bytes(b))
    elif damage == "missing":
        f.unlink()
    else:  # forged: a pickle (or garbage) with the manifest's size and checksum made to match
        sentinel = tmp_path / "unpickled"
        data = pickle.dumps(_Boom(str(sentinel))) if damage == "pickle" else os.urandom(300)
        f.write_bytes(data)
        import hashlib
        m["files"]["global/segment-0.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as e:
        weight(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    if damage in ("pickle", "garbage"):
        assert "not a readable safetensors part" in str(e.value)
        assert not (tmp_path / "unpickled").exists()  # never unpickled


class _Boom:
    """Unpickling this would create a file: the store must never do it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("manifest", ["[]", "null", '"text"', "{not json", "edit:step=eight", "edit:step=-1",
                                      "edit:step=7", "edit:format_version=1", "drop:files",
                                      "escape:../../etc/passwd", "escape:/etc/passwd", "edit:config=[]",
                                      "sha:xyz"])
def test_a_manifest_of_the_wrong_shape_or_a_forged_path_is_refused(tmp_path, manifest):
    bad = save(tmp_path, 2, 2)
    m = json.loads((bad / "manifest.json").read_text())
    kind, _, arg = manifest.partition(":")
    if kind == "edit":
        key, value = arg.split("=")
        m[key] = {"eight": "eight", "[]": []}.get(value, int(value) if value.lstrip("-").isdigit() else value)
        text = json.dumps(m)
    elif kind == "drop":
        del m[arg]
        text = json.dumps(m)
    elif kind == "escape":
        m["files"][arg] = next(iter(m["files"].values()))
        text = json.dumps(m)
    elif kind == "sha":
        next(iter(m["files"].values()))["sha256"] = arg
        text = json.dumps(m)
    else:
        text = manifest
    (bad / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match="manifest|format version|plain relative path|sha256") as e:
        read_manifest(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        check_checkpoint_dir(bad)


@pytest.mark.parametrize("pointer,why", [("step-10", "but step-20 is newer"), ("../../..", "not a step-N"),
                                         ("step-99", "does not exist"), (None, "no 'latest' pointer"),
                                         ("/etc/passwd", "not a step-N")])
def test_latest_pointer_that_is_stale_missing_or_escaping_is_reported(tmp_path, pointer, why, caplog):
    for step in (10, 20):
        save(tmp_path, step, step)
    if pointer is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(pointer + "\n")
    caplog.clear()
    assert checkpoint_steps(tmp_path) == [20, 10]
    assert why in caplog.text


def test_pointer_to_the_newest_checkpoint_is_silent(tmp_path, caplog):
    for step in (10, 20):
        save(tmp_path, step, step)
    caplog.clear()
    assert checkpoint_steps(tmp_path) == [20, 10] and caplog.text == ""


def test_old_per_rank_checkpoints_are_refused_in_one_line(tmp_path):
    (tmp_path / "run" / "checkpoints" / "rank-0" / "step-3").mkdir(parents=True)
    with pytest.raises(ResumeMismatchError, match="per-rank checkpoints .* of an earlier distrain version") as e:
        saved_steps(tmp_path / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="earlier distrain version"):
        check_checkpoint_dir(tmp_path / "run" / "checkpoints" / "rank-0" / "step-3")


# ----- configuration comparison on resume ------------------------------------------------------------
def test_resume_with_another_model_config_names_the_differing_keys():
    saved = Config().to_dict()
    current = Config().to_dict()
    current["model"]["dim"] = saved["model"]["dim"] * 2
    other = "diloco" if saved["outer"]["algorithm"] != "diloco" else "sparseloco"
    current["outer"]["algorithm"] = other
    with pytest.raises(CheckpointError) as e:
        check_config("ckpt", saved, current)
    msg = str(e.value)
    assert f"model.dim: {saved['model']['dim']} (checkpoint) vs {current['model']['dim']} (config)" in msg
    assert f'outer.algorithm: {json.dumps(saved["outer"]["algorithm"])} (checkpoint) vs "{other}" (config)' in msg


def test_keys_a_resume_may_change_are_not_compared():
    saved = Config().to_dict()
    current = Config().to_dict()
    current["train"]["steps"] += 100
    current["train"]["eval_every"] = 7
    current["logging"]["progress"] = not current["logging"]["progress"]
    current["checkpoint"]["every"] = 3
    current["run"]["name"], current["run"]["out_dir"] = "other", "/elsewhere"
    current["runtime"]["torch_threads"] = 1
    current["topology"]["replicas"] = 5  # the topology may change: a checkpoint holds state by content
    current["topology"]["replica"] = [{"kind": "pipeline", "stages": 2}]
    check_config("ckpt", saved, current)
    assert "train.steps" in RESUME_MAY_CHANGE and "topology.replica" in RESUME_MAY_CHANGE
    assert "train.steps" not in comparable_config(current) and "model.dim" in comparable_config(current)


def test_added_or_removed_keys_are_differences():
    saved = {"model": {"dim": 64}, "outer": {"topk": 64}}
    current = {"model": {"dim": 64, "new_key": 1}, "outer": {}}
    assert config_differences(saved, current) == ["model.new_key: absent (checkpoint) vs 1 (config)",
                                                  "outer.topk: 64 (checkpoint) vs absent (config)"]


# ----- a run's checkpoint, by content --------------------------------------------------------------
MIXED = ["--outer.algorithm=sparseloco", "--model.n_layers=4", "--outer.inner_steps=3",
         "--topology.replica=[{count=4}, {kind='pipeline', stages=[0, 2, 4], compress={k=8}}]"]


@pytest.fixture
def saved_run(tiny_config):
    """4 full replicas and a 2-stage compressed pipeline, checkpointed at step 3 and step 6."""
    sim = Simulation(tiny_config(*MIXED, "--train.steps=6", "--checkpoint.every=3", "--run.name=mixed"))
    sim.run()
    return sim


def test_the_global_weights_are_stored_once_and_tensors_only_as_safetensors(saved_run):
    got = parts(saved_run.run_dir)
    n_params = sum(t.numel() for t in saved_run.workers[0].global_state().values())
    stored = [(rel, k, t) for rel, p in got.items() for k, t in p.tensors.items()
              if k.startswith(("weight/", "local/"))]
    assert {rel for rel, _, _ in stored} == {"global/segment-0.safetensors", "global/segment-1.safetensors"}
    assert sum(t.numel() for _, _, t in stored) == n_params  # once, not once per replica
    assert global_weights(saved_run.run_dir).keys() == saved_run.workers[0].global_state().keys()
    assert len([r for r in got if r.startswith("replica-")]) == saved_run.pool.layout.world_size
    files = [p for p in (saved_run.run_dir / "checkpoints" / "step-6").rglob("*") if p.is_file()]
    assert sorted({p.suffix for p in files}) == [".json", ".safetensors"]


def resume(tiny_config, saved_run, *topology: str) -> Simulation:
    sim = Simulation(tiny_config("--outer.algorithm=sparseloco", "--model.n_layers=4", "--outer.inner_steps=3",
                                 *topology, "--train.steps=9", "--checkpoint.resume=auto", "--run.name=mixed"))
    sim.loop.start()
    assert sim.loop.resumed_from == 6
    return sim


def assert_on_saved_global(sim: Simulation, saved: dict[str, torch.Tensor]) -> None:
    for w in sim.workers:
        got = w.global_state()
        assert got and all(torch.equal(t, saved[n]) for n, t in got.items()), w.rank
        if w.rep.kind == "full":  # its model is the global weights themselves
            assert all(torch.equal(p.detach(), saved[n]) for n, p in w.model.named_parameters())


def run_on(sim: Simulation) -> list[dict]:
    sim.loop.start = lambda: None  # started (resumed) already
    sim.run()
    rows = [json.loads(line) for line in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["kind"] == "train" and rows[-2]["round"] == 3 and rows[-2]["loss"] == rows[-2]["loss"]
    return [r for r in rows if r.get("event") == "resumed"]


def test_resume_into_two_fewer_replicas(tiny_config, saved_run, caplog):
    saved = global_weights(saved_run.run_dir)
    before = parts(saved_run.run_dir)
    sim = resume(tiny_config, saved_run, "--topology.replica=[{count=2}, {kind='pipeline', stages=[0, 2, 4], "
                                         "compress={k=8}}]")
    assert sim.loop.changes == ["saved replica 2 (full/single) removed: its state dropped",
                                "saved replica 3 (full/single) removed: its state dropped",
                                "replica 2 continues saved replica 4",
                                "data split into 3 streams (was 5): kept replicas' positions moved as for a catch-up"]
    assert_on_saved_global(sim, saved)
    # the pipeline (saved replica 4) keeps its own state: error feedback and AdamW moments by name
    stage1 = sim.workers[3]
    saved_ef = before["replica-4/stage-1-device-0.safetensors"].tensors
    for n, t in stage1.syncs[1].codec_state.items():
        assert torch.equal(t, saved_ef[f"ef/{n}"]), n
    assert stage1.schedule.step == before["replica-4/stage-1-device-0.safetensors"].meta["schedule"]["step"]
    events = run_on(sim)
    assert events[-1]["changes"] == sim.loop.changes


def test_resume_into_one_more_replica(tiny_config, saved_run):
    saved = global_weights(saved_run.run_dir)
    before = parts(saved_run.run_dir)
    sim = resume(tiny_config, saved_run, "--topology.replica=[{count=5}, {kind='pipeline', stages=[0, 2, 4], "
                                         "compress={k=8}}]")
    assert sim.loop.changes == ["replica 4 (full/single) added: fresh inner state from the global weights",
                                "replica 5 continues saved replica 4",
                                "data split into 6 streams (was 5): kept replicas' positions moved as for a catch-up"]
    assert_on_saved_global(sim, saved)
    new = sim.workers[4]
    assert not new.schedule.optimizer.state and not new.syncs[0].codec_state  # fresh, as a caught-up worker
    assert new.schedule.step == sim.loop.state.replica_steps[4] == sim.loop.state.step
    kept = sim.workers[0]
    assert all(torch.equal(t, before["replica-0/stage-0-device-0.safetensors"].tensors[f"ef/{n}"])
               for n, t in kept.syncs[0].codec_state.items())
    run_on(sim)


def test_resume_into_a_changed_pipeline_split(tiny_config, saved_run):
    saved = global_weights(saved_run.run_dir)
    before = parts(saved_run.run_dir)
    sim = resume(tiny_config, saved_run, "--topology.replica=[{count=4}, {kind='pipeline', stages=[0, 1, 3, 4], "
                                         "compress={k=8}}]")
    assert sim.loop.changes == ["replica 4 re-split: stages [0, 2, 4] → [0, 1, 3, 4], its inner-optimiser and "
                                "error-feedback state regrouped by layer"]
    assert_on_saved_global(sim, saved)
    # the middle stage now holds layer 1 (saved on stage 0) and layer 2 (saved on stage 1): its
    # AdamW moments and error feedback come from both, by parameter name
    middle = sim.workers[5]
    assert middle.slot.layers == (1, 3)
    old = {**before["replica-4/stage-0-device-0.safetensors"].tensors,
           **before["replica-4/stage-1-device-0.safetensors"].tensors}
    names = middle.schedule.param_names()
    moved = 0
    for p, st in middle.schedule.optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v.cpu(), old[f"optim/{names[id(p)]}/{k}"])
            moved += names[id(p)].startswith(("layers.1.", "layers.2."))
    # every parameter saved under its name has its state; one whose parameterisation the new split
    # changed (its layer now ends a compressed stage: W = U·Z) starts fresh
    restored = {names[id(p)] for p in middle.schedule.optimizer.state}
    assert moved and restored == {n for n in names.values() if f"optim/{n}/exp_avg" in old}
    assert all(n.endswith(".z") for n in set(names.values()) - restored)
    ef = {n: t for s in middle.syncs.values() for n, t in s.codec_state.items()}
    assert ef and all(torch.equal(t, old[f"ef/{n}"]) for n, t in ef.items())
    events = run_on(sim)
    assert events[-1]["changes"] == sim.loop.changes


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_config, saved_run, caplog):
    f = saved_run.run_dir / "checkpoints" / "step-6" / "global" / "segment-1.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))
    sim = Simulation(tiny_config(*MIXED, "--train.steps=9", "--checkpoint.resume=auto", "--run.name=mixed"))
    sim.loop.start()
    assert sim.loop.resumed_from == 3
    assert "checkpoint step 6 unusable" in caplog.text and "checksum mismatch" in caplog.text
