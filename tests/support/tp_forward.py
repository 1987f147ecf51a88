"""A Megatron-style tensor-parallel GPT forward over per-rank shards, written from Megatron's math and
independent of fedllm's partition rules: each rank embeds its vocabulary slice, runs its own heads and its
slice of the MLP, row-parallel outputs are summed across ranks, and logits are gathered over the vocab."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _names(mcore: bool, i: int) -> dict[str, str]:
    if mcore:
        p = f"model.decoder.layers.{i}."
        return {
            "ln1": p + "self_attention.linear_qkv.layer_norm_",
            "qkv": p + "self_attention.linear_qkv.",
            "proj": p + "self_attention.linear_proj.",
            "ln2": p + "mlp.linear_fc1.layer_norm_",
            "fc1": p + "mlp.linear_fc1.",
            "fc2": p + "mlp.linear_fc2.",
        }
    p = f"model.language_model.encoder.layers.{i}."
    return {
        "ln1": p + "input_layernorm.",
        "qkv": p + "self_attention.query_key_value.",
        "proj": p + "self_attention.dense.",
        "ln2": p + "post_attention_layernorm.",
        "fc1": p + "mlp.dense_h_to_4h.",
        "fc2": p + "mlp.dense_4h_to_h.",
    }


def tp_logits(ranks: list[dict], cfg: dict, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [seq, vocab_size] of a GPT whose weights are split over len(ranks) tensor-parallel ranks."""
    tp = len(ranks)
    mcore = bool(cfg.get("mcore_gpt"))
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    groups = cfg.get("num_query_groups") or heads
    kv = h // heads
    heads_r, groups_r = heads // tp, groups // tp
    eps = cfg.get("layernorm_epsilon", 1e-5)
    glu = cfg["activation"] in ("fast-swiglu", "swiglu", "fast-geglu", "geglu") and (
        mcore or cfg["activation"].startswith("fast-")
    )
    act = F.silu if "swiglu" in cfg["activation"] else F.gelu
    r32 = [{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in ranks]
    emb_key = (
        "model.embedding.word_embeddings.weight" if mcore else "model.language_model.embedding.word_embeddings.weight"
    )
    pos_key = emb_key.replace("word_embeddings", "position_embeddings")
    out_key = "model.output_layer.weight" if mcore else "model.language_model.output_layer.weight"
    final = "model.decoder.final_layernorm." if mcore else "model.language_model.encoder.final_layernorm."

    # Vocab-parallel embedding: each rank looks up the tokens in its row range, the rest are zero; all-reduce.
    per = r32[0][emb_key].shape[0]
    x = torch.zeros(tokens.shape[0], h)
    for r, sd in enumerate(r32):
        local = tokens - r * per
        mask = (local >= 0) & (local < per)
        x += F.embedding(local.clamp(0, per - 1), sd[emb_key]) * mask[:, None]
    if pos_key in r32[0]:
        x = x + r32[0][pos_key][: tokens.shape[0]]
    s = tokens.shape[0]
    rope = cfg.get("position_embedding_type") == "rope"
    if rope:  # rotate-half rotary embedding on the first rotary_percentage of each head's channels
        rot = int(kv * cfg.get("rotary_percentage", 1.0))
        inv_freq = 1.0 / (cfg.get("rotary_base", 10000) ** (torch.arange(0, rot, 2).float() / rot))
        angles = torch.outer(torch.arange(s).float(), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rotary(t: torch.Tensor) -> torch.Tensor:
            part, rest = t[..., :rot], t[..., rot:]
            half = torch.cat([-part[..., rot // 2 :], part[..., : rot // 2]], -1)
            return torch.cat([part * cos + half * sin, rest], -1)

    causal = torch.full((s, s), float("-inf")).triu(1)
    for i in range(cfg["num_layers"]):
        n = _names(mcore, i)
        ln1 = F.layer_norm(x, (h,), r32[0][n["ln1"] + "weight"], r32[0][n["ln1"] + "bias"], eps)
        attn = torch.zeros_like(x)
        for sd in r32:
            qkv = ln1 @ sd[n["qkv"] + "weight"].T + sd[n["qkv"] + "bias"]
            if cfg.get("megatron_legacy"):  # this rank's [Q; K; V]
                q, k, v = qkv.split([heads_r * kv, groups_r * kv, groups_r * kv], dim=-1)
            else:  # per query group: [q of the group's heads, k, v]
                per_group = qkv.view(s, groups_r, (heads // groups + 2) * kv)
                q = per_group[..., : heads // groups * kv].reshape(s, heads_r * kv)
                k = per_group[..., heads // groups * kv : (heads // groups + 1) * kv].reshape(s, groups_r * kv)
                v = per_group[..., (heads // groups + 1) * kv :].reshape(s, groups_r * kv)
            q = q.view(s, heads_r, kv).transpose(0, 1)
            k = k.view(s, groups_r, kv).transpose(0, 1).repeat_interleave(heads // groups, dim=0)
            v = v.view(s, groups_r, kv).transpose(0, 1).repeat_interleave(heads // groups, dim=0)
            if rope:
                q, k = rotary(q), rotary(k)
            scores = q @ k.transpose(1, 2) / math.sqrt(kv) + causal
            ctx = (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, heads_r * kv)
            attn += ctx @ sd[n["proj"] + "weight"].T  # row-parallel: partial sums
        x = x + attn + r32[0][n["proj"] + "bias"]
        ln2 = F.layer_norm(x, (h,), r32[0][n["ln2"] + "weight"], r32[0][n["ln2"] + "bias"], eps)
        mlp = torch.zeros_like(x)
        for sd in r32:
            a = ln2 @ sd[n["fc1"] + "weight"].T + sd[n["fc1"] + "bias"]
            if glu:
                gate, value = a.chunk(2, dim=-1)
                a = act(gate) * value
            else:
                a = act(a)
            mlp += a @ sd[n["fc2"] + "weight"].T
        x = x + mlp + r32[0][n["fc2"] + "bias"]
    x = F.layer_norm(x, (h,), r32[0][final + "weight"], r32[0][final + "bias"], eps)
    head = out_key if out_key in r32[0] else emb_key
    logits = torch.cat([x @ sd[head].T for sd in r32], dim=-1)
    return logits[:, :vocab_size]
