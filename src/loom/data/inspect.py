"""`loom data inspect OUT`: a prepared folder's funnel (documents, tokens per stage and source)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from loom.core.errors import LoomError
from loom.core.run_files import Manifest
from loom.data.shards import read_manifest

STAGES = ("read", "normalize", "filter", "pii", "exact_dedup", "near_dedup")


def funnel_table(manifest: Manifest) -> Table:
    if "stages" not in manifest:
        raise LoomError(
            "this folder was made by `loom data tokenize`, which keeps no funnel; "
            "see its manifest.json"
        )
    sources = list(manifest["mixing"])
    table = Table(title="data funnel: documents out of each stage, per source")
    table.add_column("stage")
    for name in sources:
        table.add_column(name, justify="right")
    table.add_column("all", justify="right")
    for stage in STAGES:
        per = manifest["stages"][stage]["per_source"]
        docs = [per[n]["documents_out"] for n in sources]
        table.add_row(stage, *(f"{d:,}" for d in docs), f"{sum(docs):,}")
    mixing = manifest["mixing"]
    table.add_row(
        "train tokens before mixing",
        *(f"{mixing[n]['tokens_in']:,}" for n in sources),
        f"{sum(m['tokens_in'] for m in mixing.values()):,}",
    )
    table.add_row(
        "train tokens after mixing",
        *(f"{mixing[n]['tokens_out']:,}" for n in sources),
        f"{manifest['splits']['train']['tokens']:,}",
    )
    table.add_row(
        "share: target / achieved",
        *(f"{mixing[n]['target_share']:.1%} / {mixing[n]['achieved_share']:.1%}" for n in sources),
        "",
    )
    val = manifest["tokens_by_source"]
    table.add_row(
        "validation tokens",
        *(f"{val[n]['val_tokens']:,}" for n in sources),
        f"{manifest['splits']['val']['tokens']:,}",
    )
    return table


def drops_table(manifest: Manifest) -> Table:
    table = Table(title="dropped documents by stage and reason")
    for column in ("stage", "reason", "documents"):
        table.add_column(column, justify="right" if column == "documents" else "left")
    for stage in STAGES:
        for reason, count in sorted(
            manifest["stages"][stage]["dropped"].items(), key=lambda kv: -kv[1]
        ):
            if count:
                table.add_row(stage, reason, f"{count:,}")
    return table


def print_funnel(out: str | Path) -> None:
    manifest = read_manifest(Path(out))
    console = Console()
    console.print(funnel_table(manifest))
    console.print(drops_table(manifest))
