"""`loom eval` against the real `transformers`: a tiny random HF Llama's perplexity, choice
log-likelihoods and greedy generations are recomputed with transformers itself; a Loom run
gets its results appended to eval.jsonl; bad task files get clear errors."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import save_tiny_llama

from loom.cli import main as loom
from loom.core.errors import LoomError
from loom.core.tokenizer import EOS
from loom.eval.evaluate import EvalOptions, evaluate
from loom.eval.tasks import load_task

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:3000]
CHOICES = [
    {"context": "def add(a, b):\n  return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"context": "import os\nimport", "choices": [" sys", " os", " json"], "answer": 2},
    {"context": "for i in", "choices": [" range(10):", " x:", " ()"], "answer": 0},
    {"context": "class Foo", "choices": [":", "(object):", " Bar"], "answer": 1},
]
PROMPTS = ["def main():\n", "import ", "x = 1\ny ="]


@pytest.fixture(scope="module")
def hf_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved by transformers, with the test tokenizer."""
    folder = tmp_path_factory.mktemp("hf-eval")
    save_tiny_llama(folder, tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def reference(
    hf_dir: Path,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager"
    ).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_perplexity_and_bits_per_byte_match_transformers(
    hf_dir: Path, reference: tuple, tmp_path: Path
) -> None:
    model, tok = reference
    (tmp_path / "text.txt").write_text(TEXT)
    record, _ = evaluate(hf_dir, [str(tmp_path / "text.txt")], EvalOptions(seq_len=32))
    got = record["tasks"]["text.txt"]

    stream = [tok.convert_tokens_to_ids(EOS), *tok.encode(TEXT, add_special_tokens=False)]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 32):
            window = torch.tensor([stream[start : start + 33]])
            loss = model(input_ids=window, labels=window).loss  # transformers' mean
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert got["tokens"] == count == len(stream) - 1
    assert got["n"] == math.ceil((len(stream) - 1) / 32)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert got["loss"] == pytest.approx(total / count, rel=1e-4)
    bpb = total / math.log(2) / len(TEXT.encode("utf-8"))
    assert got["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)


def test_multiple_choice_log_likelihoods_match_transformers(
    hf_dir: Path, reference: tuple, tmp_path: Path
) -> None:
    model, tok = reference
    task = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    _, (result,) = evaluate(hf_dir, [str(task)], EvalOptions(batch_tokens=64))
    acc = acc_norm = 0
    for ex, got in zip(CHOICES, result.details, strict=True):
        expected = []
        for choice in ex["choices"]:
            ctx = tok.encode(ex["context"], add_special_tokens=False)
            full = tok.encode(ex["context"] + choice, add_special_tokens=False)
            assert full[: len(ctx)] == ctx
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([full[:-1]])).logits[0], dim=-1)
            targets = torch.tensor(full[1:])
            picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            expected.append(float(picked[len(ctx) - 1 :].sum()))
        assert got == pytest.approx(expected, abs=1e-4)
        normed = [ll / len(c.encode()) for ll, c in zip(expected, ex["choices"], strict=True)]
        acc += max(range(3), key=expected.__getitem__) == ex["answer"]
        acc_norm += max(range(3), key=normed.__getitem__) == ex["answer"]
    n = len(CHOICES)
    assert result.n == n
    assert result.metrics == {"acc": acc / n, "acc_norm": acc_norm / n}
    p = acc / n
    assert result.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))

    # Few-shot: seeded, so the same seed gives the same prompts; another may not.
    opts = EvalOptions(few_shot=2, seed=3, limit=2)
    _, (first,) = evaluate(hf_dir, [str(task)], opts)
    _, (again,) = evaluate(hf_dir, [str(task)], opts)
    assert first.n == 2 and first.details == again.details
    assert first.details != result.details[:2]


def test_generation_matches_transformers_greedy(
    hf_dir: Path, reference: tuple, tmp_path: Path
) -> None:
    model, tok = reference
    eos = tok.convert_tokens_to_ids(EOS)
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            new = model.generate(
                ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )[0, ids.shape[1] :]
        outputs.append(tok.decode(new, skip_special_tokens=True).split("\n", 1)[0])
    assert all(outputs)  # random weights still produce text, so the matches mean something
    answers = [outputs[0].upper(), outputs[1] + " and more", "zzz-not-there"]
    records = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    records[2] = {"prompt": PROMPTS[2], "answers": ["zzz-not-there", outputs[2][:3]]}
    task = write_jsonl(tmp_path / "gen.jsonl", records)
    _, (result,) = evaluate(hf_dir, [str(task)], EvalOptions(max_tokens=8))
    assert result.details == outputs
    exact = contains = 0
    for out, rec in zip(outputs, records, strict=True):
        wanted = [a.strip().casefold() for a in rec.get("answers", [rec.get("answer")])]
        exact += out.strip().casefold() in wanted
        contains += any(a in out.casefold() for a in wanted)
    assert exact >= 1 and contains >= 2  # example 0 by case-folding, example 2 by its prefix
    assert result.metrics == {"exact_match": exact / 3, "contains": contains / 3}


