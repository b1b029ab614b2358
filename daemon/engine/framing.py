"""Length-prefixed pickle frames between the daemon and a model worker subprocess."""

from __future__ import annotations

import pickle
import struct

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30


def encode(message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def read_blocking(stream) -> object | None:
    """Read one frame from a binary file object; None at end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


async def read_async(reader) -> object:
    """Read one frame from an asyncio StreamReader (IncompleteReadError when the peer died)."""
    head = await reader.readexactly(HEADER.size)
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    return pickle.loads(await reader.readexactly(size))
