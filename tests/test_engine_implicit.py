"""Implicit-differentiation engine vs dense float64 solves (ridge, logistic, MLP)."""
import math
import warnings

import pytest
import torch
from torch import nn

from commentaries_ext.engine import (
    CGConfig,
    EngineState,
    FunctionalModule,
    HypergradientDivergenceError,
    HypergradientDivergenceWarning,
    NeumannConfig,
    SplitLoss,
    WeightedLoss,
    implicit_hypergradient,
    make_operator,
    power_iteration,
)
from commentaries_ext.engine import vector as V

DT = torch.float64
HVPS = ["double_backward", "forward_over_reverse"]


def flat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


def unflat(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def dense_reference(train_loss, val_loss, params, hparams, tb, vb):
    """Exact IFT hypergradient: -(d g/d phi)^T H^-1 v + direct, all dense float64."""
    names, hnames = list(params), list(hparams)
    th0 = flat(params.values()).detach()
    ph0 = flat(hparams.values()).detach()

    def L(tv, pv):
        return train_loss(dict(zip(names, unflat(tv, params.values()))), dict(zip(hnames, unflat(pv, hparams.values()))), tb)

    def LV(tv, pv):
        return val_loss(dict(zip(names, unflat(tv, params.values()))), dict(zip(hnames, unflat(pv, hparams.values()))), vb)

    H = torch.autograd.functional.hessian(lambda t: L(t, ph0), th0)
    # mixed block d^2 L / dphi dtheta  [n_phi, n_theta]
    Mx = torch.autograd.functional.jacobian(lambda pv: torch.autograd.functional.jacobian(lambda t: L(t, pv), th0, create_graph=True), ph0)
    v, direct = torch.autograd.functional.jacobian(LV, (th0, ph0))
    p = torch.linalg.solve(H, v)
    hyper = direct - Mx.T @ p if Mx.dim() == 2 else direct - (Mx.reshape(-1, ph0.numel()).T @ p)
    return hyper, H, v, p


def as_flat_grads(res):
    return flat(res.grads.values())


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------- problems


def ridge_problem(seed=0, n=40, d=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = Xv @ torch.randn(d, generator=g, dtype=DT)
    phi = {"logwd": 0.3 * torch.randn(d, generator=g, dtype=DT)}

    def train_loss(p, h, b):
        X, y = b
        r = X @ p["w"] - y
        return 0.5 * (r * r).mean() + 0.5 * (torch.exp(h["logwd"]) * p["w"] ** 2).sum()

    def val_loss(p, h, b):
        X, y = b
        r = X @ p["w"] - y
        return 0.5 * (r * r).mean()

    A = X.T @ X / n + torch.diag(torch.exp(phi["logwd"]))
    w = torch.linalg.solve(A, X.T @ y / n)
    return train_loss, val_loss, {"w": w}, phi, (X, y), (Xv, yv)


def logistic_problem(seed=0, n=60, d=5, C=3):
    """Example-weighted multinomial logistic regression (WeightedLoss), trained to optimum."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = torch.randint(0, C, (n,), generator=g)
    phi = {"logits_w": 0.5 * torch.randn(n, generator=g, dtype=DT)}

    def per_example(p, b):
        X, y = b
        z = X @ p["W"] + p["b"]
        return nn.functional.cross_entropy(z, y, reduction="none") + 0.05 * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())

    def weights(h, b):
        return torch.sigmoid(h["logits_w"])

    loss = WeightedLoss(per_example, weights, reduction="mean")

    def val_loss(p, h, b):
        X, y = b
        return nn.functional.cross_entropy(X @ p["W"] + p["b"], y)

    params = {"W": torch.zeros(d, C, dtype=DT), "b": torch.zeros(C, dtype=DT)}
    params = newton_fit(lambda q: loss(q, phi, (X, y)), params)
    return loss, val_loss, params, phi, (X, y), (Xv, yv)


def newton_fit(f, params, iters=30):
    names = list(params)
    like = list(params.values())
    t = flat(like).clone()
    for _ in range(iters):
        fn = lambda v: f(dict(zip(names, unflat(v, like))))  # noqa: E731
        gr = torch.autograd.functional.jacobian(fn, t)
        H = torch.autograd.functional.hessian(fn, t)
        t = t - torch.linalg.solve(H, gr)
        if gr.norm() < 1e-13:
            break
    return dict(zip(names, [x.clone() for x in unflat(t, like)]))


def mlp_problem(seed=0):
    """A small tanh MLP with blending-style commentary on the loss (phi enters
    through per-example mixing of two targets) at a trained optimum."""
    torch.manual_seed(seed)
    n, d, h, C = 32, 4, 5, 3
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = torch.randint(0, C, (n,), generator=g)
    net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C)).to(DT)
    fm = FunctionalModule(net)
    phi = {"phi": -torch.ones(C, C, dtype=DT) + 0.2 * torch.randn(C, C, generator=g, dtype=DT)}

    def train_loss(p, hp, b):
        X, y, perm = b
        lam = 1 - 0.5 * torch.sigmoid(hp["phi"][y, y[perm]])
        xt = lam[:, None] * X + (1 - lam[:, None]) * X[perm]
        z = fm(p, xt)
        ce = lam * nn.functional.cross_entropy(z, y, reduction="none") + (1 - lam) * nn.functional.cross_entropy(z, y[perm], reduction="none")
        wd = sum((w**2).sum() for w in p.values())
        return ce.mean() + 1e-2 * wd

    def val_loss(p, hp, b):
        X, y = b
        return nn.functional.cross_entropy(fm(p, X), y)

    params = {k: v.detach().clone() for k, v in fm.params().items()}
    tb = (X, y, perm)
    params = newton_fit(lambda q: train_loss(q, phi, tb), lbfgs_fit(lambda q: train_loss(q, phi, tb), params), iters=20)
    return train_loss, val_loss, params, phi, tb, (Xv, yv)


def lbfgs_fit(f, params):
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(list(ps.values()), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        L = f(ps)
        L.backward()
        return L

    opt.step(closure)
    return {k: v.detach() for k, v in ps.items()}


PROBLEMS = {"ridge": ridge_problem, "logistic": logistic_problem, "mlp": mlp_problem}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    prob = PROBLEMS[request.param]()
    ref = dense_reference(*prob)
    return request.param, prob, ref


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hvp", HVPS)
def test_neumann_many_terms_matches_dense(problem, hvp):
    name, (tl, vl, params, phi, tb, vb), (hyper, H, v, p) = problem
    evals = torch.linalg.eigvalsh(H)
    assert evals.min() > 0, "test problem must be at a strict minimum"
    alpha = 1.0 / float(evals.max())
    rho = 1 - alpha * float(evals.min())
    K = int(math.ceil(math.log(1e-9) / math.log(rho)))
    assert K < 3000
    res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=K, alpha=alpha), hvp=hvp)
    assert rel(as_flat_grads(res), hyper) < 1e-6
    assert rel(flat(res.p), p) < 1e-6
    assert not res.info["diverged"]


@pytest.mark.parametrize("hvp", HVPS)
def test_cg_matches_within_dim_iterations(problem, hvp):
    name, (tl, vl, params, phi, tb, vb), (hyper, H, v, p) = problem
    dim = H.shape[0]
    res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=CGConfig(max_iter=dim, tol=1e-12), hvp=hvp)
    assert res.info["iterations"] <= dim
    assert rel(as_flat_grads(res), hyper) < 1e-6


def test_neumann_error_follows_bound(problem):
    name, (tl, vl, params, phi, tb, vb), (hyper, H, v, p) = problem
    evals = torch.linalg.eigvalsh(H)
    alpha = 1.0 / float(evals.max())
    rho = float((1 - alpha * evals).abs().max())
    for K in (0, 1, 5, 20):
        res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=K, alpha=alpha), hvp="double_backward")
        err = float((flat(res.p) - p).norm())
        bound = rho ** (K + 1) * float(p.norm())
        assert err <= bound * (1 + 1e-9) + 1e-14, (K, err, bound)
        # and it is the exact truncated series (I - aH)^(K+1) H^-1 v away from p
        A = torch.eye(H.shape[0], dtype=DT) - alpha * H
        exact_err = torch.linalg.matrix_power(A, K + 1) @ p
        assert torch.allclose(p - flat(res.p), exact_err, rtol=1e-8, atol=1e-12)


def test_auto_alpha_power_iteration(problem):
    name, (tl, vl, params, phi, tb, vb), (hyper, H, v, p) = problem
    lam_max = float(torch.linalg.eigvalsh(H).max())
    state = EngineState()
    res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=50, alpha=None, power_iters=100), state=state)
    assert abs(state.lambda_max - lam_max) / lam_max < 1e-2
    assert not res.info["diverged"] and torch.isfinite(as_flat_grads(res)).all()
    n0 = res.info["n_matvec"]
    # a re-estimate warm-starts from the eigenvector: few products
    res2 = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=50, alpha=None, reestimate_every=1, power_iters_warm=3), state=state)
    assert res2.info["n_matvec"] <= 50 + 3 < n0


def test_bad_alpha_is_caught(problem):
    name, (tl, vl, params, phi, tb, vb), (hyper, H, v, p) = problem
    lam_max = float(torch.linalg.eigvalsh(H).max())
    bad = NeumannConfig(K=30, alpha=5.0 / lam_max, on_divergence="raise")
    with pytest.raises(HypergradientDivergenceError):
        implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=bad)
    # default: warning + fallback to a power-iteration alpha; the result is finite and close
    with pytest.warns(HypergradientDivergenceWarning):
        res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=2000, alpha=5.0 / lam_max, power_iters=200))
    assert res.info["fallback"] and torch.isfinite(as_flat_grads(res)).all()
    assert rel(as_flat_grads(res), hyper) < 1e-4
    with pytest.warns(HypergradientDivergenceWarning):
        res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=30, alpha=5.0 / lam_max, on_divergence="truncate"))
    assert torch.isfinite(as_flat_grads(res)).all()
    # non-finite alpha products are caught too
    with pytest.raises(HypergradientDivergenceError):
        implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=3, alpha=float("inf"), on_divergence="raise"))


def indefinite_problem():
    """L_T = 1/2 th^T A th - (b * exp(phi)) . th with A indefinite."""
    A = torch.diag(torch.tensor([3.0, 1.0, -0.5, 2.0], dtype=DT))
    b = torch.tensor([1.0, -1.0, 0.5, 0.3], dtype=DT)

    def tl(p, h, bt):
        return 0.5 * p["t"] @ A @ p["t"] - (b * torch.exp(h["phi"])) @ p["t"]

    def vl(p, h, bt):
        return (p["t"] ** 2).sum()

    th = torch.linalg.solve(A, b)  # a saddle point
    return tl, vl, {"t": th}, {"phi": torch.zeros(4, dtype=DT)}


def test_indefinite_hessian_is_caught():
    tl, vl, params, phi = indefinite_problem()
    with pytest.raises(HypergradientDivergenceError):
        implicit_hypergradient(tl, vl, params, phi, solver=NeumannConfig(K=200, alpha=0.3, on_divergence="raise"))
    with pytest.warns(HypergradientDivergenceWarning, match="damping"):
        res = implicit_hypergradient(tl, vl, params, phi, solver=NeumannConfig(K=400, alpha=0.3, power_iters=100))
    assert res.info["damping"] > 0.5 and torch.isfinite(as_flat_grads(res)).all()
    with pytest.raises(HypergradientDivergenceError):
        implicit_hypergradient(tl, vl, params, phi, solver=CGConfig(max_iter=4, on_divergence="raise"))
    with pytest.warns(HypergradientDivergenceWarning):
        implicit_hypergradient(tl, vl, params, phi, solver=CGConfig(max_iter=4))


def test_fallback_that_still_grows_keeps_the_partial_sum():
    """Two power iterations underestimate |lambda_min| (-0.5): the damped series still grows.
    The fallback warns and returns the damped partial sum up to the last non-growing term
    (it used to raise and end the training run)."""
    tl, vl, params, phi = indefinite_problem()
    with pytest.warns(HypergradientDivergenceWarning, match="still grows after the fallback") as rec:
        res = implicit_hypergradient(tl, vl, params, phi, solver=NeumannConfig(K=400, alpha=0.3, power_iters=2))
    info = res.info
    n = info["terms_used"]  # the message counts what p holds: v and n - 1 products
    assert f"first {n} terms (v and {n - 1} products)" in str(rec[-1].message)
    assert info["fallback"] and info["diverged"] and 0 < info["terms_used"] < 400
    assert 0 < info["damping"] < 0.5  # not enough to make A + delta I positive definite
    A = torch.diag(torch.tensor([3.0, 1.0, -0.5, 2.0], dtype=DT)) + info["damping"] * torch.eye(4, dtype=DT)
    v = 2 * params["t"]  # dL_V / dtheta
    M = torch.eye(4, dtype=DT) - info["alpha"] * A
    expected = info["alpha"] * sum(torch.linalg.matrix_power(M, j) @ v for j in range(info["terms_used"]))
    assert torch.allclose(flat(res.p), expected, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(as_flat_grads(res)).all()


def test_inverse_hvp_keeps_the_operators_damping():
    """make_operator(damping=d) then inverse_hvp with an undamped solver solves (H + d I) p = v
    (the solver's damping adds to it) and leaves op.damping as it was (found by a review:
    the solver's 0 replaced it)."""
    from commentaries_ext.engine import inverse_hvp

    tl, vl, params, phi, tb, vb = ridge_problem(1)
    hyper, H, v, p = dense_reference(tl, vl, params, phi, tb, vb)
    op = make_operator(tl, params, phi, tb, damping=2.0, hvp="double_backward")
    vv = unflat(v, list(params.values()))
    eye = torch.eye(H.shape[0], dtype=DT)
    got, info = inverse_hvp(op, vv, CGConfig(max_iter=50, tol=1e-14))
    assert rel(flat(got), torch.linalg.solve(H + 2.0 * eye, v)) < 1e-10 and op.damping == 2.0
    got, info = inverse_hvp(op, vv, CGConfig(max_iter=50, tol=1e-14, damping=0.5))
    assert rel(flat(got), torch.linalg.solve(H + 2.5 * eye, v)) < 1e-10 and op.damping == 2.0


def test_cg_first_direction_without_curvature_returns_zero():
    """v^T H v <= 0 on CG's first direction: p = 0 (the last iterate, as documented), so the
    hypergradient is the direct term; it used to be p = v, here of the wrong sign."""
    Hm = torch.diag(torch.tensor([-1.0, 1e3, 1e3], dtype=DT))

    def tl(p, h, b):
        return 0.5 * p["w"] @ Hm @ p["w"] + 0.5 * h["s"] * (p["w"] ** 2).sum() - (p["w"] * h["s"]).sum()

    def vl(p, h, b):
        return 5.0 * p["w"][0] + h["s"] ** 2

    params, hp = {"w": torch.zeros(3, dtype=DT)}, {"s": torch.tensor(0.5, dtype=DT)}  # H = diag(-0.5, ...)
    with pytest.warns(HypergradientDivergenceWarning, match="returning p = 0"):
        res = implicit_hypergradient(tl, vl, params, hp, solver=CGConfig(max_iter=10))
    assert float(flat(res.p).abs().max()) == 0.0
    assert torch.allclose(res.grads["s"], torch.tensor(1.0, dtype=DT))  # d(s^2)/ds, the direct term
    with pytest.raises(HypergradientDivergenceError, match="non-positive curvature") as e:
        implicit_hypergradient(tl, vl, params, hp, solver=CGConfig(max_iter=10, on_divergence="raise"))
    assert "returning" not in str(e.value)


def test_loss_mistakes_get_errors_that_name_the_loss():
    tl, vl, params, phi, tb, vb = ridge_problem(2)
    run = lambda t, v, **kw: implicit_hypergradient(t, v, params, phi, tb, vb, solver=CGConfig(max_iter=5), **kw)  # noqa: E731
    with pytest.raises(TypeError, match="val_loss must return a scalar tensor, got float"):
        run(tl, lambda p, h, b: 0.0)
    with pytest.raises(ValueError, match="val_loss depends on neither params nor hparams"):
        run(tl, lambda p, h, b: torch.tensor(1.0, dtype=DT))
    for hvp, lin in (("double_backward", True), ("forward_over_reverse", True), ("forward_over_reverse", False)):
        with pytest.raises(ValueError, match=r"train_loss must return a scalar tensor \(one element\), got shape \(3,\)"):
            run(lambda p, h, b: tl(p, h, b) * torch.ones(3, dtype=DT), vl, hvp=hvp, linearize=lin)
        # a one-element loss of shape [1] is a scalar on every path (forward-over-reverse refused it)
        one = run(lambda p, h, b: tl(p, h, b).reshape(1), vl, hvp=hvp, linearize=lin)
        assert rel(as_flat_grads(one), as_flat_grads(run(tl, vl, hvp=hvp, linearize=lin))) < 1e-12


def test_inverse_hvp_takes_an_operator_without_damping():
    """A user's operator needs only matvec (inverse_hvp read op.damping first and raised)."""
    from commentaries_ext.engine import inverse_hvp

    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)

    class Op:
        def matvec(self, c):
            return [A @ c[0] + getattr(self, "damping", 0.0) * c[0]]

    v = [torch.tensor([1.0, -1.0], dtype=DT)]
    p, _ = inverse_hvp(Op(), v, CGConfig(max_iter=10, tol=1e-14, damping=0.5))
    assert torch.allclose(p[0], torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=DT), v[0]))


