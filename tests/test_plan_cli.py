"""`loom plan` as a user runs it: the spec file and the flags read the same way, every unknown
key of a spec is refused by name, optimizer offload is offered for Loom only once loom train
runs it, and the command never imports torch (it answers in a fraction of a second)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loom.cli import EXIT_BAD_INPUT, main
from loom.core.config import load_config
from loom.core.errors import LoomError
from loom.planner.published import DEFAULT_RECORDS, load_records, record_spec
from loom.planner.search import plan
from loom.planner.spec import memory_refusal, parse_spec

REPO = Path(__file__).resolve().parents[1]
FLAGS_405B = [
    "--model",
    "llama3-405b",
    "--gpu",
    "h100",
    "--gpus",
    "16384",
    "--seq-len",
    "8192",
    "--global-batch-tokens",
    "16e6",
    "--tokens",
    "15.6e12",
]
SPEC_405B = {
    "model": "llama3-405b",
    "hardware": {"gpu": "h100", "n_gpus": 16384},
    "training": {"tokens": 15.6e12, "seq_len": 8192, "global_batch_tokens": 16e6},
}


def plan_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_plan_never_imports_torch_in_a_real_process() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loom", "plan", *FLAGS_405B, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "loom.planner.spec" in imported and "loom.planner.search" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    answer = json.loads(done.stdout)
    assert answer["devices"] == 16384 and answer["best"]["strategy"]["global_batch"] == 2048


def test_spec_training_keys_give_the_flags_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, from_flags, _ = plan_cli(capsys, *FLAGS_405B, "--json")
    assert code == 0
    code, from_spec, _ = plan_cli(capsys, "--spec", write_spec(tmp_path, SPEC_405B), "--json")
    assert code == 0
    assert json.loads(from_spec) == json.loads(from_flags)
    best = json.loads(from_spec)["best"]
    assert best["strategy"]["global_batch"] == 2048  # 16e6 tokens of 8192, to a multiple of 256
    assert best["train_days"] > 0
    code, table, _ = plan_cli(capsys, "--spec", write_spec(tmp_path, SPEC_405B))
    assert code == 0 and "seq 8192" in table and "days" in table


def test_training_seq_len_sets_a_preset_s_sequence_and_batch_follows_it() -> None:
    spec = parse_spec(
        {
            "model": {"preset": "llama3-8b"},
            "hardware": {"gpu": "h100", "n_gpus": 8},
            "strategy": {"tp": 1, "micro_batch": 1},
            "training": {"seq_len": 2048, "global_batch_tokens": 2**20},
        }
    )
    assert spec.model.seq_len == 2048
    assert spec.strategy is not None and spec.strategy.global_batch == 512
    searched = parse_spec({**SPEC_405B, "search": {"finetune": "full", "cp": 2}})
    assert searched.base.global_batch == 2048 and "global_batch" in searched.fixed
    assert searched.base.cp == 2 and "cp" in searched.fixed
    assert searched.base.finetune == "full" and searched.training_tokens == 15.6e12


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {**SPEC_405B, "trainng": {}},
            "spec.trainng is not a known key; known: model, hardware, strategy, search, training",
        ),
        (
            {**SPEC_405B, "training": {"global_batch_tokns": 16e6}},
            "spec.training.global_batch_tokns is not a known key; known: tokens, seq_len, "
            "global_batch_tokens",
        ),
        (
            {**SPEC_405B, "model": {"layers": 2, "hidden": 64, "heads": 4, "hiden": 64}},
            "spec.model.hiden is not a known key; known: preset, layers, hidden, heads, "
            "kv_heads, ffn_hidden, vocab, seq_len, arch, tied, head_dim",
        ),
        (
            {**SPEC_405B, "hardware": {"gpu": "h100", "n_gpus": 8, "gpu_mem": 80}},
            "spec.hardware.gpu_mem is not a known key; known: gpu, n_gpus, peak_tflops, "
            "gpus_per_node, gpu_mem_gb, intra_node_gbps, inter_node_gbps, host_mem_gb, "
            "host_link_gbps",
        ),
        (
            {**SPEC_405B, "strategy": {"tp": 8, "zero": 3}},
            "spec.strategy.zero is not a known key; known: tp, pp, dp, cp, sp, zero_stage,",
        ),
        (
            {**SPEC_405B, "search": {"tp": 8}},
            "spec.search.tp is not a known key; known: cp, micro_batch, recompute,",
        ),
    ],
)
def test_every_unknown_key_is_one_error_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], message: str
) -> None:
    code, out, err = plan_cli(capsys, "--spec", write_spec(tmp_path, spec))
    assert code == EXIT_BAD_INPUT and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {**SPEC_405B, "model": {"preset": "llama3-405b", "seq_len": 4096}},
            "spec.model.seq_len=4096 and spec.training.seq_len=8192 disagree",
        ),
        (
            {**SPEC_405B, "model": {"preset": "llama3-405b", "layers": 10}},
            "spec.model.layers is not used with spec.model.preset",
        ),
        (
            {**SPEC_405B, "strategy": {"tp": 8, "pp": 16, "global_batch": 1024}},
            "spec.strategy.global_batch=1024 and spec.training.global_batch_tokens=1.6e+07 "
            "(2048 sequences of 8192) disagree",
        ),
        (
            {**SPEC_405B, "training": {"global_batch_tokens": -1}},
            "spec.training.global_batch_tokens must be a positive number",
        ),
        (
            {**SPEC_405B, "training": {"seq_len": 81.5}},
            "spec.training.seq_len must be a whole number",
        ),
        (
            {**SPEC_405B, "strategy": {"tp": 8}, "search": {"finetune": "full"}},
            "gives both strategy (a fixed layout) and search",
        ),
    ],
)
def test_contradictory_specs_say_what_to_fix(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(LoomError) as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_model_head_dim_is_read() -> None:
    shape = {"layers": 2, "hidden": 96, "heads": 4, "ffn_hidden": 256, "seq_len": 128}
    spec = parse_spec(
        {"model": {**shape, "head_dim": 32}, "hardware": {"gpu": "h100", "n_gpus": 1}}
    )
    assert spec.model.head_dim == 32 and spec.model.q_dim == 128


def test_published_records_drop_their_descriptive_keys_before_parsing() -> None:
    records = load_records(DEFAULT_RECORDS)
    record = records["meg21_T1_145.6B"]
    assert "params_stated" in record["model"] or "params" in record["model"]
    spec = record_spec(record)
    assert spec.model.layers == record["model"]["layers"]
    with pytest.raises(LoomError, match="is not a known key"):
        parse_spec({"model": record["model"], "hardware": {"gpu": "a100", "n_gpus": 8}})


# -- optimizer offload: offered for Loom exactly when loom train's config accepts it; PyTorch
# FSDP offloads all states together; Megatron / DeepSpeed runs offload the optimizer alone.

SEVENTY_B_ON_FOUR_4090 = {
    "model": {"preset": "llama3-70b", "seq_len": 1024},
    "hardware": {"gpu": "rtx4090", "n_gpus": 4},
}


def test_optimizer_offload_for_loom_follows_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", "llama3-8b", "--gpu", "h100", "--gpus", "8", "--seq-len", "1024"]
    flags += ["--offload", "optimizer", "--recompute", "full"]
    refusal = memory_refusal("optimizer", False, False)
    code, _, err = plan_cli(capsys, *flags)
    if refusal:  # loom train does not run it: refused, and planned only with --unbuilt
        assert code == EXIT_BAD_INPUT and "does not run this offload tier yet" in err
        with pytest.raises(LoomError, match="memory.offload=optimizer"):
            load_config(None, ["--memory.offload=optimizer"])
        code, _, _ = plan_cli(capsys, *flags, "--unbuilt")
    else:
        load_config(None, ["--memory.offload=optimizer"])
    assert code == 0
    code, _, err = plan_cli(capsys, *flags, "--framework", "pytorch")
    assert code == EXIT_BAD_INPUT and "PyTorch FSDP offloads all states together" in err
    code, _, _ = plan_cli(capsys, *flags, "--framework", "megatron")
    assert code == 0


def test_search_offloads_params_for_loom_lora_and_optimizer_for_megatron() -> None:
    raw = {**SEVENTY_B_ON_FOUR_4090, "search": {"finetune": "lora", "global_batch": 8}}
    _, loom_ranked = plan(parse_spec(raw))
    # LoRA's frozen fp32 base is what does not fit: only FSDP's params tier moves it.
    assert loom_ranked and {p.strategy.offload for p in loom_ranked} == {"params"}
    pretrain_70b_on_4 = {
        "model": {"preset": "llama3-70b", "seq_len": 2048},
        "hardware": {"gpu": "h100", "n_gpus": 4},
        "search": {"framework": "megatron"},
    }
    _, megatron_ranked = plan(parse_spec(pretrain_70b_on_4))
    assert {p.strategy.offload for p in megatron_ranked} == {"optimizer"}
