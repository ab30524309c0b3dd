"""Several of the engine's rule modes as one ``TorchFunctionMode``.

Each rule mode (:class:`~.pooling.pool_rules`, :class:`~.conv.conv_rules`,
:class:`~.activation.relu_rules`, :class:`~.linear.linear_rules`,
:class:`~.batchnorm.batch_norm_reverse_rules`) routes a few ``torch.nn.functional`` calls
(its ``FUNCS``) through hand-written rules.  Stacked, every torch call of a loss passes
through every mode's Python ``__torch_function__`` (a few microseconds each): 0.5 ms of an MLP
hyper-step with three modes.  :class:`rules` looks the function up once and hands it to the
one mode that handles it, or calls it directly.
"""
from __future__ import annotations

import torch


class RuleMode(torch.overrides.TorchFunctionMode):
    """A rule mode: ``FUNCS``, the functions its ``__torch_function__`` may route through rules,
    and ``calls``, how many it did."""

    FUNCS: tuple = ()

    def __init__(self):
        super().__init__()
        self.calls = 0


class rules(torch.overrides.TorchFunctionMode):
    """``with rules(pool_rules(), conv_rules(), ...):`` -- the modes' rules, one dispatch per
    torch call.  The modes keep their own state (``calls``); their ``FUNCS`` must not overlap."""

    def __init__(self, *modes):
        super().__init__()
        self.modes = modes
        self._by_func = {}
        for mode in modes:
            for func in mode.FUNCS:
                if func in self._by_func:
                    raise ValueError(f"rules: {func} is handled by two modes")
                self._by_func[func] = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        mode = self._by_func.get(func)
        if mode is None:
            return func(*args, **(kwargs or {}))
        # this mode is off while its handler runs (torch pops it), as a stacked mode would be
        return mode.__torch_function__(func, types, args, kwargs)
