"""`loom report`: a real pipeline folder (data prepared by `loom data prepare`, a tiny model
pretrained on it, evaluated by `loom eval`, predicted by `loom plan --json`) becomes one
self-contained HTML page whose figures decode and whose numbers are the run's; broken inputs
become notes, a bad folder one `error:` line."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import struct
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from playwright.sync_api import sync_playwright

from loom.cli import main as loom
from loom.core.config import Config
from loom.core.errors import LoomError
from loom.data.prepare import load_prepare_config, prepare
from loom.eval.evaluate import EvalOptions, evaluate
from loom.finetune.config import load_finetune_config
from loom.finetune.trainer import finetune
from loom.planner.hardware import peak_flops
from loom.planner.training import local_hardware
from loom.report import write_report
from loom.train.metrics import read_metrics
from loom.train.trainer import train

MakeConfig = Callable[..., Config]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHOICES = [
    {"context": "def add(a, b):\n  return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"context": "import os\nimport", "choices": [" sys", " os", " json"], "answer": 2},
    {"context": "for i in", "choices": [" range(10):", " x:", " ()"], "answer": 0},
]
# The sections of a run folder's report, and those of them that are a figure (the rest: tables).
RUN_SECTIONS = ("summary", "loss", "lr", "throughput", "memory", "goodput", "eval")
RUN_FIGURES = ("loss", "lr", "throughput", "memory", "goodput")
# The pipeline fixture's report: its sections, and the one figure each figure section holds
# (stage durations, the data funnel, each training run's figures, pretrain's plan vs measured).
PIPELINE_SECTIONS = (
    "stages",
    "data-funnel",
    "data-shards",
    "pretrain-summary",
    "pretrain-loss",
    "pretrain-lr",
    "pretrain-throughput",
    "pretrain-memory",
    "pretrain-goodput",
    "pretrain-eval",
    "pretrain-predicted",
    "finetune-summary",
    "finetune-loss",
    "finetune-lr",
    "finetune-goodput",
    "eval-eval",
)
PIPELINE_FIGURES = (
    "stages",
    "data-funnel",
    *(f"pretrain-{name}" for name in RUN_FIGURES),
    "pretrain-predicted",
    *(f"finetune-{name}" for name in RUN_FIGURES),
)
# Headless Debian chromium on a machine without network: no sandbox (root in CI), no GPU, and
# none of the background fetches that would flood refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def prepare_data(root: Path) -> dict:
    """`loom data prepare` on two sources of standard-library paragraphs (a few repeated, so
    that deduplication drops some); the tokenizer is the size the tiny model expects."""
    raw = root / "raw"
    for i, path in enumerate(sorted(STDLIB.glob("*.py"))[:12]):
        paragraphs = [p for p in path.read_text().split("\n\n") if p.strip()]
        out = raw / ("web" if i % 2 else "books") / f"{path.stem}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs + paragraphs[:3]))
    config = root / "prepare.toml"
    config.write_text(
        f"""
[[sources]]
name = "web"
paths = ["{raw}/web/*.jsonl"]

[[sources]]
name = "books"
paths = ["{raw}/books/*.jsonl"]

[tokenizer]
vocab_size = 512

[output]
dir = "{root}/data"
val_fraction = 0.1

