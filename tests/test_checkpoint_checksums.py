"""Checksums of checkpoint files: a byte flipped on disk inside a shard (same size, so DCP's
own metadata check passes) is named by `verify`, and a run resuming from that folder falls back
to the previous checkpoint and trains exactly as if it had resumed from there."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_launch import args, finish, loom_train

from loom.core.checkpoint import CHECKSUMS_FILE, file_checksum, verify
from loom.core.errors import LoomError
from loom.models.sources import find_checkpoint
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

MakeConfig = Callable[..., object]
# The same LR schedule whether a run stops at step 8 or goes on to 12.
SCHEDULE = ("--optimizer.decay_steps=12", "--checkpoint.keep=10")


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}  # a re-run step: its last loss


def assert_checksums_cover_every_file(folder: Path) -> None:
    listed = json.loads((folder / CHECKSUMS_FILE).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {CHECKSUMS_FILE}
    assert set(listed) == on_disk  # no part files left, nothing unlisted
    assert {".metadata", "trainer.json", "rng.pt"} <= on_disk
    assert any(name.endswith(".distcp") for name in on_disk)
    for name, record in listed.items():
        assert record == file_checksum(folder / name)


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_every_file_of_a_checkpoint_gets_a_checksum(
    tiny_config: MakeConfig, tmp_path: Path, async_save: str
) -> None:
    Trainer(tiny_config("--train.steps=4", f"--checkpoint.async={async_save}")).run()
    folder = tmp_path / "run" / "checkpoints" / "step-4"
    assert_checksums_cover_every_file(folder)
    assert verify(folder) is None


@pytest.mark.slow
def test_flipped_byte_is_named_and_resume_falls_back_to_the_previous_checkpoint(
    tiny_config: MakeConfig, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    straight = tmp_path / "straight"
    Trainer(tiny_config("--train.steps=12", *SCHEDULE, run_dir=straight)).run()

    run_dir = tmp_path / "run"
    Trainer(tiny_config("--train.steps=8", *SCHEDULE, run_dir=run_dir)).run()
    step8 = run_dir / "checkpoints" / "step-8"
    (shard,) = step8.glob("*.distcp")
    size = shard.stat().st_size
    flip_middle_byte(shard)
    assert shard.stat().st_size == size
    problem = verify(step8)
    assert problem is not None and problem.startswith(f"{shard.name} is corrupt"), problem
    # Without its checksums the same folder passes: DCP alone does not see the flip.
    unchecked = tmp_path / "unchecked"
    shutil.copytree(step8, unchecked)
    (unchecked / CHECKSUMS_FILE).unlink()
    assert verify(unchecked) is None
    # Given to generate / convert / finetune: the damaged folder is named, the run folder
    # gives the newest complete one.
    with pytest.raises(LoomError, match=rf"checkpoint {step8} is not usable \({shard.name} is"):
        find_checkpoint(step8)
    assert find_checkpoint(run_dir) == (run_dir / "checkpoints" / "step-4", run_dir)

    Trainer(tiny_config("--train.steps=12", *SCHEDULE, run_dir=run_dir)).run()
    assert f"checkpoint {step8} is not usable ({shard.name} is corrupt" in loom_logs.text
    assert "resuming from" in loom_logs.text and "step-4, the newest complete" in loom_logs.text
    # Steps 5-12 trained again from step 4: the same losses as the run that never stopped.
    assert losses(run_dir) == losses(straight)
    assert verify(step8) is None  # written again by the resumed run


def test_checkpoint_without_checksums_still_loads(
    tiny_config: MakeConfig, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    Trainer(tiny_config("--train.steps=4", *SCHEDULE)).run()
    step4 = tmp_path / "run" / "checkpoints" / "step-4"
    (step4 / CHECKSUMS_FILE).unlink()  # as written before checksums existed
    assert verify(step4) is None
    Trainer(tiny_config("--train.steps=5", *SCHEDULE)).run()
    assert "not usable" not in loom_logs.text
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "checkpoints" / "step-5" / CHECKSUMS_FILE).is_file()


@pytest.mark.slow
def test_each_rank_checksums_its_own_shard_under_torchrun(data_dir: Path, tmp_path: Path) -> None:
    """Two ranks, async saves (their own process group): rank 1's shard is in checksums.json,
    and a byte flipped in it is named."""
    run_dir = tmp_path / "run"
    launch = loom_train("--nproc", "2", *args(data_dir, run_dir, "--checkpoint.async=true"))
    code, err = finish(launch)
    assert code == 0, err[-3000:]
    last = run_dir / "checkpoints" / "step-6"
    assert_checksums_cover_every_file(last)
    shard = last / "__1_0.distcp"  # DCP's name for rank 1's first shard file
    assert shard.stat().st_size > 0
    assert verify(last) is None
    flip_middle_byte(shard)
    problem = verify(last)
    assert problem is not None and problem.startswith("__1_0.distcp is corrupt"), problem
