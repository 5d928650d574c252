#!/usr/bin/env python3
"""kvtier inside vLLM's CPU build: time to first token of a long prompt, recomputed against a
kvtier hit from the shared host segment and from the local disk, and a multi-turn chat
workload's wall time with and without kvtier, in one run. A developer command, not run by CI.

    build/venv-vllm/bin/python bench/vllm/ttft.py [--rounds 2] [--prompt 8000] [--out DIR]
        [--conversations 4 --turns 4 --user-tokens 512 --reply-tokens 32] [--quick]

The model is made locally (python/tests/tiny_model.py, seeded random weights): 8 layers, hidden
1024, 8 KV heads of 128 (32 KiB of KV per token: an 8000-token prompt holds 250 MiB of KV),
vocab 4096. Every engine runs in its own subprocess and is warmed up with a short prompt before
it is timed (the first generate of an engine pays a one-time cost). TTFT is the wall time of
generate([prompt], max_tokens=1) on an otherwise idle engine. Per round, in this order:

    recompute     no connector, vLLM's prefix cache off
    store_whole   kvtier (kv_both, "layerwise": false), fresh segment and disk: stores the prompt
    store         the same, layer by layer (the default), over another fresh segment and disk
    shared        a fresh engine over the same segment: the hit comes from the shared host tier
    shared_whole  the same, "layerwise": false
    disk          the segment removed (a reboot), a fresh engine over the same disk
    disk_whole    the same, "layerwise": false

The chat workload: C conversations, T turns; each turn appends U user tokens to the history and
generates R tokens, all conversations batched in one generate per turn; once with nothing, with
vLLM's prefix cache, with kvtier (prefix cache off). Prints a table and writes DIR/results.json
and DIR/ttft.png (gnuplot).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "..", "python", "tests")
sys.path.insert(0, TESTS)

import tiny_model  # noqa: E402
from vllm_harness import _env  # noqa: E402

MODEL = dict(layers=8, hidden=1024, heads=8, kv_heads=8, head_size=128, vocab=4096,
             intermediate=2816, max_pos=16384, seed=3)
QUICK = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_size=64, vocab=1024,
             intermediate=512, max_pos=16384, seed=3)
BLOCK = 128
NAMES = ("recompute", "store_whole", "store", "shared", "shared_whole", "disk", "disk_whole")


def ktc(role, seg, disk, layerwise=True):
    return {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"layerwise": layerwise, "kvtier": {
                "chunk_tokens": BLOCK,
                "host": {"capacity_bytes": 512 << 20},
                "shared_host": {"name": seg, "capacity_bytes": 1 << 30},
                "local_disk": {"path": disk, "capacity_bytes": 2 << 30}}}}


def engine(model, phases, kv=None, prefix_cache=False, log=None):
    """Runs `phases` (lists of prompts with max_tokens) in one fresh engine; wall time each."""
    spec = dict(model=model, phases=phases, kv=kv, prefix_cache=prefix_cache)
    with tempfile.TemporaryDirectory() as td:
        sp, op = os.path.join(td, "spec.json"), os.path.join(td, "out.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        env = _env(None, 2, {"KVTIER_VLLM_STATS_FILE": os.path.join(td, "stats.json")})
        p = subprocess.run([sys.executable, __file__, "--engine", sp, op], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=1800)
        if log:
            with open(log, "w") as f:
                f.write(p.stdout)
        if p.returncode != 0 or not os.path.exists(op):
            raise RuntimeError(f"engine failed ({p.returncode}):\n{p.stdout[-6000:]}")
        with open(op) as f:
            phases_out = json.load(f)
        st = os.path.join(td, "stats.json")
        stats = None
        if os.path.exists(st):
            with open(st) as f:
                stats = json.load(f)
        return dict(phases=phases_out, stats=stats)


def _engine_main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = dict(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", seed=0, block_size=BLOCK,
              enable_prefix_caching=bool(spec["prefix_cache"]))
    if spec["kv"]:
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv"])
    llm = LLM(**kw)
    res = []
    for ph in spec["phases"]:
        sp = SamplingParams(temperature=0.0, max_tokens=ph["max_tokens"], ignore_eos=True,
                            detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ph["prompts"]], sp, use_tqdm=False)
        res.append(dict(seconds=time.perf_counter() - t0,
                        outputs=[list(o.outputs[0].token_ids) for o in outs],
                        cached=[int(o.num_cached_tokens or 0) for o in outs]))
    llm.llm_engine.engine_core.shutdown()
    with open(out_path, "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)


VOCAB = [MODEL["vocab"]]


def rand_tokens(rng, n):
    return [rng.randrange(3, VOCAB[0]) for _ in range(n)]


def ttft_round(model, prompt, warm, tmp, r):
    seg = f"/kvtier-bench-{uuid.uuid4().hex[:10]}"
    disk = os.path.join(tmp, f"disk-{r}")
    phases = [dict(prompts=[warm], max_tokens=1), dict(prompts=[prompt], max_tokens=1)]
    out = {}

    def unlink_segment():
        if os.path.exists("/dev/shm/" + seg[1:]):
            os.unlink("/dev/shm/" + seg[1:])

    try:
        # "_whole": the connector with "layerwise": false (every layer copied in one go before
        # the forward, stores after it). store_whole runs first over its own segment and disk.
        for name, kv in (("recompute", None),
                         ("store_whole", ktc("kv_both", seg, disk, False)),
                         ("store", ktc("kv_both", seg, disk)),
                         ("shared", ktc("kv_both", seg, disk)),
                         ("shared_whole", ktc("kv_both", seg, disk, False)),
                         ("disk", ktc("kv_both", seg, disk)),
                         ("disk_whole", ktc("kv_both", seg, disk, False))):
            if name == "store":
                unlink_segment()
                shutil.rmtree(disk, ignore_errors=True)
            if name.startswith("disk"):
                unlink_segment()  # a reboot: the node's memory is gone, the disk is not
            e = engine(model, phases, kv, log=os.path.join(tmp, f"ttft-{name}-{r}.log"))
            t = e["phases"][1]
            conn = (e["stats"] or {}).get("connector", {})
            out[name] = dict(seconds=t["seconds"], cached=t["cached"][0],
                             first_token=t["outputs"][0][0],
                             loaded=conn.get("load_tokens", 0), stored=conn.get("store_tokens", 0),
                             load_us=conn.get("load_us", 0), store_us=conn.get("store_us", 0),
                             layer_wait_us=conn.get("layer_wait_us", 0))
    finally:
        path = "/dev/shm/" + seg[1:]
        if os.path.exists(path):
            os.unlink(path)
        shutil.rmtree(disk, ignore_errors=True)
    return out


def chat(model, args, tmp, kv, prefix_cache, tag):
    rng = random.Random(11)
    hist = [rand_tokens(rng, args.user_tokens) for _ in range(args.conversations)]
    users = [[rand_tokens(rng, args.user_tokens) for _ in range(args.conversations)]
             for _ in range(args.turns)]
    # The histories depend on the replies; a deterministic stand-in reply (the same in every
    # configuration) keeps the prompts of all configurations identical: each turn's prompt is
    # the previous prompt, a fixed 'reply', and the new user tokens.
    phases = [dict(prompts=[rand_tokens(random.Random(0), 64)], max_tokens=1)]
    for t in range(args.turns):
        if t:
            hist = [h + rand_tokens(random.Random(100 + t), args.reply_tokens) + u
                    for h, u in zip(hist, users[t])]
        phases.append(dict(prompts=[list(h) for h in hist], max_tokens=args.reply_tokens))
    res = engine(model, phases, kv, prefix_cache, log=os.path.join(tmp, f"chat-{tag}.log"))
    turns = res["phases"][1:]
    prompt_tokens = sum(len(p) for ph in phases[1:] for p in ph["prompts"])
    total = sum(t["seconds"] for t in turns)
    return dict(seconds=total, turn_seconds=[t["seconds"] for t in turns],
                prompt_tokens=prompt_tokens, cached=sum(sum(t["cached"]) for t in turns),
                outputs=[t["outputs"] for t in turns])


def memcpy_gbps(nbytes, reps=5):
    """The copy limit beside the connector's loads: the best of `reps` single-threaded copies of
    `nbytes` between two host buffers (what one load moves), in GB/s."""
    import torch

    torch.set_num_threads(1)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def plot(results, path):
    """Two panels: the TTFT of each configuration and the chat workload's wall time."""
    if not shutil.which("gnuplot"):
        return False
    names = NAMES
    ttft = [statistics.median(x[n]["seconds"] for x in results["ttft"]) for n in names]
    chats = list(results["chat"].items())
    dat1, dat2 = path + ".1.dat", path + ".2.dat"
    with open(dat1, "w") as f:
        for i, (n, m) in enumerate(zip(names, ttft)):
            f.write(f'{i} "{n}" {m}\n')
    with open(dat2, "w") as f:
        for i, (n, c) in enumerate(chats):
            f.write(f'{i} "{n.replace("_", " ")}" {c["seconds"]}\n')
    m = results["model"]
    script = f"""set terminal png size 1400,420
set output '{path}'
set multiplot layout 1,2 title 'vLLM CPU build, {m["layers"]} layers, hidden {m["hidden"]}, \
{m["kv_heads"]}x{m["head_size"]} KV heads (2 cores)'
set style fill solid 0.6
set boxwidth 0.6
unset key
set title 'TTFT, {results["prompt_tokens"]}-token prompt (median of {len(results["ttft"])})'
set ylabel 'seconds'
set yrange [0:{max(ttft) * 1.25}]
plot '{dat1}' using 1:3:xtic(2) with boxes, '' using 1:3:(sprintf('%.2f s', $3)) with labels \
offset 0,1
set title 'chat, {results["chat_shape"]} (one run)'
set yrange [0:{max(c["seconds"] for _, c in chats) * 1.25}]
plot '{dat2}' using 1:3:xtic(2) with boxes, '' using 1:3:(sprintf('%.1f s', $3)) with labels \
offset 0,1
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    os.unlink(dat1)
    os.unlink(dat2)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8000)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-tokens", type=int, default=512)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "build", "bench-vllm"))
    ap.add_argument("--quick", action="store_true", help="the tiny test model (a smoke run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-vllm-")
    VOCAB[0] = (QUICK if args.quick else MODEL)["vocab"]
    model = tiny_model.make(os.path.join(args.out, "model-quick" if args.quick else "model"),
                            **(QUICK if args.quick else MODEL))
    rng = random.Random(5)
    prompt, warm = rand_tokens(rng, args.prompt), rand_tokens(rng, 64)
    mdl = QUICK if args.quick else MODEL
    results = dict(prompt_tokens=args.prompt, model=mdl, ttft=[], chat={},
                   chat_shape=f"{args.conversations} conversations x {args.turns} turns")
    kv_bytes_per_token = 2 * mdl["layers"] * mdl["kv_heads"] * mdl["head_size"] * 2  # bf16
    for r in range(args.rounds):
        results["ttft"].append(ttft_round(model, prompt, warm, tmp, r))
    loaded = results["ttft"][0]["shared"]["loaded"]
    results["memcpy_gbps"] = memcpy_gbps(max(loaded, 1) * kv_bytes_per_token)
    seg = f"/kvtier-bench-chat-{uuid.uuid4().hex[:8]}"
    try:
        for tag, kv, pc in (("none", None, False), ("vllm_prefix_cache", None, True),
                            ("kvtier", ktc("kv_both", seg, os.path.join(tmp, "chat-disk")),
                             False),
                            ("kvtier_whole", ktc("kv_both", seg + "w",
                                                 os.path.join(tmp, "chat-disk-w"), False),
                             False)):
            results["chat"][tag] = chat(model, args, tmp, kv, pc, tag)
    finally:
        for name in (seg, seg + "w"):
            if os.path.exists("/dev/shm/" + name[1:]):
                os.unlink("/dev/shm/" + name[1:])
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    ref = [x["recompute"]["first_token"] for x in results["ttft"]]
    print(f"TTFT, {args.prompt}-token prompt (seconds per round; median; ratio to recompute):")
    med0 = statistics.median(x["recompute"]["seconds"] for x in results["ttft"])
    for n in NAMES:
        xs = [x[n]["seconds"] for x in results["ttft"]]
        hits = [x[n]["cached"] for x in results["ttft"]]
        same = all(x[n]["first_token"] == ref[i] for i, x in enumerate(results["ttft"]))
        loaded = [x[n]["loaded"] for x in results["ttft"]]
        print(f"  {n:12s} {' '.join(f'{v:7.3f}' for v in xs)}   median {statistics.median(xs):7.3f}"
              f"   x{statistics.median(xs) / med0:6.3f}   cached {hits} loaded {loaded}"
              f"   same first token: {same}")
    print(f"connector load/store (the bytes moved over the time the engine waited for them; "
          f"single-threaded memcpy of as many bytes here: {results['memcpy_gbps']:.2f} GB/s):")
    # The hit engines' stores find every chunk held already (nothing is copied): not shown.
    for n, what in (("store", "store"), ("store_whole", "store"), ("shared", "load"),
                    ("shared_whole", "load"), ("disk", "load"), ("disk_whole", "load")):
        for x in results["ttft"]:
            e = x[n]
            # The time the engine waited for the connector: a load's start_load_kv plus its
            # waits in the layer hooks (layer-wise copies run behind the forward), a store's
            # wait_for_save.
            tok, us = (e["stored"], e["store_us"]) if what == "store" else (
                e["loaded"], e["load_us"] + e.get("layer_wait_us", 0))
            if tok and us:
                gbps = tok * kv_bytes_per_token / (us * 1e3)
                wait = e.get("layer_wait_us", 0) / 1e3
                print(f"  {n:12s} {what:5s} {tok:6d} tokens {us / 1e3:8.1f} ms "
                      f"{gbps:6.2f} GB/s  x{gbps / results['memcpy_gbps']:5.2f} of memcpy"
                      + (f"  ({wait:.1f} ms of it in the layer hooks)" if wait else ""))
    base = results["chat"]["none"]
    print(f"chat, {args.conversations} conversations x {args.turns} turns "
          f"({base['prompt_tokens']} prompt tokens in all):")
    # Computing over a cached prefix is not bit-identical to a full prefill, so on a random
    # bf16 model greedy outputs with any prefix cache may differ from the recomputed ones; the
    # reference for kvtier is vLLM's own prefix cache on the same prompts.
    pc = results["chat"]["vllm_prefix_cache"]
    for tag, c in results["chat"].items():
        same = c["outputs"] == base["outputs"]
        same_pc = c["outputs"] == pc["outputs"]
        print(f"  {tag:18s} {c['seconds']:7.3f} s  {c['prompt_tokens'] / c['seconds']:9.0f} "
              f"prompt tok/s  x{base['seconds'] / c['seconds']:5.2f}  cached {c['cached']}"
              f"  same outputs as none: {same}, as vllm_prefix_cache: {same_pc}")
    if plot(results, os.path.join(args.out, "ttft.png")):
        print("plot:", os.path.join(args.out, "ttft.png"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--engine":
        _engine_main(sys.argv[2], sys.argv[3])
    else:
        main()
