"""`loom run` / `loom status`: real stages on tiny settings (no mocks). One pipeline run is
shared by the tests that read it; they run in file order and the last one changes it."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.cli import main
from loom.core.run_files import NAMES
from loom.pipeline.stages import STAGE_TYPES, STAGES
from loom.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def pipeline_text(corpus: Path, steps: int = 8, extra: str = "", **train: object) -> str:
    """A pipeline on the test corpus: data (512-token tokenizer), a 2-layer model, eval, export."""
    train_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    return f"""
[data]
[[data.sources]]
name = "code"
paths = ["{corpus}/*.py"]
[data.filters]
disable = ["min_words", "mean_word_length", "alpha_words", "symbol_word_ratio", "stop_words",
           "duplicate_lines", "duplicate_line_chars", "duplicate_paragraphs",
           "duplicate_paragraph_chars", "top_2gram_chars", "top_3gram_chars", "top_4gram_chars",
           "duplicate_5gram_chars", "duplicate_6gram_chars", "duplicate_7gram_chars",
           "duplicate_8gram_chars", "duplicate_9gram_chars", "duplicate_10gram_chars"]
[data.dedup]
near = false
[data.output]
val_fraction = 0.1
[data.executor]
workers = 1

[tokenizer]
vocab_size = 512

[pretrain]
config = "{ROOT}/configs/tiny.toml"
[pretrain.model]
vocab_size = 512
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 128
max_seq_len = 128
[pretrain.train]
steps = {steps}
batch_size = 4
micro_batch_size = 0
seq_len = 32
eval_interval = 0
eval_batches = 2
precision = "fp32"
{train_lines}
[pretrain.checkpoint]
interval = 4
[pretrain.metrics]
log_interval = 1
progress = "plain"
tensorboard = false

[eval]
limit = 4
seq_len = 32

[export]
format = "hf"
{extra}"""


def finetune_section(corpus: Path, folder: Path, steps: int, extra: str = "") -> str:
    """A LoRA `[finetune]` stage on prompt/completion pairs from the corpus' module docstrings
    (written to FOLDER/sft.jsonl)."""
    import ast

    pairs = []
    for module in sorted(corpus.glob("*.py")):
        doc = ast.get_docstring(ast.parse(module.read_text()))
        if doc:
            pairs.append({"prompt": f"What is {module.stem}?", "completion": doc[:200]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sft.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return (
        f'\n[finetune]\n[finetune.data]\npath = "sft.jsonl"\n[finetune.train]\nsteps = {steps}\n'
        "batch_size = 2\nseq_len = 64\neval_interval = 0\neval_batches = 1\n"
        '[finetune.metrics]\nprogress = "plain"\ntensorboard = false\n' + extra
    )


def write(folder: Path, text: str, run_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipe.toml"
    path.write_text(f'run_dir = "{run_dir}"\n{text}')
    return path


def stages(run_dir: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((run_dir / "pipeline.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def shared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline file, run folder) of one complete run."""
    tmp = tmp_path_factory.mktemp("pipeline")
    run_dir = tmp / "run"
    path = write(tmp, pipeline_text(corpus_dir), run_dir)
    assert main(["run", str(path)]) == 0
    return path, run_dir


@pytest.mark.slow
def test_a_pipeline_runs_end_to_end(shared: tuple[Path, Path]) -> None:
    _, run_dir = shared
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["name"] for s in state["stages"]] == [
        "data",
        "tokenizer",
        "pretrain",
        "eval",
        "export",
    ]
    for s in state["stages"]:
        assert s["status"] == "done" and s["seconds"] >= 0 and s["dir"] == s["name"]
        assert (run_dir / s["dir"]).is_dir() and len(s["fingerprint"]) == 64
    by = stages(run_dir)
    assert by["data"]["figures"]["documents_kept"] == 40 and by["data"]["figures"]["tokens"] > 0
    assert by["tokenizer"]["figures"]["vocab_size"] == 512
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    pre = by["pretrain"]["figures"]
    assert pre["steps"] == 8 and pre["tokens"] == 8 * 4 * 32
    assert pre["final_loss"] > 0 and pre["final_val_loss"] > 0 and 0 < pre["goodput"] <= 1
    assert by["eval"]["figures"]["data perplexity"] > 1
    assert json.loads((run_dir / "eval" / "eval.jsonl").read_text())["tasks"]["data"]
    assert not (run_dir / "pretrain" / "eval.jsonl").exists()  # the finished stage is as it was
    assert (run_dir / "export" / "config.json").is_file()
    plan = state["plan"]["pretrain"]  # the `loom plan --json` shape the report reads
    assert plan["fits"] and plan["memory_gib"]["total"] > 0 and plan["tokens_per_s"] > 0
    assert (run_dir / "report.html").is_file()


