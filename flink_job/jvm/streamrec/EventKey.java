package streamrec;

import java.io.IOException;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * EVENT_KEY(payload): the de-duplication key of one raw event, {@code user_id + U+001F + event_id}, or NULL.
 *
 * <p>One streaming pass over the JSON instead of two {@code JSON_VALUE} calls, each of which reads the whole
 * object into a map first (the largest cost of the source task in a JFR profile). The key is NULL, so that the
 * record is keyed by its input position and reaches the Python parser, which dead-letters it with a reason, unless
 * the payload is one well-formed JSON object whose top-level {@code user_id} and {@code event_id} are strings that
 * occur once each. A truncated or garbled copy of an event therefore never takes the key of the event itself.
 */
public final class EventKey extends ScalarFunction {
    private static final JsonFactory JSON = new JsonFactory();

    public String eval(String payload) {
        if (payload == null) {
            return null;
        }
        String user = null;
        String event = null;
        try (JsonParser p = JSON.createParser(payload)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                return null;
            }
            JsonToken t;
            while ((t = p.nextToken()) == JsonToken.FIELD_NAME) {
                String name = p.currentName();
                JsonToken value = p.nextToken();
                if (value == JsonToken.START_OBJECT || value == JsonToken.START_ARRAY) {
                    p.skipChildren(); // nested ids are not the event's
                } else if ("user_id".equals(name)) {
                    if (user != null || value != JsonToken.VALUE_STRING) {
                        return null;
                    }
                    user = p.getText();
                } else if ("event_id".equals(name)) {
                    if (event != null || value != JsonToken.VALUE_STRING) {
                        return null;
                    }
                    event = p.getText();
                }
            }
            if (t != JsonToken.END_OBJECT || p.nextToken() != null) {
                return null; // truncated, or more than one value
            }
        } catch (IOException e) {
            return null; // not JSON
        }
        return user == null || event == null ? null : user + '\u001f' + event;
    }
}
