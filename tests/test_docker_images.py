"""The worker images' Dockerfiles, replayed without a Docker engine (none runs where the tests run).

For each of docker/Dockerfile and docker/Dockerfile.gpu, in a scratch folder standing for each stage's
filesystem (tmp_path/stage<N>/, the image's /opt/delg at tmp_path/stage<N>/opt/delg):

* The Dockerfile is parsed as Docker does, for what matters here: line continuations (and comment or blank
  lines inside them), `ARG` (global ones before the first `FROM`, at their defaults: no --build-arg) and
  `ENV` substitution (`$X`, `${X}`, `${X:-word}`, `${X:+word}`), `WORKDIR` (relative ones too), multi-stage
  `FROM ... AS name` (a stage built `FROM` an earlier stage starts from a copy of its files).
* Every `COPY`/`ADD` from the build context (the repository root) is performed in order: files, folders
  (their contents land in the destination), wildcards, several sources, folder destinations (`./`, a
  trailing `/`, an existing folder), with `.dockerignore` honoured (or `docker/<Dockerfile>.dockerignore`,
  which BuildKit prefers when it exists). A source missing from the context, or excluded by .dockerignore,
  fails the replay as it fails `docker build`. NOT replayed, and listed in the replay's `skipped` (printed
  by the test): `COPY --from=<stage or image>` (its files come from another image, e.g. Beam's SDK harness
  in the GPU image) and `ADD <url>`.
* At every `RUN` holding a `pip install` of the project (`.`, `".[cpu]"`, `".[gpu]"`, `-e .`), the files
  its `-c`/`-r` options name must be in the WORKDIR, and the project is built into a wheel from exactly
  what the WORKDIR holds at that step (the files copied so far, plus what earlier builds left there, as in
  the image) with `python -m pip wheel --no-deps --no-build-isolation --no-index`: offline, about 1 s a
  build. The extra (`[cpu]`, `[gpu]`) only adds dependencies, so it does not change a --no-deps wheel and
  the folder is built as is. pip builds it with the backend pyproject.toml names (setuptools' legacy PEP 517
  backend where a step has not copied it); --no-build-isolation makes it use this environment's setuptools and, below
  setuptools 70.1, wheel's bdist_wheel (pip would otherwise download both, which --no-index forbids).
  requirements-dev.txt's environment has both (TensorFlow requires setuptools, its dependency astunparse
  requires wheel); without them the test fails saying so. `pip install --target` would not avoid them:
  pip 23.1+ builds a wheel for every install. A `pip uninstall` in the same RUN must name the project.
* The last stage's last project build is the package the image runs: its wheel is installed with
  `pip install --no-deps --no-index --target` into tmp and must hold every Python file that the COPYs
  put under beam_job/ and schemas/ (the latter as beam_job/schemas/), and `beam_job.schemas` must import
  from that install by `python -c` in the image's final WORKDIR (where the workers start): a beam_job/
  source folder there would come first on sys.path and shadow the installed package.

What the replay cannot check: the base images (apache/beam_python*_sdk, nvidia/cuda) and what they hold,
apt-get and the deadsnakes PPA, the Python version, dependency resolution against PyPI (the pins,
constraints-gpu.txt, the CUDA wheels), TensorFlow seeing a GPU, the model download, and every `RUN`
other than the project builds (including a `cd` or `mv` inside one).
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.gpu")
PIP_TIMEOUT_S = 120


class ReplayError(AssertionError):
    """A step that fails `docker build` (or that the replay cannot follow): the message names the step."""


# --------------------------------------------------------------------------------------------- parsing


def parse_dockerfile(text):
    """[(line number, INSTRUCTION, arguments)] with continuations joined and comment/blank lines dropped.

    Parser directives (`# syntax=...`) are comments here; only the default escape character `\\` is known.
    """
    instructions, pending, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation: Docker drops such lines
        if pending is None:
            pending, start = "", number
        body = line.rstrip()
        if body.endswith("\\"):
            pending += body[:-1]
            continue
        instructions.append(_instruction(start, pending + body))
        pending = None
    if pending is not None:
        instructions.append(_instruction(start, pending))
    return instructions


def _instruction(number, text):
    match = re.match(r"\s*(\S+)\s*(.*)", text, re.S)
    return number, match.group(1).upper(), match.group(2).strip()


_VARIABLE = re.compile(r"\\\$|\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def substitute(text, variables):
    """Docker's `$X`, `${X}`, `${X:-word}`, `${X:+word}` (unset and empty alike), `\\$` for a literal `$`."""

    def value(match):
        if match.group(0) == "\\$":
            return "$"
        current = variables.get(match.group(1) or match.group(4)) or ""
        if match.group(2) == "-":
            return current or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if current else ""
        return current

    return _VARIABLE.sub(value, text)


