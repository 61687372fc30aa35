"""`tessera launch local|slurm|tpu-vm|gke [CONFIG] [overrides] [options] [-- JOB ...]`.

Every launcher runs `tessera train [CONFIG] [overrides]` on each process, or the job given
after `--` (`tessera launch slurm --nodes 2 -- train CONFIG k=v`). The job's config is
loaded and checked against the processes and devices before anything starts.
"""

from __future__ import annotations

import re
from pathlib import Path

from infra.commands import distill as distill_command
from infra.commands import rl as rl_command
from infra.commands import train as train_command
from infra.commands.arguments import CommandParser, add_config_arguments, split_config_arg
from infra.launch.job import Job, parse_env
from train import storage
from train.config import ConfigError
from train.recipes import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The commands that run as one program on every process of a multi-host job.
LAUNCHABLE = {"train": train_command, "distill": distill_command, "rl": rl_command}


def _job(args):
    return parse_job(args.config, list(args.overrides), list(args.job))


def parse_job(config: str | None, overrides: list[str], command: list[str]) -> Job:
    """`command` is what followed `--` (a whole job such as `train CONFIG k=v`); without it the job is
    `train [CONFIG] [overrides]`. The job's arguments are checked as its own command would check them."""
    if command and (config or overrides):
        raise ConfigError(
            f"give the job either before `--` (a CONFIG and overrides for train) or after it, not both "
            f"(got {config or overrides[0]!r} and `-- {' '.join(command)}`)"
        )
    argv = list(command) if command else ["train", *([config] if config else []), *overrides]
    if argv[0] not in LAUNCHABLE:
        raise ConfigError(
            f"`tessera {argv[0]}` cannot be launched on several processes; launchable jobs: {', '.join(LAUNCHABLE)} "
            "(sample, eval and quantize run on one host)"
        )
    parser = CommandParser(prog="tessera")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in LAUNCHABLE.values():
        module.add_parser(commands)
    args = parser.parse_args(argv)
    if getattr(args, "dump_teacher_topk", None) is not None:
        raise ConfigError("`tessera distill --dump-teacher-topk` runs on one host (every process would write the "
                          "same files); run it directly, then launch the distillation with distill.teacher_topk=DIR")
    path, job_overrides = split_config_arg(args)
    return Job(tuple(argv), load_config(path, job_overrides))


def default_name(run_dir: Path) -> str:
    """A cluster-safe name from the run directory: lower-case letters, digits and dashes."""
    stem = re.sub(r"[^a-z0-9-]+", "-", run_dir.name.lower()).strip("-") or "run"
    return f"tessera-{stem}"[:40].rstrip("-")


def _run_local(args) -> int:
    from infra.launch.job import check_fits
    from infra.launch.local import run_local

    job = _job(args)
    check_fits(job, args.processes, args.devices_per_process,
               f"--processes {args.processes} x --devices-per-process {args.devices_per_process}")
    return run_local(job, args.processes, args.devices_per_process)


def _run_slurm(args) -> int:
    from infra.launch import slurm

    if args.status or args.cancel:
        if args.config or args.overrides or args.job:
            raise ConfigError("--status and --cancel take a run directory only, not a job")
        # A gs:// run's scheduler files (job id, logs) are in its local stand-in, where the launch wrote them.
        run_dir = storage.local_stand_in(args.status or args.cancel, "launch")
        return slurm.status(run_dir) if args.status else slurm.cancel(run_dir)
    if args.nodes is None:
        raise ConfigError("tessera launch slurm needs --nodes N (or --status/--cancel RUN_DIR)")
    request = slurm.SlurmRequest(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpu_devices=args.cpu_devices, partition=args.partition, time=args.time, account=args.account,
        container=args.container, env=tuple(parse_env(args.env).items()),
    )
    if args.gpus_per_node and (args.tasks_per_node != 1 or args.cpu_devices != 1):
        raise ConfigError("--tasks-per-node and --cpu-devices are for CPU jobs; with --gpus-per-node each GPU is a task")
    return slurm.launch_slurm(_job(args), request, args.dry_run)


def _run_tpu_vm(args) -> int:
    from infra.launch.tpu_vm import plan_tpu_vm, run_tpu_vm
    from infra.targets import tpu_slice

    job = _job(args)
    plan = plan_tpu_vm(
        job, tpu_slice(args.tpu), name=args.name or default_name(job.run_dir), zone=args.zone, project=args.project,
        spot=args.spot, runtime_version=args.runtime_version, env=parse_env(args.env), project_root=PROJECT_ROOT,
    )
    if args.dry_run:
        print(plan.shell())
        return 0
    return run_tpu_vm(plan, delete_after=args.delete_after)


