"""Commentary modules (DESIGN.md section 3).

Every module turns a training batch into the training loss's ingredients::

    batch = commentary.prepare(x, y, index=idx, progress=i / T)
    loss = commentary_loss(student(commentary(batch).x), commentary(batch))
    # or simply: loss = commentary.training_loss(student, batch)

* :class:`ExampleWeighting` (reference teacher network or any network),
  :class:`TabularWeighting` (one weight per training example);
* :class:`Blending` (learned ``C x C`` matrix; ``"none"``, ``"random"``,
  ``"mixup"`` baselines);
* :class:`AttentionMask` (U-Net -> centroid -> Gaussian mask -> masked blend).

:func:`train_loss_fn` / :func:`val_loss_fn` give the losses in the form the
hypergradient engine takes (``loss(params, hparams, batch)``).
"""
from .base import (  # noqa: F401
    BatchError,
    Commentary,
    NonFiniteError,
    Prepared,
    check_batch,
    commentary_loss,
    per_example_ce,
    plain_blend,
    plain_ops,
    reduce_loss,
    train_loss_fn,
    val_loss_fn,
    validation_loss,
)
from .blending import Blending, blend  # noqa: F401
from .masks import AttentionMask, SmallUNet, gaussian_blur  # noqa: F401
from .plots import plot_blending, plot_masks, plot_tabular_weights, plot_weights  # noqa: F401
from .weighting import ExampleWeighting, TabularWeighting, TeacherNet  # noqa: F401

KINDS = {
    "ExampleWeighting": ExampleWeighting,
    "TabularWeighting": TabularWeighting,
    "Blending": Blending,
    "AttentionMask": AttentionMask,
}

__all__ = [
    "AttentionMask", "BatchError", "Blending", "Commentary", "ExampleWeighting", "KINDS", "NonFiniteError",
    "Prepared", "SmallUNet", "TabularWeighting", "TeacherNet", "blend", "check_batch", "commentary_loss",
    "gaussian_blur", "per_example_ce", "plain_blend", "plain_ops", "plot_blending", "plot_masks", "plot_tabular_weights", "plot_weights",
    "reduce_loss", "train_loss_fn", "val_loss_fn", "validation_loss",
]
