"""The scheduler half's lookup answers, without an engine: a waiting request is asked about at
every step, and the connector reuses its last answer only while it cannot have gone stale (no
store planned since, younger than the TTL, the same prompt limit)."""

from __future__ import annotations

import pytest

from kvtier import vllm as kv


class FakeWorker:
    """The worker's lookup server: answers `hit`, or None (cannot answer)."""

    def __init__(self, hit):
        self.hit, self.asked = hit, 0

    def cached_tokens(self, tokens):
        self.asked += 1
        return None if self.hit is None else min(self.hit, len(tokens))


class FakeRequest:
    def __init__(self, rid):
        self.request_id = rid


def scheduler_half(worker, segment_hit=0):
    c = object.__new__(kv.KvtierConnector)  # just the state _cached_tokens reads
    c._answers, c._stores_planned, c._sched, c._sched_dirty = {}, 0, {}, False
    c._reqs = {}
    c._client, c._lookup = worker, FakeWorker(segment_hit)
    return c


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(kv.time, "monotonic", lambda: now[0])
    return now


def test_answer_reused_while_nothing_could_change_it(clock):
    w = FakeWorker(256)
    c = scheduler_half(w)
    toks = list(range(1000))
    assert c._cached_tokens("a", toks, 896) == 256
    clock[0] += kv._ANSWER_TTL_S / 2
    assert c._cached_tokens("a", toks, 896) == 256
    assert w.asked == 1 and c._sched == {"lookups": 1, "lookups_reused": 1}
    assert c._cached_tokens("b", toks, 896) == 256  # another request is asked about itself
    assert w.asked == 2


def test_answer_asked_again_after_a_store_the_ttl_or_a_new_limit(clock):
    w = FakeWorker(0)
    c = scheduler_half(w)
    toks = list(range(1000))
    assert c._cached_tokens("a", toks, 896) == 0
    w.hit = 512
    c._stores_planned += 1  # this engine planned a store: the miss may be a hit now
    assert c._cached_tokens("a", toks, 896) == 512
    w.hit = 768
    clock[0] += kv._ANSWER_TTL_S  # another process may have stored
    assert c._cached_tokens("a", toks, 896) == 768
    assert c._cached_tokens("a", toks, 640) == 640  # a different limit is a different question
    assert w.asked == 4 and "lookups_reused" not in c._sched


def test_segment_answer_when_the_worker_cannot(clock):
    c = scheduler_half(FakeWorker(None), segment_hit=384)
    assert c._cached_tokens("a", list(range(1000)), 896) == 384
    assert c._sched["lookups_from_segment"] == 1


def test_finished_request_forgets_its_answer(clock):
    w = FakeWorker(256)
    c = scheduler_half(w)
    c._cached_tokens("a", list(range(1000)), 896)
    assert c.request_finished(FakeRequest("a"), []) == (False, None)
    assert c._answers == {}
    c._cached_tokens("a", list(range(1000)), 896)
    assert w.asked == 2


def _vllm_config(extra):
    from types import SimpleNamespace

    return SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))


def test_connector_keys_are_checked_before_anything_else():
    import kvtier

    with pytest.raises(kvtier.ConfigError, match="key 'layerwise' is 'yes', not true or false"):
        kv.kvtier_config(_vllm_config({"layerwise": "yes"}), 0)
    with pytest.raises(kvtier.ConfigError, match="key 'layer_wise' is unknown .*layerwise"):
        kv.kvtier_config(_vllm_config({"layer_wise": True}), 0)
