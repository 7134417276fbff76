"""The signing key and sealed records, on their own: what verifies and what does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skinreg.errors import InputError
from skinreg.registry.seal import KEY_ENV, KEY_FILE_ENV, Sealer, load_key


def test_processes_starting_at_once_agree_on_one_default_key(tmp_path):
    """Eight processes that each need the default key file, none there yet: one key, never an empty read."""
    code = "from skinreg.registry.seal import load_key; print(load_key({}).decode())"
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(8)]
    keys = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-1000:]
        keys.add(out.strip())
    assert len(keys) == 1 and len(keys.pop()) == 64
    key_file = tmp_path / ".config" / "skinreg" / "signing.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in key_file.parent.iterdir()] == ["signing.key"]  # no temporary file left behind


def test_a_record_verifies_only_where_it_was_sealed_and_with_its_key():
    a, b = Sealer(b"a" * 32), Sealer(b"b" * 32)
    value = a.seal("export", {"model": "m", "version": "1"}, {"skinreg.export.status": "passed"})
    assert a.open("export", {"model": "m", "version": "1"}, value) == {"skinreg.export.status": "passed"}
    assert a.open("export", {"model": "m", "version": "2"}, value) == {}  # copied to another version
    assert b.open("export", {"model": "m", "version": "1"}, value) == {}  # another key
    forged = value.replace("passed", "failed")
    assert a.open("export", {"model": "m", "version": "1"}, forged) == {}
    assert a.open("export", {"model": "m", "version": "1"}, "{not json") == {}


def test_a_short_or_unreadable_key_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match=f"{KEY_ENV} is shorter than 32 characters"):
        load_key({KEY_ENV: "short"})
    with pytest.raises(InputError, match="cannot read the signing key"):
        load_key({KEY_FILE_ENV: str(tmp_path / "missing.key")})
