"""The hypergradient engine (DESIGN.md section 2): implicit differentiation
(Algorithm 2) and backpropagation through training (Algorithm 1).

Conventions
-----------
State is explicit: the student's parameters ``params`` and the commentary's
parameters ``hparams`` are ``dict[str, Tensor]``; a batch is any object (a
tuple of tensors, a dict ...) passed through untouched.  Wrap a module with
:class:`FunctionalModule` to call it on such dicts::

    fm = FunctionalModule(student)           # BatchNorm in training mode included
    out = fm(params, x)                      # running stats are not touched
    out, new_buffers = fm.call_update(params, buffers, x)   # functional running-stat update

Losses must be deterministic functions of their arguments (put any random
permutation / partner index into the batch): the engine may call them more
than once.

Implicit differentiation
------------------------
::

    res = implicit_hypergradient(
        train_loss,            # (params, hparams, train_batch) -> scalar L_T
        val_loss,              # (params, hparams, val_batch)   -> scalar L_V
        params, hparams,       # dicts (theta-hat, phi); detached internally
        train_batch, val_batch,
        solver=NeumannConfig(K=5, alpha=1e-3)      # or alpha=None: from power iteration
              | CGConfig(max_iter=20),
        curvature="hessian" | "gauss_newton",
        hvp="auto" | "double_backward" | "forward_over_reverse",
        state=EngineState(),   # optional, keeps the lambda_max estimate between calls
        linearize=True,        # forward_over_reverse: trace once and reuse (False: eager jvp)
    )
    res.grads                  # dict like hparams: dL_V/dphi = direct - d(g_T . p)/dphi
    res.p, res.v, res.val_loss, res.info   # inverse-HVP vector, dL_V/dtheta, diagnostics

``train_loss`` may be a :class:`WeightedLoss` (``per_example(params, batch)``,
``weights(hparams, batch)``, reduction): the mixed term then uses one
forward-mode pass for the per-example ``grad l_i . p`` and one backward through
the commentary.  ``curvature="gauss_newton"`` needs a :class:`SplitLoss`
(``outputs(params, hparams, batch)``, ``head(z, hparams, batch)``, optional
``head_hvp``).  Divergence of the Neumann series (non-finite or growing terms)
is never silent: see :class:`NeumannConfig` ``on_divergence`` (warn + fallback
to power-iteration alpha and damping, raise, or truncate);
:class:`HypergradientDivergenceWarning` / :class:`HypergradientDivergenceError`.

HVP choice: ``"double_backward"`` builds the graph of ``g_T`` once and reuses it
for every product and the mixed term; ``"forward_over_reverse"`` traces
``jvp(grad)`` once per loss and shapes (``engine/linearize.py``) and runs only
the tangent part per product (~0.6x a double-backward product on the
ConvNet); ``"auto"`` takes double backward for up to two products (Neumann
K <= 2), the linearised form otherwise, and double backward whenever the loss
cannot be traced (data-dependent Python control flow).  Pass the same loss
callable every hyper-step so that the trace is reused.  A trace freezes what
the loss reads besides its arguments (Python numbers as literals, outside
tensors as constants), so it is reused only while that state is unchanged:
the globals its code names, its closure, its defaults and, for a bound method,
its object's attributes, followed three levels into containers, functions and
objects (``__dict__`` or ``__slots__``; numbers and strings by value, numpy
arrays by content, tensors by identity -- in-place changes are seen, except a
value read with ``.item()``, which the trace holds as a number --, modules by
identity, with every submodule's train/eval flag, plain attributes and which tensors
its parameters and buffers are); non-tensor
batch entries by value.  A loss that reads changing state deeper than that, or
through ``.item()``, needs ``hvp="double_backward"``.

CPU fast paths (same values and derivatives): ``implicit_hypergradient`` runs
inside ``commentaries_ext.memory.reuse_cpu_memory()`` (its products reuse freed
blocks instead of faulting in fresh pages); max pooling goes through ATen's
channels-last kernel (``engine/pooling.py``); a convolution's input gradient by
matmul + col2im where oneDNN's is measured slower for the shape, also inside graphs
that are differentiated twice (``engine/conv.py``, the col2im in C++: ``ops/fold.py``);
BatchNorm's forward-mode rules are ``engine/batchnorm.py``, and so is its reverse rule for a
double backward (also in the double-backward Hessian's graphs).  The rule modes
(``TorchFunctionMode``s that route a few ``torch.nn.functional`` calls) run as one mode,
``engine/rules.py``, so that a loss's other torch calls pay one Python dispatch, not one per
mode.

Several processes: ``implicit_hypergradient(..., reduce=ShardReducer(...))``
(``commentaries_ext.distributed``) combines ``v``, every Hessian-vector product,
the mixed term and the solvers' scalars over the ranks, so that the result is
the hypergradient of the union of the ranks' shards, the same on every rank;
``unroll(..., grad_reduce=reducer.train)`` likewise for each inner step.

Lower-level pieces: ``make_operator(loss, params, hparams, batch, curvature=,
hvp=, damping=)`` (``.grad()``, ``.matvec(c)``, ``.mixed(p)``),
``inverse_hvp(op, v, solver, state)``, ``neumann``, ``conjugate_gradient``,
``power_iteration``; list-of-tensor arithmetic in ``engine.vector``.

Backpropagation through training
--------------------------------
::

    res = unroll(
        loss_fn,               # (params, buffers, hparams, batch) -> scalar | (scalar, new_buffers)
        params0, Adam(lr=1e-4, decoupled_weight_decay=...) | SGD(lr, momentum=...) | from_torch(torch_opt),
        batches, steps=None,   # one batch per inner step (steps=T: the first T)
        hparams=hparams, buffers=buffers0,
        truncate=None | k,     # differentiate only the last k steps
        checkpoint=None | s,   # recompute activations per segment of s steps
    )
    L_V = val_loss(res.params, ...); phi_grads = torch.autograd.grad(L_V, list(hparams.values()))

``hparams`` tensors that require grad are differentiated through the whole
(tracked) trajectory; the inner optimisers reproduce ``torch.optim`` step by step
(``from_torch`` maps SGD, Adam and AdamW -- decoupled weight decay -- and refuses
others).  With ``steps=T`` only the first T items of ``batches`` are taken (an
endless iterator is fine).
Adam (float hyperparameters, no amsgrad) is one autograd node per step over all
parameters, on the ``adam_step`` kernel ops (``ops/solver.py``); the inner steps run
under the pooling and convolution fast paths above, and their ReLUs keep a bool mask
instead of their output (``engine/activation.py``).  Saved tensors that are cheap
functions of kept ones -- the first convolution's output, the pool-and-ReLU gradient,
a linear layer's weight gradient -- are kept as recipes and recomputed by the outer
backward (``engine/recompute.py``, ``engine/linear.py``): per unrolled step the
reference ConvNet keeps 1.8-2.1 MB and the MLP 3.25 MB, under half of ``higher``'s
(4.37 and 6.56 MB), with bit-identical (ConvNet) or rounding-equal (MLP) gradients.
BatchNorm in training mode keeps ATen's kernels forward and backward, but its double
backward -- the outer backward's share of each step -- is the reverse rule of
``engine/batchnorm.py`` (``batch_norm_reverse_rules``: one two-pass C++ kernel,
``ops/channel.py`` ``batch_norm_reverse``) instead of the stock formula's ~40 elementwise
passes.
"""
from .functional import FunctionalModule, random_modules_eval
from .hvp import ReducedOperator, SplitLoss, WeightedLoss, make_operator
from .implicit import (
    CGConfig,
    EngineState,
    HypergradientDivergenceError,
    HypergradientDivergenceWarning,
    HypergradResult,
    NeumannConfig,
    conjugate_gradient,
    implicit_hypergradient,
    inverse_hvp,
    neumann,
    power_iteration,
)
from .unroll import SGD, Adam, UnrollResult, from_torch, unroll
from . import vector

__all__ = [
    "FunctionalModule", "random_modules_eval", "ReducedOperator", "SplitLoss", "WeightedLoss", "make_operator",
    "CGConfig", "EngineState", "HypergradientDivergenceError", "HypergradientDivergenceWarning",
    "HypergradResult", "NeumannConfig", "conjugate_gradient", "implicit_hypergradient", "inverse_hvp",
    "neumann", "power_iteration", "SGD", "Adam", "UnrollResult", "from_torch", "unroll", "vector",
]
