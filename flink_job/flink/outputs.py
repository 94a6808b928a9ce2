"""Row types shared by the topology and the training stage."""
from __future__ import annotations

from pyflink.common import Types

# (shard, lines): one processing-time chunk of de-duplicated records of one user shard.
CHUNK = Types.ROW_NAMED(["shard", "lines"], [Types.INT(), Types.BASIC_ARRAY(Types.STRING())])
# (sender, payload): another trainer's item delta record, its key ("<trainer>:<sequence>") and encoded delta.
DELTA = Types.ROW_NAMED(["sender", "payload"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE())])
# Everything one call of the training stage produced, in one row that the JVM unnests into the topics:
# embeddings (key -> value bytes, JSON or binary by publish.format; a null value is a tombstone), dead letters
# (JSON; the JVM derives each one's key from its partition and offset), job-stats records (JSON) and, of
# user-sharded trainers, item delta records (key -> encoded delta).
# One row instead of side outputs: PyFlink reads each side output through a Python identity map, a second Python
# operator per output with bundles of its own, which the task thread waits for as it does for the trainer's.
# No rows nested in arrays: in thread mode PyFlink's Java converter fills every element of an array of rows with
# one reused row object, so a call's dead letters all came out as copies of its last one (tests/test_restore.py).
STAGE_OUTPUT = Types.ROW_NAMED(
    ["embeddings", "dead_letters", "stats", "deltas"],
    [Types.MAP(Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE())), Types.BASIC_ARRAY(Types.STRING()),
     Types.BASIC_ARRAY(Types.STRING()), Types.MAP(Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()))],
)
