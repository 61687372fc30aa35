"""Tessera against plain PyTorch eager on the same CPU, same process, one after the other: the same Llama-style
model (RMSNorm, rotary positions, SwiGLU, untied head), trained with AdamW on random tokens.

    pip install -e '.[bench]' && python bench/compare_torch.py [--steps 20] [--warmup 3]

d_model 512, 6 layers, 8 heads, d_ff 2048, vocabulary 8192, sequence 256, batch 8, float32. Prints each
one's tokens/s and the ratio. PyTorch uses its default intra-op threads, XLA its own: both all cores.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from infra.runtime import apply_platform_flags

D_MODEL, LAYERS, HEADS, D_FF, VOCAB, SEQ, BATCH = 512, 6, 8, 2048, 8192, 256, 8
TESSERA = [
    "model.n_layers=6", "model.d_model=512", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff=2048",
    "model.vocab_size=8192", "model.max_seq_len=256", "model.tie_embeddings=false", "data.seq_len=256",
    "data.batch_size=8", "optimizer.clip_norm=null",
]


def random_tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int64)


# ---------------------------------------------------------------- PyTorch eager


def torch_tokens_per_second(steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float = 1e-5):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotary(x, cos, sin):  # x [b, heads, l, hd]: rotate (first half, second half) pairs
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = RMSNorm(D_MODEL), RMSNorm(D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
            self.out = nn.Linear(D_MODEL, D_MODEL, bias=False)
            self.up, self.gate = nn.Linear(D_MODEL, D_FF, bias=False), nn.Linear(D_MODEL, D_FF, bias=False)
            self.down = nn.Linear(D_FF, D_MODEL, bias=False)

        def forward(self, x, cos, sin):
            b, length, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True)
            x = x + self.out(y.transpose(1, 2).reshape(b, length, D_MODEL))
            h = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D_MODEL)
            self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
            self.norm, self.head = RMSNorm(D_MODEL), nn.Linear(D_MODEL, VOCAB, bias=False)
            half = D_MODEL // HEADS // 2
            angle = torch.arange(SEQ)[:, None] * 10000.0 ** (-torch.arange(half) / half)
            self.register_buffer("cos", torch.cos(angle)), self.register_buffer("sin", torch.sin(angle))

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, self.cos, self.sin)
            return self.head(self.norm(x))

    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tokens = torch.from_numpy(random_tokens())

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * SEQ * steps / (time.perf_counter() - start)


# ---------------------------------------------------------------- Tessera


def tessera_tokens_per_second(steps: int, warmup: int, overrides: list[str]) -> float:
    """The compiled step looping on one batch already on the device, timed as bench/train_throughput.py does."""
    from bench.train_throughput import measure

    return measure([*TESSERA, *overrides], steps, warmup)["tokens_per_sec"]


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="key.path=value for Tessera's side (e.g. model.scan_layers=false)")
    args = parser.parse_args()
    torch_rate = torch_tokens_per_second(args.steps, args.warmup)
    tessera_rate = tessera_tokens_per_second(args.steps, args.warmup, args.overrides)
    print(json.dumps({"torch_eager_tokens_per_s": round(torch_rate, 1), "tessera_tokens_per_s": round(tessera_rate, 1),
                      "tessera_over_torch": round(tessera_rate / torch_rate, 3), "overrides": args.overrides}))


if __name__ == "__main__":
    main()
