"""`tessera launch gke`: TPU slices on GKE as one JobSet (or the equivalent `xpk workload create`).

One replicated Job per slice, one pod per TPU host. GKE's TPU webhook gives each pod its worker
id and peers; for several slices the pods also get MEGASCALE_* settings, the coordinator being
pod 0 of slice 0 reached through the JobSet's headless service. Every pod runs
`tessera JOB` with TESSERA_DISTRIBUTED=auto, so jax finds the rest itself.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from infra import distributed
from infra.launch.job import Job, check_env
from infra.launch.tpu_vm import check_name, check_slices
from infra.targets import TpuSlice
from train.config import ConfigError

GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
REPLICATED_JOB = "slice"
TPU_PORT = 8471  # the TPU runtime's port between hosts of a slice
MEGASCALE_PORT = 8080  # multislice traffic over DCN
MEGASCALE = ("MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_PORT")


def _checked_env(job: Job, tpu: TpuSlice, name: str, env: dict[str, str] | None) -> dict[str, str]:
    """The checks every GKE launch makes; returns the env the job gets besides the multislice settings."""
    env = dict(env or {})
    check_name(name)
    check_env(env)
    if tpu.slices > 1 and (taken := [key for key in env if key in MEGASCALE]):
        raise ConfigError(f"--env {taken[0]}: the launcher sets {', '.join(MEGASCALE)} for a multislice job")
    check_slices(job, tpu)
    return {distributed.MODE: "auto", **env}


def _multislice_env(tpu: TpuSlice, name: str) -> list[dict]:
    if tpu.slices == 1:
        return []
    return [
        {"name": "MEGASCALE_NUM_SLICES", "value": str(tpu.slices)},
        {"name": "MEGASCALE_SLICE_ID",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
        # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain, the JobSet's name by default>
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
        {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
    ]


def jobset_manifest(job: Job, tpu: TpuSlice, *, name: str, image: str, env: dict[str, str] | None = None) -> dict:
    """The JobSet (jobset.x-k8s.io/v1alpha2) that runs the job on every host of every slice."""
    env = _checked_env(job, tpu, name, env)
    container = {
        "name": "tessera",
        "image": image,
        "command": ["tessera", *job.argv],  # exec'd as a list: no shell reads the job's words
        "ports": [{"containerPort": TPU_PORT}, {"containerPort": MEGASCALE_PORT}],
        "securityContext": {"privileged": True},  # the TPU runtime needs the host's devices and memlock
        "env": [{"name": k, "value": v} for k, v in env.items()] + _multislice_env(tpu, name),
        "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
    }
    pod = {
        "restartPolicy": "Never",
        # Time to finish the steps in flight and checkpoint after SIGTERM (preemption, deletion) before SIGKILL.
        "terminationGracePeriodSeconds": 120,
        "hostNetwork": True,  # DCN and ICI setup expect the host's network
        "dnsPolicy": "ClusterFirstWithHostNet",  # and still resolve the headless service's names
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[tpu.generation],
            "cloud.google.com/gke-tpu-topology": "x".join(map(str, tpu.topology)),
        },
        "containers": [container],
    }
    one_slice = {
        "parallelism": tpu.hosts,
        "completions": tpu.hosts,
        "backoffLimit": 0,  # a lost host breaks the whole jax job: fail fast rather than restart one pod
        "completionMode": "Indexed",
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            # One slice per node pool: two slices' pods never share (or split) a pool.
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": tpu.slices, "template": {"spec": one_slice}}],
        },
    }


def xpk_command(job: Job, tpu: TpuSlice, *, name: str, image: str, cluster: str,
                env: dict[str, str] | None = None) -> list[str]:
    """`xpk workload create ...` for the same job; xpk writes the JobSet (and multislice settings) itself."""
    env = _checked_env(job, tpu, name, env)
    line = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), job.shell_words()])
    return ["xpk", "workload", "create", "--cluster", cluster, "--workload", name, "--docker-image", image,
            "--tpu-type", tpu.accelerator_type, "--num-slices", str(tpu.slices), "--command", line]


def run_gke(manifest: dict, path: Path, *, dry_run: bool) -> int:
    """Write the manifest to `path`; print it (dry run) or `kubectl apply` it."""
    text = yaml.safe_dump(manifest, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if dry_run:
        print(text, end="")
        print(f"# written to {path}; start it with: kubectl apply -f {shlex.quote(str(path))}")
        return 0
    if shutil.which("kubectl") is None:
        raise ConfigError(f"kubectl is not on PATH: install it and point it at the GKE cluster, or apply {path} "
                          "from a machine that has it (--dry-run prints the manifest)")
    return subprocess.run(["kubectl", "apply", "-f", str(path)]).returncode
