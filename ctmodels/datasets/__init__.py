"""`ctmodels.datasets`: real irregularly sampled time series bundled with ctmodels.

The files and their data cards live in the top-level `datasets/` folder of the source
tree (shipped inside the wheel as `ctmodels/_data_files`).
"""

from ._load import (
    available as available,
    card as card,
    load as load,
    names as names,
)
