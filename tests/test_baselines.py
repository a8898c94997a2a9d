"""The ODE-RNN block and models and the baselines (`ODERNN`, `GRUDelta`, `RNNVAE`,
`LinearInterpolation`, `LOCF`) against oracles: `numpy.interp`, direct loops, a
sequential reference of the ODE-RNN, and invariances (layout, padding, causality).

The module runs in float64 (restored afterwards).
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmodels.data import TimeSeries, batches, make_batch
from ctmodels.models import (
    LOCF,
    MODELS,
    ODERNN,
    RNNVAE,
    GRUDelta,
    LatentODE,
    LinearInterpolation,
)
from ctmodels.nn import ODERNNEncoder


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """float64 for this module; and the "rbg" PRNG, whose kernels compile in a
    fraction of threefry's time (the tests do not depend on particular draws).
    Both settings are restored afterwards."""
    previous = jax.config.jax_enable_x64, jax.config.jax_default_prng_impl
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_enable_x64", previous[0])
    jax.config.update("jax_default_prng_impl", previous[1])


SMALL = {
    "ODERNN": dict(hidden_size=4, units=8),
    "GRUDelta": dict(hidden_size=4, units=8),
    "RNNVAE": dict(latent_size=3, encoder_size=4, units=8),
}


@eqx.filter_jit
def _loss(model, batch, key):
    return model.loss(batch, key=key)


@eqx.filter_jit
def _predict(model, batch, key, times=None):
    return model.predict(batch, key=key, times=times)


def _series(seed=0, S=5, T=6, C=2):
    """Irregular series of different lengths; channel 1 of series 2 never observed."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0, 1, (S, T)), axis=1)
    times[1, -2:] = np.nan
    values = np.sin(4 * np.nan_to_num(times))[..., None] + rng.normal(0, 0.1, (S, T, C))
    mask = (rng.uniform(size=(S, T, C)) < 0.6) & ~np.isnan(times)[..., None]
    mask[:, 1, 0] = True
    mask[2, :, 1] = False
    return TimeSeries.from_arrays(times, np.where(mask, values, np.nan))


@pytest.fixture(scope="module")
def data():
    ts = _series()
    # the same context / target split in both layouts: hide source values
    hide = (np.random.default_rng(1).uniform(size=ts.mask.shape) < 0.3) & ts.mask
    hide[:, 1, 0] = False
    out = {"ts": ts}
    for layout in ("union", "padded"):
        # 4 series + 2 padding rows of weight 0
        b = make_batch(ts[np.arange(4)], layout=layout, batch_size=6)
        idx, pos = np.asarray(b.index), np.asarray(b.position)
        h = hide[np.maximum(idx, 0)[:, None], np.maximum(pos, 0)]
        h &= (idx[:, None] >= 0)[..., None] & (pos >= 0)[..., None]
        out[layout] = eqx.tree_at(
            lambda b: b.mask, b, b.mask & ~jnp.asarray(h)
        )  # target_mask keeps every observed value
    return out


# --------------------------------------------------------------- interpolators


def _context(batch):
    """Per row and channel: the context times and values, in NumPy."""
    times = np.asarray(batch.times)
    values = np.asarray(batch.values)
    mask = np.asarray(batch.mask)
    return times, values, mask


@pytest.mark.parametrize("layout", ["union", "padded"])
def test_linear_interpolation_is_numpy_interp(data, layout):
    batch = data[layout]
    q = np.linspace(-0.2, 1.3, 11)  # also outside the data: flat extrapolation
    mean, std = _predict(LinearInterpolation(2), batch, None, jnp.asarray(q))
    mean_at, _ = _predict(LinearInterpolation(2), batch, None)
    times, values, mask = _context(batch)
    for b in range(batch.batch_size):
        for c in range(2):
            m = mask[b, :, c]
            if not m.any():
                np.testing.assert_array_equal(mean[b, :, c], 0.0)
                continue
            np.testing.assert_allclose(
                mean[b, :, c], np.interp(q, times[b, m], values[b, m, c]), atol=1e-12
            )
            np.testing.assert_allclose(
                mean_at[b, :, c],
                np.interp(times[b], times[b, m], values[b, m, c]),
                atol=1e-12,
            )
    np.testing.assert_array_equal(std, 0.0)


@pytest.mark.parametrize("layout", ["union", "padded"])
def test_locf_against_a_loop(data, layout):
    batch = data[layout]
    q = np.linspace(-0.2, 1.3, 11)
    mean, _ = _predict(LOCF(2), batch, None, jnp.asarray(q))
    times, values, mask = _context(batch)
    for b in range(batch.batch_size):
        for c in range(2):
            obs = [
                (times[b, j], values[b, j, c])
                for j in range(batch.num_times)
                if mask[b, j, c]
            ]
            for i, t in enumerate(q):
                if not obs:
                    expected = 0.0
                else:
                    before = [v for (s, v) in obs if s <= t]
                    expected = before[-1] if before else obs[0][1]
                np.testing.assert_allclose(mean[b, i, c], expected, atol=1e-12)


