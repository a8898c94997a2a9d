"""The papers that ctmodels implements or follows, in one place.

`BIBTEX` maps a citation key to its BibTeX entry. A docstring cites a paper by name in
its text (for example "Rubanova et al., 2019") and gets the entry appended by the
`cites` decorator, so every entry is written once and every rendered docstring
(`help`, the documentation) still ends with its references in BibTeX:

```python
@cites("rubanova2019latent")
class LatentODE(eqx.Module):
    \"\"\"Latent ODE for irregularly sampled time series (Rubanova et al., 2019).\"\"\"
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

BIBTEX: dict[str, str] = {
    "rubanova2019latent": """\
@inproceedings{rubanova2019latent,
    title = {Latent Ordinary Differential Equations for Irregularly-Sampled Time
             Series},
    author = {Rubanova, Yulia and Chen, Ricky T. Q. and Duvenaud, David K.},
    booktitle = {Advances in Neural Information Processing Systems},
    volume = {32},
    year = {2019}
}""",
    "chen2018neural": """\
@inproceedings{chen2018neural,
    title = {Neural Ordinary Differential Equations},
    author = {Chen, Ricky T. Q. and Rubanova, Yulia and Bettencourt, Jesse and
              Duvenaud, David K.},
    booktitle = {Advances in Neural Information Processing Systems},
    volume = {31},
    year = {2018}
}""",
    "burda2016importance": """\
@inproceedings{burda2016importance,
    title = {Importance Weighted Autoencoders},
    author = {Burda, Yuri and Grosse, Roger and Salakhutdinov, Ruslan},
    booktitle = {International Conference on Learning Representations},
    year = {2016}
}""",
    "kidger2021on": """\
@phdthesis{kidger2021on,
    title = {On Neural Differential Equations},
    author = {Kidger, Patrick},
    school = {University of Oxford},
    year = {2021}
}""",
    "walker2011anderson": """\
@article{walker2011anderson,
    title = {Anderson Acceleration for Fixed-Point Iterations},
    author = {Walker, Homer F. and Ni, Peng},
    journal = {SIAM Journal on Numerical Analysis},
    volume = {49},
    number = {4},
    pages = {1715--1735},
    year = {2011},
    doi = {10.1137/10079074X}
}""",
    "broyden1965class": """\
@article{broyden1965class,
    title = {A Class of Methods for Solving Nonlinear Simultaneous Equations},
    author = {Broyden, C. G.},
    journal = {Mathematics of Computation},
    volume = {19},
    number = {92},
    pages = {577--593},
    year = {1965},
    doi = {10.1090/S0025-5718-1965-0198670-6}
}""",
    "bai2019deep": """\
