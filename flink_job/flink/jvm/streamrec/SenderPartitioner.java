package streamrec;

import java.nio.charset.StandardCharsets;

import org.apache.flink.connector.kafka.sink.KafkaPartitioner;

/**
 * The item-delta sink's partitioner: every record of one sending trainer goes to the same partition, the sender's
 * index modulo the partitions, whichever sink subtask writes it.
 *
 * <p>The record key is {@code "<trainer>:<sequence>"} ({@code flink_job/stages/trainers.py}). A receiver applies
 * each sender's deltas in sequence order and skips a sequence at or below the last it applied, so a sender's
 * records must stay in one partition. Flink's {@code fixed} partitioner picks the partition by the sink subtask,
 * which changes for a trainer when a job with several trainers per subtask is restored at another parallelism. A
 * key that is not of that form goes to the first partition.
 */
public final class SenderPartitioner<T> implements KafkaPartitioner<T> {

    private static final long serialVersionUID = 1L;

    @Override
    public int partition(T record, byte[] key, byte[] value, String targetTopic, int[] partitions) {
        return partitions[Math.floorMod(sender(key), partitions.length)];
    }

    static int sender(byte[] key) {
        if (key == null) {
            return 0;
        }
        String text = new String(key, StandardCharsets.UTF_8);
        int colon = text.indexOf(':');
        try {
            return Integer.parseInt(colon < 0 ? text : text.substring(0, colon));
        } catch (NumberFormatException e) {
            return 0;
        }
    }
}
