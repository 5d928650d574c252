"""The kvtier Python package on its own (ctest label `python`): configuration errors that name
the key, byte-exact round trips through torch tensors in place, cross-layout loads, leases,
the shared segment seen from a process without KV, the GIL released while bytes move, and the
vllm_cpu layout against vLLM's own CPU cache-write op (skipped without vLLM)."""

import json
import os
import threading
import time
import uuid

import pytest
import torch

import kvtier

L, H, D, BS, NB = 3, 2, 64, 32, 24


def cfg(**over):
    c = {"chunk_tokens": 64, "layout": "vllm_cpu",
         "model": {"layers": L, "kv_heads": H, "head_size": D, "dtype": "bfloat16",
                   "block_size": BS},
         "salt": {"model_id": "pkg-test"}, "host": {"capacity_bytes": 8 << 20}}
    c.update(over)
    return c


def cpu_kv(seed, blocks=NB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(blocks, H, BS, 2 * D, generator=g).to(torch.bfloat16) for _ in range(L)]


def nhd_kv(blocks=NB):
    return [torch.zeros(2, blocks, BS, H, D, dtype=torch.bfloat16) for _ in range(L)]


def k_of_cpu(t, block, slot):
    """K[head][dim] of (block, slot) from a vllm_cpu tensor: the page holds K as [D][BS]."""
    page = t[block].reshape(H, 2 * BS * D)
    return page[:, : D * BS].reshape(H, D, BS)[:, :, slot]


def v_of_cpu(t, block, slot):
    page = t[block].reshape(H, 2 * BS * D)
    return page[:, D * BS:].reshape(H, BS, D)[:, slot, :]


@pytest.fixture
def seg():
    """A shared host segment name of the test's own; the segment is removed afterwards."""
    name = f"/kvtier-pkg-{uuid.uuid4().hex[:10]}"
    yield name
    path = "/dev/shm/" + name[1:]
    if os.path.exists(path):
        os.unlink(path)


TOKENS = list(range(1000, 1000 + 200))  # 3 full chunks of 64 (192 tokens) and a tail


def test_round_trip_in_place_and_exact():
    c = kvtier.Cache(cfg())
    src, dst = cpu_kv(1), [torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16) for _ in range(L)]
    table = [5, 2, 9, 11, 3, 7, 1]
    assert c.store(TOKENS, src, table) == 192
    table2 = [20, 19, 18, 17, 16, 15, 14]
    assert c.load(TOKENS, dst, table2) == 192
    for l in range(L):
        for i in range(6):
            assert torch.equal(src[l][table[i]], dst[l][table2[i]])
        assert torch.count_nonzero(dst[l][table2[6]]) == 0  # the tail was not stored
    s = c.stats()
    assert s["hit_tokens"] == 192 and s["retrieved_tokens"] == 192
    assert s["bytes_to_engine"] == 192 * L * 2 * H * D * 2


def test_cpu_chunk_loads_into_flash_nhd_with_k_untransposed(seg):
    base = cfg(shared_host={"name": seg, "capacity_bytes": 8 << 20})
    a = kvtier.Cache(base)
    src = cpu_kv(2)
    table = list(range(1, 8))
    assert a.store(TOKENS, src, table) == 192
    a.flush()  # written into the segment
    b = kvtier.Cache({**base, "layout": "vllm_flash_nhd"})
    dst = nhd_kv()
    assert b.load(TOKENS, dst, table) == 192
    for l in range(L):
        for t in range(192):
            blk, s = table[t // BS], t % BS
            assert torch.equal(dst[l][0, blk, s], k_of_cpu(src[l], blk, s))
            assert torch.equal(dst[l][1, blk, s], v_of_cpu(src[l], blk, s))
    # The scheduler's view: keys only, no tensors.
    view = kvtier.SharedLookup(base)
    assert view.cached_tokens(TOKENS) == 192
    assert view.cached_tokens([7] + TOKENS[1:]) == 0


def test_lease_is_held_until_retrieved_or_released():
    c = kvtier.Cache(cfg())
    c.store(TOKENS, cpu_kv(3), list(range(1, 8)))
    lease = c.lookup(TOKENS)
    assert lease.live and lease.tokens == 192 and lease.chunks == 3 and lease.first_token == 0
    assert c.retrieve(lease, cpu_kv(4), list(range(8, 15)), end_token=128) == 128
    assert not lease.live
    l2 = c.lookup(TOKENS, first_chunk=1)
    assert l2.first_token == 64 and l2.tokens == 128
    l2.release()
    assert not l2.live
    with pytest.raises(kvtier.InvalidArgument, match="lease"):
        c.retrieve(l2, cpu_kv(4), list(range(8, 15)))


@pytest.mark.parametrize("bad, match", [
    ({"chunk_tokens": 100}, r"'chunk_tokens' is 100"),
    ({"layout": "paged"}, r"'layout' is 'paged'"),
    ({"hots": {}}, r"'hots' is unknown"),
    ({"host": {"capacity": 1}}, r"'host.capacity' is unknown"),
    ({"host": {"capacity_bytes": "1G"}}, r"'host.capacity_bytes' is '1G' \(str\), expected int"),
    ({"host": {"capacity_bytes": -1}}, r"'host.capacity_bytes' is -1"),
    ({"write_mode": "sometimes"}, r"'write_mode' is 'sometimes'"),
    ({"local_disk": {"capacity_bytes": 1 << 20}}, r"'local_disk.path' is missing"),
    ({"model": {"layers": 1, "kv_heads": 1, "head_size": 8, "block_size": 4}},
     r"'model.dtype' \(or model.dtype_size\) is missing"),
    ({"model": {"layers": 1, "kv_heads": 1, "head_size": 8, "block_size": 4, "dtype": "int3"}},
     r"'model.dtype' is 'int3'"),
])
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(kvtier.ConfigError, match=match):
        kvtier.Cache(cfg(**bad))


def test_kvtier_errors_name_the_value_and_change_nothing():
    c = kvtier.Cache(cfg())
    kv = cpu_kv(5)
    with pytest.raises(kvtier.InvalidArgument, match=r"block table has 3 blocks, 192 tokens need 6"):
        c.store(TOKENS, kv, [1, 2, 3])
    with pytest.raises(kvtier.InvalidArgument, match=r"block table\[1\] is block id 99"):
        c.store(TOKENS, kv, [1, 99, 3, 4, 5, 6])
    with pytest.raises(kvtier.InvalidArgument, match=r"2-byte elements, model dtype_size is 4"):
        kvtier.Cache(cfg(model={**cfg()["model"], "dtype": "float32"})).store(
            TOKENS, kv, list(range(1, 8)))
    with pytest.raises(kvtier.InvalidArgument, match=r"engine_kv has 2 tensors"):
        c.store(TOKENS, kv[:2], list(range(1, 8)))
    with pytest.raises(kvtier.InvalidArgument, match=r"strides\[2\] \(block_size\) is 256"):
        padded = [torch.zeros(NB, H, BS, 4 * D, dtype=torch.bfloat16)[..., : 2 * D] for _ in kv]
        c.store(TOKENS, padded, list(range(1, 8)))
    assert c.stats()["stored_tokens"] == 0 and c.cached_tokens(TOKENS) == 0


def test_config_from_json_and_yaml_files(tmp_path):
    j = tmp_path / "kv.json"
    j.write_text(json.dumps(cfg()))
    assert kvtier.Cache(str(j)).chunk_tokens == 64
    y = tmp_path / "kv.yaml"
    y.write_text("chunk_tokens: 128\nlayout: vllm_cpu\nmodel: {layers: 1, kv_heads: 1, "
                 "head_size: 8, dtype: bf16, block_size: 32}\nhost: {capacity_bytes: 1048576}\n")
    assert kvtier.Cache(str(y)).chunk_tokens == 128
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(kvtier.ConfigError, match="not valid JSON"):
        kvtier.Cache(str(tmp_path / "bad.json"))


def test_copies_release_the_gil():
    # A store of a large chunk set runs while a Python thread keeps counting; with the GIL held
    # throughout, the counter could not advance during the call.
    big = {"layers": 16, "kv_heads": 8, "head_size": 128, "dtype": "bfloat16", "block_size": 64}
    c = kvtier.Cache(cfg(chunk_tokens=512, model=big, host={"capacity_bytes": 1 << 30}))
    kv = [torch.randn(66, 8, 64, 256).to(torch.bfloat16) for _ in range(16)]
    toks = list(range(4096))
    ticks, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.05)
    before = ticks[0]
    t0 = time.perf_counter()
    assert c.store(toks, kv, list(range(1, 65))) == 4096
    during = ticks[0] - before
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    assert elapsed > 0.01 and during > 1000, (elapsed, during)


