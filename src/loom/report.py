"""`loom report RUN_DIR`: one self-contained HTML page that shows a run at a glance.

RUN_DIR is a training or fine-tuning run folder (`config.toml`, `metrics.jsonl`, maybe
`goodput.json`, `eval.jsonl`, `data_report.json`) or a pipeline folder (`pipeline.json` and one
sub-folder per stage). Figures are PNGs drawn by matplotlib and embedded as base64 data URIs,
the CSS is inline and there is no JavaScript, so the file can be mailed, archived or opened
offline and looks the same everywhere.

Every section appears only when its inputs exist. A run folder is often read while it is still
being written, or after a crash, so an unreadable file never stops the report: it is named in
a note at the top of the page (and logged) and the sections that need it are left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import DATA_REPORT, GOODPUT, REPORT, GoodputRecord, RunFiles
from loom.data.inspect import language_rows, manifest_stages

FIG_SIZE = (7.0, 3.2)  # inches; at 100 dpi a 700 × 320 px image
DPI = 100
TRAINING_STAGES = ("pretrain", "finetune", "align")
GOODPUT_COLOURS = {
    "productive_s": "#2e7d32",
    "checkpoint_s": "#1565c0",
    "setup_s": "#90a4ae",
    "restarts_s": "#c62828",
    "recomputed_s": "#ef6c00",
    "other_s": "#bdbdbd",
}
GOODPUT_PARTS = tuple(  # goodput.json key, label, colour
    (key, label, GOODPUT_COLOURS[key]) for key, label in GoodputRecord.parts()
)
STATUS_COLOURS = {"done": "#2e7d32", "running": "#1565c0", "failed": "#c62828"}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
margin:0 auto;max-width:980px;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px;padding-top:8px;
border-top:2px solid #d0d7de}h3{font-size:16px;margin:20px 0 6px}
.sub{color:#57606a;margin:0 0 12px}nav{font-size:13px;margin:8px 0 16px}
nav a{margin-right:12px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 12px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:8px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:13px;color:#57606a}
.notes{background:#fff8c5;border:1px solid #d4a72c;padding:8px 14px;border-radius:6px}
.notes li{margin:2px 0}.badge{display:inline-block;padding:0 8px;border-radius:10px;
color:#fff;font-size:13px;background:#6e7781}.muted{color:#57606a;font-size:13px}
"""


# -- reading the run folder -----------------------------------------------------------------


@dataclass
class Page:
    """The report being assembled: notes about unreadable inputs, sections and their anchors."""

    run_dir: Path
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def note(self, text: str) -> None:
        logger.warning("report: %s", text)
        self.notes.append(text)

    def where(self, path: Path) -> str:
        """A path as the reader knows it: relative to RUN_DIR when inside it."""
        try:
            return str(path.relative_to(self.run_dir))
        except ValueError:
            return str(path)

    def add(self, anchor: str, title: str, body: str) -> None:
        taken = {a for a, _ in self.toc}
        base, n = anchor, 2
        while anchor in taken:  # two stages of one name: the anchors stay unique
            anchor, n = f"{base}-{n}", n + 1
        self.toc.append((anchor, title))
        self.sections.append(f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}</section>')


