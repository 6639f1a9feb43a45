"""The repository target node opens the repository with the key ``backup --qmp --repo`` unwrapped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cowbackup.block.errors import BlockError
from cowbackup.block.node import BlockNode
from cowbackup.daemon import Daemon
from cowbackup.repo import keys

from .helpers import CHUNK, new_repo


async def _add(daemon: Daemon, repo: Path, **extra: object) -> BlockNode:
    options = {"driver": "cowbackup-repo", "node-name": "t", "repo": str(repo), "name": "vm", "size": CHUNK}
    return await daemon.blockdev_add({**options, **extra})


def test_a_target_node_opens_with_a_key_file_and_no_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo(tmp_path / "r")
    key_file = tmp_path / "key"
    key_file.write_bytes(repo.dump_master())

    def no_scrypt(*args: object) -> bytes:
        raise AssertionError("scrypt ran")

    monkeypatch.setattr(keys, "passphrase_key", no_scrypt)
    monkeypatch.delenv("COWBACKUP_PASSWORD", raising=False)

    async def run() -> None:
        daemon = Daemon()
        try:
            node = await _add(daemon, tmp_path / "r", **{"key-file": str(key_file)})
            assert node.run.repo.keys == repo.keys  # type: ignore[attr-defined]
        finally:
            await daemon.close()

    asyncio.run(run())


def test_a_target_node_refuses_a_foreign_key_file_and_both_secrets(tmp_path: Path) -> None:
    new_repo(tmp_path / "r")
    other = new_repo(tmp_path / "other")
    key_file = tmp_path / "key"
    key_file.write_bytes(other.dump_master())

    async def run() -> None:
        daemon = Daemon()
        try:
            with pytest.raises(BlockError, match="belongs to repository"):
                await _add(daemon, tmp_path / "r", **{"key-file": str(key_file)})
            with pytest.raises(BlockError, match="not both"):
                await _add(daemon, tmp_path / "r", **{"key-file": str(key_file), "password-file": "x"})
            with pytest.raises(BlockError, match="cannot read key-file"):
                await _add(daemon, tmp_path / "r", **{"key-file": str(tmp_path / "absent")})
        finally:
            await daemon.close()

    asyncio.run(run())
