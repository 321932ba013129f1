"""Config: TOML + overrides into typed dataclasses; bad values rejected with the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loom.core.config import config_to_dict, load_config, save_config
from loom.core.errors import LoomError

REPO = Path(__file__).resolve().parents[1]


def test_toml_then_overrides_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'run_dir = "r"\n[model]\npreset = "tiny"\nn_layers = 3\n'
        '[train]\nsteps = 5\nprecision = "bf16"\n'
    )
    cfg = load_config(
        path, ["--train.steps=1e3", "--optimizer.lr=0.01", "--train.compile=true", "--data.path=d"]
    )
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == 0.01 and cfg.train.compile is True
    assert cfg.train.precision == "bf16" and cfg.data.path == "d" and cfg.run_dir == "r"
    assert cfg.model.n_layers == 3 and cfg.model.dim == 256  # rest from the preset


def test_preset_selects_architecture() -> None:
    cfg = load_config(None, ["--model.preset=smollm2-135m"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.tie_embeddings) == (576, 30, True)
    assert cfg.model.num_params() == 134_515_008


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "tiny.toml",
        ["--model.rope_scaling.factor=4", "--run_dir=x", "--data.path=y"],
    )
    save_config(cfg, tmp_path / "resolved.toml")
    again = load_config(tmp_path / "resolved.toml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.model.rope_scaling is not None and again.model.rope_scaling.factor == 4.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.stepz=3"], "unknown config key train.stepz; did you mean train.steps?"),
        (["--nonsense.key=1"], "unknown config key nonsense"),
        (["--train.steps=abc"], "train.steps must be an integer, got 'abc'"),
        (["--train.steps=1.5"], "train.steps must be an integer"),
        (["--train.compile=maybe"], "train.compile must be true or false"),
        (["--train.precision=fp16"], "train.precision must be one of fp32, bf16; got 'fp16'"),
        (
            ["--train.micro_batch_size=3"],
            "train.micro_batch_size=3 must divide train.batch_size=8; use one of [1, 2, 4, 8]",
        ),
        (["--train.steps=0"], "train.steps=0 must be greater than 0"),
        (["--model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=8"),
        (["--model.dim=250"], "model.dim=250 is not divisible by model.n_heads=8"),
        (["--model.preset=gpt9"], "unknown preset 'gpt9'; choose one of tiny"),
        (["--train.seq_len=4096"], "train.seq_len=4096 exceeds model.max_seq_len=1024"),
        (
            ["--optimizer.decay_steps=10", "--train.steps=20"],
            "optimizer.decay_steps=10 is shorter than train.steps=20",
        ),
        (["train.steps=3"], "must look like --section.key=value"),
        (["--memory.host_budget_gb=2"], "set memory.offload_dir=PATH with it"),
        (
            ["--memory.offload=optimizer", f"--memory.offload_dir={__file__}/tier"],
            f"memory.offload_dir='{__file__}/tier': {__file__} is not a folder",
        ),
        (["--memory.offload_dir=/tmp/x"], "needs memory.offload=optimizer"),
    ],
)
def test_bad_values_name_key_and_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(LoomError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_toml_type_errors_and_bad_files(tmp_path: Path) -> None:
    bad_type = tmp_path / "t.toml"
    bad_type.write_text('[train]\nsteps = "ten"\n')
    with pytest.raises(LoomError, match="train.steps must be an integer, got 'ten'"):
        load_config(bad_type)
    bool_as_int = tmp_path / "b.toml"
    bool_as_int.write_text("[train]\nsteps = true\n")
    with pytest.raises(LoomError, match="train.steps must be an integer"):
        load_config(bool_as_int)
    model_as_value = tmp_path / "m.toml"
    model_as_value.write_text("model = 3\n")
    with pytest.raises(LoomError, match="model must be a section"):
        load_config(model_as_value)
    section_as_value = tmp_path / "s.toml"
    section_as_value.write_text("train = 3\n")
    with pytest.raises(LoomError, match="train must be a section"):
        load_config(section_as_value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3\n")
    with pytest.raises(LoomError, match=r"broken.toml is not valid TOML.*line 1"):
        load_config(broken)
    with pytest.raises(LoomError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_optional_none_survives_the_resolved_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["--model.preset=llama3.1-8b", "--model.rope_scaling=none"])
    assert cfg.model.rope_scaling is None
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml").model.rope_scaling is None


@pytest.mark.parametrize(
    "override", ["--optimizer.lr=nan", "--optimizer.grad_clip=inf", "--model.norm_eps=nan"]
)
def test_non_finite_numbers_are_refused(override: str) -> None:
    with pytest.raises(LoomError, match="must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optimizer.eps=-1", "optimizer.eps=-1.0 must be greater than 0"),
        ("--model.init_std=-1", "model.init_std=-1.0 must not be negative"),
    ],
)
def test_negative_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(LoomError, match=re.escape(message)):
        load_config(None, [override])
