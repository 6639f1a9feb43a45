"""Every repository test keeps its chunk caches and key files in its own temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(tmp_path / "keys"))