def test_frozen_params_and_a_foreign_engine_state_are_reported():
    tl, vl, params, phi, tb, vb = logistic_problem(3)
    assert len(params) == 2
    mixed = {k: t.detach().requires_grad_(i == 0) for i, (k, t) in enumerate(params.items())}
    with pytest.warns(UserWarning, match="do not require grad"):
        implicit_hypergradient(tl, vl, mixed, phi, tb, vb, solver=CGConfig(max_iter=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all detached: no warning
        implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=CGConfig(max_iter=5))
    tl, vl, params, phi, tb, vb = ridge_problem(3)
    state = EngineState()
    implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=2, alpha=None), state=state)
    tl2, vl2, params2, phi2, tb2, vb2 = ridge_problem(3, d=4)
    with pytest.raises(ValueError, match="one EngineState per problem"):
        implicit_hypergradient(tl2, vl2, params2, phi2, tb2, vb2, solver=NeumannConfig(K=2, alpha=None), state=state)


def test_damping_matches_dense():
    tl, vl, params, phi, tb, vb = ridge_problem(1)
    delta = 0.37
    op = make_operator(tl, params, phi, tb, damping=delta, hvp="double_backward")
    hyper, H, v, p = dense_reference(tl, vl, params, phi, tb, vb)
    pd = torch.linalg.solve(H + delta * torch.eye(H.shape[0], dtype=DT), v)
    res = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=CGConfig(max_iter=20, damping=delta, tol=1e-14))
    assert rel(flat(res.p), pd) < 1e-8
    c = [torch.ones_like(t) for t in params.values()]
    assert torch.allclose(flat(op.matvec(c)), (H + delta * torch.eye(H.shape[0], dtype=DT)) @ flat(c))


