"""The oracle, the two drivers (atheris, seeded random) and line coverage.

Oracle, per input: the target returns, or raises one of its `allowed` errors (the project's
`UserError` for every reader) with a non-empty one-line message of at most 1000 characters.
Anything else is a finding: another exception, a run over the target's time bound (SIGALRM),
memory over the bound (the address space is capped, so a header claiming a 1 TB tensor gets
a MemoryError instead of the machine; resident memory growth is checked too), or a pickle
payload that ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Any

from tools.fuzz import targets as targets_module
from tools.fuzz.targets import Target

MAX_MESSAGE = 1000
MEMORY_BUDGET_MB = 3072  # address space allowed above what the process had after set-up
RSS_GROWTH_MB = 1024  # resident memory one input may add


class InputTimeout(BaseException):
    """Raised by SIGALRM inside a target that ran over its time bound."""


@dataclass
class Finding:
    kind: str  # exception | timeout | memory | message | payload
    summary: str  # one line: type and message, or what went wrong
    where: str  # the innermost sd_deploy frame (file:line), for de-duplication
    detail: str = ""  # the traceback

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.summary.split(':')[0]}:{self.where}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/sd_deploy/" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{frame.filename.split('/sd_deploy/')[-1]}:{frame.lineno}"


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def limit_memory(budget_mb: int = MEMORY_BUDGET_MB) -> None:
    """Cap the address space at what the process uses now plus `budget_mb`."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = (vm // 1024 + budget_mb) << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


QUIET_LOGGERS = ("sd_deploy", "transformers")


def quiet() -> None:
    """Readers log warnings for odd but accepted inputs; the oracle does not read them."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """`quiet` for a while (tests: other tests read the sd_deploy logger)."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        quiet()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _alarm(signum: int, frame: Any) -> None:
    raise InputTimeout()


def clean(work: Path) -> None:
    for child in work.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


