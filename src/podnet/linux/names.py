"""Names of the kernel objects podnet creates (linux layer, no I/O).

Job: turn a pod or topology key into a netns name or an interface name that carries podnet's prefix.

Invariants:
- Every name built here starts with the prefix. `clean` relies on this: it only ever touches names
  that start with the prefix, so names without it are never podnet's.
- A prefix is 1 to `MAX_PREFIX_LEN` characters from [a-z0-9-] and starts with a letter.
- Interface names fit IFNAMSIZ (15 characters plus NUL): prefix + one kind letter + 8 hex digits of
  a stable hash of the key. The same key always gives the same name, in any process.
- Netns names are file names under /var/run/netns, so they may be long (255 bytes) but never hold
  "/" and are never "." or "..".
"""

from __future__ import annotations

import hashlib
import re

DEFAULT_PREFIX = "pn-"

IFNAMSIZ = 16  # include/uapi/linux/if.h, counting the terminating NUL
MAX_IFNAME_LEN = IFNAMSIZ - 1
NAME_MAX = 255  # a netns name is a file name
HASH_HEX_DIGITS = 8
# prefix + kind letter + hash digits must fit in an interface name
MAX_PREFIX_LEN = MAX_IFNAME_LEN - 1 - HASH_HEX_DIGITS

# Kind letters of interface names, so a reader of `ip link` can tell what a name is.
KIND_TAP = "t"
KIND_VETH = "v"

_PREFIX_RE = re.compile(r"[a-z][a-z0-9-]*")
_NETNS_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if podnet may use it, else raise ValueError saying why."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("name prefix must be a non-empty string")
    if len(prefix) > MAX_PREFIX_LEN:
        raise ValueError(
            f"name prefix {prefix!r} is longer than {MAX_PREFIX_LEN} characters: "
            f"interface names must stay within {MAX_IFNAME_LEN}"
        )
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"name prefix {prefix!r} must start with a letter and hold only [a-z0-9-]"
        )
    return prefix


def netns_name(pod: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The netns of a pod: `f"{prefix}{pod}"`.

    `pod` is whatever identifies the pod in its lab (for example "default.web-1"); it may hold
    [A-Za-z0-9_.-] and be as long as a file name allows.
    """
    validate_prefix(prefix)
    name = f"{prefix}{pod}"
    if not pod or not _NETNS_SUFFIX_RE.fullmatch(pod):
        raise ValueError(f"pod name {pod!r} must be non-empty and hold only [A-Za-z0-9_.-]")
    if len(name.encode()) > NAME_MAX:
        raise ValueError(f"netns name {name!r} is longer than {NAME_MAX} bytes")
    return name


def link_name(key: str, *, kind: str = KIND_TAP, prefix: str = DEFAULT_PREFIX) -> str:
    """A stable interface name for `key`: prefix + kind letter + 8 hex digits, at most 15 chars."""
    validate_prefix(prefix)
    if len(kind) != 1 or not kind.islower():
        raise ValueError(f"link kind {kind!r} must be one lower-case letter")
    digest = hashlib.sha256(key.encode()).hexdigest()[:HASH_HEX_DIGITS]
    return f"{prefix}{kind}{digest}"


def tap_name(key: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The TAP's name in the root netns before it becomes a pod's eth0, e.g. `pn-t1a2b3c4d`."""
    return link_name(key, kind=KIND_TAP, prefix=prefix)


def has_prefix(name: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True if `name` is one podnet could have made with `prefix`."""
    return name.startswith(validate_prefix(prefix))


def validate_netns(name: str) -> str:
    """Return `name` if it is usable as a netns file name, else raise ValueError."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"netns name {name!r} is not a valid file name")
    if len(name.encode()) > NAME_MAX:
        raise ValueError(f"netns name {name!r} is longer than {NAME_MAX} bytes")
    return name