def _flags(arguments):
    """({name: value} of the leading `--name[=value]` flags, the rest) for COPY/ADD/RUN/FROM arguments."""
    flags = {}
    while True:
        match = re.match(r"--([\w-]+)(?:=(\S*))?\s+", arguments)
        if not match:
            return flags, arguments
        flags[match.group(1)] = match.group(2) or ""
        arguments = arguments[match.end():]


def _words(arguments):
    """JSON form (`["a", "b"]`) or whitespace-separated words (COPY/ADD do no shell quoting)."""
    if arguments.startswith("["):
        try:
            return json.loads(arguments)
        except ValueError:
            pass
    return arguments.split()


# --------------------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern):
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regex over '/'-separated context paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")  # `**/`: any number of folders, none included
                i += 1
            else:
                out.append(".*")
            continue
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            chars = pattern[i + 1:end]
            out.append("[" + ("^" + chars[1:] if chars[:1] in ("!", "^") else chars) + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


class DockerIgnore:
    """The build context's exclusions: the last pattern matching a path, or one of its parent folders, wins."""

    def __init__(self, path=None):
        self.path, self.rules = path, []
        if path is None:
            return
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            if pattern and pattern != ".":
                self.rules.append((negate, _pattern_regex(pattern)))

    @classmethod
    def for_dockerfile(cls, dockerfile, context):
        for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
            if candidate.is_file():
                return cls(candidate)
        return cls()

    def excluded(self, relative):
        parts = PurePosixPath(relative).parts
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not negate
        return excluded

    def prunable(self, relative):
        """A folder whose whole content is excluded (no `!` exception could bring part of it back)."""
        return self.excluded(relative) and not any(negate for negate, _ in self.rules)


# -------------------------------------------------------------------------------------------- replay


@dataclass
class Stage:
    index: int
    name: str
    base: str
    root: Path
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))
    env: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)

    @property
    def variables(self):
        return {**self.args, **self.env}  # ENV wins over an ARG of the same name

    def image_path(self, path):
        path = PurePosixPath(path)
        return path if path.is_absolute() else self.workdir / path

    def local(self, path):
        """The scratch path standing for an image path (relative ones from the WORKDIR)."""
        parts = []
        for part in self.image_path(path).parts[1:]:
            if part == "..":
                parts = parts[:-1]
            elif part not in (".", ""):
                parts.append(part)
        return self.root.joinpath(*parts)


@dataclass
class Build:
    where: str
    stage: Stage
    project: Path
    wheel: Path


@dataclass
class Replay:
    stages: list = field(default_factory=list)
    builds: list = field(default_factory=list)
    log: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def replay(dockerfile, context, scratch):
    """Replay `dockerfile` (FROM/ARG/ENV/WORKDIR/COPY/ADD, project builds at RUN) in `scratch`; see the module doc.

    Raises ReplayError at the first step that would fail the image build.
    """
    dockerfile, context, scratch = Path(dockerfile), Path(context), Path(scratch)
    ignore = DockerIgnore.for_dockerfile(dockerfile, context)
    result, global_args, stage = Replay(), {}, None
    for number, instruction, arguments in parse_dockerfile(dockerfile.read_text()):
        where = f"{dockerfile.name}:{number} {instruction} {' '.join(arguments.split())[:90]}"
        if instruction == "ARG":
            for word in arguments.split():
                name, has_default, default = word.partition("=")
                scope = global_args if stage is None else stage.args
                if has_default:
                    scope[name] = substitute(default.strip("\"'"), global_args if stage is None else stage.variables)
                elif stage is not None:
                    scope[name] = global_args.get(name, scope.get(name, ""))
        elif instruction == "FROM":
            stage = _from(result, arguments, global_args, scratch)
        elif stage is None:
            raise ReplayError(f"{where}: instruction before the first FROM")
        elif instruction == "ENV":
            _env(stage, arguments)
        elif instruction == "WORKDIR":
            stage.workdir = stage.image_path(substitute(arguments, stage.variables))
            stage.local(stage.workdir).mkdir(parents=True, exist_ok=True)
        elif instruction in ("COPY", "ADD"):
            _copy(result, stage, instruction, arguments, context, ignore, where)
        elif instruction == "RUN":
            _run(result, stage, arguments, scratch, where)
    if stage is None:
        raise ReplayError(f"{dockerfile}: no FROM")
    return result


