"""Peak memory of one command: the kernel's high-water mark and, sampled, how much of it was
anonymous (what must fit) and file-backed (mapped weights the kernel may drop).

    python tools/peak_rss.py [--interval 0.05] -- sd-run --engine ... --quiet

Prints one line: peak RSS (ru_maxrss), peak RssAnon, peak RssFile (GiB), wall seconds,
exit status, then the command's lines that report images or errors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path


def rss_kib(pid: int) -> dict[str, int]:
    """A process's RssAnon and RssFile now, KiB (zeros once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"RssAnon": 0, "RssFile": 0}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssFile")}


def run_measured(command: list[str], log: Path, interval: float = 0.2) -> dict[str, float | int]:
    """Run `command`, its output into `log`; its peak RSS (GiB: the kernel's high-water mark,
    which counts file-backed pages such as mapped weights the kernel may drop), its peak
    anonymous and file-backed RSS (sampled every `interval` s), wall time, exit status."""
    start = time.perf_counter()
    peaks = {"RssAnon": 0, "RssFile": 0}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            while process.returncode is None:
                for key, value in rss_kib(process.pid).items():
                    peaks[key] = max(peaks[key], value)
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    return {
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),  # KiB on Linux
        "peak_anon_rss_gib": round(peaks["RssAnon"] / 2**20, 2),
        "peak_file_rss_gib": round(peaks["RssFile"] / 2**20, 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "exit": process.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"peak-rss-{os.getpid()}.log"
    result = run_measured(command, log, args.interval)
    reported = [
        line for line in log.read_text().splitlines() if "image(s) in" in line or "error" in line
    ]
    log.unlink()
    print(
        f"peak RSS {result['peak_rss_gib']:.2f} GiB (anon {result['peak_anon_rss_gib']:.2f}, "
        f"file {result['peak_file_rss_gib']:.2f}), {result['wall_s']} s, exit {result['exit']}",
        *reported,
        sep=" | ",
    )


if __name__ == "__main__":
    main()
