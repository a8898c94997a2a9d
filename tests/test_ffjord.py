"""FFJORD and its CNF blocks against oracles: the closed-form change of variables of a
linear field, `jax.jacfwd` Jacobians (exact divergence, Hutchinson's mean, the logit
transform's log-determinant), sample → forward solve → the base points, a short
`ctmodels.train.fit` run lowering the held-out NLL, and the 2-D toy generators
against their definitions. Float32; the gradient checks are in test_ffjord_x64.py."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ctmodels.datasets as cd
from ctmodels.datasets import _toy2d
from ctmodels.models._ffjord import FFJORD
from ctmodels.nn import CNFField, exact_divergence, hutchinson_divergence
from ctmodels.train import fit, load_checkpoint

KEY = jax.random.key(0)


def _linear_ffjord(mats, end_times, **kw):
    """An FFJORD whose block k is the linear field f(t, x) = A_k x: one ConcatSquash
    layer with zero bias, constant gate sigmoid(0) = 1/2 (so W = 2 A_k), no time
    shift."""
    blocks, d = len(mats), mats[0].shape[0]
    m = FFJORD(d, depth=0, blocks=blocks, key=KEY, **kw)
    zeros = jnp.zeros((blocks, d))
    return eqx.tree_at(
        lambda m: (
            m.field.layers[0].weight, m.field.layers[0].bias,
            m.field.layers[0].gate_weight, m.field.layers[0].gate_bias,
            m.field.layers[0].time_bias, m.sqrt_end_times,
        ),
        m,
        (
            jnp.asarray(2.0 * np.stack(mats), jnp.float32), zeros, zeros, zeros, zeros,
            jnp.sqrt(jnp.asarray(end_times, jnp.float32)),
        ),
    )  # fmt: skip


def _gauss_logpdf(z):
    return -0.5 * np.sum(z**2, -1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def test_log_prob_of_linear_field_is_the_change_of_variables():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(3, 3)) * 0.6 for _ in range(2)]
    ends = [0.7, 0.4]
    m = _linear_ffjord(mats, ends)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    # z = e^{A2 T2} e^{A1 T1} x; log p(x) = log N(z) + Σ T_k tr(A_k)
    flow = scipy.linalg.expm(mats[1] * ends[1]) @ scipy.linalg.expm(mats[0] * ends[0])
    z = x.astype(np.float64) @ flow.T
    expected = _gauss_logpdf(z) + sum(
        t * np.trace(a) for a, t in zip(mats, ends, strict=True)
    )
    lp = eqx.filter_jit(lambda m, x: m.log_prob(x))(m, x)
    np.testing.assert_allclose(lp, expected, rtol=2e-4, atol=2e-4)


def _jac_oracle(field, t, x):
    """Per-row Jacobians of field(t, ·) by jacfwd on one row at a time."""
    return jax.vmap(jax.jacfwd(lambda r: field(t, r)))(x)


def test_exact_divergence_and_hutchinson_are_unbiased():
    field = CNFField(3, width=8, depth=2, activation="softplus", key=KEY)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    t = 0.3
    jac = _jac_oracle(field, t, x)
    tr_true = np.trace(jac, axis1=-2, axis2=-1)
    fro_true = np.sum(np.asarray(jac) ** 2, axis=(-2, -1))

    def fn(v):
        return field(t, v)

    fx, tr, fro = exact_divergence(fn, x)
    np.testing.assert_allclose(fx, field(t, x), rtol=1e-6)
    np.testing.assert_allclose(tr, tr_true, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fro, fro_true, rtol=1e-5, atol=1e-6)

    n = 20000
    for draw in (jax.random.normal, jax.random.rademacher):
        eps = draw(jax.random.key(2), (n,) + x.shape, jnp.float32)
        _, tr_h, fro_h = jax.jit(jax.vmap(lambda e: hutchinson_divergence(fn, x, e)))(
            eps
        )
        for est, true in ((tr_h, tr_true), (fro_h, fro_true)):
            est = np.asarray(est, np.float64)
            se = est.std(0) / math.sqrt(n)
            assert np.all(np.abs(est.mean(0) - true) < 5 * se + 1e-5), draw


def test_sample_then_forward_solve_returns_the_base_points():
    m = FFJORD(2, width=8, depth=2, blocks=2, end_time=0.8, key=jax.random.key(3))
    # make the field far from the identity map
    m = eqx.tree_at(lambda m: m.field, m, jax.tree.map(lambda w: 2 * w, m.field))
    key = jax.random.key(4)

    @eqx.filter_jit
    def roundtrip(m):
        x = m.sample(6, key=key)
        z, logdet, _ = m.to_base(x)
        return x, z

    x, z = roundtrip(m)
    z0 = jax.random.normal(key, (6, 2))
    assert float(jnp.max(jnp.abs(x - z0))) > 0.1  # the flow moved the points
    np.testing.assert_allclose(z, z0, rtol=1e-3, atol=1e-3)


def test_image_preprocessing_log_determinant_and_sample_range():
    levels, alpha = 17, 0.05
    m = FFJORD(4, width=8, depth=1, levels=levels, logit_alpha=alpha, key=KEY)
    v = jnp.array([[0.2, 5.5, 16.9, 8.0], [3.0, 0.01, 10.0, 12.5]])
    s, pre = m._preprocess(v)
    for row in range(2):
        jac = jax.jacfwd(lambda r: m._preprocess(r)[0])(v[row])
        np.testing.assert_allclose(pre[row], np.linalg.slogdet(jac)[1], rtol=1e-5)
    np.testing.assert_allclose(m._postprocess(s), v, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(m._postprocess(jnp.array([-9.0, 9.0])), [0, levels])
    # the loss's NLL is that of the data dequantised with U[0, 1) noise from its key
    x = jnp.floor(v)
    key = jax.random.key(7)

    @eqx.filter_jit
    def run(m):
        u = jax.random.uniform(jax.random.split(key)[0], x.shape)
        return m.log_prob(x + u), m.loss(x, key=key)[1], m.sample(50, key=key)

    lp, metrics, samples = run(m)
    np.testing.assert_allclose(metrics["nll"], -np.mean(lp), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["bits_per_dim"], metrics["nll"] / (4 * math.log(2)), rtol=1e-6
    )
    assert samples.shape == (50, 4)
    assert float(samples.min()) >= 0 and float(samples.max()) <= levels


def test_fit_lowers_the_heldout_nll_and_checkpoint_rebuilds(tmp_path):
    pts = _toy2d.points(cd.load("eight_gaussians", n_samples=384, seed=0))
    pts = pts.astype(np.float32)  # std ~2: the flow must first learn the scale
    train, valid = pts[:256], pts[256:]
    model = FFJORD(
        2, width=16, depth=2, rtol=1e-3, atol=1e-3, solver="bosh3",
        kinetic_weight=0.01, key=jax.random.key(5),
    )  # fmt: skip
    trained, history = fit(
        model, train, valid=valid, steps=40, batch_size=64, learning_rate=2e-2,
        key=jax.random.key(6), checkpoint_dir=tmp_path, progress=False, log=False,
    )  # fmt: skip
    # 4 batches per epoch: the held-out NLL after epoch 10 against after epoch 1
    assert len(history) == 10
    first, last = history["valid_nll"].iloc[0], history["valid_nll"].iloc[-1]
    assert last < first - 0.5, (first, last)
    for col in ("train_nll", "train_bits_per_dim", "train_nfe",
                "train_nfe_backward", "train_kinetic", "valid_nll",
                "valid_bits_per_dim", "valid_nfe"):  # fmt: skip
        assert col in history.columns, col
    # a gradient's vector-Jacobian products: every differentiated forward evaluation
    assert np.all(history["train_nfe_backward"] == history["train_nfe"] - 2)
    # validation scores the exact-trace NLL alone (no regularisers)
    np.testing.assert_allclose(history["valid_loss"], history["valid_nll"], rtol=1e-6)
    assert np.all(history["train_loss"] > history["train_nll"])
    # the checkpoint rebuilds the model from its hyperparameters
    loaded, _ = load_checkpoint(tmp_path, model_classes={"FFJORD": FFJORD})
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)


def test_backward_nfe_counts_the_vector_field_vjps(monkeypatch):
    """`nfe_backward` against a count of the VJPs the gradient really evaluates (a
    host callback in the backward rule of the augmented field), two blocks."""
    from ctmodels.models import _ffjord

    inner = _ffjord._augmented_field
    calls = []

    @jax.custom_vjp
    def counted(s, y, args):
        return inner(s, y, args)

    def fwd(s, y, args):
        return jax.vjp(inner, s, y, args)

    def bwd(pull, ct):
        jax.debug.callback(lambda: calls.append(1))
        return pull(ct)

    counted.defvjp(fwd, bwd)
    monkeypatch.setattr(_ffjord, "_augmented_field", counted)
    model = FFJORD(2, width=8, depth=1, blocks=2, rtol=1e-4, atol=1e-4, key=KEY)
    x = jax.random.normal(jax.random.key(3), (16, 2))
    grad, metrics = eqx.filter_jit(
        eqx.filter_grad(lambda m: m.loss(x, key=KEY), has_aux=True)
    )(model)
    jax.block_until_ready(grad)
    jax.effects_barrier()
    assert int(metrics["nfe_backward"]) == len(calls) > 0
    # blocks × (2 starting-step evaluations, never differentiated)
    assert int(metrics["nfe_backward"]) == int(metrics["nfe"]) - 4
    # the continuous adjoint's backward solve is not reported: no metric
    back = FFJORD(2, width=8, depth=1, adjoint="backsolve", key=KEY)
    assert back._backward_evals_per_step() is None


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="trace must be"):
        FFJORD(2, trace="jacfwd", key=KEY)
    with pytest.raises(ValueError, match="takes fixed steps"):
        FFJORD(2, solver="euler", key=KEY)
    with pytest.raises(ValueError, match="built for dim=2"):
        FFJORD(2, key=KEY).log_prob(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="pass one"):
        FFJORD(2, key=KEY).log_prob(jnp.zeros((3, 2)), trace="hutchinson")


# -------------------------------------------------------------------- 2-D toy data


def test_toy_generators_follow_their_definitions():
    for name in ("eight_gaussians", "pinwheel", "checkerboard", "two_spirals"):
        ds = cd.load(name, n_samples=4000, seed=1)
        assert ds.sizes == {"sample": 4000} and ds.attrs["channels"] == "x y"
        again = cd.load(name, n_samples=4000, seed=1)
        np.testing.assert_array_equal(_toy2d.points(ds), _toy2d.points(again))
        other = cd.load(name, n_samples=4000, seed=2)
        assert not np.allclose(_toy2d.points(ds), _toy2d.points(other))
    # eight gaussians: residuals from the component means are N(0, std^2)
    ds = cd.load("eight_gaussians", n_samples=4000, seed=1)
    k = ds["component"].values
    means = ds.attrs["radius"] * np.stack(
        [np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1
    )
    res = _toy2d.points(ds) - means
    assert abs(res.std() / ds.attrs["std"] - 1) < 0.05 and abs(res.mean()) < 0.02
    # checkerboard: uniform on the squares with col + row even
    p = _toy2d.points(cd.load("checkerboard", n_samples=4000, seed=1)) / 2.0 + 2.0
    cells = np.floor(p).astype(int)
    assert np.all((cells >= 0) & (cells < 4)) and np.all(cells.sum(1) % 2 == 0)
    counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    assert np.all(np.abs(counts[counts > 0] - 500) < 5 * math.sqrt(500))
    # two spirals: arm 1 is the point reflection of arm 0 (same radius distribution)
    ds = cd.load("two_spirals", n_samples=4000, seed=1, noise_std=0.0)
    p, arm = _toy2d.points(ds), ds["component"].values
    r0, r1 = np.linalg.norm(p[arm == 0], axis=1), np.linalg.norm(p[arm == 1], axis=1)
    assert abs(np.median(r0) - np.median(r1)) < 0.1 and r0.max() < 3.7
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        cd.load("pinwheel", n_samples=0)