[executor]
workers = 1
"""
    )
    return prepare(load_prepare_config(config, []))


def plan_json(cfg: Config, tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """What `loom plan --spec FILE --json` prints for the run's model, layout and this CPU."""
    flops, _ = peak_flops(torch.device("cpu"), "fp32")
    t, m = cfg.train, cfg.model
    spec = {
        "model": {
            "layers": m.n_layers,
            "hidden": m.dim,
            "heads": m.n_heads,
            "kv_heads": m.n_kv_heads,
            "ffn_hidden": m.ffn_hidden,
            "vocab": m.vocab_size,
            "seq_len": t.seq_len,
        },
        "hardware": {
            "peak_tflops": {"fp32": flops / 1e12, "bf16": flops / 1e12},
            "gpu_mem_gb": local_hardware(torch.device("cpu"), 1).memory_gb,
            "n_gpus": 1,
        },
        "strategy": {"tp": 1, "pp": 1, "dp": 1, "micro_batch": t.batch_size},
        "training": {"tokens": t.steps * t.batch_size * t.seq_len},
    }
    spec["strategy"].update(global_batch=t.batch_size, precision="fp32")
    (tmp / "spec.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert loom(["plan", "--spec", str(tmp / "spec.json"), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def pipeline(tiny_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A pipeline folder in the documented layout around real stage outputs."""
    root = tmp_path / "pipeline"
    manifest = prepare_data(root)
    cfg = tiny_config(
        f"--data.path={root / 'data'}", "--train.eval_interval=4", run_dir=root / "pretrain"
    )
    result = train(cfg)
    (tmp_path / "text.txt").write_text((STDLIB / "textwrap.py").read_text()[:3000])
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHOICES))
    tasks = [str(tmp_path / "text.txt"), str(tmp_path / "mc.jsonl")]
    evaluate(root / "pretrain", tasks, EvalOptions(seq_len=32), torch.device("cpu"))
    sft = [{"prompt": f"def f{i}(x):\n    return", "completion": f" x + {i}"} for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft) + "{oops\n")
    tuned = load_finetune_config(
        None,
        [
            f"--model.path={root / 'pretrain'}",
            f"--data.path={tmp_path / 'sft.jsonl'}",
            "--data.template=none",
            "--data.val_fraction=0.2",
            f"--run_dir={root / 'finetune'}",
            "--train.steps=4",
            "--train.batch_size=4",
            "--train.seq_len=32",
            "--train.eval_interval=2",
            "--metrics.log_interval=1",
            "--metrics.progress=plain",
            "--metrics.tensorboard=false",
        ],
    )
    finetune(tuned)
    (root / "eval").mkdir()
    shutil.copy(root / "pretrain" / "eval.jsonl", root / "eval" / "eval.jsonl")
    stages = [
        {
            "name": "data",
            "status": "done",
            "seconds": manifest["seconds"],
            "dir": "data",
            "figures": {"documents kept": manifest["documents"]["kept"]},
        },
        {"name": "tokenizer", "status": "done", "seconds": 0.2, "dir": "data/tokenizer"},
        {
            "name": "pretrain",
            "status": "done",
            "seconds": 3.5,
            "dir": "pretrain",
            "figures": {"final val_loss": result.val_losses[8]},
        },
        {"name": "finetune", "status": "done", "seconds": 3.0, "dir": "finetune"},
        {"name": "eval", "status": "done", "seconds": 1.0, "dir": "eval", "figures": {}},
        {"name": "export", "status": "failed", "seconds": 0.1, "dir": "export", "figures": {}},
        {"name": "serve", "status": "pending", "seconds": None, "dir": "serve", "figures": {}},
    ]
    plan = {"pretrain": plan_json(cfg, tmp_path, capsys)}
    (root / "pipeline.json").write_text(json.dumps({"stages": stages, "plan": plan}))
    return root


def images(page: str) -> list[tuple[bytes, str]]:
    """(PNG bytes, alt text) of every <img>; each must be a base64 PNG data URI."""
    found = []
    for tag in re.findall(r"<img\b[^>]*>", page):
        src = re.search(r'\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert src, f"not a base64 PNG data URI: {tag[:120]}"
        alt = re.search(r'\balt="([^"]*)"', tag)
        assert alt and alt[1].strip(), "every figure has alt text"
        found.append((base64.b64decode(src[1], validate=True), html.unescape(alt[1])))
    return found


def check_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert kind == b"IHDR" and length == 13 and width > 0 and height > 0
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 10, "a blank image"


def section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}"[^>]*>(.*?)</section>', page, re.S)
    assert match, f"section {anchor} is missing"
    return match[1]


