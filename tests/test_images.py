"""Offline checks of the project images (images/Dockerfile.cpu, images/Dockerfile.gpu).

Nothing is built here (the base images cannot be pulled offline): hadolint and checkov lint
the Dockerfiles, a small Dockerfile parser checks the project's own rules, and the build
context (.dockerignore) is checked against every COPY. hadolint and checkov live in their
own venv, .venv-checks, which `make test` creates.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS_BIN = ROOT / ".venv-checks" / "bin"
IMAGES = ROOT / "images"
DOCKERFILES = {"cpu": IMAGES / "Dockerfile.cpu", "gpu": IMAGES / "Dockerfile.gpu"}
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"

# Every check skipped in the Dockerfiles, with the reason. A new skip fails the tests until
# it is added here (and to the README's list) with its justification.
CHECKOV_SKIPS_ALLOWED = {
    "CKV_DOCKER_2": "HEALTHCHECK: component pods are KFP run-to-completion jobs, not services; "
                    "Kubernetes follows the exit status and there is nothing to probe",
}
HADOLINT_IGNORES_ALLOWED = {
    "DL3008": "apt version pins: Debian/Ubuntu archives keep only the latest build of a "
              "package, so an exact pin breaks the build at the next security update; the "
              "pinned base image tag fixes the distribution release",
}

BUILD_TOOLS = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake",
               "ninja-build", "autoconf", "automake", "libtool", "pkg-config"}


def _tool(name: str) -> Path:
    path = CHECKS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is missing: run make test (it installs .venv-checks)")
    return path


# --- a small Dockerfile parser --------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest, line continuations joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    text: str
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def instructions(self) -> list[Instruction]:
        return [i for s in self.stages for i in s.instructions]


def parse_dockerfile(path: Path) -> Dockerfile:
    text = path.read_text()
    instructions: list[Instruction] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside a continued instruction) and blank lines
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        keyword, _, args = " ".join(p for p in current if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        current = []
    assert not current, f"{path}: a continued instruction never ends"

    stages: list[Stage] = []
    for inst in instructions:
        if inst.keyword == "FROM":
            words = [w for w in inst.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif inst.keyword != "ARG" or stages:  # ARGs before the first FROM stay global
            assert stages, f"{path}:{inst.line}: {inst.keyword} before the first FROM"
            stages[-1].instructions.append(inst)
    return Dockerfile(path, text, stages)


def shell_commands(run: Instruction) -> list[list[str]]:
    """The simple commands of a shell-form RUN, as words (split on &&, ||, ; and |)."""
    commands, words = [], []
    for word in shlex.split(run.args, posix=True):
        if word in {"&&", "||", ";", "|"}:
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    return [c for c in commands if c]


def _strip_env_prefix(words: list[str]) -> list[str]:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words


@dataclass
class PipInstall:
    stage: int
    options: list[str]
    constraints: list[str]
    index_url: str | None
    requirements: list[str]

    def installs(self, name: str) -> bool:
        return any(re.split(r"[=<>!~\[ ]", r, maxsplit=1)[0].lower() == name
                   for r in self.requirements)

    @property
    def installs_project(self) -> bool:
        return any(r == "." or r.startswith(".[") for r in self.requirements)


_PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                      "--extra-index-url", "-f", "--find-links"}


def pip_installs(dockerfile: Dockerfile) -> list[PipInstall]:
    found = []
    for index, stage in enumerate(dockerfile.stages):
        for run in stage.of("RUN"):
            for words in shell_commands(run):
                words = _strip_env_prefix(words)
                if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
                    words = words[2:]
                if words[:2] != ["pip", "install"]:
                    continue
                options, constraints, requirements, index_url = [], [], [], None
                rest = iter(words[2:])
                for word in rest:
                    if word in _PIP_VALUE_OPTIONS:
                        value = next(rest)
                        if word in {"-c", "--constraint"}:
                            constraints.append(value)
                        elif word in {"-i", "--index-url"}:
                            index_url = value
                    elif word.startswith("--constraint="):
                        constraints.append(word.split("=", 1)[1])
                    elif word.startswith("--index-url="):
                        index_url = word.split("=", 1)[1]
                    elif word.startswith("-"):
                        options.append(word)
                    else:
                        requirements.append(word)
                found.append(PipInstall(index, options, constraints, index_url, requirements))
    return found


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


# --- hadolint and checkov ------------------------------------------------------------------

@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour):
    command = [str(_tool("hadolint")), "--no-color", "--failure-threshold", "warning"]
    if HADOLINT_CONFIG.exists():
        command += ["--config", str(HADOLINT_CONFIG)]
    proc = subprocess.run([*command, str(DOCKERFILES[flavour].relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint failed:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_justified(dockerfile):
    for match in re.finditer(r"#\s*hadolint\s+ignore=([\w,]+)", dockerfile.text):
        for rule in match.group(1).split(","):
            assert rule in HADOLINT_IGNORES_ALLOWED, (
                f"{dockerfile.path.name} ignores hadolint {rule}: fix it, or justify it in "
                "HADOLINT_IGNORES_ALLOWED and in the README")


@pytest.fixture(scope="module")
def checkov_report() -> dict:
    """One checkov run over images/ (dockerfile framework), offline."""
    env = {k: v for k, v in os.environ.items() if k not in {"BC_API_KEY", "PRISMA_API_URL"}}
    env.update(CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE",
               ANSI_COLORS_DISABLED="1")
    # Not --quiet: with it the JSON report leaves out the skipped checks this test reads.
    # checkov 3.3.30 has no --no-guide flag; --skip-download keeps it off the network.
    command = [str(_tool("checkov")), "-d", str(IMAGES), "--framework", "dockerfile",
               "--compact", "--skip-download", "--output", "json"]
    began = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.monotonic() - began
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (rc {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    print(f"checkov took {elapsed:.1f}s: {report.get('summary')}")
    assert isinstance(report, dict) and report.get("check_type") == "dockerfile", report
    return report


def test_checkov_has_no_failed_checks(checkov_report):
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0, checkov_report["results"].get("parsing_errors")
    assert summary["resource_count"] == len(DOCKERFILES), summary
    assert summary["passed"] > 0, summary
    failed = [(c["check_id"], c["check_name"], c["file_path"])
              for c in checkov_report["results"]["failed_checks"]]
    assert not failed, f"checkov failed checks: {failed}"


def test_checkov_skips_are_allowed_and_justified(checkov_report):
    skipped = checkov_report["results"]["skipped_checks"]
    for check in skipped:
        check_id = check["check_id"]
        assert check_id in CHECKOV_SKIPS_ALLOWED, (
            f"{check['file_path']} skips {check_id} ({check['check_name']}): fix it, or "
            "justify it in CHECKOV_SKIPS_ALLOWED and in the README")
        assert (check["check_result"].get("suppress_comment") or "").strip(), (
            f"{check['file_path']} skips {check_id} without a reason in the comment")
    assert checkov_report["summary"]["skipped"] == len(skipped)


# --- the project's own rules ---------------------------------------------------------------

def test_every_base_image_is_pinned(dockerfile):
    stage_names = {s.name for s in dockerfile.stages if s.name}
    bases = [s.base for s in dockerfile.stages]
    bases += [flag.split("=", 1)[1]
              for i in dockerfile.instructions if i.keyword == "COPY"
              for flag in i.args.split() if flag.startswith("--from=")]
    for base in bases:
        if base in stage_names or base.isdigit():
            continue
        assert "$" not in base, f"{base}: a base image set by a build argument is not pinned"
        if "@sha256:" in base:
            assert re.search(r"@sha256:[0-9a-f]{64}$", base), base
            continue
        name, _, tag = base.rpartition(":")
        assert name and "/" not in tag, f"{base}: no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{base}: not an exact tag"


def test_multi_stage_with_venv_copied_from_builder(dockerfile):
    assert len(dockerfile.stages) >= 2
    copies = " ".join(i.args for i in dockerfile.final.of("COPY"))
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_final_stage_runs_as_non_root_numeric_user(dockerfile):
    users = dockerfile.final.of("USER")
    assert users, f"{dockerfile.path.name}: no USER in the final stage"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"last USER is {users[-1].args!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"last USER is {users[-1].args!r}"
    # The user exists with that uid and gid (a writable HOME), and Kubernetes runs tasks as it.
    assert f"--uid {uid}" in dockerfile.text and "--create-home" in dockerfile.text
    from vidops.config import load_config

    assert load_config().kubernetes.run_as_user == int(uid)


def test_final_stage_has_no_build_tools(dockerfile):
    assert "devel" not in dockerfile.final.base, dockerfile.final.base
    for run in dockerfile.final.of("RUN"):
        for words in shell_commands(run):
            words = _strip_env_prefix(words)
            if words[:2] != ["apt-get", "install"]:
                continue
            packages = [w for w in words[2:] if not w.startswith("-")]
            for package in packages:
                name = package.split("=", 1)[0]
                assert name not in BUILD_TOOLS and not name.endswith("-dev") \
                    and "nvcc" not in name, f"final stage installs {name}"
    for words in (w for r in dockerfile.final.of("RUN") for w in shell_commands(r)):
        assert "pip" not in _strip_env_prefix(words)[:1], "final stage runs pip"


def test_pip_installs_use_no_cache_and_the_lock(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs
    for pip in installs:
        assert "--no-cache-dir" in pip.options, f"pip install {pip.requirements}: no cache dir"
        unpinned = [r for r in pip.requirements if not re.fullmatch(r"[\w.-]+==[\w.+-]+", r)]
        if unpinned:
            assert pip.constraints == ["constraints.txt"], (
                f"pip install {unpinned} without -c constraints.txt")
    project = [p for p in installs if p.installs_project]
    assert len(project) == 1 and project[0].constraints == ["constraints.txt"]


def test_torch_is_installed_first(dockerfile):
    installs = pip_installs(dockerfile)
    torch = [n for n, p in enumerate(installs) if p.installs("torch")]
    project = [n for n, p in enumerate(installs) if p.installs_project]
    assert torch and project and torch[0] < project[0]
    assert all(re.fullmatch(r"torch==[\d.]+", r)
               for p in (installs[n] for n in torch) for r in p.requirements if "torch" in r)
    # Only pinned torch: the lock leaves torch out on purpose, so the images choose its build.
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    assert not [line for line in lock if re.match(r"torch\s*[=<>~!]", line)]
    torch_install = installs[torch[0]]
    if dockerfile.path.name == "Dockerfile.cpu":
        assert torch_install.index_url == "https://download.pytorch.org/whl/cpu"
    else:
        assert "cpu" not in (torch_install.index_url or "")


def test_gpu_builder_precompiles_fused_adam():
    gpu = parse_dockerfile(DOCKERFILES["gpu"])
    builder = next(s for s in gpu.stages if s.name == "builder")
    assert "cudnn-devel" in builder.base and "cudnn-runtime" in gpu.final.base
    assert builder.base.split(":")[1].split("-")[0] == gpu.final.base.split(":")[1].split("-")[0]
    assert any(a.args.startswith("TORCH_CUDA_ARCH_LIST=") for a in builder.of("ARG"))
    runs = " ".join(r.args for r in builder.of("RUN"))
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "--no-build-isolation" in runs
    deepspeed = [p for p in pip_installs(gpu) if p.installs("deepspeed")]
    assert deepspeed and all(p.constraints == ["constraints.txt"] for p in deepspeed)
    assert next(p for p in pip_installs(gpu) if p.installs_project).requirements == [
        ".[cluster,deepspeed]"]


def test_apt_get_installs_are_minimal_and_cleaned(dockerfile):
    runs = [r for r in (i for i in dockerfile.instructions if i.keyword == "RUN")
            if "apt-get install" in r.args]
    assert runs, "no apt-get install: the runtime libraries (libgl1, git) are missing"
    for run in runs:
        assert "apt-get update" in run.args, f"line {run.line}: install without update"
        assert "--no-install-recommends" in run.args, f"line {run.line}: recommends"
        assert "-y" in run.args.split(), f"line {run.line}: not -y"
        assert "rm -rf /var/lib/apt/lists/*" in run.args, f"line {run.line}: lists kept"
    final = " ".join(r.args for r in dockerfile.final.of("RUN"))
    for package in ("libgl1", "libglib2.0-0", "git"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", final), package


def test_no_healthcheck_and_no_entrypoint(dockerfile):
    keywords = {i.keyword for i in dockerfile.instructions}
    assert "HEALTHCHECK" not in keywords
    # KFP sets the command: sh -c '... python3 -m kfp.dsl.executor_main ...'.
    assert all(i.args.replace(" ", "") == "[]" for i in dockerfile.final.of("ENTRYPOINT"))


def _final_env(dockerfile: Dockerfile) -> dict[str, str]:
    env = {}
    for inst in dockerfile.final.of("ENV"):
        for word in shlex.split(inst.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_final_environment(dockerfile):
    env = _final_env(dockerfile)
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env["HOME"].startswith("/home/")
    assert env["VIDOPS_GIT_SHA"] == "${VIDOPS_GIT_SHA}"  # read by tracking.workdir


def test_labels_and_version_match_the_config(dockerfile):
    labels = " ".join(i.args for i in dockerfile.final.of("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.MULTILINE).group(1)
    assert any(a.args == f"VIDOPS_VERSION={version}" for a in dockerfile.final.of("ARG"))
    from vidops.config import load_config

    flavour = dockerfile.path.name.rsplit(".", 1)[1]
    image = getattr(load_config().images, flavour)
    assert image.rsplit("/", 1)[1] == f"vidops-{flavour}:{version}", image


# --- the build context ---------------------------------------------------------------------

def _dockerignore_patterns() -> list[tuple[bool, list[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        cleaned = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        patterns.append((negate, cleaned.split("/")))
    return patterns


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    """Docker's .dockerignore matching: fnmatch per path segment, `**` for any segments."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[n:]) for n in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:],
                                                                              parts[1:])


