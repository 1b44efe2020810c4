"""fedtune.fileio.write_dir_atomic: a directory appears whole or not at all, and no temp directory is left,
whoever wins a race."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from fedtune.fileio import write_dir_atomic


def _fill(tag: str):
    def fill(tmp):
        (tmp / "a.txt").write_text(tag)
        (tmp / "b.txt").write_text(tag * 2)
    return fill


def test_first_writer_wins_and_no_temp_is_left(tmp_path):
    dest = tmp_path / "cache" / "model"
    assert write_dir_atomic(dest, _fill("x")) is True
    assert write_dir_atomic(dest, _fill("y")) is False  # lost: the existing copy is kept
    assert (dest / "a.txt").read_text() == "x" and (dest / "b.txt").read_text() == "xx"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]


def test_a_failing_fill_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomic(tmp_path / "d", boom)
    assert list(tmp_path.iterdir()) == []


def _race(dest: str, tag: str, start) -> None:
    start.wait()
    write_dir_atomic(dest, _fill(tag))


def test_racing_processes_leave_one_complete_copy(tmp_path):
    dest = tmp_path / "model"
    ctx = mp.get_context("fork")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_race, args=(str(dest), str(i), start)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    tag = (dest / "a.txt").read_text()
    assert tag in {"0", "1", "2", "3"} and (dest / "b.txt").read_text() == tag * 2  # one writer's files, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
