"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / per-row output dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(tile: int) -> int:
    # 4096-element tiles (the cross-entropy kernels' usual tile) with 4 warps take 236-255
    # registers per thread and the backward spills (ptxas, sm_90); 8 warps do not
    if tile >= 4096:
        return 8
    if tile >= 2048:
        return 4
    return 2 if tile >= 512 else 1


def on_tensor_device(launcher):
    """Run a launcher with its tensors' GPU as the current device: Triton launches on the
    current device, so tensors on cuda:1 while cuda:0 is current would be launched on the
    wrong GPU. The device is that of the first argument (or of the first tensor of a first
    argument that is a list)."""

    @functools.wraps(launcher)
    def run(*args):
        first = args[0]
        if isinstance(first, (list, tuple)):
            first = first[0] if len(first) else None
        if first is None or first.device.type != "cuda" or first.device.index == torch.cuda.current_device():
            return launcher(*args)
        with torch.cuda.device(first.device):
            return launcher(*args)

    return run
