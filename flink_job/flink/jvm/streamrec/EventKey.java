package streamrec;

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
 * the payload is one well-formed JSON object whose top-level {@code user_id} and {@code event_id} are ids. A
 * truncated or garbled copy of an event therefore never takes the key of the event itself.
 *
 * <p>The ids are the ones the parser ({@code flink_job/stages/parse.py}) reads: member names and values with their escapes
 * decoded; a string, or an integer within 64 bits written as its decimal string (so 42 and "42" are one id); an id
 * with a control character, U+FFFD (bytes that were not UTF-8) or a lone surrogate is none. A record that names
 * {@code user_id} or {@code event_id} more than once, at any depth, is ambiguous: no key, as the parser
 * dead-letters it. Whatever the input (nesting beyond Jackson's limits, huge numbers or strings), it never throws:
 * any failure means no key.
 */
public final class EventKey extends ScalarFunction {
    private static final JsonFactory JSON = new JsonFactory();

    public String eval(String payload) {
        if (payload == null) {
            return null;
        }
        try {
            return key(payload);
        } catch (Exception | StackOverflowError e) {
            return null; // not JSON, or beyond the reader's limits: the parser names the reason
        }
    }

    private static String key(String payload) throws Exception {
        String user = null;
        String event = null;
        boolean userNamed = false;
        boolean eventNamed = false;
        try (JsonParser p = JSON.createParser(payload)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                return null;
            }
            int depth = 1;
            while (depth > 0) {
                JsonToken t = p.nextToken();
                if (t == null) {
                    return null; // truncated
                }
                switch (t) {
                    case START_OBJECT:
                    case START_ARRAY:
                        depth++;
                        break;
                    case END_OBJECT:
                    case END_ARRAY:
                        depth--;
                        break;
                    case FIELD_NAME:
                        String name = p.currentName();
                        boolean isUser = "user_id".equals(name);
                        if (!isUser && !"event_id".equals(name)) {
                            break;
                        }
                        if (isUser ? userNamed : eventNamed) {
                            return null; // named twice: ambiguous
                        }
                        if (isUser) {
                            userNamed = true;
                        } else {
                            eventNamed = true;
                        }
                        if (depth == 1) { // the event's own id; a nested one only counts as a naming
                            String id = id(p, p.nextToken());
                            if (id == null) {
                                return null;
                            }
                            if (isUser) {
                                user = id;
                            } else {
                                event = id;
                            }
                        }
                        break;
                    default:
                        break;
                }
            }
            if (p.nextToken() != null) {
                return null; // more than one value
            }
        }
        return user == null || event == null ? null : user + '\u001f' + event;
    }

    /** The id a member's value is, or null if it is none. */
    private static String id(JsonParser p, JsonToken value) throws Exception {
        String text;
        if (value == JsonToken.VALUE_STRING) {
            text = p.getText();
        } else if (value == JsonToken.VALUE_NUMBER_INT) {
            JsonParser.NumberType type = p.getNumberType();
            if (type != JsonParser.NumberType.INT && type != JsonParser.NumberType.LONG) {
                return null; // beyond 64 bits
            }
            return Long.toString(p.getLongValue()); // canonical: -0 is 0, as Python's str(int)
        } else {
            return null;
        }
        return usable(text) ? text : null;
    }

    /** Whether an id's characters are ones the parser accepts (the key joins ids with a control character). */
    private static boolean usable(String s) {
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c < 32 || (c >= 127 && c < 160) || c == '\ufffd' || Character.isLowSurrogate(c)) {
                return false;
            }
            if (Character.isHighSurrogate(c)) {
                if (i + 1 < s.length() && Character.isLowSurrogate(s.charAt(i + 1))) {
                    i++;
                } else {
                    return false;
                }
            }
        }
        return true;
    }
}
