"""Row types and side-output tags shared by the topology and the training stage."""
from __future__ import annotations

from pyflink.common import Types
from pyflink.datastream import OutputTag

# (shard, lines): one processing-time chunk of de-duplicated records of one user shard.
CHUNK = Types.ROW_NAMED(["shard", "lines"], [Types.INT(), Types.BASIC_ARRAY(Types.STRING())])
# (k, v): the Kafka record key and value, both strings.
KEY_VALUE = Types.ROW_NAMED(["k", "v"], [Types.STRING(), Types.STRING()])
# (records): one map per training batch, key -> embedding JSON; the JVM unnests it into Kafka records.
EMBEDDING_BATCH = Types.ROW_NAMED(["records"], [Types.MAP(Types.STRING(), Types.STRING())])
DEAD_LETTER_TAG = OutputTag("dead-letters", KEY_VALUE)
STATS_TAG = OutputTag("stats", KEY_VALUE)
