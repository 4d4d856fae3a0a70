"""`tfjax serve` on a tiny real checkpoint answers as soon as its start-up buckets compile:
/metrics shows the other buckets still compiling, a concurrent burst sent then gets the
greedy texts of a server started with `--compile-all-first`, nothing compiles on the serving
path, and every bucket is compiled in the end.

Slow: two servers start (~20 s each on 2 cores).
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.harness import MODEL, serve_subprocess

pytestmark = pytest.mark.slow

SERVE_ARGS = [
    "--served-model-name", MODEL, "--max-batch-size", "4", "--max-model-len", "160",
    "--kv-pages", "96", "--prefill-token-budget", "64", "--log-level", "warning",
]  # fmt: skip
PROMPTS = [" ".join(["word"] * n) + " end" for n in (3, 10, 20, 30, 45, 5, 15, 40)]
ALL_COMPILED_WITHIN_S = 300.0


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def burst(url: str) -> list[str]:
    """The greedy completion of every prompt, all sent at once."""

    def complete(prompt: str) -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(complete, PROMPTS))


def test_serves_while_compiling_with_a_fully_compiled_servers_texts(
    tiny_llama3_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", str(tiny_llama3_dir), *SERVE_ARGS]
    with serve_subprocess(args, tmp_path / "cache", tmp_path / "background.log") as (_, url):
        at_ready = scrape(url)
        texts = burst(url)
        deadline = time.monotonic() + ALL_COMPILED_WITHIN_S
        while (m := scrape(url))["tfjax_compiled_buckets"] < m["tfjax_buckets"]:
            assert time.monotonic() < deadline, "background compiles did not finish"
            time.sleep(0.5)
        assert m["tfjax_compiles_after_warmup_total"] == 0
    assert at_ready["tfjax_compiled_buckets"] < at_ready["tfjax_buckets"]

    first = [*args, "--compile-all-first"]
    with serve_subprocess(first, tmp_path / "cache", tmp_path / "first.log") as (_, url):
        m = scrape(url)
        assert m["tfjax_compiled_buckets"] == m["tfjax_buckets"]
        assert burst(url) == texts
