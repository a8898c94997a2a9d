"""`ctmodels.data`: irregular time series in and out (xarray, pandas), batching, tasks.

This is the only part of ctmodels (besides `ctmodels.datasets`, which builds
`xarray.Dataset`s) that imports xarray and pandas.
"""

from ._batch import (
    Batch as Batch,
    batches as batches,
    bucket_length as bucket_length,
    common_length as common_length,
    extrapolation_task as extrapolation_task,
    interpolation_task as interpolation_task,
    make_batch as make_batch,
    num_batches as num_batches,
    read_batch as read_batch,
    shuffle_order as shuffle_order,
    time_length as time_length,
)
from ._pandas import from_pandas as from_pandas
from ._prep import (
    Normalizer as Normalizer,
    split_series as split_series,
    unbatch as unbatch,
)
from ._time_units import (
    TIME_UNITS as TIME_UNITS,
    canonical_time_unit as canonical_time_unit,
    ns_per_time_unit as ns_per_time_unit,
)
from ._timeseries import Metadata as Metadata, TimeSeries as TimeSeries
from ._xarray import (
    LazyTimeSeries as LazyTimeSeries,
    from_xarray as from_xarray,
    to_xarray as to_xarray,
)
