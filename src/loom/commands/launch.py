"""`loom launch slurm|k8s CONFIG --nodes N --gpus-per-node G`: the file that starts `loom train
CONFIG` on N machines of a real cluster, an sbatch script or a Kubeflow PyTorchJob manifest.

Both run the same node command, `loom torchrun` (torchrun with restarts that work) with a c10d
rendezvous on the first node, so a failed worker restarts every worker from the newest complete
checkpoint. The config is loaded and its parallel layout checked against N × G processes before
anything is written: a launch file for a run that cannot start is never produced.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from loom.core.errors import LoomError
from loom.core.options import option
from loom.parallel.launch import rdzv_conf

DESCRIPTION = (
    "Write an sbatch script (slurm) or a Kubeflow PyTorchJob manifest (k8s) that runs "
    "`loom train CONFIG` on N nodes of G GPUs each; override any config key as "
    "--section.key=value."
)
TAKES_OVERRIDES = True

TARGETS = ("slurm", "k8s")
# Kubernetes names the worker pods and their services JOB-worker-I: DNS-1035 labels (63 chars)
JOB_NAME = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")
CONFIG_MOUNT = "/etc/loom"  # where the k8s pods see the resolved config
PVC_MOUNT = "/workspace"  # and the shared volume, their working folder


@dataclass
class Options:
    target: str = option(
        "", positional=True, choices=TARGETS, help="slurm: an sbatch script; k8s: a PyTorchJob"
    )
    config: str = option("", positional=True, metavar="CONFIG", help="the `loom train` config")
    nodes: int = option(0, metavar="N", required=True, help="machines")
    gpus_per_node: int = option(0, metavar="G", required=True, help="worker processes per machine")
    out: str | None = option(None, metavar="FILE", help="write here instead of to stdout")
    job_name: str | None = option(
        None, metavar="NAME", help="the job's name and rendezvous id (default: loom-CONFIG_STEM)"
    )
    port: int = option(29500, metavar="PORT", help="the rendezvous port on the first node")
    max_restarts: int = option(
        3,
        metavar="K",
        help="restart every worker up to K times after a failure; each start resumes from the "
        "newest complete checkpoint",
    )
    time: str | None = option(
        None, metavar="TIME", help="slurm: the time limit, as sbatch takes it (e.g. 2-00:00:00)"
    )
    cpus_per_node: int | None = option(
        None, metavar="C", help="slurm: CPUs for the node's workers (default: 8 per GPU)"
    )
    image: str | None = option(
        None, metavar="IMAGE", help="k8s (required): a container image with loom installed"
    )
    pvc: str | None = option(
        None,
        metavar="CLAIM",
        help=f"k8s: a PersistentVolumeClaim every pod mounts at {PVC_MOUNT}, its working folder "
        "(relative data and run folders land there)",
    )
    overrides: list[str] = option(cli=False, default_factory=list)

    def __post_init__(self) -> None:
        for flag, value in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node)):
            if value < 1:
                raise LoomError(f"{flag} {value}: give at least 1")
        if self.max_restarts < 0:
            raise LoomError(f"--max-restarts {self.max_restarts}: give 0 or more")
        if not 0 < self.port < 65536:
            raise LoomError(f"--port {self.port}: give a TCP port, 1 to 65535")
        if self.job_name is not None and not JOB_NAME.fullmatch(self.job_name):
            raise LoomError(
                f"--job-name {self.job_name!r}: use lower-case letters, digits and '-', starting "
                "with a letter, at most 52 characters (Kubernetes names the pods after it)"
            )
        only = {"slurm": ("--time", "--cpus-per-node"), "k8s": ("--image", "--pvc")}
        for target, flags in only.items():
            for flag in flags:
                if self.target != target and getattr(self, flag[2:].replace("-", "_")) is not None:
                    raise LoomError(f"{flag} is for `loom launch {target}`; leave it out")
        if self.target == "k8s" and not self.image:
            raise LoomError("`loom launch k8s` needs --image IMAGE, an image with loom installed")
        if self.time is not None and not SLURM_TIME.fullmatch(self.time):
            raise LoomError(
                f"--time {self.time!r}: write minutes, H:M:S or D-H:M:S (sbatch's formats)"
            )
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise LoomError(f"--cpus-per-node {self.cpus_per_node}: give at least 1")

    @property
    def name(self) -> str:
        """--job-name, or loom-STEM made a valid Kubernetes name."""
        if self.job_name:
            return self.job_name
        stem = re.sub(r"[^a-z0-9]+", "-", Path(self.config).stem.lower()).strip("-")
        return f"loom-{stem}"[:52].rstrip("-")


def node_command(options: Options, launcher: list[str], head: str, rdzv_id: str) -> list[str]:
    """What every node runs: torchrun's agent, meeting the others at HEAD:PORT."""
    return [
        *launcher,
        "torchrun",
        f"--nnodes={options.nodes}",
        f"--nproc-per-node={options.gpus_per_node}",
        f"--max-restarts={options.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{options.port}",
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf={rdzv_conf()}",
        "-m",
        "loom.train",
    ]


