"""Who may connect and what they may do: Mosquitto's ``password_file`` and ``acl_file``, and client-id rules.

- ``password_file``: ``username:$7$ROUNDS$SALT$HASH`` (PBKDF2-SHA512, ``mosquitto_passwd``'s format).
- ``acl_file``: ``user NAME``, ``topic [read|write|readwrite|deny] FILTER``, ``pattern ...`` with
  ``%u``/``%c``. A filter is granted at SUBSCRIBE only when one read rule covers every topic it
  can match and no deny rule touches any of them (so ``#``, ``+/...`` and ``$SYS/#`` are refused
  to a device; the broker refuses rather than narrows, which is simple and never leaks).
- ``clientid_file`` (ours; Mosquitto has no such file): ``USER CLIENTID`` or ``USER PREFIX*`` lines.
  A named user may connect only with a client id its lines allow; a user with no line may not
  connect at all. This is what stops one device from claiming another's session id.

:func:`load_auth` reads every file before anything changes, so a reload applies all of them
or none (a bad line anywhere keeps the previous state). Stdlib only, no I/O outside ``load_auth``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

from .errors import BrokerConfigError
from .topics import filter_within, filters_overlap, matches
from .wire import ReasonCode

__all__ = ["USER_RE", "HASH_RE", "pbkdf2_hash", "verify_password", "parse_password_file", "Acl", "ClientIdRules",
           "AuthState", "load_auth"]

# Names matched with fullmatch: "$" would let a trailing newline through.
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HASH_RE = re.compile(r"\$7\$[0-9]{1,7}\$[A-Za-z0-9+/=]{4,88}\$[A-Za-z0-9+/=]{4,128}")
_PATTERN_UNSAFE = frozenset("+#/")


def pbkdf2_hash(password: str, salt: bytes, iterations: int, length: int = 64) -> str:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, length)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (ours or ``mosquitto_passwd``'s)."""
    if not isinstance(hashed, str) or not HASH_RE.fullmatch(hashed):
        return False
    _, _, rounds, salt_b64, digest_b64 = hashed.split("$")
    try:
        salt, digest = base64.b64decode(salt_b64, validate=True), base64.b64decode(digest_b64, validate=True)
    except ValueError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(rounds), len(digest))
    return hmac.compare_digest(candidate, digest)


def _lines(text: str):
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def parse_password_file(text: str) -> dict[str, str]:
    """``username -> hash``; ValueError naming the line on anything else."""
    users = {}
    for number, line in _lines(text):
        name, sep, hashed = line.partition(":")
        if not sep or not name:
            raise ValueError(f"line {number}: expected username:hash")
        users[name] = hashed
    return users


_Rule = tuple[frozenset, tuple[str, ...]]


class Acl:
    """Mosquitto's acl_file, with the SUBSCRIBE check Mosquitto makes of it."""

    _ACCESS = {"read": frozenset({"read"}), "write": frozenset({"write"}),
               "readwrite": frozenset({"read", "write"}), "deny": frozenset({"deny"})}

    def __init__(self, text: str) -> None:
        self.anonymous: list[_Rule] = []
        self.users: dict[str, list[_Rule]] = {}
        self.patterns: list[tuple[frozenset, str]] = []
        current = self.anonymous
        for number, line in _lines(text):
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user" and rest:
                current = self.users.setdefault(rest, [])
            elif keyword in ("topic", "pattern") and rest:
                first, _, after = rest.partition(" ")
                access, target = (self._ACCESS[first], after.strip()) if first in self._ACCESS and after.strip() \
                    else (self._ACCESS["readwrite"], rest)
                if keyword == "topic":
                    current.append((access, tuple(target.split("/"))))
                else:
                    self.patterns.append((access, target))
            else:
                raise ValueError(f"line {number}: cannot parse {line[:80]!r}")

    def _rules(self, username: str | None, client_id: str) -> list[_Rule]:
        rules = list(self.users.get(username, ()) if username is not None else self.anonymous)
        if username is not None and not _PATTERN_UNSAFE & set(username) and not _PATTERN_UNSAFE & set(client_id):
            rules += [(a, tuple(p.replace("%u", username).replace("%c", client_id).split("/")))
                      for a, p in self.patterns]
        return rules

    def allows(self, username: str | None, client_id: str, topic: str, access: str) -> bool:
        """May this client ``read`` (receive) or ``write`` (publish) this topic name?"""
        levels = topic.split("/")
        allowed = False
        for grant, filter_levels in self._rules(username, client_id):
            if matches(filter_levels, levels):
                if "deny" in grant:
                    return False
                allowed = allowed or access in grant
        return allowed

    def may_subscribe(self, username: str | None, client_id: str, topic_filter: str) -> bool:
        """True when every topic the filter can match is readable: one read rule covers it, no deny touches it."""
        levels = topic_filter.split("/")
        rules = self._rules(username, client_id)
        if any("deny" in grant and filters_overlap(levels, rule) for grant, rule in rules):
            return False
        return any("read" in grant and filter_within(levels, rule) for grant, rule in rules)