def check(target: Target, data: bytes, work: Path) -> Finding | None:
    """Run one input through `target`; None when the oracle accepts what happened."""
    clean(work)
    allowed = target.allowed()
    rss_before = _max_rss_mb()
    targets_module.PAYLOAD_RAN.clear()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, target.time_limit)
    finding = None
    try:
        target.run(data, work)
    except InputTimeout as exc:
        finding = Finding("timeout", f"over {target.time_limit:g} s", _where(exc))
    except MemoryError as exc:
        finding = Finding("memory", "MemoryError", _where(exc), traceback.format_exc())
    except allowed as exc:
        text = str(exc).strip()
        if not text or "\n" in text or len(text) > MAX_MESSAGE:
            summary = f"{type(exc).__name__} message not one line of <= {MAX_MESSAGE} chars"
            finding = Finding("message", summary, _where(exc), repr(text[:2000]))
    except Exception as exc:
        summary = f"{type(exc).__name__}: {str(exc).strip()[:300]}".splitlines()[0]
        finding = Finding("exception", summary, _where(exc), traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if targets_module.PAYLOAD_RAN:
        finding = Finding("payload", "a pickle payload ran", "?")
    grown = _max_rss_mb() - rss_before
    if finding is None and grown > RSS_GROWTH_MB:
        finding = Finding("memory", f"resident memory grew by {grown:.0f} MB", "?")
    return finding


_WARM: set[str] = set()


def warm_up(target: Target) -> None:
    """Run the seeds once without a time bound: first calls import libraries and fill
    caches, which is not the input's time."""
    if target.name in _WARM:
        return
    _WARM.add(target.name)
    work = Path(tempfile.mkdtemp(prefix=f"sd-fuzz-warm-{target.name}-"))
    try:
        for data in target.seeds():
            clean(work)
            try:
                target.run(data, work)
            except Exception:
                pass
    finally:
        shutil.rmtree(work, ignore_errors=True)


def input_id(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


# ----------------------------------------------------------------------- line coverage


def _function_codes(code: CodeType) -> Iterable[CodeType]:
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_flags & 0x1:  # CO_OPTIMIZED: a function body, not a class body
                yield const
            yield from _function_codes(const)


def executable_lines(path: str) -> set[int]:
    """Lines inside function bodies (module and class bodies run at import, not per input)."""
    source = Path(path).read_text()
    lines: set[int] = set()
    for code in _function_codes(compile(source, path, "exec")):
        lines |= {line for _, _, line in code.co_lines() if line and line != code.co_firstlineno}
    return lines


@dataclass
class LineCoverage:
    files: dict[str, set[int]]  # path -> executable lines
    hits: dict[str, set[int]] = field(default_factory=dict)

    @staticmethod
    def of_modules(modules: Iterable[str]) -> LineCoverage:
        import importlib

        files = {}
        for name in modules:
            path = importlib.import_module(name).__file__
            if path:
                files[path] = executable_lines(path)
        return LineCoverage(files, {p: set() for p in files})

    def tracer(self, frame: Any, event: str, arg: Any) -> Any:
        hits = self.hits.get(frame.f_code.co_filename)
        if hits is None:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                hits.add(frame.f_lineno)
            return local

        return local

    def __enter__(self) -> LineCoverage:
        sys.settrace(self.tracer)
        threading.settrace(self.tracer)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        per_file = {}
        total = hit = 0
        for path, lines in self.files.items():
            got = len(self.hits[path] & lines)
            per_file[path.split("/sd_deploy/")[-1]] = f"{got}/{len(lines)}"
            total += len(lines)
            hit += got
        return {"lines": f"{hit}/{total}", "percent": round(100 * hit / max(total, 1), 1),
                "files": per_file}  # fmt: skip


# ------------------------------------------------------------------ seeded random driver


@dataclass
class RunStats:
    target: str
    executions: int = 0
    seconds: float = 0.0
    findings: dict[str, Finding] = field(default_factory=dict)  # key -> first finding
    inputs: dict[str, bytes] = field(default_factory=dict)  # key -> its input
    corpus: list[bytes] = field(default_factory=list)  # seeds and the inputs kept
    coverage: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "executions": self.executions,
            "seconds": round(self.seconds, 1),
            "coverage": self.coverage,
            "findings": [f"{f.kind}: {f.summary} at {f.where}" for f in self.findings.values()],
        }


def fuzz_random(
    target: Target,
    iterations: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    extra_inputs: Iterable[bytes] = (),
    coverage: bool = False,
    on_finding: Callable[[Finding, bytes], None] | None = None,
) -> RunStats:
    """Seeds and extra inputs first, then mutants of the corpus; inputs that pass join it."""
    rng = random.Random(seed)
    stats = RunStats(target.name)
    warm_up(target)
    corpus = list(target.seeds()) + list(extra_inputs)
    cov = LineCoverage.of_modules(target.modules) if coverage else None
    work = Path(tempfile.mkdtemp(prefix=f"sd-fuzz-{target.name}-"))
    start = time.monotonic()
    queue = list(corpus)
    try:
        while True:
            if iterations is not None and stats.executions >= iterations:
                break
            if seconds is not None and time.monotonic() - start >= seconds:
                break
            data = queue.pop(0) if queue else target.mutate(rng.choice(corpus), rng)
            if cov is not None:
                with cov:
                    finding = check(target, data, work)
            else:
                finding = check(target, data, work)
            stats.executions += 1
            if finding is None:
                if len(corpus) < 256 and rng.random() < 0.05:
                    corpus.append(data)
            elif finding.key not in stats.findings:
                stats.findings[finding.key] = finding
                stats.inputs[finding.key] = data
                if on_finding is not None:
                    on_finding(finding, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.seconds = time.monotonic() - start
    stats.corpus = corpus
    if cov is not None:
        stats.coverage = cov.summary()
    return stats


def replay_coverage(target: Target, inputs: Iterable[bytes]) -> dict[str, Any]:
    """Line coverage of the target's modules over `inputs` (a finished run's corpus)."""
    cov = LineCoverage.of_modules(target.modules)
    work = Path(tempfile.mkdtemp(prefix=f"sd-fuzz-cov-{target.name}-"))
    try:
        for data in inputs:
            with cov:
                check(target, data, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cov.summary()


# ----------------------------------------------------------------------- atheris driver


def fuzz_atheris(target: Target, seconds: int, corpus: Path, artifacts: Path) -> None:
    """libFuzzer over `target` (sd_deploy instrumented); stops at the first finding, whose
    input libFuzzer writes to `artifacts`/crash-<sha1>. Does not return (libFuzzer exits)."""
    import atheris

    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=["sd_deploy"]):
        import importlib

        for name in target.modules:
            importlib.import_module(name)
        seeds = target.seeds()
        warm_up(target)
    for data in seeds:
        (corpus / f"seed-{input_id(data)}").write_bytes(data)
    quiet()
    work = Path(tempfile.mkdtemp(prefix=f"sd-fuzz-{target.name}-"))
    limit_memory()

    def one_input(data: bytes) -> None:
        finding = check(target, data, work)
        if finding is not None:
            print(f"FINDING {finding.kind}: {finding.summary} at {finding.where}", flush=True)
            print(finding.detail, file=sys.stderr, flush=True)
            raise RuntimeError(f"fuzz finding: {finding.summary}")

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return target.mutate(data, rng)[:max_size]

    max_len = max([target.max_len, *(len(s) + 4096 for s in seeds)])
    argv = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-timeout={int(target.time_limit * 3) + 5}",
        "-rss_limit_mb=6144",
        f"-max_len={max_len}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    atheris.Fuzz()