def test_interpolator_loss_is_the_masked_mse(data):
    batch = data["padded"]
    for cls in (LinearInterpolation, LOCF):
        model = cls(2)
        loss, metrics = _loss(model, batch, None)
        pred = np.asarray(_predict(model, batch, None)[0])
        tm = (
            np.asarray(batch.target_mask)
            & (np.asarray(batch.weight) > 0)[:, None, None]
        )
        x = np.asarray(batch.values)
        expected = np.sum(np.where(tm, (pred - x) ** 2, 0.0)) / tm.sum()
        np.testing.assert_allclose(loss, expected, rtol=1e-12)
        assert set(metrics) == {"loss", "mse"}


# --------------------------------------------------------------- the ODE-RNN block


SLOW = pytest.mark.slow
_evolve = eqx.filter_jit(lambda e, h, t0, t1: e.evolve(h, t0, t1))


@pytest.mark.parametrize(
    "ode,reverse",
    [
        (True, True),
        pytest.param(True, False, marks=SLOW),
        pytest.param(False, True, marks=SLOW),
        pytest.param(False, False, marks=SLOW),
    ],
)
def test_odernn_block_against_a_sequential_loop(ode, reverse):
    """The batched, compacted implementation equals the textbook loop: at every
    position evolve from the last update, then update if observed."""
    rng = np.random.default_rng(1)
    B, T = 3, 6
    times = np.sort(rng.uniform(0, 1, (B, T)), 1)
    x = rng.normal(size=(B, T, 2))
    obs = rng.uniform(size=(B, T)) < 0.5
    obs[2] = False  # a row with no observation
    evolve, gru = _evolve, eqx.filter_jit(lambda e, h, x: e.gru(h, x))
    run = eqx.filter_jit(
        lambda e, *a, reverse: e(*a[:3], t_start=a[3], t_final=a[4], reverse=reverse)
    )
    enc = ODERNNEncoder(2, 3, units=5, ode=ode, steps=2, key=jax.random.key(2))
    t_start = times[:, -1] if reverse else times[:, 0] - 0.1
    h_fin, h_bef, gaps = run(enc, times, x, obs, t_start, -0.5, reverse=reverse)
    for b in range(B):
        h, t_last = np.zeros(3), t_start[b]
        order = range(T - 1, -1, -1) if reverse else range(T)
        for j in order:
            h_minus = np.asarray(evolve(enc, h, np.asarray(t_last), times[b, j]))
            gap = abs(times[b, j] - t_last)
            np.testing.assert_allclose(h_bef[b, j], h_minus, atol=1e-12)
            np.testing.assert_allclose(gaps[b, j], gap, atol=1e-12)
            if obs[b, j]:
                xi = x[b, j] if ode else np.append(x[b, j], gap)
                h, t_last = np.asarray(gru(enc, h_minus, xi)), times[b, j]
        h = np.asarray(evolve(enc, h, np.asarray(t_last), np.asarray(-0.5)))
        np.testing.assert_allclose(h_fin[b], h, atol=1e-12)