def _from(result, arguments, global_args, scratch):
    _, arguments = _flags(arguments)  # --platform
    words = substitute(arguments, global_args).split()
    base = words[0]
    name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(result.stages))
    root = scratch / f"stage{len(result.stages)}"
    parent = next((s for s in result.stages if s.name == base), None)
    if parent is not None:  # FROM an earlier stage: its files, environment and WORKDIR
        shutil.copytree(parent.root, root, symlinks=True)
        stage = Stage(len(result.stages), name, base, root, parent.workdir, dict(parent.env))
    else:
        root.mkdir(parents=True)
        stage = Stage(len(result.stages), name, base, root)
    result.stages.append(stage)
    result.log.append(f"FROM {base} AS {name}")
    return stage


def _env(stage, arguments):
    words = shlex.split(arguments)
    if words and "=" not in words[0]:  # legacy `ENV NAME value with spaces`
        stage.env[words[0]] = substitute(arguments.split(None, 1)[1] if len(words) > 1 else "", stage.variables)
        return
    variables = stage.variables  # all of one ENV's values see the environment from before it
    for word in words:
        name, _, value = word.partition("=")
        stage.env[name] = substitute(value, variables)


def _copy(result, stage, instruction, arguments, context, ignore, where):
    flags, arguments = _flags(arguments)
    flags = {name: substitute(value, stage.variables) for name, value in flags.items()}
    words = [substitute(word, stage.variables) for word in _words(arguments)]
    if len(words) < 2:
        raise ReplayError(f"{where}: needs a source and a destination")
    *sources, destination = words
    if "from" in flags:
        result.skipped.append(f"{where} (files from the stage or image {flags['from']!r}: not replayed)")
        return
    unknown = set(flags) - {"chown", "chmod", "link", "checksum"}
    if unknown:
        raise ReplayError(f"{where}: flag(s) {sorted(unknown)} not known to the replay; teach it before using them")
    if instruction == "ADD":
        remote = [s for s in sources if re.match(r"[a-z][\w+.-]*://|git@", s)]
        if remote:
            result.skipped.append(f"{where} (remote source(s) {remote}: not replayed)")
            sources = [s for s in sources if s not in remote]
            if not sources:
                return
        archives = [s for s in sources if re.search(r"\.(tar|tgz|tbz2|txz|tar\.\w+)$", s)]
        if archives:
            raise ReplayError(f"{where}: ADD extracts local archives ({archives}); the replay does not")
    matched = []
    for source in sources:
        found = _context_paths(context, ignore, source)
        if not found:
            raise ReplayError(
                f"{where}: source {source!r} is not in the build context {context}"
                + (f" (or is excluded by {ignore.path})" if ignore.path else "")
            )
        matched += found
    into_folder = destination.endswith("/") or destination in (".", "..") or destination.endswith(("/.", "/.."))
    if (len(sources) > 1 or len(matched) > 1) and not into_folder:
        raise ReplayError(f"{where}: with more than one source, the destination must be a folder ending with /")
    target = stage.local(destination)
    for relative in matched:
        source = context / relative
        if source.is_dir():
            _copy_folder(context, ignore, relative, target)
        else:
            file_target = target / source.name if into_folder or target.is_dir() else target
            file_target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, file_target, follow_symlinks=False)
    result.log.append(f"{where} -> {stage.image_path(destination)}")


