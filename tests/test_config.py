import pytest

from distrain.cli import main
from distrain.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_preset_file_and_overrides(tmp_path):
    p = write(tmp_path, '[model]\npreset = "tiny"\nn_layers = 3\n[train]\nlr = 3e-4\n[train.chunkwise]\nmode = "seco"\n')
    cfg = load_config(p, ["--train.lr=1e-4", "--run.name=abc", "--topology.replica=[{speed=1.0}, {speed=0.5}]",
                          "--outer.algorithm=sparseloco", "--train.chunkwise.chunk_len=32"])
    assert cfg.model.dim == 192  # from the preset
    assert cfg.model.n_layers == 3  # file beats preset
    assert cfg.train.lr == 1e-4  # override beats file
    assert cfg.run.name == "abc"  # bare word is a string
    assert [t.speed for t in cfg.topology.replica] == [1.0, 0.5] and cfg.topology.n_replicas == 2
    assert cfg.train.chunkwise.mode == "seco" and cfg.train.chunkwise.chunk_len == 32
    assert isinstance(cfg.train.lr, float)


def test_override_preset_applies_preset_values():
    cfg = load_config(None, ["--model.preset=20m"])
    assert (cfg.model.dim, cfg.model.n_layers) == (384, 8)


@pytest.mark.parametrize("text,needle", [
    ("[train]\nlrr = 1\n", "unknown key 'train.lrr'"),
    ("[nosuch]\nx = 1\n", "unknown key 'nosuch'"),
    ("[train]\nsteps = 'ten'\n", "'train.steps': expected an integer"),
    ("[train]\nsteps = 1.5\n", "'train.steps': expected an integer"),
    ("[logging]\ntensorboard = 1\n", "expected a boolean"),
    ("[outer]\nalgorithm = 'adam'\n", "outer.algorithm"),
    ("[model]\npreset = 'huge'\n", "unknown preset 'huge'"),
    ("[model]\ndim = 65\n", "divisible"),
    ("[train\n", "invalid TOML"),
])
def test_bad_files_name_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    if "preset" not in needle and "divisible" not in needle and "outer.algorithm" not in needle:
        assert str(p) in str(e.value)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="override --train.nope=1: unknown key 'train.nope'"):
        load_config(None, ["--train.nope=1"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--train"])
    with pytest.raises(ConfigError, match="speed has 1 entries for the replica's 2 workers"):
        load_config(None, ["--topology.replica=[{devices=2, speed=[1.0]}]"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.toml")


def test_resolved_config_round_trips(tmp_path):
    from distrain.config import save_config

    cfg = load_config(None, ["--train.lr=2e-3", "--topology.replica=[{speed=2.0, cpus=[2.0]}, {kind='pipeline', stages=2}]",
                             "--outer.algorithm=diloco", "--train.chunkwise.mode=spaco",
                                           "--train.chunkwise.chunk_len=32", "--train.chunkwise.sparse_chunks=2"])
    save_config(cfg, tmp_path / "r.toml")
    again = load_config(tmp_path / "r.toml")
    assert again == cfg and again.topology.replica[1].stages == 2 and again.outer.momentum == 0.9


def test_cli_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr=" in out and "--outer.topk=64" in out and "--train.chunkwise.mode=" in out
    assert main(["train", "--train.bogus=1"]) == 2
    assert "unknown key 'train.bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,needle", [
    (["--train.chunkwise.mode=seco"], "chunk_len must be >= 1"),
    (["--train.chunkwise.mode=seco", "--train.chunkwise.chunk_len=48"], "not a multiple of train.chunkwise.chunk_len"),
    (["--train.chunkwise.mode=spaco", "--train.chunkwise.chunk_len=32"], "sparse_chunks (t) must be >= 1"),
    (["--train.chunkwise.mode=spaco", "--train.chunkwise.chunk_len=32", "--train.chunkwise.sparse_chunks=2",
      "--train.chunkwise.cap=0.5"], "cap must be 0"),
    (["--train.chunkwise.sampling=random"], "sampling"),
])
def test_unsupported_chunkwise_combinations(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_chunkwise_training_through_the_trainer(tiny_config):
    """SeCO and SpaCO run from the config in the ordinary trainer (and so in every run mode)."""
    from distrain.runtime.simulation import Simulation

    for mode in ("seco", "spaco"):
        cfg = tiny_config("--train.steps=4", f"--train.chunkwise.mode={mode}", "--train.chunkwise.chunk_len=8",
                          "--train.chunkwise.sparse_chunks=2", f"--run.name={mode}")
        s = Simulation(cfg).run()
        assert s.steps == 4 and s.final_val_loss < s.first_val_loss


def test_topk_warmup_schedule_and_its_checks():
    """k per round: the warm-up list first (0-based rounds), then outer.topk; bad values fail at load."""
    o = load_config(None, ["--outer.algorithm=sparseloco", "--outer.topk_warmup=[512, 128]"]).outer
    assert [o.topk_at(r) for r in range(4)] == [512, 128, 64, 64]
    assert load_config(None, ["--outer.algorithm=sparseloco"]).outer.topk_at(0) == 64
    for overrides, needle in [
        (["--outer.algorithm=sparseloco", "--outer.topk_warmup=[0]"], "outer.topk_warmup: 0 must be an integer"),
        (["--outer.algorithm=sparseloco", "--outer.topk_warmup=[5000]"], "in [1, 4096]"),
        (["--outer.algorithm=diloco", "--outer.topk_warmup=[256]"], "is for outer.algorithm = 'sparseloco'"),
        (["--outer.algorithm=sparseloco", "--outer.topk_warmup=[256]",
          "--topology.replica=[{kind=\"pipeline\", stages=2, compress={k=8}}]"], "compressed pipeline"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert needle in str(e.value)


def test_run_id_changes_with_the_trajectory_not_with_names_or_logging():
    """Frames carry the run id: a peer with another model or algorithm must be rejected, a peer that
    only logs or checkpoints differently must not."""
    base = load_config(None, [])
    assert len(base.hash()) == 16 and base.run_id() == f"default-{base.hash()}"
    for same in ("--logging.progress=false", "--checkpoint.every=5", "--runtime.torch_threads=1"):
        assert load_config(None, [same]).hash() == base.hash(), same
    for other in ("--model.dim=128", "--outer.algorithm=diloco", "--train.lr=0.01", "--train.steps=300"):
        assert load_config(None, [other]).hash() != base.hash(), other


def test_the_last_bad_inputs_end_in_one_line_before_anything_is_created(tmp_path, capsys):
    """Each exits 2 with one ``config error`` line naming the problem, and no run directory appears."""
    empty = tmp_path / "empty"
    empty.mkdir()
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 80)
    junk = tmp_path / "ckpt" / "step-5"
    junk.mkdir(parents=True)
    (junk / "notes.txt").write_text("junk")
    forged = tmp_path / "forged" / "step-7"
    forged.mkdir(parents=True)
    (forged / "manifest.json").write_text('{"format_version": 2, "step": 3, "files": {}}')
    old = tmp_path / "old" / "checkpoints" / "rank-0" / "step-3"  # the per-rank format of earlier versions
    old.mkdir(parents=True)
    out = tmp_path / "runs"
    cases = [
        ("--topology.replica=[]", "empty list of replica tables"),
        (f"--data.source={empty}", "no text files found"),
        (f"--data.source={blob}", "not text"),
        (f"--checkpoint.resume={junk}", "holds no checkpoint"),
        (f"--checkpoint.resume={empty}", "is not a step-N checkpoint directory"),
        (f"--checkpoint.resume={forged}", "says step 3 but the directory is step-7"),
        (f"--checkpoint.resume={old}", "of an earlier distrain version"),
        ("--topology.replica=[{kind=}]", "invalid TOML value"),
    ]
    for bad, needle in cases:
        capsys.readouterr()
        assert main(["simulate", f"--run.out_dir={out}", bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("distrain: config error:") and needle in err[0], (bad, err)
        assert not out.exists(), bad