@pytest.mark.parametrize("reduction", ["sum", "mean", "normalized"])
def test_weighted_fast_path_equals_general(reduction):
    tl, vl, params, phi, tb, vb = logistic_problem(2)
    tl = WeightedLoss(tl.per_example, tl.weights, reduction)
    general = lambda p, h, b: tl(p, h, b)  # noqa: E731  (a plain callable: no fast path)
    for hvp in HVPS:
        a = implicit_hypergradient(tl, vl, params, phi, tb, vb, solver=NeumannConfig(K=3, alpha=0.5), hvp=hvp)
        b = implicit_hypergradient(general, vl, params, phi, tb, vb, solver=NeumannConfig(K=3, alpha=0.5), hvp=hvp)
        assert rel(as_flat_grads(a), as_flat_grads(b)) < 1e-10


def test_gauss_newton_linear_model_equals_hessian():
    """For logits linear in theta the Gauss-Newton matrix is the Hessian."""
    tl, vl, params, phi, tb, vb = logistic_problem(3)

    def outputs(p, h, b):
        return b[0] @ p["W"] + p["b"]

    def head(z, h, b):
        X, y = b
        w = torch.sigmoid(h["logits_w"])
        return (w * nn.functional.cross_entropy(z, y, reduction="none")).mean()

    split = SplitLoss(outputs, head)
    gn = make_operator(split, params, phi, tb, curvature="gauss_newton")
    hs = make_operator(split, params, phi, tb, curvature="hessian", hvp="double_backward")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        c = [torch.randn(t.shape, generator=g, dtype=DT) for t in params.values()]
        assert torch.allclose(flat(gn.matvec(c)), flat(hs.matvec(c)), rtol=1e-10, atol=1e-12)
    assert torch.allclose(flat(gn.grad()), flat(hs.grad()))


