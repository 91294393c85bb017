"""Speed of server aggregation: FedAvg, medfl's batched PFA and a reference-style PFA, on three networks.

K sites hold perturbed copies of one network. Each method aggregates the K state dicts several times; the
median wall time is reported. The reference-style baseline follows the public reference code: numpy
float64, one site and one tensor at a time, the forward FFT of every site computed once for the shared
spectrum and again for the replacement. medfl's PFA must equal it within 1e-5 (checked here).

    python benchmarks/aggregation.py [--device cpu|cuda|auto] [--sites 4] [--repeats 5]
    python benchmarks/aggregation.py --smoke    # narrow networks, K = 2, one repeat, nothing kept (the suite runs it)

Writes benchmarks/results/aggregation.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from medfl.federated.averaging import average_states, normalise_site_weights
from medfl.federated.params import Role, parameter_roles
from medfl.federated.pfa import pfa_aggregate
from medfl.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
NETWORKS = [
    ("slim_vgg16", "classification", 3, 3, {"width": 1.0}),
    ("unet", "segmentation", 2, 1, {}),
    ("efficientnet-b0", "classification", 3, 3, {"width": 1.0}),
]
# --smoke: the same networks, narrow (every code path, the PFA check included, in seconds).
SMOKE_NETWORKS = [
    ("slim_vgg16", "classification", 3, 3, {"width": 0.125}),
    ("unet", "segmentation", 2, 1, {"width": 0.25}),
    ("efficientnet-b0", "classification", 3, 3, {"width": 0.25}),
]
METHODS = ("fedavg", "pfa", "reference_pfa")
States = Mapping[str, Mapping[str, Tensor]]


# ---- the reference-style baseline ------------------------------------------------------------------------


def _canonical(spectrum: np.ndarray) -> np.ndarray:
    """Imaginary part +0 on the DC / Nyquist bins, as medfl does, so that +pi / -pi cannot differ."""
    for index in np.ndindex(*[2] * spectrum.ndim):
        bins = tuple(0 if bit == 0 else n // 2 for bit, n in zip(index, spectrum.shape, strict=True))
        if all(bit == 0 or n % 2 == 0 for bit, n in zip(index, spectrum.shape, strict=True)):
            spectrum[bins] = spectrum[bins].real
    return spectrum


def _shifted_polar(signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    spectrum = _canonical(np.fft.fftn(signal))
    return np.fft.fftshift(np.abs(spectrum)), np.fft.fftshift(np.angle(spectrum))


def _reference_signals(signals: list[np.ndarray], ratio: float, weights: np.ndarray) -> list[np.ndarray]:
    """One matrix (or row) per site, as the reference does it: two passes of per-site FFTs."""
    shared_amplitude = np.zeros(signals[0].shape)
    shared_phase = np.zeros(signals[0].shape)
    for weight, signal in zip(weights, signals, strict=True):
        amplitude, phase = _shifted_polar(signal)
        shared_amplitude += weight * amplitude
        shared_phase += weight * phase
    box = tuple(slice(n // 2 - int(n * ratio / 2), n // 2 + int(n * ratio / 2)) for n in signals[0].shape)
    outputs = []
    for signal in signals:
        amplitude, phase = _shifted_polar(signal)
        amplitude[box] = shared_amplitude[box]
        phase[box] = shared_phase[box]
        rebuilt = np.fft.ifftshift(amplitude) * np.exp(1j * np.fft.ifftshift(phase))
        outputs.append(np.real(np.fft.ifftn(rebuilt)))
    return outputs


def _to_matrix(array: np.ndarray, role: Role) -> np.ndarray:
    if role is Role.CONV_TRANSPOSE:
        array = np.swapaxes(array, 0, 1)
    if role in (Role.CONV, Role.CONV_TRANSPOSE):
        return np.moveaxis(array, 0, -1).reshape(array.shape[1] * array.shape[2], -1)
    return array


def _from_matrix(matrix: np.ndarray, role: Role, shape: tuple[int, ...]) -> np.ndarray:
    if role is Role.LINEAR:
        return matrix
    kernel_shape = (shape[1], shape[0], *shape[2:]) if role is Role.CONV_TRANSPOSE else shape
    kernel = np.moveaxis(matrix.reshape(*kernel_shape[1:], kernel_shape[0]), -1, 0)
    return np.swapaxes(kernel, 0, 1) if role is Role.CONV_TRANSPOSE else kernel


def reference_pfa(states: States, roles: Mapping[str, Role], ratio: float, weights: np.ndarray) -> dict:
    """PFA the way the reference code runs it: numpy float64, per tensor, per site, per class row."""
    sites = list(states)
    out: dict[str, dict[str, Tensor]] = {site: {} for site in sites}
    for key, role in roles.items():
        originals = [states[site][key] for site in sites]
        if role is Role.NORM:
            mixed = originals
        else:
            arrays = [t.detach().cpu().numpy().astype(np.float64) for t in originals]
            if role is Role.OTHER:
                mean = sum(w * a for w, a in zip(weights, arrays, strict=True))
                results = [mean] * len(sites)
            elif role is Role.CLASSIFIER:
                rows = [a.reshape(a.shape[0], -1) for a in arrays]
                results = [np.empty_like(r) for r in rows]
                for c in range(rows[0].shape[0]):
                    for site, row in enumerate(_reference_signals([r[c] for r in rows], ratio, weights)):
                        results[site][c] = row
                results = [r.reshape(arrays[0].shape) for r in results]
            else:
                matrices = [_to_matrix(a, role) for a in arrays]
                results = [
                    _from_matrix(m, role, arrays[0].shape)
                    for m in _reference_signals(matrices, ratio, weights)
                ]
            mixed = [
                torch.from_numpy(np.ascontiguousarray(r)).to(dtype=t.dtype, device=t.device)
                for r, t in zip(results, originals, strict=True)
            ]
        for site, tensor in zip(sites, mixed, strict=True):
            out[site][key] = tensor
    return out


# ---- set-up and timing -----------------------------------------------------------------------------------


def site_states(name: str, task: str, classes: int, channels: int, options: dict, sites: int, device: str):
    """K perturbed copies of one seeded network's state, their roles and the parameter count."""
    torch.manual_seed(0)
    model = build_model(name, task, num_classes=classes, in_channels=channels, **options)
    roles = parameter_roles(model)
    base = model.state_dict()
    generator = torch.Generator().manual_seed(1)
    states = {}
    for index in range(sites):
        states[f"site{index}"] = {
            key: (t + 0.01 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t).to(
                device
            )
            for key, t in base.items()
        }
    parameters = sum(p.numel() for p in model.parameters())
    return states, roles, parameters


