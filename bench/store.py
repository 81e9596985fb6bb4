"""Model-store throughput and streaming memory: ``python -m bench store [--quick]``.

* commit: ``ModelStore.commit_base`` (per-tensor content-addressed blobs, sha256, fsync, manifest,
  SQLite transaction) against ``safetensors.torch.save_file`` of the same tensors (no fsync).
  A second reference adds one fsync to ``save_file``: the store's writes are durable, the plain
  ``save_file`` ones are still in the page cache when it returns.
* export: ``ModelStore.export`` (every blob read once and re-hashed as it is read, written into
  pre-sized HF shards by one thread per CPU, fsync, atomic rename) against ``load_file`` +
  ``save_file`` of the same tensors (no fsync). A second reference adds one fsync, the same
  durability promise as the export's. The CPU time (user + system, all threads) of the export and
  of the plain reference is reported too, with the time SHA-256 alone takes over the model's bytes
  on one thread (timed interleaved with the plain reference): the export must hash every byte it
  reads, the reference does not, so on c CPUs the export cannot beat c × that ratio.
  Ratios are reference time / store time (≥ 1 means the store is faster); each store operation is
  timed interleaved with its reference, best of ``--repeats`` (``bench.timing``); the load average
  is printed.
* peak RSS: a fresh interpreter exports a model twice the memory budget (base + one delta, so the
  export really sums) and reports its peak-RSS growth as a fraction of the model size.

``--backend s3`` measures the store on S3-compatible object storage instead (a local SeaweedFS
started for the run, or ``--s3-url s3://bucket/prefix`` on ``AWS_ENDPOINT_URL``): ``commit_base``
to a fresh prefix against a plain boto3 multipart upload (``upload_fileobj``, its default
``TransferConfig``: 8 MiB parts, 10 threads) of the same tensors' bytes as one safetensors object,
and ``export`` (every blob fetched by ranged GETs, no cache, re-hashed) against a plain boto3
``download_file`` of that object; both timed interleaved, best of ``--repeats``
(keys ``s3_commit_vs_boto3``, ``s3_export_vs_boto3``: reference time / store time). The export
fsyncs what it writes, the plain download does not: a second reference fsyncs the downloaded file
(``s3_export_vs_boto3_fsync``), the same durability promise. Each timed store operation opens the
store (``ModelStore.open``), as a command does.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from fedmerge.store import ModelStore
from fedmerge.store.s3 import S3BlobBackend
from fedmerge.store.s3_client import S3Location, make_client
from fedmerge.store.s3_local import LocalSeaweed
from fedmerge_bench.timing import interleaved, load_average, load_line

TENSOR_ELEMS = 1 << 20  # 4 MiB fp32 tensors

CHILD = textwrap.dedent(
    """
    import json, sys
    from fedmerge.store import ModelStore
    store = ModelStore.open(sys.argv[1])
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = hwm()
    store.export("latest", sys.argv[2], max_shard_bytes=int(sys.argv[3]))
    after = hwm()
    print(json.dumps({"before": before, "after": after}))
    """
)


def make_model(total_bytes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(1, total_bytes // (TENSOR_ELEMS * 4))
    return {f"layers.{i:03d}.weight": torch.randn(1024, TENSOR_ELEMS // 1024, generator=g) for i in range(n)}


def measure_throughput(work: Path, model: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    counter = iter(range(10**6))

    def ref_save() -> None:
        save_file(model, work / f"ref-{next(counter)}.safetensors")

    def store_commit() -> None:
        with ModelStore.open(work / f"store-{next(counter)}") as store:
            store.commit_base(model, name="bench")

    def ref_save_fsync() -> None:
        path = work / f"ref-{next(counter)}.safetensors"
        save_file(model, path)
        with path.open("rb+") as fh:
            os.fsync(fh.fileno())

    commit = interleaved(store_commit, ref_save, repeats)
    commit_fsync = interleaved(store_commit, ref_save_fsync, repeats)
    t_ref_save, t_ref_save_fsync = commit.ref_s, commit_fsync.ref_s
    t_commit = min(commit.ours_s, commit_fsync.ours_s)
    src = work / "ref-src.safetensors"
    save_file(model, src)
    store_dir = work / "store-export"
    with ModelStore.open(store_dir) as store:
        store.commit_base(model, name="bench")

    def ref_export() -> None:
        save_file(load_file(src), work / f"ref-out-{next(counter)}.safetensors")

    def ref_export_fsync() -> None:
        path = work / f"ref-out-{next(counter)}.safetensors"
        save_file(load_file(src), path)
        with path.open("rb+") as fh:
            os.fsync(fh.fileno())

    def store_export() -> None:
        with ModelStore.open(store_dir) as store:
            store.export("latest", work / f"out-{next(counter)}")

    cpu_export: list[float] = []
    cpu_ref: list[float] = []
    export = interleaved(cpu_timed(store_export, cpu_export), cpu_timed(ref_export, cpu_ref), repeats)
    export_fsync = interleaved(store_export, ref_export_fsync, repeats)

    def sha256_alone() -> None:
        for t in model.values():
            hashlib.sha256(t.numpy().data.cast("B"))

    sha = interleaved(sha256_alone, ref_export, repeats)
    return {
        "t_ref_save": t_ref_save,
        "t_ref_save_fsync": t_ref_save_fsync,
        "t_commit": t_commit,
        "t_ref_export": export.ref_s,
        "t_ref_export_fsync": export_fsync.ref_s,
        "t_export": min(export.ours_s, export_fsync.ours_s),
        "cpu_export": min(cpu_export),
        "cpu_ref_export": min(cpu_ref),
        "t_sha256": sha.ours_s,
        "t_ref_sha256": sha.ref_s,
    }


def process_cpu_s() -> float:
    """User + system CPU seconds of this process so far, every thread (``time.process_time``)."""
    return time.process_time()


def cpu_timed(fn: Callable[[], None], sink: list[float]) -> Callable[[], None]:
    """``fn`` that appends the process CPU time each call took to ``sink``."""

    def timed() -> None:
        start = process_cpu_s()
        fn()
        sink.append(process_cpu_s() - start)

    return timed


def measure_peak_rss(work: Path, model_bytes: int) -> dict[str, float]:
    store_dir = work / "store-rss"
    with ModelStore.open(store_dir) as store:
        base = make_model(model_bytes, seed=1)
        root = store.commit_base(base, name="big")
        delta = {k: torch.full_like(v, 0.5) for k, v in base.items()}
        store.commit(
            delta,
            parents=[root.id],
            method="fedavg",
            params={},
            contributors=[],
            round=1,
            metrics={},
            privacy=None,
        )
        actual = sum(t.numel() * t.element_size() for t in base.values())
        del base, delta
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_dir), str(work / "rss-out"), str(actual // 4)],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = stats["after"] - stats["before"]
    return {"model_bytes": actual, "rss_growth": growth, "frac": growth / actual}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute on 2 cores")
    parser.add_argument("--model-mb", type=int, default=None, help="model size for throughput (MiB)")
    parser.add_argument("--budget-mb", type=int, default=None, help="memory budget; the RSS model is 2x this")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--backend", choices=("local", "s3"), default="local")
    parser.add_argument("--s3-url", default=None, help="s3://bucket/prefix (default: a local SeaweedFS)")
    args = parser.parse_args(argv)
    if args.backend == "s3":
        return main_s3(args)
    model_mb = args.model_mb or (64 if args.quick else 512)
    budget_mb = args.budget_mb or (128 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-store-") as tmp:
        work = Path(tmp)
        model = make_model(model_mb << 20, seed=0)
        nbytes = sum(t.numel() * t.element_size() for t in model.values())
        t = measure_throughput(work, model, repeats)
        del model
        for p in work.iterdir():
            if p.name != "store-export":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        rss = measure_peak_rss(work, 2 * (budget_mb << 20))
    mb = nbytes / 2**20
    table = Table(title=f"model store vs plain safetensors ({mb:.0f} MiB, best of {repeats})")
    for col in ("operation", "store s", "store MiB/s", "reference s", "reference MiB/s", "ratio"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    commit_ratio = t["t_ref_save"] / t["t_commit"]
    export_ratio = t["t_ref_export"] / t["t_export"]
    table.add_row(
        "commit vs save_file",
        f"{t['t_commit']:.3f}",
        f"{mb / t['t_commit']:.0f}",
        f"{t['t_ref_save']:.3f}",
        f"{mb / t['t_ref_save']:.0f}",
        f"{commit_ratio:.2f}",
    )
    table.add_row(
        "commit vs save_file+fsync",
        f"{t['t_commit']:.3f}",
        f"{mb / t['t_commit']:.0f}",
        f"{t['t_ref_save_fsync']:.3f}",
        f"{mb / t['t_ref_save_fsync']:.0f}",
        f"{t['t_ref_save_fsync'] / t['t_commit']:.2f}",
    )
    table.add_row(
        "export vs load_file+save_file",
        f"{t['t_export']:.3f}",
        f"{mb / t['t_export']:.0f}",
        f"{t['t_ref_export']:.3f}",
        f"{mb / t['t_ref_export']:.0f}",
        f"{export_ratio:.2f}",
    )
    table.add_row(
        "export vs load_file+save_file+fsync",
        f"{t['t_export']:.3f}",
        f"{mb / t['t_export']:.0f}",
        f"{t['t_ref_export_fsync']:.3f}",
        f"{mb / t['t_ref_export_fsync']:.0f}",
        f"{t['t_ref_export_fsync'] / t['t_export']:.2f}",
    )
    console.print(table)
    console.print(
        f"export CPU time {t['cpu_export']:.3f} s (all threads) vs the reference's "
        f"{t['cpu_ref_export']:.3f} s ({t['cpu_ref_export'] / t['cpu_export']:.2f}x); "
        f"SHA-256 of the model's bytes alone takes {t['t_sha256']:.3f} s on one thread "
        f"(reference time / SHA-256 time = {t['t_ref_sha256'] / t['t_sha256']:.2f})"
    )
    console.print(load_line())
    console.print(
        f"export of a {rss['model_bytes'] / 2**20:.0f} MiB model (2x a {budget_mb} MiB budget): "
        f"peak RSS grew "
        f"{rss['rss_growth'] / 2**20:.1f} MiB = {rss['frac']:.3f} of the model"
    )
    result = {
        "benchmark": "store",
        "quick": bool(args.quick),
        "model_mib": round(mb, 1),
        "commit_vs_safetensors": round(commit_ratio, 3),
        "export_vs_safetensors": round(export_ratio, 3),
        "commit_vs_safetensors_fsync": round(t["t_ref_save_fsync"] / t["t_commit"], 3),
        "export_vs_safetensors_fsync": round(t["t_ref_export_fsync"] / t["t_export"], 3),
        "export_cpu_vs_safetensors": round(t["cpu_ref_export"] / t["cpu_export"], 3),
        "sha256_alone_vs_safetensors": round(t["t_ref_sha256"] / t["t_sha256"], 3),
        "export_peak_rss_frac_of_model": round(rss["frac"], 4),
        "export_peak_rss_growth_mib": round(rss["rss_growth"] / 2**20, 1),
        "rss_model_mib": round(rss["model_bytes"] / 2**20, 1),
        "commit_mib_s": round(mb / t["t_commit"], 1),
        "export_mib_s": round(mb / t["t_export"], 1),
        "load_average_1min": round(load_average()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


def measure_s3(
    work: Path, model: dict[str, torch.Tensor], repeats: int, bucket: str, prefix: str, client: Any
) -> dict[str, float]:
    from safetensors.torch import save as save_bytes

    counter = iter(range(10**6))
    blob = save_bytes(model)

    def store_commit() -> None:
        url = f"s3://{bucket}/{prefix}/c{next(counter)}"
        with ModelStore.open(url, cache_dir=work / f"cache-{next(counter)}") as store:
            store.commit_base(model, name="bench")

    def ref_upload() -> None:
        client.upload_fileobj(io.BytesIO(blob), bucket, f"{prefix}/ref-{next(counter)}.safetensors")

    commit = interleaved(store_commit, ref_upload, repeats)
    src_key = f"{prefix}/ref-src.safetensors"
    client.upload_fileobj(io.BytesIO(blob), bucket, src_key)
    url = f"s3://{bucket}/{prefix}/export"
    with ModelStore.open(url, cache_dir=work / "cache-export") as store:
        store.commit_base(model, name="bench")

    def store_export() -> None:
        with ModelStore.open(url, cache_dir=work / "cache-export") as store:
            assert isinstance(store.blobs, S3BlobBackend)
            store.blobs.cache_blob_max = 0  # ranged reads, nothing cached: every byte comes from S3
            store.export("latest", work / f"out-{next(counter)}")

    def ref_download() -> None:
        client.download_file(bucket, src_key, str(work / f"ref-out-{next(counter)}.safetensors"))

    def ref_download_fsync() -> None:  # the export's durability promise: its files are fsynced
        path = work / f"ref-out-{next(counter)}.safetensors"
        client.download_file(bucket, src_key, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    export = interleaved(store_export, ref_download, repeats)
    export_durable = interleaved(store_export, ref_download_fsync, repeats)
    return {
        "t_commit": commit.ours_s,
        "t_ref_upload": commit.ref_s,
        "t_export": min(export.ours_s, export_durable.ours_s),
        "t_ref_download": export.ref_s,
        "t_ref_download_fsync": export_durable.ref_s,
    }


def main_s3(args: argparse.Namespace) -> int:
    model_mb = args.model_mb or (64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-s3-") as tmp:
        work = Path(tmp)
        server: LocalSeaweed | None = None
        try:
            if args.s3_url:
                loc = S3Location.parse(args.s3_url)
                bucket, prefix = loc.bucket, loc.prefix or "bench"
                client = make_client(None)
                where = f"{args.s3_url} at {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}"
            else:
                server = LocalSeaweed(work / "seaweed").start()
                os.environ.update(server.env())
                bucket, prefix = server.create_bucket("bench"), "run"
                client = make_client(server.endpoint)
                where = f"a local SeaweedFS ({server.endpoint})"
            model = make_model(model_mb << 20, seed=0)
            nbytes = sum(t.numel() * t.element_size() for t in model.values())
            t = measure_s3(work, model, repeats, bucket, prefix, client)
        finally:
            if server is not None:
                server.stop()
    mb = nbytes / 2**20
    commit_ratio = t["t_ref_upload"] / t["t_commit"]
    export_ratio = t["t_ref_download"] / t["t_export"]
    export_durable_ratio = t["t_ref_download_fsync"] / t["t_export"]
    table = Table(title=f"model store on {where} vs plain boto3 ({mb:.0f} MiB, best of {repeats})")
    for col in ("operation", "store s", "store MiB/s", "boto3 s", "boto3 MiB/s", "ratio"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    table.add_row(
        "commit vs upload_fileobj",
        f"{t['t_commit']:.3f}",
        f"{mb / t['t_commit']:.0f}",
        f"{t['t_ref_upload']:.3f}",
        f"{mb / t['t_ref_upload']:.0f}",
        f"{commit_ratio:.2f}",
    )
    table.add_row(
        "export vs download_file",
        f"{t['t_export']:.3f}",
        f"{mb / t['t_export']:.0f}",
        f"{t['t_ref_download']:.3f}",
        f"{mb / t['t_ref_download']:.0f}",
        f"{export_ratio:.2f}",
    )
    table.add_row(
        "export vs download_file + fsync",
        f"{t['t_export']:.3f}",
        f"{mb / t['t_export']:.0f}",
        f"{t['t_ref_download_fsync']:.3f}",
        f"{mb / t['t_ref_download_fsync']:.0f}",
        f"{export_durable_ratio:.2f}",
    )
    console.print(table)
    console.print(load_line())
    result = {
        "benchmark": "store",
        "backend": "s3",
        "quick": bool(args.quick),
        "model_mib": round(mb, 1),
        "s3_commit_vs_boto3": round(commit_ratio, 3),
        "s3_export_vs_boto3": round(export_ratio, 3),
        "s3_export_vs_boto3_fsync": round(export_durable_ratio, 3),
        "s3_commit_mib_s": round(mb / t["t_commit"], 1),
        "s3_export_mib_s": round(mb / t["t_export"], 1),
        "boto3_upload_mib_s": round(mb / t["t_ref_upload"], 1),
        "boto3_download_mib_s": round(mb / t["t_ref_download"], 1),
        "load_average_1min": round(load_average()[0], 2),
        "cpus": os.cpu_count(),
    }
    # three serve-continual replicas on one PostgreSQL against one (bench/replicas.py)
    from fedmerge_bench.replicas import intake_replicas

    result.update(intake_replicas(bool(args.quick)))
    print(json.dumps(result))
    return 0
