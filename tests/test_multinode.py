"""Multi-node on one box: each "node" is its own `loom torchrun` agent in its own session and
folder, the agents meeting through torchrun's c10d rendezvous on 127.0.0.1. The run folder
(checkpoints, metrics) is shared, as a multi-node job's must be; each node's folder holds its
agent's working directory and log.

The torchrun behaviour these tests rely on (torch 2.13, gloo, observed here):
- The c10d rendezvous store lives in the agent that hosts it; `--rdzv-conf is_host=1` on node 0
  and `is_host=0` on the others makes that node 0 (otherwise the first agent to bind the port).
  The nodes killed here are never node 0: without the store no agent can meet again.
- Group ranks come from the rendezvous, sorted by (host name, agent pid), not from
  `--node-rank`, which torchrun ignores for c10d (it warns "node_rank is only used for static
  rdzv_backend"); so no test passes it. Data-parallel ranks hold no state of their own, so
  which node is rank 0 changes nothing.
- A worker whose peer node dies fails its collective at once ("Connection closed by peer") and
  exits; its agent, with a restart left (`--max-restarts`), stops its workers and waits in a
  new rendezvous round. A fresh agent started with the same endpoint and id joins that round,
  and every worker resumes from the newest complete checkpoint. With no restart left the agent
  exits non-zero.
- With `--nnodes MIN:MAX`, the round after a node is lost completes with the nodes left once
  there are MIN of them and `last_call_timeout` has passed.
- The agent starts its workers in sessions of their own, so killing a node means the agent's
  process group and its workers' (each worker would also die with its agent: die_with_launcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_pipeline import HARDWARE, pipeline_text, stages, write
from test_resilience import CONFIG, SEQ, STEPS, args, launch, losses, reference, small_data

from loom.cli import main
from loom.core.config import load_config
from loom.data.loader import TokenLoader
from loom.data.shards import TokenDataset
from loom.train.metrics import read_metrics

__all__ = ["reference", "small_data"]  # module fixtures of test_resilience, used here

WAIT_S = 300  # a guard against a hang, not a speed check

Nodes = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Start node agents: `start(node, nnodes, port, data, run_dir, *overrides, ...)`; every agent
    still running at the end of the test is killed with its workers."""
    started: list[subprocess.Popen[str]] = []

    def start(
        node: int,
        nnodes: str,
        port: int,
        data: Path,
        run_dir: Path,
        *overrides: str,
        faults: str = "",
        max_restarts: int = 1,
    ) -> subprocess.Popen[str]:
        folder = tmp_path / f"node-{node}"
        folder.mkdir(exist_ok=True)
        conf = f"is_host={int(node == 0)},last_call_timeout=1"
        torchrun = [
            *("--nnodes", nnodes, "--nproc-per-node", "1", "--max-restarts", str(max_restarts)),
            *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
            *("--rdzv-id", "job", "--rdzv-conf", conf, "--monitor-interval", "0.5"),
        ]
        worker = ["-m", "loom.train", str(CONFIG), *args(data, run_dir)]
        with (folder / "agent.log").open("a") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "loom.cli", "torchrun", *torchrun, *worker, *overrides],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=os.environ | {"LOOM_FAULTS": faults},
                start_new_session=True,
                text=True,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its workers die with it (die_with_launcher)
        process.wait()


