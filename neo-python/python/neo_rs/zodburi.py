"""zodburi resolver: ``neo://name@host:port[,host:port...]?options``.

Options named like a key of the <NEOStorage> section (``read_only`` or ``read-only``,
``compress``, ``cache-size``, ``ca``, ``cert``, ``key``, ...) go to the storage; the others
(``database_name``, ``cache_size``...) are returned as DB options. ``neos://`` forces TLS, with
``$NEO_CA``, ``$NEO_CERT`` and ``$NEO_KEY`` as defaults for ca, cert and key.
"""

import os
from urllib.parse import parse_qsl, urlsplit

import ZODB.config

_STORAGE_KEYS = None


def _storage_keys():
    """Keys of the <NEOStorage> section, read from component.xml."""
    global _STORAGE_KEYS
    if _STORAGE_KEYS is None:
        import ZConfig
        from io import StringIO
        schema = ZConfig.loadSchemaFile(StringIO(
            '<schema><import package="ZODB"/><import package="neo_rs"/></schema>'))
        _STORAGE_KEYS = {k for k, _ in schema.gettype("NEOStorage")}
    return _STORAGE_KEYS


def parse_uri(uri):
    """(ZConfig text of the storage, DB options) for ``uri``; ValueError if malformed."""
    parts = urlsplit(uri)
    if parts.scheme not in ("neo", "neos"):
        raise ValueError("invalid uri %s: the scheme must be neo:// or neos://" % uri)
    if parts.path or parts.fragment:
        raise ValueError("invalid uri %s: no path nor fragment expected" % uri)
    name, sep, masters = parts.netloc.partition("@")
    if not sep or not name or not masters:
        raise ValueError("invalid uri %s: expected neo://name@host:port[,host:port...]" % uri)
    storage = {"master_nodes": " ".join(m for m in masters.split(",") if m), "name": name}
    keys = _storage_keys()
    dbkw = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        key = k.lower().replace("_", "-")
        if k in ("master_nodes", "name") or key in ("master-nodes", "name"):
            raise ValueError("invalid uri %s: %s goes in the address part" % (uri, k))
        if k in keys:
            storage[k] = v
        elif key in keys:
            storage[key] = v
        else:
            dbkw[k] = v
    if parts.scheme == "neos":
        for k in ("ca", "cert", "key"):
            if k not in storage:
                env = "NEO_" + k.upper()
                if env not in os.environ:
                    raise ValueError("invalid uri %s: no %s option and $%s is not set" % (uri, k, env))
                storage[k] = os.environ[env]
    lines = ["%import neo_rs", "<NEOStorage>"]
    for k, v in storage.items():
        if any(c in str(v) for c in "\n<>"):
            raise ValueError("invalid uri %s: bad value for %s" % (uri, k))
        lines.append("  %s %s" % (k, v))
    lines.append("</NEOStorage>")
    return "\n".join(lines) + "\n", dbkw


def resolve_uri(uri):
    """The zodburi entry point: (storage factory, DB options)."""
    zconf, dbkw = parse_uri(uri)

    def factory():
        return ZODB.config.storageFromString(zconf)

    return factory, dbkw
