"""The tpu/*.sh scripts: the exact gcloud commands --dry-run prints, that the scripts run
exactly those commands (against a recording stand-in for gcloud), that the remote shell
commands survive quoting (run here in a sandbox home), and the errors users meet."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
BASH = shutil.which("bash")
SCRIPTS = ("create.sh", "setup.sh", "data.sh", "launch.sh", "logs.sh", "delete.sh")
TARGET = ("--name", "rz", "--zone", "us-east5-a")
PAPER_CONFIG = "configs/paper/reczero_amazon_music_qwen2.5-7b_v5p-8.yaml"


@pytest.fixture
def sandbox(tmp_path):
    """Folders for a run: an empty bin (no gcloud, nothing else), a bin holding a gcloud that
    records its arguments, and a TMPDIR."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    calls = tmp_path / "gcloud-calls.jsonl"
    archive_copy = tmp_path / "scp-archive.tar.gz"
    gcloud = fake / "gcloud"
    gcloud.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'scp' in sys.argv:\n"
        f"    shutil.copy(sys.argv[sys.argv.index('scp') + 1], {str(archive_copy)!r})\n"
    )
    gcloud.chmod(0o755)
    for tool in ("tar", "gzip", "rm"):  # what setup.sh runs besides gcloud
        (fake / tool).symlink_to(shutil.which(tool))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {"empty": empty, "fake": fake, "calls": calls, "archive": archive_copy, "tmp": tmp}


