"""Staff logins of the station: one line per login, `name:scrypt:<n>:<r>:<p>:<salt hex>:<key hex>`.

Passwords are never stored: scrypt (hashlib) with a random salt per login. `ecgmon station-user` writes the file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

SCRYPT = (2**14, 8, 1)  # n, r, p: about 16 MB and 50 ms per check
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class UsersError(ValueError):
    """A bad login name, password or users file."""


def hash_password(password: str, salt: bytes | None = None, n: int = SCRYPT[0], r: int = SCRYPT[1],
                  p: int = SCRYPT[2]) -> str:
    """`scrypt:<n>:<r>:<p>:<salt hex>:<key hex>` of `password`."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt:{n}:{r}:{p}:{salt.hex()}:{key.hex()}"


def read_users(path: Path) -> dict[str, str]:
    """Login name -> its password hash; UsersError if the file cannot be read or a line is malformed."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UsersError(f"cannot read the station's users file {path}: {err}") from err
    users = {}
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, hashed = line.partition(":")
        if not NAME.match(name) or not hashed.startswith("scrypt:") or hashed.count(":") != 5:
            raise UsersError(f"{path}:{i}: not `name:scrypt:n:r:p:salt:key`")
        users[name] = hashed
    return users


def verify(users: dict[str, str], name: str, password: str) -> bool:
    """Whether `password` is `name`'s (in constant time for the key comparison)."""
    hashed = users.get(name)
    if hashed is None:
        hash_password(password)  # as slow as a real check: the answer does not tell which logins exist
        return False
    _, n, r, p, salt, _ = hashed.split(":")
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt), int(n), int(r), int(p)), hashed)


def set_user(path: Path, name: str, password: str) -> None:
    """Add login `name` to the users file (or give it a new password), created readable by its owner only."""
    if not NAME.match(name):
        raise UsersError(f"login names are 1-64 of A-Z a-z 0-9 _ . @ -, not {name!r}")
    if len(password) < 8:
        raise UsersError("passwords are at least 8 characters")
    users = read_users(path) if path.exists() else {}
    users[name] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{n}:{h}\n" for n, h in sorted(users.items()))
