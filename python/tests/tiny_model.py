#!/usr/bin/env python3
"""Write a tiny random-weight Llama model directory for vLLM tests.

No tokenizer is written: run vLLM with skip_tokenizer_init=True and
token-id prompts ({"prompt_token_ids": [...]}).

    python tiny_model.py OUTDIR [--layers 2 --hidden 256 --heads 4 --kv-heads 2
        --head-size 64 --vocab 1024 --intermediate 512 --max-pos 8192 --seed 0
        --std 0.05]

make(outdir, **shape) -> outdir (skips if the same config already exists).
"""
import argparse
import json
import os
import sys

DEFAULTS = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_size=64,
                vocab=1024, intermediate=512, max_pos=8192, seed=0, std=0.05)


def _config(s):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_size"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": s["max_pos"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "initializer_range": s["std"],
        # recorded so idempotency also covers seed/std
        "kvtier_tiny_model": {"seed": s["seed"], "std": s["std"]},
    }


def make(outdir, **shape):
    s = dict(DEFAULTS)
    unknown = set(shape) - set(s)
    if unknown:
        raise TypeError(f"unknown shape args: {sorted(unknown)}")
    s.update(shape)
    cfg = _config(s)
    os.makedirs(outdir, exist_ok=True)
    cfg_path = os.path.join(outdir, "config.json")
    st_path = os.path.join(outdir, "model.safetensors")
    if os.path.exists(cfg_path) and os.path.exists(st_path):
        with open(cfg_path) as f:
            if json.load(f) == cfg:
                return outdir

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(int(s["seed"]))
    std = float(s["std"])
    H, I, V = s["hidden"], s["intermediate"], s["vocab"]
    qd = s["heads"] * s["head_size"]
    kvd = s["kv_heads"] * s["head_size"]

    def rnd(*shp, scale=std):
        return (torch.randn(*shp, generator=g) * scale).to(torch.bfloat16)

    t = {}
    # embeddings at unit-ish scale so RMSNorm inputs are well conditioned
    t["model.embed_tokens.weight"] = rnd(V, H, scale=1.0)
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[p + "self_attn.q_proj.weight"] = rnd(qd, H)
        t[p + "self_attn.k_proj.weight"] = rnd(kvd, H)
        t[p + "self_attn.v_proj.weight"] = rnd(kvd, H)
        t[p + "self_attn.o_proj.weight"] = rnd(H, qd)
        t[p + "mlp.gate_proj.weight"] = rnd(I, H)
        t[p + "mlp.up_proj.weight"] = rnd(I, H)
        t[p + "mlp.down_proj.weight"] = rnd(H, I)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    # lm_head scale chosen so logits have std ~ 1.5-2 -> peaked but not one-hot
    t["lm_head.weight"] = rnd(V, H, scale=0.1)
    tmp = st_path + ".tmp"
    save_file({k: v.contiguous() for k, v in t.items()}, tmp,
              metadata={"format": "pt"})
    os.replace(tmp, st_path)
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)
    with open(os.path.join(outdir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return outdir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    shape = {k: getattr(a, k) for k in DEFAULTS}
    print(make(a.outdir, **shape))


if __name__ == "__main__":
    sys.exit(main())
