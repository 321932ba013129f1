"""`loom data prepare`: the funnel on a real-text corpus with planted cases, formats, mixing,
resumption after a kill, and the mixture loader."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import corpus as corpus_module
import numpy as np
import pytest

from loom.core.errors import LoomError
from loom.core.tokenizer import load_tokenizer
from loom.data.loader import TokenLoader
from loom.data.prepare import load_prepare_config, prepare
from loom.data.shards import TokenDataset


def write_config(tmp: Path, raw: Path, extra: str = "") -> Path:
    path = tmp / "prepare.toml"
    path.write_text(
        f"""
[[sources]]
name = "web"
paths = ["{raw}/web/*.jsonl.zst"]

[[sources]]
name = "books"
paths = ["{raw}/books/*"]

[tokenizer]
vocab_size = 600

[output]
dir = "{tmp}/out"
val_fraction = 0.1

[executor]
workers = 1
{extra}
"""
    )
    return path


def run_prepare(tmp: Path, raw: Path, *overrides: str, extra: str = "") -> dict[str, Any]:
    return prepare(load_prepare_config(write_config(tmp, raw, extra), list(overrides)))


def read_jsonl_dir(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted(folder.glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


@pytest.fixture(scope="session")
def dedup_only(
    raw_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """A run with quality filters off, so deduplication is measured on its own."""
    tmp = tmp_path_factory.mktemp("dedup")
    return tmp / "out", run_prepare(tmp, raw_dir, "--filters.enabled=false")


def groups(corpus: corpus_module.Corpus) -> dict[str, set[str]]:
    """Each planted document's group: its original, the exact copies and the near copies ≥ 0.8."""
    members: dict[str, set[str]] = {o: {o} for o in corpus.distinct}
    for copy_id, original in corpus.exact.items():
        members[original].add(copy_id)
    for copy_id, (original, similarity) in corpus.near.items():
        if similarity >= 0.8:
            members[original].add(copy_id)
    return {doc: group for group in members.values() for doc in group}


@pytest.mark.slow
def test_exact_copies_all_removed_and_point_into_their_group(dedup_only, corpus) -> None:
    out, manifest = dedup_only
    dropped = {r["id"]: r for r in read_jsonl_dir(out / "dropped")}
    kept = {r["id"] for r in read_jsonl_dir(out / "documents")}
    group_of = groups(corpus)
    for copy_id, original in corpus.exact.items():
        assert (copy_id in kept) + (original in kept) <= 1  # never both
        gone = dropped[copy_id] if copy_id in dropped else dropped[original]
        assert gone["reason"] in ("exact_duplicate", "near_duplicate")
        assert gone["duplicate_of"] in group_of[original] and gone["duplicate_of"] in kept
    exact_drops = [r for r in dropped.values() if r["reason"] == "exact_duplicate"]
    assert (
        len(exact_drops)
        == manifest["stages"]["exact_dedup"]["dropped"]["exact_duplicate"]
        >= len(corpus.exact)
    )
    for record in exact_drops:  # exact means identical text: the same group (or identical garbage)
        if record["id"] in group_of:
            assert group_of[record["id"]] == group_of[record["duplicate_of"]]


def test_near_copies_removed_and_distinct_documents_kept(dedup_only, corpus) -> None:
    out, _ = dedup_only
    dropped = {r["id"]: r for r in read_jsonl_dir(out / "dropped")}
    kept = {r["id"] for r in read_jsonl_dir(out / "documents")}
    group_of = groups(corpus)
    similar = {c: o for c, (o, j) in corpus.near.items() if j >= 0.8}
    assert len(similar) >= 20  # enough planted pairs at or above the threshold to measure
    resolved = [c for c, o in similar.items() if not (c in kept and o in kept)]
    assert len(resolved) >= 0.95 * len(similar)
    for record in dropped.values():
        if record["reason"] in ("exact_duplicate", "near_duplicate"):
            assert record["duplicate_of"] in kept  # exactly one kept per cluster
    false_positives = [
        d for d in corpus.distinct if d in dropped and dropped[d]["duplicate_of"] not in group_of[d]
    ]
    assert len(false_positives) <= 0.01 * len(corpus.distinct)