def _context_paths(context, ignore, source):
    """Context-relative paths a COPY source names (wildcards expanded), minus what .dockerignore excludes."""
    source = os.path.normpath(source).lstrip("/")
    if source == ".." or source.startswith("../"):
        return []  # outside the build context
    if source == ".":
        return [""]
    if re.search(r"[*?\[]", source):
        candidates = sorted(p.relative_to(context).as_posix() for p in context.glob(source))
    else:
        candidates = [source] if (context / source).exists() or (context / source).is_symlink() else []
    return [path for path in candidates if not ignore.excluded(path)]


def _copy_folder(context, ignore, relative, target):
    """A folder's contents (not the folder itself) into `target`, as COPY does, minus the excluded paths."""
    top = context / relative
    target.mkdir(parents=True, exist_ok=True)
    for folder, subfolders, files in os.walk(top):
        here = Path(folder).relative_to(context).as_posix()
        here = "" if here == "." else here
        kept = []
        for sub in subfolders:
            path = f"{here}/{sub}" if here else sub
            if Path(folder, sub).is_symlink():  # COPY keeps a link as a link (beam_job/schemas -> ../schemas)
                if not ignore.excluded(path):
                    destination = target / Path(folder, sub).relative_to(top)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.symlink_to(os.readlink(Path(folder, sub)))
            elif not ignore.prunable(path):
                kept.append(sub)
        subfolders[:] = kept
        for name in files:
            path = f"{here}/{name}" if here else name
            if ignore.excluded(path):
                continue
            destination = target / Path(folder, name).relative_to(top)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder, name), destination, follow_symlinks=False)


# `-c FILE`-style options of `pip install` whose value is a separate word (the others are plain switches).
_PIP_VALUE_OPTIONS = {
    "-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-t", "--target", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "--prefix", "--root", "--src", "--upgrade-strategy",
    "--progress-bar", "--platform", "--python-version", "--implementation", "--abi", "--only-binary",
    "--no-binary", "--log", "--cache-dir", "--trusted-host", "--proxy", "--timeout", "--retries",
    "--exists-action", "--report", "-C", "--config-settings", "--global-option", "--root-user-action",
}
_FILE_OPTIONS = {"-c", "--constraint", "-r", "--requirement"}
_PROJECT = re.compile(r"\./?(?:\[[^\]]*\])?")