def test_odernn_block_evolve_matches_euler_steps():
    enc = ODERNNEncoder(2, 3, units=5, steps=2, key=jax.random.key(3))
    h = np.array([0.3, -0.2, 0.5])
    f = jax.jit(lambda h: enc.vector_field(h))
    expected = h
    for _ in range(2):  # two Euler steps from t=0.7 back to t=0.1
        expected = expected + (-0.3) * np.asarray(f(expected))
    t = lambda v: np.asarray(v)
    np.testing.assert_allclose(_evolve(enc, h, t(0.7), t(0.1)), expected, rtol=1e-12)
    np.testing.assert_array_equal(_evolve(enc, h, t(0.4), t(0.4)), h)  # zero-length


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_odernn_block_one_step_taken_directly_matches_integrate(solver):
    """With one fixed step per interval the step is taken without `integrate` (under
    a discretise-then-optimise adjoint): the same values as through `integrate` (the
    backsolve adjoint keeps that path), and the gradient of the written-out step."""
    kw = dict(units=5, solver=solver, steps=1, key=jax.random.key(3))
    enc = ODERNNEncoder(2, 3, **kw)
    ref = ODERNNEncoder(2, 3, adjoint="backsolve", **kw)
    assert enc._direct() and not ref._direct()
    rng = np.random.default_rng(4)
    h = rng.normal(size=(4, 3))
    t0, t1 = rng.uniform(0, 1, 4), rng.uniform(0, 1, 4)
    np.testing.assert_allclose(
        _evolve(enc, h, t0, t1), _evolve(ref, h, t0, t1), rtol=1e-14, atol=1e-15
    )
    times = np.sort(rng.uniform(0, 1, (2, 5)), 1)
    x, obs = rng.normal(size=(2, 5, 2)), rng.uniform(size=(2, 5)) < 0.6
    run = eqx.filter_jit(lambda e: e(times, x, obs, t_start=times[:, -1], t_final=0.0))
    for a, b in zip(run(enc), run(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    if solver == "euler":

        def loss(e, written_out):
            f = lambda h: jax.vmap(e.vector_field)(h)
            span = (t1 - t0)[:, None]
            h1 = h + span * f(h) if written_out else e.evolve(h, t0, t1)
            return jnp.sum(jnp.sin(h1))

        grad = eqx.filter_jit(eqx.filter_grad(loss))
        g, g_ref = grad(enc, False), grad(enc, True)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_odernn_block_one_step_reports_nonfinite_states():
    from ctmodels import SolverError

    enc = ODERNNEncoder(2, 3, units=5, steps=1, key=jax.random.key(3))
    enc = eqx.tree_at(
        lambda e: e.vector_field.layers[0].bias, enc, jnp.full(5, jnp.nan)
    )
    with pytest.raises(SolverError, match="NaN or infinite"):
        enc.evolve(np.ones(3), 0.0, 0.5)
    times, x = np.linspace(0, 1, 4), np.ones((4, 2))
    obs = np.array([True, False, True, False])
    with pytest.raises(Exception, match="NaN or infinite"):
        eqx.filter_jit(lambda e: e(times, x, obs, t_start=1.0, reverse=True))(enc)


# --------------------------------------------------------------- trainable models


def _build(name, seed=0):
    return MODELS[name](2, **SMALL[name], key=jax.random.key(seed))


@pytest.mark.parametrize(
    "name",
    [
        "GRUDelta",
        pytest.param("ODERNN", marks=SLOW),
        pytest.param("RNNVAE", marks=SLOW),
    ],
)
def test_layouts_padding_and_gradients(data, name):
    model = _build(name)
    key = jax.random.key(4)
    lu, mu = _loss(model, data["union"], key)
    lp, mp = _loss(model, data["padded"], key)
    # per-row computations: the layouts agree to rounding
    np.testing.assert_allclose(lp, lu, rtol=1e-10)
    for k in mu:
        np.testing.assert_allclose(mp[k], mu[k], rtol=1e-10, atol=1e-12)
    # junk where nothing is observed, and data in the weight-0 rows: no effect
    batch = data["union"]
    seen = batch.mask | batch.target_mask
    values = jnp.where(seen, batch.values, jnp.nan)
    mask = batch.mask.at[-1].set(batch.mask[0])
    values = values.at[-1].set(jnp.where(mask[-1], batch.values[0], jnp.nan))
    bad = eqx.tree_at(lambda b: (b.values, b.mask), batch, (values, mask))
    np.testing.assert_allclose(_loss(model, bad, key)[0], lu, rtol=1e-12)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: m.loss(bad, key=key)[0]))(model)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(bool(jnp.any(g != 0)) for g in leaves)


@pytest.mark.parametrize("name", ["ODERNN", "GRUDelta"])
def test_predictions_come_from_the_past(data, name):
    """The prediction at a time uses only the observations before it."""
    model = _build(name)
    batch = data["padded"]
    j = 3
    poked = eqx.tree_at(lambda b: b.values, batch, batch.values.at[:, j:].add(5.0))
    m0, s0 = _predict(model, batch, None)
    m1, _ = _predict(model, poked, None)
    np.testing.assert_array_equal(m1[:, : j + 1], m0[:, : j + 1])
    observed = np.asarray(batch.mask[:, j]).any(-1) & (np.asarray(batch.weight) > 0)
    assert not np.allclose(m1[observed, j + 1], m0[observed, j + 1])
    np.testing.assert_allclose(s0, model.obs_std)


@pytest.mark.slow
def test_odernn_predict_at_given_times(data):
    """Querying a row's own times gives the same predictions as the batch."""
    model = _build("ODERNN")
    batch = data["padded"]
    m0, _ = _predict(model, batch, None)
    m1, _ = _predict(model, batch, None, batch.times)
    valid = np.asarray(batch.time_mask)
    np.testing.assert_allclose(np.asarray(m1)[valid], np.asarray(m0)[valid], rtol=1e-10)


