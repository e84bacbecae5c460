"""The fuzz oracle flags what it should (run apart by test_fuzz_smoke.py: in the full
suite the process segfaulted right after this test ran in it, never when run apart)."""

from __future__ import annotations

from pathlib import Path

from sd_deploy.errors import UserError
from tools.fuzz import engine
from tools.fuzz.targets import Target


def _fake(run, allowed=lambda: (UserError,), time_limit: float = 1.0) -> Target:
    return Target("fake", "", run, lambda: [b"x"], lambda d, r: d, (), allowed, time_limit)


def test_oracle_flags_what_it_should(tmp_path: Path) -> None:
    def raise_(exc: BaseException):
        def run(data: bytes, work: Path) -> None:
            raise exc

        return run

    def slow(data: bytes, work: Path) -> None:
        while True:
            pass

    def payload(data: bytes, work: Path) -> None:
        from tools.fuzz import targets

        targets.payload_ran()

    ok = engine.check(_fake(raise_(UserError("one line"))), b"", tmp_path)
    assert ok is None
    assert engine.check(_fake(lambda d, w: None), b"", tmp_path) is None
    cases = {
        "exception": _fake(raise_(KeyError("k"))),
        "message": _fake(raise_(UserError("two\nlines"))),
        "timeout": _fake(slow, time_limit=0.2),
        "memory": _fake(raise_(MemoryError())),
        "payload": _fake(payload),
    }
    for kind, target in cases.items():
        finding = engine.check(target, b"", tmp_path)
        assert finding is not None and finding.kind == kind, (kind, finding)