def excluded(relative: str, patterns: list[tuple[bool, list[str]]] | None = None) -> bool:
    """Whether .dockerignore leaves `relative` (a repo path) out of the build context."""
    patterns = _dockerignore_patterns() if patterns is None else patterns
    parts = relative.split("/")
    result = False
    for negate, pattern in patterns:
        # A pattern that matches a directory excludes everything under it.
        if any(_match_parts(pattern, parts[:n]) for n in range(1, len(parts) + 1)):
            result = not negate
    return result


def test_dockerignore_matching():
    patterns = [(False, p.split("/")) for p in ("**/__pycache__", "tests", "*.egg-info")]
    assert excluded("__pycache__/a.pyc", patterns)
    assert excluded("vidops/data/__pycache__/x.pyc", patterns)
    assert excluded("tests/test_images.py", patterns)
    assert not excluded("vidops/tests.py", patterns)
    assert not excluded("vidops/tests/x.py", patterns)  # `tests` is anchored at the root
    assert excluded("vidops.egg-info/PKG-INFO", patterns)
    assert excluded("x", [(False, ["*"]), (True, ["y"])])
    assert not excluded("y", [(False, ["*"]), (True, ["y"])])


def test_dockerignore_keeps_state_and_secrets_out():
    for path in (".git/HEAD", ".venv/bin/python", ".venv-checks/bin/checkov",
                 "vidops-work/runs/x", "local_outputs/x", "tests/test_images.py",
                 "benchmarks/curation.py", "vidops/__pycache__/cli.cpython-311.pyc",
                 "vidops.egg-info/PKG-INFO", "build/lib/x.py", "dist/x.whl", ".env",
                 "mlruns/0/meta.yaml", "mlflow.db", "vidops-work/mlflow.db",
                 ".dvc/cache/ab/cd", ".pytest_cache/v", ".ruff_cache/x"):
        assert excluded(path), f"{path} would be in the build context"