def pip_commands(command):
    """[(subcommand, options {name: [values]}, positional arguments)] for each `pip ...` in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    simple, commands = [], []
    for token in [*list(lexer), ";"]:
        if token and set(token) <= set("();<>|&"):
            commands.append(simple)
            simple = []
        else:
            simple.append(token)
    found = []
    for words in commands:
        for i, word in enumerate(words[:-1]):
            if re.fullmatch(r"(?:\S*/)?pip[\d.]*", word):
                subcommand, options, positional, rest = words[i + 1], {}, [], iter(words[i + 2:])
                for arg in rest:
                    if arg.startswith("--") and "=" in arg:
                        name, _, value = arg.partition("=")
                        options.setdefault(name, []).append(value)
                    elif arg in _PIP_VALUE_OPTIONS:
                        options.setdefault(arg, []).append(next(rest, ""))
                    elif arg.startswith("-"):
                        options.setdefault(arg, [])
                    else:
                        positional.append(arg)
                found.append((subcommand, options, positional))
                break
    return found


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(result, stage, arguments, scratch, where):
    _, arguments = _flags(arguments)  # --mount, --network
    command = shlex.join(_words(arguments)) if arguments.startswith("[") else arguments  # exec form
    # The shell sees ARGs and ENVs as environment variables: expand them the same way for what is parsed here.
    commands = pip_commands(substitute(command, stage.variables))
    installs = [
        (options, positional)
        for subcommand, options, positional in commands
        if subcommand == "install"
        and (any(_PROJECT.fullmatch(arg) for arg in positional)
             or any(_PROJECT.fullmatch(v) for v in options.get("-e", []) + options.get("--editable", [])))
    ]
    if not installs:
        return
    project = stage.local(stage.workdir)
    for options, _ in installs:
        for option in _FILE_OPTIONS & set(options):
            for value in options[option]:
                if re.match(r"[a-z][\w+.-]*://", value):
                    continue
                if not stage.local(value).is_file():
                    raise ReplayError(f"{where}: pip's {option} {value}: no such file at {stage.image_path(value)}")
    _check_build_tools()
    wheel_dir = scratch / "wheels" / f"build{len(result.builds)}"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--wheel-dir", str(wheel_dir), str(project)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=_pip_environment(),
    )
    if built.returncode != 0:
        tail = "\n".join((built.stdout + built.stderr).strip().splitlines()[-25:])
        raise ReplayError(f"{where}: the project does not build from the files copied so far:\n{tail}")
    (wheel,) = wheel_dir.glob("*.whl")
    project_name = _normalized(wheel.name.split("-", 1)[0])
    for subcommand, _options, positional in commands:
        if subcommand == "uninstall":
            names = {_normalized(n) for n in positional}
            if project_name not in names:
                raise ReplayError(f"{where}: uninstalls {sorted(names)}, but the project is {project_name!r}")
    result.builds.append(Build(where, stage, project, wheel))
    result.log.append(f"{where} -> built {wheel.name}")


def _check_build_tools():
    """setuptools, and wheel below setuptools 70.1 (its own bdist_wheel): what --no-build-isolation builds with."""
    try:
        setuptools = tuple(int(part) for part in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    except metadata.PackageNotFoundError:
        setuptools = None
    if setuptools is None or (setuptools < (70, 1) and importlib.util.find_spec("wheel") is None):
        raise RuntimeError(
            f"building the project offline needs setuptools and, below setuptools 70.1, wheel in {sys.prefix}"
            " (pip install setuptools wheel): the replay cannot build it without them"
        )


def _pip_environment():
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


# ---------------------------------------------------------------------------------------------- tests


def test_every_dockerfile_is_replayed():
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docker").glob("Dockerfile*")
                  if not p.name.endswith(".dockerignore")) == sorted(DOCKERFILES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_builds_the_project_from_what_it_copied(dockerfile, tmp_path):
    result = replay(ROOT / dockerfile, ROOT, tmp_path / "scratch")
    print("\n".join(result.log))
    for line in result.skipped:
        print("not replayed:", line)
    assert result.builds, f"{dockerfile}: no `pip install` of the project found: the replay checked nothing"
    final_stage = result.stages[-1]
    final = [build for build in result.builds if build.stage is final_stage]
    assert final, f"{dockerfile}: the image's (last) stage never installs the project"
    last = final[-1]

    # The wheel holds every Python file the COPYs brought in (schemas/ as beam_job/schemas/) and the README.
    with zipfile.ZipFile(last.wheel) as wheel:
        members = set(wheel.namelist())
    expected = {"beam_job/schemas/__init__.py"}
    for folder, prefix in (("beam_job", "beam_job/"), ("schemas", "beam_job/schemas/")):
        expected |= {prefix + p.relative_to(last.project / folder).as_posix()
                     for p in (last.project / folder).rglob("*.py")}
    if (last.project / "schemas" / "README.md").exists():
        expected.add("beam_job/schemas/README.md")
    assert expected - members == set(), f"{dockerfile}: missing from the installed package"

    # Installed, beam_job.schemas imports from the install, run as `python -c` (the working directory first on
    # sys.path, as for the SDK harness's `python -m`) in the image's final WORKDIR, where the workers start:
    # a beam_job/ source folder there would shadow the installed package, which alone has beam_job.schemas.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
         str(last.wheel)],
        check=True, capture_output=True, timeout=PIP_TIMEOUT_S, env=_pip_environment(),
    )
    # -S: no .pth files, so no editable install of this checkout (its finder maps beam_job.schemas to the
    # checkout's schemas/ whatever the working directory holds); site-packages still come after the install.
    imported = subprocess.run(
        [sys.executable, "-S", "-c", "import beam_job.schemas as s; print(s.__file__, s.SCHEMA_VERSION)"],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S, cwd=final_stage.local(final_stage.workdir),
        env={**_pip_environment(), "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()])},
    )
    assert imported.returncode == 0, f"{dockerfile}: in WORKDIR {final_stage.workdir}:\n{imported.stderr}"
    assert Path(imported.stdout.split()[0]) == target / "beam_job" / "schemas" / "__init__.py"


# A first layer that leaves out a file setup.py reads (requirements-dev.txt, for the retrieval extra's pins):
# the replay must fail where `docker build` fails. (Before issue 15 the layers broke on setup.py's package_dir,
# which sent beam_job.schemas to an uncopied schemas/; beam_job/schemas is now a link in beam_job/.)
_BROKEN_FIRST_LAYER = """\
# syntax=docker/dockerfile:1
ARG PY_VERSION=3.11
FROM python:${PY_VERSION}-slim
WORKDIR /opt/delg
COPY requirements.txt setup.py MANIFEST.in README.md ./
COPY beam_job/__init__.py beam_job/__init__.py
RUN python -m pip install ".[cpu]" \\
 && python -m pip uninstall -y delg-beam-job
