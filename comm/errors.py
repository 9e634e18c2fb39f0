"""Error types for everything that crosses a wire.

Each rejection reason has its own class so callers (and metrics) can tell a corrupt frame from a
stale one without parsing messages. All frame problems derive from ``FrameError``; transport
problems derive from ``CommError``.
"""

from __future__ import annotations


class CommError(RuntimeError):
    """Base class for transport failures (membership, timeouts, misuse)."""


class FrameError(ValueError):
    """Base class: a received frame was rejected; the round continues without it."""


class TruncatedFrameError(FrameError):
    """Fewer bytes than the prefix or the declared header/payload lengths."""


class TrailingBytesError(FrameError):
    """More bytes than the prefix declares (or data after the zstd frame)."""


class BadMagicError(FrameError):
    """The frame does not start with the distrain magic."""


class UnsupportedVersionError(FrameError):
    """Unknown wire version, unknown flag bits, or non-zero reserved field."""


class OversizedFrameError(FrameError):
    """A declared length exceeds the receiver's limits."""


class ChecksumError(FrameError):
    """crc32 of the frame does not match the prefix."""


class SchemaError(FrameError):
    """The msgpack header does not follow the frame schema."""


class MalformedHeaderError(SchemaError):
    """The header is not valid strict msgpack (or uses ext/bin types)."""


class RunMismatchError(SchemaError):
    """The frame belongs to another run."""


class CodecMismatchError(SchemaError):
    """The frame was encoded with a codec kind/params different from the local one."""


class UnknownTensorError(SchemaError):
    """The frame names a tensor the receiver does not own, or misses one it expects."""


class ShapeMismatchError(SchemaError):
    """A tensor's shape differs from the receiver's local shape."""


class DecompressionError(FrameError):
    """The zstd payload is corrupt or does not decompress to the declared size."""


class IndexRangeError(FrameError):
    """A decoded sparse index is out of its chunk, or indices are not strictly increasing."""


class NonFiniteError(FrameError):
    """A decoded value or centroid is NaN or infinite."""


class RoundError(FrameError):
    """The frame is for a different outer round."""


class StaleFrameError(RoundError):
    """The frame is for an earlier round than the receiver's current one."""


class FutureFrameError(RoundError):
    """The frame is for a later round than the receiver's current one."""


class UnknownGroupError(CommError):
    """A collective names a group the transport does not know."""


class NotAMemberError(CommError):
    """A rank called a collective on a group it does not belong to."""


class RankAbsentError(CommError):
    """A rank marked absent (dead) called a collective, or a broadcast source is absent."""


class CollectiveMismatchError(CommError):
    """Members of a group called different collectives (or broadcast sources) at the same step."""


class CollectiveTimeoutError(CommError):
    """Not every live member arrived at a collective within the timeout."""


class RoundLateError(CommError):
    """This worker reached a collective after its grace had passed: the round completed without it.

    It is alive and keeps its state; it sits this round out and rejoins from the global weights."""


class MagnitudeError(FrameError):
    """A boundary frame's values are out of bounds: above the absolute cap, or far above the running
    scale of what that link carried in that direction (valid and finite, but not an activation)."""


class BoundaryRejectedError(FrameError):
    """A pipeline stage rejected a boundary frame; the message names the stage, the step and why."""


class BasisMismatchError(SchemaError):
    """A compressed boundary frame was built on another subspace basis than the receiver's."""
