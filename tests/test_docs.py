"""The documentation: every shell and Python snippet of the README and of docs/ runs as
written, against a real server, and the site builds in strict mode.

A snippet the test handles carries an HTML comment on the line before its fence (invisible
once rendered, by GitHub and by mkdocs alike):

    <!-- test: run -->            run it (sh: bash -e; python: the interpreter); it must
                                  exit 0, and every curl in it must get a 2xx answer
    <!-- test: run any-status --> the same, for a snippet that shows a refusal
    <!-- test: server -->         it starts a server (`make serve [CONFIG=...]` or
                                  `batchd serve --config PATH`, after any `export` lines):
                                  the test starts its twin instead, in process, on a free
                                  127.0.0.1 port, for the page's later snippets
    <!-- test: file NAME -->      its text is the file NAME (a config, say) that later
                                  snippets use
    <!-- test: skip REASON -->    not run, and why (a benchmark, a container engine, ...)

Each page runs in a workspace of its own, laid out like a checkout (config/ copied, the
package and the virtual environment linked), in the order of the page. A twin differs
from the documented server in two things only: the port (every `127.0.0.1:8000` in a
snippet is rewritten to the twin's) and `compile = false`, so that a page runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, RunningServer, run_server

DOCS = ROOT / "docs"
RUNNABLE = {"sh", "bash", "python"}
MARKER = re.compile(r"^<!-- test: (run(?: any-status)?|server|file \S+|skip .+) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
DOCUMENTED_PORT = "127.0.0.1:8000"
SNIPPET_TIMEOUT_S = 180
# The checkout's parts a snippet may use: copied where a snippet may write beside them
# (configs resolve paths against their own folder), linked otherwise.
COPIED = ("config",)
LINKED = ("batchd", "loadtest", "Makefile", "pyproject.toml")


@dataclass(frozen=True)
class Snippet:
    """One fenced block of a page, with its marker (empty when it has none)."""

    page: str
    line: int
    lang: str
    marker: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def nav_pages() -> list[str]:
    """docs/ pages in the site's navigation order."""
    def walk(items: Any) -> Iterator[str]:
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield value

    mkdocs = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return list(walk(mkdocs["nav"]))


def pages() -> list[Path]:
    return [ROOT / "README.md", *(DOCS / page for page in nav_pages())]


def snippets(path: Path) -> list[Snippet]:
    """Every fenced block of a page (top-level fences; an indented block is not runnable)."""
    lines = path.read_text().splitlines()
    found, index = [], 0
    page = str(path.relative_to(ROOT))
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(before.strip())
        found.append(Snippet(page, index + 1, opening.group(1), marker.group(1) if marker else "",
                             "\n".join(lines[index + 1:end]) + "\n"))
        index = end + 1
    return found


def test_every_page_is_in_the_list() -> None:
    on_disk = {path.name for path in DOCS.glob("*.md")}
    assert on_disk == set(nav_pages())
    assert len(pages()) >= 15


def test_every_shell_and_python_snippet_is_run_or_says_why_not() -> None:
    unmarked = [snippet.where for path in pages() for snippet in snippets(path)
                if snippet.lang in RUNNABLE and not snippet.marker]
    assert not unmarked, f"mark these with <!-- test: ... --> (see tests/test_docs.py): {unmarked}"
    stray = [snippet.where for path in pages() for snippet in snippets(path)
             if snippet.marker and snippet.lang not in RUNNABLE
             and not snippet.marker.startswith(("file", "skip"))]
    assert not stray, f"only sh and python snippets can run: {stray}"
    run = [snippet for path in pages() for snippet in snippets(path)
           if snippet.marker.startswith(("run", "server"))]
    assert len(run) >= 20


def test_every_toml_snippet_parses() -> None:
    for path in pages():
        for snippet in snippets(path):
            if snippet.lang == "toml":
                try:
                    tomllib.loads(snippet.text)
                except tomllib.TOMLDecodeError as exc:
                    raise AssertionError(f"{snippet.where}: {exc}") from None


# -- running them ---------------------------------------------------------------------


def workspace(root: Path) -> Path:
    """A folder laid out like the checkout, for one page's snippets."""
    root.mkdir()
    for name in COPIED:
        shutil.copytree(ROOT / name, root / name)
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


