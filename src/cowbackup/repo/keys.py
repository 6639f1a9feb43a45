"""Wrapped master keys: ``keys/repokey`` in the repository, or a key file kept by the user.

A key object is JSON::

    {"format": "cowbackup-key", "version": 1, "repository": "<repo id>",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<base64, 16 bytes>"},
     "nonce": "<base64, 12 bytes>", "wrapped": "<base64: AES-256-GCM(master) || tag>"}

The wrapping key is scrypt(passphrase, salt); the associated data is ``"cowbackup-key:" + repository id``,
so a key file is only accepted by its own repository.  A wrong passphrase fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cowbackup.repo.crypto import (
    MASTER_SIZE,
    NONCE_SIZE,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    AuthenticationFailed,
    decrypt,
    encrypt,
    passphrase_key,
)
from cowbackup.repo.errors import CorruptObject, RepoUsageError, WrongPassphrase

REPOKEY_NAME = "keys/repokey"
KEY_FORMAT = "cowbackup-key"
#: scrypt parameters we accept from a key object: enough for any sane setting, bounded for a hostile one.
MAX_SCRYPT_N = 1 << 20
MAX_KEY_SIZE = 16 * 1024


def _aad(repo_id: str) -> bytes:
    return b"cowbackup-key:" + repo_id.encode()


def wrap_master(master: bytes, repo_id: str, passphrase: bytes, n: int = SCRYPT_N) -> bytes:
    """The key object (JSON bytes) holding ``master`` wrapped by ``passphrase``."""
    salt = os.urandom(16)
    wrapping = passphrase_key(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
    nonce, wrapped = encrypt(wrapping, master, _aad(repo_id))
    doc = {
        "format": KEY_FORMAT,
        "version": 1,
        "repository": repo_id,
        "kdf": {"name": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "nonce": _b64(nonce),
        "wrapped": _b64(wrapped),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def unwrap_master(key_object: bytes, repo_id: str, passphrase: bytes, where: str) -> bytes:
    """The master secret.  WrongPassphrase if it does not authenticate; CorruptObject naming ``where`` if
    the key object is malformed or belongs to another repository."""
    if len(key_object) > MAX_KEY_SIZE:
        raise CorruptObject(where, "too large for a key")
    try:
        doc: Any = json.loads(key_object)
        kdf = doc["kdf"]
        if doc["format"] != KEY_FORMAT or kdf["name"] != "scrypt":
            raise CorruptObject(where, "not a cowbackup key")
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
        owner = doc["repository"]
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise CorruptObject(where, f"malformed key ({err})") from None
    except RecursionError:
        raise CorruptObject(where, "malformed key (nested too deeply)") from None
    if owner != repo_id:
        raise RepoUsageError(f"the key in '{where}' belongs to repository {owner}, not {repo_id}")
    if not (
        2 <= n <= MAX_SCRYPT_N
        and n & (n - 1) == 0
        and 1 <= r <= 32
        and 1 <= p <= 16
        and 128 * n * r <= 1 << 30
    ):
        raise CorruptObject(where, f"scrypt parameters out of range (n={n}, r={r}, p={p})")
    if len(nonce) != NONCE_SIZE or len(wrapped) != MASTER_SIZE + 16:
        raise CorruptObject(where, "wrapped key of the wrong size")
    wrapping = passphrase_key(passphrase, salt, n, r, p)
    try:
        return decrypt(wrapping, nonce, wrapped, _aad(repo_id))
    except AuthenticationFailed:
        raise WrongPassphrase("wrong passphrase (the repository key does not open with it)") from None


#: The format of an unwrapped key file (:func:`dump_master`).
MASTER_FILE_FORMAT = "cowbackup-master-key"


def dump_master(master: bytes, repo_id: str) -> bytes:
    """An *unwrapped* key file: the master secret itself, for a process that runs one backup on behalf of
    one that has already unwrapped it (``backup --qmp --repo`` hands it to the daemon's repository target
    node, which would otherwise run scrypt again).  It is as secret as the passphrase and the key object
    together: write it only to a private file, remove it once read, never log it."""
    doc = {"format": MASTER_FILE_FORMAT, "version": 1, "repository": repo_id, "master": _b64(master)}
    return json.dumps(doc).encode() + b"\n"


def load_master(data: bytes, repo_id: str, where: str) -> bytes:
    """The master secret of an unwrapped key file (:func:`dump_master`).  RepoUsageError naming ``where``
    (never quoting the contents) if it is malformed or belongs to another repository."""
    if len(data) > MAX_KEY_SIZE:
        raise RepoUsageError(f"'{where}' is too large for a key file")
    try:
        doc: Any = json.loads(data)
        if doc["format"] != MASTER_FILE_FORMAT or doc["version"] != 1:
            raise ValueError("not an unwrapped cowbackup key")
        master = base64.b64decode(doc["master"], validate=True)
        owner = doc["repository"]
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise RepoUsageError(f"'{where}' is not an unwrapped cowbackup key file") from None
    if owner != repo_id:
        raise RepoUsageError(f"the key in '{where}' belongs to repository {owner}, not {repo_id}")
    if len(master) != MASTER_SIZE:
        raise RepoUsageError(f"'{where}' holds a key of the wrong size")
    return master


def passphrase_from(password_file: str | None, what: str = "password file") -> bytes | None:
    """The passphrase of ``password_file`` (its first line), else of ``$COWBACKUP_PASSWORD``; None if
    neither gives one.  RepoUsageError for a file that cannot be read or starts with an empty line."""
    if password_file is not None:
        try:
            with open(password_file, "rb") as f:
                line = f.readline(4096).rstrip(b"\r\n")
        except OSError as err:
            raise RepoUsageError(f"cannot read {what} '{password_file}': {err.strerror}") from None
        if not line:
            raise RepoUsageError(f"{what} '{password_file}' is empty")
        return line
    env = os.environ.get("COWBACKUP_PASSWORD")
    return env.encode() if env else None


def keyfile_path(repo_id: str) -> str:
    """Where ``--encryption keyfile`` keeps the key: ``$COWBACKUP_KEYS_DIR`` or ~/.config/cowbackup/keys."""
    base = os.environ.get("COWBACKUP_KEYS_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "cowbackup", "keys"
    )
    return os.path.join(base, repo_id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
