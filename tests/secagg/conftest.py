"""Fixtures shared by the secure-aggregation tests."""

from __future__ import annotations

import pytest

from fedtune.run import checkpoint


@pytest.fixture
def crash_at_checkpoint(monkeypatch):
    """crash_at_checkpoint(r): the checkpoint of round r raises KeyboardInterrupt instead of being written (a
    coordinator killed after the round's work, before its checkpoint); returns a function that undoes it."""
    real = checkpoint.save

    def arm(rnd: int):
        def crash(ckpt_dir, ckpt, *a, **kw):
            if ckpt.round == rnd:
                raise KeyboardInterrupt("simulated crash")
            return real(ckpt_dir, ckpt, *a, **kw)

        monkeypatch.setattr(checkpoint, "save", crash)
        return lambda: monkeypatch.setattr(checkpoint, "save", real)

    return arm