@pytest.mark.slow
def test_rnnvae_predict(data):
    model = _build("RNNVAE")
    batch = data["union"]
    mean, std = _predict(model, batch, jax.random.key(5))
    assert mean.shape == std.shape == batch.values.shape
    assert bool(jnp.all(std >= model.obs_std * (1 - 1e-12)))


def test_bucketed_batches_compile_once():
    traces = []

    @eqx.filter_jit
    def f(m, b):
        traces.append(1)
        return m.loss(b)[0]

    model = _build("GRUDelta")
    bs = list(batches(_series(seed=6, S=8), 4, layout="union", time_bucket=32))
    assert bs[0].times.shape == bs[1].times.shape
    values = [f(model, b) for b in bs]
    assert len(traces) == 1 and values[0] != values[1]


def test_hyperparameters_and_catalog():
    assert set(MODELS) == {
        "LatentODE",
        "ODERNN",
        "GRUDelta",
        "RNNVAE",
        "LinearInterpolation",
        "LOCF",
    }
    assert MODELS["LatentODE"] is LatentODE
    for cls in (ODERNN, GRUDelta, RNNVAE, LinearInterpolation, LOCF):
        kw = SMALL.get(cls.__name__, {})
        m = cls(2, **kw, key=jax.random.key(7))
        hp = dict(m.hyperparameters)
        json.dumps(hp)
        m2 = MODELS[cls.__name__](**hp, key=jax.random.key(8))
        assert jax.tree.structure(m) == jax.tree.structure(m2)


def test_errors(data):
    with pytest.raises(ValueError, match="channels"):
        LOCF(3).loss(data["union"])
    with pytest.raises(ValueError, match="obs_std"):
        ODERNN(2, obs_std=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="fixed steps"):
        ODERNN(2, solver="euler", steps=None, key=jax.random.key(0))
    with pytest.raises(ValueError, match="times"):
        LOCF(2).predict(data["union"], times=jnp.zeros((2, 2, 2)))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="GRUDelta: hidden_size must be >= 1"):
        GRUDelta(2, hidden_size=0, key=key)
    with pytest.raises(ValueError, match="ODERNN: units must be an int"):
        ODERNN(2, units=None, key=key)
    with pytest.raises(ValueError, match="RNNVAE: latent_size"):
        RNNVAE(2, latent_size=0, key=key)
    vae = RNNVAE(2, latent_size=2, encoder_size=4, units=8, key=key)
    with pytest.raises(ValueError, match="n_samples"):
        vae.predict(data["union"], key=key, n_samples=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        vae.predict(data["union"], key=key, times=[0.5, 0.2])
    # the filters place queries in time order themselves: unsorted is fine, NaN not
    gru = GRUDelta(2, hidden_size=4, units=8, key=key)
    m1, _ = gru.predict(data["union"], times=[0.2, 0.5])
    m2, _ = gru.predict(data["union"], times=[0.5, 0.2])
    np.testing.assert_allclose(m1, m2[:, ::-1], rtol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        gru.predict(data["union"], times=[0.2, np.inf])


def test_one_base_keeps_each_models_field_order_and_checks_subclasses():
    """The shared base adds no fields: each model's fields (so its pytree leaves,
    checkpoints and optimiser states) come in the order its own class body declares
    them; a subclass that forgets a field the base relies on fails when defined."""
    import dataclasses

    from ctmodels.models import _common as common

    for cls in (LatentODE, ODERNN, GRUDelta, RNNVAE):
        own = [n for n in cls.__annotations__ if not n.startswith("_")]
        assert [f.name for f in dataclasses.fields(cls)] == own
        assert issubclass(cls, common.AbstractGaussianSequenceModel)
    with pytest.raises(TypeError, match="obs_std"):

        class Forgetful(common.AbstractRecurrentModel):
            log_std: jax.Array | None
            num_channels: int
            hyperparameters: tuple

            def _means(self, batch, queries=None):
                return batch.values


def test_citations_come_from_one_table():
    """Docstrings end with the BibTeX of `ctmodels._references` (one copy of each
    entry), at their own indentation; an unknown key fails at definition."""
    import inspect

    from ctmodels import _references
    from ctmodels.datasets import periodic

    entry = _references.BIBTEX["rubanova2019latent"]
    for obj in (LatentODE, ODERNN, GRUDelta, RNNVAE, LOCF, ODERNNEncoder, periodic):
        doc = inspect.cleandoc(obj.__doc__)
        assert "\n```bibtex\n" + entry + "\n" in doc, obj
    assert _references.BIBTEX["burda2016importance"] in inspect.cleandoc(
        LatentODE.__doc__
    )
    with pytest.raises(KeyError, match="no entry 'nobody2000'"):
        _references.cites("nobody2000")