LoomNode = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def loom_node(tmp_path: Path) -> Iterator[LoomNode]:
    """Run `loom ARGV` as node N: `start(node, *argv)`, in `node-N/` with its output in
    `node-N/agent.log`, in a session of its own; killed with its children at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(node: int, *argv: str) -> subprocess.Popen[str]:
        folder = tmp_path / f"node-{node}"
        folder.mkdir(exist_ok=True)
        with (folder / "agent.log").open("a") as out:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "loom.cli", *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=folder,
                    start_new_session=True,
                    text=True,
                )
            )
        return started[-1]

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_exit(agent: subprocess.Popen[str], log: Path, what: str) -> int:
    try:
        return agent.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not exit: {log.read_text()[-4000:]}") from None


def workers_at(run_dir: Path, step: int, ranks: int, agents: list[subprocess.Popen[str]]) -> None:
    """Wait until `ranks` workers have started `step` (from the trainer's rank notes)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        steps = []
        for note in (run_dir / ".ranks").glob("rank-*.json"):
            with contextlib.suppress(OSError, ValueError):
                steps.append(json.loads(note.read_text())["step"])
        if sum(s >= step for s in steps) >= ranks:
            return
        assert all(a.poll() is None for a in agents), f"an agent exited before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"the workers never reached step {step}")


def kill_node(agent: subprocess.Popen[str], run_dir: Path) -> int:
    """SIGKILL a node: its agent's process group and its worker's; returns the worker's pid."""
    worker = worker_of(agent, run_dir)
    os.killpg(agent.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker, signal.SIGKILL)
    agent.wait(timeout=WAIT_S)
    return worker


def worker_of(agent: subprocess.Popen[str], run_dir: Path) -> int:
    """The pid of the agent's worker, among those of the rank notes."""
    pids = [int(json.loads(n.read_text())["pid"]) for n in (run_dir / ".ranks").glob("*.json")]
    (worker,) = [pid for pid in pids if _stat(pid)[1] == str(agent.pid)]
    return worker


def _stat(pid: int) -> list[str]:
    """State and parent pid, the fields after the command name in /proc/PID/stat."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return ["X", "0"]


def gone(pid: int) -> None:
    """Wait for a process to exit (reaped or a zombie)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if _stat(pid)[0] in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still running: its peer node's death went unnoticed")


def seen(run_dir: Path, world: Callable[[int], int]) -> list[tuple[int, int]]:
    """The samples each step trained on, its ranks' shares in rank order (the last record of a
    step and rank wins: a resumed run trains the steps after its checkpoint again)."""
    shares: dict[tuple[int, int], list[list[int]]] = {}
    for log in (run_dir / "samples").glob("rank-*.jsonl"):
        rank = int(log.stem.split("-")[1])
        for line in log.read_text().splitlines():
            record = json.loads(line)
            shares[record["step"], rank] = record["samples"]
    assert sorted({step for step, _ in shares}) == list(range(1, STEPS + 1))
    return [
        (split, index)
        for step in range(1, STEPS + 1)
        for rank in range(world(step))
        for split, index in shares[step, rank]
    ]


def assert_each_sample_once(data: Path, run_dir: Path, samples: list[tuple[int, int]]) -> None:
    """The samples are the uninterrupted loader's stream, every sample once per epoch."""
    cfg = load_config(CONFIG, args(data, run_dir))
    loader = TokenLoader(TokenDataset(data).split("train"), SEQ, cfg.train.seed)
    assert samples == [tuple(p) for p in loader.next_indices(len(samples)).tolist()]
    per_epoch = loader.num_samples[0]
    assert per_epoch < len(samples)  # the run crosses an epoch boundary
    for start in range(0, len(samples) - per_epoch + 1, per_epoch):
        assert sorted(i for _, i in samples[start : start + per_epoch]) == list(range(per_epoch))


def resumed_steps(logs: list[Path]) -> list[int]:
    """The steps each start resumed from, as rank 0 logged them (whichever node it was on)."""
    text = "".join(log.read_text() for log in logs)
    return sorted(int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", text))


@pytest.mark.slow
def test_two_nodes_train_like_two_local_processes(
    nodes: Nodes, small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    port = free_port()
    agents = [nodes(node, "2", port, small_data, run_dir) for node in (0, 1)]
    for node, agent in enumerate(agents):
        log = tmp_path / f"node-{node}" / "agent.log"
        assert wait_exit(agent, log, f"node {node}") == 0, log.read_text()[-4000:]
    assert losses(run_dir) == reference  # bit for bit: the same dp_shard 2 layout
    state = json.loads((run_dir / "checkpoints" / "latest" / "trainer.json").read_text())
    assert state["layout"] == "dp_shard 2"


@pytest.mark.slow
def test_pipeline_stages_on_two_nodes_train_like_one_node(
    nodes: Nodes, small_data: Path, tmp_path: Path
) -> None:
    """`--parallel.pp=2`, one pipeline stage per node: activations and gradients cross the
    nodes' link; the losses are those of the same layout in one `loom train --nproc 2`."""
    pp = ("--parallel.pp=2", "--parallel.dp_shard=1", "--train.steps=8")
    local = tmp_path / "local"
    launch(small_data, local, *pp)
    run_dir, port = tmp_path / "run", free_port()
    agents = [nodes(node, "2", port, small_data, run_dir, *pp) for node in (0, 1)]
    for node, agent in enumerate(agents):
        log = tmp_path / f"node-{node}" / "agent.log"
        assert wait_exit(agent, log, f"node {node}") == 0, log.read_text()[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, 9))
    assert losses(run_dir) == losses(local)
    state = json.loads((run_dir / "checkpoints" / "latest" / "trainer.json").read_text())
    assert state["layout"] == "pp 2"


@pytest.mark.slow
def test_a_killed_node_comes_back_and_training_matches_the_uninterrupted_run(
    nodes: Nodes, small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    """Node 1 is killed twice. The first time node 0's agent has a restart left: its worker
    exits, the agent waits, and node 1's new agent joins it. The second time node 0's agent has
    none: it exits, and both nodes are started again. Node 1's worker is held at the start of
    step 7 (then 11) by a `hang` fault, so each kill comes after a checkpoint (interval 4) and
    before the next."""
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node-{node}" / "agent.log" for node in (0, 1)]
    node0 = nodes(0, "2", port, small_data, run_dir)
    node1 = nodes(1, "2", port, small_data, run_dir, faults="hang@7")
    workers_at(run_dir, 7, 2, [node0, node1])
    node0_worker = worker_of(node0, run_dir)
    kill_node(node1, run_dir)
    gone(node0_worker)  # the survivor's worker noticed and exited; its agent waits for node 1
    assert node0.poll() is None, logs[0].read_text()[-4000:]
    assert re.search(r"rank \d failed in step 7: .*Connection closed by peer", logs[0].read_text())

    # A new agent for node 1; its worker is in attempt 0, so its fault fires again.
    node1 = nodes(1, "2", port, small_data, run_dir, faults="hang@11")
    workers_at(run_dir, 11, 2, [node0, node1])
    kill_node(node1, run_dir)
    code = wait_exit(node0, logs[0], "node 0, with no restart left,")
    assert code != 0
    assert re.search(r"rank \d failed in step 11: .*Connection closed by peer", logs[0].read_text())

    # The job started again, on the same endpoint.
    agents = [nodes(node, "2", port, small_data, run_dir) for node in (0, 1)]
    for node, agent in enumerate(agents):
        assert wait_exit(agent, logs[node], f"node {node}") == 0, logs[node].read_text()[-4000:]
    assert resumed_steps(logs) == [4, 8]  # node 0's restart, then the new start
    assert losses(run_dir) == reference
    assert_each_sample_once(small_data, run_dir, seen(run_dir, lambda step: 2))


@pytest.mark.slow
def test_elastic_job_shrinks_from_three_nodes_to_two(
    nodes: Nodes, small_data: Path, tmp_path: Path
) -> None:
    """`--nnodes 2:3`: node 2 is killed in step 7; nodes 0 and 1 meet again without it and
    continue from step 4, resharding the checkpoint of 3 data-parallel ranks onto 2."""
    run_dir, port = tmp_path / "run", free_port()
    batch = ("--train.batch_size=12", "--train.micro_batch_size=12")  # splits over 3 and 2
    node0, node1 = (nodes(node, "2:3", port, small_data, run_dir, *batch) for node in (0, 1))
    node2 = nodes(2, "2:3", port, small_data, run_dir, *batch, faults="hang@7")
    workers_at(run_dir, 7, 3, [node0, node1, node2])
    kill_node(node2, run_dir)
    logs = [tmp_path / f"node-{node}" / "agent.log" for node in (0, 1)]
    for node, agent in enumerate((node0, node1)):
        assert wait_exit(agent, logs[node], f"node {node}") == 0, logs[node].read_text()[-4000:]
    assert resumed_steps(logs) == [4]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    layouts = {
        step: json.loads((run_dir / "checkpoints" / f"step-{step}" / "trainer.json").read_text())[
            "layout"
        ]
        for step in (4, STEPS)
    }
    assert layouts == {4: "dp_shard 3", STEPS: "dp_shard 2"}
    samples = seen(run_dir, lambda step: 3 if step <= 4 else 2)
    assert len(samples) == STEPS * 12
    assert_each_sample_once(small_data, run_dir, samples)


@pytest.mark.slow
def test_a_straggler_node_is_excluded_and_the_job_goes_on_without_it(
    nodes: Nodes, small_data: Path, tmp_path: Path
) -> None:
    """`--nnodes 2:3` with `resilience.straggler_action=exclude`; rank 2 (node 2's worker)
    computes 4 times slower from step 3. Once it has been slow for 2 log intervals every rank
    saves a checkpoint and stops, node 2's agent exits, and nodes 0 and 1 go on from that
    checkpoint without it, every sample seen once."""
    run_dir, port = tmp_path / "run", free_port()
    extra = (
        *("--train.batch_size=12", "--train.micro_batch_size=12"),  # splits over 3 and 2
        *("--resilience.straggler_action=exclude", "--resilience.straggler_intervals=2"),
    )
    slow = "slow@3:rank=2:factor=4"
    agents = [
        nodes(node, "2:3", port, small_data, run_dir, *extra, faults=slow) for node in range(3)
    ]
    logs = [tmp_path / f"node-{node}" / "agent.log" for node in range(3)]
    for node in (0, 1):
        assert wait_exit(agents[node], logs[node], f"node {node}") == 0, logs[node].read_text()[
            -4000:
        ]
    assert wait_exit(agents[2], logs[2], "node 2") != 0
    text = "".join(log.read_text() for log in logs)
    excluded = re.findall(r"straggler rank 2 \(host [^)]+\) excluded .*?step (\d+)", text)
    assert excluded, text[-4000:]
    step = int(excluded[0])
    assert 4 <= step < STEPS  # slow in steps 3 and 4: 2 intervals of one step
    assert "leaves the job" in logs[2].read_text()
    assert resumed_steps(logs[:2]) == [step]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    layout = json.loads((run_dir / "checkpoints" / "latest" / "trainer.json").read_text())
    assert layout["layout"] == "dp_shard 2"
    samples = seen(run_dir, lambda s: 3 if s <= step else 2)
    assert_each_sample_once(small_data, run_dir, samples)


# -- loom run: a multi-node training stage ------------------------------------------------------


@pytest.mark.slow
def test_loom_run_trains_a_stage_on_two_nodes_with_the_printed_command(
    loom_node: LoomNode, corpus_dir: Path, tmp_path: Path
) -> None:
    """`[pretrain.launch] nnodes = 2`: `loom run` hosts the rendezvous, prints the command for
    the other node, and the stage trains once that command runs (here, in node-1's folder)."""
    endpoint = f"127.0.0.1:{free_port()}"
    launch = f'[pretrain.launch]\nnnodes = 2\nrdzv_endpoint = "{endpoint}"\n'
    text = pipeline_text(corpus_dir).split("[eval]")[0] + launch
    run_dir = tmp_path / "run"
    path = write(tmp_path, text + "[pretrain.parallel]\ndp_shard = 2\n", run_dir)
    logs = [tmp_path / f"node-{node}" / "agent.log" for node in (0, 1)]
    host = loom_node(0, "run", str(path))
    command = printed_command(logs[0], host)
    config = str(run_dir / "pretrain" / "stage.toml")
    assert command == [
        *("loom", "torchrun", "--nnodes", "2", "--nproc-per-node", "1"),
        *("--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint),
        *("--rdzv-id", "loom-pretrain"),
        *("--rdzv-conf", "is_host=0,keep_alive_interval=2,keep_alive_max_attempt=3"),
        *("-m", "loom.train", config),
    ]
    for node, process in enumerate([host, loom_node(1, *command[1:])]):
        assert wait_exit(process, logs[node], f"node {node}") == 0, logs[node].read_text()[-4000:]
    assert all(s["status"] == "done" for s in stages(run_dir).values())
    assert [r["step"] for r in read_metrics(run_dir / "pretrain")] == list(range(1, 9))
    state = json.loads((run_dir / "pretrain/checkpoints/latest/trainer.json").read_text())
    assert state["layout"] == "dp_shard 2"


@pytest.mark.slow
def test_loom_train_nnodes_hosts_the_job_and_its_printed_command_joins(
    loom_node: LoomNode, small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    """`loom train --nproc 1 --nnodes 2 --rdzv-endpoint HOST:PORT` hosts the rendezvous and
    prints the other node's command (overrides included); run from node-1's folder, the two
    train like two local processes, bit for bit."""
    endpoint = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"node-{node}" / "agent.log" for node in (0, 1)]
    host = ["train", str(CONFIG), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint]
    node0 = loom_node(0, *host, *args(small_data, run_dir))
    # the command node 0 printed, as a user would paste it
    node1 = loom_node(1, *printed_command(logs[0], node0)[1:])
    for node, process in enumerate([node0, node1]):
        assert wait_exit(process, logs[node], f"node {node}") == 0, logs[node].read_text()[-4000:]
    assert losses(run_dir) == reference  # the same dp_shard 2 layout as --nproc 2 on one node


def printed_command(log: Path, process: subprocess.Popen[str]) -> list[str]:
    """The command `loom run` printed for the other nodes, once it has."""
    deadline = time.monotonic() + WAIT_S
    marker = "nodes run: "
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if marker in line:
                return shlex.split(line.split(marker, 1)[1])
        assert process.poll() is None, f"loom run ended: {log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"loom run printed no command for the other nodes: {log.read_text()}")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            "\n[pretrain.launch]\nnnodes = 2\n",
            "[pretrain.launch] nnodes = 2, rdzv_endpoint = '': nnodes is 1 or more, and more "
            'than 1 needs rdzv_endpoint = "HOST:PORT"',
        ),
        (
            HARDWARE.format(gpus=16)
            + 'nodes = 2\n[pretrain.launch]\nnnodes = 4\nrdzv_endpoint = "h:1"\n',
            "[pretrain.launch] nnodes = 4 but [pretrain.hardware] nodes = 2: set nnodes = 2",
        ),
        (
            HARDWARE.format(gpus=16)
            + 'nodes = 2\n[pretrain.launch]\nnnodes = 2\nnproc = 4\nrdzv_endpoint = "h:1"\n',
            "[pretrain.launch] nproc = 2 × 4 but [pretrain.hardware] gpus = 16",
        ),
    ],
)
def test_a_bad_multi_node_launch_table_is_one_error(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, message: str
) -> None:
    path = write(tmp_path, pipeline_text(corpus_dir) + table, tmp_path / "run")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
