"""`ctmodels.datasets`: real and synthetic (irregularly sampled) datasets as xarray.

`load(name)` returns an `xarray.Dataset` in the ctmodels layout; `available()` lists
the datasets. The bundled files and their data cards live in the top-level `datasets/`
folder of the source tree (shipped inside the wheel as `ctmodels/_data_files`);
`nafld2` is built on first use and cached in `cache_dir()`; the synthetic generators
(`periodic`, `spirals`, `lotka_volterra`, `linear_gaussian`) are also plain functions.
"""

from ._load import (
    available as available,
    cache_dir as cache_dir,
    card as card,
    load as load,
    names as names,
)
from ._synthetic import (
    linear_gaussian as linear_gaussian,
    lotka_volterra as lotka_volterra,
    oscillator_transition as oscillator_transition,
    periodic as periodic,
    spirals as spirals,
)
