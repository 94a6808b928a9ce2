"""Kafka client security settings: secret references, redaction, and the Java -> librdkafka translation.

``kafka.client_properties`` holds Java-style Kafka client settings (the names the Flink Kafka connector takes).
Secrets never appear in them as literals: a value names where the secret lives, and is resolved only when a
client is built:

- ``${env:NAME}``: the environment variable ``NAME`` (a Kubernetes Secret mounted with ``env.valueFrom``);
- ``${file:/path}``: the contents of a file, without its trailing newline (a Secret mounted as a volume).

A reference can stand inside a longer value (the JAAS line), and ``$${`` writes a literal ``${``. The config
keeps the references, so a logged, printed or dumped config (``repr``, ``to_dict``, the YAML the runner writes)
shows where a secret comes from, never its value.

>>> import os
>>> os.environ["DOCTEST_KAFKA_PASSWORD"] = "s3cret"
>>> props = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
...          "sasl.username": "app", "sasl.password": "${env:DOCTEST_KAFKA_PASSWORD}"}
>>> java_properties(props)["sasl.jaas.config"]
'org.apache.flink.kafka.shaded.org.apache.kafka.common.security.plain.PlainLoginModule required username="app" password="s3cret";'
>>> librdkafka_properties(props)["sasl.password"]
's3cret'
>>> redacted(props)["sasl.password"]
'<secret ${env:DOCTEST_KAFKA_PASSWORD}>'
>>> resolve("${env:DOCTEST_NOT_SET}", "sasl.password")
Traceback (most recent call last):
...
ValueError: kafka.client_properties.sasl.password: environment variable DOCTEST_NOT_SET is not set
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# ${env:NAME} or ${file:PATH}; "$${" is a literal "${".
_REFERENCE = re.compile(r"\$(\$)?\{(env|file):([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A key is secret if its name contains one of these (the rule Flink and Kafka use for their own redaction, plus the
# librdkafka names). Such a value must be a reference: a literal there fails validation.
_SENSITIVE = ("password", "secret", "jaas", "token", "credential", "apikey", "api.key", "keystore.key", ".pem")
_NOT_SENSITIVE = ("ssl.ca.pem", "ssl.certificate.pem")  # public certificates
# Further names whose values are hidden in logs, though a literal is allowed there (Flink options, and Kafka
# settings that may or may not hold a secret): key files and private keys, passphrases, OAuth settings.
_REDACTED = ("passphrase", "oauthbearer.config", "private", "ssl.key.", "account.key", "access-key", "access.key")
_NOT_REDACTED_SUFFIXES = (".location", ".type", ".algorithm")  # paths and algorithm names, not secrets

# Java client settings that librdkafka does not have (it would refuse to start): dropped for the Python clients.
# The JAAS line is translated instead (see librdkafka_properties); a JKS/PKCS#12 truststore has no librdkafka
# counterpart: give the CA as PEM in ssl.ca.location, which the Java client ignores.
JAVA_ONLY = frozenset({
    "sasl.jaas.config",
    "ssl.truststore.location", "ssl.truststore.password", "ssl.truststore.type", "ssl.truststore.certificates",
    "ssl.keystore.type", "ssl.keystore.certificate.chain", "ssl.keystore.key",
    "ssl.protocol", "ssl.enabled.protocols", "ssl.keymanager.algorithm", "ssl.trustmanager.algorithm",
    "ssl.secure.random.implementation", "ssl.engine.factory.class", "ssl.provider",
    "sasl.login.callback.handler.class", "sasl.client.callback.handler.class", "sasl.login.class",
})
# librdkafka settings the Java client does not know: dropped for the Flink connector (username and password
# become its JAAS line). The Java client would only warn about them, but they would also land in the job graph.
LIBRDKAFKA_ONLY = frozenset({
    "sasl.username", "sasl.password", "sasl.mechanisms",
    "ssl.ca.location", "ssl.ca.pem", "ssl.certificate.location", "ssl.certificate.pem", "ssl.key.location",
    "ssl.key.pem", "enable.ssl.certificate.verification", "ssl.ca.certificate.stores",
})
# Settings the job sets itself, per client and table: given here they would be ambiguous.
RESERVED = frozenset({
    "bootstrap.servers", "group.id", "key.serializer", "value.serializer", "key.deserializer",
    "value.deserializer", "transactional.id", "enable.auto.commit",
})

_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
# The Flink connector's jar (flink-sql-connector-kafka) relocates the Kafka client: its login modules and callback
# handlers are org.apache.flink.kafka.shaded.org.apache.kafka.*, and the unshaded names given in the Kafka docs
# fail at its first login ("No LoginModule found"). Kafka's own class names are rewritten for it.
CONNECTOR_SHADE = "org.apache.flink.kafka.shaded."
_KAFKA_CLASS = re.compile(r"(?<![\w.])org\.apache\.kafka\.")
_CLASS_KEYS = ("sasl.jaas.config", "sasl.login.callback.handler.class", "sasl.client.callback.handler.class",
               "sasl.login.class", "ssl.engine.factory.class")
_JAAS = re.compile(r"^\s*(?P<module>[\w.$]+)\s+(?P<flag>required|requisite|sufficient|optional)(?P<options>.*?);?\s*$",
                   re.DOTALL)
_JAAS_OPTION = re.compile(r'(?P<key>[\w.-]+)\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>[^\s;"]+))')


def is_sensitive(key: str) -> bool:
    """Whether ``key`` holds a secret.

    >>> is_sensitive("sasl.jaas.config"), is_sensitive("ssl.keystore.password"), is_sensitive("security.protocol")
    (True, True, False)
    """
    k = key.lower()
    return k not in _NOT_SENSITIVE and any(s in k for s in _SENSITIVE)


def is_redacted(key: str) -> bool:
    """Whether ``key``'s value is hidden wherever settings are shown (logs, errors, ``repr``): the secret keys of
    ``is_sensitive`` and any key that may hold a secret or a key (``*passphrase*``, ``ssl.key.*``, ``*.key``,
    ``*-key``, ``sasl.oauthbearer.config``); paths to key files stay visible.

    >>> [is_redacted(k) for k in ("s3.secret-key", "fs.azure.account.key.acct", "my.passphrase", "ssl.key.pem",
    ...                           "sasl.oauthbearer.config", "ssl.key.location", "rest.port", "key.fields")]
    [True, True, True, True, True, False, False, False]
    """
    k = key.lower()
    if k.endswith(_NOT_REDACTED_SUFFIXES) and not is_sensitive(k):
        return False
    return (is_sensitive(k) or any(s in k for s in _REDACTED)
            or k.endswith(("key", ".key", "-key", "_key")) or ".key." in k)


def redacted_value(key: str, value: object) -> object:
    """``value`` as logs may show it: for a key of ``is_redacted``, only the references it names."""
    if not is_redacted(key):
        return value
    return f"<secret {' '.join(references(str(value))) or 'literal'}>"


def redacted_args(args: Sequence[str]) -> list[str]:
    """A command line fit for logs: ``key=value`` and YAML mappings after ``--set`` keep their keys, and any value
    that follows a key of ``is_redacted`` is hidden.

    >>> redacted_args(["--set", "flink.options={s3.secret-key: abc, rest.port: 1}", "--set", "a.password=x"])
    ['--set', 'flink.options={s3.secret-key: <secret>, rest.port: 1}', '--set', 'a.password=<secret>']
    """
    return [_REDACT_IN_ARG.sub(lambda m: m.group(1) + ("<secret>" if is_redacted(m.group(2)) else m.group(3)), a)
            for a in args]


# key=value, key: value (YAML flow mappings): the key, and the value up to the next separator
_REDACT_IN_ARG = re.compile(r"((?:^|[\s{,])([\w.$-]+)\s*(?:=|:\s+))([^,{}]*)")


def references(value: str) -> list[str]:
    """The ``${env:..}``/``${file:..}`` references in ``value``, as written.

    >>> references('x password="${env:A}" ${file:/run/b} $${env:literal}')
    ['${env:A}', '${file:/run/b}']
    """
    return [m.group(0) for m in _REFERENCE.finditer(value) if not m.group(1)]


def resolve(value: str, key: str, quote: Callable[[str], str] | None = None,
            section: str = "kafka.client_properties") -> str:
    """``value`` with every reference replaced by the secret it names (passed through ``quote`` if given); raises
    ``ValueError`` naming ``section.key`` and the variable or file (never a value) if one is missing."""

    def one(m: re.Match[str]) -> str:
        secret = _lookup(m)
        return quote(secret) if quote and not m.group(1) else secret

    def _lookup(m: re.Match[str]) -> str:
        if m.group(1):  # $${...}: a literal ${...}
            return m.group(0)[1:]
        kind, name = m.group(2), m.group(3)
        where = f"{section}.{key}"
        if kind == "env":
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{where}: ${{env:{name}}} is not a valid environment variable name")
            if name not in os.environ:
                raise ValueError(f"{where}: environment variable {name} is not set")
            return os.environ[name]
        try:
            return Path(name).read_text().rstrip("\r\n")
        except OSError as ex:
            raise ValueError(f"{where}: cannot read secret file {name}: {ex.strerror}") from None

    return _REFERENCE.sub(one, value)


def check(props: Mapping[str, str]) -> None:
    """Validation at config load: keys allowed, every secret given as a reference, every reference resolvable.

    >>> check({"sasl.password": "hunter2"})
    Traceback (most recent call last):
    ...
    ValueError: kafka.client_properties.sasl.password holds a secret: give it as ${env:NAME} or ${file:PATH}, not as a literal
    """
    for key, value in props.items():
        if key in RESERVED:
            raise ValueError(f"kafka.client_properties.{key} is set by the job itself (kafka.bootstrap, "
                             f"kafka.group_id, ...); remove it from client_properties")
        if key.startswith("properties."):
            raise ValueError(f"kafka.client_properties.{key}: give the Kafka client key without the 'properties.' "
                             f"prefix (the job adds it for the Flink connector)")
        if is_sensitive(key):
            _check_literal_free(key, value)
        resolve(value, key)
    if "sasl.jaas.config" in props and ("sasl.username" in props or "sasl.password" in props):
        raise ValueError("kafka.client_properties: give either sasl.jaas.config or sasl.username/sasl.password, "
                         "not both")


def _check_literal_free(key: str, value: str) -> None:
    message = (f"kafka.client_properties.{key} holds a secret: give it as ${{env:NAME}} or ${{file:PATH}}, "
               f"not as a literal")
    if key.lower().endswith("jaas.config"):
        # The JAAS line may spell out the module and user name; its secret options must be references.
        parsed = _JAAS.match(value)
        options = _JAAS_OPTION.finditer(parsed.group("options")) if parsed else iter(())
        for m in options:
            if is_sensitive(m.group("key")) or m.group("key").lower() in ("password", "keytab"):
                given = m.group("quoted") if m.group("quoted") is not None else m.group("bare")
                if _REFERENCE.fullmatch(given) is None or given.startswith("$$"):
                    raise ValueError(message)
        if not references(value):
            raise ValueError(message)
        return
    if not references(value) or _REFERENCE.sub("", value).strip():
        raise ValueError(message)


def redacted(props: Mapping[str, object]) -> dict[str, object]:
    """``props`` fit for logs: secret values replaced by the references they come from."""
    return {k: redacted_value(k, v) for k, v in props.items()}


def write_private(path: Path, data: str | bytes) -> None:
    """Writes ``path`` readable by its owner only (0600) from the first byte: settings files may hold secrets.
    A new file replaces the old one, so an existing file's wider mode does not carry over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover partial file of ours keeps the mode it had
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def open_private_log(path: Path) -> int:
    """A file descriptor appending to ``path``, created 0600: a job's log may show settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def java_properties(props: Mapping[str, str]) -> dict[str, str]:
    """Resolved settings for the Java Kafka client of the Flink connector: ``sasl.username``/``sasl.password``
    become the JAAS line of ``sasl.mechanism`` (PLAIN or SCRAM), librdkafka-only keys are dropped, and Kafka's
    class names (login modules, callback handlers) take the connector's shaded package."""
    out = {k: resolve(v, k, jaas_quote if k == "sasl.jaas.config" else None)
           for k, v in props.items() if k not in LIBRDKAFKA_ONLY}
    if "sasl.username" in props or "sasl.password" in props:
        mechanism = props.get("sasl.mechanism", props.get("sasl.mechanisms", "PLAIN")).upper()
        if mechanism not in _LOGIN_MODULES:
            raise ValueError(f"kafka.client_properties: sasl.username/sasl.password need sasl.mechanism PLAIN or "
                             f"SCRAM-SHA-256/512, got {mechanism!r}; give sasl.jaas.config for other mechanisms")
        user = jaas_quote(resolve(props.get("sasl.username", ""), "sasl.username"))
        password = jaas_quote(resolve(props.get("sasl.password", ""), "sasl.password"))
        out["sasl.mechanism"] = mechanism
        out["sasl.jaas.config"] = f'{_LOGIN_MODULES[mechanism]} required username="{user}" password="{password}";'
    for key in _CLASS_KEYS:
        if key in out:
            out[key] = _KAFKA_CLASS.sub(CONNECTOR_SHADE + "org.apache.kafka.", out[key], count=1)
    return out


