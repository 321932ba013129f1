"""`loom eval`: perplexity, multiple-choice accuracy, greedy-generation match and preference-pair
accuracy of any model Loom loads (run folder or checkpoint, HF folder, GGUF; reward models for
preference pairs only).

Everything is scored as "sum of log-probabilities of the last c tokens of a sequence", so
perplexity windows and multiple-choice continuations share one batched, right-padded forward
pass (causal attention: padding after a sequence cannot change its logits).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from loom.core.checkpoint import read_state
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import merge_lora
from loom.core.options import option
from loom.core.quantize import quantize_int8_weight_only
from loom.core.run_files import EVAL_LOG
from loom.core.tokenizer import EOS, load_tokenizer, tokenizer_hash
from loom.data.shards import TokenDataset
from loom.eval.generate import generate
from loom.eval.tasks import Choice, Prompt, Task, load_task
from loom.finetune.dpo import sequence_logps
from loom.finetune.pairs import joined
from loom.finetune.reward import last_token_scores
from loom.finetune.rows import row_tensors
from loom.finetune.sft_data import build_preferences
from loom.models.llama import Transformer
from loom.models.sources import find_checkpoint, load_model, require_language_model


@dataclass
class EvalOptions:
    """The command's knobs; `batch_tokens` bounds the tokens of one scoring forward pass."""

    # field metadata: `loom eval`'s flags are generated from it (loom.commands.options)
    few_shot: int = field(default=0, metadata={"metavar": "K"})
    limit: int | None = field(default=None, metadata={"metavar": "N", "help": "first N examples"})
    seq_len: int | None = field(  # None: min(model context, 1024)
        default=None,
        metadata={"metavar": "N", "help": "perplexity window (default: min(context, 1024))"},
    )
    max_tokens: int = field(default=32, metadata={"metavar": "N", "help": "generation length"})
    seed: int = field(default=0, metadata={"help": "few-shot example choice"})
    batch_tokens: int = field(
        default=4096, metadata={"metavar": "N", "help": "tokens of one scoring forward pass"}
    )
    quantize: str | None = field(  # int8 weight-only weights (loom.core.quantize)
        default=None,
        metadata={
            "choices": ("int8",),
            "help": "int8 weight-only linear layers (torchao), to measure their quality cost",
        },
    )


@dataclass
class EvalJob(EvalOptions):
    """What to score and how: `loom eval`'s options and the pipeline's `[eval]` (where `model`
    and `tasks` default to earlier stages)."""

    model: str = option("", positional=True, metavar="MODEL")
    tasks: list[str] = option(nargs="+", required=True, metavar="TASK", default_factory=list)
    json: bool = option(False, help="print one JSON object, not a table")

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise LoomError(f'quantize = {self.quantize!r}: use "int8" or leave it out')


@dataclass
class TaskResult:
    """Metrics of one task; `details` keeps per-example scores (log-likelihoods, outputs)."""

    name: str
    kind: str
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    details: list[Any] = field(default_factory=list)
    malformed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, **self.metrics}
        out.update({f"{k}_stderr": v for k, v in self.stderr.items()})
        out["n"] = self.n
        if self.malformed:
            out["malformed_lines"] = self.malformed
        return out


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def separator_id(
    tokenizer: Tokenizer, tokenizer_dir: Path, keys: tuple[str, ...] = ("bos_token", "eos_token")
) -> int | None:
    """The token that starts a document (what training put between documents): Loom's EOS,
    else the tokenizer_config's BOS or EOS (`keys`, in order); None when there is none."""
    found = tokenizer.token_to_id(EOS)
    if found is not None:
        return found
    try:
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in keys:
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return None


