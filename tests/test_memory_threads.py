"""Memory and threads.

- Peak memory of attention forward+backward on the `cpu` backend grows linearly
  with the sequence length: measured with the profiler's allocation events (every
  ATen CPU allocation and free, in order) at two lengths.
- Step-mode RWKV (one token at a time with a state) holds constant memory in the
  number of tokens.
- Several Python threads calling the ops at once get the results of serial calls.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from reliability import TYPICAL, backends_for, forward_backward, require_family


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


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------

def thread_cases():
    return [pytest.param(op, be, id=f"{op}-{be}") for op in TYPICAL for be in backends_for(op) if be != "triton"]


@pytest.mark.parametrize("op,backend", thread_cases())
def test_threads_equal_serial(op, backend):
    dtype = torch.float32
    jobs = []
    for i in range(6):
        torch.manual_seed(100 + i)
        family, call, args = TYPICAL[op](dtype)
        jobs.append((call, args))
    require_family(family)
    serial = [forward_backward(call, args, backend) for call, args in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            parallel = list(pool.map(lambda j: forward_backward(j[0], j[1], backend), jobs))
            for i, ((o1, g1), (o2, g2)) in enumerate(zip(serial, parallel)):
                for a, b in zip(o1 + g1, o2 + g2):
                    assert torch.equal(a, b), f"{op}/{backend}: job {i} differs when run in threads"
