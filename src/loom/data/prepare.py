"""`loom data prepare CONFIG`: raw sources -> cleaned, deduplicated, mixed, tokenized shards.

    A  clean      per input file, in parallel: read, normalise, filter, redact (tasks.py)
    B  dedup      all documents: exact in the driver, then near duplicates in band shards, in
                  parallel, joined in the driver (dedup.py, corpus_tasks.py)
    -  tokenizer  trained on a seeded sample of the kept documents (one task), or a given one
    C  tokenize   per cleaned file, in parallel (tasks.py)
    D  pack       mix sources by weight, shuffle documents by seed (driver), write runs of
                  shards in parallel (corpus_tasks.py)

Every parallel step runs on the configured executor (local processes or Ray, executor.py).

A and C tasks are skipped when their output folder exists (keyed by a fingerprint of their
inputs and settings), so an interrupted run restarts where it stopped; B and D are
deterministic and cheap next to A and C, and are redone. The output folder is a valid
`data.path` for `loom train`; `manifest.json` holds the funnel of every stage per source.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.config import load_tree
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import Manifest
from loom.core.tokenizer import (
    EOS,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
)
from loom.data.corpus_tasks import (
    NearShardTask,
    PackTask,
    TokenizerTask,
    near_dedup_shard,
    near_shards,
    shard_bounds,
    train_tokenizer,
    write_shards,
)
from loom.data.dedup import (
    DedupConfig,
    bands_rows,
    exact_duplicate_of,
    keep_first,
    validate_dedup,
)
from loom.data.executor import Executor, ExecutorConfig, validate_executor
from loom.data.filters import FilterConfig, filters_for, validate_filters
from loom.data.hashing import mix64
from loom.data.mixing import SourceShare, repeats, sampling_factors
from loom.data.normalize import NormalizeConfig
from loom.data.pii import PiiConfig
from loom.data.readers import TextUnit, expand_inputs, relative_names
from loom.data.shards import FORMAT, token_dtype, write_manifest
from loom.data.tasks import (
    EXACT_DUPLICATE,
    KEEP,
    NEAR_DUPLICATE,
    REASONS,
    CleanTask,
    TokenizeTask,
    clean_file,
    tokenize_kept,
)
from loom.data.tokenize import warn_on_empty_split

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class SourceConfig:
    name: str = ""
    paths: list[str] = field(default_factory=list)  # globs
    text_field: str = "text"
    text_unit: TextUnit = "file"  # for plain-text files: one document per file, line or paragraph
    weight: float = 0.0  # relative share of training tokens; 0 everywhere = natural shares
    max_epochs: float = 1.0  # how often this source's documents may repeat to reach its share


@dataclass
class TokenizerSection:
    train: bool = True
    path: str = ""  # a tokenizer.json (or its folder) to use instead of training
    vocab_size: int = 8192
    special_tokens: list[str] = field(default_factory=lambda: [EOS])
    sample_bytes: int = 200_000_000  # text sampled from the kept documents for training


@dataclass
class OutputConfig:
    dir: str = "prepared"
    write_documents: bool = True  # <dir>/documents/*.jsonl (id, source, text)
    write_dropped: bool = True  # <dir>/dropped/*.jsonl (id, source, reason, duplicate_of)
    val_fraction: float = 0.01
    seed: int = 0
    shard_tokens: int = 1 << 26


@dataclass
class PrepareConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    strict: bool = False  # fail on the first unreadable file or record instead of counting it


def load_prepare_config(path: str | Path | None, overrides: list[str]) -> PrepareConfig:
    return load_tree(PrepareConfig, path, overrides)


def validate(cfg: PrepareConfig) -> dict[str, list[Path]]:
    """Check everything before any work; returns the input files of each source."""
    if not cfg.sources:
        raise LoomError("no sources: add at least one [[sources]] table with a name and paths")
    names = [s.name for s in cfg.sources]
    for i, s in enumerate(cfg.sources):
        if not _NAME.match(s.name):
            raise LoomError(
                f"sources[{i}].name={s.name!r} must be a non-empty word (letters, digits, _ . -)"
            )
        if not s.paths:
            raise LoomError(f"source {s.name!r} has no paths; give at least one glob")
        if s.weight < 0 or s.max_epochs <= 0:
            raise LoomError(f"source {s.name!r}: weight must be ≥ 0 and max_epochs > 0")
    if len(set(names)) != len(names):
        raise LoomError(f"source names must be unique, got {names}")
    weighted = [s.weight > 0 for s in cfg.sources]
    if any(weighted) and not all(weighted):
        raise LoomError(
            "give every source a weight, or none (natural shares); unweighted: "
            f"{[s.name for s in cfg.sources if s.weight == 0]}"
        )
    files = {s.name: expand_inputs(s.paths, f"source {s.name!r}: path") for s in cfg.sources}
    validate_filters(cfg.filters)
    validate_dedup(cfg.dedup)
    t, o = cfg.tokenizer, cfg.output
    if EOS not in t.special_tokens:
        raise LoomError(f"tokenizer.special_tokens must include {EOS} (it separates documents)")
    if t.train and t.path:
        raise LoomError("set tokenizer.train = true or tokenizer.path, not both")
    if not t.train:
        if not t.path:
            raise LoomError("tokenizer.train = false needs tokenizer.path (a tokenizer.json)")
        eos_id(load_tokenizer(t.path))
    elif t.vocab_size < 256 + len(t.special_tokens):
        raise LoomError(f"tokenizer.vocab_size={t.vocab_size} is below 256 bytes + special tokens")
    if not 0 <= o.val_fraction < 1:
        raise LoomError(f"output.val_fraction={o.val_fraction} must be in [0, 1)")
    if o.shard_tokens <= 0:
        raise LoomError(f"output.shard_tokens={o.shard_tokens} must be > 0")
    validate_executor(cfg.executor)
    return files


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(
        parts,
        sort_keys=True,
        default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: PrepareConfig) -> Manifest:
    """Run (or finish) the whole job; returns the manifest it wrote."""
    started = time.perf_counter()
    files = validate(cfg)
    out = Path(cfg.output.dir)
    work = out / "work"
    bands, rows = bands_rows(cfg.dedup) if cfg.dedup.near else (0, 0)

    clean_tasks = _clean_tasks(cfg, files, work, bands, rows)
    with Executor(cfg.executor) as executor:
        cleaned = executor.run("clean", clean_file, clean_tasks)
        folders = [Path(t.folder) for t in clean_tasks]
        dedup = _deduplicate(cfg, folders, cleaned, executor, work, bands)
        tokenizer_dir = _tokenizer(cfg, out, folders, dedup, executor)
        tokenize_tasks = _tokenize_tasks(cfg, out, work, clean_tasks, dedup, tokenizer_dir)
        tokenized = executor.run("tokenize", tokenize_kept, tokenize_tasks)
        _remove_stale(out, work, clean_tasks, tokenize_tasks)
        job = _Job(
            cfg, out, files, clean_tasks, cleaned, dedup, tokenizer_dir, tokenize_tasks, tokenized
        )
        manifest = _pack(job, executor)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    manifest["executor"] = executor.summary()
    write_manifest(out, manifest)
    logger.info(
        "prepared %s: %d training tokens in %d shard(s)",
        out,
        manifest["splits"]["train"]["tokens"],
        len(manifest["splits"]["train"]["shards"]),
    )
    warn_on_empty_split(manifest, "output.val_fraction")
    return manifest


@dataclass
class _Job:
    """What the stages of one run produced, for packing the shards and writing the manifest."""

    cfg: PrepareConfig
    out: Path
    files: dict[str, list[Path]]
    clean_tasks: list[CleanTask]
    cleaned: list[dict[str, Any]]
    dedup: dict[str, Any]
    tokenizer_dir: Path
    tokenize_tasks: list[TokenizeTask]
    tokenized: list[dict[str, Any]]


def _clean_tasks(
    cfg: PrepareConfig, files: dict[str, list[Path]], work: Path, bands: int, rows: int
) -> list[CleanTask]:
    tasks = []
    for source in cfg.sources:
        names = relative_names(files[source.name])
        for path in files[source.name]:
            stat = path.stat()
            key = fingerprint(
                source.name,
                names[path],
                stat.st_size,
                stat.st_mtime_ns,
                source.text_field,
                source.text_unit,
                cfg.strict,
                cfg.normalize,
                cfg.filters,
                cfg.pii,
                cfg.dedup.near,
                cfg.dedup.ngram,
                cfg.dedup.cjk,
                cfg.dedup.cjk_ngram,
                cfg.dedup.num_perm,
                cfg.dedup.seed,
                bands,
                rows,
            )
            tasks.append(
                CleanTask(
                    folder=str(work / "clean" / f"{source.name}-{key}"),
                    source=source.name,
                    path=str(path),
                    name=f"{source.name}:{names[path]}",
                    text_field=source.text_field,
                    text_unit=source.text_unit,
                    strict=cfg.strict,
                    normalize=cfg.normalize,
                    filters=cfg.filters,
                    pii=cfg.pii,
                    dedup=cfg.dedup,
                    bands=bands,
                    rows=rows,
                )
            )
    return tasks


def _deduplicate(
    cfg: PrepareConfig,
    folders: list[Path],
    cleaned: list[dict[str, Any]],
    executor: Executor,
    work: Path,
    bands: int,
) -> dict[str, Any]:
    counts = np.array([r["kept_documents"] for r in cleaned], dtype=np.int64)
    first_index = (
        np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else np.zeros(0, np.int64)
    )
    total = int(counts.sum())
    status = np.zeros(total, dtype=np.uint8)
    keep_of = np.arange(total)
    # Exact duplicates stay in the driver: 8 bytes per document, one sort.
    if cfg.dedup.exact and total:
        exact = np.concatenate([np.load(f / "exact.npy") for f in folders])
        first = exact_duplicate_of(exact)
        status[first != keep_of] = EXACT_DUPLICATE
        keep_of = first.copy()
    if cfg.dedup.near and total:
        alive = work / "dedup" / "alive.npy"  # read by every shard (mmap)
        alive.parent.mkdir(parents=True, exist_ok=True)
        np.save(alive, status == KEEP)
        shards = cfg.executor.dedup_shards or executor.workers
        tasks = [
            NearShardTask(
                folders=[str(f) for f in folders],
                first_index=first_index.tolist(),
                alive=str(alive),
                slots=slots,
                dedup=cfg.dedup,
            )
            for slots in near_shards(bands, shards)
        ]
        found = executor.run("near_dedup", near_dedup_shard, tasks)
        near = keep_first(total, np.concatenate([r["pairs"] for r in found]))
        moved = near != np.arange(total)
        status[moved] = NEAR_DUPLICATE
        keep_of[moved] = near[moved]
        # An exact copy of a document that near dedup then dropped points on to the kept one
        # (near dedup never points at a dropped document, so one step is enough).
        keep_of = keep_of[keep_of]
    # Ids of the kept documents that dropped ones point at.
    referenced = np.unique(keep_of[status != KEEP])
    ids: dict[int, str] = {}
    for t in np.unique(np.searchsorted(first_index, referenced, side="right") - 1):
        task_ids = json.loads((folders[t] / "ids.json").read_text())
        for g in referenced[
            (referenced >= first_index[t]) & (referenced < first_index[t] + counts[t])
        ]:
            ids[int(g)] = task_ids[int(g - first_index[t])]
    sizes = (
        np.concatenate([np.load(f / "sizes.npy") for f in folders])
        if folders
        else np.zeros(0, np.int64)
    )
    return {
        "status": status,
        "keep_of": keep_of,
        "ids": ids,
        "first_index": first_index,
        "counts": counts,
        "sizes": sizes,
    }


def _tokenizer(
    cfg: PrepareConfig, out: Path, folders: list[Path], dedup: dict[str, Any], executor: Executor
) -> Path:
    status, sizes, first_index = dedup["status"], dedup["sizes"], dedup["first_index"]
    target = out / "tokenizer"
    t = cfg.tokenizer
    if not t.train:
        save_tokenizer(load_tokenizer(t.path), target)
        return target
    key = fingerprint(
        t, [f.name for f in folders], hashlib.sha256(status.tobytes()).hexdigest(), cfg.output.seed
    )
    marker = target / "fingerprint"
    if marker.is_file() and marker.read_text() == key and (target / "tokenizer.json").is_file():
        return target
    fraction = min(1.0, t.sample_bytes / max(int(sizes[status == KEEP].sum()), 1))
    status_file = out / "work" / "dedup" / "status.npy"
    status_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(status_file, status)
    task = TokenizerTask(
        folders=[str(f) for f in folders],
        first_index=first_index.tolist(),
        status=str(status_file),
        fraction=fraction,
        seed=cfg.output.seed + 1,
        vocab_size=t.vocab_size,
        special_tokens=t.special_tokens,
        target=str(target),
    )
    (trained,) = executor.run("tokenizer", train_tokenizer, [task])
    marker.write_text(key)
    logger.info(
        "tokenizer: %d tokens from %.0f%% of the kept text",
        trained["vocab_size"],
        100 * fraction,
    )
    return target


def _tokenize_tasks(
    cfg: PrepareConfig,
    out: Path,
    work: Path,
    clean_tasks: list[CleanTask],
    dedup: dict[str, Any],
    tokenizer_dir: Path,
) -> list[TokenizeTask]:
    tok_hash = tokenizer_hash(load_tokenizer(tokenizer_dir))
    o = cfg.output
    tasks = []
    for task, start, count in zip(clean_tasks, dedup["first_index"], dedup["counts"], strict=True):
        status = dedup["status"][start : start + count]
        duplicate_of = {
            local: dedup["ids"][int(dedup["keep_of"][start + local])]
            for local in np.flatnonzero(status != KEEP).tolist()
        }
        name = Path(task.folder).name
        key = fingerprint(
            name,
            hashlib.sha256(status.tobytes()).hexdigest(),
            sorted(duplicate_of.items()),
            tok_hash,
            o.val_fraction,
            o.seed,
            o.write_documents,
            o.write_dropped,
            int(start),
        )
        tasks.append(
            TokenizeTask(
                folder=str(work / "tokens" / f"{name}-{key}"),
                clean_folder=task.folder,
                source=task.source,
                status=status,
                duplicate_of=duplicate_of,
                first_index=int(start),
                tokenizer=str(tokenizer_dir),
                val_fraction=o.val_fraction,
                seed=o.seed,
                documents_file=str(out / "documents" / f"{name}.jsonl")
                if o.write_documents
                else "",
                dropped_file=str(out / "dropped" / f"{name}.jsonl") if o.write_dropped else "",
            )
        )
        for sub in ("documents", "dropped"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    return tasks


def _remove_stale(
    out: Path, work: Path, clean: list[CleanTask], tokens: list[TokenizeTask]
) -> None:
    """Drop outputs of earlier runs with other inputs or settings (never this run's)."""
    live = {Path(t.folder).name for t in clean} | {Path(t.folder).name for t in tokens}
    for stage in ("clean", "tokens"):
        for folder in (work / stage).glob("*") if (work / stage).is_dir() else []:
            if folder.name not in live:
                shutil.rmtree(folder, ignore_errors=True)
    wanted = {f"{Path(t.folder).name}.jsonl" for t in clean}
    for sub in ("documents", "dropped"):
        for file in (out / sub).glob("*") if (out / sub).is_dir() else []:
            if file.name not in wanted:
                file.unlink()


def _pack(job: _Job, executor: Executor) -> Manifest:
    """Mix and shuffle in the driver (32 bytes per document copy), write the shards as tasks
    (each a run of consecutive shards); returns the manifest."""
    cfg, out, tokenize_tasks = job.cfg, job.out, job.tokenize_tasks
    tokenizer = load_tokenizer(job.tokenizer_dir)
    dtype = token_dtype(tokenizer.get_vocab_size())
    o = cfg.output
    # Per task: per-document metadata (the tasks read the tokens).
    offsets, val, index, source_of = [], [], [], []
    for task in tokenize_tasks:
        folder = Path(task.folder)
        offsets.append(np.load(folder / "offsets.npy"))
        val.append(np.load(folder / "val.npy"))
        index.append(np.load(folder / "global_index.npy"))
        source_of.append(task.source)
    source_names = [s.name for s in cfg.sources]
    train_tokens = {name: 0 for name in source_names}
    for task_i, name in enumerate(source_of):
        train_tokens[name] += int(np.diff(offsets[task_i])[~val[task_i]].sum())
    factors = sampling_factors(
        [SourceShare(s.name, train_tokens[s.name], s.weight, s.max_epochs) for s in cfg.sources]
    )
    # Every (task, document, copy) that goes into a split, ordered by a seeded key: the shuffle.
    entries: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for task_i, name in enumerate(source_of):
        docs = np.arange(len(val[task_i]))
        for split, chosen in (("train", ~val[task_i]), ("val", val[task_i])):
            local = docs[chosen]
            copies = (
                repeats(index[task_i][chosen], factors[name], o.seed)
                if split == "train"
                else np.ones(len(local), np.int64)
            )
            local = np.repeat(local, copies)
            copy_no = (
                np.concatenate([np.arange(c) for c in copies])
                if len(copies)
                else np.zeros(0, np.int64)
            )
            global_index = index[task_i][local]
            key = mix64(
                global_index.astype(np.uint64) * np.uint64(0x100000001B3)
                + copy_no.astype(np.uint64)
                + np.uint64(o.seed)
            )
            entries[split].append(
                np.stack([key.view(np.int64), np.full(len(local), task_i), local, global_index], 1)
            )
    lengths = [np.diff(o) for o in offsets]
    first_doc = np.cumsum([0, *(len(n) for n in lengths)])
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    source_number = np.array([source_names.index(name) for name in source_of], dtype=np.int64)
    splits: dict[str, Any] = {}
    mixed_tokens = {name: 0 for name in source_names}
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
        table = np.concatenate(entries[split]) if entries[split] else np.zeros((0, 4), np.int64)
        table = table[np.lexsort((table[:, 3], table[:, 0].view(np.uint64)))]
        doc_tokens = all_lengths[first_doc[table[:, 1]] + table[:, 2]]
        if split == "train":
            per_source = np.zeros(len(source_names), np.int64)
            np.add.at(per_source, source_number[table[:, 1]], doc_tokens)
            mixed_tokens = dict(zip(source_names, per_source.tolist(), strict=True))
        order = out / "work" / "pack" / f"{split}.npy"
        order.parent.mkdir(parents=True, exist_ok=True)
        np.save(order, np.ascontiguousarray(table[:, 1:3]))
        ends = shard_bounds(doc_tokens, o.shard_tokens)
        groups = min(len(ends), executor.workers)
        tasks = []
        for g in range(groups):
            first, last = g * len(ends) // groups, (g + 1) * len(ends) // groups
            tasks.append(
                PackTask(
                    out=str(out),
                    split=split,
                    order=str(order),
                    begin=ends[first - 1] if first else 0,
                    end=ends[last - 1],
                    first_shard=first,
                    token_folders=[t.folder for t in tokenize_tasks],
                    dtype=dtype.name,
                    shard_tokens=o.shard_tokens,
                )
            )
        written = executor.run(f"pack {split}", write_shards, tasks)
        splits[split] = {
            "documents": len(table),
            "tokens": int(doc_tokens.sum()),
            "shards": [shard for r in written for shard in r["shards"]],
        }
    return _manifest(job, tokenizer, splits, train_tokens, mixed_tokens, factors)


def _manifest(
    job: _Job,
    tokenizer: Any,
    splits: dict[str, Any],
    train_tokens: dict[str, int],
    mixed_tokens: dict[str, int],
    factors: dict[str, float],
) -> Manifest:
    cfg, clean_tasks, cleaned, dedup = job.cfg, job.clean_tasks, job.cleaned, job.dedup
    tokenized, files = job.tokenized, job.files
    names = [s.name for s in cfg.sources]
    zero = {"documents_in": 0, "documents_out": 0, "bytes_in": 0, "bytes_out": 0}
    stages = {
        stage: {n: dict(zero) for n in names}
        for stage in ("read", "normalize", "language", "filter", "pii", "exact_dedup", "near_dedup")
    }
    dropped = {stage: {} for stage in stages}
    redactions: dict[str, int] = {}
    read_errors: dict[str, dict[str, int]] = {}
    status, sizes = dedup["status"], dedup["sizes"]
    for task, stats, start, count in zip(
        clean_tasks, cleaned, dedup["first_index"], dedup["counts"], strict=True
    ):
        s = task.source
        read_dropped = stats["read_dropped"]
        language_docs = stats["read_documents"] - sum(stats["language_dropped"].values())
        language_bytes = stats["normalized_bytes"] - stats["language_dropped_bytes"]
        kept_before_pii = language_bytes - stats["filtered_bytes"]
        _add(
            stages["read"][s],
            stats["read_documents"] + read_dropped["total"],
            stats["read_documents"],
            Path(task.path).stat().st_size,
            stats["read_bytes"],
        )
        _add(
            stages["normalize"][s],
            stats["read_documents"],
            stats["read_documents"],
            stats["read_bytes"],
            stats["normalized_bytes"],
        )
        _add(
            stages["language"][s],
            stats["read_documents"],
            language_docs,
            stats["normalized_bytes"],
            language_bytes,
        )
        _add(
            stages["filter"][s],
            language_docs,
            stats["kept_documents"],
            language_bytes,
            kept_before_pii,
        )
        _add(
            stages["pii"][s],
            stats["kept_documents"],
            stats["kept_documents"],
            kept_before_pii,
            stats["kept_bytes"],
        )
        _add_dedup(
            stages["exact_dedup"][s],
            stages["near_dedup"][s],
            status[start : start + count],
            sizes[start : start + count],
            stats["kept_bytes"],
        )
        for reason, n in read_dropped["by_reason"].items():
            dropped["read"][reason] = dropped["read"].get(reason, 0) + n
        for file, reasons in read_dropped["by_file"].items():
            read_errors[file] = reasons
        for reason, n in stats["language_dropped"].items():
            dropped["language"][reason] = dropped["language"].get(reason, 0) + n
        for reason, n in stats["filtered"].items():
            dropped["filter"][reason] = dropped["filter"].get(reason, 0) + n
        for kind, n in stats["redactions"].items():
            redactions[kind] = redactions.get(kind, 0) + n
    dropped["exact_dedup"] = {"exact_duplicate": int((status == EXACT_DUPLICATE).sum())}
    dropped["near_dedup"] = {"near_duplicate": int((status == NEAR_DUPLICATE).sum())}
    tokens_by_source = {
        n: {"train_documents": 0, "val_documents": 0, "train_tokens": 0, "val_tokens": 0}
        for n in names
    }
    for task, stats in zip(clean_tasks, tokenized, strict=True):
        for k in tokens_by_source[task.source]:
            tokens_by_source[task.source][k] += stats[k]
    per_language, languages = _language_funnel(job)
    total_weight = sum(s.weight for s in cfg.sources)
    natural = sum(train_tokens.values()) or 1
    mixed_total = sum(mixed_tokens.values()) or 1
    mixing = {
        s.name: {
            "weight": s.weight,
            "max_epochs": s.max_epochs,
            "sampling_factor": factors[s.name],
            "tokens_in": train_tokens[s.name],
            "tokens_out": mixed_tokens[s.name],
            "target_share": s.weight / total_weight
            if total_weight
            else train_tokens[s.name] / natural,
            "achieved_share": mixed_tokens[s.name] / mixed_total,
        }
        for s in cfg.sources
    }
    return {
        "format": FORMAT,
        "created_by": "loom data prepare",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": json.loads(json.dumps(asdict(cfg))),
        "inputs": {s.name: {"patterns": s.paths, "files": len(files[s.name])} for s in cfg.sources},
        "tokenizer": {
            "path": "tokenizer/tokenizer.json",
            "hash": tokenizer_hash(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": eos_id(tokenizer),
        },
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "seed": cfg.output.seed,
        "val_fraction": cfg.output.val_fraction,
        "stages": {
            stage: {
                "per_source": per,
                **({"per_language": per_language[stage]} if stage in per_language else {}),
                "dropped": dropped[stage],
            }
            for stage, per in stages.items()
        },
        "languages": languages,
        "redactions": redactions,
        "read_errors_by_file": read_errors,
        "tokens_by_source": tokens_by_source,
        "mixing": mixing,
        "documents": {
            "read": sum(v["documents_in"] for v in stages["read"].values()),
            "kept": int((status == KEEP).sum()),
        },
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "splits": splits,
    }


def _language_funnel(job: _Job) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per detected language: the funnel from language selection to near dedup, and a summary
    with the kept text's bytes per token (how well the tokenizer compresses that language)."""
    cfg, dedup = job.cfg, job.dedup
    zero = {"documents_in": 0, "documents_out": 0, "bytes_in": 0, "bytes_out": 0}
    stages = ("language", "filter", "pii", "exact_dedup", "near_dedup")
    per_language: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    dropped: dict[str, dict[str, int]] = {}
    for stats in job.cleaned:
        for lang, e in stats["languages"].items():
            funnel = {stage: per_language[stage].setdefault(lang, dict(zero)) for stage in stages}
            docs = e["documents"] - sum(e["language_dropped"].values())
            size = e["bytes"] - e["language_dropped_bytes"]
            before_pii = size - e["filtered_bytes"]
            _add(funnel["language"], e["documents"], docs, e["bytes"], size)
            _add(funnel["filter"], docs, e["kept_documents"], size, before_pii)
            _add(
                funnel["pii"], e["kept_documents"], e["kept_documents"], before_pii, e["kept_bytes"]
            )
            reasons = dropped.setdefault(lang, {})
            for reason, n in [*e["language_dropped"].items(), *e["filtered"].items()]:
                reasons[reason] = reasons.get(reason, 0) + n
    status, sizes = dedup["status"], dedup["sizes"]
    language_of = np.array(
        [lang for task in job.clean_tasks for lang in _kept_languages(Path(task.folder))],
        dtype=object,
    )
    for lang in per_language["pii"]:
        mine = language_of == lang
        _add_dedup(
            per_language["exact_dedup"][lang],
            per_language["near_dedup"][lang],
            status[mine],
            sizes[mine],
            per_language["pii"][lang]["bytes_out"],
        )
        for code, name in REASONS.items():
            if n := int((status[mine] == code).sum()):
                dropped[lang][name] = n
    tokens: dict[str, dict[str, int]] = {}
    for stats in job.tokenized:
        for lang, e in stats["languages"].items():
            entry = tokens.setdefault(lang, {"documents": 0, "bytes": 0, "tokens": 0})
            for key in entry:
                entry[key] += e[key]
    summary = {}
    for lang in sorted(
        per_language["language"], key=lambda k: -per_language["language"][k]["documents_in"]
    ):
        t = tokens.get(lang, {"documents": 0, "bytes": 0, "tokens": 0})
        summary[lang] = {
            "documents": per_language["language"][lang]["documents_in"],
            "bytes": per_language["language"][lang]["bytes_in"],
            "kept_documents": per_language["near_dedup"][lang]["documents_out"],
            "kept_bytes": per_language["near_dedup"][lang]["bytes_out"],
            "dropped": dropped.get(lang, {}),
            "tokens": t["tokens"],
            "bytes_per_token": round(t["bytes"] / t["tokens"], 4) if t["tokens"] else None,
            "filters": asdict(filters_for(cfg.filters, lang)),
        }
    return per_language, summary


def _kept_languages(folder: Path) -> list[str]:
    return json.loads((folder / "languages.json").read_text())


def _add_dedup(
    exact: dict[str, int],
    near: dict[str, int],
    status: np.ndarray,
    sizes: np.ndarray,
    bytes_in: int,
) -> None:
    """The exact and near dedup funnel entries of some cleaned documents (their statuses and
    sizes; `bytes_in`: their bytes entering dedup)."""
    after_exact = status != EXACT_DUPLICATE
    after_near = status == KEEP
    _add(exact, len(status), int(after_exact.sum()), bytes_in, int(sizes[after_exact].sum()))
    _add(
        near,
        int(after_exact.sum()),
        int(after_near.sum()),
        int(sizes[after_exact].sum()),
        int(sizes[after_near].sum()),
    )


def _add(entry: dict[str, int], docs_in: int, docs_out: int, bytes_in: int, bytes_out: int) -> None:
    entry["documents_in"] += int(docs_in)
    entry["documents_out"] += int(docs_out)
    entry["bytes_in"] += int(bytes_in)
    entry["bytes_out"] += int(bytes_out)
