"""ops/: the TPU VM scripts, their Makefile targets and `make compare`, run against a fake `gcloud`.

The fake records every argv and can act as the TPU: it runs `ssh --command` with bash in a local "remote home"
and makes `scp` copy to and from it, so the shell that goes to the workers is executed, not just compared.
`compare.sh` runs in a throwaway git repo whose commits carry stand-in `sid.train` / `sid.eval` modules.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "ops"
PY = sys.executable

FAKE_GCLOUD = f"""#!{PY}
import json, os, re, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
env = os.environ.get
home = env("FAKE_GCLOUD_HOME")
flags = {{a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}}
words = [a for a in args if not a.startswith("--")]
if words[:3] == ["config", "get-value", "project"]:
    print(env("FAKE_GCLOUD_PROJECT", ""))
    sys.exit(0)
verb = words[3] if words[:3] == ["compute", "tpus", "tpu-vm"] else None
if verb == "create":
    zone = flags["--zone"]
    if zone in env("FAKE_GCLOUD_NO_CAPACITY", "").split(","):
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) " + env("FAKE_GCLOUD_MESSAGE", "").replace("ZONE", zone))
    if zone in env("FAKE_GCLOUD_DENIED", "").split(","):
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: tpu.nodes.create denied")
    print("Create request issued for: [" + words[4] + "]")
elif verb == "ssh" and home and "--command" in flags:
    command = flags["--command"].replace("/tmp/libtpu_lockfile", env("FAKE_GCLOUD_LOCKFILE", "/nonexistent/lock"))
    if env("FAKE_GCLOUD_SKIP") and re.search(env("FAKE_GCLOUD_SKIP"), command):
        sys.exit(0)
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env={{**os.environ, "HOME": home}}).returncode)
elif verb == "scp" and home:
    *sources, dest = words[4:]
    local = lambda p: os.path.join(home, p.split(":", 1)[1]) if ":" in p else p
    for src in map(local, sources):
        target = os.path.join(local(dest), os.path.basename(src)) if local(dest).endswith("/") else local(dest)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, target)
        if env("FAKE_GCLOUD_CORRUPT_SCP"):
            open(target, "a").write("x")
"""

FAKE_UV = f"""#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_UV_LOG"
if [ "$1" = venv ]; then mkdir -p .venv/bin; printf '#!/bin/sh\\nexec {PY} "$@"\\n' > .venv/bin/python;
  chmod +x .venv/bin/python; fi
"""

# What bootstrap must install next to the package: jax[tpu] in pyproject's jax range.
JAX_TPU = next(
    d.replace("jax", "jax[tpu]", 1)
    for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if d.startswith("jax") and d[3:4] in "<>=!~"
)

CAPACITY_MESSAGES = [
    'There is no more capacity in the zone "ZONE"; you can try in another zone where Cloud TPU Nodes are offered',
    "RESOURCE_EXHAUSTED: Insufficient resources in ZONE",
    "Quota limit 'TPUV6EPreemptiblePodPerProjectPerZoneForTPUAPI' has been exceeded in ZONE",
]


@pytest.fixture
def gcloud(tmp_path):
    """A fake gcloud first on PATH; returns (env, calls) where calls() lists the recorded argv (no 'gcloud')."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("uv", FAKE_UV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_GCLOUD_LOG": str(log),
        "FAKE_UV_LOG": str(tmp_path / "uv_calls.txt"),
        "SID_TPU_STATE_DIR": str(tmp_path / "state"),
        "TMPDIR": str(tmp_path),
    }

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


@pytest.fixture
def remote(tmp_path, gcloud):
    """A fake worker home with a checkout directory; ssh/scp of the fake gcloud act on it."""
    env, _ = gcloud
    home = tmp_path / "remote"
    (home / "sid").mkdir(parents=True)
    env["FAKE_GCLOUD_HOME"] = str(home)
    return home


@pytest.fixture(scope="module")
def no_gcloud_path(tmp_path_factory):
    """A PATH with every command of the real PATH except gcloud (which this machine has installed)."""
    farm = tmp_path_factory.mktemp("nogcloud")
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            if entry.name != "gcloud" and not (farm / entry.name).exists():
                os.symlink(entry.path, farm / entry.name)
    return str(farm)


def ops(script: str, *args: str, env: dict, cwd: Path | None = None, root: Path = REPO):
    return subprocess.run(
        [str(root / "ops" / script), *args], env=env, cwd=cwd or root, capture_output=True, text=True, timeout=120
    )


def ssh_argv(worker: str, command: str, name="t1", zone="z", project="p") -> list[str]:
    return [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        name,
        f"--zone={zone}",
        f"--project={project}",
        f"--worker={worker}",
        f"--command={command}",
    ]


def create_argv(zone: str, *, type_="v6e-8", version="v6e-ubuntu-2404", extra=("--spot",)) -> list[str]:
    return [
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "t1",
        f"--zone={zone}",
        f"--accelerator-type={type_}",
        f"--version={version}",
        "--project=p",
        *extra,
    ]


# --- tpu_create ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", CAPACITY_MESSAGES)
def test_create_falls_back_to_the_next_zone(gcloud, tmp_path, message):
    env, calls = gcloud
    env |= {"FAKE_GCLOUD_NO_CAPACITY": "us-east5-b", "FAKE_GCLOUD_MESSAGE": message}
    r = ops(
        "tpu_create.sh", "--name", "t1", "--zones", "us-east5-b,us-east1-d,europe-west4-a", "--project", "p", env=env
    )
    assert r.returncode == 0, r.stderr
    assert calls() == [create_argv("us-east5-b"), create_argv("us-east1-d")]
    assert "zone: us-east1-d" in r.stdout and "make tpu-bootstrap TPU_NAME=t1" in r.stdout
    assert message.replace("ZONE", "us-east5-b") in r.stderr  # gcloud's own message is still shown
    assert (tmp_path / "state" / "t1").read_text() == "zone=us-east1-d\nproject=p\n"