def test_gauss_newton_is_psd_on_mlp():
    tl, vl, params, phi, tb, vb = mlp_problem(1)
    X, y, perm = tb
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    fm = FunctionalModule(net)
    split = SplitLoss(lambda p, h, b: fm(p, b[0]), lambda z, h, b: nn.functional.cross_entropy(z, b[1]))
    gn = make_operator(split, params, phi, tb, curvature="gauss_newton")
    n = sum(t.numel() for t in params.values())
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=DT)
        e[i] = 1
        cols.append(flat(gn.matvec(unflat(e, list(params.values())))))
    G = torch.stack(cols, 1)
    assert torch.allclose(G, G.T, atol=1e-10)
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    res = implicit_hypergradient(split, lambda p, h, b: nn.functional.cross_entropy(fm(p, b[0]), b[1]), params, phi, tb, vb,
                                 solver=CGConfig(max_iter=n, damping=1e-3), curvature="gauss_newton")
    assert torch.isfinite(as_flat_grads(res)).all()


def bn_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4))


def test_batchnorm_train_mode_hvps_agree_and_do_not_touch_running_stats():
    torch.manual_seed(0)
    net = bn_net().to(DT).train()
    fm = FunctionalModule(net)
    before = {k: v.clone() for k, v in fm.buffers().items()}
    x = torch.randn(8, 1, 6, 6, dtype=DT)
    y = torch.randint(0, 4, (8,))
    phi = {"s": torch.tensor(0.3, dtype=DT)}

    def tl(p, h, b):
        # phi enters through the input as well as the loss scale (as blending does)
        return torch.exp(h["s"]) * nn.functional.cross_entropy(fm(p, b[0] * (1 + h["s"])), b[1])

    params = fm.params()
    c = [torch.randn_like(t) for t in params.values()]
    ops = {m: make_operator(tl, params, phi, (x, y), hvp=m) for m in HVPS}
    hcs = {m: flat(op.matvec(c)) for m, op in ops.items()}
    ref = torch.autograd.functional.hvp(lambda *ts: tl(dict(zip(params, ts)), phi, (x, y)), tuple(params.values()), tuple(c))[1]
    for m in HVPS:
        assert torch.allclose(hcs[m], flat(ref), rtol=1e-9, atol=1e-11), m
        assert torch.allclose(flat(ops[m].mixed(c)), flat(ops["double_backward"].mixed(c)), rtol=1e-9, atol=1e-12)
    # the mixed term against central finite differences of g_T . c
    def gdot(s):
        op = make_operator(tl, params, {"s": torch.tensor(s, dtype=DT)}, (x, y), hvp="double_backward")
        return float(sum((g * ci).sum() for g, ci in zip(op.grad(), c)))

    fd = (gdot(0.3 + 1e-6) - gdot(0.3 - 1e-6)) / 2e-6
    assert abs(float(flat(ops["forward_over_reverse"].mixed(c))) - fd) < 1e-6 * max(1.0, abs(fd))
    for k, v in fm.buffers().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_ops(fused, dtype):
    previous, calibrate = V.use_fused(fused), V.CALIBRATE
    V.CALIBRATE = False  # exercise the fused kernels even where the foreach path is faster
    try:
        _check_vector_ops(dtype)
    finally:
        V.CALIBRATE = calibrate
        V.use_fused(previous)


