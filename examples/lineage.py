"""The lineage of sequence models, measured side by side on this machine.

Trains a character (byte-level) language model of each kind seqkern covers — the
vanilla RNN, LSTM, GRU, a Transformer (seqkern attention with rotary or sinusoidal
positions) and RWKV-4 — on the same text (the source of Python's own standard
library: no download), with about the same number of parameters and the same
wall-clock budget. Then measures generation: the time per token and the memory of
the state as the context grows (1k -> 16k tokens by default), which shows the
recurrent models' constant cost against attention's growing KV cache.

    python examples/lineage.py                  # ~1 minute of training per model
    python examples/lineage.py --seconds 20 --contexts 1024 4096 16384
    python examples/lineage.py --quick          # smoke test (CI)

Writes examples/results/lineage.md and PNG plots (loss vs time; time per token and
memory vs context length) next to it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seqkern import functional as SF, nn as snn  # noqa: E402

VOCAB = 256
HERE = os.path.dirname(os.path.abspath(__file__))


def corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of standard-library source files, as a 1-D uint8 tensor."""
    import argparse as m1, collections as m2, json as m3, textwrap as m4, typing as m5, pathlib as m6, \
        dataclasses as m7, enum as m8, functools as m9, inspect as m10  # noqa: E401
    text = "\n".join(inspect.getsource(m) for m in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10))
    data = text.encode("utf-8")[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


# ---------------------------------------------------------------------------
# the five models; each has forward(x) for training and init_state/step for generation
# ---------------------------------------------------------------------------

class RecurrentLM(nn.Module):
    def __init__(self, kind: str, d: int, layers: int):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(VOCAB, d)
        cls = {"rnn": snn.RNN, "lstm": snn.LSTM, "gru": snn.GRU}[kind]
        self.rnn = cls(d, d, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x, state=None):
        y, state = self.rnn(self.embed(x), state)
        return self.head(y), state

    def init_state(self, batch, context):
        return None  # the recurrent state does not depend on the context length

    def step(self, token, state):
        logits, state = self(token[:, None], state)
        return logits[:, -1], state


class TransformerLM(nn.Module):
    """Pre-norm decoder-only Transformer; attention through seqkern's SDPA."""

    def __init__(self, d: int, layers: int, heads: int, positions: str = "rotary"):
        super().__init__()
        self.d, self.heads, self.positions = d, heads, positions
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = snn.RotaryEmbedding(d // heads) if positions == "rotary" else snn.SinusoidalPositionalEncoding(d, batch_first=True)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
                ln2=nn.LayerNorm(d), fc1=nn.Linear(d, 4 * d), fc2=nn.Linear(4 * d, d))))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def _attend(self, blk, x, start, cache):
        B, T, _ = x.shape
        q, k, v = blk["qkv"](blk["ln1"](x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.positions == "rotary":
            q, k = self.pos(q, k, start=start)
        if cache is not None:  # decoding: append to this layer's KV cache
            k = torch.cat((cache[0], k), 2)
            v = torch.cat((cache[1], v), 2)
        o = SF.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        return blk["proj"](o.transpose(1, 2).reshape(B, T, self.d)), (k, v)

    def forward(self, x, start=0, caches=None):
        h = self.embed(x)
        if self.positions != "rotary":
            h = self.pos(h, start=start)
        new = []
        for i, blk in enumerate(self.blocks):
            a, kv = self._attend(blk, h, start, None if caches is None else caches[i])
            h = h + a
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](h))))
            new.append(kv)
        return self.head(self.ln(h)), new

    def init_state(self, batch, context):
        """A KV cache already holding `context` positions (random: only its cost matters here)."""
        hd = self.d // self.heads
        p = next(self.parameters())
        kv = [(torch.randn(batch, self.heads, context, hd, dtype=p.dtype),
               torch.randn(batch, self.heads, context, hd, dtype=p.dtype)) for _ in self.blocks]
        return (context, kv)

    def step(self, token, state):
        pos, caches = state if state is not None else (0, None)
        logits, caches = self(token[:, None], start=pos, caches=caches)
        return logits[:, -1], (pos + 1, caches)