class ClientIdRules:
    """``USER CLIENTID`` / ``USER PREFIX*`` lines: the client ids each named user may connect with."""

    def __init__(self, text: str) -> None:
        self.exact: dict[str, set[str]] = {}
        self.prefixes: dict[str, list[str]] = {}
        for number, line in _lines(text):
            parts = line.split()
            if len(parts) != 2 or parts[1] in ("", "*"):
                raise ValueError(f"line {number}: expected 'USERNAME CLIENTID' or 'USERNAME PREFIX*'")
            user, ident = parts
            if ident.endswith("*"):
                self.prefixes.setdefault(user, []).append(ident[:-1])
            else:
                self.exact.setdefault(user, set()).add(ident)

    def allows(self, username: str, client_id: str) -> bool:
        return client_id in self.exact.get(username, ()) or any(
            client_id.startswith(p) for p in self.prefixes.get(username, ()))


class AuthState:
    """One consistent snapshot of the password, ACL and client-id files (None: not configured)."""

    def __init__(self, passwords: dict[str, str] | None = None, acl: Acl | None = None,
                 clientids: ClientIdRules | None = None, allow_anonymous: bool = True) -> None:
        self.passwords, self.acl, self.clientids = passwords, acl, clientids
        self.allow_anonymous = allow_anonymous

    def check_credentials(self, username: str | None, password: bytes | None) -> int:
        """A CONNACK reason code for this username and password."""
        if username is None:
            return ReasonCode.SUCCESS if self.allow_anonymous else ReasonCode.NOT_AUTHORIZED
        if self.passwords is None:
            return ReasonCode.SUCCESS
        hashed = self.passwords.get(username)
        if hashed is None or password is None:
            return ReasonCode.BAD_USER_NAME_OR_PASSWORD
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return ReasonCode.BAD_USER_NAME_OR_PASSWORD
        return ReasonCode.SUCCESS if verify_password(text, hashed) else ReasonCode.BAD_USER_NAME_OR_PASSWORD

    def check_identity(self, username: str) -> int:
        """A username taken from a client certificate: it must still be a user when passwords are configured."""
        if self.passwords is not None and username not in self.passwords:
            return ReasonCode.NOT_AUTHORIZED
        return ReasonCode.SUCCESS

    def client_id_allowed(self, username: str | None, client_id: str) -> bool:
        return self.clientids is None or username is None or self.clientids.allows(username, client_id)


def _read(path: Path, parse, what: str):
    try:
        return parse(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise BrokerConfigError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BrokerConfigError(f"{path}: {e}") from None


def load_auth(password_file: Path | None, acl_file: Path | None, clientid_file: Path | None,
              allow_anonymous: bool) -> AuthState:
    """Read and parse every configured file; BrokerConfigError (naming the file) before anything is applied."""
    return AuthState(
        _read(password_file, parse_password_file, "password file") if password_file else None,
        _read(acl_file, Acl, "ACL file") if acl_file else None,
        _read(clientid_file, ClientIdRules, "client id file") if clientid_file else None,
        allow_anonymous,
    )