def _check_vector_ops(dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    ys = [torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    fx, fy = flat(xs), flat(ys)
    assert torch.allclose(V.dot(xs, ys), fx @ fy, atol=1e-5)
    assert torch.allclose(V.norm(xs), fx.norm(), atol=1e-5)
    c, p, h = V.clone(xs), V.clone(ys), [torch.ones_like(t) for t in xs]
    V.neumann_step_(c, p, h, 0.25)
    assert torch.allclose(flat(c), fx - 0.25, atol=1e-6)
    assert torch.allclose(flat(p), fy + fx - 0.25, atol=1e-6)
    yy = V.clone(ys)
    d = V.axpy_dot_(yy, 2.0, xs, xs)
    assert torch.allclose(flat(yy), fy + 2 * fx, atol=1e-6)
    assert torch.allclose(d, (fy + 2 * fx) @ fx, atol=1e-4)
    yy = V.clone(ys)
    d = V.axpy_dot_(yy, -1.0, xs)
    assert torch.allclose(d, (fy - fx) @ (fy - fx), atol=1e-4)
    x0, r0 = V.clone(xs), V.clone(ys)
    q = [2 * t for t in xs]
    rr = V.cg_update_(x0, r0, ys, q, 0.5)
    assert torch.allclose(flat(x0), fx + 0.5 * fy, atol=1e-6)
    assert torch.allclose(flat(r0), fy - fx, atol=1e-6)
    assert torch.allclose(rr.to(dtype), (fy - fx) @ (fy - fx), atol=1e-4)
    # isfinite: the fused sum of squares first, the elementwise check where it is not finite
    big = torch.finfo(dtype).max / 4  # finite, but its square overflows
    assert V.isfinite(xs) and V.isfinite([]) and V.isfinite([None, torch.empty(0, dtype=dtype)])
    assert V.isfinite(xs + [torch.full((3,), big, dtype=dtype)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        ys_bad = V.clone(ys)
        ys_bad[1][3] = bad
        assert not V.isfinite(xs + ys_bad)


def test_power_iteration_on_dense():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.tensor([5.0, 2, 1, 0.5, 0.1, 0.01], dtype=DT)) @ Q.T
    lam, vec, used = power_iteration(lambda c: [A @ c[0]], [torch.zeros(6, dtype=DT)], iters=200, tol=1e-12)
    assert abs(lam - 5.0) < 1e-8


def small_convnet():
    return nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Flatten(), nn.Linear(3, 4))


def blend_setup(seed=0):
    torch.manual_seed(seed)
    net = small_convnet().to(DT).train()
    fm = FunctionalModule(net)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 4, (8,), generator=g)
    perm = torch.randperm(8, generator=g)

    def tl(p, h, b):
        x, y, perm = b
        lam = 1 - 0.5 * torch.sigmoid(h["phi"][y, y[perm]])
        xt = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
        z = fm(p, xt)
        return (lam * nn.functional.cross_entropy(z, y, reduction="none")
                + (1 - lam) * nn.functional.cross_entropy(z, y[perm], reduction="none")).mean()

    phi = {"phi": -torch.ones(4, 4, dtype=DT) + 0.1 * torch.randn(4, 4, generator=g, dtype=DT)}
    return fm, tl, phi, (x, y, perm)


def test_linearized_forward_over_reverse_matches_and_is_cached():
    from commentaries_ext.engine import linearize as LZ

    LZ._FALLBACK_CACHE.clear()  # the counts below would stall at the cache's capacity after other tests
    fm, tl, phi, batch = blend_setup()
    params = fm.params()
    c = [torch.randn_like(t) for t in params.values()]
    db = make_operator(tl, params, phi, batch, hvp="double_backward")
    eager = make_operator(tl, params, phi, batch, hvp="forward_over_reverse", linearize=False)
    lin = make_operator(tl, params, phi, batch, hvp="forward_over_reverse")
    assert lin._lin is not None and eager._lin is None
    for op in (eager, lin):
        assert torch.allclose(flat(op.matvec(c)), flat(db.matvec(c)), rtol=1e-10, atol=1e-12)
        assert torch.allclose(flat(op.mixed(c)), flat(db.mixed(c)), rtol=1e-10, atol=1e-12)
        assert torch.allclose(flat(op.grad()), flat(db.grad()), rtol=1e-10, atol=1e-12)
    n = len(LZ._FALLBACK_CACHE)
    # new params / batch values with the same shapes: the trace is reused and still exact
    params2 = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    x2 = torch.randn_like(batch[0])
    batch2 = (x2, batch[1], torch.randperm(8))
    lin2 = make_operator(tl, params2, phi, batch2, hvp="forward_over_reverse")
    db2 = make_operator(tl, params2, phi, batch2, hvp="double_backward")
    assert len(LZ._FALLBACK_CACHE) == n
    assert torch.allclose(flat(lin2.matvec(c)), flat(db2.matvec(c)), rtol=1e-10, atol=1e-12)
    assert torch.allclose(flat(lin2.mixed(c)), flat(db2.mixed(c)), rtol=1e-10, atol=1e-12)
    # eval mode changes the graph: a new trace
    fm.module.eval()
    try:
        lin3 = make_operator(tl, params2, phi, batch2, hvp="forward_over_reverse")
        db3 = make_operator(tl, params2, phi, batch2, hvp="double_backward")
        assert len(LZ._FALLBACK_CACHE) == n + 1
        assert torch.allclose(flat(lin3.matvec(c)), flat(db3.matvec(c)), rtol=1e-10, atol=1e-12)
    finally:
        fm.module.train()


def test_auto_falls_back_for_data_dependent_loss():
    def tl(p, h, b):
        w = p["w"]
        if float(w.sum()) > 0:  # data-dependent Python control flow: not traceable
            return (h["a"] * w**4).sum()
        return (h["a"] * w**2).sum()

    params = {"w": torch.tensor([0.5, 1.0], dtype=DT)}
    hp = {"a": torch.tensor([1.0, 2.0], dtype=DT)}
    with pytest.warns(UserWarning, match="double backward"):
        op = make_operator(tl, params, hp, None, hvp="auto")
    assert type(op).__name__ == "DoubleBackwardHessian"
    c = [torch.ones(2, dtype=DT)]
    assert torch.allclose(op.matvec(c)[0], 12 * hp["a"] * params["w"] ** 2)


_WD = 0.1  # read by a loss below as a module-level constant


def _stale_problem():
    torch.manual_seed(0)
    X, y = torch.randn(30, 4, dtype=DT), torch.randn(30, dtype=DT)
    params = {"w": torch.randn(4, dtype=DT)}
    hparams = {"l2": torch.full((4,), 0.3, dtype=DT)}

    def vl(p, h, b):
        return ((p["w"] - 1.0) ** 2).sum()

    def data_term(p, b):
        Xb, yb = (torch.as_tensor(b["x"]), torch.as_tensor(b["y"])) if isinstance(b, dict) and "x" in b else (X, y)
        return ((Xb @ p["w"] - yb) ** 2).mean()

    return params, hparams, vl, data_term


def _traced_and_eager(tl, vl, params, hparams, batch):
    kw = dict(solver=NeumannConfig(K=3, alpha=0.05))
    lin = implicit_hypergradient(tl, vl, params, hparams, batch, None, hvp="forward_over_reverse", **kw)
    db = implicit_hypergradient(tl, vl, params, hparams, batch, None, hvp="double_backward", **kw)
    return as_flat_grads(lin), as_flat_grads(db)


def test_traced_hvp_follows_state_the_loss_reads():
    """The linearised HVP's trace freezes Python numbers and outside tensors: a loss reading a
    changed module global, attribute, container entry or numpy batch must be traced again, not
    reuse the old values (found by a review: relative errors of 0.2 to 9 without a warning)."""
    global _WD
    params, hparams, vl, data_term = _stale_problem()

    def tl_global(p, h, b):
        return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + _WD * (p["w"] ** 4).sum()

    class Problem:
        wd = 0.1

        def tl(self, p, h, b):
            return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + self.wd * (p["w"] ** 4).sum()

    cfg = {"wd": 0.1}

    def tl_dict(p, h, b):
        return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + cfg["wd"] * (p["w"] ** 4).sum()

    class ListProblem:  # a list attribute of a bound method's object
        def __init__(self):
            self.k = [0.1]

        def tl(self, p, h, b):
            return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + self.k[0] * (p["w"] ** 4).sum()

    class Slotted:  # __slots__, no __dict__
        __slots__ = ("wd",)

        def __init__(self):
            self.wd = 0.1

    slotted = Slotted()

    def tl_slots(p, h, b):
        return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + slotted.wd * (p["w"] ** 4).sum()

    scale_mod = nn.Identity()
    scale_mod.wd = 0.1  # a plain attribute of a module

    def tl_module(p, h, b):
        return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + scale_mod.wd * (p["w"] ** 4).sum()

    prob, lprob = Problem(), ListProblem()
    old = _WD
    try:
        for wd in (0.1, 3.0):
            _WD, prob.wd, cfg["wd"], lprob.k[0], slotted.wd, scale_mod.wd = wd, wd, wd, wd, wd, wd
            for tl in (tl_global, prob.tl, tl_dict, lprob.tl, tl_slots, tl_module):
                lin, db = _traced_and_eager(tl, vl, params, hparams, None)
                assert rel(lin, db) < 1e-12, (wd, tl)
    finally:
        _WD = old
    # numpy arrays in the batch whose repr() is the same (only the first and last rows print)
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    x1, y1 = rng.normal(size=(2000, 4)), rng.normal(size=2000)
    x2, y2 = x1.copy(), y1.copy()
    x2[3:-3] *= 3.0
    assert repr(x1) == repr(x2)
    for b in ({"x": x1, "y": y1}, {"x": x2, "y": y2}):
        lin, db = _traced_and_eager(tl_global, vl, params, hparams, b)
        assert rel(lin, db) < 1e-12


def test_traced_hvp_reused_while_the_state_is_unchanged():
    """A loss re-created every call over the same objects still reuses its trace."""
    from commentaries_ext.engine import linearize as LZ

    params, hparams, vl, data_term = _stale_problem()
    cfg = {"wd": 0.2}

    def make():
        def tl(p, h, b):
            return data_term(p, b) + (h["l2"] * p["w"] ** 2).sum() + cfg["wd"] * (p["w"] ** 4).sum()
        return tl

    LZ.clear_cache()
    try:
        for _ in range(3):
            implicit_hypergradient(make(), vl, params, hparams, None, None, solver=NeumannConfig(K=3, alpha=0.05),
                                   hvp="forward_over_reverse")
        assert len(LZ._FALLBACK_CACHE) == 1
        # non-tensor batch entries equal in value but new objects every call (a slice, a device)
        tl = make()
        for _ in range(3):
            batch = {"rows": slice(0, 30), "device": torch.device("cpu")}
            implicit_hypergradient(tl, vl, params, hparams, batch, None, solver=NeumannConfig(K=3, alpha=0.05),
                                   hvp="forward_over_reverse")
        assert len(LZ._FALLBACK_CACHE) == 2
    finally:
        LZ.clear_cache()


def test_trace_check_tolerates_rounding_noise_of_zero_gradients():
    """The U-Net's last bias before the spatial softmax has a zero mixed term, rounding noise of
    long float32 sums in both computations (numbers from a learn_ift run where the check
    refused the trace); a real disagreement is still found, also in a small tensor."""
    from commentaries_ext.engine import linearize as LZ

    big = torch.tensor([0.212, -0.1])
    zero_ref, zero_got = torch.tensor([7.75e-7]), torch.tensor([7.75e-7 - 2.68e-7])
    assert LZ._first_mismatch(["w", "b"], [big.clone(), zero_got], [big, zero_ref]) is None
    big2 = torch.tensor([0.186, 0.05])  # another run: noise 2.52e-6 on 1.34e-6
    zero_ref, zero_got = torch.tensor([1.34e-6]), torch.tensor([1.34e-6 - 2.52e-6])
    assert LZ._first_mismatch(["w", "b"], [big2.clone(), zero_got], [big2, zero_ref]) is None
    assert LZ._first_mismatch(["w", "b"], [big.clone(), torch.tensor([2e-3])], [big, torch.tensor([1e-3])]) == "b"
    assert LZ._first_mismatch(["w", "b"], [big * 1.001, zero_ref], [big, zero_ref]) == "w"


def test_separate_runs_do_not_trip_the_retrace_guard():
    """Each run (a new wrapper, learn_ift call or model) traces its loss once and then reuses
    the trace: runs in one process never switch to double backward; a loss that captures new
    objects at every call (a miss every time) still does."""
    from commentaries_ext.engine import linearize as LZ

    def make_loss(scale):
        s = torch.tensor(scale, dtype=DT)  # a new captured object per run

        def tl(p, h, b):
            return (h["a"] * s * p["w"] ** 4).sum()
        return tl

    params = {"w": torch.tensor([0.5, 1.0], dtype=DT)}
    hp = {"a": torch.tensor([1.0, 2.0], dtype=DT)}
    LZ.clear_cache()
    try:
        for run in range(3 * LZ.MAX_TRACES_PER_CODE):
            tl = make_loss(1.0 + run)
            for _ in range(2):  # the run's hyper-steps: a trace, then a reuse
                op = LZ.linearized_hvp(tl, params, hp, None, auto=True)
            c = [torch.ones(2, dtype=DT)]
            assert torch.allclose(op.hvp(c)[0], 12 * (1.0 + run) * hp["a"] * params["w"] ** 2)
        with pytest.raises(LZ.TooManyTraces):
            for run in range(LZ.MAX_TRACES_PER_CODE + 1):
                LZ.linearized_hvp(make_loss(100.0 + run), params, hp, None, auto=True)
    finally:
        LZ.clear_cache()


@pytest.mark.parametrize("with_bn", [True, False])
def test_auto_with_few_products_uses_the_linearised_product_only_with_batch_norm(with_bn):
    """hvp="auto" for one product: the linearised forward-over-reverse operator when the
    trace runs BatchNorm's forward-mode rules (cheaper there, BENCHMARKS.md), double backward
    otherwise; decided once per loss code from its first trace, and the products are right."""
    from commentaries_ext.engine import FunctionalModule
    from commentaries_ext.engine import hvp as H

    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if with_bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    fm = FunctionalModule(nn.Sequential(*layers).double().train())
    params = fm.params()
    phi = {"s": torch.tensor(0.7, dtype=DT)}
    batch = (torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))

    def tl(p, h, b):
        return h["s"] * nn.functional.cross_entropy(fm(p, b[0]), b[1])

    H._FEW_PRODUCTS_LINEARIZED.pop(H._code_of(tl), None)  # both parametrisations share tl's code
    want = "ForwardOverReverseHessian" if with_bn else "DoubleBackwardHessian"
    c = [torch.randn_like(t) for t in params.values()]
    ref = make_operator(tl, params, phi, batch, hvp="double_backward").matvec(c)
    for _ in range(2):  # the second call uses the recorded decision
        op = make_operator(tl, params, phi, batch, hvp="auto", expected_products=1)
        assert type(op).__name__ == want
        for a, b in zip(op.matvec(c), ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert H._FEW_PRODUCTS_LINEARIZED[H._code_of(tl)] is with_bn


@pytest.mark.parametrize("dilation", [1, 2])
def test_convolution_input_gradients_by_fold_match_double_backward(monkeypatch, dilation):
    """The linearised graphs may compute a convolution's input gradient by matmul + col2im
    (where that is measured faster); forced on here, the products and the mixed term through
    the input (the commentary scales it) equal double backward's in float64."""
    from commentaries_ext.engine import FunctionalModule
    from commentaries_ext.engine import linearize as LZ

    monkeypatch.setattr(LZ, "fold_is_faster", lambda *a, **k: True)
    LZ.clear_cache()
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=dilation, dilation=dilation), nn.Flatten(), nn.Linear(3 * 5 * 5, 3))
    fm = FunctionalModule(net.double().train())
    params = fm.params()
    phi = {"s": torch.randn(2, dtype=DT)}
    batch = (torch.randn(6, 2, 9, 9, dtype=DT), torch.randint(0, 3, (6,)))

    def tl(p, h, b):
        return nn.functional.cross_entropy(fm(p, b[0] * h["s"].view(1, 2, 1, 1)), b[1])

    lin = make_operator(tl, params, phi, batch, hvp="forward_over_reverse")
    assert lin._lin.t.lowered_input_grads >= 2  # the second convolution's input gradient and its tangents
    db = make_operator(tl, params, phi, batch, hvp="double_backward")
    c = [torch.randn_like(t) for t in params.values()]
    for a, b in zip(lin.matvec(c), db.matvec(c)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(lin.mixed(c), db.mixed(c)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    LZ.clear_cache()


def test_zero_tangent_adds_are_dropped_from_the_trace():
    from torch.fx.experimental.proxy_tensor import make_fx

    from commentaries_ext.engine.linearize import _drop_zero_adds

    def f(x, y):
        z = torch.zeros_like(x)
        kept = x * 2 + z                   # dropped: x * 2 has the sum's shape and dtype
        bcast = y + torch.zeros_like(x)     # kept: the sum broadcasts y to x's shape
        inplace = x * 3 + torch.zeros_like(x)
        inplace.add_(1.0)                   # kept: the sum is written in place
        return kept, bcast, inplace

    x, y = torch.randn(4, 5), torch.randn(5)
    gm = make_fx(f)(x, y)
    adds = lambda: sum(n.target is torch.ops.aten.add.Tensor for n in gm.graph.nodes)  # noqa: E731
    before = adds()
    assert _drop_zero_adds(gm) == 1
    assert adds() == before - 1
    for a, b in zip(gm(x, y), f(x, y)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_two_input_gradients_of_a_convolution_are_merged(stride, padding):
    from torch.fx.experimental.proxy_tensor import make_fx

    from commentaries_ext.engine.conv import CONV_BWD
    from commentaries_ext.engine.linearize import _merge_input_grads

    g = torch.Generator().manual_seed(stride)
    x = torch.randn(3, 5, 9, 9, generator=g, dtype=torch.float64)
    W, V = (torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    out_hw = (9 + 2 * padding - 3) // stride + 1
    a, b = (torch.randn(3, 7, out_hw, out_hw, generator=g, dtype=torch.float64) for _ in range(2))
    args = ([stride, stride], [padding, padding], [1, 1], False, [0, 0], 1)

    def f(a, b, x, W, V):
        ga = CONV_BWD(a, x, W, [7], *args, [True, False, False])[0]
        gb = CONV_BWD(b, x, V, [7], *args, [True, False, False])[0]
        gw = CONV_BWD(b, x, W, [7], *args, [False, True, False])[1]  # a weight gradient: not merged
        return ga + gb, gw

    gm = make_fx(f)(a, b, x, W, V)
    assert _merge_input_grads(gm) == 1
    assert sum(n.target is CONV_BWD for n in gm.graph.nodes) == 2
    for got, want in zip(gm(a, b, x, W, V), f(a, b, x, W, V)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_two_folded_input_gradients_are_merged():
    from commentaries_ext.engine.conv import input_grad_by_fold
    from commentaries_ext.engine.linearize import _merge_input_grads

    g = torch.Generator().manual_seed(0)
    W, V = (torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (torch.randn(3, 6, 7, 7, generator=g, dtype=torch.float64) for _ in range(2))
    geom = ((14, 14), (5, 5), (2, 2), (2, 2), (1, 1))

    def f(a, b, W, V):
        return input_grad_by_fold(a, W, *geom) + input_grad_by_fold(b, V, *geom)

    # in the engine the lowering pass inserts the helper as graph nodes; build such a graph
    graph = torch.fx.Graph()
    pa, pb, pW, pV = (graph.placeholder(n) for n in "abWV")
    ga = graph.call_function(input_grad_by_fold, (pa, pW, *geom))
    gb = graph.call_function(input_grad_by_fold, (pb, pV, *geom))
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (ga, gb)))
    for node, val in zip((pa, pb, pW, pV), (a, b, W, V)):
        node.meta["val"] = val
    gm = torch.fx.GraphModule({}, graph)
    assert _merge_input_grads(gm) == 1
    assert sum(n.target is input_grad_by_fold for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(a, b, W, V), f(a, b, W, V), rtol=1e-12, atol=1e-12)


def _student_problem(model):
    """A weighted training loss over ``model`` (through FunctionalModule) and its data."""
    torch.manual_seed(0)
    x, xv = torch.randn(8, 1, 6, 6, dtype=DT), torch.randn(8, 1, 6, 6, dtype=DT)
    y, yv = torch.randint(0, 3, (8,)), torch.randint(0, 3, (8,))
    fm = FunctionalModule(model)
    hp = {"w": torch.randn(8, dtype=DT), "s": torch.tensor(1.2, dtype=DT)}

    def tl(p, h, b):
        return (torch.sigmoid(h["w"]) * nn.functional.cross_entropy(fm(p, b[0] * h["s"]), b[1], reduction="none")).mean()

    def vl(p, h, b):
        return nn.functional.cross_entropy(fm(p, b[0]), b[1])

    return fm, tl, vl, hp, (x, y), (xv, yv)


def _bn_eval_student():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(DT).eval()


def _reassign_running_stats(m):
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["1.running_mean"] += 1.0
    sd["1.running_var"] *= 3.0
    m.load_state_dict(sd, assign=True)


def _leaky_student():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.LeakyReLU(0.01), nn.Linear(5, 3)).to(DT)


def _set_slope(m):
    m[2].negative_slope = 0.5


def _frozen_student():
    m = _leaky_student()
    m[1].weight.requires_grad_(False)
    return m


def _reassign_frozen(m):
    m[1].weight = nn.Parameter(m[1].weight.detach() * 2, requires_grad=False)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(36, 3)
        self.temp = torch.tensor(1.5, dtype=DT)  # a plain tensor attribute: not a buffer

    def forward(self, x):
        return self.lin(x.flatten(1)).tanh() * self.temp


def _scaled_student():
    torch.manual_seed(1)
    return _Scaled().to(DT)


def _replace_temp(m):
    m.temp = torch.tensor(4.0, dtype=DT)


@pytest.mark.parametrize("student,change", [(_bn_eval_student, _reassign_running_stats), (_leaky_student, _set_slope),
                                            (_frozen_student, _reassign_frozen), (_scaled_student, _replace_temp)],
                         ids=["eval_bn_stats_replaced", "submodule_attribute", "frozen_parameter_replaced",
                              "tensor_attribute_replaced"])
def test_a_reused_trace_sees_the_student_change(student, change):
    # The linearised trace (hvp="auto" at K >= 3) holds a module's eval-mode buffers, frozen
    # parameters and plain attributes as constants; it was keyed by the top module's plain
    # attributes only, so after these changes it was reused and gave hypergradients 30-80 % off.
    from commentaries_ext.engine import linearize as LZ

    LZ.clear_cache()  # (the parametrisations share the loss's code: not a loss re-created per call)
    model = student()
    fm, tl, vl, hp, tb, vb = _student_problem(model)
    solver = NeumannConfig(K=3, alpha=0.01, on_divergence="raise")
    first = implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=solver)  # traces
    assert first.info["hvp"] == "ForwardOverReverseHessian"
    change(model)
    got = implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=solver)
    assert got.info["hvp"] == "ForwardOverReverseHessian"
    exact = implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=solver, hvp="double_backward")
    for k in hp:
        assert torch.allclose(got.grads[k], exact.grads[k], rtol=1e-10, atol=1e-15), k
    # and the double-backward value is the one of the changed student (not of the original)
    fresh_model = student()
    change(fresh_model)
    fresh = _student_problem(fresh_model)
    ref = implicit_hypergradient(*fresh[1:3], fresh[0].params(), *fresh[3:], solver=solver, hvp="double_backward")
    for k in hp:
        assert torch.allclose(exact.grads[k], ref.grads[k], rtol=1e-12, atol=1e-16), k


