"""Aggregator throughput against peft's merge_utils and the machine's memory read bandwidth.

    python -m bench aggregators [--quick] [--device cuda]

Throughput is counted in dense-equivalent client input bytes (N·P·4 for fp32 deltas) per second.
Every method is timed interleaved with its references, best of k (``bench.timing``). In the same run
it measures: the fraction of read bandwidth (a torch sum over exactly the bytes the method reads —
the dense client tensors, or the values and indices of sparse ones — interleaved with the method;
``bench.timing.fraction_of_bandwidth``, at most 1.0 by construction),
peft's ``merge_utils`` on the same inputs (task_arithmetic with normalised weights for FedAvg,
``ties``, ``dare_ties``; a plain stacked torch argmax for MagMax, which peft lacks), and the peak RSS
of the streaming TIES path at N=8 and N=64 clients (separate processes, deltas created one at a time
and dropped after ``add`` as a server would). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from peft.utils import merge_utils
from rich.console import Console
from rich.table import Table

from fedmerge.aggregators import create
from fedmerge.delta import SparseTensor
from fedmerge.memory import use_mmap_for_large_allocations
from fedmerge_bench import timing
from fedmerge_bench.timing import fraction_of_bandwidth, interleaved

GB = 1e9


def sync_for(device: torch.device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` on CUDA (time kernels to completion), nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def heavy_tailed(n: int, p: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """Client deltas with Student-t-like tails, as fine-tuning deltas have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(p, generator=g)
        x.mul_(torch.randn(p, generator=g).abs_().add_(0.1).reciprocal_().clamp_(max=30))
        out.append(x.mul_(1e-3).to(device))
    return out


def streaming(
    name: str, deltas: list[Any], weights: list[float], device: torch.device, **params: Any
) -> Callable[[], object]:
    def run() -> object:
        agg = create(name, device=device, **params)
        agg.begin({"w": tuple(deltas[0].shape)})
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
            agg.add({"w": d}, w, client_id=i)
        return agg.finalize()

    return run


def read_pass(deltas: list[Any]) -> Callable[[], object]:
    """A pass that reads exactly the client bytes a method reads and does strictly less with them:
    a sum per dense tensor, or per values and indices tensor of a SparseTensor."""
    parts: list[torch.Tensor] = []
    for d in deltas:
        parts.extend([d.values, d.indices] if isinstance(d, SparseTensor) else [d])
    return lambda: [t.sum() for t in parts]


def rss_probe(n: int, p: int, group_size: int, pin_mmap: bool) -> None:
    """Child process: stream n fresh dense deltas through TIES; print the peak RSS in bytes."""
    if pin_mmap:
        use_mmap_for_large_allocations()
    agg = create("ties", density=0.2, group_size=group_size)
    agg.begin({"w": (p,)})
    base = torch.randn(p, generator=torch.Generator().manual_seed(0))
    for i in range(n):
        delta = base * (1.0 + 0.01 * i) - 0.001 * i  # a new tensor per client, dropped after add()
        agg.add({"w": delta}, 1.0 + i, client_id=i)
        del delta
    agg.finalize()
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) * 1024)


def peak_rss(n: int, p: int, group_size: int, pin_mmap: bool = True) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.aggregators",
            "--rss-probe",
            str(n),
            str(p),
            str(group_size),
            str(int(pin_mmap)),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return int(out.stdout.strip().splitlines()[-1])