def _run_gke(args) -> int:
    from infra.launch.gke import jobset_manifest, run_gke, xpk_command
    from infra.targets import tpu_slice

    job = _job(args)
    tpu, name, env = tpu_slice(args.tpu), args.name or default_name(job.run_dir), parse_env(args.env)
    if args.xpk:
        if not args.cluster:
            raise ConfigError("--xpk needs --cluster NAME (the GKE cluster xpk submits to)")
        import shlex

        print(shlex.join(xpk_command(job, tpu, name=name, image=args.image, cluster=args.cluster, env=env)))
        return 0
    manifest = jobset_manifest(job, tpu, name=name, image=args.image, env=env)
    return run_gke(manifest, job.launch_dir / "gke" / "jobset.yaml", dry_run=args.dry_run)


def _common(p, what: str) -> None:
    add_config_arguments(p, "experiment YAML or run directory for `tessera train`")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help=f"an environment variable for every process {what} (repeatable)")
    p.set_defaults(job=[])


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch", help="run a job on several processes: this machine, SLURM, TPU VMs or GKE",
        description="Run `tessera train [CONFIG] [overrides]` (or the job after `--`) as one multi-process jax job.",
    )
    lsub = p.add_subparsers(dest="launcher", required=True)

    local = lsub.add_parser("local", help="N processes on this machine, each emulating D CPU devices",
                            description="Start N processes here that form one real multi-host job over gloo; "
                            "process 0's output streams here, the others go to RUN_DIR/logs/process-K.log. "
                            "Ctrl-C or SIGTERM reaches every process; one failing stops the rest (non-zero exit).")
    add_config_arguments(local, "experiment YAML or run directory for `tessera train`")
    local.add_argument("--processes", type=int, required=True, help="number of processes")
    local.add_argument("--devices-per-process", type=int, default=1, help="emulated CPU devices per process (default 1)")
    local.set_defaults(func=_run_local, job=[])

    slurm = lsub.add_parser("slurm", help="render and submit an sbatch script (one task per GPU, or per node)",
                            description="Render RUN_DIR/slurm/job.sbatch and submit it with sbatch; every task runs "
                            "the job under srun and jax's SLURM detection joins them. --dry-run prints the script.")
    _common(slurm, "(exported in the script)")
    slurm.add_argument("--nodes", type=int, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    slurm.add_argument("--tasks-per-node", type=int, default=1, help="CPU jobs: tasks per node (default 1)")
    slurm.add_argument("--cpu-devices", type=int, default=1, help="CPU jobs: emulated devices per task (default 1)")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit, as sbatch takes it (e.g. 04:00:00)")
    slurm.add_argument("--account")
    slurm.add_argument("--container", help="container image for srun --container-image (pyxis/enroot)")
    slurm.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    slurm.add_argument("--status", metavar="RUN_DIR", help="show the state of the run's SLURM job")
    slurm.add_argument("--cancel", metavar="RUN_DIR", help="cancel the run's SLURM job")
    slurm.set_defaults(func=_run_slurm)

    tpu = lsub.add_parser("tpu-vm", help="create Cloud TPU slices, copy the project, run on every worker",
                          description="Create the slice(s) as a queued resource, copy and install this project on "
                          "every worker, run the job on all of them (gcloud ... ssh --worker=all), and with "
                          "--delete-after delete the slices. --dry-run prints every command.")
    _common(tpu, "(set in the remote command)")
    tpu.add_argument("--tpu", required=True, help="slice type, e.g. v5p-128, or v5e-256x2 for two slices")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", required=True)
    tpu.add_argument("--name", help="queued resource / node name (default: tessera-RUN_NAME)")
    tpu.add_argument("--spot", action="store_true", help="spot capacity")
    tpu.add_argument("--runtime-version", help="TPU software version (default: the generation's usual one)")
    tpu.add_argument("--delete-after", action="store_true", help="delete the slices when the job ends")
    tpu.add_argument("--dry-run", action="store_true", help="print the commands only")
    tpu.set_defaults(func=_run_tpu_vm)

    gke = lsub.add_parser("gke", help="render a JobSet for TPU slices on GKE and apply it with kubectl",
                          description="Render RUN_DIR/gke/jobset.yaml (one pod per TPU host, multislice settings "
                          "for several slices) and kubectl apply it; --dry-run prints it, --xpk prints the "
                          "equivalent `xpk workload create` command instead.")
    _common(gke, "(set in the pod spec)")
    gke.add_argument("--tpu", required=True, help="slice type, e.g. v5e-256, or v5e-256x2 for two slices")
    gke.add_argument("--image", required=True, help="container image with this project installed")
    gke.add_argument("--name", help="JobSet name (default: tessera-RUN_NAME)")
    gke.add_argument("--xpk", action="store_true", help="print the xpk command instead of a manifest")
    gke.add_argument("--cluster", help="with --xpk: the GKE cluster")
    gke.add_argument("--dry-run", action="store_true", help="print the manifest only")
    gke.set_defaults(func=_run_gke)


def split_job(argv: list[str]) -> tuple[list[str], list[str]]:
    """`tessera launch ... -- JOB ARGS`: the launcher's arguments and the job's."""
    if argv and argv[0] == "launch" and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []
