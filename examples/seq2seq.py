"""Encoder-decoder with attention, in the style of the seq2seq papers
(Sutskever et al. 2014; Bahdanau et al. 2015; Luong et al. 2015), on a synthetic
translation task it generates itself: reverse a string of digits.

    python examples/seq2seq.py                       # seqkern layers, dot attention, ~3 min on 2 cores
    python examples/seq2seq.py --attention additive  # Bahdanau scoring
    python examples/seq2seq.py --impl torch          # the same model on torch.nn layers
    python examples/seq2seq.py --compare --steps 200 # both, same steps, and the speedup
    python examples/seq2seq.py --quick               # smoke test (CI)

Encoder: embedding -> bidirectional GRU or LSTM over a PackedSequence (variable
lengths). Decoder: a GRU/LSTM cell stepping over the target with teacher forcing;
at each step it attends over the encoder states, either by dot-product scoring
through ``scaled_dot_product_attention`` (Luong) or by additive scoring (Bahdanau).
Greedy decoding and exact-match accuracy on held-out strings.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import seqkern  # noqa: E402
from seqkern import functional as SF  # noqa: E402

PAD, SOS, EOS, DIGIT0 = 0, 1, 2, 3
VOCAB = DIGIT0 + 10


def make_batch(batch, min_len, max_len, gen):
    """Random digit strings and their reversals, padded; lengths include EOS."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen)
    src = torch.full((batch, max_len + 1), PAD, dtype=torch.long)
    tgt = torch.full((batch, max_len + 1), PAD, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        digits = torch.randint(0, 10, (n,), generator=gen) + DIGIT0
        src[b, :n], src[b, n] = digits, EOS
        tgt[b, :n], tgt[b, n] = digits.flip(0), EOS
    return src, tgt, lengths + 1


class Seq2Seq(nn.Module):
    def __init__(self, layers, cell="gru", hidden=128, emb=64, attention="dot"):
        super().__init__()
        self.cell_type, self.attention, self.hidden = cell, attention, hidden
        self.embed = nn.Embedding(VOCAB, emb, padding_idx=PAD)
        enc_cls = layers.GRU if cell == "gru" else layers.LSTM
        self.encoder = enc_cls(emb, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.enc_proj = nn.Linear(2 * hidden, hidden, bias=False)      # keys/values in decoder space
        dec_cls = layers.GRUCell if cell == "gru" else layers.LSTMCell
        self.decoder = dec_cls(emb + hidden, hidden)
        if attention == "additive":
            self.w_query = nn.Linear(hidden, hidden, bias=False)
            self.v = nn.Linear(hidden, 1, bias=False)
        else:
            self.w_query = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def encode(self, src, src_len):
        packed = pack_padded_sequence(self.embed(src), src_len, batch_first=True, enforce_sorted=False)
        out, state = self.encoder(packed)
        enc, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        h_n = state[0] if self.cell_type == "lstm" else state
        h0 = torch.tanh(self.bridge(torch.cat((h_n[0], h_n[1]), -1)))
        state = (h0, torch.zeros_like(h0)) if self.cell_type == "lstm" else h0
        return self.enc_proj(enc), state

    def attend(self, h, keys, pad_mask, sdpa):
        """Context vector (B, H) for decoder state h (B, H) over encoder keys (B, S, H)."""
        if self.attention == "additive":
            scores = self.v(torch.tanh(self.w_query(h)[:, None] + keys)).squeeze(-1)
            scores = scores.masked_fill(~pad_mask, float("-inf"))
            return torch.bmm(scores.softmax(-1)[:, None], keys).squeeze(1)
        q = self.w_query(h)[:, None, None]                             # (B, 1 head, 1 query, H)
        ctx = sdpa(q, keys[:, None], keys[:, None], attn_mask=pad_mask[:, None, None])
        return ctx[:, 0, 0]

    def step(self, token, state, keys, pad_mask, sdpa):
        h = state[0] if self.cell_type == "lstm" else state
        ctx = self.attend(h, keys, pad_mask, sdpa)
        state = self.decoder(torch.cat((self.embed(token), ctx), -1), state)
        h = state[0] if self.cell_type == "lstm" else state
        return self.out(torch.cat((h, self.attend(h, keys, pad_mask, sdpa)), -1)), state

    def forward(self, src, src_len, tgt, sdpa):
        """Teacher forcing: logits (B, T, V) for every target position."""
        keys, state = self.encode(src, src_len)
        pad_mask = src != PAD
        token = torch.full((src.size(0),), SOS, dtype=torch.long)
        logits = []
        for t in range(tgt.size(1)):
            lg, state = self.step(token, state, keys, pad_mask, sdpa)
            logits.append(lg)
            token = tgt[:, t]
        return torch.stack(logits, 1)

    @torch.no_grad()
    def greedy(self, src, src_len, max_len, sdpa):
        keys, state = self.encode(src, src_len)
        pad_mask = src != PAD
        token = torch.full((src.size(0),), SOS, dtype=torch.long)
        out = []
        for _ in range(max_len):
            lg, state = self.step(token, state, keys, pad_mask, sdpa)
            token = lg.argmax(-1)
            out.append(token)
        return torch.stack(out, 1)


def exact_match(pred, tgt):
    """A prediction is right when it equals the target up to and including EOS."""
    ok = 0
    for p, t in zip(pred.tolist(), tgt.tolist()):
        n = t.index(EOS) + 1
        ok += p[:n] == t[:n]
    return ok / len(tgt)


def train(impl, args, log=print):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    layers = seqkern.nn if impl == "seqkern" else nn
    sdpa = SF.scaled_dot_product_attention if impl == "seqkern" else F.scaled_dot_product_attention
    model = Seq2Seq(layers, args.cell, args.hidden, args.emb, args.attention)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, losses = time.perf_counter(), []
    step = 0
    while step < args.steps and time.perf_counter() - start < args.minutes * 60:
        src, tgt, src_len = make_batch(args.batch, args.min_len, args.max_len, gen)
        logits = model(src, src_len, tgt, sdpa)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            log(f"[{impl}] step {step:5d}  loss {sum(losses[-args.log_every:]) / args.log_every:.4f}  "
                f"{time.perf_counter() - start:6.1f}s")
    elapsed = time.perf_counter() - start
    model.eval()
    egen = torch.Generator().manual_seed(args.seed + 1)
    src, tgt, src_len = make_batch(512, args.min_len, args.max_len, egen)
    acc = exact_match(model.greedy(src, src_len, tgt.size(1), sdpa), tgt)
    log(f"[{impl}] {step} steps in {elapsed:.1f}s ({elapsed / max(step, 1) * 1000:.1f} ms/step), "
        f"final loss {losses[-1]:.4f}, exact-match accuracy {acc:.1%}")
    return dict(steps=step, seconds=elapsed, losses=losses, accuracy=acc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["seqkern", "torch"], default="seqkern")
    p.add_argument("--compare", action="store_true", help="train both implementations for the same steps")
    p.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    p.add_argument("--attention", choices=["dot", "additive"], default="dot")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--emb", type=int, default=32)
    p.add_argument("--min-len", type=int, default=3)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="a few steps on a tiny model (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.emb, args.batch, args.log_every, args.max_len = 6, 16, 8, 8, 2, 5
    if args.compare:
        res = {impl: train(impl, args) for impl in ("torch", "seqkern")}
        t, s = (res[i]["seconds"] / max(res[i]["steps"], 1) for i in ("torch", "seqkern"))
        print(f"seqkern vs torch.nn: {t / s:.2f}x the training speed ({s * 1000:.1f} vs {t * 1000:.1f} ms/step)")
        return res
    return train(args.impl, args)


if __name__ == "__main__":
    main()
