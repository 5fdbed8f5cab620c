"""Project automation: tests, lint and mypy by default; bench and demo on demand."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "mypy"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on asyncio and trio (the command the README shows)."""
    session.install("-e", ".[tests]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff>=0.5")
    paths = ("novita_async", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def mypy(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[tests]", "mypy>=1.10")
    session.run("mypy", "--strict", "novita_async")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the loopback emulator; rewrites the README's results section and
    benchmarks/tradeoff.png (~25 min on 2 quiet cores; `nox -s bench -- --quick` ~10 min)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", "--write-readme", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The CLI demo on the built-in emulator (no key, no network)."""
    session.install("-e", ".")
    session.run("novita-async", "demo", *session.posargs)
