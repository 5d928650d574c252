"""How vLLM's scheduler half asks the worker half what its cache holds.

The worker's ``kvtier.Cache`` sees every tier (its host tier, the node's shared segment, the
local disk, including what a previous engine left on disk); the scheduler process holds no KV
and sees only the shared segment. ``LookupServer`` runs in the worker: a thread on an abstract
Unix socket that answers "how many leading tokens of these are cached" from the cache's index
(a lookup that takes and drops a lease; no bytes move). ``LookupClient`` is the scheduler's
side: one connection, a short timeout, and ``None`` whenever the worker cannot answer (not
started yet, gone), so the caller falls back to the shared segment.

Wire format, little-endian: a request is a uint32 token count then that many int32 token ids;
the answer is one uint64.
"""

from __future__ import annotations

import array
import logging
import socket
import struct
import sys
import threading
from typing import Callable, Sequence

logger = logging.getLogger("kvtier.vllm")

_MAX_TOKENS = 1 << 24


def address(engine_id: str, rank: int) -> str:
    """The abstract-namespace socket name of one engine's worker of one tensor-parallel rank."""
    return f"\0kvtier-lookup-{engine_id}-{rank}"


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


class LookupServer:
    def __init__(self, addr: str, cached_tokens: Callable[[list[int]], int]):
        self._fn = cached_tokens
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(addr)
        self._sock.listen(8)
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="kvtier-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            self._loop(conn)
        except OSError:
            pass  # the client went away, or close() shut the connection
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _loop(self, conn: socket.socket) -> None:
        while True:
            head = _recv_exact(conn, 4)
            if head is None:
                return
            (n,) = struct.unpack("<I", head)
            if n > _MAX_TOKENS:
                logger.error("kvtier: lookup request of %d tokens refused", n)
                return
            body = _recv_exact(conn, 4 * n)
            if body is None:
                return
            toks = array.array("i")
            toks.frombytes(body)
            if sys.byteorder != "little":
                toks.byteswap()
            try:
                found = self._fn(toks.tolist())
            except Exception as e:  # a bad request must not end the server
                logger.error("kvtier: lookup failed: %s", e)
                found = 0
            conn.sendall(struct.pack("<Q", found))

    def close(self) -> None:
        """Stops answering: the listening socket and every open connection are shut."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for c in [self._sock] + conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sock.close()


class LookupClient:
    def __init__(self, addr: str, timeout: float = 1.0):
        self._addr, self._timeout = addr, timeout
        self._conn: socket.socket | None = None

    def cached_tokens(self, tokens: Sequence[int]) -> int | None:
        """The worker's answer, or None when it cannot be had now."""
        toks = array.array("i", tokens)
        if sys.byteorder != "little":
            toks.byteswap()
        msg = struct.pack("<I", len(toks)) + toks.tobytes()
        for _ in range(2):  # a connection the worker dropped is made again once
            try:
                if self._conn is None:
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.settimeout(self._timeout)
                    c.connect(self._addr)
                    self._conn = c
                self._conn.sendall(msg)
                reply = _recv_exact(self._conn, 8)
                if reply is not None:
                    return struct.unpack("<Q", reply)[0]
            except OSError:
                pass
            self.close()
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
