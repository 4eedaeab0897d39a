"""CUDA-graph capture of a step that runs the ops, forward and backward.

The kernels' bindings take every launch parameter from the tensors' shapes, allocate through PyTorch's caching
allocator and launch on the current stream, so a step through `selective_scan_2d`, `selective_scan_1d`,
`lattice_conv_silu` or `mamba_inner` captures whole, its backward included (tests/test_ops_cuda.py replays one
against the eager gradients).

One trap, PyTorch's rather than the ops' (plain PyTorch ops fail the same way): the capture of a backward fails with
cudaErrorStreamCaptureInvalidated while an autograd graph over the same leaves, recorded before the capture and
never run backward, is still alive (an output kept from an eager call; a guess, not followed further: its leaves'
gradient accumulators were made outside the capture, on another stream). Free such outputs, or compute them under
`torch.no_grad()`, before capturing.

A replay then launches the step's kernels without the host's work between them, which is what a step pays where the
host, not the GPU, is its bound (docs/ops.md: the scan at 100 x 100 cells).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def capture(step: Callable[[], object], grads_to_none: Iterable[torch.Tensor] = (), warmup: int = 2
            ) -> torch.cuda.CUDAGraph:
    """`step` captured in a CUDA graph, after `warmup` eager runs on a side stream (PyTorch's recipe: the first
    runs set up autograd's and the allocator's state outside the capture). The tensors in `grads_to_none` have
    their `.grad` reset before the capture, so that the captured backward writes new gradients (the graph's own
    memory, rewritten by each replay) rather than adding to the warm-up's. Replay with `.replay()`; shapes, dtypes
    and the tensors the step reads are fixed at capture: new values go in with `copy_`."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA-graph capture needs a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in grads_to_none:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
