"""Data pipeline: text sources → tokenizer → token shards (cached) → rank-disjoint batches."""

from distrain.data.corpus import (
    STDLIB_SOURCE,
    CorpusError,
    iter_documents,
    iter_jsonl,
    iter_stdlib,
    source_fingerprint,
    stdlib_files,
)
from distrain.data.documents import DocumentBatch, DocumentSampler, document_lengths, document_pieces
from distrain.data.prepare import PreparedData, cache_key, prepare
from distrain.data.sampler import TokenSampler, fixed_batches
from distrain.data.shards import ShardFormatError, ShardHeader, ShardWriter, read_header, read_shard, write_shard
from distrain.data.tokenizer import EOS_TOKEN, Tokenizer, TokenizerError

__all__ = [
    "EOS_TOKEN",
    "STDLIB_SOURCE",
    "CorpusError",
    "DocumentBatch",
    "DocumentSampler",
    "PreparedData",
    "ShardFormatError",
    "ShardHeader",
    "ShardWriter",
    "TokenSampler",
    "Tokenizer",
    "TokenizerError",
    "cache_key",
    "document_lengths",
    "document_pieces",
    "fixed_batches",
    "iter_documents",
    "iter_jsonl",
    "iter_stdlib",
    "prepare",
    "read_header",
    "read_shard",
    "source_fingerprint",
    "stdlib_files",
    "write_shard",
]