def sbatch_script(options: Options) -> str:
    """An sbatch script: one `srun` task per node, each a torchrun agent for G workers."""
    config = Path(options.config).resolve()
    cpus = options.cpus_per_node or 8 * options.gpus_per_node
    time = f"#SBATCH --time={options.time}\n" if options.time else ""
    # `$HEAD` and `$SLURM_JOB_ID` are expanded by the batch shell, on the first node
    command = node_command(options, [sys.executable, "-m", "loom"], "$HEAD", "$SLURM_JOB_ID")
    expanded = ("--rdzv-endpoint=", "--rdzv-id=")
    words = [f'"{w}"' if w.startswith(expanded) else shlex.quote(w) for w in command]
    words += [shlex.quote(w) for w in [str(config), *options.overrides]]
    line = " ".join(words)
    return f"""#!/bin/bash
# Written by `loom launch slurm`: `loom train {config.name}` on {options.nodes} node(s) of \
{options.gpus_per_node} GPU(s).
# Submit with `sbatch FILE`; options given to sbatch itself (--partition, --account, ...) win.
#SBATCH --job-name={options.name}
#SBATCH --nodes={options.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={options.gpus_per_node}
#SBATCH --cpus-per-task={cpus}
{time}#SBATCH --requeue
#SBATCH --chdir={shlex.quote(str(Path.cwd()))}
#SBATCH --output=%x-%j.out
# --requeue: a job stopped by a node failure or preemption runs again and resumes from the newest
# checkpoint. The config, the data and the run folder must be on storage every node sees; relative
# paths in the config are relative to --chdir, the folder this file was written in.
set -euo pipefail

# A collective that fails or times out ends the process, so that torchrun restarts the workers.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Which network interface NCCL and the rendezvous use, when the default one is wrong:
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_DEBUG=WARN

# The rendezvous (torchrun's c10d store) runs on the first node of the allocation.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun --kill-on-bad-exit=1 \\
  {line}
"""


def pytorchjob_manifest(options: Options, resolved_config: str) -> str:
    """A ConfigMap holding the resolved config and a PyTorchJob (kubeflow.org/v1) whose N Worker
    pods run the node command; the training operator gives them the rendezvous host's service."""
    name = options.name
    head = f"{name}-worker-0"  # the operator's service for the first Worker pod
    command = node_command(options, ["loom"], head, name)
    command.append(f"{CONFIG_MOUNT}/config.toml")
    config_lines = "".join(
        f"    {line}\n" if line else "\n" for line in resolved_config.split("\n")
    )
    pvc_mount = pvc_volume = ""
    if options.pvc:
        pvc_mount = f"            - name: shared\n              mountPath: {PVC_MOUNT}\n"
        pvc_volume = (
            "          - name: shared\n            persistentVolumeClaim:\n"
            f"              claimName: {json.dumps(options.pvc)}\n"
        )
    workdir = f"            workingDir: {PVC_MOUNT}\n" if options.pvc else ""
    shared = " (--pvc)" if options.pvc else ": give --pvc CLAIM"
    return f"""# Written by `loom launch k8s`: `loom train` on {options.nodes} pod(s) of \
{options.gpus_per_node} GPU(s), with Kubeflow's training operator.
# Apply with `kubectl apply -f FILE`. The data and the run folder (checkpoints) must be on a
# volume every pod mounts{shared}.
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}-config
data:
  # the config with its overrides applied, as `loom train` resolved it
  config.toml: |
{config_lines.rstrip()}
---
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {name}
spec:
  nprocPerNode: "{options.gpus_per_node}"
  elasticPolicy:
    rdzvBackend: c10d
    rdzvPort: {options.port}
    minReplicas: {options.nodes}
    maxReplicas: {options.nodes}
    maxRestarts: {options.max_restarts}
  pytorchReplicaSpecs:
    Worker:
      replicas: {options.nodes}
      # a pod whose torchrun gave up starts again, and resumes from the newest checkpoint
      restartPolicy: OnFailure
      template:
        spec:
          containers:
          - name: pytorch  # the operator finds the container and its port by these names
            image: {json.dumps(options.image)}
            command: {json.dumps(command)}
{workdir}            env:
            # a failed or timed-out collective ends the process, so torchrun restarts the workers
            - name: TORCH_NCCL_ASYNC_ERROR_HANDLING
              value: "1"
            # which network interface NCCL uses, when the default one is wrong:
            # - name: NCCL_SOCKET_IFNAME
            #   value: eth0
            ports:
            - name: pytorchjob-port
              containerPort: {options.port}
            resources:
              limits:
                nvidia.com/gpu: "{options.gpus_per_node}"
            volumeMounts:
            - name: config
              mountPath: {CONFIG_MOUNT}
            # NCCL moves data between the GPUs of a pod through shared memory; a container's
            # /dev/shm is 64 MiB by default
            - name: dshm
              mountPath: /dev/shm
{pvc_mount}          volumes:
          - name: config
            configMap:
              name: {name}-config
          - name: dshm
            emptyDir:
              medium: Memory
{pvc_volume}"""


def run(options: Options) -> int:
    import tomli_w

    from loom.core.config import config_to_dict, load_config
    from loom.core.log import logger
    from loom.parallel.dims import resolve

    cfg = load_config(options.config, options.overrides)
    if not cfg.run_dir:
        raise LoomError(
            'run_dir is not set; add run_dir = "..." to the config or pass --run_dir=DIR '
            "(a folder every node sees)"
        )
    resolve(cfg, options.nodes * options.gpus_per_node)
    if options.target == "slurm":
        text, submit = sbatch_script(options), "sbatch"
    else:
        text, submit = (
            pytorchjob_manifest(options, tomli_w.dumps(config_to_dict(cfg))),
            "kubectl apply -f",
        )
    if options.out is None:
        sys.stdout.write(text)
        return 0
    Path(options.out).write_text(text, encoding="utf-8")
    logger.info("wrote %s; submit it with `%s %s`", options.out, submit, options.out)
    return 0