def cells(table_html: str, row_label: str) -> list[str]:
    """The text of the cells of the row whose first cell is `row_label`."""
    for row in re.findall(r"<tr>(.*?)</tr>", table_html, re.S):
        texts = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if texts and texts[0] == row_label:
            return texts
    raise AssertionError(f"no row {row_label!r}")


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.slow
def test_pipeline_report_is_self_contained_and_shows_the_runs_numbers(
    pipeline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loom(["report", str(pipeline)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(pipeline / "report.html")
    page = Path(out).read_text()

    # Self-contained: nothing fetched, nothing run; links only to anchors on the page.
    lowered = page.lower()
    for banned in ("http://", "https://", "<script", "<link", "<iframe", "url(", "@import"):
        assert banned not in lowered, banned
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', page):
        if attr == "src":
            assert value.startswith("data:image/png;base64,")
        else:
            assert value.startswith("#") and value[1:] in ids, value

    for anchor in PIPELINE_SECTIONS:
        section(page, anchor)

    figures = images(page)
    assert len(figures) >= 8
    for data, _ in figures:
        check_png(data)

    # The loss figure and the summary carry metrics.jsonl's numbers.
    records = read_metrics(pipeline / "pretrain")
    losses = [r["loss"] for r in records if "loss" in r]
    last = records[-1]
    loss_alt = [alt for _, alt in figures if alt.startswith("pretrain: loss vs step")]
    assert len(loss_alt) == 1
    assert f"{len(losses)} training points, final loss {losses[-1]:.4f} at step 8" in loss_alt[0]
    assert f"last {last['val_loss']:.4f} at step 8" in loss_alt[0]
    summary = section(page, "pretrain-summary")
    assert cells(summary, "final training loss")[1] == f"{losses[-1]:.4f} (step 8)"

    # The fine-tuning run: its own loss figure (with the base model's loss at step 0) and
    # what happened to its data.
    tuned = read_metrics(pipeline / "finetune")
    (tuned_alt,) = [alt for _, alt in figures if alt.startswith("finetune: loss vs step")]
    assert f"final loss {tuned[-1]['loss']:.4f} at step 4" in tuned_alt
    assert f"3 validation points, last {tuned[-1]['val_loss']:.4f}" in tuned_alt
    before = cells(section(page, "finetune-summary"), "validation loss before training")
    assert before[1] == f"{tuned[0]['val_loss']:.4f}" and tuned[0]["step"] == 0
    data_report = section(page, "finetune-finetune-data")
    assert cells(data_report, "malformed")[1] == "1"
    assert cells(data_report, "valid examples")[1] == "40"
    assert "finetune-predicted" not in ids  # the plan has no finetune entry

    # Stage table: every stage with its status; the failed stage's missing folder is a note.
    stages = section(page, "stages")
    for name, status in [("data", "done"), ("export", "failed"), ("serve", "pending")]:
        assert f">{status}</span>" in cells(stages, name)[1]
    assert "stage export: its folder export does not exist" in section(page, "notes")

    # Data funnel: documents kept after the last stage, per source, from the manifest.
    manifest = json.loads((pipeline / "data" / "manifest.json").read_text())
    funnel = section(page, "data-funnel")
    near = manifest["stages"]["near_dedup"]["per_source"]
    row = cells(funnel, "near_dedup")
    assert [number(c) for c in row[1:]] == [
        near["web"]["documents_out"],
        near["books"]["documents_out"],
        manifest["documents"]["kept"],
    ]

    # Evaluation: the latest record per task, with standard errors for accuracies.
    logged = json.loads((pipeline / "eval" / "eval.jsonl").read_text().splitlines()[-1])
    evals = section(page, "eval-eval")
    assert "mc.jsonl" in evals and "text.txt" in evals and "± " in evals
    rows = [
        [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", evals, re.S)
        if "<td" in row
    ]
    (ppl,) = [r for r in rows if r[0] == "text.txt" and r[3] == "perplexity"]
    assert math.isclose(number(ppl[4]), logged["tasks"]["text.txt"]["perplexity"], rel_tol=1e-3)
    (acc,) = [r for r in rows if r[0] == "mc.jsonl" and r[3] == "acc"]
    assert acc[5] == f"± {logged['tasks']['mc.jsonl']['acc_stderr']:.4g}", acc

    # Predicted vs measured: the planner's numbers against the run's.
    plan = json.loads((pipeline / "pipeline.json").read_text())["plan"]["pretrain"]
    predicted = section(page, "pretrain-predicted")
    memory = cells(predicted, "peak memory per device (GiB)")
    assert math.isclose(number(memory[1]), plan["memory_gib"]["total"], rel_tol=1e-3)
    assert math.isclose(number(memory[2]), max(r["peak_mem_gib"] for r in records), rel_tol=1e-3)
    tps = cells(predicted, "tokens/s (whole job)")
    assert math.isclose(number(tps[1]), plan["tokens_per_s"], rel_tol=1e-3)
    mfu = cells(predicted, "MFU (%)")
    assert math.isclose(number(mfu[1]), 100 * plan["mfu"], rel_tol=1e-3)

    # The run folder alone is a report of its own.
    alone = write_report(pipeline / "pretrain").read_text()
    for anchor in RUN_SECTIONS:
        section(alone, anchor)
    assert 'id="notes"' not in alone


def test_broken_files_become_notes_not_crashes(
    tiny_config: MakeConfig, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny_config(run_dir=run))
    (run / "goodput.json").write_text('{"goodput": 0.9, "wall_s"')  # cut short
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 9, "lo')  # a torn last line
    page = write_report(run).read_text()
    notes = html.unescape(section(page, "notes"))
    assert "goodput.json is unreadable" in notes
    assert "metrics.jsonl: skipped 1 unreadable line(s)" in notes
    assert 'id="goodput"' not in page  # left out, the rest is there
    section(page, "loss")
    assert any(
        "goodput.json" in r.getMessage() for r in loom_logs.records if r.levelname == "WARNING"
    )

    # A pipeline.json without stages: a note, and still a page.
    broken = tmp_path / "broken-pipeline"
    broken.mkdir()
    (broken / "pipeline.json").write_text('{"stages": "data"}')
    page = write_report(broken).read_text()
    assert "pipeline.json has no list of stage objects" in html.unescape(page)


def test_a_bad_run_dir_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loom(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0], err
    (tmp_path / "other").mkdir()
    with pytest.raises(LoomError, match="neither a run folder .* nor a data folder"):
        write_report(tmp_path / "other")
    assert not (tmp_path / "other" / "report.html").exists()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(
    pipeline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The written report.html opened from disk in a real browser: every section is there, and
    every figure decodes and is drawn as something other than a blank box."""
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: install Debian's chromium package (make test does)"
    assert loom(["report", str(pipeline)]) == 0
    report = pipeline / "report.html"
    assert capsys.readouterr().out.strip() == str(report)

    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(report.as_uri(), wait_until="load")
            title = page.title()
            h1 = page.locator("h1").inner_text()
            headings = page.eval_on_selector_all(
                "section[id]",
                "all => Object.fromEntries(all.map(s => [s.id, s.querySelector('h2')?.innerText]))",
            )
            shown = page.eval_on_selector_all(
                "img",
                """all => all.map(img => ({
                    section: img.closest('section')?.id,
                    complete: img.complete,
                    width: img.naturalWidth,
                    height: img.naturalHeight,
                    drawn: img.getBoundingClientRect().width * img.getBoundingClientRect().height,
                }))""",
            )
            shots = [img.screenshot() for img in page.locator("img").all()]
        finally:
            browser.close()

    assert title == h1 == f"Loom report: {pipeline.name}"
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
    for anchor in (*PIPELINE_SECTIONS, *PIPELINE_FIGURES, "finetune-finetune-data"):
        assert headings.get(anchor), f"section {anchor} is missing or has no heading"
    assert "notes" in headings

    assert [img["section"] for img in shown] == list(PIPELINE_FIGURES)
    assert len(shots) == len(PIPELINE_FIGURES)
    for img, shot in zip(shown, shots, strict=True):
        where = img["section"]
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, f"{where}: not decoded"
        assert img["drawn"] > 0, f"{where}: laid out with no area"
        pixels = imread(io.BytesIO(shot), format="png")[2:-2, 2:-2, :3]  # inside the border
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        inked = (pixels < 0.9).any(axis=-1).mean()
        assert len(colours) > 10 and inked > 0.01, f"{where}: drawn blank ({len(colours)} colours)"
