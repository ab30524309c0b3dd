"""Plots of what a commentary learned; each function returns a matplotlib Figure."""
from __future__ import annotations

import torch


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        try:
            matplotlib.use("Agg", force=False)
        except Exception:
            pass
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def plot_weights(commentary, x, y, *, progress=(0.0, 0.25, 0.5, 0.75, 1.0), num_classes=None, title=None,
                 batch_size=None):
    """Network example weights: mean weight per class against training progress ``i/T``
    (left) and the weight distribution at the first and last progress (right).  The weights
    are those a student receives (``ExampleWeighting.weights``: the module's mode, training
    mode after learning, batches of ``batch_size``), not an eval-mode variant of them."""
    plt = _plt()
    ws = [commentary.weights(x, y, progress=float(t), batch_size=batch_size).float().cpu() for t in progress]
    C = num_classes or commentary.num_classes or int(y.max()) + 1
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4))
    yc = y.cpu()
    for c in range(C):
        sel = yc == c
        if sel.any():
            a0.plot(list(progress), [float(w[sel].mean()) for w in ws], marker="o", label=str(c))
    a0.set_xlabel("training progress i/T")
    a0.set_ylabel("mean weight")
    a0.legend(title="class", fontsize="small", ncol=2)
    a1.hist([ws[0].numpy(), ws[-1].numpy()], bins=20, label=[f"i/T={progress[0]}", f"i/T={progress[-1]}"])
    a1.set_xlabel("weight")
    a1.legend()
    fig.suptitle(title or "example weights")
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_tabular_weights(commentary, labels=None, *, title=None):
    """Tabular weights: per-example weights (sorted) and, given labels, per class."""
    plt = _plt()
    w = torch.sigmoid(commentary.logits.detach()).float().cpu()  # [N, bins]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4))
    for b in range(w.shape[1]):
        a0.plot(torch.sort(w[:, b]).values.numpy(), label=f"bin {b}")
    a0.set_xlabel("example (sorted)")
    a0.set_ylabel("weight")
    if w.shape[1] > 1:
        a0.legend(fontsize="small")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.shape != (w.shape[0],):
            raise ValueError(f"labels must hold the class of every training example (shape [{w.shape[0]}]), got "
                             f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
        labels = labels.cpu()
        C = int(labels.max()) + 1
        means = torch.stack([w[labels == c].mean(0) if (labels == c).any() else torch.zeros(w.shape[1])
                             for c in range(C)])
        im = a1.imshow(means.numpy(), aspect="auto", cmap="viridis")
        a1.set_xlabel("progress bin")
        a1.set_ylabel("class")
        fig.colorbar(im, ax=a1, label="mean weight")
    else:
        a1.hist(w.flatten().numpy(), bins=30)
        a1.set_xlabel("weight")
    fig.suptitle(title or "tabular example weights")
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_blending(commentary, class_names=None, *, title=None):
    """Heatmap of the learned blending coefficient ``lam[y_i, y_j]``."""
    plt = _plt()
    m = commentary.matrix().float().cpu().numpy()
    C = m.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(C)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * C, 0.8 + 0.5 * C))
    im = ax.imshow(m, cmap="magma", vmin=0.5, vmax=1.0)
    ax.set_xticks(range(C), names, rotation=90)
    ax.set_yticks(range(C), names)
    ax.set_xlabel("partner class y_j")
    ax.set_ylabel("class y_i")
    fig.colorbar(im, ax=ax, label="lambda (weight of x_i)")
    ax.set_title(title or "learned blending coefficients")
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_masks(commentary, x, *, max_images=8, title=None):
    """Grid: images, masks (with centroid) and the blended student inputs."""
    plt = _plt()
    x = x[:max_images]
    was = commentary.training
    commentary.eval()
    try:
        batch = commentary.prepare(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        prep = commentary(batch)
    finally:
        commentary.train(was)
    m, mu = prep.extras["mask"], prep.extras["centroid"]
    n = x.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    H, W = x.shape[-2:]

    def show(ax, img):
        img = img.float().cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray")
        else:
            img = (img - img.min()) / (img.max() - img.min() + 1e-12)
            ax.imshow(img[:3].permute(1, 2, 0).numpy())
        ax.axis("off")

    for i in range(n):
        show(axes[0, i], x[i])
        axes[1, i].imshow(m[i, 0].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        axes[1, i].plot([float(mu[i, 1]) * W - 0.5], [float(mu[i, 0]) * H - 0.5], "r+")
        axes[1, i].axis("off")
        show(axes[2, i], prep.x[i])
    axes[0, 0].set_title("image", loc="left", fontsize="small")
    axes[1, 0].set_title("mask", loc="left", fontsize="small")
    axes[2, 0].set_title("student input", loc="left", fontsize="small")
    fig.suptitle(title or "attention masks")
    fig.tight_layout()
    return fig