def run(sandbox, script, *args, path=None, env=None, stdin=""):
    """Run tpu/SCRIPT under bash with a clean environment (no TPU_* variables leak in)."""
    environment = {"PATH": str(path or sandbox["empty"]), "TMPDIR": str(sandbox["tmp"])}
    environment.update(env or {})
    return subprocess.run(
        [BASH, str(TPU / script), *args],
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def dry(sandbox, script, *args, env=None):
    """The commands SCRIPT prints with --dry-run, each split back into its words."""
    result = run(sandbox, script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def recorded_calls(sandbox):
    if not sandbox["calls"].exists():
        return []
    return [json.loads(line) for line in sandbox["calls"].read_text().splitlines()]


def remote_command(argv):
    """The shell command given to `gcloud ... ssh --command=...`."""
    (command,) = [word.removeprefix("--command=") for word in argv if word.startswith("--command=")]
    return command


def remote_steps(argv):
    """The remote command's steps, each split into its words (no test value holds '; ')."""
    return [shlex.split(step) for step in remote_command(argv).split("; ")]


def ssh(worker, command):
    """The words of `gcloud ... ssh` running COMMAND on WORKER of the test slice."""
    return "gcloud compute tpus tpu-vm ssh rz --zone=us-east5-a".split() + [
        f"--worker={worker}",
        f"--command={command}",
    ]


# --- create ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_create_tpu_vm_with_the_generation_runtime(sandbox, accelerator, runtime):
    commands = dry(sandbox, "create.sh", *TARGET, "--accelerator-type", accelerator)
    expected = f"gcloud compute tpus tpu-vm create rz --zone=us-east5-a --accelerator-type={accelerator}"
    assert commands == [[*expected.split(), f"--version={runtime}"]]


def test_create_queued_spot_resource_in_a_project(sandbox):
    flags = "--accelerator-type=v6e-8 --queued --spot --project my-project --runtime-version v6e-custom"
    commands = dry(sandbox, "create.sh", *TARGET, *flags.split())
    expected = (
        "gcloud compute tpus queued-resources create rz --node-id=rz --zone=us-east5-a "
        "--accelerator-type=v6e-8 --runtime-version=v6e-custom --spot --project=my-project"
    )
    assert commands == [expected.split()]


def test_flags_fall_back_to_tpu_environment_variables(sandbox):
    from_flags = dry(sandbox, "create.sh", *TARGET, "--accelerator-type", "v5p-8", "--queued")
    env = {"TPU_NAME": "rz", "TPU_ZONE": "us-east5-a", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_QUEUED": "1"}
    assert dry(sandbox, "create.sh", env=env) == from_flags
    # A flag wins over its variable.
    overridden = dry(sandbox, "create.sh", "--zone", "europe-west4-b", env=env)
    assert "--zone=europe-west4-b" in overridden[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--accelerator-type", "v5p-8", "--zone", "z"), "--name is required (or set TPU_NAME)"),
        (("--accelerator-type", "v5p-8", "--name", "n"), "--zone is required (or set TPU_ZONE)"),
        (("--name", "n", "--zone", "z"), "--accelerator-type is required (or set TPU_ACCELERATOR_TYPE)"),
        ((*TARGET, "--accelerator-type", "8"), "is not a TPU type such as v5p-8"),
        ((*TARGET, "--accelerator-type", "v9x-8"), "no default runtime version for 'v9x-8'"),
        ((*TARGET, "--accelerator-type", "v5p-8", "--sport"), "unknown flag '--sport'"),
        ((*TARGET, "--accelerator-type"), "--accelerator-type needs a value"),
        ((*TARGET, "--accelerator-type", "v5p-8", "--spot=yes"), "--spot takes no value"),
        ((*TARGET, "--accelerator-type", "v5p-8", "extra"), "unexpected argument 'extra'"),
    ],
)
def test_create_bad_input_fails_clearly(sandbox, args, message):
    result = run(sandbox, "create.sh", *args, "--dry-run")
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


# --- setup ----------------------------------------------------------------------------------


def make_source_tree(root):
    """A small tree to copy: versions to read, and files git ignores that must stay behind."""
    root.mkdir()
    (root / "pyproject.toml").write_text(
        '[project]\nrequires-python = ">=3.12"\ndependencies = [\n  "jax==9.8.7",\n  "jaxlib==9.8.7",\n]\n'
    )
    (root / "Makefile").write_text(
        "assets:\n\t$(PY) -m pip install --quiet --no-deps asset-one==1.2 asset-two==3.4\n"
    )
    (root / ".gitignore").write_text(".venv/\n/runs/\n*.gguf\n# a comment\n\n")
    kept = {"pkg/module.py", "sub/runs/kept.txt", "with space.txt"}
    for name in (*kept, ".venv/bin/python", "runs/1/log", "weights.gguf", ".git/config"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    return root, kept | {"pyproject.toml", "Makefile", ".gitignore"}


def test_setup_copies_the_tree_and_installs_pinned_versions_on_every_worker(sandbox, tmp_path):
    source, _ = make_source_tree(tmp_path / "src")
    tar, scp, install = dry(sandbox, "setup.sh", *TARGET, "--source", str(source))
    archive = f"{sandbox['tmp']}/reczero-jax-src-rz.tar.gz"
    excludes = "--exclude=.git --exclude=.venv --exclude=./runs --exclude=*.gguf"
    assert tar == [
        "tar",
        "--create",
        "--gzip",
        f"--file={archive}",
        *excludes.split(),
        f"--directory={source}",
        ".",
    ]
    assert scp == [
        *"gcloud compute tpus tpu-vm scp".split(),
        archive,
        "rz:reczero-jax-src.tar.gz",
        "--zone=us-east5-a",
        "--worker=all",
    ]
    assert install[:-1] == ssh("all", "")[:-1]
    steps = remote_command(install).split("; ")
    assert steps[:5] == [
        "set -e",
        "mkdir -p reczero-jax",
        "tar -xzf reczero-jax-src.tar.gz -C reczero-jax",
        "rm -f reczero-jax-src.tar.gz",
        "cd reczero-jax",
    ]
    # Versions from pyproject.toml and the Makefile, not constants in the script.
    uv = "~/.local/bin/uv"
    for step in (
        f"test -x .venv/bin/python || {uv} venv --python 3.12 .venv",
        f"{uv} pip install --python .venv/bin/python -e . jax[tpu]==9.8.7 etils[epath-gcs]",
        f"{uv} pip install --python .venv/bin/python --no-deps asset-one==1.2 asset-two==3.4",
    ):
        assert step.split() in remote_steps(install)


def test_setup_pins_this_repository_jax_version(sandbox):
    pin = re.search(r'"jax==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assets = re.search(r"--no-deps (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    *_, install = dry(sandbox, "setup.sh", *TARGET)
    installs = [step for step in remote_steps(install) if step[1:3] == ["pip", "install"]]
    assert [step[5:] for step in installs] == [
        ["-e", ".", f"jax[tpu]=={pin}", "etils[epath-gcs]"],
        ["--no-deps", *assets],
    ]


def test_setup_archive_leaves_ignored_files_behind(sandbox, tmp_path):
    source, kept = make_source_tree(tmp_path / "src")
    result = run(sandbox, "setup.sh", *TARGET, "--source", str(source), path=sandbox["fake"])
    assert result.returncode == 0, result.stderr
    members = subprocess.run(
        ["tar", "-tzf", str(sandbox["archive"])], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    files = {member.removeprefix("./") for member in members if not member.endswith("/")}
    assert files == kept
    assert not (sandbox["tmp"] / "reczero-jax-src-rz.tar.gz").exists(), "local archive not removed"


def test_setup_from_git(sandbox):
    *earlier, install = dry(
        sandbox, "setup.sh", *TARGET, "--git", "https://example.org/r z.git", "--ref", "v1.0"
    )
    assert earlier == [], "nothing is copied from here with --git"
    steps = remote_command(install).split("; ")
    assert steps[1:4] == [
        'test -d reczero-jax/.git || git clone --quiet "https://example.org/r z.git" reczero-jax',
        "git -C reczero-jax fetch --quiet origin v1.0",
        "git -C reczero-jax checkout --quiet --detach FETCH_HEAD",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--git", "u", "--source", "."), "--source and --git exclude each other"),
        (("--ref", "v1"), "--ref needs --git"),
        (("--source", "/no/such/dir"), "is not a directory"),
    ],
)
def test_setup_bad_input_fails_clearly(sandbox, args, message):
    result = run(sandbox, "setup.sh", *TARGET, *args, "--dry-run")
    assert result.returncode != 0 and message in result.stderr


# --- data -----------------------------------------------------------------------------------


def test_data_upload_download_and_mount(sandbox, tmp_path):
    upload = dry(sandbox, "data.sh", "--src", str(tmp_path), "--dest", "gs://bkt/d", "--project", "p")
    assert upload == [
        "gcloud storage rsync --recursive".split() + [str(tmp_path), "gs://bkt/d", "--project=p"]
    ]
    (download,) = dry(
        sandbox, "data.sh", *TARGET, "--src", "gs://bkt/data/music", "--dest", "reczero-jax/data/amazon music"
    )
    assert download == ssh(
        "all",
        'set -e; mkdir -p "reczero-jax/data/amazon music"; gcloud storage '
        'rsync --recursive gs://bkt/data/music "reczero-jax/data/amazon music"',
    )
    (mount,) = dry(sandbox, "data.sh", *TARGET, "--mount", "gs://bkt/")
    assert mount[:-1] == ssh("all", "")[:-1]
    steps = remote_command(mount).split("; ")
    assert steps[-3:] == [
        "sudo mkdir -p /mnt/bkt",
        'sudo chown "$USER" /mnt/bkt',
        "mountpoint -q /mnt/bkt || gcsfuse --implicit-dirs bkt /mnt/bkt",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "nothing to do"),
        (("--src", "gs://a/x", "--dest", "gs://b/y"), "both gs://"),
        (("--src", ".", "--dest", "elsewhere"), "one of --src and --dest must be gs://"),
        (("--src", "/no/such/dir", "--dest", "gs://b/y"), "is not a local directory"),
        (("--src", "gs://b/y"), "--src and --dest go together"),
        (("--src", "gs://b/y", "--dest", "d"), "--name is required"),
        (("--mount", "gs://b/some/dir", *TARGET), "gcsfuse mounts whole buckets"),
        (("--mount-point", "/mnt/x"), "--mount-point needs --mount"),
    ],
)
def test_data_bad_input_fails_clearly(sandbox, args, message):
    result = run(sandbox, "data.sh", *args, "--dry-run")
    assert result.returncode != 0 and message in result.stderr


# --- launch, logs ---------------------------------------------------------------------------

OVERRIDES = (
    "model.path=/mnt/bkt/models/Qwen2.5-7B-Instruct",
    "run.name=music 7b",
    "note=it's $HOME",
    'quoted="x"',
    "optim.lr=-1e-6",
)
LIBTPU_ENV = "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2"


def test_launch_runs_the_same_train_command_on_every_worker(sandbox):
    (command,) = dry(
        sandbox, "launch.sh", *TARGET, "--env", LIBTPU_ENV, PAPER_CONFIG, *OVERRIDES, "--", "--resume"
    )
    assert command[:-1] == ssh("all", "")[:-1]
    words = shlex.split(remote_command(command))
    start, end = words.index("nohup"), words.index(">logs/train.log")
    assert words[start:end] == [
        *"nohup env PYTHONUNBUFFERED=1".split(),
        LIBTPU_ENV,
        *".venv/bin/reczero train".split(),
        PAPER_CONFIG,
        *OVERRIDES,
        "--resume",
    ]


def make_worker_home(tmp_path):
    """A worker's login directory with a stand-in reczero that records how it was started."""
    home = tmp_path / "worker"
    reczero = home / "reczero-jax" / ".venv" / "bin" / "reczero"
    reczero.parent.mkdir(parents=True)
    record = home / "started.json"
    reczero.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print('training log line')\n"
        "state = {'argv': sys.argv[1:], 'pid': os.getpid(), 'cwd': os.getcwd(),\n"
        "         'env': {k: os.environ.get(k) for k in ('PYTHONUNBUFFERED', 'LIBTPU_INIT_ARGS')}}\n"
        f"open({str(record) + '.part'!r}, 'w').write(json.dumps(state))\n"
        f"os.replace({str(record) + '.part'!r}, {str(record)!r})\n"
    )
    reczero.chmod(0o755)
    return home, record


def run_on_worker(command, home):
    """Run a remote --command as the worker's login shell would, in its home."""
    return subprocess.run(
        [BASH, "-c", command],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
    )


def test_launch_command_starts_the_job_in_the_background_on_a_worker(sandbox, tmp_path):
    home, record = make_worker_home(tmp_path)
    (command,) = dry(sandbox, "launch.sh", *TARGET, "--env", LIBTPU_ENV, PAPER_CONFIG, *OVERRIDES)
    result = run_on_worker(remote_command(command), home)
    assert result.returncode == 0, result.stderr
    assert "reczero train started on" in result.stdout
    deadline = time.monotonic() + 20
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = json.loads(record.read_text())
    assert started["argv"] == ["train", PAPER_CONFIG, *OVERRIDES]
    assert started["env"] == {"PYTHONUNBUFFERED": "1", "LIBTPU_INIT_ARGS": "--xla_a=1 --xla_b=2"}
    assert Path(started["cwd"]) == home / "reczero-jax"
    pid_file = home / "reczero-jax" / "logs" / "train.pid"
    assert int(pid_file.read_text()) == started["pid"], "the pid file must name the training process"
    deadline = time.monotonic() + 20
    log = home / "reczero-jax" / "logs" / "train.log"
    while "training log line" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "training log line" in log.read_text()


def test_launch_refuses_while_a_job_runs_and_stop_ends_it(sandbox, tmp_path):
    home, record = make_worker_home(tmp_path)
    logs = home / "reczero-jax" / "logs"
    logs.mkdir()
    job = subprocess.Popen(["sleep", "60"])
    try:
        (logs / "train.pid").write_text(f"{job.pid}\n")
        (launch,) = dry(sandbox, "launch.sh", *TARGET, PAPER_CONFIG)
        refused = run_on_worker(remote_command(launch), home)
        assert refused.returncode == 1
        assert f"already runs on {os.uname().nodename} (pid {job.pid})" in refused.stderr
        assert not record.exists()
        (stop,) = dry(sandbox, "launch.sh", *TARGET, "--stop")
        stopped = run_on_worker(remote_command(stop), home)
        assert stopped.returncode == 0 and "stopped reczero train" in stopped.stdout
        assert job.wait(timeout=10) == -signal.SIGTERM
        again = run_on_worker(remote_command(stop), home)
        assert "no reczero train running" in again.stdout
    finally:
        job.kill()
        job.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give the training CONFIG"),
        (("--env", "NOT AN ASSIGNMENT", "c.yaml"), "--env 'NOT AN ASSIGNMENT' is not KEY=VALUE"),
        (("--stop", "c.yaml"), "unexpected argument 'c.yaml'"),
        (("--stop", "--env", "A=1"), "--env has no effect with --stop"),
        (("--override=1", "c.yaml"), "unknown flag '--override=1'"),
    ],
)
def test_launch_bad_input_fails_clearly(sandbox, args, message):
    result = run(sandbox, "launch.sh", *TARGET, *args, "--dry-run")
    assert result.returncode != 0 and message in result.stderr


