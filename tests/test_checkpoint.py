import json

import pytest
import torch

from distrain.checkpoint import CheckpointError, list_checkpoints, load_latest, read_checkpoint, save_checkpoint


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