def librdkafka_properties(props: Mapping[str, str]) -> dict[str, str]:
    """Resolved settings for confluent-kafka (librdkafka): a PLAIN/SCRAM JAAS line becomes ``sasl.username`` and
    ``sasl.password``, an empty ``ssl.endpoint.identification.algorithm`` becomes ``none``, Java-only keys are
    dropped."""
    out = {k: resolve(v, k) for k, v in props.items() if k not in JAVA_ONLY}
    if "sasl.jaas.config" in props:
        out.update(_jaas_to_librdkafka(props["sasl.jaas.config"]))
    if out.get("ssl.endpoint.identification.algorithm", None) == "":
        out["ssl.endpoint.identification.algorithm"] = "none"  # the Java client's "" (no host name check)
    return out


def jaas_quote(value: str) -> str:
    """``value`` inside a JAAS option's double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _jaas_to_librdkafka(jaas: str) -> dict[str, str]:
    parsed = _JAAS.match(jaas)
    module = parsed.group("module").removeprefix(CONNECTOR_SHADE) if parsed else ""
    if not parsed or module not in set(_LOGIN_MODULES.values()):
        # The message names the module only: the line itself holds the secret.
        raise ValueError(f"kafka.client_properties.sasl.jaas.config: login module {module or '(unparsable)'} has no "
                         f"librdkafka translation (PLAIN and SCRAM have); give sasl.username/sasl.password or the "
                         f"librdkafka settings instead")
    options = {}  # parsed before the references are resolved, so a secret may hold quotes or backslashes
    for m in _JAAS_OPTION.finditer(parsed.group("options")):
        quoted = m.group("quoted")
        given = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else m.group("bare")
        options[m.group("key")] = resolve(given, "sasl.jaas.config")
    return {"sasl.username": options.get("username", ""), "sasl.password": options.get("password", "")}
