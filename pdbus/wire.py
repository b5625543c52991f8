"""Framing: ``[b"PD" + version][msgpack header][*binary frames]``.

The header is one ``messages.Message`` encoded with msgspec (validated on decode); binary
payloads ride as extra frames sent with ``copy=False``. A frame that is not ours (bad magic,
other protocol version, oversized, malformed or unknown type) raises ``WireError`` with a
one-line reason; receivers log it and drop the message. Nothing is ever pickled.
"""

from __future__ import annotations

import msgspec

from pdbus.messages import PROTOCOL_VERSION, Message

MAGIC = b"PD"
PREFIX = MAGIC + bytes([PROTOCOL_VERSION])
MAX_HEADER_BYTES = 1 << 20

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class WireError(ValueError):
    """A frame that cannot be a valid message; the text is a one-line reason."""


def encode(msg: Message) -> bytes:
    return PREFIX + _encoder.encode(msg)


def decode(header: bytes | memoryview) -> Message:
    """Decode a header frame in place (a memoryview of a received frame is not copied)."""
    size = len(header)
    if size > MAX_HEADER_BYTES + len(PREFIX):
        raise WireError(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    if size < len(PREFIX) or header[:2] != MAGIC:
        raise WireError(f"bad magic {bytes(header[:3])!r}")
    if header[2] != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header[2]} (this peer speaks {PROTOCOL_VERSION})")
    try:
        return _decoder.decode(header[len(PREFIX) :])
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed msgpack: {exc}") from None


def tag_of(msg: Message) -> str:
    return msg.__struct_config__.tag  # type: ignore[attr-defined]


def pack_files(files: dict[str, bytes]) -> list[bytes]:
    """Name/content pairs as alternating frames."""
    out: list[bytes] = []
    for name, data in sorted(files.items()):
        out += [name.encode(), data]
    return out


def unpack_files(frames: list) -> dict[str, bytes]:
    if len(frames) % 2:
        raise WireError("file frames must come in name/content pairs")
    out = {}
    for i in range(0, len(frames), 2):
        name = bytes(frames[i]).decode("utf-8", "replace")
        if "/" in name or name.startswith("."):
            raise WireError(f"bad file name {name!r}")
        out[name] = bytes(frames[i + 1])
    return out
