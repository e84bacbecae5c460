"""sd-bench's outputs: report.json (every figure), report.md (tables to read), PNG plots.

report.json is strict JSON: a PSNR of identical images is the string "inf", NaN is null.
All times are seconds; memory is MiB; speed-ups are baseline median / backend median, so
2.0 means twice as fast as the baseline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sd_deploy.benchmarks.plots import format_seconds, image_grid, latency_chart
from sd_deploy.engine_dir.atomic import write_atomic
from sd_deploy.engine_dir.layout import REQUIRED_COMPONENTS

COMPONENT_TITLES = {
    "text_encoder": "text encoder",
    "unet": "UNet (per step)",
    "vae_decoder": "VAE decoder",
    "vae_encoder": "VAE encoder",
}
REPORT_FILES = ("report.json", "report.md", "latency.png", "images.png")


def strict_json(value: Any) -> Any:
    """Replace non-finite floats (inf -> "inf", NaN -> None) and numpy scalars for json."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_report(report: dict[str, Any], images: dict[str, np.ndarray], folder: Path) -> Path:
    """report.json, report.md, latency.png and images.png in `folder` (which exists)."""
    folder = Path(folder)
    saved = save_images(images, folder / "images")
    report["files"] = [*REPORT_FILES, *(f"images/{p.name}" for p in saved)]
    write_atomic(folder / "report.json", json.dumps(strict_json(report), indent=2) + "\n")
    write_atomic(folder / "report.md", markdown(report))
    first = str(report["config"]["batches"][0])
    ok = [n for n, e in report["backends"].items() if e.get("status") == "ok"]
    latency_chart(
        latency_panels(report, first),
        ok,
        folder / "latency.png",
        title=f"Median latency, batch {first}, {report['config']['width']}x"
        f"{report['config']['height']}, {report['config']['steps']} steps",
    )
    reference = images.get("torch")
    if reference is not None:
        rows = [(name, got) for name, got in images.items() if name != "torch"]
        image_grid(reference, rows or [("torch", reference)], folder / "images.png")
    return folder


