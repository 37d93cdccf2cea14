"""A small character-level RWKV-4 language model built from seqkern's RWKV4Block.

Trains in parallel mode (whole sequences through the fused WKV kernel) on text that
ships with Python itself (the source of a few standard-library modules: no download),
then checks that step mode (one token at a time with a state, constant memory) gives
the same logits as parallel mode, and generates text in step mode.

    python examples/rwkv_lm.py --steps 300          # a few minutes on a laptop CPU
    python examples/rwkv_lm.py --steps 5 --quick    # smoke test
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seqkern import nn as snn  # noqa: E402

VOCAB = 128  # ASCII; anything else maps to '?'
STDLIB_FILES = ("textwrap.py", "string.py", "random.py", "difflib.py", "heapq.py", "bisect.py")


def load_text(max_chars: int) -> torch.Tensor:
    """Standard-library source as a 1-D tensor of ASCII codes."""
    root = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    text = "\n".join(parts)[:max_chars]
    if len(text) < 1000:  # an unusual Python install: fall back to this file
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            text = f.read() * 4
    return torch.tensor([ord(c) if ord(c) < VOCAB else ord("?") for c in text], dtype=torch.long)


class RWKVLM(nn.Module):
    def __init__(self, d: int, layers: int, backend=None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(snn.RWKV4Block(d, 4 * d, i, n_layer=layers, backend=backend)
                                    for i in range(layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens, states=None):
        """tokens (B, T) -> logits (B, T, VOCAB), per-block states; T = 1 is one RNN step."""
        h = self.emb(tokens)
        states = states if states is not None else [None] * len(self.blocks)
        new = []
        for blk, st in zip(self.blocks, states):
            h, st = blk(h, st)
            new.append(st)
        return self.head(self.ln_out(h)), new


def batches(data, batch, ctx, gen):
    while True:
        idx = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + ctx] for i in idx])
        y = torch.stack([data[i + 1:i + ctx + 1] for i in idx])
        yield x, y


@torch.no_grad()
def step_mode_logits(model, tokens):
    """Logits of every position computed one token at a time with a state."""
    states, out = None, []
    for t in range(tokens.shape[1]):
        logits, states = model(tokens[:, t:t + 1], states)
        out.append(logits)
    return torch.cat(out, 1), states


@torch.no_grad()
def generate(model, prompt: str, n: int, temperature: float, gen) -> str:
    tokens = torch.tensor([[ord(c) if ord(c) < VOCAB else ord("?") for c in prompt]])
    logits, states = model(tokens)  # the prompt in parallel mode, then one token per step
    last = logits[:, -1]
    out = []
    for _ in range(n):
        probs = torch.softmax(last / temperature, -1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        out.append(chr(nxt.item()))
        logits, states = model(nxt, states)
        last = logits[:, -1]
    return "".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--ctx", type=int, default=96)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default=None)
    p.add_argument("--generate", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="tiny model and text (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.layers, a.ctx, a.batch, a.generate = 32, 2, 32, 8, 20
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    data = load_text(40_000 if a.quick else 400_000)
    model = RWKVLM(a.d, a.layers, backend=a.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    print(f"{sum(q.numel() for q in model.parameters()):,} parameters, {len(data):,} characters of stdlib source")
    losses, t0 = [], time.time()
    it = batches(data, a.batch, a.ctx, gen)
    for step in range(a.steps):
        x, y = next(it)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, a.steps // 10) == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.1f}s)")
    model.eval()
    probe = data[:48][None]
    par, _ = model(probe)
    seq, _ = step_mode_logits(model, probe)
    diff = (par - seq).abs().max().item()
    print(f"parallel vs step mode: max |logit difference| = {diff:.2e}")
    sample = generate(model, "def ", a.generate, 0.8, gen)
    print("--- sample (step mode) ---\ndef " + sample)
    first = sum(losses[:3]) / min(3, len(losses))
    last = sum(losses[-3:]) / min(3, len(losses))
    print(f"loss {first:.3f} -> {last:.3f} (uniform: {math.log(VOCAB):.3f})")
    return {"losses": losses, "first": first, "last": last, "step_vs_parallel": diff, "sample": sample}


if __name__ == "__main__":
    main()
