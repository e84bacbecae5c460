"""Full-size SDXL (seeded random weights): export and validate every component, fp32 and fp16,
each in its own process, and report its peak RSS and wall time; then one 1024x1024 image
through ONNX Runtime CPU with its time per step.

    python tools/measure_sdxl_export.py --out /tmp/sdxl-measure [--components unet ...]
        [--precisions fp16 fp32] [--steps 4] [--no-generate] [--keep] [-- SD-EXPORT OPTIONS]

    # the script itself in a minute, on the tiny preset:
    python tools/measure_sdxl_export.py --out /tmp/xl-try --model tiny-xl --size 128

Each component is one `sd-export --model sdxl --random-weights --component NAME [--fp16]`
process: `load_models(materialize=...)` builds only the module that component needs (the
others stay on the meta device), so the process holds one module plus its export. Peak RSS
is that process's own (`os.wait4`'s rusage, ru_maxrss, which counts file-backed pages too,
such as weights mapped back from disk), beside its peak anonymous RSS (sampled from
/proc/PID/status: the memory that must fit), written as JSON lines to
OUT/report.jsonl and printed as a table at the end.

Shape ranges: SDXL's defaults (512..2048 px, batch 1..4, context 77..231), so validation runs
the 1024x1024 guided opt case and the 512x512 batch-4 231-token edge case in PyTorch fp32 and
ONNX Runtime: the UNet's validation alone takes tens of minutes on 2 cores. `--batch 1:1:1
--height 1024 --width 1024` (passed through after `--`) makes it cheaper.

Memory: this needs most of a 24 GiB machine for the fp32 UNet (10.3 GB of weights, plus the
ONNX file being written and ONNX Runtime's session for validation). Do not run it beside
other heavy work. Disk: ~14 GB (fp32 dir) + ~7 GB (fp16 dir; the VAE stays fp32 there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from peak_rss import run_measured  # tools/ is on sys.path when run as a script

COMPONENTS = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder", "unet")


def export_one(
    out: Path, model: str, component: str, fp16: bool, extra: list[str]
) -> dict[str, object]:
    engine = out / ("engines-fp16" if fp16 else "engines-fp32")
    precision = "fp16" if fp16 else "fp32"
    command = [shutil.which("sd-export") or "sd-export"]
    command += ["--model", model, "--random-weights", "--component", component]
    command += ["--out", str(engine), *(["--fp16"] if fp16 else []), *extra]
    log = out / f"export-{component}-{precision}.log"
    result = run_measured(command, log)
    row: dict[str, object] = {"step": "export", "component": component, "precision": precision}
    row.update(result)
    manifest = engine / "manifest.json"
    if result["exit"] == 0 and manifest.is_file():
        spec = json.loads(manifest.read_text())["components"][component]
        row["graph_precision"] = spec["precision"]
        row["max_rel_l2"] = spec["validation"].get("max_rel_l2")
        row["files_gib"] = round(sum((engine / f).stat().st_size for f in spec["files"]) / 2**30, 2)
    else:
        row["log_tail"] = log.read_text()[-400:]
    return row


GENERATE = """
import json, sys, time
from sd_deploy.runtime import BackendOptions, GenerationRequest, Pipeline
pipe = Pipeline(sys.argv[1], backend="onnxruntime",
                options=BackendOptions(graph_cache=False), keep_loaded=False)
steps = int(sys.argv[2])
start = time.perf_counter()
result = pipe.generate(GenerationRequest(prompt="a lighthouse on a cliff at sunset",
                                         steps=steps, seed=1, width=int(sys.argv[4]),
                                         height=int(sys.argv[4])))
wall = time.perf_counter() - start
from sd_deploy.runtime import save_png
save_png(result.images[0], sys.argv[3], result.parameters[0].infotext())
t = result.timings
print(json.dumps({"wall_s": round(wall, 1), "unet_s_per_step": round(t["unet"] / steps, 2),
                  "timings": {k: round(v, 2) for k, v in t.items()}}))
"""


def generate(out: Path, fp16: bool, steps: int, size: int) -> dict[str, object]:
    engine = out / ("engines-fp16" if fp16 else "engines-fp32")
    precision = "fp16" if fp16 else "fp32"
    log = out / f"generate-{precision}.log"
    png = out / f"sdxl-{size}-{precision}.png"
    command = [sys.executable, "-c", GENERATE, str(engine), str(steps), str(png), str(size)]
    result = run_measured(command, log)
    row: dict[str, object] = {"step": "generate", "precision": precision, "steps": steps}
    row.update(result)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if result["exit"] == 0 and lines:
        row.update(json.loads(lines[-1]))
    else:
        row["log_tail"] = log.read_text()[-400:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="sdxl", help="sdxl, or tiny-xl to try the script")
    parser.add_argument("--size", type=int, default=1024, help="Side of the generated image.")
    parser.add_argument("--components", nargs="+", default=list(COMPONENTS))
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--keep", action="store_true", help="Keep the engine dirs.")
    parser.add_argument("extra", nargs="*", help="sd-export options after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.jsonl"
    rows = []
    for precision in args.precisions:
        for component in args.components:
            row = export_one(args.out, args.model, component, precision == "fp16", args.extra)
            rows.append(row)
            with report.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        complete = {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(args.components)
        if not args.no_generate and complete:
            row = generate(args.out, precision == "fp16", args.steps, args.size)
            rows.append(row)
            with report.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(args.out / f"engines-{precision}", ignore_errors=True)
    header = f"{'step':9s} {'component':15s} {'prec':5s} {'peak RSS GiB':>12s} {'anon GiB':>8s}"
    header += f" {'wall s':>8s}"
    print(f"\n{header}  notes")
    for row in rows:
        notes = (
            f"graph {row.get('graph_precision')}, rel L2 {row.get('max_rel_l2')}, "
            f"{row.get('files_gib')} GiB"
            if row["step"] == "export"
            else f"{row.get('unet_s_per_step')} s/step UNet"
        )
        if row.get("exit"):
            notes = f"FAILED (exit {row['exit']}), see the log"
        print(
            f"{row['step']:9s} {row.get('component', '-'):15s} {row['precision']:5s} "
            f"{row['peak_rss_gib']:>12} {row['peak_anon_rss_gib']:>8} {row['wall_s']:>8}  {notes}"
        )


if __name__ == "__main__":
    main()