@pytest.mark.parametrize("hvp", ["double_backward", "auto"])
def test_a_training_loss_that_draws_random_numbers_is_refused(hvp):
    # Dropout in training mode: each evaluation of the loss (the Hessian's graph, the mixed term)
    # drew its own masks, so three identical calls differed by ~190 % with no error
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(DT).train()
    fm, tl, vl, hp, tb, vb = _student_problem(model)
    solver = NeumannConfig(K=3, alpha=0.01, on_divergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto: "forward-over-reverse HVP unavailable"
        with pytest.raises(ValueError, match="draws random numbers"):
            implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=solver, hvp=hvp)
    from commentaries_ext.engine import random_modules_eval

    with random_modules_eval(model):  # dropout at its expectation: the student without it
        got = implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=solver, hvp=hvp)
    assert model[3].training
    plain = nn.Sequential(*[nn.Identity() if isinstance(m, nn.Dropout) else m for m in model])
    ref_fm, rtl, rvl, *_ = _student_problem(plain)
    ref = implicit_hypergradient(rtl, rvl, ref_fm.params(), hp, tb, vb, solver=solver, hvp="double_backward")
    for k in hp:
        assert torch.allclose(got.grads[k], ref.grads[k], rtol=1e-10, atol=1e-15), k


