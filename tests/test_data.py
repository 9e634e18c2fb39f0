import importlib
import json
import struct

import numpy as np
import pytest
import torch

from distrain.config import DataConfig
from distrain.data import (
    CorpusError,
    ShardFormatError,
    TokenSampler,
    Tokenizer,
    TokenizerError,
    iter_documents,
    iter_stdlib,
    prepare,
    read_header,
    read_shard,
    stdlib_files,
    write_shard,
)
from distrain.data import corpus
from distrain.data.corpus import split_text
from distrain.data.shards import HEADER_SIZE, MAGIC
from distrain.data.tokenizer import EOS_TOKEN

# the package re-exports the function prepare(), which shadows the submodule's attribute name
prepare_mod = importlib.import_module("distrain.data.prepare")

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Byte-level BPE must round-trip anything: naïve café, 日本語, emoji 🚀, tabs\tand\r\nCRLF.",
    "class Foo:\n    '''docstring'''\n    x = [1, 2, 3]\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


def corpus_dir(tmp_path, n_docs=40):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(n_docs):
        body = f"document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) + "\n"
        (d / ("sub" if i % 2 else ".") / f"doc{i:03d}.txt").write_text(body)
    (d / "image.png").write_bytes(b"\x89PNG not text")
    return d


# ----------------------------------------------------------------------------------------------
# corpus


def test_stdlib_corpus_found_and_capped():
    files = stdlib_files()
    names = [f.name for f in files]
    assert "os.py" in names and "argparse.py" in names
    assert not any(p in ("test", "site-packages", "idlelib", "lib2to3") for f in files for p in f.parts)
    rel = [f.as_posix() for f in files]
    assert rel == sorted(rel)
    docs = list(iter_stdlib(max_bytes=1000))
    assert docs and sum(len(d.encode()) for d in docs) == 1000


def test_directory_reader_sorted_recursive_and_capped(tmp_path):
    d = corpus_dir(tmp_path, n_docs=4)
    docs = list(iter_documents(str(d)))
    # sorted by relative path: doc000, doc002 (top level) before sub/doc001, sub/doc003
    assert [doc.split(":")[0] for doc in docs] == ["document 0", "document 2", "document 1", "document 3"]
    capped = list(iter_documents(str(d), max_bytes=len(docs[0].encode()) + 5))
    assert capped == [docs[0], docs[1][:5]]


def test_text_file_split_on_eot_or_blank_lines(tmp_path):
    assert split_text(f"a b{EOS_TOKEN}c\n\nd{EOS_TOKEN}") == ["a b", "c\n\nd"]
    assert split_text("para one\nline two\n\n  \npara two\n") == ["para one\nline two", "para two"]
    f = tmp_path / "book.txt"
    f.write_text("first\n\nsecond\n\nthird\n")
    assert list(iter_documents(str(f))) == ["first", "second", "third"]
    assert list(iter_documents(str(f), max_bytes=9)) == ["first", "seco"]


def test_text_file_streamed_in_blocks(tmp_path, monkeypatch):
    # markers and paragraphs straddling read-block boundaries are still found
    monkeypatch.setattr(corpus, "_BLOCK", 5)
    f = tmp_path / "stories.txt"
    f.write_text(f"once upon a time\n{EOS_TOKEN}\nthe end\n\nreally{EOS_TOKEN}")
    assert list(iter_documents(str(f))) == ["once upon a time", "the end\n\nreally"]
    f.write_text("alpha beta\n\ngamma delta\n")
    assert list(iter_documents(str(f))) == ["alpha beta", "gamma delta"]


def test_max_bytes_never_splits_a_character(tmp_path):
    f = tmp_path / "u.txt"
    f.write_text("日本語")  # 3 bytes per character
    assert list(iter_documents(str(f), max_bytes=7)) == ["日本"]


def test_jsonl_reader_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "alpha", "id": 1}\n\n{"body": "x", "text": "beta"}\n')
    assert list(iter_documents(str(good))) == ["alpha", "beta"]
    other = tmp_path / "o.jsonl"
    other.write_text('{"content": "gamma"}\n')
    assert list(iter_documents(str(other), text_key="content")) == ["gamma"]

    cases = {
        '{"text": "ok"}\n{"text": broken}\n': r"bad1\.jsonl:2: invalid JSON",
        '{"text": "ok"}\n{"text": "ok"}\n{"body": "x"}\n': r"bad2\.jsonl:3: record has no key 'text' \(keys: body\)",
        '[1, 2]\n': r"bad3\.jsonl:1: expected a JSON object, got list",
        '{"text": 5}\n': r"bad4\.jsonl:1: 'text' must be a string, got int",
    }
    for i, (content, pattern) in enumerate(cases.items(), 1):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text(content)
        with pytest.raises(CorpusError, match=pattern):
            list(iter_documents(str(p)))