@torch.no_grad()
def score(
    model: Transformer, requests: list[tuple[list[int], int]], batch_tokens: int = 4096
) -> list[float]:
    """For each (tokens, c): the summed log-probability of the last c tokens given the ones
    before. Requests are sorted by length and batched up to `batch_tokens` tokens."""
    device = model.embed_tokens.weight.device
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [0.0] * len(requests)
    start = 0
    while start < len(order):
        longest = len(requests[order[start]][0])
        size = max(1, batch_tokens // max(longest, 1))
        batch = order[start : start + size]
        start += len(batch)
        tokens = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = requests[i][0]
            tokens[row, : len(ids)] = torch.tensor(ids)
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1]).float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(batch):
            ids, count = requests[i]
            out[i] = float(logp[row, len(ids) - 1 - count : len(ids) - 1].sum()) if count else 0.0
    return out


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _few_shot(task: Task, index: int, opts: EvalOptions) -> str:
    """K other examples of the file, drawn by a RNG seeded with (seed, example), answered."""
    if opts.few_shot == 0:
        return ""
    others = [j for j in range(len(task.examples)) if j != index]
    if opts.few_shot > len(others):
        raise LoomError(
            f"--few-shot {opts.few_shot}: task {task.path} has only {len(task.examples)} "
            "examples; give fewer shots"
        )
    rng = random.Random(opts.seed * 1_000_003 + index)
    shots = []
    for j in rng.sample(others, opts.few_shot):
        ex = task.examples[j]
        if isinstance(ex, Choice):
            shots.append(ex.context + ex.choices[ex.answer])
        else:
            assert isinstance(ex, Prompt)
            shots.append(ex.prompt + ex.answers[0])
    return "\n\n".join(shots) + "\n\n"


def _perplexity(
    model: Transformer,
    task: Task,
    tokenizer: Tokenizer,
    tokenizer_dir: Path,
    opts: EvalOptions,
    seq_len: int,
) -> TaskResult:
    windows: list[list[int]] = []
    n_bytes = 0
    if task.shards:
        data = TokenDataset(task.path)
        if data.tokenizer_hash != tokenizer_hash(tokenizer):
            raise LoomError(
                f"task {task.path} was tokenized with another tokenizer than the model's "
                f"({data.tokenizer_hash[:19]}... vs {tokenizer_hash(tokenizer)[:19]}...); "
                "tokenize the text again with the model's tokenizer, or give the text files"
            )
        val = data.split("val")
        total = val.num_tokens
        for start in range(0, total - 1, seq_len):
            windows.append(val.window(start, min(seq_len + 1, total - start)).tolist())
            if opts.limit is not None and len(windows) >= opts.limit:
                break
    else:
        sep = separator_id(tokenizer, tokenizer_dir)
        texts = task.texts[: opts.limit] if opts.limit is not None else task.texts
        stream: list[int] = []
        for text in texts:  # each document starts with the separator, as in training
            stream += ([sep] if sep is not None else []) + _encode(tokenizer, text)
            n_bytes += len(text.encode("utf-8"))
        for start in range(0, len(stream) - 1, seq_len):
            windows.append(stream[start : start + seq_len + 1])
    if not windows:
        raise LoomError(f"task {task.path} has fewer than 2 tokens; nothing to score")
    logps = score(model, [(w, len(w) - 1) for w in windows], opts.batch_tokens)
    tokens = sum(len(w) - 1 for w in windows)
    nats = -sum(logps)
    result = TaskResult(task.name, "perplexity", len(windows), malformed=len(task.malformed))
    result.metrics = {
        "tokens": tokens,
        "loss": nats / tokens,
        "perplexity": math.exp(nats / tokens),
    }
    if n_bytes:
        result.metrics["bits_per_byte"] = nats / math.log(2) / n_bytes
    result.details = logps
    return result


def _multiple_choice(
    model: Transformer,
    task: Task,
    tokenizer: Tokenizer,
    tokenizer_dir: Path,
    opts: EvalOptions,
    examples: list[int],
) -> TaskResult:
    max_len = model.cfg.max_seq_len
    sep = separator_id(tokenizer, tokenizer_dir)
    requests: list[tuple[list[int], int]] = []
    for i in examples:
        ex = task.examples[i]
        assert isinstance(ex, Choice)
        context = _few_shot(task, i, opts) + ex.context
        ctx_ids = _encode(tokenizer, context)
        for choice in ex.choices:
            full = _encode(tokenizer, context + choice)
            common = 0  # tokens may merge across the seam: score from where they differ
            limit = min(len(ctx_ids), len(full))
            while common < limit and ctx_ids[common] == full[common]:
                common += 1
            count = len(full) - common
            if common == 0:
                if sep is None:
                    raise LoomError(
                        f"task {task.path}: an empty context needs a start token, and the "
                        "model's tokenizer has none; give every example a context"
                    )
                full = [sep, *full]
            if count > max_len:
                raise LoomError(
                    f"task {task.path}: a choice of {count} tokens exceeds the model's context "
                    f"of {max_len} tokens"
                )
            requests.append((full[-(max_len + 1) :], count))
    logps = score(model, requests, opts.batch_tokens)
    acc = acc_norm = 0
    details: list[list[float]] = []
    pos = 0
    for i in examples:
        ex = task.examples[i]
        assert isinstance(ex, Choice)
        lls = logps[pos : pos + len(ex.choices)]
        pos += len(ex.choices)
        details.append(lls)
        normed = [
            ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, ex.choices, strict=True)
        ]
        acc += max(range(len(lls)), key=lls.__getitem__) == ex.answer
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == ex.answer
    n = len(examples)
    return _scored(task, "multiple_choice", {"acc": acc / n, "acc_norm": acc_norm / n}, details)


