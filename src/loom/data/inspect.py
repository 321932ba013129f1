"""`loom data inspect OUT`: a prepared folder's funnel (documents, tokens per stage and source,
documents per stage and detected language)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from loom.core.errors import LoomError
from loom.core.run_files import Manifest
from loom.data.shards import read_manifest

STAGES = ("read", "normalize", "language", "filter", "pii", "exact_dedup", "near_dedup")


def manifest_stages(manifest: Manifest) -> list[str]:
    """The funnel's stages in this manifest (those written before language ID have no
    "language" stage)."""
    return [stage for stage in STAGES if stage in manifest["stages"]]


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
    for stage in manifest_stages(manifest):
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
    for stage in manifest_stages(manifest):
        for reason, count in sorted(
            manifest["stages"][stage]["dropped"].items(), key=lambda kv: -kv[1]
        ):
            if count:
                table.add_row(stage, reason, f"{count:,}")
    return table


def language_rows(manifest: Manifest) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-language funnel: documents detected, kept after each stage,
    tokens and the tokenizer's bytes per token. Languages under 1% of the documents that kept
    nothing (stray detections of code lines, names ...) are summed in one "others" row."""
    stages = [s for s in manifest_stages(manifest) if "per_language" in manifest["stages"][s]]
    languages = manifest["languages"]
    total = sum(v["documents"] for v in languages.values()) or 1
    shown = [
        k for k, v in languages.items() if v["kept_documents"] or v["documents"] >= 0.01 * total
    ]
    rows = []
    for lang in shown:
        summary = languages[lang]
        per = [manifest["stages"][s]["per_language"][lang]["documents_out"] for s in stages]
        bpt = summary["bytes_per_token"]
        rows.append(
            [
                lang,
                f"{summary['documents']:,}",
                *(f"{n:,}" for n in per),
                f"{summary['tokens']:,}",
                "" if bpt is None else f"{bpt:.2f}",
            ]
        )
    others = [k for k in languages if k not in shown]
    if others:
        count = sum(languages[k]["documents"] for k in others)
        rows.append([f"{len(others)} others", f"{count:,}", *("0" for _ in stages), "0", ""])
    return ["language", "documents", *stages, "tokens", "bytes/token"], rows


def languages_table(manifest: Manifest) -> Table:
    headers, rows = language_rows(manifest)
    table = Table(title="documents per detected language after each stage")
    for column in headers:
        table.add_column(column, justify="left" if column == "language" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_funnel(out: str | Path) -> None:
    manifest = read_manifest(Path(out))
    console = Console()
    console.print(funnel_table(manifest))
    console.print(drops_table(manifest))
    if manifest.get("languages"):
        console.print(languages_table(manifest))