def test_missing_source_names_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        iter_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare(DataConfig(source=str(missing), cache_dir=str(tmp_path / "c")), seed=0)


def test_directory_without_text_files(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.bin").write_bytes(b"\0")
    with pytest.raises(CorpusError, match="no text files"):
        list(iter_documents(str(tmp_path / "e")))


# ----------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("vocab,dtype", [(1000, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=1001)
    tokens[0] = vocab - 1
    p = write_shard(tmp_path / "s.bin", tokens, vocab)
    got = read_shard(p)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, tokens)
    assert p.stat().st_size == HEADER_SIZE + tokens.size * np.dtype(dtype).itemsize
    h = read_header(p)
    assert (h.count, h.vocab_size) == (tokens.size, vocab)
    assert [q.name for q in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_empty_shard_and_out_of_range_tokens(tmp_path):
    p = write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), 100)
    assert read_shard(p).size == 0
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
        write_shard(tmp_path / "o.bin", np.array([1, 100]), 100)
    assert not (tmp_path / "o.bin").exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["e.bin"]


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_corrupt_shards_raise_specific_errors(tmp_path):
    def fresh(name):
        return write_shard(tmp_path / name, np.arange(50), 1000)

    p = fresh("magic.bin")
    _corrupt(p, 0, b"NOTATOK\0")
    with pytest.raises(ShardFormatError, match=r"magic\.bin: bad magic"):
        read_shard(p)

    p = fresh("version.bin")
    _corrupt(p, 8, struct.pack("<I", 99))
    with pytest.raises(ShardFormatError, match=r"version\.bin: unsupported version 99"):
        read_shard(p)

    p = fresh("dtype.bin")
    _corrupt(p, 12, struct.pack("<I", 7))
    with pytest.raises(ShardFormatError, match=r"dtype\.bin: unknown dtype code 7"):
        read_shard(p)

    p = fresh("swapped.bin")  # valid code, but not the one the file was written with
    _corrupt(p, 12, struct.pack("<I", 2))
    with pytest.raises(ShardFormatError, match=r"swapped\.bin: truncated"):
        read_shard(p)

    p = fresh("trunc.bin")
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ShardFormatError, match=r"trunc\.bin: truncated: file size 163 bytes"):
        read_shard(p)

    p = fresh("extra.bin")
    p.write_bytes(p.read_bytes() + b"\0\0")
    with pytest.raises(ShardFormatError, match=r"extra\.bin: trailing bytes"):
        read_shard(p)

    p = tmp_path / "short.bin"
    p.write_bytes(MAGIC + b"\0" * 4)
    with pytest.raises(ShardFormatError, match=r"short\.bin: truncated header \(12 of 64 bytes\)"):
        read_shard(p)


