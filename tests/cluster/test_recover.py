"""villaged.cluster.recover: what forced recovery refuses, and its fence file. (The recovery
itself runs on real processes in tests/cluster/test_faults.py.)"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
import trio

from tests.cluster.harness import write_cluster
from villaged.cluster.driver import WAL_DIR
from villaged.cluster.recover import (
    FENCED_FILE,
    RecoverError,
    _save_fenced,
    force_recover,
    load_fenced,
)
from villaged.cluster.wal import LOG_DIR
from villaged.config import load_config

if TYPE_CHECKING:
    from pathlib import Path


def test_a_node_with_no_log_or_no_identity_is_not_recovered(tmp_path: Path) -> None:
    config = load_config(write_cluster(tmp_path)[0].config)
    cluster_dir = config.storage.dir / "cluster"
    with pytest.raises(RecoverError, match="no Raft log here"):
        trio.run(force_recover, config)
    (cluster_dir / WAL_DIR / LOG_DIR).mkdir(parents=True)
    with pytest.raises(RecoverError, match=r"no identity\.json"):
        trio.run(force_recover, config)
    assert not (cluster_dir / "identity.json").exists()  # nothing was made up meanwhile


def test_the_fence_file_round_trips_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert load_fenced(tmp_path) == frozenset()
    _save_fenced(tmp_path, frozenset({"n2~b", "n3~c"}))
    assert load_fenced(tmp_path) == {"n2~b", "n3~c"}
    assert (tmp_path / FENCED_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / FENCED_FILE).write_text('{"fenced": "n2~b"}')
    with pytest.raises(RecoverError, match="'fenced' is not a list"):
        load_fenced(tmp_path)
    (tmp_path / FENCED_FILE).write_text("{")
    with pytest.raises(RecoverError, match=re.escape(f"{FENCED_FILE}: unreadable")):
        load_fenced(tmp_path)
