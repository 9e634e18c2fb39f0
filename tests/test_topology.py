"""Typed topology tables, the layout derived from them (ranks, segments, groups), and validation
of every config value at load time."""

from __future__ import annotations

import pytest

from distrain.cli import main
from distrain.config import ConfigError, load_config
from distrain.layout import Layout, segment_of
from distrain.topology import balanced_bounds, resolve_topology

MIXED = ("--topology.replica=[{count=2}, {kind='pipeline', stages=2}, {kind='pipeline', stages=3}]",
         "--outer.algorithm=sparseloco", "--model.n_layers=6", "--model.vocab_size=300")


def test_two_full_and_two_pipelines_of_a_six_layer_model():
    lay = Layout.from_config(load_config(None, list(MIXED)))
    assert lay.segments == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert lay.world_size == 2 + 2 + 3
    assert [(w.replica, w.stage, w.layers) for w in lay.workers] == [
        (0, 0, (0, 6)), (1, 0, (0, 6)), (2, 0, (0, 3)), (2, 1, (3, 6)), (3, 0, (0, 2)), (3, 1, (2, 4)), (3, 2, (4, 6))]
    groups = lay.byte_groups()
    # one owner per replica in every segment group: full replicas in all, stages in their own
    assert groups["segment0"] == [0, 1, 2, 4]
    assert groups["segment1"] == [0, 1, 2, 5]
    assert groups["segment2"] == [0, 1, 3, 5]
    assert groups["segment3"] == [0, 1, 3, 6]
    assert groups["replica2"] == [2, 3] and groups["replica3"] == [4, 5, 6]
    assert lay.owned_segments(0) == [0, 1, 2, 3] and lay.owned_segments(5) == [1, 2]
    # a pipeline's stages read the same micro-batches: one data stream per pipeline replica
    assert [lay.data_shard(r) for r in range(7)] == [(0, 4), (1, 4), (2, 4), (2, 4), (3, 4), (3, 4), (3, 4)]
    assert lay.reporter(2) == 3 and lay.reporter(3) == 6 and lay.eval_replica == 0
    assert lay.device_group_specs() == []
    # parameters belong to segments by name: embedding first, head last
    assert segment_of("tok_embeddings.weight", 6, lay.segments) == 0
    assert segment_of("layers.3.attention.wq.weight", 6, lay.segments) == 2
    assert segment_of("output.weight", 6, lay.segments) == 3 and segment_of("norm.weight", 6, lay.segments) == 3


