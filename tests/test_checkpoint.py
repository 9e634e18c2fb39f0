import json

import pytest
import torch

from distrain.checkpoint import (
    RESUME_MAY_CHANGE,
    CheckpointError,
    comparable_config,
    config_differences,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    resolve_resume,
    resume_line,
    save_checkpoint,
)
from distrain.config import Config


def state(v: float) -> dict:
    return {"w": torch.full((4, 4), v), "step": int(v), "nested": {"rng": torch.get_rng_state()}}


def test_atomic_save_latest_pointer_and_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, state(step), {"config_hash": "abc"}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-40", "step-30", "step-20"]
    assert (tmp_path / "latest").read_text().strip() == "step-40"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    got = load_latest(tmp_path)
    assert got.step == 40 and torch.equal(got.state["w"], torch.full((4, 4), 40.0))
    assert got.meta["config_hash"] == "abc" and got.meta["format_version"] == 1


def test_empty_dir_has_no_checkpoint(tmp_path):
    assert load_latest(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "meta", "version", "missing"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
    save_checkpoint(tmp_path, 1, state(1), {})
    bad = save_checkpoint(tmp_path, 2, state(2), {})
    f = bad / "state.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "bitflip":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40
        f.write_bytes(bytes(b))
    elif damage == "meta":
        (bad / "meta.json").write_text("{not json")
    elif damage == "version":
        m = json.loads((bad / "meta.json").read_text())
        m["format_version"] = 99
        (bad / "meta.json").write_text(json.dumps(m))
    else:
        f.unlink()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value)
    got = load_latest(tmp_path)
    assert got.step == 1 and torch.equal(got.state["w"], torch.full((4, 4), 1.0))
    assert "skipping unusable checkpoint" in caplog.text


def test_all_corrupt_is_an_error(tmp_path):
    p = save_checkpoint(tmp_path, 5, state(5), {})
    (p / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


# ----- meta.json of the wrong shape ------------------------------------------------------------------
@pytest.mark.parametrize("meta", ["[]", "null", '"text"', "3", "edit:step=eight", "edit:step=None", "edit:step=True",
                                  "edit:step=-1", "edit:step=7", "drop:step", "drop:state_sha256", "edit:config=[]"])
def test_meta_of_the_wrong_shape_falls_back_to_the_previous_checkpoint(tmp_path, meta, caplog):
    save_checkpoint(tmp_path, 1, state(1), {})
    bad = save_checkpoint(tmp_path, 2, state(2), {})
    m = json.loads((bad / "meta.json").read_text())
    if meta.startswith("edit:"):
        key, value = meta[5:].split("=")
        m[key] = {"eight": "eight", "None": None, "True": True, "[]": []}.get(value, value if not value.lstrip("-").isdigit() else int(value))
        text = json.dumps(m)
    elif meta.startswith("drop:"):
        del m[meta[5:]]
        text = json.dumps(m)
    else:
        text = meta
    (bad / "meta.json").write_text(text)
    with pytest.raises(CheckpointError, match="meta.json|metadata"):
        read_checkpoint(bad)
    got = load_latest(tmp_path)
    assert got.step == 1 and torch.equal(got.state["w"], torch.full((4, 4), 1.0))
    assert "skipping unusable checkpoint" in caplog.text and str(bad) in caplog.text


def test_explicit_resume_of_a_malformed_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = save_checkpoint(tmp_path, 3, state(3), {})
    (bad / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object"):
        resolve_resume(str(bad), tmp_path)


# ----- the latest pointer is a hint ------------------------------------------------------------------
@pytest.mark.parametrize("pointer,why", [("step-10", "newer and verifies"), ("../../..", "not a step-N"),
                                         ("step-99", "does not exist"), (None, "no 'latest' pointer"),
                                         ("/etc/passwd", "not a step-N")])
def test_latest_pointer_that_is_stale_missing_or_escaping_is_reported(tmp_path, pointer, why, caplog):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, state(step), {})
    if pointer is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(pointer + "\n")
    caplog.clear()
    got = load_latest(tmp_path)
    assert got.step == 20
    assert why in caplog.text


def test_pointer_to_the_newest_good_checkpoint_is_silent(tmp_path, caplog):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, state(step), {})
    caplog.clear()
    assert load_latest(tmp_path).step == 20
    assert caplog.text == ""


# ----- configuration comparison on resume ------------------------------------------------------------
def test_resume_with_another_model_config_names_the_differing_keys(tmp_path):
    saved = Config().to_dict()
    save_checkpoint(tmp_path, 5, state(5), {}, config=saved)
    current = Config().to_dict()
    current["model"]["dim"] = saved["model"]["dim"] * 2
    other = "diloco" if saved["outer"]["algorithm"] != "diloco" else "sparseloco"
    current["outer"]["algorithm"] = other
    with pytest.raises(CheckpointError) as e:
        load_latest(tmp_path, config=current)
    msg = str(e.value)
    assert f"model.dim: {saved['model']['dim']} (checkpoint) vs {current['model']['dim']} (config)" in msg
    assert f'outer.algorithm: {json.dumps(saved["outer"]["algorithm"])} (checkpoint) vs "{other}" (config)' in msg
    with pytest.raises(CheckpointError, match="model.dim"):
        resolve_resume("auto", tmp_path, config=current)
    with pytest.raises(CheckpointError, match="model.dim"):
        resolve_resume(str(tmp_path / "step-5"), tmp_path, config=current)


def test_keys_a_resume_may_change_are_not_compared(tmp_path):
    saved = Config().to_dict()
    save_checkpoint(tmp_path, 5, state(5), {}, config=saved)
    current = Config().to_dict()
    current["train"]["steps"] += 100
    current["train"]["eval_every"] = 7
    current["logging"]["progress"] = not current["logging"]["progress"]
    current["checkpoint"]["every"] = 3
    current["run"]["name"], current["run"]["out_dir"] = "other", "/elsewhere"
    current["runtime"]["torch_threads"] = 1
    assert load_latest(tmp_path, config=current).step == 5
    assert RESUME_MAY_CHANGE and "train.steps" in RESUME_MAY_CHANGE
    assert "train.steps" not in comparable_config(current) and "model.dim" in comparable_config(current)


def test_added_or_removed_keys_are_differences():
    saved = {"model": {"dim": 64}, "outer": {"topk": 64}}
    current = {"model": {"dim": 64, "new_key": 1}, "outer": {}}
    assert config_differences(saved, current) == ["model.new_key: absent (checkpoint) vs 1 (config)",
                                                  "outer.topk: 64 (checkpoint) vs absent (config)"]


def test_checkpoint_without_stored_config_resumes_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, 5, state(5), {"config_hash": "abc"})
    assert load_latest(tmp_path, config=Config().to_dict()).step == 5
    assert "stores no configuration" in caplog.text


def test_resume_line_names_path_and_step(tmp_path):
    p = save_checkpoint(tmp_path, 8, state(8), {"round": 2, "tokens": 1024})
    assert resume_line(load_latest(tmp_path)) == f"resumed from {p} (step 8, round 2, tokens 1024)"
