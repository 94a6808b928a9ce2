"""The table step's distinct rows: the numpy path on the CPU gives exactly what torch.unique gives."""
from __future__ import annotations

import pytest
import torch

from model.tables import unique_rows


@pytest.mark.parametrize("n, high", [(0, 5), (1, 5), (12_288, 1_800), (5_000, 300_000)])
def test_unique_rows_equals_torch_unique(n: int, high: int) -> None:
    idx = torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(n))
    rows, inv = unique_rows(idx)
    want_rows, want_inv = torch.unique(idx, return_inverse=True)
    assert rows.dtype == want_rows.dtype and inv.dtype == want_inv.dtype
    assert torch.equal(rows, want_rows) and torch.equal(inv, want_inv)
    assert torch.equal(rows[inv], idx)
