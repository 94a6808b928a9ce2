"""How many bytes the model holds per admitted id (docs/model.md, "Ids and bounded memory"): a diagnostic that reads
the model's parts, kept out of the model core (``model.mf``)."""
from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.mf import OnlineBiasedMF


def memory_report(m: OnlineBiasedMF) -> dict[str, dict[str, float]]:
    """Bytes per admitted id of each table: rows (parameters, optimiser state, counters, anchor) at the table's
    allocated capacity, plus the id map; and the shared structures (sampler, reservoir, sightings)."""
    out: dict[str, dict[str, float]] = {}
    ids = m.lifecycle
    for kind, idmap, table, seen in (("user", ids.users, m.user_table, ids.user_sightings),
                                     ("item", ids.items, m.item_table, ids.item_sightings)):
        table_bytes = table.bytes_per_row() * table.params.shape[0]
        map_bytes = idmap.nbytes()
        held = max(len(idmap), 1)
        out[kind] = {
            "ids": len(idmap), "capacity": table.params.shape[0], "row_bytes": table.bytes_per_row(),
            "table_bytes": table_bytes, "idmap_bytes": map_bytes, "bytes_per_id": (table_bytes + map_bytes) / held,
            "pending_ids": len(seen), "pending_bytes": len(pickle.dumps(seen.counts)),
        }
    sampler = m.ranking.sampler
    out["shared"] = {
        "sampler_bytes": sampler.weight.nbytes + sampler.tree.nbytes,
        "reservoir_bytes": sum(c.nbytes for c in m.reservoir.columns.values()),
    }
    return out