def interleaved_times(
    runs: Mapping[str, Callable[[], object]], repeats: int, device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, object]]:
    """Wall and process CPU times of every run, `repeats` rounds after one warm-up, methods taking turns.

    Taking turns spreads the load of a shared machine over all methods alike. CPU time (all threads of
    this process) is the steadier measure on a busy machine when torch runs one thread.
    """
    results = {method: run() for method, run in runs.items()}
    wall: dict[str, list[float]] = {method: [] for method in runs}
    cpu: dict[str, list[float]] = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[method] = run()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)
    return wall, cpu, results


def max_difference(first: dict, second: dict) -> float:
    return max(
        float((first[site][key].double().cpu() - second[site][key].double().cpu()).abs().max())
        for site in first
        for key in first[site]
        if first[site][key].numel()
    )


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


# ---- output ----------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| network | parameters | FedAvg (ms) | PFA (ms) | reference PFA (ms) | reference / PFA "
        "| same, CPU time | PFA / FedAvg | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = {m: 1000 * row["median_s"][m] for m in METHODS}
        lines.append(
            f"| {row['network']} | {row['parameters']:,} | {ms['fedavg']:.1f} | {ms['pfa']:.1f} | "
            f"{ms['reference_pfa']:.1f} | {row['speedup_vs_reference']:.1f}x | "
            f"{row['cpu_speedup_vs_reference']:.1f}x | {row['pfa_over_fedavg']:.1f}x | "
            f"{row['max_abs_diff_vs_reference']:.1e} |"
        )
    return "\n".join(lines)