def _scored(task: Task, kind: str, metrics: dict[str, float], details: list[Any]) -> TaskResult:
    """A task's accuracies with their standard errors over its n examples."""
    n = len(details)
    result = TaskResult(task.name, kind, n, malformed=len(task.malformed))
    result.metrics = metrics
    result.stderr = {k: _stderr(v, n) for k, v in metrics.items()}
    result.details = details
    return result


def _generation(
    model: Transformer,
    task: Task,
    tokenizer: Tokenizer,
    tokenizer_dir: Path,
    opts: EvalOptions,
    examples: list[int],
) -> TaskResult:
    keep = model.cfg.max_seq_len - opts.max_tokens
    if keep < 1:
        raise LoomError(
            f"--max-tokens {opts.max_tokens} leaves no room for a prompt in the model's context "
            f"of {model.cfg.max_seq_len} tokens"
        )
    sep = separator_id(tokenizer, tokenizer_dir)
    stop = separator_id(tokenizer, tokenizer_dir, ("eos_token",))
    exact = contains = 0
    outputs: list[str] = []
    for i in examples:
        ex = task.examples[i]
        assert isinstance(ex, Prompt)
        ids = _encode(tokenizer, _few_shot(task, i, opts) + ex.prompt)[-keep:]
        if not ids:
            ids = [sep] if sep is not None else []
        new = generate(model, ids, opts.max_tokens, temperature=0.0, stop_id=stop)
        output = tokenizer.decode(new).split("\n", 1)[0]
        outputs.append(output)
        answers = [a.strip().casefold() for a in ex.answers]
        exact += output.strip().casefold() in answers
        contains += any(a in output.casefold() for a in answers)
    n = len(examples)
    metrics = {"exact_match": exact / n, "contains": contains / n}
    return _scored(task, "generation", metrics, outputs)


