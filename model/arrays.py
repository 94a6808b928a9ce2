"""Array type aliases for the model's NumPy boundary (ids in, rows and vectors out)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.int64]  # table rows
Array = npt.NDArray[Any]  # numeric input columns (action codes, values, weights), converted on entry
