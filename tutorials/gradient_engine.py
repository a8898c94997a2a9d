"""The ctmodels gradient engine in one script.

Run: python tutorials/gradient_engine.py

1. The registry: pick solvers by name.
2. `integrate` differentiated four ways (checkpointed backprop, continuous adjoint,
   direct autodiff, forward mode) against the closed form of a linear ODE.
3. A DEQ-style fixed point z* = tanh(W z* + x) by Anderson acceleration, differentiated
   by the implicit function theorem, checked against backprop through the iterations.
4. An ODE's equilibrium by root finding and by integration: same value, same gradient.
5. A failure you can read.
"""

import jax
import jax.numpy as jnp
import numpy as np

import ctmodels

jax.config.update("jax_enable_x64", True)


def main():
    # 1. The registry
    table = ctmodels.solvers.available("fixed_point")
    print("fixed-point solvers:", ", ".join(table["name"]))

    # 2. integrate under four adjoints
    A = jnp.array([[-0.5, 1.0], [-1.0, -0.5]])
    y0 = jnp.array([1.0, 0.0])
    ts = jnp.array([0.0, 2.0])

    def final_state_sum(scale, adjoint):
        sol = ctmodels.integrate(
            lambda t, y, s: s * (A @ y), y0, ts, scale, solver="dopri5",
            adjoint=adjoint, rtol=1e-10, atol=1e-12,
        )  # fmt: skip
        return sol.ys[-1].sum()

    # closed form: y(2) = expm(2 s A) y0, d/ds sum = sum(2 A expm(2 s A) y0) at s = 1
    exact = jnp.sum(2 * A @ jax.scipy.linalg.expm(2 * A) @ y0)
    for adjoint in ["checkpoint", "backsolve", "direct"]:
        g = jax.grad(final_state_sum)(1.0, adjoint)
        print(f"d/ds via {adjoint:10s}: {g:+.10f}   (exact {exact:+.10f})")
        np.testing.assert_allclose(g, exact, rtol=1e-7)
    g = jax.jacfwd(final_state_sum)(1.0, "forward")
    print(f"d/ds via {'forward':10s}: {g:+.10f}")
    np.testing.assert_allclose(g, exact, rtol=1e-7)

    # 3. A fixed point with implicit gradients
    key_w, key_x = jax.random.split(jax.random.PRNGKey(0))
    W = jax.random.normal(key_w, (16, 16))
    W = 0.9 * W / jnp.linalg.norm(W, 2)
    x = jax.random.normal(key_x, (16,))

    def layer_output(x, adjoint):
        sol = ctmodels.fixed_point(
            lambda z, x: jnp.tanh(W @ z + x), jnp.zeros(16), x, solver="anderson",
            adjoint=adjoint, rtol=1e-10, atol=1e-12, max_steps=500,
        )  # fmt: skip
        return jnp.sum(sol.value**2)

    sol = ctmodels.fixed_point(lambda z, x: jnp.tanh(W @ z + x), jnp.zeros(16), x)
    print(f"anderson: {int(sol.stats['num_steps'])} iterations, residual "
          f"{float(sol.stats['residual']):.1e}")  # fmt: skip
    monitor = ctmodels.solvers.BackwardMonitor()
    implicit = ctmodels.solvers.get("implicit", on_backward=monitor)
    g_implicit = jax.grad(layer_output)(x, implicit)
    g_unrolled = jax.grad(layer_output)(x, "checkpoint")
    err = float(jnp.max(jnp.abs(g_implicit - g_unrolled)))
    print(f"implicit vs unrolled gradient: max difference {err:.1e}; backward solve "
          f"relative residual {monitor.last['relative_residual']:.1e}")  # fmt: skip
    assert err < 1e-7

    # 4. Steady states two ways
    def field(t, y, a):
        return a - y**3  # equilibrium y* = a^(1/3)

    a = jnp.array([8.0, 27.0])
    for method in ["root", "integrate"]:
        value = ctmodels.steady_state(field, jnp.ones(2), a, method=method).value
        grad = jax.grad(
            lambda a, m: ctmodels.steady_state(
                field, jnp.ones(2), a, method=m
            ).value.sum()
        )(a, method)
        print(f"steady state by {method:9s}: {np.round(value, 6)}, "
              f"d/da {np.round(grad, 6)}")  # fmt: skip
        np.testing.assert_allclose(value, a ** (1 / 3), rtol=1e-5)
        np.testing.assert_allclose(grad, 1 / (3 * a ** (2 / 3)), rtol=1e-4)

    # 5. A failure you can read
    stiff = lambda t, y, args: -1000.0 * (y - jnp.cos(t))  # noqa: E731
    try:
        ctmodels.integrate(
            stiff, jnp.array([0.0]), jnp.array([0.0, 10.0]), max_steps=100
        )
    except ctmodels.SolverError as err:
        print("\nSolverError:", err)
    sol = ctmodels.integrate(
        stiff, jnp.array([0.0]), jnp.array([0.0, 10.0]), solver="kvaerno5"
    )
    print(f"with kvaerno5: y(10) = {float(sol.ys[-1, 0]):.6f} in "
          f"{int(sol.stats['num_steps'])} steps")  # fmt: skip


if __name__ == "__main__":
    main()
