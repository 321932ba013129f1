"""`loom launch slurm|k8s`: the files are checked by the tools that read them, offline.

Slurm: bash parses the script; the real `sbatch --test-only` (Debian's slurm-client) parses every
#SBATCH directive against a cluster description and stops only where it must reach a controller
(none exists here: asking one whether the job would be scheduled is the part that cannot run
offline); the real `scontrol` picks the head node; and the script, run with bash on one fake
node (`srun`'s fan-out over nodes is the one thing left out), trains. Kubernetes: the pod template
is checked by the Kubernetes Python client's models (types, required fields, no unknown field);
the PyTorchJob fields around it against the kubeflow.org/v1 types of Kubeflow's training
operator, whose CRD schema is not available offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from conftest import free_port, tiny_args

from loom.cli import main
from loom.core.config import config_to_dict, load_config

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.toml"
SRUN = "srun --kill-on-bad-exit=1 \\\n"
# A cluster description for sbatch and scontrol: GPU nodes, and a controller port nothing
# listens on, so that sbatch fails fast at the one step that needs a controller
SLURM_CONF = """ClusterName=test
SlurmctldHost=localhost
SlurmctldPort=1
MessageTimeout=1
TCPTimeout=1
GresTypes=gpu
NodeName=gpu[01-04] CPUs=64 Gres=gpu:8 State=UNKNOWN
PartitionName=main Nodes=gpu[01-04] Default=YES
"""
NO_CONTROLLER = "Unable to contact slurm controller"
TINY_BATCH = ("--train.micro_batch_size=4",)  # configs/tiny.toml's is 8, tiny_args' batch 4
BIG_JOB = ("--train.batch_size=32", "--train.micro_batch_size=32")  # 4 nodes x 8 GPUs


def launch(
    tmp_path: Path, data_dir: Path, *flags: str, overrides: tuple[str, ...] = ()
) -> tuple[str, list[str]]:
    """Write a launch file from configs/tiny.toml with the tests' tiny model; its text."""
    out = tmp_path / "launch.out"
    args = tiny_args(data_dir, tmp_path / "run", *TINY_BATCH, *overrides)
    assert main(["launch", *flags, str(CONFIG), "--out", str(out), *args]) == 0
    return out.read_text(), args


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    conf = tmp_path / "slurm.conf"
    conf.write_text(SLURM_CONF)
    for tool in ("sbatch", "scontrol"):
        assert shutil.which(tool), f"no {tool}: install Debian's slurm-client (make test does)"
    return {**os.environ, "SLURM_CONF": str(conf), **extra}


