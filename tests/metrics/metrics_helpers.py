"""Scraping a real metrics endpoint: Prometheus text → {(sample name, sorted labels): value}."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
URL_LINE = re.compile(r"serving metrics on (http://\S+/metrics)")


def scrape(url: str) -> Samples:
    """Every sample of one scrape of ``url``."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (KeyError naming what exists when absent)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        near = sorted({k for k in samples if k[0] == name})
        raise KeyError(f"no sample {key}; samples named {name}: {near}")
    return samples[key]


def wait_for_url(log: Path, timeout: float = 60.0) -> str:
    """The metrics URL a server printed to ``log`` (``serving metrics on URL``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = URL_LINE.search(log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise TimeoutError(f"no metrics URL in {log}: {log.read_text(errors='replace')[-2000:]}")


def tree_bytes(root: Path) -> int:
    """Σ size of the regular files under ``root`` (computed independently of fedmerge.metrics)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())
