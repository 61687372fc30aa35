"""TPU VM and GKE launchers: the commands and manifests they render, the checks before anything starts,
and that user-given words stay data on the remote shell. No cloud, no network, no compiles."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.launch.gke import GKE_ACCELERATORS, jobset_manifest, run_gke, xpk_command
from infra.commands.launch import parse_job
from infra.launch.tpu_vm import INSTALL, _run_all, plan_tpu_vm, run_tpu_vm
from infra.targets import tpu_slice
from tests.conftest import TINY_MODEL
from train.config import ConfigError

SCHEMA = Path(__file__).resolve().parent / "schemas" / "jobset.x-k8s.io_jobsets.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def local_staging(tmp_path, monkeypatch):
    """Launcher files of a gs:// run (logs, manifests) go to a local stand-in directory: here, under tmp_path."""
    monkeypatch.setenv("TESSERA_STAGING", str(tmp_path / "staging"))


def job(tmp_path, *overrides, batch=64):
    """A job whose run directory is in a bucket, as a multi-host job's must be."""
    return parse_job(None, [*TINY_MODEL, "data.seq_len=32", f"data.batch_size={batch}", "run.dir=gs://runs/t",
                            *overrides], [])


def plan(j, tpu="v5p-128", **kw):
    kw = {"name": "tessera-t", "zone": "us-east5-a", "project": "proj", "project_root": ROOT, **kw}
    return plan_tpu_vm(j, tpu_slice(tpu), **kw)


def remote(argv):
    return next(w for w in argv if w.startswith("--command=")).removeprefix("--command=")


def all_commands(p):
    return [p.create, p.wait, *p.copy, *p.install, *p.run, p.delete]


# ------------------------------------------------------------------ tpu-vm plans


def test_single_slice_plan_and_its_shell_text(tmp_path):
    j = job(tmp_path)
    p = plan(j, spot=True)
    assert p.create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    flags = " ".join(p.create)
    for part in ("--accelerator-type v5p-128", "--node-id tessera-t", "--zone us-east5-a", "--project proj",
                 "--runtime-version v2-alpha-tpuv5", "--spot"):
        assert part in flags
    assert "--node-count" not in p.create
    assert p.wait[-1] == "--format=value(state.state)" and "describe" in p.wait
    assert p.delete[4:] == ["delete", "tessera-t", "--force", "--quiet", "--zone", "us-east5-a", "--project", "proj"]
    # 16 hosts (64 chips, 4 each): one ssh reaching every worker of the one node.
    assert tpu_slice("v5p-128").hosts == 16
    assert len(p.run) == len(p.copy) == len(p.install) == 1
    assert p.run[0][5:7] == ["tessera-t", "--worker=all"]
    assert p.copy[0][4:9] == ["scp", "--recurse", "--worker=all", str(ROOT), "tessera-t:~/tessera"]
    assert remote(p.install[0]) == f"cd ~/tessera && {INSTALL}"
    assert remote(p.run[0]).endswith("TESSERA_DISTRIBUTED=auto " + j.shell_words())
    # --dry-run text: comments, then each command as one line that parses back into the same argv.
    lines = [line for line in p.shell().splitlines() if line and not line.startswith("#")]
    assert [shlex.split(line) for line in lines] == all_commands(p)
    assert sum(line.startswith("#") for line in p.shell().splitlines()) == 6


def test_runtime_version_and_env_are_passed(tmp_path):
    p = plan(job(tmp_path), tpu="v6e-8", runtime_version="custom-rt", env={"XLA_FLAGS": "--a --b"})
    assert p.create[p.create.index("--runtime-version") + 1] == "custom-rt"
    assert "XLA_FLAGS='--a --b' tessera train" in remote(p.run[0])
    v4 = plan(job(tmp_path, batch=8), tpu="v4-8").create
    assert v4[v4.index("--runtime-version") + 1] == "tpu-ubuntu2204-base"


