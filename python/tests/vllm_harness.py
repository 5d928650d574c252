#!/usr/bin/env python3
"""Run vLLM (CPU build) on token-id prompts and return greedy outputs.

Each call to run() starts ONE engine in a fresh subprocess (python this_file
--worker SPEC.json OUT.json), so several engines can be started one after
another in the same test without leaking the engine core process, OMP state
or shared memory. Results come back as JSON.

    from vllm_harness import run
    res = run(model_dir, [[5, 6, 7, ...], ...], max_tokens=8)
    res["outputs"][i] = {"token_ids": [...], "logprobs": [...],
                         "num_cached_tokens": int, "prompt_len": int}
    res["timing"] = {"engine_start_s": .., "generate_s": [..per round..]}

`rounds=2` submits the same prompt set twice to one engine (second round sees
the prefix cache / connector); then res["rounds"] holds one outputs list per
round and res["outputs"] is the last round.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PY = os.environ.get(
    "KVTIER_VLLM_PYTHON",
    os.path.join(HERE, "..", "..", "build", "venv-vllm", "bin", "python"))


def _env(threads, kvcache_gib, extra_env):
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))
    # bind the OMP threads of the (single) CPU worker to the given cores
    ncpu = os.cpu_count() or 1
    threads = threads or ncpu
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # in-process engine core: engine start ~3 s instead of ~27 s on 2 cores,
    # and no busy-polling engine-core process competing with the OMP threads.
    # (Scheduler- and worker-side connector then live in the same process.)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # make kvtier python package/connector importable when given
    pp = [HERE]  # the kvtier package comes from the venv (pip install ./python)
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})
    return env


def run(model_dir, prompts, max_tokens=8, kv_transfer_config=None,
        enable_prefix_caching=False, max_num_batched_tokens=None,
        block_size=None, logprobs=1, extra=None, rounds=1,
        threads=None, kvcache_gib=1, extra_env=None, timeout=900,
        python=None, log_path=None):
    """Start one engine in a subprocess, generate greedily, return dict.

    extra: dict of additional vllm.LLM(...) kwargs (JSON-serialisable).
    kv_transfer_config: dict, passed as LLM(kv_transfer_config=...).
    """
    spec = dict(model_dir=os.path.abspath(model_dir),
                prompts=[list(map(int, p)) for p in prompts],
                max_tokens=max_tokens, kv_transfer_config=kv_transfer_config,
                enable_prefix_caching=enable_prefix_caching,
                max_num_batched_tokens=max_num_batched_tokens,
                block_size=block_size, logprobs=logprobs,
                extra=extra or {}, rounds=rounds)
    py = python or DEFAULT_PY
    with tempfile.TemporaryDirectory(prefix="vllm_harness_") as td:
        sp, op = os.path.join(td, "spec.json"), os.path.join(td, "out.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        t0 = time.time()
        proc = subprocess.run([py, os.path.abspath(__file__), "--worker", sp, op],
                              env=_env(threads, kvcache_gib, extra_env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        wall = time.time() - t0
        if log_path:
            with open(log_path, "w") as f:
                f.write(proc.stdout)
        if proc.returncode != 0 or not os.path.exists(op):
            raise RuntimeError(
                f"vLLM worker failed rc={proc.returncode}\n{proc.stdout[-8000:]}")
        with open(op) as f:
            res = json.load(f)
    res["timing"]["subprocess_wall_s"] = wall
    res["log_tail"] = proc.stdout[-4000:]
    return res


def _outputs(r):
    """A run's outputs: run()'s result, or its outputs list (one round) as it is."""
    return r["outputs"] if isinstance(r, dict) else r


def max_logprob_diff(a, b):
    """(max |lp_a - lp_b| over aligned generated tokens, all tokens equal?)."""
    m, same = 0.0, True
    for x, y in zip(_outputs(a), _outputs(b)):
        same &= x["token_ids"] == y["token_ids"]
        for p, q in zip(x["logprobs"], y["logprobs"]):
            m = max(m, abs(p - q))
    return m, bool(same)


def greedy_divergence(a, b):
    """Compares two greedy runs of the same prompts position by position, up to each request's
    first differing token. Returns (max |lp_a - lp_b| over the positions before it, [(request,
    position, gap)] for each request that diverges). gap is how far apart the two tokens were
    where they parted: the larger, over both runs, of lp(own token) - lp(the other run's token),
    or inf where a run did not have the other token among its top logprobs (run with
    logprobs >= 2). A near tie (small gap) is where run-to-run noise can flip a greedy choice."""
    m, parted = 0.0, []
    for i, (x, y) in enumerate(zip(_outputs(a), _outputs(b))):
        for j, (tx, ty) in enumerate(zip(x["token_ids"], y["token_ids"])):
            if tx != ty:
                gap = 0.0
                for run_, own, other in ((x, tx, ty), (y, ty, tx)):
                    top = run_["top"][j]
                    gap = max(gap, top[str(own)] - top[str(other)] if str(other) in top
                              else math.inf)
                parted.append((i, j, gap))
                break
            m = max(m, abs(x["logprobs"][j] - y["logprobs"][j]))
    return m, parted


# ----------------------------------------------------------------- worker
def _worker(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.time()
    from vllm import LLM, SamplingParams
    kw = dict(model=spec["model_dir"], skip_tokenizer_init=True,
              enforce_eager=True, dtype="bfloat16", seed=0,
              enable_prefix_caching=bool(spec["enable_prefix_caching"]),
              max_model_len=None, gpu_memory_utilization=0.9)
    kw.pop("max_model_len")
    if spec["max_num_batched_tokens"]:
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec["block_size"]:
        kw["block_size"] = spec["block_size"]
    if spec["kv_transfer_config"]:
        from vllm.config import KVTransferConfig
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    kw.update(spec["extra"])
    t_import = time.time() - t0
    llm = LLM(**kw)
    t_start = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                        logprobs=spec["logprobs"], ignore_eos=True,
                        detokenize=False)
    rounds, gen_s = [], []
    for _ in range(int(spec["rounds"])):
        t1 = time.time()
        outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]],
                            sp, use_tqdm=False)
        gen_s.append(time.time() - t1)
        res = []
        for o in outs:
            c = o.outputs[0]
            lps, tops = [], []
            for tid, d in zip(c.token_ids, c.logprobs or []):
                lps.append(float(d[tid].logprob) if tid in d else None)
                tops.append({str(t): float(v.logprob) for t, v in d.items()})
            res.append(dict(token_ids=list(c.token_ids), logprobs=lps, top=tops,
                            num_cached_tokens=int(o.num_cached_tokens or 0),
                            prompt_len=len(o.prompt_token_ids)))
        rounds.append(res)
    t2 = time.time()
    # clean shutdown of the engine core process
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # pragma: no cover
        print("shutdown error:", e, file=sys.stderr)
    del llm
    out = dict(outputs=rounds[-1], rounds=rounds,
               timing=dict(import_s=t_import, engine_start_s=t_start - t_import,
                           generate_s=gen_s, shutdown_s=time.time() - t2))
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        # skip interpreter teardown of lingering threads
        sys.stdout.flush()
        os._exit(0)
    print(__doc__)