def test_create_stops_at_an_error_that_is_not_capacity(gcloud):
    env, calls = gcloud
    env |= {"FAKE_GCLOUD_DENIED": "z1"}
    r = ops("tpu_create.sh", "--name", "t1", "--zones", "z1,z2", "--project", "p", env=env)
    assert r.returncode != 0
    assert calls() == [create_argv("z1")]
    assert "other than capacity or quota" in r.stderr and "PERMISSION_DENIED" in r.stderr


def test_create_fails_when_every_zone_is_full(gcloud, tmp_path):
    env, calls = gcloud
    env |= {"FAKE_GCLOUD_NO_CAPACITY": "z1,z2", "FAKE_GCLOUD_MESSAGE": CAPACITY_MESSAGES[0]}
    r = ops("tpu_create.sh", "--name", "t1", "--zones", "z1,z2", "--project", "p", env=env)
    assert r.returncode != 0
    assert calls() == [create_argv("z1"), create_argv("z2")]
    assert "in any of: z1 z2" in r.stderr and "--on-demand" in r.stderr
    assert not (tmp_path / "state" / "t1").exists()


@pytest.mark.parametrize(
    "type_, version",
    [
        ("v6e-8", "v6e-ubuntu-2404"),
        ("v6e-16", "v6e-ubuntu-2404"),
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5e-4", "v2-alpha-tpuv5-lite"),
    ],
)
def test_create_runtime_version_follows_the_type(gcloud, type_, version):
    env, calls = gcloud
    r = ops(
        "tpu_create.sh",
        "--name",
        "t1",
        "--zones",
        "z1",
        "--type",
        type_,
        "--project",
        "p",
        "--on-demand",
        "--async",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    api_type = type_.replace("v5e-", "v5litepod-")
    assert calls() == [create_argv("z1", type_=api_type, version=version, extra=("--async",))]
    assert "being created" in r.stdout


def test_create_unknown_type_needs_a_version(gcloud):
    env, calls = gcloud
    r = ops("tpu_create.sh", "--name", "t1", "--zones", "z1", "--type", "v5p-8", "--project", "p", env=env)
    assert r.returncode != 0 and "pass --version" in r.stderr and calls() == []
    r = ops(
        "tpu_create.sh",
        "--name",
        "t1",
        "--zones",
        "z1",
        "--type",
        "v5p-8",
        "--version",
        "v2-alpha-tpuv5",
        "--project",
        "p",
        env=env,
    )
    assert r.returncode == 0 and calls() == [create_argv("z1", type_="v5p-8", version="v2-alpha-tpuv5")]


def test_create_project_from_gcloud_config(gcloud):
    env, calls = gcloud
    r = ops("tpu_create.sh", "--name", "t1", "--zones", "z1", env=env)
    assert r.returncode != 0 and "pass --project" in r.stderr and "gcloud config set project" in r.stderr
    assert calls() == [["config", "get-value", "project"]]
    env["FAKE_GCLOUD_PROJECT"] = "p"
    r = ops("tpu_create.sh", "--name", "t1", "--zones", "z1", env=env)
    assert r.returncode == 0, r.stderr
    assert calls()[1:] == [["config", "get-value", "project"], create_argv("z1")]


def test_create_dry_run_prints_each_zone_and_runs_nothing(gcloud):
    env, calls = gcloud
    r = ops("tpu_create.sh", "--name=t1", "--zones=z1,z2", "--project=p", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert [shlex.split(line) for line in r.stdout.splitlines()] == [
        ["gcloud", *create_argv("z1")],
        ["gcloud", *create_argv("z2")],
    ]
    assert calls() == []


# --- tpu_bootstrap --------------------------------------------------------------------------------------------------


def test_bootstrap_command(gcloud):
    env, calls = gcloud
    args = ["--name", "t1", "--zone", "z", "--project", "p", "--repo", "https://example.com/o/sid.git", "--ref", "v1.2"]
    r = ops("tpu_bootstrap.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    [call] = calls()
    assert call[:-1] == ssh_argv("all", "")[:-1]
    command = call[-1].removeprefix("--command=")
    statements = command.split("; ")
    assert "else git clone --quiet https://example.com/o/sid.git sid; fi" in command
    assert "git -C sid fetch --quiet origin v1.2" in statements
    assert "git -C sid checkout --quiet --detach FETCH_HEAD" in statements
    assert "uv venv --allow-existing --python 3.12 .venv" in statements
    install = next(s for s in statements if s.startswith("uv pip install"))
    assert shlex.split(install) == [
        "uv",
        "pip",
        "install",
        "--python",
        ".venv/bin/python",
        "-e",
        ".",
        JAX_TPU,
    ]
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    dry = ops("tpu_bootstrap.sh", *args, "--dry-run", env=env)
    assert shlex.split(dry.stdout) == ["gcloud", *call] and len(calls()) == 1


def _git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


# Stand-ins for the entry points, one version per commit: they write what the real ones write, with numbers
# that say which commit ran, and record where their code, working directory and data root were.
FAKE_TRAIN = '''"""Stand-in for sid.train: writes run_summary.json and metrics.jsonl."""
import argparse, json, os, sys
from pathlib import Path
LOSS = {loss}
p = argparse.ArgumentParser()
p.add_argument("--config")
p.add_argument("--train.output-dir", dest="out")
p.add_argument("--eval.no-enabled", dest="no_eval", action="store_true")
p.add_argument("--wandb.name")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True)
with open(out / "metrics.jsonl", "w") as f:
    for step in (1, 2, 3):
        f.write(json.dumps({{"step": step, "loss": LOSS + 0.1 * (3 - step)}}) + "\\n")
facts = {{"code": str(Path(__file__).resolve()), "cwd": os.getcwd(), "data_root": os.environ.get("SID_DATA_ROOT"),
          "config_text": Path(a.config).read_text(), "train_eval_disabled": a.no_eval,
          "dotenv_beside_code": (Path(__file__).parents[1] / ".env").is_file(),
          "env_key_set": "WANDB_API_KEY" in os.environ, "argv": sys.argv[1:]}}
summary = {{"config": {{"train": {{"output_dir": a.out}}}}, "facts": facts, "git_sha": "x", "versions": {{}},
           "train": {{"steps": 3, "final_loss": LOSS, "tokens_per_s": 1000.0 / LOSS, "step_time_s": LOSS}}}}
(out / "run_summary.json").write_text(json.dumps(summary))
'''
FAKE_EVAL = '''"""Stand-in for sid.eval: writes OUTPUT_DIR/run_summary.json for a trained run directory."""
import argparse, json, sys
from pathlib import Path
HR10 = {hr10}
if {fail}:
    sys.exit("simulated evaluation failure")
p = argparse.ArgumentParser()
p.add_argument("--config")
p.add_argument("--eval.checkpoint", dest="checkpoint")
p.add_argument("--output-dir", dest="out")
p.add_argument("--wandb.name")
a = p.parse_args()
assert (Path(a.checkpoint) / "run_summary.json").is_file(), "no trained run"
Path(a.out).mkdir(parents=True)
summary = {{"config": {{"eval": {{"checkpoint": a.checkpoint}}}}, "argv": sys.argv[1:],
           "eval": {{"hr": {{"10": HR10}}, "ndcg": {{"10": HR10 / 2}}, "n_samples": 8, "invalid_prediction_count": 0}}}}
(Path(a.out) / "run_summary.json").write_text(json.dumps(summary))
'''
VERSIONS = {"v1": (0.5, 0.1, False), "v2": (0.4, 0.2, False), "v3-broken": (0.3, 0.3, True)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A throwaway repo with this ops/ and sid/compare.py, stand-in entry points, and tags v1, v2, v3-broken."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(OPS, root / "ops")
    (root / "sid").mkdir()
    (root / "sid" / "__init__.py").write_text("")
    for module in ("compare.py", "atomic.py"):  # sid.compare and what it imports
        shutil.copy(REPO / "sid" / module, root / "sid" / module)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "configs").mkdir()
    (root / "configs" / "train.yaml").write_text("train:\n  max_steps: 3\n")
    (root / "configs" / "eval.yaml").write_text("eval:\n  num_beams: 4\n")
    (root / ".gitignore").write_text("workdir/\n.env\n.venv/\n__pycache__/\n")
    (root / "Makefile").write_text(f"BIN := {Path(PY).parent}\nSTAMP := {PY}\ninclude ops/ops.mk\n")
    _git(root, "init", "-q", "-b", "main")
    for tag, (loss, hr10, fail) in VERSIONS.items():
        (root / "sid" / "train.py").write_text(FAKE_TRAIN.format(loss=loss))
        (root / "sid" / "eval.py").write_text(FAKE_EVAL.format(hr10=hr10, fail=fail))
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", tag)
        _git(root, "tag", tag)
    _git(root, "remote", "add", "origin", str(root))
    return root


def test_bootstrap_defaults_and_rerun_on_a_fake_worker(gcloud, remote, project):
    """The real remote script runs (with a fake uv): clone at one ref, then a re-run moves the checkout."""
    env, calls = gcloud
    shutil.rmtree(remote / "sid")
    for tag in ("v1", "v2"):
        r = ops(
            "tpu_bootstrap.sh", "--name", "t1", "--zone", "z", "--project", "p", "--ref", tag, env=env, root=project
        )
        assert r.returncode == 0, r.stderr
        assert _git(remote / "sid", "rev-parse", "HEAD") == _git(project, "rev-parse", tag)
    assert f"git clone --quiet {project} sid" in calls()[0][-1]  # origin of the checkout running the script
    assert (remote / "sid" / ".venv" / "bin" / "python").is_file()
    uv = (Path(env["FAKE_UV_LOG"])).read_text().splitlines()
    assert uv[:2] == [
        "uv venv --allow-existing --python 3.12 .venv",
        f"uv pip install --python .venv/bin/python -e . {JAX_TPU}",
    ]
    r = ops("tpu_bootstrap.sh", "--name", "t1", "--zone", "z", "--project", "p", env=env, root=project)
    assert r.returncode == 0 and f"fetch --quiet origin {_git(project, 'rev-parse', 'HEAD')}" in calls()[-1][-1]


def test_bootstrap_without_origin_says_pass_repo(gcloud, tmp_path):
    env, _ = gcloud
    root = tmp_path / "bare_checkout"
    shutil.copytree(OPS, root / "ops")
    _git(root, "init", "-q")
    r = ops("tpu_bootstrap.sh", "--name", "t1", "--zone", "z", "--project", "p", env=env, root=root)
    assert r.returncode != 0 and "pass --repo URL" in r.stderr


# --- tpu_ssh -------------------------------------------------------------------------------------------------------


def test_ssh_all_workers_with_env_file_propagates_the_exit_code(gcloud, remote):
    env, calls = gcloud
    (remote / "sid" / ".env").write_text("WANDB_API_KEY=abc123\nexport OTHER='x y'\n")
    user_command = 'printf "%s|%s" "$WANDB_API_KEY" "$OTHER" > seen.txt; exit 7'
    args = ["--name", "t1", "--zone", "z", "--project", "p", "--worker", "all", "--env-file", ".env", "--"]
    r = ops("tpu_ssh.sh", *args, user_command, env=env)
    assert r.returncode == 7, r.stderr
    [call] = calls()
    assert call[:-1] == ssh_argv("all", "")[:-1]
    command = call[-1].removeprefix("--command=")
    assert command.startswith("cd sid ||") and command.endswith("; " + user_command)
    assert (remote / "sid" / "seen.txt").read_text() == "abc123|x y"
    dry = ops("tpu_ssh.sh", "--dry-run", *args, user_command, env=env)
    assert shlex.split(dry.stdout) == ["gcloud", *call]


FAKE_SUDO = """#!/usr/bin/env bash
echo "sudo $*" >> "$FAKE_SUDO_LOG"
while [[ $1 == -* ]]; do shift; done
HOME=$FAKE_ROOT_HOME exec "$@"
"""


def test_ssh_as_root_runs_in_roots_checkout(gcloud, remote, tmp_path):
    """--root (make AS_ROOT=1): the whole remote script runs under sudo from root's home, so the default --dir is
    /root/sid and --env-file is read there; the dry run prints that exact gcloud call."""
    env, calls = gcloud
    root_home = tmp_path / "roothome"
    (root_home / "sid").mkdir(parents=True)
    (root_home / "sid" / ".env").write_text("SECRET=root-copy\n")
    (remote / "sid" / ".env").write_text("SECRET=user-copy\n")
    sudo = Path(env["PATH"].split(":")[0]) / "sudo"
    sudo.write_text(FAKE_SUDO)
    sudo.chmod(0o755)
    env |= {"FAKE_ROOT_HOME": str(root_home), "FAKE_SUDO_LOG": str(tmp_path / "sudo.log")}
    args = ["--name", "t1", "--zone", "z", "--project", "p", "--root", "--env-file", ".env", "--"]
    r = ops("tpu_ssh.sh", *args, 'echo "$PWD $SECRET"; exit 3', env=env)
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == f"{root_home / 'sid'} root-copy"
    [call] = calls()
    command = call[-1].removeprefix("--command=")
    assert shlex.split(command)[:5] == ["sudo", "-n", "-H", "bash", "-c"]
    assert (tmp_path / "sudo.log").read_text().startswith("sudo -n -H bash -c cd; cd sid ||")
    dry = ops("tpu_ssh.sh", "--dry-run", *args, 'echo "$PWD $SECRET"; exit 3', env=env)
    assert shlex.split(dry.stdout) == ["gcloud", *call]
    # Without --root nothing changes: the user's checkout.
    r = ops("tpu_ssh.sh", *[a for a in args if a != "--root"], 'echo "$PWD $SECRET"', env=env)
    assert r.stdout.strip() == f"{remote / 'sid'} user-copy" and len(calls()) == 2
    # An interactive root shell asks sudo for a login shell on a terminal.
    dry = ops("tpu_ssh.sh", "--dry-run", "--name", "t1", "--zone", "z", "--project", "p", "--root", env=env)
    assert shlex.split(dry.stdout)[-4:] == ["--worker=0", "--command=sudo -i", "--", "-t"]


def test_ssh_missing_env_file_fails_with_a_hint(gcloud, remote):
    env, _ = gcloud
    r = ops("tpu_ssh.sh", "--name", "t1", "--zone", "z", "--project", "p", "--env-file", ".env", "--", "true", env=env)
    assert r.returncode == 2 and "tpu_sync_env.sh" in r.stderr


def test_ssh_removes_only_a_stale_libtpu_lockfile(gcloud, remote, tmp_path):
    env, _ = gcloud
    lock = tmp_path / "libtpu_lockfile"
    env["FAKE_GCLOUD_LOCKFILE"] = str(lock)
    args = ["--name", "t1", "--zone", "z", "--project", "p", "--", "echo ran"]
    lock.write_text("")
    r = ops("tpu_ssh.sh", *args, env=env)
    assert r.returncode == 0 and "ran" in r.stdout and "removed stale" in r.stderr and not lock.exists()

    lock.write_text("")
    holder = subprocess.Popen(["bash", "-c", f"exec 3<{lock}; exec sleep 60"])
    try:
        for _ in range(100):  # wait until the holder has the file open
            fds = Path(f"/proc/{holder.pid}/fd")
            if any(os.path.realpath(fd) == str(lock) for fd in fds.iterdir() if fd.is_symlink()):
                break
            time.sleep(0.05)
        r = ops("tpu_ssh.sh", *args, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0 and lock.exists() and f"held by pid(s) {holder.pid}" in r.stderr


# --- tpu_sync_env --------------------------------------------------------------------------------------------------


def test_sync_env_cleans_copies_protects_and_verifies(gcloud, remote, tmp_path):
    env, calls = gcloud
    local = tmp_path / "local.env"
    local.write_bytes(b"\xef\xbb\xbfWANDB_API_KEY=sekrit-123 \r\nexport HF_TOKEN=hf_abc\t\r\n# note\r\nLAST=1")
    r = ops("tpu_sync_env.sh", "--name", "t1", "--zone", "z", "--project", "p", "--env-file", str(local), env=env)
    assert r.returncode == 0, r.stderr
    scp, ssh = calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5:] == [
        "t1:sid/.env",
        "--zone=z",
        "--project=p",
        "--worker=all",
    ]
    assert Path(scp[4]).name == ".env" and str(tmp_path) in scp[4] and not Path(scp[4]).exists()  # temp, removed
    copied = remote / "sid" / ".env"
    assert copied.read_bytes() == b"WANDB_API_KEY=sekrit-123\nexport HF_TOKEN=hf_abc\n# note\nLAST=1\n"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert ssh[:-1] == ssh_argv("all", "")[:-1] and "sha256sum --check" in ssh[-1]
    assert "WANDB_API_KEY,HF_TOKEN,LAST" in r.stderr and "CRLF removed from 3 lines" in r.stderr
    assert "sekrit" not in r.stdout + r.stderr and "hf_abc" not in r.stdout + r.stderr


def test_sync_env_detects_a_corrupted_copy(gcloud, remote, tmp_path):
    env, _ = gcloud
    env["FAKE_GCLOUD_CORRUPT_SCP"] = "1"
    local = tmp_path / "local.env"
    local.write_text("WANDB_API_KEY=k\n")
    r = ops("tpu_sync_env.sh", "--name", "t1", "--zone", "z", "--project", "p", "--env-file", str(local), env=env)
    assert r.returncode != 0 and "verification" in r.stderr


# --- tpu_delete and the recorded zone -------------------------------------------------------------------------------


def test_delete_uses_the_zone_create_recorded(gcloud, tmp_path):
    env, calls = gcloud
    env |= {"FAKE_GCLOUD_NO_CAPACITY": "z1", "FAKE_GCLOUD_MESSAGE": CAPACITY_MESSAGES[1]}
    assert ops("tpu_create.sh", "--name", "t1", "--zones", "z1,z2", "--project", "p", env=env).returncode == 0
    r = ops("tpu_delete.sh", "--name", "t1", "--quiet", "--async", env=env)
    assert r.returncode == 0, r.stderr
    assert calls()[-1] == [
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "t1",
        "--zone=z2",
        "--project=p",
        "--quiet",
        "--async",
    ]
    assert not (tmp_path / "state" / "t1").exists()


# --- what is missing, and what to do ---------------------------------------------------------------------------------

TARGET = ["--zone", "z", "--project", "p"]
SCRIPTS = {
    "tpu_create.sh": ["--zones", "z", "--project", "p"],
    "tpu_bootstrap.sh": [*TARGET, "--repo", "r", "--ref", "x"],
    "tpu_ssh.sh": [*TARGET, "--", "true"],
    "tpu_sync_env.sh": TARGET,
    "tpu_delete.sh": TARGET,
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_gcloud(script, no_gcloud_path, tmp_path):
    env = {**os.environ, "PATH": no_gcloud_path, "SID_TPU_STATE_DIR": str(tmp_path)}
    r = ops(script, "--name", "t1", *SCRIPTS[script], env=env)
    assert r.returncode != 0 and "gcloud not found" in r.stderr and "install" in r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_name(script, gcloud):
    env, calls = gcloud
    r = ops(script, *SCRIPTS[script], env=env)
    assert r.returncode != 0 and "pass --name NAME" in r.stderr and calls() == []


@pytest.mark.parametrize("script", ["tpu_bootstrap.sh", "tpu_ssh.sh", "tpu_sync_env.sh", "tpu_delete.sh"])
def test_missing_zone(script, gcloud):
    env, calls = gcloud
    r = ops(script, "--name", "t1", "--project", "p", env=env)
    assert r.returncode != 0 and "pass --zone ZONE" in r.stderr and calls() == []


def test_missing_zones_for_create(gcloud):
    env, _ = gcloud
    r = ops("tpu_create.sh", "--name", "t1", "--project", "p", env=env)
    assert r.returncode != 0 and "pass --zones" in r.stderr


def test_dry_run_needs_no_gcloud(no_gcloud_path, tmp_path):
    env = {**os.environ, "PATH": no_gcloud_path, "SID_TPU_STATE_DIR": str(tmp_path)}
    r = ops("tpu_delete.sh", "--name", "t1", *TARGET, "--dry-run", env=env)
    assert r.returncode == 0 and shlex.split(r.stdout) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "t1",
        "--zone=z",
        "--project=p",
    ]


def test_help(gcloud):
    env, _ = gcloud
    for script in [*SCRIPTS, "compare.sh"]:
        r = ops(script, "--help", env=env)
        assert r.returncode == 0 and r.stdout.startswith(("Create", "Install", "Run", "Copy", "Delete", "A/B"))


# --- Makefile targets ------------------------------------------------------------------------------------------------


def test_make_targets_pass_variables_through(gcloud, remote, project):
    env, calls = gcloud
    make = ["make", "-s", "-C", str(project)]
    r = subprocess.run(
        [*make, "tpu-create", "TPU_NAME=t1", "ZONES=z1,z2", "PROJECT=p", "ON_DEMAND=1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert calls() == [create_argv("z1", extra=())]
    # Quotes and $ in CMD reach the worker untouched; the zone comes from what tpu-create recorded.
    r = subprocess.run(
        [*make, "tpu-ssh", "TPU_NAME=t1", "WORKER=all", """CMD=echo "it's $0" > seen.txt"""],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert calls()[-1][:-1] == ssh_argv("all", "", zone="z1")[:-1]
    assert (remote / "sid" / "seen.txt").read_text() == "it's bash\n"
    r = subprocess.run(
        [*make, "tpu-delete", "TPU_NAME=t1", "QUIET=1", "DRY_RUN=1"], env=env, capture_output=True, text=True
    )
    assert shlex.split(r.stdout) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "t1",
        "--zone=z1",
        "--project=p",
        "--quiet",
    ]


# --- compare.sh ------------------------------------------------------------------------------------------------------


def _row(name: str, a: float | None, b: float | None) -> str:
    def show(x):
        return "—" if x is None else f"{x:.4f}"

    d = "—" if a is None or b is None else f"{b - a:+.4f}"
    rel = "—" if a is None or b is None else f"{100 * (b - a) / a:+.1f}%"
    return f"| {name} | {show(a)} | {show(b)} | {d} | {rel} |"


def _compare_env(tmp_path) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return {**os.environ, "SID_PYTHON": PY, "SID_DATA_ROOT": str(data)}


def _worktrees(repo: Path) -> list[str]:
    return [ln for ln in _git(repo, "worktree", "list", "--porcelain").splitlines() if ln.startswith("worktree ")]


def _summary(out: Path, side: str, tag: str, project: Path) -> dict:
    sha7 = _git(project, "rev-parse", "--short=7", tag)
    return json.loads((out / "runs" / f"{side}-{sha7}" / "run_summary.json").read_text())


def test_compare_local_two_refs(project, tmp_path):
    out = tmp_path / "out"
    (project / ".env").write_text("WANDB_API_KEY=k\n")
    try:
        r = ops(
            "compare.sh",
            "--a",
            "v1",
            "--b",
            "v2",
            "--train-config",
            "configs/train.yaml",
            "--eval-config",
            "configs/eval.yaml",
            "--out",
            str(out),
            env=_compare_env(tmp_path),
            root=project,
        )
    finally:
        (project / ".env").unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    report = (out / "report.md").read_text()
    (la, ha, _), (lb, hb, _) = VERSIONS["v1"], VERSIONS["v2"]
    for line in (_row("final loss", la, lb), _row("HR@10", ha, hb), _row("NDCG@10", ha / 2, hb / 2)):
        assert line in report.splitlines()
    assert "A = v1 @ " in report and "`configs/train.yaml`" in report
    assert (out / "loss.png").is_file()
    for side, tag in (("a", "v1"), ("b", "v2")):
        facts = _summary(out, side, tag, project)["facts"]
        assert facts["code"] == str(out / side / "sid" / "train.py")  # the worktree's code ran...
        assert facts["cwd"] == str(project)  # ...from the checkout, so relative config paths mean the same files
        assert facts["data_root"] == str(tmp_path / "data")
        assert facts["config_text"] == "train:\n  max_steps: 3\n" and facts["train_eval_disabled"]
        assert facts["dotenv_beside_code"]
    assert not (out / "a").exists() and not (out / "b").exists()
    assert _worktrees(project) == [f"worktree {project}"]


def test_compare_flags_parse_with_the_real_entry_points(project, tmp_path):
    """What compare.sh passes to sid.train and sid.eval (recorded by the stand-ins) is valid for the real CLIs."""
    from sid.config import cli
    from sid.jobs import EvalJob, TrainJob

    out = tmp_path / "out"
    r = ops(
        "compare.sh",
        "--a",
        "v2",
        "--b",
        "v2",
        "--train-config",
        "configs/train.yaml",
        "--eval-config",
        "configs/eval.yaml",
        "--out",
        str(out),
        env=_compare_env(tmp_path),
        root=project,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sha7 = _git(project, "rev-parse", "--short=7", "v2")
    run = out / "runs" / f"a-{sha7}"
    train_argv = json.loads((run / "run_summary.json").read_text())["facts"]["argv"]
    eval_argv = json.loads((run / "eval" / "run_summary.json").read_text())["argv"]
    real = {"train": REPO / "configs/train/cpu/smoke.yaml", "eval": REPO / "configs/eval/cpu/smoke.yaml"}
    for argv, kind in ((train_argv, "train"), (eval_argv, "eval")):
        assert argv[0] == "--config"
        argv[1] = str(real[kind])  # the stand-in presets are not real configs
    train = cli(TrainJob, args=train_argv)
    assert train.train.output_dir == str(run) and not train.eval.enabled and train.wandb.name == f"out-a-{sha7}"
    evaluation = cli(EvalJob, args=eval_argv)
    assert evaluation.eval.checkpoint == str(run) and evaluation.output_dir == str(run / "eval")
    assert evaluation.wandb.name == f"out-a-{sha7}-eval"
    # The same ref twice: both columns, zero deltas.
    loss = VERSIONS["v2"][0]
    assert _row("final loss", loss, loss) in (out / "report.md").read_text()


def test_compare_reports_a_failed_run_and_keeps_the_other(project, tmp_path):
    out = tmp_path / "out"
    r = ops(
        "compare.sh",
        "--a",
        "v1",
        "--b",
        "v3-broken",
        "--train-config",
        "configs/train.yaml",
        "--eval-config",
        "configs/eval.yaml",
        "--out",
        str(out),
        env=_compare_env(tmp_path),
        root=project,
    )
    assert r.returncode == 1
    assert "FAILED: b (v3-broken): evaluation failed" in r.stderr
    report = (out / "report.md").read_text()
    (la, ha, _), (lb, _, _) = VERSIONS["v1"], VERSIONS["v3-broken"]
    assert _row("final loss", la, lb) in report and _row("HR@10", ha, None) in report
    assert "**B**: eval section absent" in report
    assert _worktrees(project) == [f"worktree {project}"]


def test_compare_bad_input(project, tmp_path):
    env = _compare_env(tmp_path)
    base = ["--train-config", "configs/train.yaml", "--eval-config", "configs/eval.yaml"]
    r = ops("compare.sh", "--a", "v1", "--b", "nope", *base, env=env, root=project)
    assert r.returncode != 0 and "unknown ref 'nope'" in r.stderr
    r = ops(
        "compare.sh",
        "--a",
        "v1",
        "--b",
        "v2",
        "--train-config",
        "missing.yaml",
        "--eval-config",
        "x",
        env=env,
        root=project,
    )
    assert r.returncode != 0 and "config file not found: missing.yaml" in r.stderr
    r = ops("compare.sh", "--a", "v1", *base, env=env, root=project)
    assert r.returncode != 0 and "--b REF" in r.stderr


def test_make_tpu_create_compare_on_a_fake_tpu(gcloud, remote, project, tmp_path):
    """`make tpu-create compare WHERE=tpu` as one line: create, bootstrap, sync .env, run both refs on the
    'workers', fetch the run directories and report."""
    env, calls = gcloud
    shutil.rmtree(remote / "sid")
    env.pop("SID_DATA_ROOT", None)
    (project / ".env").write_text("WANDB_API_KEY=k\r\n")
    try:
        r = subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(project),
                "tpu-create",
                "compare",
                "WHERE=tpu",
                "TPU_NAME=t1",
                "ZONES=z1",
                "PROJECT=p",
                "A=v1",
                "B=v2",
                "TRAIN_CONFIG=configs/train.yaml",
                "EVAL_CONFIG=configs/eval.yaml",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        (project / ".env").unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    [out] = list((project / "workdir" / "compare").iterdir())
    report = (out / "report.md").read_text()
    (la, ha, _), (lb, hb, _) = VERSIONS["v1"], VERSIONS["v2"]
    assert _row("final loss", la, lb) in report and _row("HR@10", ha, hb) in report
    for side, tag in (("a", "v1"), ("b", "v2")):
        facts = _summary(out, side, tag, project)["facts"]
        assert facts["code"] == str(remote / "sid" / "workdir" / "compare" / out.name / side / "sid" / "train.py")
        assert facts["cwd"] == str(remote / "sid") and facts["env_key_set"]
    verbs = [c[3] if c[:3] == ["compute", "tpus", "tpu-vm"] else c[0] for c in calls()]
    assert verbs == ["create", "ssh", "scp", "ssh", "ssh", "scp", "ssh", "ssh", "ssh", "scp", "ssh"]
    # The workers' worktrees are gone; their run directories (with checkpoints) stay.
    assert _worktrees(remote / "sid") == [f"worktree {remote / 'sid'}"]
    shutil.rmtree(project / "workdir")


# --- compare.sh --dry-run ---------------------------------------------------------------------------------------------

COMPARE_ARGS = ["--train-config", "configs/train.yaml", "--eval-config", "configs/eval.yaml"]


def _echoed(stderr: str) -> list[str]:
    """The commands a real run echoed ('+ CMD' on stderr, as ops/common.sh's `run` does)."""
    return [line[2:] for line in stderr.splitlines() if line.startswith("+ ")]


def _shas(project: Path) -> dict[str, str]:
    return {"a": _git(project, "rev-parse", "v1"), "b": _git(project, "rev-parse", "v2")}


def _dry_run_setup(out: Path) -> list[list[str]]:
    """The first commands of every compare: the results directory and the presets copied into it."""
    copies = [["cp", f"configs/{k}.yaml", f"{out}/configs/{k}_{s}.yaml"] for s in "ab" for k in ("train", "eval")]
    return [["mkdir", "-p", f"{out}/configs", f"{out}/logs", f"{out}/runs"], *copies]


def _dry_run_report(project: Path, out: Path, sha: dict[str, str]) -> list[str]:
    runs = [f"{out}/runs/{s}-{sha[s][:7]}" for s in "ab"]
    labels = ["--label-a", f"v1 @ {sha['a'][:7]}", "--label-b", f"v2 @ {sha['b'][:7]}"]
    env = ["env", f"PYTHONPATH={project}", "PYTHONSAFEPATH=1"]
    return [*env, PY, "-m", "sid.compare", *runs, "--out", str(out), *labels, *COMPARE_ARGS]


def test_compare_dry_run_local_prints_what_a_run_executes(project, tmp_path):
    """The printed commands, checked by hand and then against a real run with the same arguments: the echoed
    commands match line for line, and the stand-ins received the printed train/eval argv and environment."""
    out = tmp_path / "out"
    env = _compare_env(tmp_path)
    env.pop("PYTHONPATH", None)
    args = ["--a", "v1", "--b", "v2", *COMPARE_ARGS, "--out", str(out)]
    dry = ops("compare.sh", *args, "--dry-run", env=env, root=project)
    assert dry.returncode == 0, dry.stderr
    assert not out.exists() and _worktrees(project) == [f"worktree {project}"]

    sha = _shas(project)
    git = ["git", "-C", str(project), "worktree"]
    expected = [
        *_dry_run_setup(out),
        *([*git, "add", "--detach", "--quiet", f"{out}/{s}", sha[s]] for s in "ab"),
        ["cd", str(project)],
    ]
    for side in "ab":
        run, wandb = f"{out}/runs/{side}-{sha[side][:7]}", f"out-{side}-{sha[side][:7]}"
        env_words = ["env", f"SID_DATA_ROOT={tmp_path / 'data'}", f"PYTHONPATH={out}/{side}", "PYTHONSAFEPATH=1", PY]
        expected += [
            [*env_words, "-m", "sid.train", "--config", f"{out}/configs/train_{side}.yaml"]
            + ["--train.output-dir", run, "--eval.no-enabled", "--wandb.name", wandb],
            [*env_words, "-m", "sid.eval", "--config", f"{out}/configs/eval_{side}.yaml"]
            + ["--eval.checkpoint", run, "--output-dir", f"{run}/eval", "--wandb.name", f"{wandb}-eval"],
        ]
    expected += [
        _dry_run_report(project, out, sha),
        [*git, "remove", "--force", f"{out}/a"],
        [*git, "remove", "--force", f"{out}/b"],
        [*git, "prune"],
    ]
    lines = dry.stdout.splitlines()
    assert [shlex.split(line) for line in lines] == expected

    real = ops("compare.sh", *args, env=env, root=project)
    assert real.returncode == 0, real.stdout + real.stderr
    side_lines = lines[8:12]  # a: train, eval; b: train, eval
    assert _echoed(real.stderr) == lines[:8] + lines[12:]
    for i, (side, tag) in enumerate((("a", "v1"), ("b", "v2"))):
        train, evaluation = (shlex.split(line) for line in side_lines[2 * i : 2 * i + 2])
        summary = _summary(out, side, tag, project)
        assert summary["facts"]["argv"] == train[train.index("sid.train") + 1 :]
        eval_dir = Path(train[train.index("--train.output-dir") + 1]) / "eval"
        assert (
            json.loads((eval_dir / "run_summary.json").read_text())["argv"]
            == evaluation[evaluation.index("sid.eval") + 1 :]
        )
        assert summary["facts"]["data_root"] == train[1].removeprefix("SID_DATA_ROOT=")
        assert summary["facts"]["code"] == f"{train[2].removeprefix('PYTHONPATH=')}/sid/train.py"


def test_compare_dry_run_tpu_prints_the_gcloud_commands_a_run_executes(gcloud, remote, project, tmp_path):
    """--where tpu --dry-run: the tpu scripts' own dry-run lines (gcloud) plus the local steps; then a real run
    with the same arguments on the fake TPU calls gcloud with exactly the printed argv, in order."""
    env, calls = gcloud
    shutil.rmtree(remote / "sid")
    env["SID_PYTHON"] = PY
    out = tmp_path / "cmp1"
    args = ["--a", "v1", "--b", "v2", *COMPARE_ARGS, "--out", str(out)]
    args += ["--where", "tpu", "--name", "t1", "--zone", "z", "--project", "p"]
    dry = ops("compare.sh", *args, "--dry-run", env=env, root=project)
    assert dry.returncode == 0, dry.stderr
    assert calls() == [] and not out.exists()

    sha, base = _shas(project), "workdir/compare/cmp1"
    words = [shlex.split(line) for line in dry.stdout.splitlines()]
    gcloud_calls = [w[1:] for w in words if w[0] == "gcloud"]
    assert [c[3] for c in gcloud_calls] == ["ssh", "ssh", "scp", "ssh", "ssh", "ssh", "scp", "ssh"]
    bootstrap, setup, side_a, side_b, tar, remove = ssh = [c for c in gcloud_calls if c[3] == "ssh"]
    assert [c[:-1] for c in ssh] == [ssh_argv(w, "")[:-1] for w in ("all", "all", "all", "all", "0", "all")]
    assert f"fetch --quiet origin {sha['b']}" in bootstrap[-1]
    assert f"git worktree add --detach --quiet {base}/b {sha['b']}" in setup[-1]
    for side, command in (("a", side_a[-1]), ("b", side_b[-1])):
        assert f"side={side} sha={sha[side][:7]} base={base} py=.venv/bin/python;" in command
        assert f'"$py" -m sid.train --config "$base"/configs/train_{side}.yaml --train.output-dir "$run"' in command
        assert f'"$py" -m sid.eval --config "$base"/configs/eval_{side}.yaml' in command
    assert f"tar -czf {base}/results.tgz" in tar[-1] and f"git worktree remove --force {base}/a" in remove[-1]
    configs = [f"{out}/configs/{k}_{s}.yaml" for k in ("eval", "train") for s in "ab"]
    scp = [f"t1:sid/{base}/configs/", "--zone=z", "--project=p", "--worker=all"]
    assert gcloud_calls[2] == ["compute", "tpus", "tpu-vm", "scp", *configs, *scp]
    assert [w for w in words if w[0] != "gcloud"] == [
        *_dry_run_setup(out),
        ["cd", str(project)],
        ["tar", "-xzf", f"{out}/results.tgz", "-C", str(out)],
        ["rm", "-f", f"{out}/results.tgz"],
        _dry_run_report(project, out, sha),
        ["git", "-C", str(project), "worktree", "prune"],
    ]

    real = ops("compare.sh", *args, env=env, root=project)
    assert real.returncode == 0, real.stdout + real.stderr
    assert calls() == gcloud_calls
    local = [line for line in dry.stdout.splitlines() if not line.startswith("gcloud ")]
    assert [line for line in _echoed(real.stderr) if not line.startswith("gcloud ")] == local
    assert (out / "report.md").is_file()


def test_make_tpu_create_compare_dry_run_uses_the_first_zone(gcloud, project, tmp_path):
    """`make tpu-create compare WHERE=tpu DRY_RUN=1` without ZONE: the dry-run create records its first zone for
    the dry runs after it (never as the real record), so compare prints the commands for that zone."""
    env, calls = gcloud
    state = Path(env["SID_TPU_STATE_DIR"])
    r = subprocess.run(
        ["make", "-s", "-C", str(project), "tpu-create", "compare", "WHERE=tpu", "DRY_RUN=1", "TPU_NAME=t1"]
        + ["ZONES=z1,z2", "PROJECT=p", "A=v1", "B=v2"]
        + ["TRAIN_CONFIG=configs/train.yaml", "EVAL_CONFIG=configs/eval.yaml", f"SID_DATA_ROOT={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    gcloud_lines = [shlex.split(line)[1:] for line in r.stdout.splitlines() if line.startswith("gcloud ")]
    assert gcloud_lines[:2] == [create_argv("z1"), create_argv("z2")]
    assert all("--zone=z1" in line for line in gcloud_lines[2:]) and len(gcloud_lines) > 2
    assert calls() == [] and sorted(p.name for p in state.iterdir()) == ["t1.dry-run"]
    # A real command does not take the dry run's zone.
    r = ops("tpu_ssh.sh", "--name", "t1", "--project", "p", "--", "true", env=env)
    assert r.returncode == 1 and "no zone for TPU 't1'" in r.stderr and calls() == []
    # A real create records the zone it got and drops the dry run's record.
    assert ops("tpu_create.sh", "--name", "t1", "--zones", "z2", "--project", "p", env=env).returncode == 0
    assert sorted(p.name for p in state.iterdir()) == ["t1"] and "zone=z2" in (state / "t1").read_text()


def test_make_compare_dry_run_creates_nothing(project, tmp_path):
    """DRY_RUN=1 reaches compare.sh through the Makefile; the default output directory is not created."""
    compare_dir = project / "workdir" / "compare"
    before = set(compare_dir.iterdir()) if compare_dir.exists() else set()
    r = subprocess.run(
        ["make", "-s", "-C", str(project), "compare", "DRY_RUN=1", "A=v1", "B=v1"]
        + ["TRAIN_CONFIG=configs/train.yaml", "EVAL_CONFIG=configs/eval.yaml"],
        env=_compare_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    [mkdir, *_] = (shlex.split(line) for line in r.stdout.splitlines())
    assert mkdir[:2] == ["mkdir", "-p"] and Path(mkdir[2]).parent.parent == compare_dir
    assert sum("-m sid.train" in line for line in r.stdout.splitlines()) == 2
    assert (set(compare_dir.iterdir()) if compare_dir.exists() else set()) == before
    assert _worktrees(project) == [f"worktree {project}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--a", "v1", "--b", "nope", *COMPARE_ARGS], "unknown ref 'nope'"),
        (["--a", "v1", "--b", "v2", "--train-config", "missing.yaml", "--eval-config", "x"], "config file not found"),
        (["--a", "v1", "--b", "v2", *COMPARE_ARGS, "--where", "tpu", "--zone", "z"], "pass --name NAME"),
    ],
)
def test_compare_dry_run_still_checks_its_input(project, tmp_path, args, message):
    r = ops("compare.sh", *args, "--dry-run", "--out", str(tmp_path / "out"), env=_compare_env(tmp_path), root=project)
    assert r.returncode != 0 and message in r.stderr and r.stdout == ""
    assert not (tmp_path / "out").exists()