def test_two_slices_are_one_queued_resource_with_two_nodes(tmp_path):
    j = job(tmp_path, "mesh.dcn_data=2", batch=512)
    p = plan(j, tpu="v5e-256x2")
    flags = " ".join(p.create)
    assert "--accelerator-type v5litepod-256" in flags and "--node-count 2 --node-prefix tessera-t" in flags
    assert "--node-id" not in p.create
    assert [argv[5] for argv in p.run] == ["tessera-t-0", "tessera-t-1"]
    assert [argv[8] for argv in p.copy] == ["tessera-t-0:~/tessera", "tessera-t-1:~/tessera"]
    assert len(p.install) == 2 and remote(p.run[0]) == remote(p.run[1])
    assert p.delete[4:6] == ["delete", "tessera-t"]  # deleting the one queued resource deletes both slices


def test_two_slices_without_a_dcn_axis_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"add mesh\.dcn_data=2"):
        plan(job(tmp_path, batch=512), tpu="v5e-256x2")


def test_a_dcn_axis_on_one_slice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="one slice"):
        plan(job(tmp_path, "mesh.dcn_data=2"), tpu="v5e-16")


def test_mesh_that_does_not_fit_the_slice_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        plan(job(tmp_path, "mesh.data=3", batch=12), tpu="v5e-16")
    # one process per host (4 hosts of 4 chips), not one per chip
    assert "--tpu v5e-16 gives 4 processes x 4 devices = 16 devices" in str(e.value)
    assert "mesh axes" in str(e.value) and "set one axis to -1" in str(e.value)


def test_unknown_tpu_type_and_bad_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown TPU type 'v7x-8'.*v5e-16"):
        tpu_slice("v7x-8")
    with pytest.raises(ConfigError, match="counts TensorCores"):
        tpu_slice("v5p-7")
    for name in ("Tessera", "run_1", "1run", "x" * 41, "a;b"):
        with pytest.raises(ConfigError, match="DNS-1123 label"):
            plan(job(tmp_path), tpu="v5e-4", name=name)
    with pytest.raises(ConfigError, match="not a shell variable name"):
        plan(job(tmp_path), tpu="v5e-4", env={"A B": "1"})


