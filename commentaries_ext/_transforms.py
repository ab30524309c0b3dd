"""Whether ``torch.func`` transforms or forward-mode AD are active.

The library's classic ``autograd.Function`` fast paths (no ``setup_context``, ``jvp`` or
``vmap`` rules) step aside there and the stock or generic path runs instead."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def dual_level_active() -> bool:
    return getattr(_fwad, "_current_level", 0) >= 0  # a torch without the attribute: assume active
