"""python -m tools.fuzz TARGET --seconds N: fuzz one reader of untrusted input.

    python -m tools.fuzz list                      the targets
    python -m tools.fuzz manifest --seconds 120    atheris (coverage-guided) when installed,
                                                   then line coverage of the final corpus
    python -m tools.fuzz prompts --seconds 30 --engine random --seed 1
    python -m tools.fuzz all --seconds 60          every target, one after the other
    python -m tools.fuzz seeds                     rewrite the committed seeds (tools/fuzz/seeds)

The summary (executions, libFuzzer edges and features, line coverage of the target's
modules, findings) is printed as JSON and appended to --report. A finding's input is kept
under the work dir (default /tmp/sd-fuzz/TARGET/artifacts); replay it with
`python -m tools.fuzz TARGET --replay FILE`, then keep it under tests/fuzz/regressions/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _targets() -> dict:
    from tools.fuzz.targets import TARGETS

    return TARGETS


def _parse_libfuzzer(log: str) -> dict:
    stats: dict = {}
    for m in re.finditer(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", log):
        stats = {"executions": int(m[1]), "edges": int(m[2]), "features": int(m[3]),
                 "corpus": int(m[4])}  # fmt: skip
    done = re.search(r"stat::number_of_executed_units: (\d+)", log)
    if done:
        stats["executions"] = int(done[1])
    return stats


def run_atheris(name: str, seconds: int, workdir: Path, report: Path | None) -> dict:
    from tools.fuzz import engine

    target = _targets()[name]
    corpus, artifacts = workdir / "corpus", workdir / "artifacts"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"atheris-{int(time.time())}.log"
    cmd = [sys.executable, "-m", "tools.fuzz", name, "--child", "--seconds", str(seconds),
           "--workdir", str(workdir)]  # fmt: skip
    start = time.monotonic()
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    findings = sorted(set(re.findall(r"^FINDING (.*)$", text, re.M)))
    crashes = sorted(str(p) for p in artifacts.glob("*") if p.is_file())
    engine.quiet()
    inputs = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    coverage = engine.replay_coverage(target, inputs)
    summary = {
        "target": name,
        "engine": "atheris",
        "seconds": round(elapsed, 1),
        **_parse_libfuzzer(text),
        "line_coverage": coverage,
        "findings": findings,
        "finding_inputs": crashes,
        "log": str(log_path),
    }
    return _emit(summary, report)


def run_random(
    name: str, seconds: float, seed: int, workdir: Path, report: Path | None, limit: bool
) -> dict:
    from tools.fuzz import engine

    target = _targets()[name]
    artifacts = workdir / "artifacts"

    def keep(finding: engine.Finding, data: bytes) -> None:
        artifacts.mkdir(parents=True, exist_ok=True)
        path = artifacts / f"{finding.kind}-{engine.input_id(data)}"
        path.write_bytes(data)
        print(f"FINDING {finding.kind}: {finding.summary} at {finding.where} -> {path}")
        print(finding.detail, file=sys.stderr)

    engine.quiet()
    engine.warm_up(target)  # seeds, imports and caches before the memory cap
    if limit:
        engine.limit_memory()
    stats = engine.fuzz_random(target, seconds=seconds, seed=seed, on_finding=keep)
    summary = {**stats.report(), "engine": "random", "seed": seed}
    inputs = [*stats.corpus, *stats.inputs.values()]
    summary["line_coverage"] = engine.replay_coverage(target, inputs)
    return _emit(summary, report)


def _emit(summary: dict, report: Path | None) -> dict:
    print(json.dumps(summary, indent=2))
    if report is not None:
        with open(report, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


def replay(name: str, files: list[Path], limit: bool = True) -> int:
    import tempfile

    from tools.fuzz import engine

    target = _targets()[name]
    engine.quiet()
    engine.warm_up(target)
    if limit:
        engine.limit_memory()
    work = Path(tempfile.mkdtemp(prefix="sd-fuzz-replay-"))
    bad = 0
    for path in files:
        finding = engine.check(target, path.read_bytes(), work)
        if finding is None:
            print(f"{path}: ok")
        else:
            bad += 1
            print(f"{path}: {finding.kind}: {finding.summary} at {finding.where}")
            print(finding.detail)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", help="a target name, 'list', 'all' or 'seeds'")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="random engine's seed")
    parser.add_argument("--workdir", type=Path, help="corpus and findings (default /tmp/sd-fuzz/T)")
    parser.add_argument("--report", type=Path, help="append the JSON summary to this file")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs, no fuzzing")
    parser.add_argument("--no-memory-limit", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.target == "seeds":
        from tools.fuzz.seeds import write_seeds

        write_seeds()
        return 0
    targets = _targets()
    if args.target == "list":
        for name, t in targets.items():
            print(f"{name:12} {t.doc}")
        return 0
    names = list(targets) if args.target == "all" else [args.target]
    for name in names:
        if name not in targets:
            parser.error(f"unknown target {name!r}; one of {', '.join(targets)}")
    if args.replay:
        return replay(names[0], args.replay, not args.no_memory_limit)
    if args.child:
        from tools.fuzz import engine

        workdir = args.workdir
        engine.fuzz_atheris(
            targets[names[0]], args.seconds, workdir / "corpus", workdir / "artifacts"
        )
        return 0
    use_atheris = args.engine == "atheris" or (
        args.engine == "auto" and importlib.util.find_spec("atheris") is not None
    )
    found = 0
    for name in names:
        workdir = args.workdir or Path("/tmp/sd-fuzz") / name
        if use_atheris:
            summary = run_atheris(name, args.seconds, workdir, args.report)
        else:
            summary = run_random(
                name, args.seconds, args.seed, workdir, args.report, not args.no_memory_limit
            )
        found += len(summary["findings"])
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
