"""Document batches: pieces follow EOS boundaries, determinism, resume, rank-disjointness, config checks."""

from __future__ import annotations

import numpy as np
import pytest

from distrain.config import ConfigError, DataConfig, load_config
from distrain.data import DocumentSampler, document_lengths, document_pieces, prepare, read_shard

E = 0  # the EOS id in hand-made shards


def _shard(n_docs=300, seed=0, max_len=200):
    """Documents of random lengths (some empty), each followed by EOS; ids 1.. encode (doc, position)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n_docs):
        n = int(rng.integers(0, max_len))
        out += [1 + (d * 7 + i) % 500 for i in range(n)] + [E]
    return np.array(out, dtype=np.uint16)


def test_pieces_follow_document_boundaries_and_eos_begins_each_document():
    t = np.array([5, 6, 7, E, 8, 9, E, E, 1, 2, 3, 4, 5, E, 7, 7], dtype=np.uint16)
    s = DocumentSampler(t, E, max_doc_len=3, batch_tokens=100)
    b = s.next_batch()
    seqs = sorted(zip((b.inputs[a:z].tolist() for a, z in zip(b.cu_seqlens[:-1], b.cu_seqlens[1:])),
                      (b.targets[a:z].tolist() for a, z in zip(b.cu_seqlens[:-1], b.cu_seqlens[1:]))))
    assert seqs == sorted([
        ([E, 5, 6], [5, 6, 7]), ([7], [E]),  # a 3-token document is a 4-token sample, cut at 3
        ([E, 8, 9], [8, 9, E]),  # the empty document between two EOS is skipped
        ([E, 1, 2], [1, 2, 3]), ([3, 4, 5], [4, 5, E]),
        ([E, 7], [7, 7]),  # tokens after the last EOS: a document without its final target
    ])
    assert sorted(b.lengths) == [1, 2, 3, 3, 3, 3]


def test_every_piece_is_served_once_per_epoch_across_ranks():
    t = _shard()
    starts, lens = document_pieces(t, E, 64)
    assert lens.max() <= 64 and lens.min() >= 1
    world, owned = 3, []
    for r in range(world):
        s = DocumentSampler(t, E, 64, 256, rank=r, world_size=world, seed=5)
        order = s._rank_pieces(0).copy()
        owned += order.tolist()
        served = []
        while True:
            b = s.next_batch()
            if s.epoch > 0:
                break
            assert b.cu_seqlens[-1] <= 256 and len(b) >= 1
            for a, z in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
                served.append((b.inputs[a:z].tolist(), b.targets[a:z].tolist()))
        expect = []
        for k in order:  # the rank's pieces, in order, read straight from the shard
            st, n = int(starts[k]), int(lens[k])
            x = [E] + t[0:n - 1].tolist() if st < 0 else t[st:st + n].tolist()
            expect.append((x, t[st + 1:st + 1 + n].tolist()))
        assert served == expect
    assert len(owned) == len(set(owned)) == world * (starts.size // world)  # disjoint, n // world each


def test_ranks_are_disjoint_and_batches_deterministic_and_resumable():
    t = _shard(seed=1)
    a = DocumentSampler(t, E, 50, 400, rank=0, world_size=2, seed=3)
    b = DocumentSampler(t, E, 50, 400, rank=1, world_size=2, seed=3)
    assert not set(a._rank_pieces(0).tolist()) & set(b._rank_pieces(0).tolist())
    same = DocumentSampler(t, E, 50, 400, rank=0, world_size=2, seed=3)
    first = [a.next_batch() for _ in range(5)]
    assert all(x.inputs.equal(same.next_batch().inputs) for x in first)
    other_seed = DocumentSampler(t, E, 50, 400, rank=0, world_size=2, seed=4).next_batch()
    assert not other_seed.inputs.equal(first[0].inputs)
    # resume from the saved integers, across an epoch boundary too
    for _ in range(40):
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "position"} and state["epoch"] >= 1
    nxt = [a.next_batch() for _ in range(3)]
    fresh = DocumentSampler(t, E, 50, 400, rank=0, world_size=2, seed=3)
    fresh.load_state_dict(state)
    for x in nxt:
        y = fresh.next_batch()
        assert x.inputs.equal(y.inputs) and x.targets.equal(y.targets) and x.cu_seqlens.equal(y.cu_seqlens)


def test_bad_arguments_and_states_are_named():
    t = _shard(n_docs=5)
    with pytest.raises(ValueError, match=r"batch_tokens \(10\) must be >= max_doc_len \(20\)"):
        DocumentSampler(t, E, 20, 10)
    with pytest.raises(ValueError, match="max_doc_len must be a positive integer"):
        DocumentSampler(t, E, 0, 10)
    with pytest.raises(ValueError, match="rank must be in"):
        DocumentSampler(t, E, 20, 40, rank=2, world_size=2)
    with pytest.raises(ValueError, match="token shard too small"):
        DocumentSampler(np.array([E, E], dtype=np.uint16), E, 20, 40)
    s = DocumentSampler(t, E, 20, 40)
    with pytest.raises(ValueError, match="position 999 exceeds"):
        s.load_state_dict({"epoch": 0, "position": 999})
    with pytest.raises(ValueError, match="'epoch' must be a non-negative integer"):
        s.load_state_dict({"epoch": -1, "position": 0})


def test_prepared_directory_corpus_keeps_one_document_per_file(tiny_corpus, data_cache):
    cfg = DataConfig(source=str(tiny_corpus), cache_dir=str(data_cache), vocab_size=320, val_fraction=0.1)
    data = prepare(cfg, seed=0)
    tokens = read_shard(data.train_path)
    starts, lens = document_pieces(tokens, data.eos_id, 100_000)
    n_train_files = round(60 * 0.9)  # conftest's corpus: 60 files, a tenth held out for validation
    assert starts.size == n_train_files
    assert lens.sum() == tokens.size  # every token is some document's input exactly once
    assert len(set(lens.tolist())) > 10  # real, varied lengths: something for a planner to adapt to


def test_config_fields_and_their_checks():
    cfg = load_config(None, ["--data.max_doc_len=128", "--data.batch_tokens=1024"])
    assert document_lengths(cfg.data, cfg.model.max_seq_len, cfg.train.batch_size) == (128, 1024)
    d = load_config(None, [])
    assert d.data.sampler == "windows"
    assert document_lengths(d.data, d.model.max_seq_len, d.train.batch_size) == (d.model.max_seq_len,
                                                                                  d.train.batch_size * d.model.max_seq_len)
    for bad, msg in ((["--data.sampler=docs"], "data.sampler: 'docs' is not one of windows, documents"),
                     (["--data.max_doc_len=-1"], "data.max_doc_len must be >= 0"),
                     (["--data.max_doc_len=9999"], r"data.max_doc_len \(9999\) exceeds model.max_seq_len"),
                     (["--data.batch_tokens=10"], r"data.batch_tokens \(10\) must be >= the longest piece"),
                     (["--data.sampler=documents", "--topology.replica=[{kind='pipeline', stages=2}]"],
                      "runs on full replicas with parallel = 'sp'"),
                     (["--topology.replica=[{devices=2, parallel='sp'}]"], "set data.sampler = 'documents'")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)
