"""kvtier inside vLLM's CPU build, end to end (ctest label `vllm`).

A tiny Llama-architecture model with seeded random weights (tiny_model.py), greedy decoding,
enforce_eager, token-id prompts. Each engine runs in its own subprocess (vllm_harness.py); the
connector's worker writes its counters to KVTIER_VLLM_STATS_FILE, which is what proves that
bytes were loaded (vLLM's num_cached_tokens only counts what a connector claims).
"""

import json
import os
import random
import uuid

import pytest

import tiny_model
from vllm_harness import greedy_divergence, max_logprob_diff, run

BLOCK = 128  # vLLM CPU's default block size; the connector's chunk is one block
BATCHED = 2048  # max_num_batched_tokens: the 6000-token prompt prefills in 3 steps
LONG, SHORT, PREFIX = 6000, 750, 700


def _prompts():
    rng = random.Random(7)
    long = [rng.randrange(3, 1000) for _ in range(LONG)]
    prefix = [rng.randrange(3, 1000) for _ in range(PREFIX)]
    shorts = [prefix + [rng.randrange(3, 1000) for _ in range(SHORT - PREFIX)] for _ in range(2)]
    return [long] + shorts


PROMPTS = _prompts()


def _claimable(n):
    """Tokens a hit can cover: whole chunks, leaving the last prompt token to compute."""
    return (n - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model.make(str(tmp_path_factory.mktemp("model") / "tiny"))


class Segment:
    """A shared host segment of its own for one test, removed afterwards."""

    def __init__(self):
        self.name = f"/kvtier-test-{uuid.uuid4().hex[:12]}"
        self.path = "/dev/shm/" + self.name[1:]

    def remove(self):
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def segment():
    s = Segment()
    yield s
    s.remove()


DISK_BYTES = 64 << 20


def _ktc(role, seg, disk=None, layerwise=True, verify=True):
    tiers = {
        "chunk_tokens": BLOCK,
        "host": {"capacity_bytes": 32 << 20},
        "shared_host": {"name": seg.name, "capacity_bytes": 64 << 20, "verify": verify},
    }
    if disk is not None:
        tiers["local_disk"] = {"path": str(disk), "capacity_bytes": DISK_BYTES}
    return {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvtier": tiers, "layerwise": layerwise},
    }


def _chunk_bytes(model):
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    return cfg["num_hidden_layers"] * 2 * BLOCK * cfg["num_key_value_heads"] * cfg["head_dim"] * 2


def _run(model, prompts, tmp_path, tag, role=None, seg=None, multiprocess=False, disk=None,
         layerwise=True, verify=True, **kw):
    stats = tmp_path / f"{tag}.stats.json"
    env = {"KVTIER_VLLM_STATS_FILE": str(stats)}
    if multiprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    res = run(model, prompts, max_tokens=8, block_size=BLOCK, max_num_batched_tokens=BATCHED,
              kv_transfer_config=_ktc(role, seg, disk, layerwise, verify) if role else None,
              extra_env=env, log_path=str(tmp_path / f"{tag}.log"), **kw)
    res["stats"] = json.loads(stats.read_text()) if stats.exists() else None
    return res


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """No kvtier. Each prompt set (all prompts, the short ones alone) run cold with the engine
    settings kvtier's runs use: what those are compared with. vLLM's own logprobs move with
    how its steps are batched and split (bf16 on a CPU without AVX-512 by up to about 1e-3), so
    the tolerance is measured: the largest difference between runs of the same prompts that
    differ only in scheduling (cold with and without vLLM's prefix cache, then on its prefix
    cache; the short prompts alone and inside the full batch), doubled. Wrong bytes move them by
    far more: test_corrupt_records_are_recomputed serves one flipped byte per chunk and checks
    that the comparison sees it."""
    d = tmp_path_factory.mktemp("ref")
    full = _run(model, PROMPTS, d, "ref")["outputs"]
    short = _run(model, PROMPTS[1:], d, "ref_short")["outputs"]
    pc = _run(model, PROMPTS, d, "ref_pc", enable_prefix_caching=True, rounds=2)
    cold, warm = pc["rounds"]
    assert [o["num_cached_tokens"] for o in warm] == [_claimable(len(p)) for p in PROMPTS]
    diffs = {}
    for name, x, y in (("prefix_cache_cold", full, cold), ("prefix_cache_warm", full, warm),
                       ("prefix_cache_cold_warm", cold, warm), ("batch", full[1:], short)):
        diffs[name], same = max_logprob_diff(x, y)
        assert same, f"vLLM changed a greedy token on these prompts by itself ({name})"
    tol = 2 * max(diffs.values()) + 1e-6
    # A floor this high would leave the test blind to small errors; it is not, here.
    assert tol < 5e-3, diffs
    return {"full": full, "short": short, "tol": tol, "diffs": diffs}


def _same_as(cold, res, reference):
    diff, same = max_logprob_diff(cold, res["outputs"])
    assert same, "greedy tokens differ from the run without kvtier"
    assert diff <= reference["tol"], (
        f"logprobs moved by {diff}, more than vLLM's own {reference['diffs']}")
    return diff


def test_store_then_fresh_engine_hits_including_chunked_prefill(model, reference, segment,
                                                                  tmp_path):
    # First engine: nothing cached yet; it stores every full chunk as it is computed, the
    # 6000-token prompt across its three prefill steps.
    a = _run(model, PROMPTS, tmp_path, "a", "kv_both", segment)
    # (The second short prompt may already hit chunks of the prefix the first one stored a
    # step earlier in this same engine.)
    assert a["outputs"][0]["num_cached_tokens"] == 0
    _same_as(reference["full"], a, reference)
    stored = a["stats"]["connector"]["store_tokens"]
    # Every full chunk of each sequence (prompt plus the outputs whose KV was computed).
    want = sum((len(p) + 7) // BLOCK * BLOCK for p in PROMPTS)
    assert stored == want, a["stats"]
    # Layer by layer: the hooks after each attention layer copied the stores behind the forward.
    assert a["stats"]["connector"].get("layers_stored_behind", 0) > 0, a["stats"]
    # A fresh engine (vLLM's prefix cache off): the external hit skips the prefill of all but
    # the last chunk, the bytes are loaded, and the outputs are those of a full prefill.
    b = _run(model, PROMPTS, tmp_path, "b", "kv_both", segment)
    hits = [_claimable(len(p)) for p in PROMPTS]
    assert [o["num_cached_tokens"] for o in b["outputs"]] == hits
    c = b["stats"]["connector"]
    assert c.get("load_tokens") == sum(hits), b["stats"]
    assert c.get("load_failed_tokens", 0) == 0
    # Layer by layer (the default): vLLM waited for every layer of every step that loaded.
    assert c.get("layerwise_loads", 0) == len(PROMPTS), c
    assert c.get("layerwise_unsound_steps", 0) == 0, c
    _same_as(reference["full"], b, reference)


def test_producer_stores_consumer_loads_in_separate_processes(model, reference, segment,
                                                              tmp_path):
    p = _run(model, PROMPTS[1:], tmp_path, "producer", "kv_producer", segment)
    assert p["stats"]["connector"].get("load_tokens", 0) == 0
    assert p["stats"]["connector"]["store_tokens"] > 0
    # The consumer with vLLM's engine core in its own process: the scheduler half (EngineCore)
    # and the worker half share nothing but the segment. Its loads are whole-step ones
    # ("layerwise": false), the path without the layer hooks.
    c = _run(model, PROMPTS[1:], tmp_path, "consumer", "kv_consumer", segment, multiprocess=True,
             layerwise=False)
    hits = [_claimable(len(q)) for q in PROMPTS[1:]]
    assert [o["num_cached_tokens"] for o in c["outputs"]] == hits
    assert c["stats"]["connector"].get("load_tokens") == sum(hits)
    assert c["stats"]["connector"].get("store_tokens", 0) == 0
    assert c["stats"]["connector"].get("layerwise_loads", 0) == 0
    _same_as(reference["short"], c, reference)


def _corrupt_slab(seg, chunk_bytes, capacity):
    """Flips one byte in every chunk slot of the segment's slab (the end of the file)."""
    slot = -(-chunk_bytes // 4096) * 4096
    slots = capacity // slot
    size = os.path.getsize(seg.path)
    start = size - slots * slot
    with open(seg.path, "r+b") as f:
        for i in range(slots):
            f.seek(start + i * slot + 1000)
            b = f.read(1)
            f.seek(start + i * slot + 1000)
            f.write(bytes([b[0] ^ 0x5A]))


def test_corrupt_records_are_recomputed(model, reference, segment, tmp_path):
    _run(model, PROMPTS[1:], tmp_path, "store", "kv_producer", segment)
    _corrupt_slab(segment, _chunk_bytes(model), 64 << 20)
    # The control: a consumer that does not verify (shared_host "verify": false) is served the
    # flipped bytes, and the comparison with the run without kvtier must see them; otherwise the
    # e2e tests' tolerance would hide wrong bytes.
    u = _run(model, PROMPTS[1:], tmp_path, "unverified", "kv_consumer", segment, verify=False)
    hits = sum(_claimable(len(q)) for q in PROMPTS[1:])
    assert u["stats"]["connector"].get("load_tokens") == hits, u["stats"]
    diff, same = max_logprob_diff(reference["short"], u["outputs"])
    assert not same or diff > 10 * reference["tol"], (diff, reference["diffs"])
    c = _run(model, PROMPTS[1:], tmp_path, "load", "kv_consumer", segment)
    s = c["stats"]
    # The scheduler still saw the chunks (their index is intact) and promised them; the worker
    # found every payload corrupt, loaded nothing, and vLLM recomputed those blocks.
    assert s["connector"].get("load_tokens", 0) == 0, s
    assert s["connector"]["load_failed_tokens"] == hits
    assert sum(t["errors"] for t in s["cache"]["tiers"]) > 0
    _same_as(reference["short"], c, reference)


def test_restarted_engine_hits_what_the_first_stored_on_disk(model, reference, segment,
                                                             tmp_path):
    disk = tmp_path / "disk"
    _run(model, PROMPTS[1:], tmp_path, "first", "kv_both", segment, disk=disk)
    # The node restarts: the shared segment is gone, the disk file is not. The new engine's
    # scheduler asks its worker, whose cache rebuilt the disk index at start.
    segment.remove()
    b = _run(model, PROMPTS[1:], tmp_path, "restarted", "kv_both", segment, disk=disk)
    hits = [_claimable(len(q)) for q in PROMPTS[1:]]
    assert [o["num_cached_tokens"] for o in b["outputs"]] == hits
    s = b["stats"]
    assert s["connector"].get("load_tokens") == sum(hits), s
    disk_tier = s["cache"]["tiers"][2]
    assert disk_tier["name"] == "local_disk" and disk_tier["recovered"] > 0
    assert disk_tier["hits"] > 0 and disk_tier["errors"] == 0
    _same_as(reference["short"], b, reference)


def _corrupt_disk(disk, chunk_bytes):
    """Flips one payload byte of every record slot of the disk tier's file (headers intact)."""
    (path,) = [os.path.join(disk, f) for f in os.listdir(disk) if f.endswith(".kvt")]
    slot = 4096 + -(-chunk_bytes // 4096) * 4096
    with open(path, "r+b") as f:
        for i in range(os.path.getsize(path) // slot):
            f.seek(i * slot + 4096 + 1000)
            b = f.read(1)
            f.seek(i * slot + 4096 + 1000)
            f.write(bytes([b[0] ^ 0xA5]))


def test_corrupt_disk_records_are_recomputed(model, reference, segment, tmp_path):
    disk = tmp_path / "disk"
    _run(model, PROMPTS[1:], tmp_path, "first", "kv_producer", segment, disk=disk)
    segment.remove()
    _corrupt_disk(disk, _chunk_bytes(model))
    c = _run(model, PROMPTS[1:], tmp_path, "corrupt", "kv_consumer", segment, disk=disk)
    s = c["stats"]
    hits = sum(_claimable(len(q)) for q in PROMPTS[1:])
    assert s["connector"].get("load_tokens", 0) == 0, s
    assert s["connector"]["load_failed_tokens"] == hits
    assert s["cache"]["tiers"][2]["errors"] > 0
    _same_as(reference["short"], c, reference)


def test_preempted_requests_resume_and_load_again(model, reference, segment, tmp_path):
    # 13 blocks of 128 tokens for six 765-token prompts that each decode 200 tokens: vLLM runs
    # out of blocks while decoding and preempts requests, which free their blocks and later
    # resume with new ones (the scheduler half then promises, and the worker loads, again).
    rng = random.Random(3)
    prefix = [rng.randrange(3, 1000) for _ in range(700)]
    prompts = [prefix + [rng.randrange(3, 1000) for _ in range(65)] for _ in range(6)]
    small = {"num_gpu_blocks_override": 13, "max_model_len": 1024}
    kw = dict(max_tokens=200, block_size=BLOCK, extra=small, logprobs=2)
    base = run(model, prompts, log_path=str(tmp_path / "base.log"), **kw)
    # vLLM's own noise over 200 bf16 decode steps of preempted, resumed requests: the same run on
    # its prefix cache (a schedule change without kvtier). Here it differs from the run without by
    # up to about 0.03 and flips a greedy token at a near tie (one bf16 step apart).
    base_pc = run(model, prompts, log_path=str(tmp_path / "base_pc.log"),
                  enable_prefix_caching=True, **kw)
    noise_diff, noise_parted = greedy_divergence(base, base_pc)
    noise = max([noise_diff] + [gap for _, _, gap in noise_parted])
    assert noise < 0.1, (noise_diff, noise_parted)
    # Never tighter than the prompts' own tolerance (a CPU where both runs are bit-identical).
    tol = max(2 * noise + 1e-6, reference["tol"])
    stats = tmp_path / "k.stats.json"
    k = run(model, prompts, kv_transfer_config=_ktc("kv_both", segment),
            extra_env={"KVTIER_VLLM_STATS_FILE": str(stats)}, log_path=str(tmp_path / "k.log"),
            **kw)
    sched = json.loads((tmp_path / "k.stats.json.scheduler").read_text())
    worker = json.loads(stats.read_text())["connector"]
    assert sched.get("preempted", 0) >= 1 and sched.get("resumed", 0) >= 1, sched
    assert worker["load_tokens"] == sched["promised_tokens"], (worker, sched)
    assert worker.get("load_failed_tokens", 0) == 0
    # Waiting requests are asked about at every step; most answers are reused, not re-asked.
    assert sched.get("lookups_reused", 0) > sched["lookups"], sched
    # Same tokens up to where the two runs part, if they do, with logprobs within vLLM's own
    # noise before that; and they part only at a near tie as narrow as that noise.
    diff, parted = greedy_divergence(base, k)
    assert diff <= tol, (diff, noise_diff, noise_parted)
    assert all(gap <= tol for _, _, gap in parted), (parted, noise_diff, noise_parted)