def test_divergence_warnings_point_at_the_callers_line():
    # they pointed into engine/implicit.py; the CG information named the curvature setting
    # "curvature" and then overwrote it with the value d^T H d
    params = {"w": torch.tensor([0.5, -0.3], dtype=DT)}
    hp = {"a": torch.tensor([1.0, 2.0], dtype=DT)}

    def tl(p, h, b):  # concave in w: negative curvature everywhere
        return -(h["a"] * p["w"] ** 2).sum()

    def vl(p, h, b):
        return (p["w"] ** 2).sum()

    with pytest.warns(HypergradientDivergenceWarning) as rec:
        res = implicit_hypergradient(tl, vl, params, hp, solver=CGConfig(max_iter=5), hvp="double_backward")
    assert {w.filename for w in rec} == {__file__}
    assert res.info["curvature"] == "hessian" and res.info["direction_curvature"] < 0
    with pytest.warns(HypergradientDivergenceWarning) as rec:  # the Neumann series' fallback
        implicit_hypergradient(tl, vl, params, hp, solver=NeumannConfig(K=20, alpha=1.0), hvp="double_backward")
    assert {w.filename for w in rec} == {__file__}


def test_a_deterministic_loss_is_not_refused_while_another_thread_draws_random_numbers():
    # the first form of the check compared the global generator's state before and after the call:
    # a data-loading thread drawing from it made 15 of 20 calls of a deterministic loss raise
    import threading

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    fm, tl, vl, hp, tb, vb = _student_problem(model)
    stop = threading.Event()

    def prefetch():
        while not stop.is_set():
            torch.randint(0, 10, (64,))

    thread = threading.Thread(target=prefetch)
    thread.start()
    try:
        for _ in range(10):
            implicit_hypergradient(tl, vl, fm.params(), hp, tb, vb, solver=NeumannConfig(K=2, alpha=0.01))
    finally:
        stop.set()
        thread.join()