# ----------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_train_save_load_round_trip(tmp_path):
    tok = Tokenizer.train(TEXTS * 3, vocab_size=300)
    assert tok.eos_id == 0 and 257 < tok.vocab_size <= 300
    path = tmp_path / "tok" / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
    batch = loaded.encode_batch(TEXTS)
    assert batch == tok.encode_batch(TEXTS)
    assert all(tok.eos_id not in ids for ids in batch)  # no special tokens added
    for text, ids in zip(TEXTS, batch):
        assert loaded.decode(ids) == text
    unseen = "zebra ∑ quux \x00\x7f"  # bytes never seen in training still round-trip
    assert loaded.decode(loaded.encode(unseen)) == unseen
    # BPE learned merges: common text needs fewer tokens than bytes
    assert len(batch[3]) < len(TEXTS[3].encode()) / 2


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match=">= 257"):
        Tokenizer.train(TEXTS, vocab_size=100)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_user_tokenizer_is_used(tmp_path):
    d = corpus_dir(tmp_path)
    user = Tokenizer.train(["completely different text", "zzz yyy xxx"] * 10, vocab_size=270)
    user_path = tmp_path / "user_tokenizer.json"
    user.save(user_path)
    cfg = DataConfig(source=str(d), tokenizer=str(user_path), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    data = prepare(cfg, seed=0)
    assert data.vocab_size == user.vocab_size
    assert Tokenizer.from_file(data.tokenizer_path).to_str() == user.to_str()
    # the shard's first document is some corpus document encoded with the user's tokenizer
    tokens = np.asarray(read_shard(data.train_path)).tolist()
    first = tokens[: tokens.index(user.eos_id)]
    assert first in [user.encode(doc) for doc in iter_documents(str(d))]
    trained = prepare(DataConfig(source=str(d), vocab_size=270, cache_dir=cfg.cache_dir, val_fraction=0.1), seed=0)
    assert np.asarray(read_shard(trained.train_path)).tolist()[: len(first)] != first


# ----------------------------------------------------------------------------------------------
# prepare


def test_prepare_split_stream_and_cache(tmp_path, monkeypatch):
    d = corpus_dir(tmp_path)
    cfg = DataConfig(source=str(d), vocab_size=320, cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    data = prepare(cfg, seed=3)
    assert not data.cached
    tok = Tokenizer.from_file(data.tokenizer_path)
    train, val = np.asarray(read_shard(data.train_path)), np.asarray(read_shard(data.val_path))
    assert (train.size, val.size) == (data.train_tokens, data.val_tokens)
    assert data.eos_id == tok.eos_id and data.vocab_size == tok.vocab_size
    assert sorted(q.name for q in data.train_path.parent.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]

    # documents joined with eos; 10 % of 40 documents go to validation; together they are the corpus
    def split_docs(arr):
        assert arr[-1] == tok.eos_id
        cuts = np.flatnonzero(arr == tok.eos_id)
        return [tok.decode(p.tolist()) for p in np.split(arr, cuts + 1)[:-1]]

    def strip(docs):
        return [x[:-len(EOS_TOKEN)] for x in docs]

    train_docs, val_docs = strip(split_docs(train)), strip(split_docs(val))
    assert len(val_docs) == 4 and len(train_docs) == 36
    assert sorted(train_docs + val_docs) == sorted(iter_documents(str(d)))

    # second call: served from the cache, no reading or tokenizing, files untouched
    mtime = data.train_path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(prepare_mod.Tokenizer, "encode_batch", boom)
    monkeypatch.setattr(prepare_mod, "_docs", boom)
    again = prepare(cfg, seed=3)
    assert again.cached and again.train_path == data.train_path and again.train_tokens == data.train_tokens
    assert data.train_path.stat().st_mtime_ns == mtime

    # any input that changes the output changes the key
    monkeypatch.undo()
    other_seed = prepare(cfg, seed=4)
    assert not other_seed.cached and other_seed.train_path.parent != data.train_path.parent
    (d / "new.md").write_text("a brand new document")
    changed = prepare(cfg, seed=3)
    assert not changed.cached and changed.train_path.parent != data.train_path.parent


def test_prepare_is_deterministic(tmp_path):
    d = corpus_dir(tmp_path)
    cfgs = [DataConfig(source=str(d), vocab_size=300, cache_dir=str(tmp_path / f"c{i}"), val_fraction=0.2) for i in range(2)]
    a, b = (prepare(c, seed=1) for c in cfgs)
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.val_path.read_bytes() == b.val_path.read_bytes()
    assert a.tokenizer_path.read_text() == b.tokenizer_path.read_text()


def test_prepare_rebuilds_corrupt_cache(tmp_path):
    d = corpus_dir(tmp_path)
    cfg = DataConfig(source=str(d), vocab_size=300, cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    data = prepare(cfg, seed=0)
    good = data.train_path.read_bytes()
    data.train_path.write_bytes(good[:-2])
    again = prepare(cfg, seed=0)
    assert not again.cached and again.train_path.read_bytes() == good


def test_prepare_jsonl_and_bad_inputs(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"body": f"record number {i} " * 5}) + "\n" for i in range(10)))
    cfg = DataConfig(source=str(p), text_key="body", vocab_size=280, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    data = prepare(cfg, seed=0)
    assert data.train_tokens > 0 and data.val_tokens > 0
    with pytest.raises(CorpusError, match="record has no key 'text'"):
        prepare(DataConfig(source=str(p), cache_dir=str(tmp_path / "cache")), seed=0)
    single = tmp_path / "one.txt"
    single.write_text("just one paragraph")
    with pytest.raises(CorpusError, match="single document"):
        prepare(DataConfig(source=str(single), cache_dir=str(tmp_path / "cache")), seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(DataConfig(source=str(p), val_fraction=1.0, cache_dir=str(tmp_path / "cache")), seed=0)


# ----------------------------------------------------------------------------------------------
# sampler


def test_sampler_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)  # token value = position: windows are recognisable
    a = TokenSampler(tokens, seq_len=9, batch_size=4, rank=0, world_size=1, seed=7)
    b = TokenSampler(tokens, seq_len=9, batch_size=4, rank=0, world_size=1, seed=7)
    c = TokenSampler(tokens, seq_len=9, batch_size=4, rank=0, world_size=1, seed=8)
    for _ in range(30):  # crosses two epoch boundaries (25 batches per epoch)
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.shape == ya.shape == (4, 9) and xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:]) and torch.equal(ya[:, -1], xa[:, -1] + 1)
        assert torch.all(xa[:, 0] % 10 == 0)  # windows start on multiples of seq_len+1
    assert a.state_dict() == {"epoch": 1, "position": 5}
    assert not torch.equal(TokenSampler(tokens, 9, 4, seed=7).next_batch()[0], c.next_batch()[0])


