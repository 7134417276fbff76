"""Facts skinreg acts on, sealed so that it can tell they are its own.

Anyone who may register a version in MLflow may also set any tag on it. Tags are what the MLflow UI
shows, so skinreg keeps writing its plain `skinreg.*` tags for people to read; but every fact that
leads it to delete, reuse, skip or promote something is also written as one sealed record: a JSON
tag holding the facts and an HMAC-SHA256 over them and over what they are about (the model, and the
version or the logged model it was registered from), keyed with a signing key only the service holds.
A record that does not verify is ignored and reported: skinreg then acts as if the facts were absent.

Records:
- `skinreg.export.record` on a source version: export status, run, settings, variants, failures; bound
  to the model name, version and creation time (a record copied to another version does not verify).
- `skinreg.lineage` on a variant version: source name and version, export run, settings, gate, sha256 of
  the model file and of every served file (the manifest); bound to the variant model name and the logged
  model the version was registered from. A variant counts as checked by consumers only when its source's
  export record lists it (the record lists only variants that passed their gates and consumer checks).
- `skinreg.variant_of.record` on a variant model: which source it belongs to; bound to the model name.

The signing key: SKINREG_SIGNING_KEY (at least 32 characters), or the file SKINREG_SIGNING_KEY_FILE
names, or `~/.config/skinreg/signing.key`, made (mode 0600, 32 random bytes) the first time it is
needed. Every process that exports or promotes for one registry (the CLI, `mlflow run`, the hooks'
workers) must share it; docs/security.md says how.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from skinreg.errors import InputError

log = logging.getLogger(__name__)

KEY_ENV = "SKINREG_SIGNING_KEY"
KEY_FILE_ENV = "SKINREG_SIGNING_KEY_FILE"
MIN_KEY_CHARS = 32
VERSION = "v1"



def default_key_file() -> Path:
    return Path.home() / ".config" / "skinreg" / "signing.key"


def _key_from_file(path: Path, *, create: bool) -> bytes:
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole under another name, then linked into place: two processes starting at once agree on
        # one key, and neither ever reads a key file that is still empty.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"cannot read the signing key {path} ({exc.strerror}); set {KEY_ENV} or "
                         f"{KEY_FILE_ENV} to a readable key (docs/security.md)") from None
    if len(text) < MIN_KEY_CHARS:
        raise InputError(f"the signing key in {path} is shorter than {MIN_KEY_CHARS} characters; write a "
                         "longer one (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return text.encode()


def load_key(env: Mapping[str, str] | None = None) -> bytes:
    """The signing key, from the environment or the key file (made on first use where none is named)."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        key = env[KEY_ENV].strip()
        if len(key) < MIN_KEY_CHARS:
            raise InputError(f"{KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; set a longer key "
                             "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
        return key.encode()
    if env.get(KEY_FILE_ENV):
        return _key_from_file(Path(env[KEY_FILE_ENV]), create=False)
    return _key_from_file(default_key_file(), create=True)


def _canonical(kind: str, binding: Mapping[str, Any], facts: Mapping[str, Any]) -> bytes:
    return json.dumps({"kind": kind, "binding": dict(binding), "facts": dict(facts)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


class Sealer:
    """Seals and opens records with one key. A record carries the key's fingerprint (not secret, not trusted:
    it only lets a refusal say that two processes use different keys)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise InputError(f"the signing key is shorter than {MIN_KEY_CHARS} characters")
        self._key = key
        self.fingerprint = hashlib.sha256(b"skinreg signing key\0" + key).hexdigest()[:12]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Sealer":
        return cls(load_key(env))

    def _mac(self, kind: str, binding: Mapping[str, Any], facts: Mapping[str, Any]) -> str:
        return f"{VERSION},{hmac.new(self._key, _canonical(kind, binding, facts), hashlib.sha256).hexdigest()}"

    def seal(self, kind: str, binding: Mapping[str, Any], facts: Mapping[str, Any]) -> str:
        """The tag value: the facts (kept as given) and their seal."""
        facts = {k: v for k, v in facts.items() if v is not None}
        return json.dumps({"facts": facts, "seal": self._mac(kind, binding, facts), "key": self.fingerprint},
                          sort_keys=True, separators=(",", ":"))

    def open(self, kind: str, binding: Mapping[str, Any], value: str | None, *, where: str = "") -> dict[str, Any]:
        """The facts of a record that verifies; {} for none, and {} (with a warning) for one that does not."""
        if value is None:
            return {}
        try:
            doc = json.loads(value)
            facts, given = doc["facts"], doc["seal"]
            if not isinstance(facts, dict) or not isinstance(given, str):
                raise TypeError("not a record")
        except (ValueError, KeyError, TypeError):
            return self._refuse(where, "is not a skinreg record")
        if not hmac.compare_digest(given.encode(), self._mac(kind, binding, facts).encode()):
            other = doc.get("key")
            if isinstance(other, str) and other != self.fingerprint:  # a hint only: it is not part of the seal
                return self._refuse(where, f"was sealed with another signing key (fingerprint {other[:12]}, this "
                                           f"process's is {self.fingerprint}: share one key, docs/security.md)")
            return self._refuse(where, "does not verify with this service's signing key (written by someone "
                                       "else, or copied from another object)")
        return facts

    @staticmethod
    def _refuse(where: str, why: str) -> dict[str, Any]:
        log.warning("ignored: the skinreg record on %s %s; acting as if it were absent", where or "a version", why)
        return {}


def manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its POSIX path relative to it."""
    from skinreg.convert.formats import file_sha256

    return {path.relative_to(folder).as_posix(): file_sha256(path)
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file())}


# Written by MLflow's own download of a `models:/` URI (name and version, YAML): never loaded as code.
DOWNLOAD_ONLY = frozenset({"registered_model_meta"})


def manifest_differences(folder: Path, expected: Mapping[str, str]) -> list[str]:
    """How the files under `folder` differ from a sealed manifest: missing, extra or changed files."""
    found = {k: v for k, v in manifest(folder).items() if k not in DOWNLOAD_ONLY}
    expected = {k: v for k, v in expected.items() if k not in DOWNLOAD_ONLY}
    out = [f"{k} is missing" for k in sorted(set(expected) - set(found))]
    out += [f"{k} is not in the sealed manifest" for k in sorted(set(found) - set(expected))]
    out += [f"{k} differs from the sealed manifest" for k in sorted(set(found) & set(expected))
            if found[k] != expected[k]]
    return out