@dataclass
class Session:
    """What a page's snippets share: the workspace, the exported variables, the server."""

    root: Path
    monkeypatch: pytest.MonkeyPatch
    servers: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    server: RunningServer | None = None

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.environment}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PATH"] = os.pathsep.join([str(self.root / ".venv" / "bin"), env["PATH"]])
        return env

    def localised(self, text: str) -> str:
        if self.server is None:
            return text
        return text.replace(DOCUMENTED_PORT, self.server.url.removeprefix("http://"))

    def start(self, snippet: Snippet) -> None:
        """Stop the page's server, if any, and start the twin of the one `snippet` starts."""
        self.servers.close()
        self.server = None
        config, exports = served_config(snippet)
        self.environment.update(exports)
        for name, value in exports.items():
            self.monkeypatch.setenv(name, value)
        self.server = self.servers.enter_context(run_server(twin(self.root / config)))

    def run(self, snippet: Snippet) -> None:
        text = self.localised(snippet.text)
        if snippet.lang == "python":
            script = self.root / f".snippet-{snippet.line}.py"
            script.write_text(text)
            command = [sys.executable, str(script)]
        else:
            prefix = "" if snippet.marker == "run any-status" else STRICT_CURL
            command = ["bash", "-e", "-o", "pipefail", "-c", prefix + text]
        try:
            result = subprocess.run(command, cwd=self.root, env=self.env(), text=True,
                                    capture_output=True, timeout=SNIPPET_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{snippet.where}: still running after "
                                 f"{SNIPPET_TIMEOUT_S} s:\n{text}") from exc
        assert result.returncode == 0, (
            f"{snippet.where} exited {result.returncode}:\n{text}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")


# curl refuses an HTTP error (and shows its body), unless the snippet shows refusals
STRICT_CURL = 'curl() { command curl --fail-with-body "$@"; }\n'


def served_config(snippet: Snippet) -> tuple[str, dict[str, str]]:
    """The config a server snippet serves, and the variables it exports first."""
    exports, commands = {}, []
    for line in snippet.text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            exports[name] = value
        else:
            commands.append(words)
    assert len(commands) == 1, f"{snippet.where}: a server snippet runs one command"
    (words,) = commands
    if words[:2] == ["make", "serve"]:
        settings = dict(word.split("=", 1) for word in words[2:])
        return settings.get("CONFIG", "config/default.toml"), exports
    if Path(words[0]).name.startswith("python"):
        words = words[2:]  # python -m batchd serve ...
    assert Path(words[0]).name == "batchd" and words[1] == "serve", snippet.where
    return words[words.index("--config") + 1], exports


def twin(config_path: Path) -> Any:
    """The documented config with compile off (its repository's models' too)."""
    from batchd.config import load_config

    config = load_config(config_path)
    if config.repository.path is not None:
        for model_config in config.repository.path.glob("*/config.toml"):
            text = model_config.read_text()
            model_config.write_text(re.sub(r"(?m)^compile = true", "compile = false", text))
    return dataclasses.replace(
        config, models=tuple(model.with_runtime(compile=False) for model in config.models))


def to_run(path: Path) -> list[Snippet]:
    return [snippet for snippet in snippets(path)
            if snippet.marker and not snippet.marker.startswith("skip")]


RUN_PAGES = [str(path.relative_to(ROOT)) for path in pages() if to_run(path)]


def test_the_task_pages_have_snippets_that_run() -> None:
    assert {"README.md", "docs/getting-started.md", "docs/serving-your-model.md",
            "docs/http-api.md", "docs/open-inference-protocol.md", "docs/repository.md",
            "docs/export.md"} <= set(RUN_PAGES)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_snippets_of_each_page_run(page: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    marked = to_run(ROOT / page)
    session = Session(workspace(tmp_path / "checkout"), monkeypatch)
    with session.servers:
        for snippet in marked:
            if snippet.marker.startswith("file "):
                target = session.root / snippet.marker.removeprefix("file ")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(snippet.text)
            elif snippet.marker == "server":
                session.start(snippet)
            else:
                session.run(snippet)


# -- the site -------------------------------------------------------------------------


def mkdocs_build(source: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                           "--config-file", str(source / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    result = mkdocs_build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in nav_pages():
        built = tmp_path / "site" / page.removesuffix(".md") / "index.html"
        if page == "index.md":
            built = tmp_path / "site" / "index.html"
        assert built.is_file(), page
    assert (tmp_path / "site" / "openapi.json").is_file()
    assert (tmp_path / "site" / "ui.png").is_file()


def test_strict_mode_fails_on_a_broken_link_or_a_page_left_out(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", source)
    shutil.copytree(DOCS, source / "docs")
    (source / "docs" / "orphan.md").write_text("# Not in the nav\n")
    with (source / "docs" / "index.md").open("a") as index:
        index.write("\n[a page that is not there](no-such-page.md), "
                    "[a heading that is not there](getting-started.md#no-such-heading)\n")
    result = mkdocs_build(source, tmp_path / "site")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for problem in ("no-such-page.md", "#no-such-heading", "orphan.md"):
        assert problem in output, output
