"""Block allocator for the paged KV cache: reference counts and a prefix cache keyed by content.

A full block is keyed by a hash chained over its parent block's key, its tokens, and the adapter
each token was computed with (vLLM-style automatic prefix caching, extended with adapter ids so a
base-computed prefix is shared by every adapter and never confused with an adapted one). Blocks
whose count drops to zero stay findable by key until the block is reused (LRU), so a finished
request's prompt still serves the next one.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

ROOT_KEY = hashlib.sha256(b"kilolora prefix cache v1").digest()
"""the parent key of a sequence's first block"""


def block_key(parent: bytes | None, tokens: Sequence[int], adapters: Sequence[int]) -> bytes:
    """sha256(parent key | n | n token ids | n adapter uids), as fixed-width little-endian int64
    (vLLM's `sha256` prefix-caching hash, with adapter uids in place of its extra keys). Unlike
    Python's `hash` of a tuple, a key is the same in every process and on every machine, and two
    different chains collide only if sha256 does: the parent is always 32 bytes and the count
    fixes where the tokens end and the uids begin."""
    n = len(tokens)
    assert len(adapters) == n, "one adapter uid per token"
    body = struct.pack(f"<q{n}q{n}q", n, *tokens, *adapters)  # uids are signed: BASE is -1
    return hashlib.sha256((parent if parent is not None else ROOT_KEY) + body).digest()


class OutOfBlocks(RuntimeError):
    """No free block is left; the caller waits or preempts."""


class BlockManager:
    """Reference-counted blocks with a content-keyed cache of full blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.hits = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    # --------------------------------------------------------------- lifecycle
    def allocate(self) -> int:
        if self._free_plain:
            b = self._free_plain.pop()
        elif self._free_cached:
            b, _ = self._free_cached.popitem(last=False)
            key = self.key_of[b]
            if key is not None and self.by_key.get(key) == b:
                del self.by_key[key]
            self.key_of[b] = None
        else:
            raise OutOfBlocks("the KV cache has no free block")
        assert self.ref[b] == 0
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self._free_cached.pop(b)
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        assert self.ref[b] > 0, f"block {b} freed twice"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key_of[b] is not None:
                self._free_cached[b] = None
            else:
                self._free_plain.append(b)

    # ------------------------------------------------------------ prefix cache
    def lookup(self, key: bytes) -> int | None:
        """The block holding this content, with its count raised; None on a miss."""
        b = self.by_key.get(key)
        if b is None:
            return None
        self.incref(b)
        self.hits += 1
        return b

    def register(self, b: int, key: bytes) -> None:
        """Mark a full block's content; an existing block with the same content stays canonical."""
        if self.key_of[b] is not None:
            return
        if key not in self.by_key:
            self.by_key[key] = b
        self.key_of[b] = key

    def is_shared(self, b: int) -> bool:
        """Writing into this block would change what another sequence or the cache sees."""
        return self.ref[b] > 1 or self.key_of[b] is not None