def test_garbage_and_fragments_dropped_by_the_named_filter(raw_dir, corpus, tmp_path) -> None:
    manifest = run_prepare(tmp_path, raw_dir)
    dropped = {r["id"]: r["reason"] for r in read_jsonl_dir(tmp_path / "out" / "dropped")}
    for doc_id, allowed in corpus.garbage.items():
        assert dropped.get(doc_id) in allowed, (doc_id, dropped.get(doc_id))
    for doc_id in corpus.short:
        assert dropped.get(doc_id) == "min_words"
    filtered = manifest["stages"]["filter"]["dropped"]
    assert filtered["min_words"] >= len(corpus.short)
    assert sum(filtered.values()) == sum(
        v["documents_in"] - v["documents_out"]
        for v in manifest["stages"]["filter"]["per_source"].values()
    )


def test_manifest_tokens_equal_a_retokenization_of_the_kept_documents(dedup_only) -> None:
    out, manifest = dedup_only
    tokenizer = load_tokenizer(out / "tokenizer")
    eos = tokenizer.token_to_id("<|endoftext|>")
    kept = read_jsonl_dir(out / "documents")
    expected = sorted(
        tuple([*tokenizer.encode(d["text"], add_special_tokens=False).ids, eos]) for d in kept
    )
    assert manifest["tokens"] == sum(len(e) for e in expected)
    # The shards hold exactly these documents (in shuffled order), nothing more, nothing less.
    found = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            tokens = np.fromfile(out / shard["path"], dtype=manifest["dtype"])
            starts = [*np.load(out / shard["index"]).tolist(), len(tokens)]
            found += [tuple(tokens[a:b].tolist()) for a, b in itertools.pairwise(starts)]
    assert sorted(found) == expected
    dataset = TokenDataset(out)  # a valid data.path for `loom train`
    assert dataset.split("train").num_tokens == manifest["splits"]["train"]["tokens"]


def test_funnel_counts_are_consistent(dedup_only, corpus) -> None:
    _, manifest = dedup_only
    stages = manifest["stages"]
    total_records = sum(len(r) for r in corpus.records.values())
    assert sum(v["documents_in"] for v in stages["read"]["per_source"].values()) == total_records
    order = ["read", "normalize", "filter", "pii", "exact_dedup", "near_dedup"]
    for before, after in itertools.pairwise(order):
        for source in ("web", "books"):
            assert (
                stages[after]["per_source"][source]["documents_in"]
                == stages[before]["per_source"][source]["documents_out"]
            )
    kept = sum(v["documents_out"] for v in stages["near_dedup"]["per_source"].values())
    assert (
        kept
        == manifest["documents"]["kept"]
        == sum(manifest["splits"][s]["documents"] for s in ("train", "val"))
    )


def test_mixing_weights_set_the_shares(raw_dir, tmp_path) -> None:
    extra = ""
    cfg = write_config(tmp_path, raw_dir, extra)
    text = cfg.read_text().replace('name = "web"', 'name = "web"\nweight = 3.0\nmax_epochs = 4.0')
    cfg.write_text(text.replace('name = "books"', 'name = "books"\nweight = 1.0\nmax_epochs = 4.0'))
    manifest = prepare(load_prepare_config(cfg, ["--filters.enabled=false"]))
    mixing = manifest["mixing"]
    assert mixing["web"]["target_share"] == pytest.approx(0.75)
    assert mixing["web"]["achieved_share"] == pytest.approx(0.75, abs=0.05)
    assert mixing["books"]["achieved_share"] == pytest.approx(0.25, abs=0.05)
    # web is the scarce one (it needs 3× books): it is up-sampled, books taken as they are or less.
    assert mixing["web"]["sampling_factor"] > mixing["books"]["sampling_factor"]
    assert manifest["splits"]["train"]["tokens"] == sum(m["tokens_out"] for m in mixing.values())


