"""`loom data prepare` on executors: the band-sharded near-duplicate search gives the decisions
of the single-pass search, and the whole pipeline on a real two-node Ray cluster (started here,
one worker process per node) writes the same bytes as the local process pool."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_prepare import run_prepare

from loom.data.corpus_tasks import Signatures
from loom.data.dedup import bands_rows, exact_duplicate_of, near_duplicate_of
from loom.data.executor import Executor, ExecutorConfig
from loom.data.prepare import (
    PrepareConfig,
    _clean_tasks,
    _deduplicate,
    load_prepare_config,
    validate,
)
from loom.data.tasks import EXACT_DUPLICATE, KEEP, NEAR_DUPLICATE


def outputs(out: Path) -> dict[str, str]:
    """Checksum of every output file but the manifest (which holds times and worker names)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "work" not in p.parts and p.name != "manifest.json"
    }


def cleaned_folders(out: Path) -> tuple[PrepareConfig, list[Path], list[dict[str, Any]]]:
    """The config of a finished run in `out`, its cleaned folders in input order, their stats."""
    cfg = load_prepare_config(out.parent / "prepare.toml", [])
    bands, rows = bands_rows(cfg.dedup)
    tasks = _clean_tasks(cfg, validate(cfg), out / "work", bands, rows)
    folders = [Path(t.folder) for t in tasks]
    return cfg, folders, [json.loads((f / "stats.json").read_text()) for f in folders]


def single_pass(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Status and kept document of every cleaned document, computed the way the driver did before
    the search was sharded: every band key of every document in one `near_duplicate_of` call."""
    cfg, folders, cleaned = cleaned_folders(out)
    first_index = np.cumsum([0] + [c["kept_documents"] for c in cleaned[:-1]])
    keep_of = exact_duplicate_of(np.concatenate([np.load(f / "exact.npy") for f in folders]))
    status = np.where(keep_of != np.arange(len(keep_of)), EXACT_DUPLICATE, KEEP).astype(np.uint8)
    keys = np.concatenate([np.load(f / "band_keys.npy") for f in folders])
    signatures = Signatures([str(f) for f in folders], first_index.tolist())
    near = near_duplicate_of(keys, status == KEEP, signatures.rows, cfg.dedup)
    moved = near != np.arange(len(near))
    status[moved], keep_of[moved] = NEAR_DUPLICATE, near[moved]
    assert moved.sum() >= 10 and (status == EXACT_DUPLICATE).sum() >= 5  # planted copies
    return status, keep_of


def sharded(out: Path, executor: Executor, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Status and kept documents from the pipeline's own dedup step, in `shards` band shards."""
    cfg, folders, cleaned = cleaned_folders(out)
    cfg.executor.dedup_shards = shards
    dedup = _deduplicate(cfg, folders, cleaned, executor, out / "work", bands_rows(cfg.dedup)[0])
    assert executor.stages["near_dedup"]["tasks"] == shards
    return dedup["status"], dedup["keep_of"]


@pytest.mark.slow
def test_band_shards_give_the_single_pass_decisions(raw_dir, tmp_path) -> None:
    run_prepare(tmp_path, raw_dir)
    reference = single_pass(tmp_path / "out")
    bands = bands_rows(load_prepare_config(tmp_path / "prepare.toml", []).dedup)[0]
    # One shard in this process; on two processes fewer shards than bands, and more (the bands
    # cut into key ranges).
    for workers, shards in ((1, 1), (2, 5), (2, 3 * bands + 1)):
        with Executor(ExecutorConfig(workers=workers)) as executor:
            status, keep_of = sharded(tmp_path / "out", executor, shards)
        assert np.array_equal(status, reference[0]) and np.array_equal(keep_of, reference[1])


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[str]:
    """A Ray cluster of two nodes (a head and one more), one CPU each, as real processes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("RAY_TMPDIR", f"/tmp/ray-{os.getpid()}")  # Ray's socket paths must stay short
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster.address
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.mark.slow
def test_whole_prepare_on_a_two_node_ray_cluster_writes_the_local_bytes(
    raw_dir,
    tmp_path,
    ray_cluster,
) -> None:
    runs = {}
    for name, executor in (
        ("one_process", ["--executor.workers=1"]),
        ("local_pool", ["--executor.workers=2", "--executor.dedup_shards=5"]),
        (
            "ray",
            [
                "--executor.kind=ray",
                f"--executor.ray_address={ray_cluster}",
                "--executor.workers=2",
                "--executor.dedup_shards=4",
            ],
        ),
    ):
        (tmp_path / name).mkdir()
        # Small shards, so that packing is several tasks writing runs of consecutive shards.
        runs[name] = run_prepare(tmp_path / name, raw_dir, "--output.shard_tokens=4000", *executor)
    files = {name: outputs(tmp_path / name / "out") for name in runs}
    assert len(runs["ray"]["splits"]["train"]["shards"]) >= 8
    assert files["ray"] == files["local_pool"] == files["one_process"]  # shards byte-equal too
    for key in ("splits", "stages", "mixing", "tokenizer", "tokens_by_source"):
        assert runs["ray"][key] == runs["local_pool"][key] == runs["one_process"][key]
    ran = runs["ray"]["executor"]["stages"]
    assert ran["near_dedup"]["tasks"] == 4 and ran["near_dedup"]["workers"] >= 2
    assert ran["tokenizer"]["tasks"] == 1 and ran["pack train"]["tasks"] == 2
    # The dedup step alone on the cluster, with more shards than bands: the single-pass decisions.
    reference = single_pass(tmp_path / "ray" / "out")
    with Executor(ExecutorConfig(kind="ray", ray_address=ray_cluster, workers=2)) as executor:
        status, keep_of = sharded(tmp_path / "ray" / "out", executor, 37)
    assert np.array_equal(status, reference[0]) and np.array_equal(keep_of, reference[1])
