"""kvtier: KV-cache tiers for LLM inference engines, from Python.

``Cache(config)`` is one kvtier cache (a host tier, optionally the node's shared host segment and
a local disk); ``SharedLookup(config)`` answers how much of a prompt the shared segment holds
without touching bytes (an engine's scheduler). Tensors are passed as torch tensors or any
DLPack producer, in place; every copy and I/O runs without the GIL. ``kvtier.vllm`` is the vLLM
KV connector.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from . import _kvtier
from .config import ConfigError, load as load_config

Error = _kvtier.Error
InvalidArgument = _kvtier.InvalidArgument
Lease = _kvtier.Lease
Pipeline = _kvtier.Pipeline
chunk_sizes = _kvtier.chunk_sizes
layouts = _kvtier.layouts

__all__ = ["Cache", "SharedLookup", "Lease", "Pipeline", "Error", "InvalidArgument", "ConfigError",
           "load_config", "chunk_sizes", "layouts"]


def _ints(x: Any) -> list[int]:
    """Token ids or a block table as a list of ints (a list, tuple, range, array or tensor)."""
    if isinstance(x, list):
        return x
    tolist = getattr(x, "tolist", None)
    return tolist() if tolist is not None else list(x)


class Cache:
    """One kvtier cache. ``config``: a dict or a path to a JSON/YAML file (see docs/python.md)."""

    def __init__(self, config: Mapping[str, Any] | str):
        self.config = load_config(config)
        self._c = _kvtier._Cache(self.config)
        self._dt = self.config["model"]["dtype_size"]

    @property
    def chunk_tokens(self) -> int:
        return self._c.chunk_tokens

    @property
    def block_size(self) -> int:
        return self.config["model"]["block_size"]

    @property
    def tier_names(self) -> list[str]:
        return self._c.tier_names

    def store(self, tokens: Sequence[int], kv_caches: Sequence[Any], block_table: Sequence[int],
              first_token: int = 0) -> int:
        """Stores the full chunks of ``tokens`` that start at or after ``first_token`` from the
        engine's blocks; returns the tokens stored or already held, from the first such chunk."""
        return self._c.store(_ints(tokens), list(kv_caches), _ints(block_table), first_token,
                             self._dt)

    def lookup(self, tokens: Sequence[int], first_chunk: int = 0) -> Lease:
        """The cached run of chunks of ``tokens`` from chunk ``first_chunk`` (the prefix by
        default), held until retrieved or released."""
        return self._c.lookup(_ints(tokens), first_chunk)

    def retrieve(self, lease: Lease, kv_caches: Sequence[Any], block_table: Sequence[int],
                 end_token: int | None = None) -> int:
        """Loads the lease's chunks that end by ``end_token`` into the engine's blocks; returns the
        tokens loaded (a prefix, verified byte for byte); consumes the lease."""
        end = (1 << 63) if end_token is None else end_token
        return self._c.retrieve(lease, list(kv_caches), _ints(block_table), end, self._dt)

    def begin_store(self, tokens: Sequence[int], kv_caches: Sequence[Any],
                    block_table: Sequence[int], first_token: int = 0) -> Pipeline:
        """A layer-wise store (as ``store``): the chunks' entries are reserved now; call
        ``layer(l)`` for l = 0, 1, ... once the engine has written layer l, then ``finish()``,
        which publishes the chunks and returns the tokens stored (0 unless every layer was
        stored). The tensors must stay alive until then."""
        return self._c.begin_store(_ints(tokens), list(kv_caches), _ints(block_table),
                                   first_token, self._dt)

    def begin_retrieve(self, lease: Lease, kv_caches: Sequence[Any], block_table: Sequence[int],
                       end_token: int | None = None) -> Pipeline:
        """A layer-wise retrieve (as ``retrieve``; consumes the lease): every chunk it will load
        is proven now (promoted from disk, or held and verified in the shared segment), so
        ``tokens`` is final; ``layer(l)`` copies layer l of every chunk into the engine's blocks,
        ``finish()`` releases the chunks and returns the tokens (0 unless every layer was
        copied)."""
        end = (1 << 63) if end_token is None else end_token
        return self._c.begin_retrieve(lease, list(kv_caches), _ints(block_table), end, self._dt)

    def load(self, tokens: Sequence[int], kv_caches: Sequence[Any], block_table: Sequence[int],
             end_token: int | None = None, first_chunk: int = 0) -> int:
        """lookup + retrieve: loads the cached run of ``tokens`` from chunk ``first_chunk`` up to
        ``end_token``; returns the tokens loaded from ``first_chunk * chunk_tokens``."""
        lease = self.lookup(tokens, first_chunk)
        try:
            return self.retrieve(lease, kv_caches, block_table, end_token)
        finally:
            lease.release()

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        """Leading tokens of ``tokens`` cached in any tier now (takes and drops a lease)."""
        lease = self.lookup(tokens)
        n = lease.tokens
        lease.release()
        return n

    def prefetch(self, tokens: Sequence[int]) -> int:
        return self._c.prefetch(_ints(tokens))

    def clear(self, tokens: Sequence[int] | None = None) -> int:
        return self._c.clear_all() if tokens is None else self._c.clear(_ints(tokens))

    def flush(self) -> None:
        """Waits until queued writes to the lower tiers are done."""
        self._c.flush()

    def stats(self) -> dict[str, Any]:
        return self._c.stats()


class SharedLookup:
    """The scheduler's view of the node's shared host segment: ``cached_tokens(prompt)`` names
    chunks exactly as a ``Cache`` of the same config does and never touches KV bytes."""

    def __init__(self, config: Mapping[str, Any] | str):
        self.config = load_config(config)
        self._v = _kvtier._SharedLookup(self.config)

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        return self._v.cached_tokens(_ints(tokens))