def sbatch_test_only(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.run(
        ["sbatch", "--test-only", str(path)],
        env=slurm_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sbatch_parses_every_directive(tmp_path: Path, data_dir: Path) -> None:
    script, _ = launch(
        tmp_path,
        data_dir,
        "slurm",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--time",
        "2-00:00:00",
        overrides=BIG_JOB,
    )
    directives = re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)
    assert {d.split("=")[0] for d in directives} == {
        "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
        "--time", "--requeue", "--chdir", "--output",
    }  # fmt: skip
    assert "--nodes=4" in directives and "--gpus-per-node=8" in directives
    assert "--ntasks-per-node=1" in directives and "--cpus-per-task=64" in directives
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0

    result = sbatch_test_only(script, tmp_path)
    assert result.returncode == 1 and NO_CONTROLLER in result.stdout + result.stderr, result
    # the same check fails a directive sbatch does not know, or a time limit it cannot read
    for bad in ("--nodez=4", "--time=2-xx"):
        result = sbatch_test_only(script.replace("#SBATCH --nodes=4", f"#SBATCH {bad}"), tmp_path)
        assert result.returncode != 1 and NO_CONTROLLER not in result.stderr, bad


@pytest.mark.parametrize("limit", ["90", "90:30", "12:00:00", "2-12", "2-12:30", "2-12:30:00"])
def test_every_time_limit_loom_accepts_sbatch_reads(
    limit: str, tmp_path: Path, data_dir: Path
) -> None:
    script, _ = launch(
        tmp_path, data_dir, "slurm", "--nodes=1", "--gpus-per-node=1", "--time", limit
    )
    result = sbatch_test_only(script, tmp_path)
    assert NO_CONTROLLER in result.stdout + result.stderr, result


def test_scontrol_names_the_first_node_the_rendezvous_host(tmp_path: Path, data_dir: Path) -> None:
    script, _ = launch(
        tmp_path, data_dir, "slurm", "--nodes=4", "--gpus-per-node=8", overrides=BIG_JOB
    )
    head_line = next(line for line in script.splitlines() if line.startswith("HEAD="))
    env = slurm_env(tmp_path, SLURM_JOB_NODELIST="gpu[03-04],gpu01")
    shown = subprocess.run(
        ["bash", "-c", f'{head_line}; echo "$HEAD"'], env=env, capture_output=True, text=True
    )
    assert shown.stdout.strip() == "gpu03", shown.stderr
    assert '"--rdzv-endpoint=$HEAD:29500" "--rdzv-id=$SLURM_JOB_ID"' in script


@pytest.mark.slow
def test_the_sbatch_script_trains_on_one_node(tmp_path: Path, data_dir: Path) -> None:
    """The script as a node runs it, on this machine as a one-node job of one CPU worker."""
    port = free_port()
    script, _ = launch(
        tmp_path,
        data_dir,
        "slurm",
        "--nodes=1",
        "--gpus-per-node=1",
        f"--port={port}",
        "--max-restarts=1",
        overrides=("--train.steps=4",),
    )
    assert script.count(SRUN) == 1
    env = slurm_env(
        tmp_path, SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        ["bash", "-c", script.replace(SRUN, "")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{sys.executable} -m loom torchrun" in script
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps[-1] == 4
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def check_fields(data: Any, type_name: str, where: str) -> None:
    """Every key of `data` is a field of the Kubernetes model `type_name`, recursively (the
    client's from_dict checks types and required fields but ignores unknown keys)."""
    if type_name.startswith("List["):
        for i, item in enumerate(data):
            check_fields(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("Dict[str, "):
        for key, value in data.items():
            check_fields(value, type_name[10:-1], f"{where}.{key}")
        return
    model = getattr(kubernetes.client, type_name, None)
    if model is None:  # a primitive: from_dict checked its type
        return
    by_key = {key: name for name, key in model.attribute_map.items()}
    for key, value in data.items():
        assert key in by_key, f"{where}: {type_name} has no field {key!r}"
        check_fields(value, model.openapi_types[by_key[key]], f"{where}.{key}")


def check_pod_template(template: dict[str, Any]) -> Any:
    check_fields(template, "V1PodTemplateSpec", "template")
    return kubernetes.client.V1PodTemplateSpec.from_dict(template)


# kubeflow.org/v1 (training-operator, pkg/apis/kubeflow.org/v1: PyTorchJobSpec, ElasticPolicy,
# ReplicaSpec): field -> type
PYTORCHJOB_SPEC = {"runPolicy": dict, "elasticPolicy": dict, "pytorchReplicaSpecs": dict,
                   "nprocPerNode": str}  # fmt: skip
ELASTIC_POLICY = {"minReplicas": int, "maxReplicas": int, "rdzvBackend": str, "rdzvPort": int,
                  "rdzvHost": str, "rdzvId": str, "rdzvConf": list, "standalone": bool,
                  "nProcPerNode": int, "maxRestarts": int, "metrics": list}  # fmt: skip
REPLICA_SPEC = {"replicas": int, "template": dict, "restartPolicy": str}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}


def check_typed(data: dict[str, Any], fields: dict[str, type], where: str) -> None:
    for key, value in data.items():
        assert key in fields, f"{where} has no field {key!r}"
        assert type(value) is fields[key], f"{where}.{key}: {value!r} is not {fields[key]}"


@pytest.mark.parametrize("pvc", [None, "loom-data"])
def test_pytorchjob_manifest(pvc: str | None, tmp_path: Path, data_dir: Path) -> None:
    flags = ["k8s", "--nodes=4", "--gpus-per-node=8", "--image=ghcr.io/acme/loom:1.0"]
    pvc_flag = [f"--pvc={pvc}"] if pvc else []
    text, args = launch(tmp_path, data_dir, *flags, *pvc_flag, overrides=BIG_JOB)
    config_map, job = yaml.safe_load_all(text)

    # the ConfigMap: a valid object holding the config exactly as `loom train` resolves it
    assert kubernetes.client.V1ConfigMap.from_dict(config_map).metadata.name == "loom-tiny-config"
    (tmp_path / "mounted.toml").write_text(config_map["data"]["config.toml"])
    expected = config_to_dict(load_config(CONFIG, args))
    assert config_to_dict(load_config(tmp_path / "mounted.toml")) == expected

    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", f"{name}-worker-3")
    spec = job["spec"]
    check_typed(spec, PYTORCHJOB_SPEC, "spec")
    elastic = spec["elasticPolicy"]
    check_typed(elastic, ELASTIC_POLICY, "spec.elasticPolicy")
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic jobs have no Master
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    check_typed(worker, REPLICA_SPEC, "Worker")
    assert worker["restartPolicy"] in RESTART_POLICIES

    pod = check_pod_template(worker["template"])
    (container,) = pod.spec.containers
    # what the operator looks for, and what the node command must agree with
    assert container.name == "pytorch"
    (port,) = container.ports
    assert port.name == "pytorchjob-port" and port.container_port == elastic["rdzvPort"] == 29500
    assert container.resources.limits == {"nvidia.com/gpu": "8"}
    assert elastic["rdzvBackend"] == "c10d" and worker["restartPolicy"] == "OnFailure"
    assert elastic["minReplicas"] == elastic["maxReplicas"] == worker["replicas"] == 4
    assert spec["nprocPerNode"] == "8" and elastic["maxRestarts"] == 3
    assert container.command == [
        "loom", "torchrun", "--nnodes=4", "--nproc-per-node=8", "--max-restarts=3",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-worker-0:29500", f"--rdzv-id={name}",
        "--rdzv-conf=keep_alive_interval=2,keep_alive_max_attempt=3",
        "-m", "loom.train", "/etc/loom/config.toml",
    ]  # fmt: skip
    volumes = {v.name: v for v in pod.spec.volumes}
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    assert volumes["dshm"].empty_dir.medium == "Memory" and mounts["dshm"] == "/dev/shm"
    assert volumes["config"].config_map.name == config_map["metadata"]["name"]
    assert mounts["config"] == "/etc/loom"
    if pvc:
        assert volumes["shared"].persistent_volume_claim.claim_name == pvc
        assert mounts["shared"] == container.working_dir == "/workspace"
    else:
        assert "shared" not in volumes and container.working_dir is None


def test_the_field_checks_catch_a_misspelled_field() -> None:
    template = {"spec": {"containers": [{"name": "pytorch", "image": "x", "volumeMount": []}]}}
    with pytest.raises(AssertionError, match="V1Container has no field 'volumeMount'"):
        check_pod_template(template)
    with pytest.raises(AssertionError, match="has no field 'nprocPerNod'"):
        check_typed({"nprocPerNod": "8"}, PYTORCHJOB_SPEC, "spec")
    with pytest.raises(AssertionError, match="is not <class 'str'>"):
        check_typed({"nprocPerNode": 8}, PYTORCHJOB_SPEC, "spec")


N2G8 = ["--nodes=2", "--gpus-per-node=8"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["k8s", *N2G8], "`loom launch k8s` needs --image IMAGE"),
        (["slurm", *N2G8, "--image=x"], "--image is for `loom launch k8s`"),
        (["k8s", *N2G8, "--image=x", "--time=60"], "--time is for `loom launch slurm`"),
        (["slurm", "--nodes=0", "--gpus-per-node=8"], "--nodes 0: give at least 1"),
        (["slurm", *N2G8, "--time=2 days"], "--time '2 days': write minutes"),
        (["slurm", *N2G8, "--job-name=My_Run"], "--job-name 'My_Run'"),
        (["slurm", "--nodes=3", "--gpus-per-node=2", "--parallel.tp=4"], "a multiple of 4"),
        (["slurm", *N2G8, "--model.dim=-1"], "model.dim"),
        (["slurm", *N2G8, "--run_dir="], "run_dir is not set"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    argv: list[str],
    message: str,
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "launch.out"
    target, *flags = argv
    args = [*tiny_args(data_dir, tmp_path / "run", *TINY_BATCH), *flags[2:]]
    assert main(["launch", target, str(CONFIG), *flags[:2], "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