def save_images(images: dict[str, np.ndarray], folder: Path) -> list[Path]:
    """Each backend's images of the first batch size as images/<backend>-<i>.png."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    paths = []
    for name, batch in images.items():
        for i, array in enumerate(batch):
            path = folder / f"{name}-{i}.png"
            Image.fromarray(array).save(path)
            paths.append(path)
    return paths


def latency_panels(report: dict[str, Any], batch: str) -> list[tuple[str, list[tuple[str, float]]]]:
    panels: list[tuple[str, list[tuple[str, float]]]] = []
    backends = {n: e for n, e in report["backends"].items() if e.get("status") == "ok"}
    for component in REQUIRED_COMPONENTS:
        rows = [
            (name, e["latency"][batch]["components"][component]["median"])
            for name, e in backends.items()
            if component in e["latency"][batch]["components"]
        ]
        if rows:
            panels.append((COMPONENT_TITLES[component], rows))
    panels.append(
        (
            "end to end (one generation)",
            [(n, e["latency"][batch]["end_to_end"]["median"]) for n, e in backends.items()],
        )
    )
    return panels


# ---------------------------------------------------------------------------------- markdown


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _t(stats: dict[str, Any] | None, key: str = "median") -> str:
    if not stats or stats.get(key) is None:
        return "-"
    return format_seconds(float(stats[key]))


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _vs(ratios: dict[str, Any], name: str, batch: str, baseline: str) -> str:
    """End-to-end speed-up of `name` over `baseline` as a table cell."""
    if name == baseline:
        return "1.00x (baseline)"
    return _x(ratios.get(name, {}).get("latency", {}).get(batch, {}).get("end_to_end"))


def _e(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2e}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _load(value: list[float] | None) -> str:
    return "-" if not value else f"{value[0]:.2f}"


def _psnr(image_parity: dict[str, Any] | None) -> str:
    if not image_parity:
        return "-"
    if "not_comparable" in image_parity:
        return "n/a (stochastic)"
    value = image_parity["psnr_db"]
    psnr = "inf (identical)" if value in ("inf", math.inf) else f"{value:.1f} dB"
    return f"{psnr} / {image_parity['ssim']:.4f}"


def markdown(report: dict[str, Any]) -> str:
    c, m, eng = report["config"], report["machine"], report["engine"]
    backends: dict[str, dict[str, Any]] = report["backends"]
    ok = {n: e for n, e in backends.items() if e.get("status") == "ok"}
    first = str(c["batches"][0])
    vs_torch = report.get("ratios", {}).get("vs_torch", {})
    vs_diff = report.get("ratios", {}).get("vs_diffusers", {})
    vs_bf16 = report.get("ratios", {}).get("vs_diffusers-bf16")
    gpu = m.get("gpu")
    lines = [
        "# sd-bench report",
        "",
        f"Model **{eng['family']}** ({eng['prediction_type']}) from `{eng['source']}`; engines "
        + ", ".join(f"{n} {v['precision']}" for n, v in eng["components"].items())
        + ".",
        "",
        f"Work: {c['width']}x{c['height']} px, {c['steps']} steps of `{c['sampler']}`, guidance "
        f"{c['guidance']:g} ({'cond + uncond in one UNet call' if c['guidance'] > 1 else 'no CFG'})"
        f", batch {', '.join(map(str, c['batches']))}; {c['warmup']} warm-up + {c['runs']} timed "
        f"runs per batch size; seed {c['seed']}, the same prompts and initial noise for every "
        "backend. CPU threads: "
        + (
            f"{c['threads']} intra-op thread(s) for PyTorch, diffusers and ONNX Runtime alike."
            if c.get("threads")
            else f"each library's default (PyTorch: {m.get('torch_threads')})."
        ),
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['memory_gib']} GiB RAM, "
        + (f"GPU {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "no GPU")
        + f"; load average {m.get('load_average_start')} at start, "
        f"{m.get('load_average_end')} at end (1/5/15 min).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        f"## Headline (batch {first})",
        "",
        "Speed-up = baseline median / backend median (above 1: faster than the baseline). "
        "Image PSNR / SSIM against the PyTorch fp32 pipeline from the same initial noise.",
        "",
    ]
    rows = []
    for name, e in ok.items():
        lat = e["latency"][first]
        parity = e.get("parity", {})
        worst = max((v["rel_l2"] for v in parity.get("components", {}).values()), default=None)
        rows.append(
            [
                f"**{name}**",
                e["describe"],
                _t(lat["end_to_end"]),
                f"{lat['images_per_s']:.3f}" if lat.get("images_per_s") else "-",
                _t(lat["components"].get("unet")),
                _x(vs_torch.get(name, {}).get("latency", {}).get(first, {}).get("end_to_end"))
                if name != "torch"
                else "1.00x (reference)",
                _x(vs_diff.get(name, {}).get("latency", {}).get(first, {}).get("end_to_end"))
                if name != "diffusers"
                else "1.00x (baseline)",
                *([] if vs_bf16 is None else [_vs(vs_bf16, name, first, "diffusers-bf16")]),
                _psnr(parity.get("images")) if name != "torch" else "reference",
                _e(worst) if name != "torch" else "reference",
            ]
        )
    lines += _table(
        [
            "backend",
            "runs on",
            "end to end (median)",
            "images/s",
            "UNet per step",
            "vs PyTorch",
            "vs diffusers",
            *([] if vs_bf16 is None else ["vs diffusers-bf16"]),
            "image PSNR / SSIM",
            "worst component rel. L2",
        ],
        rows,
    )
    skipped = {n: e for n, e in backends.items() if e.get("status") != "ok"}
    if skipped:
        lines += ["Not measured: " + "; ".join(
            f"**{n}** {e['status']}: {e.get('reason', '')}" for n, e in skipped.items()
        ), ""]  # fmt: skip

    lines += [f"## Where the time goes (batch {first}, medians per generation)", ""]
    rows = []
    for name, e in ok.items():
        lat = e["latency"][first]
        total = lat["end_to_end"]["median"]
        parts = {
            "text encoder": lat["components"].get("text_encoder", {}).get("median"),
            "UNet, all steps": lat.get("unet_all_steps", {}).get("median"),
            "VAE decoder": lat["components"].get("vae_decoder", {}).get("median"),
            "outside components": lat["outside_components"].get("median"),
        }
        rows.append(
            [f"**{name}**"]
            + [
                "-" if v is None else f"{format_seconds(v)} ({100 * v / total:.1f}%)"
                for v in parts.values()
            ]
            + [format_seconds(total)]
        )
    lines += _table(
        [
            "backend",
            "text encoder",
            "UNet, all steps",
            "VAE decoder",
            "outside components",
            "total",
        ],
        rows,
    )
    lines += [
        '"Outside components" is everything between component calls: tokenizer, sampler '
        "math, classifier-free guidance, casts and copies (for diffusers: its pipeline code).",
        "",
        "## Latency per component call",
        "",
    ]
    rows = []
    for name, e in ok.items():
        for batch, lat in e["latency"].items():
            for component, stats in lat["components"].items():
                speedups = [
                    table.get(name, {}).get("latency", {}).get(batch, {}).get(component)
                    for table in (vs_torch, vs_diff)
                ]
                rows.append(
                    [name, batch, COMPONENT_TITLES.get(component, component)]
                    + [_t(stats, k) for k in ("median", "p90", "min", "max")]
                    + [stats.get("n", 0), _x(speedups[0]), _x(speedups[1])]
                )
    lines += _table(
        ["backend", "batch", "component", "median", "p90", "min", "max", "calls", "vs PyTorch",
         "vs diffusers"],
        rows,
    )  # fmt: skip

    lines += ["## End to end", ""]
    rows = []
    for name, e in ok.items():
        for batch, lat in e["latency"].items():
            speedups = [
                table.get(name, {}).get("latency", {}).get(batch, {}).get(key)
                for table in (vs_torch, vs_diff)
                for key in ("end_to_end", "end_to_end_best")
            ]
            rows.append(
                [name, batch]
                + [_t(lat["end_to_end"], k) for k in ("median", "p90", "min", "max")]
                + [
                    f"{lat['images_per_s']:.3f}" if lat.get("images_per_s") else "-",
                    ", ".join(format_seconds(s) for s in lat.get("warmup_s", [])) or "-",
                ]
                + [f"{_x(speedups[i])} ({_x(speedups[i + 1])})" for i in (0, 2)]
            )
    lines += _table(
        ["backend", "batch", "median", "p90", "min", "max", "images/s", "warm-up run(s)",
         "vs PyTorch (best runs)", "vs diffusers (best runs)"],
        rows,
    )  # fmt: skip
    lines += [
        "Speed-ups in brackets compare the fastest run of each (min / min): the figure least "
        "disturbed by other work on the machine.",
        "",
    ]

    lines += [
        "## Parity against PyTorch fp32",
        "",
        "Per component, on inputs recorded from the PyTorch pipeline's own run: the text "
        "embeddings of the prompts above, UNet inputs (latent, timestep, text embeddings) at "
        "the first, middle and last step of its sampling trajectory, the final latent for the "
        "VAE decoder and the decoded images for the VAE encoder. Worst case over those samples "
        "and outputs.",
        "",
    ]
    rows = []
    for name, e in ok.items():
        if name == "torch":
            continue
        for component, p in e.get("parity", {}).get("components", {}).items():
            export = eng["components"].get(component, {}).get("export_validation_rel_l2")
            rows.append(
                [name, COMPONENT_TITLES.get(component, component), _e(p["rel_l2"]),
                 _e(p["max_abs"]), f"{p['cosine']:.8f}", len(p["samples"]),
                 _e(export) if name not in ("diffusers",) else "-"]
            )  # fmt: skip
    lines += _table(
        ["backend", "component", "rel. L2", "max abs", "cosine", "samples",
         "rel. L2 at export (random inputs)"],
        rows,
    )  # fmt: skip
    rows = []
    for name, e in ok.items():
        if name == "torch":
            continue
        img = e.get("parity", {}).get("images", {})
        if "not_comparable" in img:
            rows.append([name, img["not_comparable"], "-", "-", "-"])
            continue
        rows.append(
            [name, _psnr(img), img.get("max_abs_levels", "-"),
             f"{img.get('mean_abs_levels', 0):.3f}", f"{img.get('differing_pixels_pct', 0):.2f}%"]
        )  # fmt: skip
    lines += _table(
        ["backend", "PSNR / SSIM", "max diff (8-bit levels)", "mean diff", "pixels differing"],
        rows,
    )
    contrast = backends.get("torch", {}).get("reference_image_contrast")
    if contrast is not None:
        lines += [
            f"The reference images have a pixel standard deviation of {contrast:.1f} levels"
            + (
                " (seeded random weights: low-contrast noise-like images, which favour PSNR; "
                "the per-component figures are the stricter test)."
                if str(eng.get("source", "")).startswith("preset:")
                else "."
            ),
            "",
        ]
    lines += ["![images](images.png)", "", "![latency](latency.png)", ""]

    lines += ["## Load time and memory", ""]
    rows = []
    for name, e in ok.items():
        mem = e.get("memory", {})
        gpu_cols = (
            [_mib(mem.get("gpu_peak_mib")), _mib(mem.get("gpu_used_delta_mib"))] if gpu else []
        )
        imports = e.get("import_s")
        load_avg = e.get("load_average") or {}
        rows.append(
            [name, f"{e['load_s']:.2f} s", "-" if imports is None else f"{imports:.2f} s",
             _mib(mem.get("host_peak_mib")), _mib(mem.get("host_delta_mib")), *gpu_cols,
             _load(load_avg.get("start")) + " -> " + _load(load_avg.get("end"))]
        )  # fmt: skip
    gpu_head = ["GPU peak, PyTorch allocator (MiB)", "GPU in use, delta (MiB)"] if gpu else []
    lines += _table(
        ["backend", "load", "Python imports", "peak host RSS (MiB)",
         "added over phase start (MiB)", *gpu_head, "load average (1 min) at phase start -> end"],
        rows,
    )  # fmt: skip
    per_phase = all(e.get("memory", {}).get("peak_is_per_phase") for e in ok.values())
    lines += [
        "What load means: " + "; ".join(f"{n}: {e['load_means']}" for n, e in ok.items()) + ".",
        "",
        "Peak host RSS is the process's peak resident memory during that backend's phase "
        + (
            "(VmHWM reset at each phase start), "
            if per_phase
            else "(VmHWM could not be reset: the process's peak so far), "
        )
        + 'so it includes whatever was resident before; "added" is that peak minus the RSS at '
        "the phase start. The PyTorch reference stays loaded during the diffusers phase "
        "(diffusers shares its weight tensors) and is freed before the engine backends run; "
        "each engine backend is closed and freed after its phase.",
        "",
    ]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{n}** ({e['status']}): {e.get('reason', '')}" for n, e in skipped.items()]
        lines += [""]
    return "\n".join(lines)
