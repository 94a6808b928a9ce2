package streamrec;

import org.apache.flink.table.functions.TableFunction;

/**
 * OTHER_TRAINERS(sender, routeKeys): the route keys of every user-sharded trainer but the one that sent an item
 * delta record, one row each.
 *
 * <p>{@code sender} is the record's key, {@code "<trainer>:<sequence>"}; {@code routeKeys} the trainers' route keys
 * in trainer order, comma-separated ({@code flink_job/flink/topology.py route_keys}). A sender that is not of that
 * form gets every key, so that each trainer sees the record and dead-letters it. One correlated function instead of
 * a projection per trainer keeps the plan, and so the operators' generated uids, the same whatever the number of
 * trainers, and instead of a join against a list of keys keeps no state.
 */
public final class OtherTrainers extends TableFunction<Integer> {

    public void eval(String sender, String routeKeys) {
        int self = -1;
        if (sender != null) {
            int colon = sender.indexOf(':');
            try {
                self = Integer.parseInt(colon < 0 ? sender : sender.substring(0, colon));
            } catch (NumberFormatException e) {
                self = -1; // not a trainer's key: every trainer gets it
            }
        }
        String[] keys = routeKeys.split(",");
        for (int i = 0; i < keys.length; i++) {
            if (i != self) {
                collect(Integer.parseInt(keys[i].trim()));
            }
        }
    }
}