@inproceedings{bai2019deep,
    title = {Deep Equilibrium Models},
    author = {Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
    booktitle = {Advances in Neural Information Processing Systems},
    volume = {32},
    year = {2019}
}""",
    "kingma2015adam": """\
@inproceedings{kingma2015adam,
    title = {Adam: A Method for Stochastic Optimization},
    author = {Kingma, Diederik P. and Ba, Jimmy},
    booktitle = {International Conference on Learning Representations},
    year = {2015}
}""",
    "loshchilov2017sgdr": """\
@inproceedings{loshchilov2017sgdr,
    title = {{SGDR}: Stochastic Gradient Descent with Warm Restarts},
    author = {Loshchilov, Ilya and Hutter, Frank},
    booktitle = {International Conference on Learning Representations},
    year = {2017}
}""",
    "bowman2016generating": """\
@inproceedings{bowman2016generating,
    title = {Generating Sentences from a Continuous Space},
    author = {Bowman, Samuel R. and Vilnis, Luke and Vinyals, Oriol and Dai, Andrew
              M. and Jozefowicz, Rafal and Bengio, Samy},
    booktitle = {Conference on Computational Natural Language Learning},
    year = {2016}
}""",
    "lotka1925elements": """\
@book{lotka1925elements,
    title = {Elements of Physical Biology},
    author = {Lotka, Alfred J.},
    publisher = {Williams \\& Wilkins},
    year = {1925}
}""",
    "grathwohl2019ffjord": """\
@inproceedings{grathwohl2019ffjord,
    title = {{FFJORD}: Free-form Continuous Dynamics for Scalable Reversible
             Generative Models},
    author = {Grathwohl, Will and Chen, Ricky T. Q. and Bettencourt, Jesse and
              Sutskever, Ilya and Duvenaud, David},
    booktitle = {International Conference on Learning Representations},
    year = {2019}
}""",
    "hutchinson1989stochastic": """\
@article{hutchinson1989stochastic,
    title = {A Stochastic Estimator of the Trace of the Influence Matrix for
             {L}aplacian Smoothing Splines},
    author = {Hutchinson, M. F.},
    journal = {Communications in Statistics - Simulation and Computation},
    volume = {18},
    number = {3},
    pages = {1059--1076},
    year = {1989}
}""",
    "finlay2020train": """\
@inproceedings{finlay2020train,
    title = {How to Train Your Neural {ODE}: the World of {J}acobian and Kinetic
             Regularization},
    author = {Finlay, Chris and Jacobsen, J{\\"o}rn-Henrik and Nurbekyan, Levon
              and Oberman, Adam M.},
    booktitle = {International Conference on Machine Learning},
    year = {2020}
}""",
    "kidger2021hey": """\
@inproceedings{kidger2021hey,
    title = {"{H}ey, that's not an {ODE}": Faster {ODE} Adjoints via
             Seminorms},
    author = {Kidger, Patrick and Chen, Ricky T. Q. and Lyons, Terry},
    booktitle = {International Conference on Machine Learning},
    year = {2021}
}""",
    "fung2022jfb": """\
@inproceedings{fung2022jfb,
    title = {{JFB}: {J}acobian-Free Backpropagation for Implicit Networks},
    author = {Wu Fung, Samy and Heaton, Howard and Li, Qiuwei and McKenzie, Daniel
              and Osher, Stanley and Yin, Wotao},
    booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
    volume = {36},
    number = {6},
    pages = {6648--6656},
    year = {2022}
}""",
    "geng2021training": """\
@inproceedings{geng2021training,
    title = {On Training Implicit Models},
    author = {Geng, Zhengyang and Zhang, Xin-Yu and Bai, Shaojie and Wang, Yisen and
              Lin, Zhouchen},
    booktitle = {Advances in Neural Information Processing Systems},
    volume = {34},
    year = {2021}
}""",
    "bai2021stabilizing": """\
@inproceedings{bai2021stabilizing,
    title = {Stabilizing Equilibrium Models by {J}acobian Regularization},
    author = {Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
    booktitle = {International Conference on Machine Learning},
    year = {2021}
}""",
    "kalman1960new": """\
@article{kalman1960new,
    title = {A New Approach to Linear Filtering and Prediction Problems},
    author = {Kalman, Rudolph E.},
    journal = {Journal of Basic Engineering},
    volume = {82},
    number = {1},
    pages = {35--45},
    year = {1960},
    doi = {10.1115/1.3662552}
}""",
    "rauch1965maximum": """\
@article{rauch1965maximum,
    title = {Maximum Likelihood Estimates of Linear Dynamic Systems},
    author = {Rauch, H. E. and Tung, F. and Striebel, C. T.},
    journal = {AIAA Journal},
    volume = {3},
    number = {8},
    pages = {1445--1450},
    year = {1965},
    doi = {10.2514/3.3166}
}""",
    "sarkka2021temporal": """\
@article{sarkka2021temporal,
    title = {Temporal Parallelization of {B}ayesian Smoothers},
    author = {S{\\"a}rkk{\\"a}, Simo and Garc{\\'i}a-Fern{\\'a}ndez, {\\'A}ngel F.},
    journal = {IEEE Transactions on Automatic Control},
    volume = {66},
    number = {1},
    pages = {299--306},
    year = {2021},
    doi = {10.1109/TAC.2020.2976316}
}""",
    "carter1994gibbs": """\
@article{carter1994gibbs,
    title = {On {G}ibbs Sampling for State Space Models},
    author = {Carter, C. K. and Kohn, R.},
    journal = {Biometrika},
    volume = {81},
    number = {3},
    pages = {541--553},
    year = {1994},
    doi = {10.1093/biomet/81.3.541}
}""",
    "fruhwirth1994data": """\
@article{fruhwirth1994data,
    title = {Data Augmentation and Dynamic Linear Models},
    author = {Fr{\\"u}hwirth-Schnatter, Sylvia},
    journal = {Journal of Time Series Analysis},
    volume = {15},
    number = {2},
    pages = {183--202},
    year = {1994},
    doi = {10.1111/j.1467-9892.1994.tb00184.x}
}""",
    "vanloan1978computing": """\
@article{vanloan1978computing,
    title = {Computing Integrals Involving the Matrix Exponential},
    author = {Van Loan, Charles F.},
    journal = {IEEE Transactions on Automatic Control},
    volume = {23},
    number = {3},
    pages = {395--404},
    year = {1978},
    doi = {10.1109/TAC.1978.1101743}
}""",
    "johnson2016composing": """\
@inproceedings{johnson2016composing,
    title = {Composing Graphical Models with Neural Networks for Structured
             Representations and Fast Inference},
    author = {Johnson, Matthew J. and Duvenaud, David K. and Wiltschko, Alex and
              Adams, Ryan P. and Datta, Sandeep R.},
    booktitle = {Advances in Neural Information Processing Systems},
    volume = {29},
    year = {2016}
}""",
}


def bibtex(*keys: str, indent: str = "") -> str:
    """The Markdown `bibtex` code block of the entries `keys` (in that order), each
    line prefixed by `indent`. Raises a `KeyError` naming an unknown key."""
    unknown = [k for k in keys if k not in BIBTEX]
    if unknown:
        raise KeyError(
            f"ctmodels._references has no entry {unknown[0]!r}; add its BibTeX to "
            "BIBTEX there (known: " + ", ".join(sorted(BIBTEX)) + ")."
        )
    body = "\n".join(BIBTEX[k] for k in keys)
    lines = ["```bibtex", *body.splitlines(), "```"]
    return "\n".join(indent + line if line else line for line in lines)


def _indent(doc: str) -> str:
    """The common indentation of a docstring's lines after the first (empty when the
    docstring is one line, or was dedented by the compiler)."""
    rest = [line for line in doc.splitlines()[1:] if line.strip()]
    if not rest:
        return ""
    width = min(len(line) - len(line.lstrip(" ")) for line in rest)
    return " " * width


def cites(*keys: str) -> Callable[[_T], _T]:
    """A decorator for a class or function that cites `keys`: it appends a
    "Reference:" paragraph with their BibTeX (`bibtex`) to the docstring, at the
    docstring's own indentation. Unknown keys fail at import time."""
    bibtex(*keys)  # unknown keys fail here, at import

    def add(obj: _T) -> _T:
        doc = obj.__doc__
        if doc is None:  # python -OO
            return obj
        pad = _indent(doc)
        title = "References:" if len(keys) > 1 else "Reference:"
        obj.__doc__ = (
            doc.rstrip() + f"\n\n{pad}{title}\n\n" + bibtex(*keys, indent=pad) + "\n"
        )
        return obj

    return add