def test_cli_on_a_loom_run_appends_to_eval_jsonl(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loom.models.convert import convert

    run = convert(hf_dir, tmp_path / "run", "loom")
    mc = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["eval", str(run), "--tasks", str(mc), str(tmp_path / "text.txt"), "--seq-len", "64"]
    capsys.readouterr()
    assert loom([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["tasks"]) == {"mc.jsonl", "text.txt"}
    assert printed["tasks"]["mc.jsonl"]["n"] == 4
    assert printed["tasks"]["text.txt"]["perplexity"] > 1
    assert loom(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("| task | kind | n | metric | value | stderr |")
    assert "| mc.jsonl | multiple_choice | 4 | acc |" in table
    lines = (run / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2
    logged = json.loads(lines[0])
    assert logged["tasks"] == printed["tasks"] and logged["model"] == str(run)
    assert isinstance(logged["step"], int) and logged["timestamp"]


def test_bad_task_files(
    hf_dir: Path,
    tmp_path: Path,
    tokenizer_dir: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    loom_logs: pytest.LogCaptureFixture,
) -> None:
    from loom.core.tokenizer import save_tokenizer, train_bpe
    from loom.data.tokenize import TokenizeOptions, tokenize_to_shards

    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}, {"foo": 1}])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    (tmp_path / "data.csv").write_text("a,b\n")
    for bad in (unknown, empty, tmp_path / "missing.jsonl", tmp_path / "data.csv"):
        assert loom(["eval", str(hf_dir), "--tasks", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(bad) in err and "accepted" in err

    mixed = tmp_path / "mixed.jsonl"
    lines = [json.dumps(CHOICES[0]), "{not json", json.dumps(CHOICES[1]), '{"context": "x"}']
    lines += [json.dumps({**CHOICES[2], "answer": 7})]
    mixed.write_text("\n".join(lines) + "\n")
    task = load_task(mixed)
    assert task.kind == "multiple_choice" and len(task.examples) == 2
    assert task.malformed == [2, 4, 5]
    assert "3 malformed line(s)" in loom_logs.text and "line 2, 4, 5" in loom_logs.text
    record, _ = evaluate(hf_dir, [str(mixed)])
    assert record["tasks"]["mixed.jsonl"]["malformed_lines"] == 3
    assert record["tasks"]["mixed.jsonl"]["n"] == 2

    # Shards of the model's own tokenizer are scored; those of another one are refused.
    record, _ = evaluate(hf_dir, [str(data_dir)], EvalOptions(seq_len=64, limit=5))
    assert record["tasks"][data_dir.name]["tokens"] == 5 * 64
    other_tok = tmp_path / "other-tok"
    save_tokenizer(train_bpe([TEXT], 300), other_tok)
    (tmp_path / "in.txt").write_text(TEXT)
    other = tmp_path / "other-shards"
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[str(tmp_path / "in.txt")],
            tokenizer=str(other_tok),
            out=str(other),
            val_fraction=0.5,
        )
    )
    with pytest.raises(LoomError, match="another tokenizer"):
        evaluate(hf_dir, [str(other)])
    assert tokenizer_dir.is_dir()


LM_EVAL_TASK = """task: loom_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_on_the_hf_export_agrees_with_loom_eval(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's recipe: a Loom run exported to HF, scored by lm-evaluation-harness on a
    local task, gives the choice log-likelihoods and accuracies of `loom eval` on the run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from loom.models.convert import convert

    run = convert(hf_dir, tmp_path / "run", "loom")
    exported = convert(run, tmp_path / "exported", "hf")
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "loom_choices.yaml").write_text(LM_EVAL_TASK.format(data=data))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={exported},dtype=float32",
        device="cpu",
        tasks=["loom_choices"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=4,
    )
    _, (ours,) = evaluate(run, [str(data)])
    samples = sorted(theirs["samples"]["loom_choices"], key=lambda s: s["doc_id"])
    for sample, lls in zip(samples, ours.details, strict=True):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)
    scores = theirs["results"]["loom_choices"]
    assert scores["acc,none"] == ours.metrics["acc"]
    assert scores["acc_norm,none"] == ours.metrics["acc_norm"]