def test_interrupted_run_resumes_to_identical_output(raw_dir, tmp_path) -> None:
    def outputs(out: Path) -> dict[str, str]:
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file() and "work" not in p.parts and p.name != "manifest.json"
        }

    straight = tmp_path / "straight"
    straight.mkdir()
    reference = run_prepare(straight, raw_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = write_config(broken, raw_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "data", "prepare", str(config)], env=os.environ.copy()
    )
    clean = broken / "out" / "work" / "clean"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        clean.is_dir() and any(p.suffix != ".tmp" for p in clean.iterdir())
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: some files cleaned, others not
    proc.wait()
    assert not (broken / "out" / "manifest.json").exists()
    resumed = prepare(load_prepare_config(config, []))
    assert outputs(broken / "out") == outputs(straight / "out")
    for key in ("splits", "stages", "mixing", "tokenizer", "tokens_by_source"):
        assert resumed[key] == reference[key]


def test_unreadable_files_are_counted_or_fail_in_strict_mode(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = " ".join(["the quick brown fox jumps over the lazy dog and keeps running"] * 10)
    (src / "good.jsonl").write_text(
        json.dumps({"text": good}) + "\n{broken\n" + json.dumps({"body": 1}) + "\n"
    )
    (src / "bad.jsonl.gz").write_bytes(b"this is not gzip at all")
    (src / "bad.parquet").write_bytes(b"PAR1 nonsense")
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (src / "lines.txt").write_text("first line of text\n\nsecond line\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[sources]]\nname = "s"\npaths = ["{src}/*"]\ntext_unit = "line"\n'
        f"[filters]\nenabled = false\n[dedup]\nnear = false\n[tokenizer]\nvocab_size = 300\n"
        f'[output]\ndir = "{tmp_path}/out"\nval_fraction = 0\n[executor]\nworkers = 1\n'
    )
    manifest = prepare(load_prepare_config(cfg, []))
    reasons = manifest["stages"]["read"]["dropped"]
    assert reasons["malformed JSON"] == 1 and reasons["no string field 'text'"] == 1
    assert reasons["unreadable: BadGzipFile"] == 1 and reasons["not UTF-8"] == 1
    assert any(
        r.startswith("unreadable:") and r != "unreadable: BadGzipFile" for r in reasons
    )  # parquet
    assert manifest["read_errors_by_file"][str(src / "bad.jsonl.gz")] == {
        "unreadable: BadGzipFile": 1
    }
    assert manifest["documents"]["kept"] == 3  # good.jsonl's record + two lines of lines.txt
    with pytest.raises(LoomError, match=r"bad.*strict = true"):
        prepare(load_prepare_config(cfg, ["--strict=true", f"--output.dir={tmp_path}/strict"]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[[sources]]\nname = "x"\npaths = ["/nonexistent/*.jsonl"]\n',
            "source 'x': path /nonexistent/*.jsonl matches no files",
        ),
        ('[[sources]]\nname = "web"\npaths = ["{raw}/web/*"]\n', "source names must be unique"),
        ('[filters]\ndisable = ["nope"]\n', "filters.disable: unknown filter(s) ['nope']"),
        ("[dedup]\nbands = 30\nrows = 10\n", "exceeds dedup.num_perm=128"),
        ('[tokenizer]\nspecial_tokens = ["<pad>"]\n', "must include <|endoftext|>"),
    ],
)
def test_bad_config_stops_before_any_work(raw_dir, tmp_path, extra, message) -> None:
    cfg = write_config(tmp_path, raw_dir)
    text = cfg.read_text().replace("[tokenizer]\nvocab_size = 600\n", "") + extra.replace(
        "{raw}", str(raw_dir)
    )
    if "[tokenizer]" not in extra:
        text += "[tokenizer]\nvocab_size = 600\n"
    cfg.write_text(text)
    with pytest.raises(LoomError) as info:
        prepare(load_prepare_config(cfg, []))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_loader_resumes_across_rank_counts(dedup_only) -> None:
    """A whole epoch served by 2 ranks, then 3, then 1: every sample exactly once."""
    out, _ = dedup_only
    split = TokenDataset(out).split("train")
    seq, batch = 16, 6
    loader = TokenLoader(split, seq, seed=4)
    (n,) = loader.num_samples
    seen: list[tuple[int, ...]] = []

    def consume(state: dict[str, Any], world: int, size: int) -> dict[str, Any]:
        for rank in range(world):  # each rank builds its own loader from the saved state
            replica = TokenLoader(split, seq, seed=0)
            replica.load_state_dict(json.loads(json.dumps(state)))
            inputs, _ = replica.next_batch(size, rank, world)
            seen.extend(tuple(row.tolist()) for row in inputs)
        return replica.state_dict()  # every rank ends in the same global position

    state = loader.state_dict()
    for world, batches in ((2, n // batch // 3), (3, n // batch // 3)):
        for _ in range(batches):
            state = consume(state, world, batch)
    state = consume(state, 1, n - len(seen))  # the rest of the epoch on one rank
    everything = [tuple(split.window(i * seq, seq + 1)[:-1].tolist()) for i in range(n)]
    assert sorted(seen) == sorted(everything)


def test_weighted_mixture_of_datasets_keeps_proportions(dedup_only, data_dir) -> None:
    out, _ = dedup_only
    a, b = TokenDataset(out).split("train"), TokenDataset(data_dir).split("train")
    loader = TokenLoader([(a, 3.0), (b, 1.0)], 16, seed=1)
    picks = loader.next_indices(400)[:, 0]
    assert (picks == 0).sum() == 300 and (picks == 1).sum() == 100  # exact at every multiple of 4
    again = TokenLoader([(a, 3.0), (b, 1.0)], 16, seed=1)
    assert np.array_equal(
        again.next_indices(400), TokenLoader([(a, 3.0), (b, 1.0)], 16, seed=1).next_indices(400)
    )


def test_inspect_prints_the_funnel(dedup_only) -> None:
    out, _ = dedup_only
    proc = subprocess.run(
        [sys.executable, "-m", "loom", "data", "inspect", str(out)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    for word in (
        "read",
        "filter",
        "exact_dedup",
        "near_dedup",
        "exact_duplicate",
        "web",
        "books",
        "share",
    ):
        assert word in proc.stdout


def test_training_on_a_mixture_of_prepared_datasets(
    dedup_only, raw_dir, tmp_path, data_dir
) -> None:
    from loom.core.config import load_config
    from loom.train.trainer import Trainer

    first, _ = dedup_only
    # A second dataset prepared with the first one's tokenizer, from one source only.
    second = tmp_path / "second"
    second.mkdir()
    config = write_config(second, raw_dir)
    text = config.read_text().replace(
        "[tokenizer]\nvocab_size = 600", f'[tokenizer]\ntrain = false\npath = "{first}/tokenizer"'
    )
    config.write_text(text)
    prepare(load_prepare_config(config, ["--filters.enabled=false"]))
    mix = tmp_path / "train.toml"
    mix.write_text(f"""
run_dir = "{tmp_path}/run"
[model]
vocab_size = 600
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 128
[train]
steps = 3
batch_size = 4
seq_len = 32
[metrics]
progress = "plain"
[[data.mix]]
path = "{first}"
weight = 3.0
[[data.mix]]
path = "{second}/out"
weight = 1.0
""")
    trainer = Trainer(load_config(mix))
    assert trainer.loader.weights.tolist() == [0.75, 0.25]
    assert len(trainer.val) == 2  # both validation splits are evaluated
    result = trainer.run()
    assert result.step == 3 and np.isfinite(result.val_losses[3])
    assert [m.weight for m in load_config(tmp_path / "run" / "config.toml").data.mix] == [3.0, 1.0]
    other = mix.read_text().replace(f"{second}/out", str(data_dir))  # another tokenizer
    mix.write_text(other.replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{tmp_path}/run2"'))
    with pytest.raises(LoomError, match="different tokenizers"):
        Trainer(load_config(mix))


def test_example_config_is_valid(tmp_path, monkeypatch) -> None:
    from loom.data.prepare import validate

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw" / "web").mkdir(parents=True)
    (tmp_path / "raw" / "books").mkdir()
    (tmp_path / "raw" / "web" / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "raw" / "books" / "b.txt").write_text("x")
    cfg = load_prepare_config(repo / "configs" / "data-prepare.toml", ["--dedup.threshold=0.7"])
    files = validate(cfg)
    assert [s.name for s in cfg.sources] == ["web", "books"] and cfg.dedup.threshold == 0.7
    assert set(files) == {"web", "books"}
