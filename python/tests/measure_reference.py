#!/usr/bin/env python3
"""Reference measurements for the vLLM CPU harness (see /work/notes/vllm_connector_brief.md).

  python measure_reference.py [A] [B] [C] [D] [E] [F]
    A: 4x300-token prompts, cold, 2 vs 1 OMP threads (timing, determinism)
    B: one 6000-token prompt (chunked prefill 4096+1904) + RecordingConnector
    C: vLLM prefix cache (round 2 of one engine) vs a cold engine
    D: RecordingConnector with block_size 32, max_num_batched_tokens 256, PC on
    E: RecordingConnector under forced preemption (24 blocks of 32)
    F: warm timing for 6000 tokens; chunk-size-only logprob difference
Model: tiny_model.make(/tmp/kvtier_tiny) (override with KVTIER_TINY_MODEL).
Connector logs: /tmp/rec_{B,D,E}.jsonl; results: /tmp/suite_<args>.json
"""
import sys, json, random, time, os
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from vllm_harness import run, max_logprob_diff
import tiny_model
M = tiny_model.make(os.environ.get("KVTIER_TINY_MODEL", "/tmp/kvtier_tiny"))
random.seed(1)
P4 = [[random.randrange(3, 1024) for _ in range(300)] for _ in range(4)]
P6k = [[random.randrange(3, 1024) for _ in range(6000)]]
def rec(log): 
    if os.path.exists(log): os.remove(log)
    return {"kv_connector":"RecordingConnector","kv_connector_module_path":"recording_connector","kv_role":"kv_both","kv_connector_extra_config":{"log":log}}
R={}
def go(name, *a, **k):
    t=time.time()
    try:
        r=run(M, *a, log_path=f"/tmp/suite_{name}.log", **k)
    except Exception as e:
        print(name, "FAILED", str(e)[-3000:], flush=True); return None
    R[name]=r
    print(name, json.dumps(r["timing"]), [o["num_cached_tokens"] for o in r["outputs"]], flush=True)
    return r
which = sys.argv[1:] or list("ABCDEF")
if "A" in which:
    a=go("A_cold4x300", P4, max_tokens=8, rounds=2)
    a1=go("A1_cold4x300_bind1", P4, max_tokens=8, rounds=2, extra_env={"VLLM_CPU_OMP_THREADS_BIND":"1","OMP_NUM_THREADS":"1"})
    if a and a1: print("A vs A1 (threads)", max_logprob_diff(a["rounds"][0], a1["rounds"][0]))
    if a: print("A round2 vs round1 (no PC)", max_logprob_diff(a["rounds"][0], a["rounds"][1]))
if "B" in which:
    b=go("B_6000", P6k, max_tokens=8, kv_transfer_config=rec("/tmp/rec_B.jsonl"), rounds=1)
if "C" in which:
    c=go("C_pc", P4+P6k, max_tokens=8, enable_prefix_caching=True, rounds=2)
    c0=go("C_cold", P4+P6k, max_tokens=8, enable_prefix_caching=False, rounds=1)
    if c and c0:
        print("C: PC round2 vs cold", max_logprob_diff(c0["rounds"][0], c["rounds"][1]))
        print("C: PC round1 vs cold", max_logprob_diff(c0["rounds"][0], c["rounds"][0]))
        for x,y in zip(c0["rounds"][0], c["rounds"][1]): print("  ", x["token_ids"]==y["token_ids"], max(abs(p-q) for p,q in zip(x["logprobs"],y["logprobs"])), y["num_cached_tokens"])
if "D" in which:
    go("D_rec_chunk", P4[:2], max_tokens=4, enable_prefix_caching=True, max_num_batched_tokens=256, block_size=32, rounds=2, kv_transfer_config=rec("/tmp/rec_D.jsonl"))
if "E" in which:
    go("E_preempt", P4[:3], max_tokens=200, block_size=32, max_num_batched_tokens=512, extra={"num_gpu_blocks_override": 24, "max_model_len": 512}, kv_transfer_config=rec("/tmp/rec_E.jsonl"), rounds=1)
if "F" in which:
    f=go("F_6000_warm", P6k, max_tokens=8, rounds=2)
    f2=go("F2_4x300_plus_6000_mnbt512", P4+P6k, max_tokens=8, rounds=2, max_num_batched_tokens=512)
    if f and f2: print("F vs F2 (different chunking, no PC)", max_logprob_diff(f["rounds"][0], f2["rounds"][0][4:]))
json.dump({k:{kk:vv for kk,vv in v.items() if kk!="log_tail"} for k,v in R.items()}, open("/tmp/suite_%s.json" % "".join(which),"w"))