def test_logs_follow_worker_zero_or_a_given_worker(sandbox):
    tail = "tail -n 100 -F reczero-jax/logs/train.log"
    assert dry(sandbox, "logs.sh", *TARGET) == [ssh("0", tail)]
    assert dry(sandbox, "logs.sh", *TARGET, "--worker=all", "--lines", "5") == [
        ssh("all", tail.replace("100", "5"))
    ]
    result = run(sandbox, "logs.sh", *TARGET, "--worker", "first", "--dry-run")
    assert result.returncode != 0 and "--worker 'first' is not a worker number or all" in result.stderr


# --- delete ---------------------------------------------------------------------------------


def test_delete_dry_run(sandbox):
    vm = "gcloud compute tpus tpu-vm delete rz --zone=us-east5-a --quiet"
    assert dry(sandbox, "delete.sh", *TARGET) == [vm.split()]
    queued = "gcloud compute tpus queued-resources delete rz --zone=us-east5-a --force --quiet"
    assert dry(sandbox, "delete.sh", *TARGET, "--queued") == [queued.split()]


@pytest.mark.parametrize(
    "args, stdin, deletes",
    [((), "", False), ((), "n\n", False), ((), "y\n", True), (("--yes",), "", True)],
)
def test_delete_asks_unless_yes(sandbox, args, stdin, deletes):
    result = run(sandbox, "delete.sh", *TARGET, *args, path=sandbox["fake"], stdin=stdin)
    assert (result.returncode == 0) == deletes, result.stderr
    assert len(recorded_calls(sandbox)) == int(deletes)
    if not stdin and not deletes:
        assert "pass --yes" in result.stderr