def _read_json(page: Page, path: Path, expected: bool = True) -> Any:
    """The file's JSON, or None with a note (a missing file is noted only when `expected`)."""
    if not path.is_file():
        if expected:
            page.note(f"{page.where(path)} is missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        page.note(f"{page.where(path)} is unreadable ({_short(e)}); its sections are left out")
        return None


def _read_jsonl(page: Page, path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; bad lines (a crash mid-write) are counted in a note."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        page.note(f"{page.where(path)} is unreadable ({_short(e)})")
        return []
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        page.note(f"{page.where(path)}: skipped {bad} unreadable line(s)")
    return records


def _read_toml(page: Page, path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        page.note(f"{page.where(path)} is unreadable ({_short(e)})")
        return {}


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _section_of(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A [table] of a config.toml, or {} when absent or not a table."""
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _is_run(folder: Path) -> bool:
    return RunFiles(folder).metrics.is_file() or RunFiles(folder).config.is_file()


# -- formatting -------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _fmt(value: Any) -> str:
    """Numbers as people read them: thousands separated, four significant digits."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def human_duration(seconds: Any) -> str:
    """`12.3 s`, `4 min 5 s`, `2 h 10 min`, `3.5 days`; `—` for nothing or not a number."""
    if not _finite(seconds):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{s / 86400:.1f} days"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Cells are escaped; numbers are right-aligned and formatted by `_fmt`. A cell given as
    `Raw` is inserted as is (badges)."""
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if isinstance(cell, Raw):
                out.append(f"<td>{cell.html}</td>")
            elif _number(cell):
                out.append(f'<td class="n">{_e(_fmt(cell))}</td>')
            else:
                out.append(f"<td>{_e(_fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass(frozen=True)
class Raw:
    """HTML already escaped, for a table cell."""

    html: str


def _figure(
    draw: Callable[[Any], None],
    alt: str,
    caption: str = "",
    size: tuple[float, float] = FIG_SIZE,
) -> str:
    """Draw with matplotlib's Agg canvas and embed the PNG as a data URI.

    The figure is built with the object API (`Figure` + `FigureCanvasAgg`), not pyplot: nothing
    is registered in pyplot's global figure list, so nothing stays open after saving and the
    backend of a program that imports Loom is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>\n'


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a finite `key`."""
    pairs = [
        (r["step"], float(r[key]))
        for r in records
        if _finite(r.get(key)) and isinstance(r.get("step"), int)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _style(ax: Any, ylabel: str, title: str = "") -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)


# -- training / fine-tuning runs --------------------------------------------------------------


@dataclass
class RunData:
    """What the report needs from one run folder."""

    folder: Path
    label: str  # "pretraining", "fine-tuning (lora)", ...
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    goodput: dict[str, Any] | None

    @property
    def batch_tokens(self) -> int | None:
        """Tokens per optimizer step: what the trainer divides by a step's time for tokens/s."""
        train = _section_of(self.config, "train")
        batch, seq = train.get("batch_size"), train.get("seq_len")
        return batch * seq if isinstance(batch, int) and isinstance(seq, int) else None

    def median(self, key: str) -> float | None:
        """Median over the logged intervals, the first one (warm-up, compilation) left out."""
        _, values = _series(self.metrics, key)
        values = values[1:] if len(values) > 1 else values
        return statistics.median(values) if values else None

    def peak_memory(self) -> float | None:
        _, values = _series(self.metrics, "peak_mem_gib")
        return max(values) if values else None


def _load_run(page: Page, folder: Path) -> RunData:
    config = _read_toml(page, RunFiles(folder).config)
    metrics_path = RunFiles(folder).metrics
    metrics = _read_jsonl(page, metrics_path) if metrics_path.is_file() else []
    if not metrics_path.is_file():
        page.note(f"{page.where(metrics_path)} is missing (no step logged yet?)")
    goodput = None
    if metrics:  # rank 0 writes goodput.json with the first step
        raw = _read_json(page, RunFiles(folder).goodput)
        if raw is not None and not isinstance(raw, dict):
            page.note(f"{page.where(RunFiles(folder).goodput)} is not a JSON object")
        elif raw is not None:
            goodput = raw
    method = _section_of(config, "finetune").get("method")
    if method or RunFiles(folder).data_report.is_file():
        label = f"fine-tuning ({method})" if method else "fine-tuning"
    else:
        label = "pretraining"
    return RunData(folder, label, config, metrics, goodput)


def _run_sections(page: Page, run: RunData, prefix: str, title: str, plan: Any = None) -> None:
    """Summary, loss, learning rate, throughput, memory, goodput, evaluations, and the
    planner's prediction against the measurements when `plan` is given. A builder that meets
    a file of an unexpected shape leaves its section out with a note."""
    metrics, goodput = RunFiles(run.folder).metrics, RunFiles(run.folder).goodput
    builders: list[tuple[Callable[..., None], Path]] = [
        (_summary_section, metrics),
        (_loss_section, metrics),
        (_lr_section, metrics),
        (_throughput_section, metrics),
        (_memory_section, metrics),
        (_routing_section, metrics),
        (_goodput_section, goodput),
    ]
    if RunFiles(run.folder).data_report.is_file():
        builders.insert(1, (_finetune_data_section, RunFiles(run.folder).data_report))
    for build, source in builders:
        _guarded(page, source, build, page, run, prefix, title)
    eval_path = RunFiles(run.folder).eval_log
    if eval_path.is_file():
        records = _read_jsonl(page, eval_path)
        _guarded(page, eval_path, _eval_section, page, records, f"{prefix}eval", title)
    if plan is not None:
        where = Path(f"pipeline.json plan.{prefix.rstrip('-')}")
        _guarded(page, where, _predicted_section, page, run, plan, prefix, title)


def _guarded(page: Page, source: Path, build: Callable[..., None], *args: Any) -> None:
    """Run one section builder; a file of an unexpected shape becomes a note, not a crash."""
    try:
        build(*args)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        page.note(f"{page.where(source)} is malformed ({type(e).__name__}: {_short(e)})")


def _loss_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    m = run.metrics
    steps, loss = _series(m, "loss")
    val_steps, val = _series(m, "val_loss")
    if not loss and not val:
        return

    def draw_loss(fig: Any) -> None:
        ax = fig.subplots()
        if loss:
            ax.plot(steps, loss, color="#1565c0", lw=1.4, label="training loss")
        if val:
            ax.plot(val_steps, val, "o-", color="#ef6c00", ms=4, lw=1.2, label="validation")
        _style(ax, "loss (nats/token)")
        ax.legend(fontsize=9)

    parts = []
    if loss:
        parts.append(f"{len(loss)} training points, final loss {loss[-1]:.4f} at step {steps[-1]}")
    if val:
        parts.append(f"{len(val)} validation points, last {val[-1]:.4f} at step {val_steps[-1]}")
    alt = f"{title}: loss vs step; " + "; ".join(parts)
    body = _figure(draw_loss, alt, "; ".join(parts) + " (from metrics.jsonl)")
    rewards = [k for k in ("reward_accuracy", "val_reward_accuracy") if _series(m, k)[0]]
    if rewards:  # DPO and reward models: how often the chosen answer out-rewards the rejected

        def draw_rewards(fig: Any) -> None:
            ax = fig.subplots()
            for key in rewards:
                ax.plot(*_series(m, key), "o-", ms=3, label=key.replace("_", " "))
            _style(ax, "share of pairs")
            ax.legend(fontsize=9)

        body += _figure(draw_rewards, f"{title}: pairwise reward accuracy vs step")
    if _series(m, "reward")[0]:  # GRPO: the samples' reward, the held-out reward, KL, clipping
        body += _figure(lambda fig: _draw_online(fig, m), _online_alt(m, title))
    page.add(f"{prefix}loss", f"{title}: training and validation loss", body)


def _draw_online(fig: Any, m: list[dict[str, Any]]) -> None:
    reward_ax, kl_ax = fig.subplots(1, 2)
    reward_ax.plot(*_series(m, "reward"), color="#1565c0", lw=1.4, label="samples (mean)")
    if _series(m, "val_reward")[0]:
        reward_ax.plot(*_series(m, "val_reward"), "o-", color="#ef6c00", ms=4, label="held out")
    _style(reward_ax, "reward")
    reward_ax.legend(fontsize=9)
    for key, color in (("kl", "#6a1b9a"), ("clip_fraction", "#2e7d32")):
        if _series(m, key)[0]:
            kl_ax.plot(*_series(m, key), color=color, lw=1.2, label=key.replace("_", " "))
    _style(kl_ax, "KL to the reference / clipped share")
    kl_ax.legend(fontsize=9)


def _online_alt(m: list[dict[str, Any]], title: str) -> str:
    steps, reward = _series(m, "reward")
    text = f"{title}: GRPO reward vs step, last {reward[-1]:.4f} at step {steps[-1]}"
    val_steps, val = _series(m, "val_reward")
    if val:
        first, last = f"{val[0]:.4f} at step {val_steps[0]}", f"{val[-1]:.4f} at {val_steps[-1]}"
        text += f"; held-out reward {first}, {last}"
    return text


def _lr_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    lr_steps, lr = _series(run.metrics, "lr")
    if not lr:
        return

    def draw_lr(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot(lr_steps, lr, color="#6a1b9a", lw=1.4)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        _style(ax, "learning rate")

    alt = f"{title}: learning rate vs step, peak {max(lr):.3g}, last {lr[-1]:.3g}"
    page.add(f"{prefix}lr", f"{title}: learning rate", _figure(draw_lr, alt))


def _summary_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    m, cfg = run.metrics, run.config
    rows: list[tuple[str, Any]] = [("kind", run.label)]
    model = _section_of(cfg, "model")
    if model.get("preset") or model.get("path"):
        rows.append(("model", model.get("preset") or model.get("path")))
    steps = [r["step"] for r in m if isinstance(r.get("step"), int)]
    target = _section_of(cfg, "train").get("steps")
    if steps:
        of = f" of {target:,}" if isinstance(target, int) else ""
        rows.append(("step", f"{max(steps):,}{of}"))
    tokens = [r["tokens"] for r in m if isinstance(r.get("tokens"), int)]
    if tokens:
        rows.append(("tokens trained", tokens[-1]))
    loss_steps, loss = _series(m, "loss")
    if loss:
        rows.append(("final training loss", Raw(f"{loss[-1]:.4f} (step {loss_steps[-1]})")))
    val_steps, val = _series(m, "val_loss")
    if val:
        best = min(range(len(val)), key=val.__getitem__)
        if val_steps[0] == 0:  # fine-tuning: the base model's loss, what tuning is measured by
            rows.append(("validation loss before training", Raw(f"{val[0]:.4f}")))
        rows.append(("last validation loss", Raw(f"{val[-1]:.4f} (step {val_steps[-1]})")))
        rows.append(("best validation loss", Raw(f"{val[best]:.4f} (step {val_steps[best]})")))
    for key, label, scale, unit in (
        ("tokens_per_s", "tokens/s (median)", 1.0, ""),
        ("mfu", "MFU (median)", 100.0, " %"),
    ):
        value = run.median(key)
        if value is not None:
            rows.append((label, f"{_fmt(value * scale)}{unit}"))
    peak = run.peak_memory()
    if peak is not None:
        rows.append(("peak memory per device", f"{peak:.3g} GiB"))
    skipped = [r["skipped_steps"] for r in m if isinstance(r.get("skipped_steps"), int)]
    if skipped:
        rows.append(("skipped steps", skipped[-1]))
    g = run.goodput or {}
    if _finite(g.get("goodput")):
        rows.append(("goodput", f"{100 * g['goodput']:.1f} % of {human_duration(g.get('wall_s'))}"))
    body = _table(("", "value"), rows)
    body += f'<p class="muted">folder: {_e(page.where(run.folder) or ".")}</p>'
    page.add(f"{prefix}summary", f"{title}: summary", body)


def _finetune_data_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    report = _read_json(page, RunFiles(run.folder).data_report)
    if not isinstance(report, dict):
        return
    unit = "pairs" if report.get("kind") == "preference" else "examples"
    keys = (
        ("lines", "lines read"),
        ("examples", f"valid {unit}"),
        ("malformed", "malformed"),
        ("truncated", "truncated"),
        ("dropped_overlong", "dropped: too long"),
        ("dropped_untrained", "dropped: nothing to train on"),
        ("train_examples", f"train {unit}"),
        ("val_examples", f"validation {unit}"),
        ("rows", "rows"),
        ("tokens", "tokens"),
        ("trained_tokens", "tokens with a loss"),
    )
    rows: list[tuple[str, Any]] = [(label, report[k]) for k, label in keys if k in report]
    if _finite(report.get("packing_efficiency")):
        rows.append(("packing efficiency", f"{100 * report['packing_efficiency']:.1f} %"))
    body = _table((DATA_REPORT, "value"), rows)
    shown = [s for s in report.get("malformed_examples", []) if isinstance(s, str)]
    if shown:
        body += "<p class='muted'>malformed, e.g.: " + "; ".join(_e(s) for s in shown[:3]) + "</p>"
    page.add(f"{prefix}finetune-data", f"{title}: fine-tuning data", body)


def _throughput_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    tps_steps, tps = _series(run.metrics, "tokens_per_s")
    mfu_steps, mfu = _series(run.metrics, "mfu")
    if not tps and not mfu:
        return

    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        if tps:
            left.plot(tps_steps, tps, color="#00838f", lw=1.4)
        _style(left, "tokens/s", "throughput (whole job)")
        if mfu:
            right.plot(mfu_steps, [100 * v for v in mfu], color="#ad1457", lw=1.4)
        _style(right, "MFU (%)", "model FLOPs utilisation")

    median_tps, median_mfu = run.median("tokens_per_s"), run.median("mfu")
    text = []
    if median_tps is not None:
        text.append(f"median {_fmt(median_tps)} tokens/s")
    if median_mfu is not None:
        text.append(f"median MFU {100 * median_mfu:.2f} %")
    caption = ", ".join(text) + " (first logged interval left out of the medians)"
    alt = f"{title}: tokens/s and MFU vs step; " + ", ".join(text)
    stragglers = _stragglers(run.metrics)
    if stragglers:
        caption += f". {stragglers}"
    page.add(f"{prefix}throughput", f"{title}: tokens/s and MFU", _figure(draw, alt, caption))


def _stragglers(records: list[dict[str, Any]]) -> str:
    """The ranks metrics.jsonl named as stragglers, with the steps and how much slower."""
    seen: dict[int, list[int]] = {}  # rank: steps it was a straggler at
    worst: dict[int, float] = {}
    judged = [r for r in records if isinstance(r.get("straggler_ranks"), list)]
    for r in judged:
        for rank in r["straggler_ranks"]:
            seen.setdefault(rank, []).append(r["step"])
            if r.get("slowest_rank") == rank and _finite(r.get("slowest_ratio")):
                worst[rank] = max(worst.get(rank, 0.0), r["slowest_ratio"])
    if not judged:
        return ""
    if not seen:
        return "no straggler rank"
    named = [
        f"rank {rank} (steps {steps[0]}–{steps[-1]}"
        + (f", up to {worst[rank]:.1f}× the median own step time)" if rank in worst else ")")
        for rank, steps in sorted(seen.items())
    ]
    return "stragglers: " + "; ".join(named)


def _routing_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    """A mixture of experts: how evenly the router spread the tokens, what it dropped."""
    m = run.metrics
    steps, max_load = _series(m, "moe_max_load")
    if not max_load:
        return
    loads = [r["moe_expert_load"] for r in m if isinstance(r.get("moe_expert_load"), list)]

    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        left.plot(steps, max_load, color="#5d4037", lw=1.4, label="busiest expert / mean")
        left.plot(*_series(m, "moe_balance_loss"), color="#7cb342", lw=1.2, label="balance loss")
        _style(left, "ratio (1.0 = even)", "balance")
        left.legend(fontsize=9)
        if loads:
            right.bar(range(len(loads[-1])), [100 * v for v in loads[-1]], color="#8d6e63")
        _style(right, "share of routed tokens (%)", "per expert, last record")

    dropped = sum(_series(m, "moe_dropped_tokens")[1])
    text = f"busiest expert at {max_load[-1]:.2f}× the mean at step {steps[-1]}"
    text += f"; {_fmt(int(dropped))} token assignments dropped over the logged steps"
    page.add(
        f"{prefix}routing",
        f"{title}: mixture-of-experts routing",
        _figure(draw, f"{title}: expert load vs step; {text}", text + " (rank 0's tokens)"),
    )


def _memory_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    """Every memory figure the records hold: `peak_mem_gib` (the maximum over ranks) and, where
    a record carries one value per rank (a list, or keys ending in `_rank<N>`), one line each."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for r in run.metrics:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        for key, value in r.items():
            if "mem" not in key:
                continue
            if isinstance(value, list):
                for rank, v in enumerate(value):
                    if _finite(v):
                        name = f"{key.removesuffix('_per_rank')} rank {rank}"
                        xs, ys = lines.setdefault(name, ([], []))
                        xs.append(step)
                        ys.append(float(v))
            elif _finite(value):
                match = re.match(r"^(.*)_rank(\d+)$", key)
                name = f"{match[1]} rank {match[2]}" if match else key
                xs, ys = lines.setdefault(name, ([], []))
                xs.append(step)
                ys.append(float(value))
    if not lines:
        return

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for name, (xs, ys) in sorted(lines.items()):
            label = "peak over all ranks" if name == "peak_mem_gib" else name
            ax.plot(xs, ys, lw=1.4, label=label)
        _style(ax, "GiB")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=9)

    peaks = ", ".join(f"{name} {max(ys):.3g} GiB" for name, (_, ys) in sorted(lines.items()))
    device = _section_of(run.config, "train").get("device", "")
    caption = (
        f"highest: {peaks}. On a GPU this is the peak allocated tensor memory; on a CPU the "
        "process's peak resident memory." + (f" (train.device = {device})" if device else "")
    )
    page.add(
        f"{prefix}memory",
        f"{title}: memory per rank",
        _figure(draw, f"{title}: memory vs step; {peaks}", caption),
    )


def _goodput_section(page: Page, run: RunData, prefix: str, title: str) -> None:
    g = run.goodput
    hangs = RunFiles(run.folder).hang_dumps()
    if g is None and not hangs:
        return
    body = ""
    if g is not None:
        wall = g.get("wall_s")
        parts = [(label, g.get(key), colour) for key, label, colour in GOODPUT_PARTS]
        share = g["goodput"] if _finite(g.get("goodput")) else None
        if not _finite(wall) or not all(_finite(v) for _, v, _ in parts):
            missing = [key for key, _, _ in GOODPUT_PARTS if not _finite(g.get(key))]
            page.note(
                f"{page.where(RunFiles(run.folder).goodput)} lacks "
                f"{', '.join(missing) or 'wall_s'}; goodput is left out"
            )
        else:

            def draw(fig: Any) -> None:
                ax = fig.subplots()
                left = 0.0
                for label, value, colour in parts:
                    width = max(0.0, float(value))
                    ax.barh([0], [width], left=left, color=colour, label=label, height=0.5)
                    left += width
                ax.set_yticks([])
                ax.set_xlabel("seconds of wall time")
                shown = f"goodput {100 * share:.1f} % of " if share is not None else ""
                ax.set_title(f"{shown}{human_duration(wall)} of wall time", fontsize=11)
                fig.legend(fontsize=8, loc="outside right center")

            alt = f"{title}: wall time by use; " + ", ".join(
                f"{label} {float(v):.1f} s" for label, v, _ in parts
            )
            body += _figure(draw, alt, size=(FIG_SIZE[0], 2.0))
            attempts = g.get("attempts")
            rows: list[tuple[str, Any]] = [
                (
                    "goodput (productive / wall)",
                    f"{100 * share:.1f} %" if share is not None else "—",
                ),
                ("wall time", human_duration(wall)),
                ("attempts", attempts if isinstance(attempts, int) else "—"),
                ("restarts", g.get("restarts", "—")),
            ]
            rows += [(f"{label} time", human_duration(v)) for label, v, _ in parts]
            for key, label in GoodputRecord.counts():
                if isinstance(g.get(key), int):
                    rows.append((label, g[key]))
            body += _table((GOODPUT, "value"), rows)
    if hangs:
        body += "<p>hang dumps: " + ", ".join(_e(page.where(h)) for h in hangs) + "</p>"
    if body:
        page.add(f"{prefix}goodput", f"{title}: goodput and restarts", body)


def _eval_section(page: Page, records: list[dict[str, Any]], anchor: str, title: str) -> None:
    """The latest result of every task (eval.jsonl is appended to; later lines win)."""
    latest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for record in records:
        tasks = record.get("tasks")
        if isinstance(tasks, dict):
            for name, result in tasks.items():
                if isinstance(result, dict):
                    latest[name] = (record, result)
    if not latest:
        return
    rows = []
    for name, (record, result) in latest.items():
        for metric, value in result.items():
            if metric in ("kind", "n", "malformed_lines") or metric.endswith("_stderr"):
                continue
            if not _number(value):
                continue
            se = result.get(f"{metric}_stderr")
            rows.append(
                (
                    name,
                    result.get("kind", ""),
                    result.get("n", "—"),
                    metric,
                    value,
                    f"± {_fmt(se)}" if _finite(se) else "",
                    record.get("step", "—"),
                    record.get("timestamp", ""),
                )
            )
    headers = ("task", "kind", "n", "metric", "value", "stderr", "step", "when")
    body = _table(headers, rows)
    body += f'<p class="muted">latest result per task of {len(records)} eval.jsonl record(s)</p>'
    page.add(anchor, f"{title}: evaluation", body)


def _predicted_section(page: Page, run: RunData, plan: Any, prefix: str, title: str) -> None:
    """The planner's prediction for the stage against what the run measured."""
    where = f"pipeline.json plan.{prefix.rstrip('-')}"
    if not isinstance(plan, dict):
        page.note(f"{where} is not an object; predicted vs measured is left out")
        return
    memory = plan.get("memory_gib")
    predicted = {
        "memory": memory.get("total") if isinstance(memory, dict) else None,
        "tokens_per_s": plan.get("tokens_per_s"),
        "step_time": plan.get("step_time_s"),
        "mfu": plan.get("mfu"),
    }
    median_tps = run.median("tokens_per_s")
    batch = run.batch_tokens
    measured = {
        "memory": run.peak_memory(),
        "tokens_per_s": median_tps,
        "step_time": batch / median_tps if batch and median_tps else None,
        "mfu": run.median("mfu"),
    }
    lacking = [k for k, v in predicted.items() if not _finite(v)]
    if len(lacking) == len(predicted):
        page.note(f"{where} has none of memory_gib.total, tokens_per_s, step_time_s, mfu")
        return
    labels = {
        "memory": ("peak memory per device (GiB)", 1.0),
        "tokens_per_s": ("tokens/s (whole job)", 1.0),
        "step_time": ("step time (s)", 1.0),
        "mfu": ("MFU (%)", 100.0),
    }
    rows = []
    for key, (label, scale) in labels.items():
        p, m = predicted[key], measured[key]
        if not _finite(p) and m is None:
            continue
        ratio = f"{m / p:.3g} ×" if _finite(p) and p and m is not None else "—"
        rows.append(
            (
                label,
                p * scale if _finite(p) else None,
                m * scale if m is not None else None,
                ratio,
            )
        )
    body = _table(("", "predicted", "measured", "measured / predicted"), rows)
    shown = [k for k in ("memory", "tokens_per_s", "mfu") if _finite(predicted[k])]
    shown = [k for k in shown if measured[k] is not None]
    if shown:

        def draw(fig: Any) -> None:
            axes = fig.subplots(1, len(shown), squeeze=False)[0]
            for ax, key in zip(axes, shown, strict=True):
                label, scale = labels[key]
                values = [predicted[key] * scale, measured[key] * scale]
                bars = ax.bar(["predicted", "measured"], values, color=["#90a4ae", "#1565c0"])
                ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
                ax.set_title(label, fontsize=10)
                ax.margins(y=0.15)
                ax.grid(axis="y", alpha=0.3)

        alt = f"{title}: predicted vs measured; " + ", ".join(
            f"{labels[k][0]} {_fmt(predicted[k] * labels[k][1])} vs "
            f"{_fmt(measured[k] * labels[k][1])}"
            for k in shown
        )
        body = _figure(draw, alt) + body
    extra = []
    if isinstance(plan.get("strategy"), dict):
        s = plan["strategy"]
        extra.append(
            "layout " + " ".join(f"{k} {s[k]}" for k in ("tp", "pp", "dp", "micro_batch") if k in s)
        )
    if plan.get("bottleneck"):
        extra.append(f"predicted limit: {plan['bottleneck']}")
    if _finite(plan.get("train_days")):
        extra.append(f"predicted training time {plan['train_days']:.3g} days")
    extra.append(
        "measured: highest peak_mem_gib and medians of metrics.jsonl (first interval left out)"
    )
    body += f'<p class="muted">{_e("; ".join(extra))}</p>'
    page.add(f"{prefix}predicted", f"{title}: predicted vs measured", body)


# -- data: `loom data prepare` / `loom data tokenize` folders ---------------------------------


def _data_sections(page: Page, folder: Path, prefix: str, title: str) -> None:
    manifest = _read_json(page, RunFiles(folder).manifest)
    if not isinstance(manifest, dict):
        return
    if "stages" in manifest:  # `loom data prepare` keeps the funnel; `data tokenize` does not
        _guarded(page, RunFiles(folder).manifest, _funnel_section, page, manifest, prefix, title)
    _guarded(page, RunFiles(folder).manifest, _shards_section, page, manifest, prefix, title)


def _funnel_section(page: Page, manifest: dict[str, Any], prefix: str, title: str) -> None:
    stages = manifest["stages"]
    sources = list(stages["read"]["per_source"])
    funnel = manifest_stages(manifest)
    labels = ["input", *funnel]

    def counts(unit: str) -> dict[str, list[int]]:
        out = {}
        for s in sources:
            first = stages["read"]["per_source"][s][f"{unit}_in"]
            out[s] = [first] + [stages[st]["per_source"][s][f"{unit}_out"] for st in funnel]
        return out

    docs, size = counts("documents"), counts("bytes")

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        width = 0.8 / max(1, len(sources))
        for ax, data, ylabel in ((axes[0], docs, "documents"), (axes[1], size, "MB")):
            for i, s in enumerate(sources):
                values = data[s] if ylabel == "documents" else [v / 1e6 for v in data[s]]
                xs = [x + (i - (len(sources) - 1) / 2) * width for x in range(len(labels))]
                ax.bar(xs, values, width, label=s)
            ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"{ylabel} kept")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)

    kept = manifest.get("documents", {})
    alt = f"{title}: documents and bytes kept after each stage, per source; " + ", ".join(
        f"{s}: {docs[s][0]:,} in, {docs[s][-1]:,} kept" for s in sources
    )
    caption = (
        f"{_fmt(kept.get('read'))} documents read, {_fmt(kept.get('kept'))} kept" if kept else ""
    )
    body = _figure(draw, alt, caption)
    rows = [
        (stage, *(docs[s][i] for s in sources), sum(docs[s][i] for s in sources))
        for i, stage in enumerate(labels)
    ]
    body += "<h3>documents kept after each stage</h3>"
    body += _table(("stage", *sources, "all"), rows)
    rows = [
        (stage, *(size[s][i] for s in sources), sum(size[s][i] for s in sources))
        for i, stage in enumerate(labels)
    ]
    body += "<h3>bytes kept after each stage</h3>" + _table(("stage", *sources, "all"), rows)
    drops = [
        (stage, reason, count)
        for stage in funnel
        for reason, count in sorted(stages[stage]["dropped"].items(), key=lambda kv: -kv[1])
        if count
    ]
    if drops:
        body += "<h3>dropped documents by stage and reason</h3>"
        body += _table(("stage", "reason", "documents"), drops)
    body += _languages_table(manifest)
    mixing = manifest.get("mixing")
    if isinstance(mixing, dict) and mixing:
        rows = [
            (
                name,
                m["tokens_in"],
                m["tokens_out"],
                f"{100 * m['target_share']:.1f} %",
                f"{100 * m['achieved_share']:.1f} %",
            )
            for name, m in mixing.items()
        ]
        body += "<h3>mixing: training tokens per source</h3>"
        body += _table(
            ("source", "tokens before mixing", "after mixing", "target share", "achieved"), rows
        )
    page.add(f"{prefix}funnel", f"{title}: data funnel", body)


def _languages_table(manifest: dict[str, Any]) -> str:
    """Per detected language: documents after each stage, and the tokenizer's bytes per token."""
    if not manifest.get("languages"):
        return ""
    headers, rows = language_rows(manifest)
    title = "documents per detected language after each stage, and bytes per token"
    return f"<h3>{title}</h3>" + _table(headers, rows)


def _shards_section(page: Page, manifest: dict[str, Any], prefix: str, title: str) -> None:
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return
    rows = [
        (split, s.get("documents"), s.get("tokens"), len(s.get("shards", [])))
        for split, s in splits.items()
        if isinstance(s, dict)
    ]
    body = _table(("split", "documents", "tokens", "shards"), rows)
    tok = manifest.get("tokenizer", {})
    facts = [f"made by {manifest.get('created_by', '?')}"]
    if isinstance(tok, dict) and tok.get("vocab_size"):
        facts.append(f"vocabulary {tok['vocab_size']:,} tokens")
    if _finite(manifest.get("seconds")):
        facts.append(f"took {human_duration(manifest['seconds'])}")
    dropped = manifest.get("documents", {}).get("dropped")
    if isinstance(dropped, int) and dropped:
        facts.append(f"{dropped:,} input records dropped")
    body += f'<p class="muted">{_e("; ".join(facts))}</p>'
    page.add(f"{prefix}shards", f"{title}: token shards", body)


# -- pipeline folders -------------------------------------------------------------------------


def _stage_section(page: Page, stages: list[dict[str, Any]]) -> None:
    rows = []
    for s in stages:
        status = str(s.get("status", "?"))
        colour = STATUS_COLOURS.get(status, "#6e7781")
        badge = Raw(f'<span class="badge" style="background:{colour}">{_e(status)}</span>')
        figures = s.get("figures")
        shown = (
            "; ".join(f"{k}: {_fmt(v)}" for k, v in figures.items())
            if isinstance(figures, dict)
            else ""
        )
        rows.append((s.get("name", "?"), badge, human_duration(s.get("seconds")), shown))
    body = _table(("stage", "status", "duration", "key figures"), rows)
    timed = [
        (str(s.get("name", "?")), float(s["seconds"]), str(s.get("status")))
        for s in stages
        if _finite(s.get("seconds"))
    ]
    if timed:

        def draw(fig: Any) -> None:
            ax = fig.subplots()
            ax.barh(
                [n for n, _, _ in timed][::-1],
                [v for _, v, _ in timed][::-1],
                color=[STATUS_COLOURS.get(st, "#6e7781") for _, _, st in timed][::-1],
            )
            ax.set_xlabel("seconds")
            ax.grid(axis="x", alpha=0.3)

        alt = "stage durations: " + ", ".join(f"{n} {human_duration(v)}" for n, v, _ in timed)
        body += _figure(draw, alt, size=(FIG_SIZE[0], 0.8 + 0.35 * len(timed)))
    page.add("stages", "Pipeline stages", body)


def _pipeline(page: Page) -> None:
    raw = _read_json(page, RunFiles(page.run_dir).pipeline_state)
    if raw is None:
        return
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        page.note("pipeline.json has no list of stage objects under 'stages'")
        return
    plans = raw.get("plan") if isinstance(raw.get("plan"), dict) else {}
    _guarded(page, RunFiles(page.run_dir).pipeline_state, _stage_section, page, stages)
    for stage in stages:
        name = str(stage.get("name", "?"))
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name) + "-"
        folder_name = stage.get("dir")
        if not isinstance(folder_name, str) or not folder_name:
            continue
        folder = page.run_dir / folder_name
        if not folder.is_dir():
            if stage.get("status") in ("done", "running", "failed"):
                page.note(f"stage {name}: its folder {folder_name} does not exist")
            continue
        if name in TRAINING_STAGES or RunFiles(folder).metrics.is_file():
            _run_sections(page, _load_run(page, folder), slug, name, plans.get(name))
        elif name == "data" or RunFiles(folder).manifest.is_file():
            _data_sections(page, folder, slug, name)
        elif RunFiles(folder).eval_log.is_file():
            path = RunFiles(folder).eval_log
            _guarded(page, path, _eval_section, page, _read_jsonl(page, path), f"{slug}eval", name)
        elif name == "eval" and stage.get("status") == "done":
            page.note(f"stage {name}: {folder_name}/eval.jsonl is missing")


# -- the page ---------------------------------------------------------------------------------


def _render(page: Page, kind: str) -> str:
    name = page.run_dir.resolve().name
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    nav = " ".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in page.toc)
    notes = ""
    if page.notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in page.notes)
        notes = (
            f'<section id="notes" class="notes"><strong>Notes</strong><ul>{items}</ul></section>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Loom report: {_e(name)}</title><style>{CSS}</style></head><body>\n"
        f"<header><h1>Loom report: {_e(name)}</h1>"
        f'<p class="sub">{_e(kind)} · {_e(page.run_dir)} · written {_e(when)}</p></header>\n'
        f"<nav>{nav}</nav>\n{notes}\n" + "\n".join(page.sections) + "\n</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html for a run, pipeline or data folder; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LoomError(f"{run_dir} does not exist; give a run folder or a pipeline folder")
    if not run_dir.is_dir():
        raise LoomError(f"{run_dir} is a file; give a run folder or a pipeline folder")
    page = Page(run_dir)
    if RunFiles(run_dir).pipeline_state.is_file():
        kind = "pipeline"
        _pipeline(page)
    elif _is_run(run_dir):
        run = _load_run(page, run_dir)
        kind = f"{run.label} run"
        _run_sections(page, run, "", run.label)
    elif RunFiles(run_dir).manifest.is_file():
        kind = "data"
        _data_sections(page, run_dir, "", "data")
    else:
        raise LoomError(
            f"{run_dir} is neither a run folder (config.toml, metrics.jsonl), a pipeline "
            "folder (pipeline.json) nor a data folder (manifest.json); give the folder "
            "`loom train`, `loom finetune`, `loom data prepare` or the pipeline wrote"
        )
    out = run_dir / REPORT
    tmp = out.with_name(f".{REPORT}.tmp")
    tmp.write_text(_render(page, kind), encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a report
    logger.info("report: %d section(s), %d note(s): %s", len(page.sections), len(page.notes), out)
    return out
