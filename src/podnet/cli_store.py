"""`podnet store get`: what the cluster state store holds, as `etcdctl get` shows it.

    podnet store get KEY [--store etcd://HOST:PORT] [-o json]
    podnet store get --prefix /registry/ [--keys-only] [--store etcd://HOST:PORT] [-o json]

Layer: lab (the user's edge); reads through `podnet.store`. Each key is printed with its
mod_revision and lease (hex, as etcdctl prints lease IDs), then its value on the next line, as
`etcdctl get` prints key and value; `-o json` prints one object with the revision and the kvs.
Only an etcd store can be read from outside: the embedded store lives inside the podnet process
that runs the nodes.
"""

from __future__ import annotations

import json
import sys

from podnet.errors import ConfigError


def cmd_store(args) -> int:
    from podnet.store import open_store

    if not args.store.startswith(("etcd://", "http://", "https://")):
        raise ConfigError("--store: only an etcd store can be read from another process "
                          "(the embedded store lives inside the podnet process); give "
                          "etcd://HOST:PORT")
    if (args.key is None) == (args.prefix is None):
        raise ConfigError("podnet store get: give a KEY or --prefix PREFIX")
    with open_store(args.store) as store:
        if args.prefix is not None:
            listing = store.list(args.prefix)
            kvs, revision = list(listing), listing.revision
        else:
            kv = store.get(args.key)
            kvs, revision = [kv] if kv is not None else [], store.revision()
    if args.output == "json":
        print(json.dumps({"revision": revision, "kvs": [
            {"key": kv.key, "create_revision": kv.create_revision,
             "mod_revision": kv.mod_revision, "version": kv.version, "lease": f"{kv.lease:x}",
             "value": kv.value.decode("utf-8", errors="replace")} for kv in kvs]}, indent=2))
        return 0
    for kv in kvs:
        lease = f" lease={kv.lease:x}" if kv.lease else ""
        print(f"{kv.key}  (mod_revision={kv.mod_revision}{lease})")
        if not args.keys_only:
            print(kv.value.decode("utf-8", errors="replace"))
    if not kvs:
        print(f"podnet store: nothing at {args.prefix or args.key} (revision {revision})",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    store = sub.add_parser("store", help="read the cluster state store (etcd)")
    actions = store.add_subparsers(dest="action", required=True)
    get = actions.add_parser("get", help="keys and values, as etcdctl get")
    get.add_argument("key", nargs="?")
    get.add_argument("--prefix", help="every key under this prefix, e.g. /registry/")
    get.add_argument("--keys-only", action="store_true")
    get.add_argument("--store", default="embedded", help="etcd://HOST:PORT")
    get.add_argument("-o", "--output", choices=["text", "json"], default="text")
    get.set_defaults(func=cmd_store)