# --- all scripts ----------------------------------------------------------------------------

INVOCATIONS = [
    ("create.sh", (*TARGET, "--accelerator-type", "v5p-8", "--queued", "--spot", "--project", "p")),
    ("setup.sh", (*TARGET, "--git", "https://example.org/r.git")),
    ("data.sh", (*TARGET, "--src", "gs://b/d", "--dest", "data/d", "--mount", "gs://b")),
    ("launch.sh", (*TARGET, PAPER_CONFIG, *OVERRIDES)),
    ("logs.sh", (*TARGET, "--worker", "3")),
    ("delete.sh", (*TARGET, "--yes", "--queued")),
]


@pytest.mark.parametrize("script, args", INVOCATIONS)
def test_scripts_run_exactly_what_dry_run_prints(sandbox, script, args):
    printed = dry(sandbox, script, *args)
    assert not sandbox["calls"].exists(), "--dry-run ran gcloud"
    result = run(sandbox, script, *args, path=sandbox["fake"])
    assert result.returncode == 0, result.stderr
    assert [["gcloud", *call] for call in recorded_calls(sandbox)] == printed


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_runs_nothing_even_with_gcloud_on_path(sandbox, script):
    args = dict(INVOCATIONS)[script]
    result = run(sandbox, script, *args, "--dry-run", path=sandbox["fake"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("gcloud ", "tar "))
    assert not sandbox["calls"].exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_target_fails_without_running_anything(sandbox, script):
    args = [arg for arg in dict(INVOCATIONS)[script] if arg not in ("--zone", "us-east5-a")]
    if script == "data.sh":
        args = ["--name", "rz", "--mount", "gs://b"]
    result = run(sandbox, script, *args, path=sandbox["fake"])
    assert result.returncode != 0
    assert f"{script}: --zone is required (or set TPU_ZONE)" in result.stderr
    assert not sandbox["calls"].exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(sandbox, script):
    result = run(sandbox, script, "--help", path=Path(shutil.which("cat")).parent)
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: tpu/{script}")
    assert "--dry-run" in result.stdout


def test_real_run_without_gcloud_says_so(sandbox):
    result = run(sandbox, "logs.sh", *TARGET)
    assert result.returncode != 0
    assert "gcloud: command not found" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", "-x", *(f"tpu/{s}" for s in ("common.sh", *SCRIPTS))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def readme_examples():
    """(command, printed lines) for every `$ tpu/...` example in tpu/README.md."""
    examples, command = [], None
    for line in (TPU / "README.md").read_text().splitlines():
        if line.startswith("$ tpu/"):
            command = (line.removeprefix("$ "), [])
            examples.append(command)
        elif line.startswith(("$ ", "```")) or not line:
            command = None
        elif command is not None:
            command[1].append(line)
    return examples


def test_readme_shows_what_the_scripts_print(sandbox, tmp_path):
    examples = readme_examples()
    assert len(examples) >= 9
    for local in ("prepared/amazon_music", "models/Qwen2.5-7B-Instruct"):
        (tmp_path / local).mkdir(parents=True)
    environment = {
        "PATH": str(sandbox["empty"]),
        "TMPDIR": "/tmp",
        "TPU_NAME": "reczero-v5p",
        "TPU_ZONE": "us-east5-a",
    }
    for command, printed in examples:
        script, *args = shlex.split(command)
        result = subprocess.run(
            [BASH, str(ROOT / script), *args],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)
        expected = [line.replace("/home/me/reczero-jax", str(ROOT)) for line in printed]
        assert result.stdout.splitlines() == expected, command