def bar_chart(rows: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"fedavg": "FedAvg", "pfa": "medfl PFA", "reference_pfa": "reference-style PFA"}
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.27
    for offset, method in enumerate(METHODS):
        positions = [i + (offset - 1) * width for i in range(len(rows))]
        axis.bar(positions, [1000 * row["median_s"][method] for row in rows], width, label=labels[method])
    axis.set_xticks(range(len(rows)), [row["network"] for row in rows])
    axis.set_yscale("log")
    axis.set_ylabel("median time per aggregation (ms, log)")
    axis.set_title(
        f"K={rows[0]['sites']} sites, device {info['device']}, torch threads {info['torch_threads']}\n{info['cpu']}",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.7, help="low-frequency ratio L (first round's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "aggregation", help="path stem of the results"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="narrow networks, K = 2, one repeat; results go to a temporary folder that is removed")
    args = parser.parse_args(argv)
    if not args.smoke:
        return measure(args, NETWORKS, argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.sites, args.repeats, args.output = 2, 1, Path(tmp) / "aggregation"
        return measure(args, SMOKE_NETWORKS, argv)


def measure(args: argparse.Namespace, networks: list, argv: list[str] | None) -> int:
    """Time every network's aggregations, write <output>.json, .md and .png; 1 when PFA differs from the reference."""
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine(device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    rows = []
    for name, task, classes, channels, options in networks:
        states, roles, parameters = site_states(name, task, classes, channels, options, args.sites, device)
        counts = {site: 100 + 50 * index for index, site in enumerate(states)}
        weights = normalise_site_weights(list(states), counts)
        keys = list(roles)
        reference_weights = weights.numpy()
        runs = {
            "fedavg": partial(average_states, states, weights, keys),
            "pfa": partial(pfa_aggregate, states, roles, args.ratio, counts),
            "reference_pfa": partial(reference_pfa, states, roles, args.ratio, reference_weights),
        }
        wall, cpu, results = interleaved_times(runs, args.repeats, device)
        medians = {method: statistics.median(times) for method, times in wall.items()}
        cpu_medians = {method: statistics.median(times) for method, times in cpu.items()}
        difference = max_difference(results["pfa"], results["reference_pfa"])
        row = {
            "network": name,
            "options": options,
            "parameters": parameters,
            "entries": len(roles),
            "fft_entries": sum(r not in (Role.NORM, Role.OTHER) for r in roles.values()),
            "sites": args.sites,
            "ratio": args.ratio,
            "median_s": medians,
            "cpu_median_s": cpu_medians,
            "times_s": wall,
            "cpu_times_s": cpu,
            "speedup_vs_reference": medians["reference_pfa"] / medians["pfa"],
            "cpu_speedup_vs_reference": cpu_medians["reference_pfa"] / cpu_medians["pfa"],
            "pfa_over_fedavg": medians["pfa"] / medians["fedavg"],
            "max_abs_diff_vs_reference": difference,
            "equal_within_1e-5": difference <= 1e-5,
        }
        rows.append(row)
        print(
            f"{name}: fedavg {medians['fedavg'] * 1000:.1f} ms, pfa {medians['pfa'] * 1000:.1f} ms, "
            f"reference {medians['reference_pfa'] * 1000:.1f} ms, diff {difference:.1e}",
            flush=True,
        )

    text = table(rows)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    summary = {"machine": info, "repeats": args.repeats, "results": rows}
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    machine_line = ", ".join(f"{k}: {v}" for k, v in info.items())
    args.output.with_suffix(".md").write_text(
        f"# Aggregation speed\n\n`python benchmarks/aggregation.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f"\n\n{machine_line}; K = {args.sites} sites, L = {args.ratio}, "
        f"median of {args.repeats} runs (wall time; the CPU-time ratio is the process's CPU time).\n\n{text}\n"
    )
    bar_chart(rows, info, args.output.with_suffix(".png"))
    if not all(row["equal_within_1e-5"] for row in rows):
        print("medfl PFA differs from the reference-style PFA by more than 1e-5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