COPY beam_job beam_job
COPY schemas schemas
RUN python -m pip install --no-deps .
"""


def test_replay_fails_where_the_build_failed(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(_BROKEN_FIRST_LAYER)
    with pytest.raises(ReplayError, match=r"requirements-dev\.txt"):
        replay(dockerfile, ROOT, tmp_path / "scratch")


def test_replay_follows_copy_arg_env_workdir_stages_and_dockerignore(tmp_path):
    context = tmp_path / "context"
    for relative in ("a.txt", "b.txt", "pkg/__init__.py", "pkg/__pycache__/x.pyc", "pkg/sub/m.py", "docs/d.md",
                     "docs/keep.md"):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        (context / relative).write_text(relative)
    (context / ".dockerignore").write_text("# comment\n**/__pycache__\ndocs\n!docs/keep.md\n")
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(
        "ARG BASE=scratch\n"
        "FROM ${BASE} AS first\n"
        "ENV APP=/srv/app \\\n"
        "    # a comment inside a continuation\n"
        "    SUB=${APP:-/unused}/inner\n"
        "WORKDIR $APP\n"
        "COPY *.txt ./\n"
        "COPY pkg pkg\n"
        "COPY [\"docs/keep.md\", \"${SUB}/\"]\n"
        "WORKDIR rel\n"
        "COPY a.txt renamed.txt\n"
        "FROM first\n"
        "COPY --from=first /srv/app /elsewhere\n"
        "COPY b.txt /top/\n"
    )
    result = replay(dockerfile, context, tmp_path / "scratch")
    files = {p.relative_to(tmp_path / "scratch").as_posix() for p in (tmp_path / "scratch").rglob("*") if p.is_file()}
    first = {"srv/app/a.txt", "srv/app/b.txt", "srv/app/pkg/__init__.py", "srv/app/pkg/sub/m.py",
             "unused/inner/keep.md", "srv/app/rel/renamed.txt"}  # one ENV's values see the ENVs before it
    assert files == {f"stage0/{f}" for f in first} | {f"stage1/{f}" for f in first} | {"stage1/top/b.txt"}
    assert [s.name for s in result.stages] == ["first", "1"]
    assert result.stages[1].workdir == PurePosixPath("/srv/app/rel")  # inherited from the stage it is built FROM
    assert len(result.skipped) == 1 and "--from=first" in result.skipped[0]

    for i, (broken, message) in enumerate((
        ("FROM x\nCOPY docs/d.md ./\n", "excluded by"),  # .dockerignore'd: not in the context
        ("FROM x\nCOPY nothing.txt ./\n", "not in the build context"),
        ("FROM x\nCOPY a.txt b.txt dest\n", "must be a folder"),
        ("FROM x\nWORKDIR /w\nCOPY setup.py ./\nRUN pip install -c missing.txt .\n", "no such file"),
    )):
        dockerfile.write_text(broken)
        (context / "setup.py").write_text("")
        with pytest.raises(ReplayError, match=message):
            replay(dockerfile, context, tmp_path / f"broken{i}")


def test_pip_commands_finds_project_installs_and_constraints():
    found = pip_commands('python -m pip install -c constraints-gpu.txt ".[gpu]" && python -m pip uninstall -y x'
                         ' && python -c "import a; print(1)"')
    assert found == [("install", {"-c": ["constraints-gpu.txt"]}, [".[gpu]"]), ("uninstall", {"-y": []}, ["x"])]
