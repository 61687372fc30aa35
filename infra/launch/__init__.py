"""Launchers: run one Tessera job as a multi-process job on this machine, SLURM, TPU VMs or GKE."""