def test_vllm_cpu_layout_matches_vllms_cache_write_op(seg):
    ops = pytest.importorskip("vllm._custom_ops")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    T = 128
    isa = _get_attn_isa(torch.bfloat16, BS, D, "auto")
    g = torch.Generator().manual_seed(9)
    slots = torch.randperm(NB * BS, generator=g)[:T]
    # Tokens t land at slots[t]; give kvtier the block table that says so by writing token t
    # into block table[t // BS], slot t % BS.
    table = [int(b) for b in torch.randperm(NB - 1, generator=g)[: T // BS] + 1]
    slot_mapping = torch.tensor([table[t // BS] * BS + t % BS for t in range(T)])
    keys = [torch.randn(T, H, D, generator=g).to(torch.bfloat16) for _ in range(L)]
    vals = [torch.randn(T, H, D, generator=g).to(torch.bfloat16) for _ in range(L)]
    kv = []
    for l in range(L):
        cache = torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16)
        k_cache, v_cache = cache.view(NB, H, BS * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys[l], vals[l], k_cache, v_cache, slot_mapping, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        kv.append(cache)
    base = cfg(shared_host={"name": seg, "capacity_bytes": 8 << 20})
    a = kvtier.Cache(base)
    toks = list(range(5000, 5000 + T))
    assert a.store(toks, kv, table) == T
    a.flush()
    b = kvtier.Cache({**base, "layout": "vllm_flash_nhd"})
    dst = nhd_kv()
    assert b.load(toks, dst, table) == T
    for l in range(L):
        for t in range(T):
            blk, s = table[t // BS], t % BS
            assert torch.equal(dst[l][0, blk, s], keys[l][t]), (l, t, "K")
            assert torch.equal(dst[l][1, blk, s], vals[l][t]), (l, t, "V")


def test_worker_lookup_server_answers_and_fails_soft():
    from kvtier import _lookup

    c = kvtier.Cache(cfg())
    c.store(TOKENS, cpu_kv(6), list(range(1, 8)))
    addr = _lookup.address(uuid.uuid4().hex, 0)
    client = _lookup.LookupClient(addr, timeout=0.5)
    assert client.cached_tokens(TOKENS) is None  # no worker yet: the caller falls back
    server = _lookup.LookupServer(addr, c.cached_tokens)
    try:
        assert client.cached_tokens(TOKENS) == 192
        assert client.cached_tokens(TOKENS[:100]) == 64
        assert client.cached_tokens([1, 2, 3]) == 0
        assert client.cached_tokens([]) == 0
        # A second client, and a request the cache refuses (more than max_tokens): answered 0,
        # the server stays up.
        other = _lookup.LookupClient(addr, timeout=0.5)
        assert other.cached_tokens(list(range(200000))) == 0
        assert client.cached_tokens(TOKENS) == 192
    finally:
        server.close()
    assert client.cached_tokens(TOKENS) is None