def test_multi_device_replicas_leaders_followers_and_device_groups():
    cfg = load_config(None, ["--topology.replica=[{devices=2, cpus=[2.0, 1.0]}, {}, {devices=3, parallel='deepspeed'}]",
                             "--outer.algorithm=sparseloco"])
    lay = Layout.from_config(cfg)
    assert lay.world_size == 6 and [lay.leader(r) for r in range(3)] == [0, 2, 3]
    assert [lay.replica_of(r) for r in range(6)] == [0, 0, 1, 2, 2, 2]
    assert lay.byte_groups() == {"segment0": [0, 2, 3]}  # only leaders sync
    assert lay.owned_segments(1) == [] and lay.owned_segments(3) == [0]
    assert lay.device_group_specs() == [(0, 1), (3, 4, 5), (3,), (4,), (5,)]
    assert [lay.data_shard(r) for r in range(6)] == [(r, 6) for r in range(6)]
    assert [lay.ray_bundle(r) for r in range(3)] == [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert [r.parallel for r in lay.replicas] == ["ddp", "single", "deepspeed"]


def test_the_shorthand_is_identical_single_device_replicas_and_rank_is_replica():
    lay = Layout.from_config(load_config(None, ["--topology.replicas=3", "--outer.algorithm=diloco"]))
    assert lay.world_size == 3 and [w.replica for w in lay.workers] == [0, 1, 2]
    assert lay.byte_groups() == {"segment0": [0, 1, 2]} and lay.segments == [(0, 2)]
    assert [lay.data_shard(r) for r in range(3)] == [(0, 3), (1, 3), (2, 3)]


def test_per_worker_values_links_and_explicit_bounds():
    cfg = load_config(None, ["--topology.replica=[{kind='pipeline', stages=[0, 1, 4], speed=[1.0, 0.25], "
                             "up_mbps=10.0, latency_ms=[5.0, 50.0], gpus=[0.5, 0.0], memory_mb=[0, 256]}, {}]",
                             "--model.n_layers=4", "--outer.algorithm=sparseloco", "--network.down_mbps=40.0"])
    reps = resolve_topology(cfg)
    assert reps[0].bounds == (0, 1, 4) and reps[0].speed == 0.25 and reps[1].speed == 1.0
    lay = Layout.from_config(cfg)
    links = lay.links()
    assert (links[0].up_mbps, links[0].down_mbps, links[0].latency_ms) == (10.0, 40.0, 5.0)
    assert links[1].latency_ms == 50.0 and links[2].up_mbps == 100.0
    assert lay.ray_bundle(0) == {"CPU": 1.0, "GPU": 0.5} and lay.ray_bundle(1) == {"CPU": 1.0, "memory": 256 * 2**20}


@pytest.mark.parametrize("n,s,bounds", [(6, 2, (0, 3, 6)), (6, 3, (0, 2, 4, 6)), (7, 3, (0, 2, 5, 7)),
                                        (8, 3, (0, 3, 6, 8)), (5, 2, (0, 3, 5)), (4, 4, (0, 1, 2, 3, 4))])
def test_balanced_split(n, s, bounds):
    assert balanced_bounds(n, s) == bounds


@pytest.mark.parametrize("override,new_form", [
    ("--topology.compute_speeds=[1.0, 0.5]", "--topology.replica='[{speed=1.0}, {speed=0.5}]'"),
    ("--runtime.replica_devices=[2, 1]", "--topology.replica='[{devices=2}, {devices=1}]'"),
    ("--runtime.replica_parallel=deepspeed", "parallel=\"deepspeed\""),
    ("--runtime.worker_cpus=[2.0, 1.0]", "--topology.replica='[{cpus=2.0}, {cpus=1.0}]'"),
    ("--runtime.worker_gpus=[1.0]", "gpus=1.0"),
    ("--runtime.worker_memory_mb=[512]", "memory_mb=512"),
])
def test_a_removed_flat_key_shows_the_new_form(override, new_form):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "was removed" in msg and "[[topology.replica]]" in msg and new_form in msg and "\n" not in msg


def test_a_removed_key_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text("[topology]\nreplicas = 2\ncompute_speeds = [1.0, 0.5]\n")
    with pytest.raises(ConfigError, match=f"{p}: 'topology.compute_speeds' was removed"):
        load_config(p)


def test_bad_replica_tables_name_the_table_the_key_and_the_file(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[outer]\nalgorithm = 'sparseloco'\n[[topology.replica]]\n[[topology.replica]]\n"
                 "kind = 'pipeline'\nstages = 9\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "topology.replica[1]" in msg and "replica table 1" in msg and "stages = 9" in msg


@pytest.mark.parametrize("table,needle", [
    ("{kind='ring'}", "kind: 'ring' is not one of full, pipeline"),
    ("{devices=0}", "devices must be >= 1"),
    ("{devices=2, parallel='single'}", "parallel = 'single' runs on one device"),
    ("{parallel='ddp'}", "needs devices >= 2"),
    ("{kind='pipeline', stages=[0, 3, 2]}", "strictly increasing"),
    ("{kind='pipeline', stages=[0, 2]}", "must be layer bounds [0, ..., 2]"),
    ("{kind='pipeline', stages=2, devices=2}", "devices is for kind = 'full'"),
    ("{devices=2, speed=[1.0, 1.0, 1.0]}", "speed has 3 entries for the replica's 2 workers"),
    ("{speed=0.0}", "speed must be positive"),
    ("{cpus=-1.0}", "cpus must be non-negative"),
    ("{count=0}", "count must be >= 1"),
    ("{devices='two'}", "expected an integer"),
])
def test_bad_replica_values(table, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--topology.replica=[{table}, {{}}]", "--outer.algorithm=sparseloco"])
    assert needle in str(e.value)


def test_topology_combinations():
    with pytest.raises(ConfigError, match="tables describe 3 replicas"):
        load_config(None, ["--topology.replicas=2", "--topology.replica=[{count=3}]", "--outer.algorithm=diloco"])
    with pytest.raises(ConfigError, match="'none' trains one replica"):
        load_config(None, ["--topology.replicas=2"])
    with pytest.raises(ConfigError, match="must be diloco or sparseloco"):
        load_config(None, ["--topology.replica=[{devices=2}, {}]", "--outer.algorithm=ddp"])
    with pytest.raises(ConfigError, match="tie_embeddings must be false"):
        load_config(None, ["--topology.replica=[{kind='pipeline', stages=2}]", "--model.tie_embeddings=true"])
    # a lone pipeline replica may train without an outer algorithm (a model no worker holds alone)
    assert load_config(None, ["--topology.replica=[{kind='pipeline', stages=2}]"]).topology.n_replicas == 1


def test_algorithms_get_their_published_defaults_unless_set():
    d = load_config(None, ["--outer.algorithm=diloco", "--topology.replicas=2"])
    assert (d.outer.lr, d.outer.momentum, d.outer.nesterov) == (0.7, 0.9, True)
    mine = load_config(None, ["--outer.algorithm=diloco", "--topology.replicas=2", "--outer.lr=0.5"])
    assert (mine.outer.lr, mine.outer.momentum) == (0.5, 0.9)
    s = load_config(None, ["--outer.algorithm=sparseloco", "--topology.replicas=2"])
    assert (s.outer.lr, s.outer.momentum, s.outer.nesterov) == (1.0, 0.0, False)
    assert d.algorithm.rounds and s.algorithm.rounds
    ddp = load_config(None, ["--outer.algorithm=ddp", "--topology.replicas=2"])
    assert ddp.algorithm.per_step and not ddp.algorithm.rounds


BAD_VALUES = [
    ("--outer.topk=0", "outer.topk must be in [1, 4096]"),
    ("--outer.chunk=0", "outer.chunk must be in [1, 4096]"),
    ("--outer.chunk=512", "outer.chunk must be <= 256"),
    ("--outer.ef_beta=1.5", "outer.ef_beta must be in [0, 1]"),
    ("--outer.apply_delay=2", "outer.apply_delay must be 0 or 1"),
    ("--data.seq_len=0", "data.seq_len must be >= 1"),
    ("--network.up_mbps=0", "network.up_mbps/down_mbps must be positive"),
    ("--data.source=/does/not/exist", "data.source: /does/not/exist does not exist"),
    ("--data.tokenizer=/nope", "data.tokenizer: /nope is not a file"),
    ("--checkpoint.resume=/nope", "checkpoint.resume: /nope is not a checkpoint directory"),
    ("--train.eval_every=0", "train.eval_every must be >= 1"),
    ("--logging.log_every=0", "logging.log_every must be >= 1"),
    ("--train.lr=-1", "train.lr must be positive"),
    ("--topology.quorum=0", "topology.quorum must be in (0, 1]"),
    ("--run.name=a/b", "run.name"),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES)
def test_every_bad_value_is_a_config_error_at_load(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_config(None, ["--run.device=cuda"])


def test_the_cli_refuses_a_bad_value_before_creating_anything(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["simulate", f"--run.out_dir={out}", "--outer.topk=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrain: config error:") and "outer.topk" in err and err.count("\n") == 1
    assert not out.exists()


def test_help_documents_the_topology_tables(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "[[topology.replica]]" in out and "kind" in out and "stages" in out