def test_sampler_ranks_disjoint_and_cover_epoch():
    tokens = np.arange(10 * 103, dtype=np.int64)  # 103 windows of 10 tokens
    world, per_epoch = 3, 8  # 34 windows per rank -> 8 batches of 4
    seen_by_epoch = {0: [], 1: []}
    for r in range(world):
        s = TokenSampler(tokens, seq_len=9, batch_size=4, rank=r, world_size=world, seed=0)
        assert s.batches_per_epoch == per_epoch
        for epoch in (0, 1):
            windows = [int(w) for _ in range(per_epoch) for w in s.next_batch()[0][:, 0] // 10]
            assert len(set(windows)) == len(windows)
            seen_by_epoch[epoch].append(set(windows))
    for sets in seen_by_epoch.values():
        assert all(not (sets[i] & sets[j]) for i in range(world) for j in range(i + 1, world))
        assert len(set().union(*sets)) == world * per_epoch * 4
    assert seen_by_epoch[0][0] != seen_by_epoch[1][0]  # a new permutation each epoch


def test_sampler_state_dict_restores_exactly():
    tokens = np.random.default_rng(0).integers(0, 500, size=5000)
    s = TokenSampler(tokens, seq_len=16, batch_size=3, rank=1, world_size=2, seed=11)
    for _ in range(52):  # 49 batches per epoch: state lands in epoch 1
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"epoch": 1, "position": 3}
    expected = [s.next_batch() for _ in range(60)]
    r = TokenSampler(tokens, seq_len=16, batch_size=3, rank=1, world_size=2, seed=11)
    r.load_state_dict(state)
    for (xe, ye), (xr, yr) in zip(expected, (r.next_batch() for _ in range(60))):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    with pytest.raises(ValueError, match="exceeds 49 batches per epoch"):
        r.load_state_dict({"epoch": 0, "position": 50})
    with pytest.raises(ValueError, match="'epoch' and 'position'"):
        r.load_state_dict({"epoch": 0})


def test_sampler_too_small_and_bad_args():
    with pytest.raises(ValueError, match=r"too small: 100 tokens make 9 windows .* needs 110 tokens"):
        TokenSampler(np.arange(100), seq_len=10, batch_size=5, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        TokenSampler(np.arange(100), seq_len=4, batch_size=1, rank=2, world_size=2, seed=0)


def test_val_batches_fixed_and_rank_independent(tmp_path):
    p = write_shard(tmp_path / "v.bin", np.arange(2000), 4096)
    tokens = read_shard(p)
    s0 = TokenSampler(tokens, seq_len=19, batch_size=2, rank=0, world_size=2, seed=1)
    s1 = TokenSampler(tokens, seq_len=19, batch_size=2, rank=1, world_size=2, seed=5)
    s0.next_batch()
    v0, v0_again, v1 = s0.val_batches(3), s0.val_batches(3), s1.val_batches(3)
    assert len(v0) == 3
    for (a, b), (c, d), (e, f) in zip(v0, v0_again, v1):
        assert torch.equal(a, c) and torch.equal(a, e) and torch.equal(b, f)
    starts = torch.cat([x[:, 0] for x, _ in v0]) // 20
    assert starts.tolist() == [0, 20, 40, 59, 79, 99]  # spread over all 100 windows
    assert len(s0.val_batches(1000)) == 50  # capped at the windows available
