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
    z = np.asarray(ns["z"])
    np.testing.assert_allclose(z, np.tanh(0.5 * z + 1.0), atol=1e-5)


def test_readme_data_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "README lost its data example"
    ns: dict = {}
    exec(compile(blocks[1], str(README), "exec"), ns)
    assert len(ns["train"]) + len(ns["valid"]) + len(ns["test"]) == len(ns["ts"])
    assert ns["batch"].values.shape[0] == 32