def test_the_pipeline_writes_only_names_that_run_files_defines(shared: tuple[Path, Path]) -> None:
    """A stage folder that is a run (pretrain, eval) and the pipeline folder itself hold only
    loom.core.run_files names (and the pipeline folder its stage folders)."""
    _, run_dir = shared
    top = {p.name for p in run_dir.iterdir()}
    assert top <= NAMES | set(STAGES), sorted(top - NAMES - set(STAGES))
    for stage in ("pretrain", "eval"):
        names = {p.name for p in (run_dir / stage).iterdir()}
        assert names <= NAMES, f"{stage}: not in loom.core.run_files: {sorted(names - NAMES)}"


def test_running_again_skips_every_stage(
    shared: tuple[Path, Path], loom_logs: pytest.LogCaptureFixture
) -> None:
    path, run_dir = shared
    watched = [
        run_dir / "data" / "manifest.json",
        run_dir / "tokenizer" / "tokenizer.json",
        run_dir / "pretrain" / "metrics.jsonl",
        run_dir / "eval" / "eval.jsonl",
        run_dir / "export" / "model.safetensors",
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    assert main(["run", str(path)]) == 0
    assert [p.stat().st_mtime_ns for p in watched] == before
    skipped = [r.getMessage() for r in loom_logs.records if ": skipped (done" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == [
        "stage data",
        "stage tokenizer",
        "stage pretrain",
        "stage eval",
        "stage export",
    ]
    assert all(s["status"] == "done" for s in stages(run_dir).values())


def test_status_prints_every_stage(
    shared: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run_dir = shared
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in ("data", "tokenizer", "pretrain", "eval", "export"):
        assert name in out
    assert out.count("done") == 5 and "final_loss" in out


def test_status_without_a_pipeline_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "pipeline.json does not exist" in capsys.readouterr().err


def test_changing_pretrain_reruns_it_and_what_follows(
    shared: tuple[Path, Path], corpus_dir: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    path, run_dir = shared
    old = stages(run_dir)
    data_mtime = (run_dir / "data" / "manifest.json").stat().st_mtime_ns
    write(path.parent, pipeline_text(corpus_dir, steps=12), run_dir)
    assert main(["run", str(path)]) == 0
    new = stages(run_dir)
    for name in ("data", "tokenizer"):
        assert new[name]["fingerprint"] == old[name]["fingerprint"]
    for name in ("pretrain", "eval", "export"):
        assert new[name]["fingerprint"] != old[name]["fingerprint"]
        assert new[name]["status"] == "done"
    assert new["pretrain"]["figures"]["steps"] == 12
    assert (run_dir / "data" / "manifest.json").stat().st_mtime_ns == data_mtime
    messages = [r.getMessage() for r in loom_logs.records]
    assert sum(": skipped (done" in m for m in messages) == 2
    assert any("stage pretrain: config or inputs changed" in m for m in messages)


def test_adding_a_finetune_stage_reruns_only_what_reads_it(
    shared: tuple[Path, Path], corpus_dir: Path
) -> None:
    """LoRA on prompt/completion pairs from module docstrings; eval and export move to it."""
    path, run_dir = shared
    old = stages(run_dir)
    finetune = finetune_section(corpus_dir, path.parent, steps=3)
    write(path.parent, pipeline_text(corpus_dir, steps=12, extra=finetune), run_dir)
    assert main(["run", str(path)]) == 0
    new = stages(run_dir)
    assert list(new) == ["data", "tokenizer", "pretrain", "finetune", "eval", "export"]
    for name in ("data", "tokenizer", "pretrain"):
        assert new[name]["fingerprint"] == old[name]["fingerprint"]
    for name in ("eval", "export"):
        assert new[name]["fingerprint"] != old[name]["fingerprint"]
    assert new["finetune"]["status"] == "done" and new["finetune"]["figures"]["steps"] == 3
    assert "finetune" in json.loads((run_dir / "pipeline.json").read_text())["plan"]
    assert (run_dir / "export" / "model.safetensors").is_file()  # LoRA merged on export


@pytest.mark.slow
def test_an_interrupted_run_resumes(
    corpus_dir: Path, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    text = pipeline_text(corpus_dir, steps=400).replace("interval = 4", "interval = 20")
    text = text.replace("log_interval = 1", "log_interval = 20")
    path = write(tmp_path, text, run_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = run_dir / "pretrain" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the pretrain stage wrote no checkpoint before the deadline"
    killed = stages(run_dir)
    assert killed["data"]["status"] == "done" and killed["pretrain"]["status"] == "running"
    data_mtime = (run_dir / "data" / "manifest.json").stat().st_mtime_ns

    assert main(["run", str(path)]) == 0
    messages = [r.getMessage() for r in loom_logs.records]
    assert any("stage data: skipped" in m for m in messages)
    assert any("resumed from" in m for m in messages)
    assert (run_dir / "data" / "manifest.json").stat().st_mtime_ns == data_mtime
    done = stages(run_dir)
    assert all(s["status"] == "done" for s in done.values())
    assert done["pretrain"]["figures"]["steps"] == 400


def worker_pids(marker: str) -> list[int]:
    """Processes whose command line names MARKER (a multi-process stage's stage.toml)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_in_next_stage(
    proc: subprocess.Popen, run_dir: Path, killed: list[str], kept: dict[str, Path]
) -> str | None:
    """Watch pipeline.json; mark each finished stage's folder (a stage done again loses its
    folder, and the mark with it); SIGKILL the run in the first running stage not killed in yet
    (a training stage once it has a checkpoint). Returns that stage, or "serve" once serving."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"loom run exited with {proc.returncode} before serving"
        try:
            state = stages(run_dir)
        except (OSError, ValueError):
            time.sleep(0.01)
            continue
        for name, s in state.items():
            if s["status"] == "done" and name not in kept:
                kept[name] = run_dir / name / ".kept"
                kept[name].write_text(name)
        running = [n for n, s in state.items() if s["status"] == "running"]
        if running and running[0] == "serve":
            return "serve"
        if running and running[0] not in killed:
            name = running[0]
            if (
                name in ("pretrain", "finetune")
                and not (run_dir / name / "checkpoints" / "latest").exists()
            ):
                time.sleep(0.01)
                continue
            if name == "pretrain":  # only `loom run` itself: its 2 workers must die with it
                assert len(worker_pids(str(run_dir / name / "stage.toml"))) == 2
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return name
        time.sleep(0.01)
    raise AssertionError("no new stage ran within 300 s")


@pytest.mark.slow
def test_killing_the_run_in_each_stage_redoes_no_finished_stage(
    corpus_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL `loom run` once in each stage it is seen running, then run it again, until it
    serves: finished stages are never run again, training (a 2-process pretrain stage, whose
    workers die with `loom run`; a LoRA fine-tune) resumes from its checkpoints, and the last
    run serves the exported model over the OpenAI API until SIGTERM ends it cleanly."""
    import httpx
    import openai
    from conftest import free_port

    port = free_port()
    serve = f"\n[serve]\nport = {port}\nmax_batch = 4\n"
    finetune = finetune_section(corpus_dir, tmp_path, steps=40)
    finetune += "[finetune.checkpoint]\ninterval = 5\n"
    text = pipeline_text(corpus_dir, steps=60, extra=finetune + serve)
    text = text.replace(
        "[eval]", "[pretrain.launch]\nnproc = 2\n[pretrain.parallel]\ndp_shard = 2\n\n[eval]"
    )
    run_dir = tmp_path / "run"
    path = write(tmp_path, text, run_dir)
    killed: list[str] = []
    kept: dict[str, Path] = {}
    logs = []
    for attempt in range(len(STAGES) + 1):
        log = tmp_path / f"attempt-{attempt}.log"
        logs.append(log)
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loom", "run", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            where = kill_in_next_stage(proc, run_dir, killed, kept)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if where == "serve":
            break
        killed.append(where)
        if where == "pretrain":
            deadline = time.monotonic() + 5  # at once; they would train on for seconds
            while worker_pids(str(run_dir / "pretrain" / "stage.toml")):
                assert time.monotonic() < deadline, "pretrain workers outlived loom run"
                time.sleep(0.1)
    else:
        raise AssertionError(f"never reached serve; killed in {killed}")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the serve stage never became healthy"
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="import os\n", max_tokens=8)
        assert answer.usage.completion_tokens == 8 and answer.choices[0].text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # data, pretrain and fine-tuning take long enough to be caught running every time
    assert {"data", "pretrain", "finetune"} <= set(killed), killed
    final = stages(run_dir)
    assert all(s["status"] == "done" for s in final.values()), final
    for name, mark in kept.items():
        assert mark.is_file(), f"stage {name} was run again after it had finished"
    assert final["pretrain"]["figures"]["steps"] == 60
    assert final["finetune"]["figures"]["steps"] == 40
    after_kill = {w: logs[i + 1].read_text() for i, w in enumerate(killed)}
    for name in ("pretrain", "finetune"):
        assert f"stage {name}: resuming in" in after_kill[name]
        assert "resumed from" in after_kill[name]


def test_dry_run_prints_predictions_and_runs_nothing(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve = "\n[serve]\nport = 8123\n"  # validated, never started
    path = write(tmp_path, pipeline_text(corpus_dir, extra=serve), tmp_path / "unused")
    run_dir = tmp_path / "dry"
    assert main(["run", str(path), f"--run_dir={run_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain:" in out and "predicted peak memory" in out and "tokens/s" in out
    assert "dry run" in out and "serve" in out
    assert not run_dir.exists() and not (tmp_path / "unused").exists()


def test_an_infeasible_plan_stops_before_anything_runs(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = pipeline_text(corpus_dir).replace(
        "[pretrain.model]\nvocab_size = 512\ndim = 64\nn_layers = 2\nn_heads = 4\n"
        "n_kv_heads = 2\nffn_hidden = 128\nmax_seq_len = 128\n",
        '[pretrain.model]\npreset = "llama3-405b"\n',
    )
    path = write(tmp_path, text, tmp_path / "run")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[pretrain]" in err and "predicted to need" in err and "train.force=true" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("", "[pretrian]\n"), "unknown section or key 'pretrian'; did you mean pretrain?"),
        (("tiny.toml", "missing.toml"), "[pretrain] config = "),
        (("[eval]\nlimit = 4", "[eval]\nlimit = 4\nbogus = 1"), "[eval] unknown config key bogus"),
        (("", "[serve]\nport = 0\n"), "[serve] --port 0 must be in 1..65535"),
        (("val_fraction = 0.1", "val_fraction = 0.1\ndir = 'x'"), "output.dir is set"),
    ],
)
def test_bad_config_is_one_error_and_runs_nothing(
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    text = pipeline_text(corpus_dir)
    old, new = change
    text = text + new if not old else text.replace(old, new, 1)
    path = write(tmp_path, text, tmp_path / "run")
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_without_its_input_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'[pretrain]\nconfig = "{ROOT}/configs/tiny.toml"\n', tmp_path / "r")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[pretrain] data.path is not set" in err and "add a [data] section" in err


def test_the_shipped_tiny_pipeline_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/pipeline-tiny.toml (stdlib via ${STDLIB}) validates and fits; nothing runs."""
    config = ROOT / "configs" / "pipeline-tiny.toml"
    assert main(["run", str(config), f"--run_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain:" in out and "200 steps" in out
    assert not (tmp_path / "run").exists()


# -- target hardware ([pretrain.hardware] / [finetune.hardware]) and the shipped examples -----

HARDWARE = '\n[pretrain.hardware]\ngpu = "h100"\ngpus = {gpus}\n'


@pytest.fixture
def raw_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$DATA for configs/pipeline-1b-8gpu.toml: one small file for each source's glob."""
    import zstandard

    data = tmp_path / "raw"
    for name in ("web", "code"):
        (data / name).mkdir(parents=True)
        record = json.dumps({"text": "def f():\n    return 1\n"}).encode() + b"\n"
        (data / name / "part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(record))
    (data / "books").mkdir()
    (data / "books" / "book.txt").write_text("Call me Ishmael.\n")
    monkeypatch.setenv("DATA", str(data))
    return data


def test_the_1b_pipeline_predicts_its_8_gpu_node(
    raw_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run on this CPU machine predicts the 8 × H100 node of [pretrain.hardware]."""
    from loom.pipeline.load import load_pipeline
    from loom.pipeline.predict import predict
    from loom.pipeline.stages.training import TrainingStage

    config = ROOT / "configs" / "pipeline-1b-8gpu.toml"
    run_dir = tmp_path / "run"
    assert main(["run", str(config), f"--run_dir={run_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain:" in out and "8 × h100, from [pretrain.hardware]" in out
    assert "dp 8 (FSDP)" in out and "days" in out and not run_dir.exists()
    pipe = load_pipeline(config, str(run_dir))
    stage = pipe.stage("pretrain")
    assert stage is not None
    assert isinstance(stage, TrainingStage)
    plan = predict(stage, pipe.stages)
    assert plan["fits"] and plan["devices"] == 8 and plan["hardware"]["gpu"] == "h100"
    assert 900e6 < plan["model_params"] < 1.5e9
    assert plan["memory_gib"]["total"] < plan["device_memory_gib"] < 80
    assert 0.5 < plan["train_days"] < 60
    assert 20e9 <= plan["training_tokens"] <= 50e9


def test_the_70b_pipeline_fits_its_64_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """$MODEL is a Llama-3-70B folder (validation reads only its config.json)."""
    model = tmp_path / "llama3-70b"
    model.mkdir()
    llama3_70b = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }
    (model / "config.json").write_text(json.dumps(llama3_70b))
    sft = tmp_path / "sft"
    sft.mkdir()
    pair = json.dumps({"prompt": "What is 2 + 2?", "completion": "4"}) + "\n"
    (sft / "train.jsonl").write_text(pair)
    (sft / "val.jsonl").write_text(pair)
    (sft / "eval.jsonl").write_text(json.dumps({"prompt": "2 + 2 =", "answer": "4"}) + "\n")
    monkeypatch.setenv("MODEL", str(model))
    monkeypatch.setenv("SFT", str(sft))
    config = ROOT / "configs" / "pipeline-70b-64gpu.toml"
    run_dir = tmp_path / "run"
    assert main(["run", str(config), f"--run_dir={run_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "finetune:" in out and "64 × h100, 8 nodes × 8, from [finetune.hardware]" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("finetune:"))
    used, capacity = (float(x) for x in re.findall(r"([\d.]+) GiB", line)[:2])
    assert 70_000 < float(line.split()[1].rstrip("M")) < 71_000  # 70.55B parameters
    assert used < capacity < 80 and not run_dir.exists()


@pytest.mark.slow
def test_the_smollm2_pipeline_fine_tunes_and_serves(
    smollm2_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """configs/pipeline-smollm2.toml as shipped (${SMOLLM2_GGUF} built in, $PYDOC given), with
    2 fine-tuning steps: the dry run predicts its 30 steps; the real run tunes, evaluates,
    exports the merged model and serves it, and the served greedy answer to a chat question is
    `transformers`' greedy answer from the exported folder."""
    import httpx
    import openai
    import transformers
    from conftest import free_port

    pydoc = tmp_path / "pydoc"
    pydoc.mkdir()
    records = [
        {
            "messages": [
                {"role": "user", "content": f"What does {name} do?"},
                {"role": "assistant", "content": doc},
            ]
        }
        for name, doc in (
            ("len", "Return the number of items in a container."),
            ("abs", "Return the absolute value of the argument."),
            ("sum", "Return the sum of a start value and an iterable of numbers."),
        )
    ]
    for name in ("train", "val"):
        (pydoc / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("PYDOC", str(pydoc))
    config = ROOT / "configs" / "pipeline-smollm2.toml"
    run_dir = tmp_path / "run"
    assert main(["run", str(config), f"--run_dir={run_dir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "finetune:" in out and "134.52M parameters" in out and "30 steps" in out
    for name in ("finetune", "eval", "export", "serve"):
        assert f"  {name:<10} run" in out
    assert not run_dir.exists()

    port = free_port()
    command = [sys.executable, "-m", "loom", "run", str(config), f"--run_dir={run_dir}"]
    command += ["--finetune.train.steps=2", "--finetune.train.eval_interval=0"]
    command += ["--finetune.train.batch_size=2", "--eval.limit=2", f"--serve.port={port}"]
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the serve stage never became healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        question = [{"role": "user", "content": "What does len do?"}]
        answer = client.chat.completions.create(
            model="smollm2-135m-pydoc", messages=question, max_tokens=12, temperature=0
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    done = stages(run_dir)
    assert list(done) == ["finetune", "eval", "export", "serve"]
    assert all(s["status"] == "done" for s in done.values())
    assert done["finetune"]["figures"]["steps"] == 2
    assert done["eval"]["figures"]["LICENSE.txt perplexity"] > 1
    # The .gguf was read directly: weights dequantized, tokenizer and chat template rebuilt,
    # the adapters saved for that file. An instruction-tuned model already answers in chat
    # format: a low loss from the first step (a random model of this vocabulary starts near
    # ln 49152 ≈ 10.8).
    tuned = run_dir / "finetune"
    assert (tuned / "tokenizer" / "chat_template.jinja").is_file()
    saved = json.loads((tuned / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(smollm2_gguf.resolve())
    records = [json.loads(x) for x in (tuned / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses) and losses[0] < 4

    export = run_dir / "export"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    expected = tokenizer.decode(greedy, skip_special_tokens=True)
    assert expected.strip()
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == ids.shape[1]


def test_a_stage_for_absent_hardware_stops_before_anything_runs(
    raw_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import loom.pipeline.run as pipeline

    ran: list[str] = []
    for stage_type in STAGE_TYPES.values():
        monkeypatch.setattr(stage_type, "run", lambda stage: ran.append(stage.name) or {})
    monkeypatch.setattr(pipeline, "local_gpus", lambda: [])
    run_dir = tmp_path / "run"
    config = ROOT / "configs" / "pipeline-1b-8gpu.toml"
    assert main(["run", str(config), f"--run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "[pretrain] hardware asks for 8 × h100; this machine has no GPU" in err
    assert "run it there, or remove [pretrain.hardware] to run here" in err
    assert ran == [] and not run_dir.exists()  # not even the data stage before it


@pytest.mark.slow
def test_a_stage_on_its_target_hardware_runs_and_records_the_plan(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two H100s here (pretended), the two-GPU stage trains on two worker processes, as
    `loom train --nproc 2` would; pipeline.json's plan is the H100s' (the workers train on
    this machine's CPU)."""
    import loom.pipeline.run as pipeline

    monkeypatch.setattr(pipeline, "local_gpus", lambda: ["NVIDIA H100 80GB HBM3"] * 2)
    text = pipeline_text(data_dir, steps=2)
    text = text[text.index("[pretrain]") : text.index("[eval]")]
    text += f'[pretrain.data]\npath = "{data_dir}"\n' + HARDWARE.format(gpus=2)
    text += "[pretrain.parallel]\ndp_shard = 2\n"
    text = text.replace('precision = "fp32"', 'precision = "fp32"\ndevice = "cpu"')
    run_dir = tmp_path / "run"
    assert main(["run", str(write(tmp_path, text, run_dir))]) == 0
    state = json.loads((run_dir / "pipeline.json").read_text())
    plan = state["plan"]["pretrain"]
    assert plan["hardware"] == {"gpu": "h100", "gpus": 2, "nodes": 1, "gpu_mem_gb": 0.0} | {
        "planner_gpu": "h100"
    }
    assert plan["devices"] == 2 and plan["device_memory_gib"] == 74.506
    assert stages(run_dir)["pretrain"]["status"] == "done"
    assert stages(run_dir)["pretrain"]["figures"]["steps"] == 2
    # the config the workers read, and the progress note each of the two ranks kept
    assert (run_dir / "pretrain" / "stage.toml").is_file()
    notes = sorted(p.name for p in (run_dir / "pretrain" / ".ranks").iterdir())
    assert notes == ["rank-0.json", "rank-1.json"]
    for record in read_metrics(run_dir / "pretrain"):  # memory per rank, for the report
        ranks = record["peak_mem_gib_per_rank"]
        assert len(ranks) == 2 and min(ranks) > 0 and record["peak_mem_gib"] == max(ranks)
    report = (run_dir / "report.html").read_text()
    assert "peak_mem_gib rank 0" in report and "peak_mem_gib rank 1" in report


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (HARDWARE.format(gpus=8) + "node = 1\n", "[pretrain.hardware] unknown config key node"),
        ('\n[pretrain.hardware]\ngpu = "tpu-v5"\ngpus = 8\n', "[pretrain.hardware] hardware.gpu"),
        ("\n[pretrain.hardware]\ngpus = 8\n", '[pretrain.hardware] gpu is not set; add gpu = "'),
        (HARDWARE.format(gpus=12) + "nodes = 8\n", "must be a positive multiple of nodes"),
        (
            HARDWARE.format(gpus=8) + "[pretrain.parallel]\ntp = 3\n",
            "[pretrain] on [pretrain.hardware] (8 × h100): 8 processes do not split",
        ),
        (
            HARDWARE.format(gpus=8) + "[pretrain.parallel]\nauto = true\n",
            "parallel.auto picks a layout for the machine it runs on",
        ),
        (
            HARDWARE.format(gpus=8) + "[pretrain.launch]\nnproc = 2\n",
            "[pretrain.launch] nproc = 2 but [pretrain.hardware] gpus = 8",
        ),
        ("\n[pretrain.launch]\nnproc = -1\n", "[pretrain.launch] nproc = -1, max_restarts = 0"),
        ("\n[pretrain.launch]\nprocs = 2\n", "[pretrain.launch] unknown config key procs"),
        (
            "\n[pretrain.launch]\nnproc = 3\n",
            "[pretrain] on 3 processes ([pretrain.launch] nproc) train.micro_batch_size=4 "
            "sequences do not split over 3 data-parallel ranks",
        ),
    ],
)
def test_a_bad_hardware_table_is_one_error(
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    table: str,
    message: str,
) -> None:
    path = write(tmp_path, pipeline_text(corpus_dir) + table, tmp_path / "run")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_every_registered_stage_is_a_stage_of_its_name() -> None:
    """The registry is the one place a stage's name, resumability and run live."""
    for name, stage_type in STAGE_TYPES.items():
        assert stage_type.name == name
        for method in ("load", "run", "identity"):
            assert callable(getattr(stage_type, method)), (name, method)
    resumable = {n for n, t in STAGE_TYPES.items() if t.resumable}
    assert resumable == {"data", "pretrain", "finetune", "align"}  # the module docstring's promise
    assert {n for n, t in STAGE_TYPES.items() if t.repeats} == {"serve"}