def peft_ties(deltas: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return merge_utils.ties(deltas, w, 0.2)


def peft_dare_ties(deltas: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return merge_utils.dare_ties(deltas, w, 0.5)


def peft_fedavg(deltas: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return merge_utils.task_arithmetic(deltas, w / w.sum())


def stacked_magmax(deltas: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    t = torch.stack(deltas)
    return t.gather(0, t.abs().argmax(0, keepdim=True))[0]


FEDAVG, TIES, TIES_SPARSE, TIES_SPARSE_ONE, DARE_TIES, MAGMAX = (
    "fedavg",
    "ties (dense, trim 0.2 on server)",
    "ties (client-trimmed sparse 0.1)",
    "ties (client-trimmed sparse 0.1, group_size=1)",
    "dare_ties (density 0.5)",
    "magmax",
)


def measure(
    n: int, p: int, device: torch.device, console: Console, k: int, k_ref: int
) -> list[dict[str, Any]]:
    """Time every case at one (N, P); N > 8 reuses the same 8 client tensors (memory stays 8·P)."""
    unique = heavy_tailed(min(n, 8), p, seed=0, device=device)
    deltas = [unique[i % len(unique)] for i in range(n)]
    weights = [float(1 + i % 5) for i in range(n)]
    w_t = torch.tensor(weights, device=device)
    sparse = [SparseTensor.from_dense(merge_utils.magnitude_based_pruning(d, 0.1)) for d in unique]
    sparse_deltas = [sparse[i % len(sparse)] for i in range(n)]
    with_ref = p <= 16 * 2**20 and n <= 8  # the references stack all N·P values: small size only
    cases: list[tuple[str, Callable[[], object], Callable[..., torch.Tensor] | None]] = [
        (FEDAVG, streaming("fedavg", deltas, weights, device), peft_fedavg),
        (TIES, streaming("ties", deltas, weights, device, density=0.2), peft_ties),
        (TIES_SPARSE, streaming("ties", sparse_deltas, weights, device, density=1.0), None),
        # one client at a time: the fold of every sparse client before sparse grouping (and of
        # rounds that fold each reply at once)
        (
            TIES_SPARSE_ONE,
            streaming("ties", sparse_deltas, weights, device, density=1.0, group_size=1),
            None,
        ),
        (DARE_TIES, streaming("dare_ties", deltas, weights, device, density=0.5), peft_dare_ties),
        (MAGMAX, streaming("magmax", deltas, weights, device), stacked_magmax),
    ]
    input_gb = n * p * 4 / GB
    sync = sync_for(device)
    rows = []
    for label, ours, ref in cases:
        method_inputs = sparse_deltas if label in (TIES_SPARSE, TIES_SPARSE_ONE) else deltas
        read = read_pass(method_inputs)
        bw_pair = interleaved(ours, read, k, sync=sync)
        t_ours = bw_pair.ours_s
        t_ref = None
        if ref is not None and with_ref:
            ref_pair = interleaved(ours, functools.partial(ref, deltas, w_t), k_ref, sync=sync)
            t_ours, t_ref = min(t_ours, ref_pair.ours_s), ref_pair.ref_s
        frac = fraction_of_bandwidth(t_ours, bw_pair.ref_s)
        read_bytes = sum(
            (x.values.numel() * 4 + x.indices.numel() * x.indices.element_size())
            if isinstance(x, SparseTensor)
            else x.numel() * 4
            for x in method_inputs
        )
        rows.append(
            {
                "method": label,
                "N": n,
                "P": p,
                "ours_gbps": input_gb / t_ours,
                "ref_gbps": input_gb / t_ref if t_ref else None,
                "read_gbps": read_bytes / frac.read_s / GB,
                "frac_of_read_bw": frac.value,
                "ref_read_slower": frac.reference_was_slower,
            }
        )
        console.log(
            f"N={n} P={p / 2**20:.0f}M {label}: {rows[-1]['ours_gbps']:.2f} GB/s, "
            f"{frac.value:.0%} of read bandwidth"
        )
    # grouped against one-by-one sparse folds, interleaved with each other (same inputs, same result)
    grouped, one_by_one = (next(c[1] for c in cases if c[0] == lab) for lab in (TIES_SPARSE, TIES_SPARSE_ONE))
    pair = interleaved(grouped, one_by_one, k, sync=sync)
    speedup = pair.ref_s / pair.ours_s
    next(r for r in rows if r["method"] == TIES_SPARSE)["group_speedup"] = speedup
    console.log(f"N={n} P={p / 2**20:.0f}M sparse TIES grouped vs group_size=1: {speedup:.2f}× faster")
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench aggregators", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="N=8, P=16M only (about a minute on 2 cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (torch-native kernels on the GPU)")
    ap.add_argument("--repeats", type=int, default=3, help="k of best-of-k (interleaved with references)")
    ap.add_argument(
        "--rss-probe", nargs=4, type=int, metavar=("N", "P", "GROUP", "PIN"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.rss_probe:
        n, p, group, pin = args.rss_probe
        rss_probe(n, p, group, bool(pin))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available to torch on this machine", file=sys.stderr)
        return 2
    console = Console()
    sizes = [(8, 16 * 2**20)] if args.quick else [(8, 16 * 2**20), (64, 16 * 2**20), (8, 256 * 2**20)]
    k, k_ref = (args.repeats, max(2, args.repeats - 1))
    console.log(timing.load_line())
    rows = [row for n, p in sizes for row in measure(n, p, device, console, k, k_ref)]
    by = {r["method"]: r for r in rows if (r["N"], r["P"]) == (8, 16 * 2**20)}
    bw = by[FEDAVG]["read_gbps"]
    summary = {
        "ties_vs_peft": by[TIES]["ours_gbps"] / by[TIES]["ref_gbps"],
        "dare_ties_vs_peft": by[DARE_TIES]["ours_gbps"] / by[DARE_TIES]["ref_gbps"],
        "ties_sparse_frac_of_bandwidth": by[TIES_SPARSE]["frac_of_read_bw"],
        "ties_sparse_group1_frac_of_bandwidth": by[TIES_SPARSE_ONE]["frac_of_read_bw"],
        "ties_sparse_group_speedup": by[TIES_SPARSE]["group_speedup"],
        "fedavg_frac_of_bandwidth": by[FEDAVG]["frac_of_read_bw"],
        "ties_dense_frac_of_bandwidth": by[TIES]["frac_of_read_bw"],
        "fedavg_vs_peft": by[FEDAVG]["ours_gbps"] / by[FEDAVG]["ref_gbps"],
        "magmax_vs_stacked_torch": by[MAGMAX]["ours_gbps"] / by[MAGMAX]["ref_gbps"],
        "read_bandwidth_gbps": bw,
        "saturated_fractions": sum(bool(r["ref_read_slower"]) for r in rows),
    }
    rss_p = 4 * 2**20 if args.quick else 16 * 2**20
    rss8, rss64 = peak_rss(8, rss_p, 8), peak_rss(64, rss_p, 8)
    summary["peak_rss_growth_n8_to_n64"] = rss64 / rss8
    raw8 = raw64 = float("nan")
    if not args.quick:  # the same probe under glibc's default allocator: shows heap fragmentation
        raw8, raw64 = peak_rss(8, rss_p, 8, pin_mmap=False), peak_rss(64, rss_p, 8, pin_mmap=False)
        summary["peak_rss_growth_n8_to_n64_default_malloc"] = raw64 / raw8

    table = Table(title=f"Aggregators on {device} (GB/s of dense-equivalent fp32 client input)")
    for col in ("method", "N", "P", "fedmerge GB/s", "reference GB/s", "ratio", "frac of read bw"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    for r in rows:
        table.add_row(
            r["method"],
            str(r["N"]),
            f"{r['P'] / 2**20:.0f}M",
            f"{r['ours_gbps']:.2f}",
            f"{r['ref_gbps']:.3f}" if r["ref_gbps"] else "—",
            f"{r['ours_gbps'] / r['ref_gbps']:.1f}×" if r["ref_gbps"] else "—",
            f"{r['frac_of_read_bw']:.0%}" + (" (sat.)" if r["ref_read_slower"] else ""),
        )
    console.print(table, width=120)
    console.print(
        "references: peft merge_utils (task_arithmetic with normalised weights for fedavg, ties, "
        f"dare_ties); stacked torch argmax for magmax. Read bandwidth {bw:.1f} GB/s "
        "(torch sum over the bytes each method reads, interleaved, best of k; a fraction marked "
        "'sat.' saturated at 100 %: the reference ran slower than the method, the run was noisy).\n"
        f"{timing.load_line()}\n"
        f"Streaming TIES peak RSS, P={rss_p / 2**20:.0f}M, large blocks mmapped (as the server runs): "
        f"N=8 {rss8 / 2**20:.0f} MiB, N=64 {rss64 / 2**20:.0f} MiB"
        + (
            f"; with glibc's default dynamic mmap threshold: N=8 {raw8 / 2**20:.0f} MiB, "
            f"N=64 {raw64 / 2**20:.0f} MiB (heap fragmentation, nothing retained)"
            if not args.quick
            else ""
        ),
        width=120,
    )
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
