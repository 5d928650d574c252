"""Layer-wise pipelines from Python (ctest label `python`): Cache.begin_store / begin_retrieve
over vllm_cpu tensors (transposed K pages), layer by layer, byte-exact; refusals; and the
connector's step machinery (kvtier._layers.LayerSteps) without an engine: loads waited for
layer by layer are sound, a load the forward did not wait for is not, stores the hooks did not
ask for are completed at the end of the step."""

import os
import uuid

import pytest
import torch

import kvtier
from kvtier._layers import LayerSteps

L, H, D, BS, NB = 4, 2, 64, 16, 40
TOKENS = list(range(500, 500 + 8 * 64 + 5))  # 8 chunks of 64 and a tail
TABLE = list(range(NB - 1, -1, -1))[: -(-len(TOKENS) // BS)]  # blocks in reverse order


def cfg(seg=None):
    c = {"chunk_tokens": 64, "layout": "vllm_cpu",
         "model": {"layers": L, "kv_heads": H, "head_size": D, "dtype": "bfloat16",
                   "block_size": BS},
         "salt": {"model_id": "layers-test"}, "host": {"capacity_bytes": 32 << 20}}
    if seg is not None:
        c["shared_host"] = {"name": seg, "capacity_bytes": 32 << 20}
    return c


def kv(seed=None):
    if seed is None:
        return [torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16) for _ in range(L)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NB, H, BS, 2 * D, generator=g).to(torch.bfloat16) for _ in range(L)]


def blocks(t, n_tokens):
    """The blocks of the first n_tokens (whole blocks: chunks are block-aligned)."""
    return t[TABLE[: n_tokens // BS]]


@pytest.fixture
def seg():
    name = f"/kvtier-layers-{uuid.uuid4().hex[:10]}"
    yield name
    path = "/dev/shm/" + name[1:]
    if os.path.exists(path):
        os.unlink(path)


def test_store_and_retrieve_layer_by_layer(seg):
    src = kv(1)
    c = kvtier.Cache(cfg(seg))
    p = c.begin_store(TOKENS, src, TABLE)
    assert p.tokens == 512
    for layer in range(L):
        assert c.cached_tokens(TOKENS) == 0  # nothing visible before the last layer
        p.layer(layer)
    assert p.finish() == 512
    c.flush()
    # A fresh attachment reads the segment in place, one layer at a time.
    d = kvtier.Cache(cfg(seg))
    dst = kv()
    lease = d.lookup(TOKENS)
    assert lease.tokens == 512 and lease.hits_in(1) == 8
    r = d.begin_retrieve(lease, dst, TABLE)
    assert r.tokens == 512 and not lease.live
    for layer in range(L):
        r.layer(layer)
        assert torch.equal(blocks(dst[layer], 512), blocks(src[layer], 512))
        for later in range(layer + 1, L):
            assert not blocks(dst[later], 512).any()  # not copied yet
    assert r.finish() == 512
    assert d.stats()["retrieved_tokens"] == 512


def test_out_of_order_layers_are_refused_and_publish_nothing():
    c = kvtier.Cache(cfg())
    p = c.begin_store(TOKENS, kv(2), TABLE)
    with pytest.raises(kvtier.InvalidArgument, match=r"store_layer\(2\) after 0 of 4 layers"):
        p.layer(2)
    p.layer(0)
    assert p.finish() == 0
    assert c.cached_tokens(TOKENS) == 0
    with pytest.raises(kvtier.InvalidArgument):
        c.begin_store(TOKENS, kv(2), TABLE[:3])  # a block table short of the tokens


def test_steps_loads_waited_for_are_sound_and_unwaited_are_not():
    src = kv(3)
    c = kvtier.Cache(cfg())
    assert c.store(TOKENS, src, TABLE) == 512
    steps = LayerSteps(L)
    dst = kv()
    steps.start_loads([c.begin_retrieve(c.lookup(TOKENS), dst, TABLE)])
    for layer in range(L):
        steps.wait_layer(layer)
        assert torch.equal(blocks(dst[layer], 512), blocks(src[layer], 512))
    ok, err, stored, store_err = steps.end_step()
    assert ok and err is None and stored == [] and store_err is None
    # The forward read layer 3 without waiting for it: not sound.
    steps.start_loads([c.begin_retrieve(c.lookup(TOKENS), kv(), TABLE)])
    for layer in range(L - 1):
        steps.wait_layer(layer)
    ok, *_ = steps.end_step()
    assert not ok
    assert c.stats()["retrieved_tokens"] == 1024  # both pipelines copied and finished whole
    steps.close()


def test_steps_stores_finish_the_layers_no_hook_asked_for():
    src = kv(4)
    c = kvtier.Cache(cfg())
    steps = LayerSteps(L)
    steps.begin_stores(lambda: [c.begin_store(TOKENS, src, TABLE)])
    steps.begin_stores(lambda: pytest.fail("begun twice"))
    steps.layer_saved(1)  # layers 0 and 1
    steps.layer_saved(1)  # again: nothing
    ok, _, stored, err = steps.end_step()
    assert ok and stored == [512] and err is None
    dst = kv()
    assert c.load(TOKENS, dst, TABLE) == 512
    for layer in range(L):
        assert torch.equal(blocks(dst[layer], 512), blocks(src[layer], 512))
    steps.close()
