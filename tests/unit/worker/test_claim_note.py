"""The note a pool child leaves for the main process: which build its task claimed (fair claim)."""
from __future__ import annotations

import uuid
from pathlib import Path

from worker.lifecycle import claimed_by, forget_claim, note_claim


def test_claim_note_names_the_claimed_build_once(tmp_path: Path):
    build, task = uuid.uuid4(), str(uuid.uuid4())
    note_claim(tmp_path, task, build)
    assert claimed_by(tmp_path, task) == build
    assert claimed_by(tmp_path, task) is None  # read once: a later failure of the task id is not misread


def test_claim_note_absent_or_forgotten_is_none(tmp_path: Path):
    task = str(uuid.uuid4())
    assert claimed_by(tmp_path, task) is None
    note_claim(tmp_path, task, uuid.uuid4())
    forget_claim(tmp_path, task)
    assert claimed_by(tmp_path, task) is None
    forget_claim(tmp_path, task)  # idempotent


def test_claim_note_garbage_is_ignored(tmp_path: Path):
    task = str(uuid.uuid4())
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / task).write_text("not a uuid")
    assert claimed_by(tmp_path, task) is None


def test_claim_note_task_ids_never_name_paths(tmp_path: Path):
    note_claim(tmp_path / "state", "../../escape", uuid.uuid4())  # a forged message's task id
    assert not (tmp_path / "escape").exists() and not (tmp_path / "state").exists()
    assert claimed_by(tmp_path / "state", "../../escape") is None