class RWKVLM(nn.Module):
    def __init__(self, d: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(snn.RWKV4Block(d, 4 * d, i) for i in range(layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, x, states=None):
        h = self.emb(x)
        states = states or [None] * len(self.blocks)
        new = []
        for blk, st in zip(self.blocks, states):
            h, st = blk(h, st)
            new.append(st)
        return self.head(self.ln_out(h)), new

    def init_state(self, batch, context):
        return None

    def step(self, token, state):
        logits, state = self(token[:, None], state)
        return logits[:, -1], state


def state_bytes(state) -> int:
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    if hasattr(state, "__dict__"):
        return sum(state_bytes(v) for v in vars(state).values())
    return 0


def build(kind, budget, positions):
    """A model of `kind` whose width is chosen so its parameter count is close to `budget`."""
    def make(d):
        if kind in ("rnn", "lstm", "gru"):
            return RecurrentLM(kind, d, 2)
        if kind == "transformer":
            return TransformerLM(d, 2, 4, positions)
        return RWKVLM(d, 2)

    best = None
    for d in range(16, 1025, 8 if kind != "transformer" else 16):
        n = sum(p.numel() for p in make(d).parameters())
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (d, n)
        if n > budget:
            break
    torch.manual_seed(0)
    return make(best[0])


def train(kind, model, data, args):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    curve, tokens, steps = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        idx = torch.randint(0, len(train_data) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train_data[i:i + args.seq] for i in idx])
        y = torch.stack([train_data[i + 1:i + args.seq + 1] for i in idx])
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        tokens += x.numel()
        curve.append((time.perf_counter() - start, loss.item()))
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        n = (len(val_data) - 1) // args.seq
        n = max(1, min(n, 16))
        x = val_data[: n * args.seq].view(n, args.seq)
        y = val_data[1: n * args.seq + 1].view(n, args.seq)
        val = F.cross_entropy(model(x)[0].reshape(-1, VOCAB), y.reshape(-1)).item()
    return dict(steps=steps, tokens_per_s=tokens / elapsed, curve=curve, val_loss=val, seconds=elapsed)


@torch.no_grad()
def generation_cost(model, contexts, steps=8):
    """Median seconds per generated token and bytes of state, after `context` tokens."""
    out = []
    token = torch.zeros(1, dtype=torch.long)
    for ctx in contexts:
        state = model.init_state(1, ctx)
        _, state = model.step(token, state)  # warm-up; also creates a recurrent state
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            _, new_state = model.step(token, state)
            times.append(time.perf_counter() - t0)
        times.sort()
        out.append(dict(context=ctx, s_per_token=times[len(times) // 2], state_bytes=state_bytes(new_state)))
    return out


def plots(results, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no plots ({e})")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, r in results.items():
        t, l = zip(*r["train"]["curve"])
        w = max(1, len(l) // 50)
        smooth = [sum(l[max(0, i - w):i + 1]) / len(l[max(0, i - w):i + 1]) for i in range(len(l))]
        ax.plot(t, smooth, label=kind)
    ax.set(xlabel="seconds", ylabel="training loss (nats/byte)", title="Loss vs time, same parameter budget")
    ax.legend()
    paths.append(os.path.join(out_dir, "lineage_loss.png"))
    fig.tight_layout(); fig.savefig(paths[-1], dpi=100); plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, r in results.items():
        c = [g["context"] for g in r["generation"]]
        a1.plot(c, [g["s_per_token"] * 1e3 for g in r["generation"]], marker="o", label=kind)
        a2.plot(c, [g["state_bytes"] / 2**20 for g in r["generation"]], marker="o", label=kind)
    a1.set(xscale="log", xlabel="context (tokens)", ylabel="ms per generated token", title="Generation time")
    a2.set(xscale="log", xlabel="context (tokens)", ylabel="state / KV cache (MiB)", title="Generation memory")
    a1.legend(); a2.legend()
    paths.append(os.path.join(out_dir, "lineage_generation.png"))
    fig.tight_layout(); fig.savefig(paths[-1], dpi=100); plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rnn", "lstm", "gru", "transformer", "rwkv"])
    p.add_argument("--params", type=int, default=400_000, help="parameter budget per model")
    p.add_argument("--seconds", type=float, default=60.0, help="training time per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--positions", choices=["rotary", "sinusoidal"], default="rotary")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="tiny models, seconds of training (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        quick = dict(params=20_000, seconds=1.5, batch=4, seq=32, contexts=[64, 256])
        for name, value in quick.items():
            if f"--{name}" not in explicit:  # --quick sets defaults; explicit options still win
                setattr(args, name, value)
    torch.manual_seed(0)
    data = corpus(2_000_000 if not args.quick else 200_000)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for kind in args.models:
        model = build(kind, args.params, args.positions)
        n = sum(p.numel() for p in model.parameters())
        print(f"{kind:12s} {n:9,d} parameters, training {args.seconds:.0f}s ...", flush=True)
        tr = train(kind, model, data, args)
        model.eval()
        gen = generation_cost(model, args.contexts)
        results[kind] = dict(params=n, train=tr, generation=gen)
        print(f"{'':12s} {tr['tokens_per_s']:9,.0f} tokens/s, validation loss {tr['val_loss']:.3f} "
              f"({tr['val_loss'] / math.log(2):.2f} bits/byte); ms/token at context "
              + ", ".join(f"{g['context']}: {g['s_per_token'] * 1e3:.2f}" for g in gen), flush=True)
    lines = ["# The lineage, measured", "",
             f"Same text (Python's standard library source), ~{args.params:,} parameters, {args.seconds:.0f} s of "
             f"training each, batch {args.batch} x {args.seq} bytes, on {torch.get_num_threads()} CPU threads "
             f"(load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}).", "",
             "| model | parameters | training tokens/s | validation loss (bits/byte) | "
             + " | ".join(f"ms/token @{c}" for c in args.contexts) + " | "
             + " | ".join(f"state KiB @{c}" for c in args.contexts) + " |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(args.contexts))]
    for kind, r in results.items():
        g = r["generation"]
        lines.append(f"| {kind} | {r['params']:,} | {r['train']['tokens_per_s']:,.0f} | "
                     f"{r['train']['val_loss'] / math.log(2):.2f} | "
                     + " | ".join(f"{x['s_per_token'] * 1e3:.2f}" for x in g) + " | "
                     + " | ".join(f"{x['state_bytes'] / 2**10:,.1f}" for x in g) + " |")
    for path in plots(results, args.out):
        lines += ["", f"![{os.path.basename(path)}]({os.path.basename(path)})"]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "lineage.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "lineage.json"), "w") as f:
        json.dump({k: dict(params=v["params"], generation=v["generation"],
                           **{kk: vv for kk, vv in v["train"].items() if kk != "curve"}) for k, v in results.items()},
                  f, indent=1)
    print(md)
    return results


if __name__ == "__main__":
    main()
