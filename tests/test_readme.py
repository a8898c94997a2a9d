"""README's Python example runs and says what it claims."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], str(README), "exec"), ns)
    np.testing.assert_allclose(np.asarray(ns["y"]), [2.0, 3.0], rtol=1e-5)
    # d/dk exp(-k) at k = 2
    np.testing.assert_allclose(float(ns["dk"]), -np.exp(-2.0), rtol=1e-4)
    # the DEQ: z* solves z = tanh(W z + x), and its gradient is the IFT's
    W, z = np.asarray(ns["W"], np.float64), np.asarray(ns["z"], np.float64)
    np.testing.assert_allclose(z, np.tanh(W @ z + 1.0), atol=1e-5)
    D = np.diag(1.0 - z**2)
    dx = np.ones(4) @ np.linalg.solve(np.eye(4) - D @ W, D)
    np.testing.assert_allclose(np.asarray(ns["dx"]), dx, rtol=1e-4, atol=1e-5)
    # the stiff solve by name in float32: y tracks cos t (lag ~ sin(t) / 1000) to the
    # ~3e-2 that float32's default rtol 1e-3 for implicit steppers gives here
    sol = ns["sol"]
    assert sol.ys.dtype == np.float32 and int(sol.stats["num_steps"]) < 100
    t = np.linspace(0.0, 5.0, 6)[1:]
    np.testing.assert_allclose(
        np.asarray(sol.ys[1:, 0]), np.cos(t) + np.sin(t) / 1000, atol=5e-2
    )


def test_readme_data_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "README lost its data example"
    ns: dict = {}
    exec(compile(blocks[1], str(README), "exec"), ns)
    assert len(ns["train"]) + len(ns["valid"]) + len(ns["test"]) == len(ns["ts"])
    assert ns["batch"].values.shape[0] == 32