def test_config_file_must_be_inside_the_copied_project(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    recipe = {"model": {k.split(".")[1]: int(v) for k, v in (o.split("=") for o in TINY_MODEL)},
              "data": {"seq_len": 32, "batch_size": 8}, "run": {"dir": str(tmp_path / "run")}}
    (project / "configs" / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(project)
    inside = parse_job("configs/r.yaml", [], [])
    assert remote(plan(inside, tpu="v5e-4", project_root=project).run[0]).endswith("tessera train configs/r.yaml")
    outside = parse_job(str(tmp_path / "outside.yaml"), [], [])
    with pytest.raises(ConfigError, match="relative path to a file inside the project"):
        plan(outside, tpu="v5e-4", project_root=project)
    with pytest.raises(ConfigError, match="relative path to a file inside the project"):
        plan(parse_job("../outside.yaml", [], []), tpu="v5e-4", project_root=project)


def test_remote_command_keeps_user_words_as_data(tmp_path):
    """Runs the real remote --command line in bash, with a stub `tessera` that records what it got."""
    evil = "/tmp/x; touch PWNED $(touch PWNED2) `touch PWNED3` 'q\"s"
    j = job(tmp_path, f"run.dir={evil}")
    assert j.cfg.run.dir == evil
    env = {"WEIRD": "a b; touch PWNED4 $(touch PWNED5) \"'$HOME"}
    command = remote(plan(j, tpu="v5e-4", env=env).run[0])

    home, stubs, seen = tmp_path / "home", tmp_path / "bin", tmp_path / "seen.json"
    (home / "tessera").mkdir(parents=True)
    stubs.mkdir()
    stub = stubs / "tessera"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': [os.environ.get('WEIRD'), "
                    f"os.environ.get('TESSERA_DISTRIBUTED')]}}, open({str(seen)!r}, 'w'))\n")
    stub.chmod(0o755)
    shell_env = {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=shell_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(seen.read_text())
    assert got["argv"] == list(j.argv)
    assert got["env"] == [env["WEIRD"], "auto"]
    assert got["cwd"] == str(home / "tessera")
    assert not list(tmp_path.rglob("PWNED*"))
    # The same words joined without quoting (less the unbalanced quote, a syntax error) would have run
    # the attacker's commands: the check above can fail.
    naive = "cd ~/tessera && tessera " + " ".join(j.argv).replace("'q\"s", "")
    subprocess.run(["bash", "-c", naive], cwd=tmp_path, env=shell_env,
                   capture_output=True)
    assert list(tmp_path.rglob("PWNED*"))


# ------------------------------------------------------------------ running the plan with a stub gcloud


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A `gcloud` on PATH that logs its arguments; describe prints states from a file, one per call;
    a command mentioning FAILME exits 3."""
    bin_dir, log, states = tmp_path / "fakebin", tmp_path / "gcloud.log", tmp_path / "states"
    bin_dir.mkdir()
    states.write_text("ACTIVE\n")
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"""#!/bin/bash
echo "$*" >> {log}
if [ "$4" = describe ]; then
  head -n1 {states}
  if [ "$(wc -l < {states})" -gt 1 ]; then sed -i 1d {states}; fi
fi
case "$*" in *FAILME*) exit 3;; esac
exit 0
""")
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda: [line.split()[2:4] for line in log.read_text().splitlines()], states


def test_run_tpu_vm_runs_every_step_and_deletes(tmp_path, fake_gcloud, capsys):
    calls, states = fake_gcloud
    states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    code = run_tpu_vm(plan(job(tmp_path, batch=16), tpu="v5e-16"), delete_after=True, poll_seconds=0)
    assert code == 0
    assert calls() == [["queued-resources", "create"], *[["queued-resources", "describe"]] * 3,
                       ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["queued-resources", "delete"]]
    assert "PROVISIONING" in capsys.readouterr().out


def test_run_tpu_vm_failures_still_delete(tmp_path, fake_gcloud, capsys):
    calls, states = fake_gcloud
    p = plan(job(tmp_path, batch=16), tpu="v5e-16", env={"MARK": "FAILME"})  # only the run command has it
    assert run_tpu_vm(p, delete_after=True, poll_seconds=0) == 3  # the job's exit code
    assert calls()[-2:] == [["tpu-vm", "ssh"], ["queued-resources", "delete"]]
    assert "exited with code 3" in capsys.readouterr().err

    states.write_text("FAILED\n")
    n = len(calls())
    assert run_tpu_vm(plan(job(tmp_path, batch=16), tpu="v5e-16"), delete_after=True, poll_seconds=0) == 1
    assert calls()[n:] == [["queued-resources", "create"], ["queued-resources", "describe"],
                           ["queued-resources", "delete"]]
    assert "FAILED" in capsys.readouterr().err


def test_run_tpu_vm_keeps_what_it_did_not_create(tmp_path, fake_gcloud):
    calls, _ = fake_gcloud
    p = plan(job(tmp_path, batch=16), tpu="v5e-16")
    p = type(p)(**{**p.__dict__, "create": [*p.create, "FAILME"]})  # e.g. the name is taken
    assert run_tpu_vm(p, delete_after=True, poll_seconds=0) == 3
    assert calls() == [["queued-resources", "create"]]


def test_one_failing_slice_stops_the_others(tmp_path):
    stub = tmp_path / "gcloud"
    stub.write_text('#!/bin/bash\ncase "$5" in slow) exec sleep 30;; bad) exit 5;; esac\n')
    stub.chmod(0o755)
    ssh = [str(stub), "compute", "tpus", "tpu-vm", "ssh"]
    assert _run_all([[*ssh, "slow"], [*ssh, "bad"]], poll_seconds=0.02) == 5  # not 30 s later
    assert _run_all([[*ssh, "ok"], [*ssh, "ok"]], poll_seconds=0.02) == 0


def test_missing_tools_are_named(tmp_path, monkeypatch):
    j = job(tmp_path, batch=16)
    p = plan(j, tpu="v5e-16")
    manifest = jobset_manifest(j, tpu_slice("v5e-16"), name="tessera-t", image="img")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="gcloud is not on PATH.*--dry-run"):
        run_tpu_vm(p, delete_after=True)
    with pytest.raises(ConfigError, match="kubectl is not on PATH"):
        run_gke(manifest, tmp_path / "gke" / "jobset.yaml", dry_run=False)


# ------------------------------------------------------------------ GKE


@pytest.fixture(scope="module")
def jobset_schema():
    crd = yaml.load(SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")["schema"]["openAPIV3Schema"]
    # What jsonschema.validate does, with the (slow) check of the 800 kB schema itself done once.
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _container(manifest):
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("tpu_name, overrides, batch", [
    ("v5e-16", (), 16),
    pytest.param("v5e-256x2", ("mesh.dcn_data=2",), 512),
])
def test_jobset_manifest_is_valid_and_shaped_for_the_slices(tmp_path, jobset_schema, tpu_name, overrides, batch):
    j, tpu = job(tmp_path, *overrides, batch=batch), tpu_slice(tpu_name)
    manifest = jobset_manifest(j, tpu, name="tessera-t", image="gcr.io/p/tessera:1", env={"XLA_FLAGS": "--x y"})
    jobset_schema.validate(yaml.safe_load(yaml.safe_dump(manifest)))

    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    replicated = manifest["spec"]["replicatedJobs"]
    assert [r["name"] for r in replicated] == ["slice"] and replicated[0]["replicas"] == tpu.slices
    one_slice = replicated[0]["template"]["spec"]
    assert one_slice["parallelism"] == one_slice["completions"] == tpu.hosts
    pod = one_slice["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS["v5e"],
                                   "cloud.google.com/gke-tpu-topology": "4x4" if tpu.chips == 16 else "16x16"}
    container = _container(manifest)
    assert container["command"] == ["tessera", *j.argv]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["TESSERA_DISTRIBUTED"] == "auto" and env["XLA_FLAGS"] == "--x y"
    megascale = {k: v for k, v in env.items() if k.startswith("MEGASCALE_")}
    if tpu.slices == 1:
        assert megascale == {}
    else:
        assert megascale["MEGASCALE_NUM_SLICES"] == "2" and megascale["MEGASCALE_PORT"] == "8080"
        assert megascale["MEGASCALE_COORDINATOR_ADDRESS"] == "tessera-t-slice-0-0.tessera-t"
        assert megascale["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['jobset.sigs.k8s.io/job-index']"


def test_schema_catches_a_broken_manifest(tmp_path, jobset_schema):
    manifest = jobset_manifest(job(tmp_path, batch=16), tpu_slice("v5e-16"), name="tessera-t", image="img")
    manifest["spec"]["replicatedJobs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        jobset_schema.validate(manifest)


def test_gke_checks_and_xpk_command(tmp_path):
    j = job(tmp_path, batch=16)
    v5e16 = tpu_slice("v5e-16")
    with pytest.raises(ConfigError, match="DNS-1123 label"):
        jobset_manifest(j, v5e16, name="Tessera_Run", image="img")
    with pytest.raises(ConfigError, match="--tpu v5e-16 gives 4 processes"):
        jobset_manifest(job(tmp_path, "mesh.data=3", batch=12), v5e16, name="t", image="img")
    with pytest.raises(ConfigError, match=r"add mesh\.dcn_data=2"):
        jobset_manifest(job(tmp_path, batch=512), tpu_slice("v5e-256x2"), name="t", image="img")

    local = job(tmp_path, f"run.dir={tmp_path}/run", batch=16)
    for launch in (lambda: jobset_manifest(local, v5e16, name="t", image="img"), lambda: plan(local, tpu="v5e-16")):
        with pytest.raises(ConfigError, match=r"runs on 4 hosts, which share no filesystem.*run.dir=gs://BUCKET/runs/run"):
            launch()
    plan(job(tmp_path, f"run.dir={tmp_path}/run", batch=8), tpu="v5e-4")  # one host: its own disk will do

    argv = xpk_command(j, v5e16, name="tessera-t", image="img", cluster="c1", env={"A": "x y"})
    assert argv[:3] == ["xpk", "workload", "create"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags == {"--cluster": "c1", "--workload": "tessera-t", "--docker-image": "img",
                     "--tpu-type": "v5litepod-16", "--num-slices": "1",
                     "--command": "TESSERA_DISTRIBUTED=auto A='x y' " + j.shell_words()}


def test_run_gke_dry_run_prints_and_writes_the_manifest(tmp_path, capsys):
    manifest = jobset_manifest(job(tmp_path, batch=16), tpu_slice("v5e-16"), name="tessera-t", image="img")
    path = tmp_path / "gke" / "jobset.yaml"
    assert run_gke(manifest, path, dry_run=True) == 0
    assert yaml.safe_load(path.read_text()) == manifest
    assert yaml.safe_load(capsys.readouterr().out) == manifest