def test_the_weighted_mixed_term_without_forward_mode():
    """The example-weighting mixed term takes d_i = grad l_i . p by forward mode; where an op has no
    forward-mode formula (MultiheadAttention's fast path in eval mode) it is taken by two reverse
    passes, and must agree."""
    from commentaries_ext.engine.hvp import _jvp_by_double_vjp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    fm = FunctionalModule(model)
    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))

    def per_example(q):
        return nn.functional.cross_entropy(fm(q, x), y, reduction="none")

    th = fm.params()
    tangent = {k: torch.randn_like(v) for k, v in th.items()}
    _, want = torch.func.jvp(per_example, (th,), (tangent,))
    torch.testing.assert_close(_jvp_by_double_vjp(per_example, th, tangent), want, rtol=1e-12, atol=1e-14)


def test_in_place_writes_the_split_would_lose_are_refused():
    """A circular-padding convolution traces to ``new_empty`` + in-place ``copy_`` into slices of
    it, read later through the buffer: the primal / tangent split dropped the writes, so the
    linearised products read uninitialised memory (wrong or NaN on later operators, which are
    not validated). Such a trace is refused (UnsplittableTrace) and ``auto`` falls back to double
    backward: every operator agrees with it, also after the allocator was dirtied."""
    import torch.nn.functional as F
    from commentaries_ext.engine import linearize as LZ
    from commentaries_ext.engine.linearize import UnsplittableTrace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Tanh(), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3)).double()
    fm = FunctionalModule(net)
    batch = (torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    params, hp = fm.params(), {"s": torch.tensor(0.3, dtype=torch.float64)}

    def loss(p, h, b):
        return F.cross_entropy(fm(p, b[0]), b[1]) * h["s"].exp()

    v = [torch.randn_like(t) for t in params.values()]
    ref = make_operator(loss, params, hp, batch, hvp="double_backward")
    want = ref.matvec(v)
    LZ.clear_cache()
    # (before: the first trace's check against eager gradients passed or not depending on what the
    # allocator handed back; once one passed, every later operator was a cache hit and wrong)
    for i in range(10):
        junk = [torch.full((4096,), 1e3 * (i + 1), dtype=torch.float64) for _ in range(50)]
        del junk
        try:
            op = make_operator(loss, params, hp, batch, hvp="forward_over_reverse")
        except UnsplittableTrace as err:
            assert "copy_" in str(err)
            continue
        for a, b in zip(op.matvec(v), want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        raise AssertionError("the trace that loses its in-place writes was not refused")
    for i in range(5):
        junk = [torch.full((4096,), 1e3 * (i + 1), dtype=torch.float64) for _ in range(50)]
        del junk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = make_operator(loss, params, hp, batch, hvp="auto").matvec(v)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_trace_validation_does_not_pass_nan():
    """The check of a new trace against eager gradients: NaN or an infinity where the reference
    is finite (or another infinity) is a mismatch, not an error below tolerance."""
    from commentaries_ext.engine import linearize as LZ
    t = torch.tensor
    nan, inf = float("nan"), float("inf")
    assert LZ._first_mismatch(["g"], [t([nan, 1.0])], [t([1.0, 1.0])]) == "g"
    assert LZ._first_mismatch(["g"], [t([inf, 1.0])], [t([-inf, 1.0])]) == "g"
    assert LZ._first_mismatch(["g"], [t([nan, 1.0])], [t([inf, 1.0])]) == "g"
    assert LZ._first_mismatch(["g"], [t([nan, 1.0])], [t([nan, 1.0])]) is None
    assert LZ._first_mismatch(["g"], [t([1.0, 2.0])], [t([1.0, 2.0 + 1e-13])]) is None
    assert LZ._first_mismatch(["g"], [t([1.0, 2.5])], [t([1.0, 2.0])]) == "g"
