"""One engine step's layer-wise copies, on one background thread (kvtier.vllm's worker half).

Loads: every pipeline of the step is begun (its chunks proven) before the forward pass; then
layer 0, 1, ... of every pipeline is copied in the background, and the forward waits for layer
l only before it reads layer l (``wait_layer``). Stores: layer l of every store pipeline is
copied in the background once the forward has written it (``layer_saved``), while the forward
computes the next layers; ``end_step`` copies what no hook asked for and publishes.

If the forward did not wait for every layer the step loaded, it may have read a layer before it
was loaded: ``end_step`` says so, and the connector reports those blocks as failed loads, so the
engine drops that step's output for them and recomputes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def _copy(pipes: Sequence[Any], lo: int, hi: int) -> None:
    for layer in range(lo, hi):
        for p in pipes:
            p.layer(layer)


class LayerSteps:
    """The copies of one step at a time over a model of ``layers`` layers."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-layers")
        self._reset()

    def _reset(self) -> None:
        self._loaded: list[threading.Event] | None = None
        self._load_job: Future | None = None
        self._load_error: BaseException | None = None
        self._waited: set[int] = set()
        self._stores: list[Any] = []
        self._stores_begun = False
        self._store_next = 0
        self._store_jobs: list[Future] = []

    # ---- loads ---------------------------------------------------------------------------

    def start_loads(self, pipes: Sequence[Any]) -> None:
        """Copies layer 0, 1, ... of every pipeline in the background, then finishes them."""
        if not pipes:
            return
        events = [threading.Event() for _ in range(self.layers)]
        self._loaded = events

        def run() -> None:
            try:
                for layer in range(self.layers):
                    for p in pipes:
                        p.layer(layer)
                    events[layer].set()
            except BaseException as e:  # reported by end_step; the forward must not hang
                self._load_error = e
            finally:
                for p in pipes:
                    p.finish()
                for ev in events:
                    ev.set()

        self._load_job = self._pool.submit(run)

    def wait_layer(self, layer: int) -> float:
        """Waits until layer ``layer`` of this step's loads is in; returns the seconds waited."""
        events = self._loaded
        if events is None or not 0 <= layer < self.layers:
            return 0.0
        self._waited.add(layer)
        if events[layer].is_set():
            return 0.0
        t0 = time.perf_counter()
        events[layer].wait()
        return time.perf_counter() - t0

    # ---- stores --------------------------------------------------------------------------

    def begin_stores(self, begin: Callable[[], list[Any]]) -> None:
        """Begins this step's store pipelines (``begin()`` makes them), once per step."""
        if not self._stores_begun:
            self._stores_begun = True
            self._stores = begin()

    @property
    def stores_begun(self) -> bool:
        return self._stores_begun

    def layer_saved(self, layer: int) -> bool:
        """The forward has written layer ``layer``: copies the store layers up to it in the
        background. False when there was nothing to copy."""
        if not self._stores or layer < self._store_next or layer >= self.layers:
            return False
        lo, self._store_next = self._store_next, layer + 1
        # self._stores is replaced at the end of a step, never changed in place: no copy.
        self._store_jobs.append(self._pool.submit(_copy, self._stores, lo, layer + 1))
        return True

    # ---- the end of the step -------------------------------------------------------------

    def end_step(self) -> tuple[bool, BaseException | None, list[int], BaseException | None]:
        """Waits for the step's copies, copies the store layers no hook asked for and finishes
        the stores. Returns whether the loads are sound (copied whole, and every layer waited
        for before the forward read it), the load copy's error, the tokens each store stored
        (0 for one that did not copy every layer) and the store copy's error."""
        loads_ok = True
        if self._load_job is not None:
            self._load_job.result()  # run() does not raise
            loads_ok = self._load_error is None and len(self._waited) == self.layers
        store_error: BaseException | None = None
        try:
            for job in self._store_jobs:
                job.result()
            _copy(self._stores, self._store_next, self.layers)
        except BaseException as e:  # the stores end short: finish publishes nothing
            store_error = e
        stored = [p.finish() for p in self._stores]
        load_error = self._load_error
        self._reset()
        return loads_ok, load_error, stored, store_error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