def _copies(dockerfile: Dockerfile) -> list[tuple[str, str]]:
    """(context path, image path) of each COPY source read from the build context."""
    pairs = []
    for stage in dockerfile.stages:
        workdir = "/"
        for inst in stage.instructions:
            if inst.keyword == "WORKDIR":
                workdir = posixpath.join(workdir, inst.args)
            if inst.keyword not in {"COPY", "ADD"}:
                continue
            assert inst.keyword == "COPY", f"line {inst.line}: ADD"
            words = shlex.split(inst.args)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            *sources, dest = words
            dest_path = posixpath.join(workdir, dest)
            as_directory = dest.endswith("/") or len(sources) > 1
            for source in sources:
                source = posixpath.normpath(source)
                if (ROOT / source).is_dir():
                    target = dest_path  # a directory's contents go into dest
                elif as_directory:
                    target = posixpath.join(dest_path, posixpath.basename(source))
                else:
                    target = dest_path
                pairs.append((source, posixpath.normpath(target)))
    return pairs


def test_copied_paths_exist_and_are_in_the_context(dockerfile):
    patterns = _dockerignore_patterns()
    pairs = _copies(dockerfile)
    assert pairs
    image_of = {source: target for source, target in pairs}
    for source, target in pairs:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repo"
        assert not excluded(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if not path.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                child = Path(dirpath) / name
                relative = child.relative_to(ROOT).as_posix()
                if name.endswith((".pyc", ".pyo")):
                    continue
                assert not excluded(relative, patterns), f"{relative}: excluded"
                if not child.is_symlink():
                    continue
                # A symlink travels as a link: its target must be copied to where the link
                # points inside the image (vidops/configs -> ../configs).
                link = os.readlink(child)
                assert not posixpath.isabs(link), f"{relative} -> {link}: absolute link"
                in_context = posixpath.normpath(posixpath.join(posixpath.dirname(relative),
                                                               link))
                assert not in_context.startswith(".."), f"{relative} -> outside the context"
                assert (ROOT / in_context).exists(), f"{relative} -> {link}: dangling"
                link_in_image = posixpath.join(target, posixpath.relpath(relative, source))
                wanted = posixpath.normpath(posixpath.join(posixpath.dirname(link_in_image),
                                                           link))
                assert image_of.get(in_context) == wanted, (
                    f"{relative} -> {link}: {in_context} must be copied to {wanted}")


def test_install_inputs_are_copied(dockerfile):
    """What `pip install .` reads: the project metadata, the lock, and every package dir."""
    sources = {source for source, _ in _copies(dockerfile)}
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "params.yaml",
                   "configs", "vidops", "components", "pipelines"):
        assert needed in sources, f"{dockerfile.path.name} does not COPY {needed}"
