#!/usr/bin/env python3
"""Probe where vLLM's CPU attention backend writes K/V inside the KV cache.

Calls torch.ops._C.cpu_attn_reshape_and_cache (via vllm._custom_ops) exactly
the way CPUAttentionBackendImpl.do_kv_cache_update does
(vllm/v1/attention/backends/cpu_attn.py), on a small cache
[num_blocks=3, kv_heads=2, block_size=32, 2*head_size=128] bf16, and decodes
for every written element which (token, head, dim, K|V) it came from.

Run: python probe_cpu_layout.py [--isa vec|amx|vec16|...] [--json OUT]
Exit code 0 iff every element matches the formula printed at the end.
"""
import argparse
import json
import sys

import torch


def probe(isa=None, num_blocks=3, kv_heads=2, block_size=32, head_size=64,
          num_tokens=40, seed=0):
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    if isa is None:
        isa = _get_attn_isa(torch.bfloat16, block_size, head_size, "auto")
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slot_mapping = slots.to(torch.int64)

    def write(kfill, vfill):
        cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_size,
                            dtype=torch.bfloat16)
        # exactly as cpu_attn.py do_kv_cache_update
        v = cache.view(num_blocks, kv_heads, block_size * 2, -1)
        key_cache, value_cache = v.chunk(2, dim=2)
        key = kfill.to(torch.bfloat16).contiguous()
        value = vfill.to(torch.bfloat16).contiguous()
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                       slot_mapping, isa, k_scale=1.0,
                                       v_scale=1.0, kv_cache_dtype="auto")
        return cache

    T, H, D = num_tokens, kv_heads, head_size
    ti = torch.arange(T).view(T, 1, 1).expand(T, H, D).float()
    hi = torch.arange(H).view(1, H, 1).expand(T, H, D).float()
    di = torch.arange(D).view(1, 1, D).expand(T, H, D).float()
    # pass 1: K=+(t+1), V=-(t+1); pass 2: head; pass 3: dim (all exact in bf16)
    c_t = write(ti + 1, -(ti + 1)).flatten().float()
    c_h = write(hi + 1, -(hi + 1)).flatten().float()
    c_d = write(di + 1, -(di + 1)).flatten().float()
    nz = (c_t != 0).nonzero().flatten()
    assert int(nz.numel()) == 2 * T * H * D, (nz.numel(), 2 * T * H * D)

    page = block_size * 2 * head_size
    ok_formula, ok_transposed, n = True, True, 0
    examples = []
    for off in nz.tolist():
        t = int(abs(c_t[off])) - 1
        h = int(abs(c_h[off])) - 1
        d = int(abs(c_d[off])) - 1
        is_k = c_t[off] > 0
        s = int(slot_mapping[t])
        blk, pos = divmod(s, block_size)
        base = (blk * kv_heads + h) * page
        if is_k:
            exp = base + pos * head_size + d          # K row-major [bs, hs]
            exp_tr = base + d * block_size + pos      # K transposed [hs, bs]
        else:
            exp = base + block_size * head_size + pos * head_size + d
            exp_tr = exp
        ok_formula &= (off == exp)
        ok_transposed &= (off == exp_tr)
        if len(examples) < 6 and (n % 997 == 0):
            examples.append(dict(flat=off, kv="K" if is_k else "V", token=t,
                                 slot=s, block=blk, pos=pos, head=h, dim=d,
                                 page_offset=off - base))
        n += 1
    cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_size,
                        dtype=torch.bfloat16)
    return dict(isa=isa, shape=list(cache.shape), strides=list(cache.stride()),
                elements_checked=n,
                K_row_major_then_V=bool(ok_formula),
                K_transposed_then_V=bool(ok_transposed),
                examples=examples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = []
    isas = [a.isa] if a.isa else [None, "vec", "vec16"]
    for isa in isas:
        try:
            r = probe(isa)
        except Exception as e:  # unsupported ISA on this host
            r = dict(isa=isa, error=repr(e)[:300])
        results.append(r)
        print(json.dumps(r, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    for r in results:
        if "error" in r:
            continue
        print(f"\nisa={r['isa']}: offsets from the (block, head) page start "
              "(page index = block*kv_heads + head; page = 2*block_size*head_size "
              "elements; s = slot, p = s % block_size, block = s // block_size):")
        if r["K_transposed_then_V"]:
            print("  K(s,h,d) -> d*block_size + p      (K transposed [head_size, block_size])")
        elif r["K_row_major_then_V"]:
            print("  K(s,h,d) -> p*head_size + d       (K row-major [block_size, head_size])")
        else:
            print("  K: neither simple formula holds, see examples")
        print("  V(s,h,d) -> block_size*head_size + p*head_size + d   (V [block_size, head_size])")
    good = all(r.get("K_row_major_then_V") or r.get("K_transposed_then_V")
               for r in results if "error" not in r)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