@torch.no_grad()
def _preference(
    model: Transformer, task: Task, tokenizer_dir: Path, opts: EvalOptions
) -> TaskResult:
    """Pairwise accuracy: the share of pairs whose chosen answer the model puts first, by its
    score (a reward model) or by the answer's summed log-probability (a language model); the
    pairs rendered as fine-tuning renders them (the tokenizer's chat template)."""
    width = model.cfg.max_seq_len - 1  # (a reward model also reads the last token)
    rows = build_preferences(task.path, tokenizer_dir, width, val_fraction=0.0).train
    n = len(rows) if opts.limit is None else min(opts.limit, len(rows))
    device = model.embed_tokens.weight.device
    model.eval()
    margins = []
    pairs = max(1, opts.batch_tokens // (2 * width))  # per forward pass
    for start in range(0, n, pairs):
        index = torch.arange(start, min(n, start + pairs))
        inputs, targets = (t.to(device) for t in joined(row_tensors(rows, index, False)))
        if model.cfg.num_labels:
            scores = last_token_scores(model, inputs, targets).float()
        else:
            scores = sequence_logps(model(inputs), targets)
        chosen, rejected = scores.chunk(2)
        margins.append(chosen - rejected)
    margin = torch.cat(margins).double()
    result = TaskResult(task.name, "preference", n, malformed=len(task.malformed))
    accuracy = float((margin > 0).double().mean())
    result.metrics = {"accuracy": accuracy, "margin": float(margin.mean())}
    spread = float(margin.std() / math.sqrt(n)) if n > 1 else None
    result.stderr = {"accuracy": _stderr(accuracy, n), "margin": spread}
    result.details = margin.tolist()
    return result


def run_task(
    model: Transformer, tokenizer: Tokenizer, tokenizer_dir: Path, task: Task, opts: EvalOptions
) -> TaskResult:
    """Score one parsed task with a loaded model."""
    if task.kind == "preference":
        return _preference(model, task, tokenizer_dir, opts)
    require_language_model(model, task.path, f"be scored on a {task.kind} task")
    if task.kind == "perplexity":
        max_len = model.cfg.max_seq_len
        seq_len = opts.seq_len or min(max_len, 1024)
        if not 1 <= seq_len <= max_len:
            raise LoomError(f"--seq-len {seq_len} must be between 1 and the context of {max_len}")
        return _perplexity(model, task, tokenizer, tokenizer_dir, opts, seq_len)
    examples = list(range(len(task.examples)))[: opts.limit]
    if task.kind == "multiple_choice":
        return _multiple_choice(model, task, tokenizer, tokenizer_dir, opts, examples)
    return _generation(model, task, tokenizer, tokenizer_dir, opts, examples)


def _check(opts: EvalOptions) -> None:
    if opts.few_shot < 0:
        raise LoomError(f"--few-shot {opts.few_shot} must be ≥ 0")
    if opts.limit is not None and opts.limit < 1:
        raise LoomError(f"--limit {opts.limit} must be ≥ 1")
    if opts.max_tokens < 1:
        raise LoomError(f"--max-tokens {opts.max_tokens} must be ≥ 1")
    if opts.seq_len is not None and opts.seq_len < 1:
        raise LoomError(f"--seq-len {opts.seq_len} must be ≥ 1")
    if opts.quantize not in (None, "int8"):
        raise LoomError(f"--quantize {opts.quantize}: the only choice is int8 (or leave it out)")


def _task_names(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths, strict=True)]


def evaluate(
    model_path: str | Path,
    task_paths: list[str],
    opts: EvalOptions | None = None,
    device: torch.device | None = None,
    append_to_run: bool = True,
) -> tuple[dict[str, Any], list[TaskResult]]:
    """Load the model once, run every task; a Loom run's record is appended to its eval.jsonl
    unless not `append_to_run` (`loom run` keeps it in the eval stage's own folder)."""
    opts = opts or EvalOptions()
    _check(opts)
    src = Path(model_path)
    tasks = [
        load_task(p, name) for p, name in zip(task_paths, _task_names(task_paths), strict=True)
    ]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir: Path | None = None
    step: int | None = None
    if src.exists() and src.suffix != ".gguf" and not (src / "config.json").is_file():
        checkpoint, run_dir = find_checkpoint(src)
        step = int(read_state(checkpoint)["step"])
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer_dir = load_model(src, torch.float32, Path(scratch), device)
        if opts.quantize == "int8":
            merge_lora(model)  # a LoRA run's adapters: fold them in, then quantize the sum
            quantize_int8_weight_only(model)
        tokenizer = load_tokenizer(tokenizer_dir)
        results = []
        for task in tasks:
            began = time.perf_counter()
            results.append(run_task(model, tokenizer, tokenizer_dir, task, opts))
            logger.info("task %s: %.1f s", task.name, time.perf_counter() - began)
    record: dict[str, Any] = {
        "model": str(model_path),
        "tasks": {r.name: r.to_dict() for r in results},
    }
    if run_dir is not None and append_to_run:
        logged = {**record, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step}
        logged["options"] = {
            "few_shot": opts.few_shot,
            "limit": opts.limit,
            "seq_len": opts.seq_len,
            "max_tokens": opts.max_tokens,
            "seed": opts.seed,
            "quantize": opts.quantize,
        }
        with open(run_dir / EVAL_LOG, "a") as fh:
            fh.write(json.dumps(logged) + "\n")
        logger.info("appended the results to %s", run_dir / EVAL_LOG)
    return record, results


def render(results: list[TaskResult]) -> str:
    """A markdown table: one row per task and metric."""
    lines = ["| task | kind | n | metric | value | stderr |", "|---|---|---|---|---|---|"]
    for r in results:
        for metric, value in r.metrics.items():
            se = r.stderr.get(metric)
            shown = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
            lines.append(
                f"| {r.name} | {r.kind} | {r.n} | {metric} | {shown} | "
                f"{'' if se is None else f'{se:.4f}'} |"
            )
    return "\n".join(lines)
