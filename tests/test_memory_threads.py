"""Memory and threads.

- Peak memory of attention forward+backward on the `cpu` backend grows linearly
  with the sequence length: measured with the profiler's allocation events (every
  ATen CPU allocation and free, in order) at two lengths.
- Step-mode RWKV (one token at a time with a state) holds constant memory in the
  number of tokens.
- Several Python threads calling the ops at once get the results of serial calls.
"""
import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from reliability import (TYPICAL, backends_for, forward_backward, landed, require_backend, require_family,
                         require_layer)


def peak_bytes(fn):
    """Peak of live bytes allocated by ATen on the CPU while ``fn`` runs, above the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_bytes_sees_a_quadratic_allocation():
    # the measuring stick itself: the naive attention's N x N matrix must show up
    def naive(n):
        q = torch.randn(1, 1, n, 16, requires_grad=True)
        return lambda: (torch.softmax(q @ q.transpose(-1, -2), -1) @ q).sum().backward()

    small, large = peak_bytes(naive(512)), peak_bytes(naive(1024))
    assert small >= 512 * 512 * 4
    assert large / small > 3.5


def attention_fwd_bwd(n, backend, d=32, heads=1):
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    do = torch.randn(1, heads, n, d)

    def run():
        from seqkern import functional as SF

        o = SF.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        torch.autograd.grad(o, (q, k, v), do)
    return run


def test_attention_cpu_peak_memory_linear_in_sequence_length():
    require_family("attention")
    require_backend("scaled_dot_product_attention", "cpu")
    attention_fwd_bwd(64, "cpu")()  # warm up: one-time allocations stay out of the measurement
    small, large = peak_bytes(attention_fwd_bwd(1024, "cpu")), peak_bytes(attention_fwd_bwd(2048, "cpu"))
    # linear: x2 for twice the length; an N x N score matrix would make it x4 (and 16 MB at 2048)
    assert large / small < 2.6, f"peak {small} B at N=1024, {large} B at N=2048: not linear"
    assert large < 2048 * 2048 * 4, f"peak {large} B at N=2048 holds an N x N fp32 matrix"
    # and at the length the issue names, N=16384, where one N x N fp32 matrix per head is 1 GiB (head dim 8
    # and two heads, one per core, keep it to seconds: memory is what is measured)
    mid, huge = (peak_bytes(attention_fwd_bwd(n, "cpu", d=8, heads=2)) for n in (2048, 16384))
    assert huge / mid < 8 * 1.3, f"peak {mid} B at N=2048, {huge} B at N=16384: not linear"
    assert huge < 32 * 2**20, f"peak {huge} B at N=16384"


def step_peak(op_tokens, backend):
    """Peak live bytes while feeding ``op_tokens`` tokens one at a time through wkv4 with a state."""
    from seqkern import functional as SF

    C = 256
    w, u = torch.randn(C) - 1, torch.randn(C)
    ks, vs = torch.randn(1, op_tokens, C), torch.randn(1, op_tokens, C)

    def run():
        state = None
        with torch.no_grad():
            for t in range(op_tokens):
                _, state = SF.wkv4(w, u, ks[:, t:t + 1], vs[:, t:t + 1], state, backend=backend)
    return peak_bytes(run)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_wkv_step_mode_memory_constant_in_tokens(backend):
    require_family("wkv")
    require_backend("wkv4", backend)
    short, long = step_peak(16, backend), step_peak(128, backend)
    assert long <= short + 4096, f"step mode: peak {short} B over 16 tokens, {long} B over 128"


def test_rwkv_block_step_mode_memory_constant_in_tokens():
    require_layer("RWKV4Block")
    from seqkern import nn as snn

    torch.manual_seed(0)
    block = snn.RWKV4Block(64, 256, 0).eval()
    x = torch.randn(1, 128, 64)

    def steps(n):
        def run():
            state = None
            with torch.no_grad():
                for t in range(n):
                    _, state = block(x[:, t:t + 1], state)
        return run

    steps(2)()
    short, long = peak_bytes(steps(16)), peak_bytes(steps(128))
    assert long <= short + 4096, f"RWKV4Block step mode: peak {short} B over 16 tokens, {long} B over 128"


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_rnn_backward_allocates_nothing_the_size_of_the_workspace(mode):
    # the saved-activation workspace is an output of the forward op; autograd must not hand the
    # backward a zero gradient for it (a fill as big as every activation of the sequence)
    require_family("rnn")
    require_backend("lstm", "cpu")
    from seqkern import functional as SF
    from seqkern.ops.rnn import workspace_numel

    T, Bsz, I, H = 40, 8, 16, 64
    G = 4 if mode == "lstm" else 3
    x = torch.randn(T, Bsz, I, requires_grad=True)
    w = [torch.randn(G * H, I, requires_grad=True), torch.randn(G * H, H, requires_grad=True)]
    if mode == "lstm":
        y, _ = SF.lstm(x, None, *w, backend="cpu")
    else:
        y, _ = SF.gru(x, None, *w, backend="cpu")
    ws_bytes = workspace_numel(mode, T, Bsz, H, H, True) * 4
    gy = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(y, [x, *w], gy)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert ws_bytes not in sizes, f"the backward allocated {ws_bytes} B, the workspace's size"


def test_rnn_kept_workspace_shows_in_memory_events():
    # the cpu forward lends one kept workspace buffer from call to call (no fresh pages to
    # fault in); each loan must still show as an allocation and its return as a free, or
    # peak-memory measurements (the benchmarks') would leave out the largest buffer
    require_family("rnn")
    require_backend("lstm", "cpu")
    from seqkern import functional as SF
    from seqkern.ops.rnn import workspace_numel

    T, Bsz, I, H = 64, 32, 16, 128
    ws_bytes = workspace_numel("lstm", T, Bsz, H, H, True) * 4
    assert ws_bytes >= 1 << 22  # the size the kernel keeps
    x = torch.randn(T, Bsz, I, requires_grad=True)
    w = [torch.randn(4 * H, I) * 0.1, (torch.randn(4 * H, H) * 0.1).requires_grad_()]

    def step():
        y, _ = SF.lstm(x, None, *w, backend="cpu")
        torch.autograd.grad(y, [x, w[1]], torch.ones_like(y))

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert ws_bytes in sizes and -ws_bytes in sizes, "the workspace's loan is missing from the memory events"
    assert peak_bytes(step) >= ws_bytes


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("watchdog")  # a deadlock between threads must not hang CI


def own_copy(job):
    """The job with its own leaf tensors: threads share no tensor that autograd accumulates into (a
    shared leaf once deadlocked torch 2.13's grad-accumulator lock against the GIL, outside seqkern)."""
    return (job[0], copy.deepcopy(job[1]), *job[2:])


def thread_cases():
    # the kernels: the reference is plain PyTorch (it runs in the all-at-once test below)
    return [pytest.param(op, "cpu", id=f"{op}-cpu") for op in TYPICAL]


@pytest.mark.parametrize("op,backend", thread_cases())
def test_threads_equal_serial(op, backend):
    dtype = torch.float32
    jobs = []
    for i in range(4):
        torch.manual_seed(100 + i)
        family, call, args = TYPICAL[op](dtype)
        jobs.append((call, args))
    require_family(family)
    require_backend(op, backend)
    serial = [forward_backward(call, args, backend) for call, args in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            parallel = list(pool.map(lambda j: forward_backward(j[0], j[1], backend), map(own_copy, jobs)))
            for i, ((o1, g1), (o2, g2)) in enumerate(zip(serial, parallel)):
                for a, b in zip(o1 + g1, o2 + g2):
                    assert torch.equal(a, b), f"{op}/{backend}: job {i} differs when run in threads"


def test_every_op_in_threads_at_once_equals_serial():
    """All ops and backends at the same time, each in its own thread, twice over."""
    jobs = []
    for op, make in TYPICAL.items():
        family, call, args = make(torch.float64)
        if not landed(family):
            continue
        jobs += [(call, args, be) for be in backends_for(op) if be != "triton"]
    serial = [forward_backward(*j) for j in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        parallel = list(pool.map(lambda j: forward_backward(*j), map(own_copy, jobs + jobs)))
    for i, ((o1, g1), (o2, g2)) in enumerate(zip(serial + serial, parallel)):
        for a, b in zip(o1 + g1, o2 + g2):
            assert torch.equal(a, b), f"job {i % len(jobs)} ({jobs[i % len(jobs)][2]}) differs when run in threads"
