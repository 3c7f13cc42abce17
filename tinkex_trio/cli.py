"""The `tinkex-trio` command line: checkpoints, runs, sessions, one-off sampling, the local server.

Synopsis::

    tinkex-trio serve --data-dir ./tinkex-data           # the local backend (prints URL and key)
    tinkex-trio hf-cache [--hf-home DIR]                 # served models into the HF hub cache (offline)
    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-...
    tinkex-trio checkpoint list [--run RUN_ID]
    tinkex-trio checkpoint info|publish|unpublish|delete tinker://RUN/weights/NAME
    tinkex-trio checkpoint download tinker://RUN/weights/NAME [--output-dir DIR] [--force]
        [--max-bytes SIZE] [--max-members N]
    tinkex-trio checkpoint download tinker://RUN/external_weights/NAME --identity key.txt
        (age-encrypted exports: decrypts every <file>.age with an age or OpenSSH identity)
    tinkex-trio admin audit [--event-type checkpoints] [--day 2026-01-05]
    tinkex-trio admin usage --start 2026-01-05T00:00:00Z --end 2026-01-06T00:00:00Z
    tinkex-trio admin storage [--project-id PROJECT]
    tinkex-trio checkpoint set-ttl tinker://RUN/weights/NAME 3600   (or --remove)
    tinkex-trio run list | run info RUN_ID
    tinkex-trio session list | session info SESSION_ID
    tinkex-trio sample --prompt "The capital of France is" [--model NAME | --model-path tinker://...]
    tinkex-trio --format json checkpoint list          # machine-readable: json.loads(stdout)
    tinkex-trio version

Connection settings: `--base-url` and `--api-key` (anywhere on the line), else the environment
(`TINKER_BASE_URL`, `TINKER_API_KEY`). The API key is never printed.

Exit codes: 0 success; 1 the server or SDK reported an error (its message is printed);
2 bad arguments or missing credentials; 3 the server cannot be reached; 130 interrupted.
Results go to stdout, progress bars and errors to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import msgspec
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tinkex_trio import types as t
from tinkex_trio._cli_args import byte_size, non_negative_int, positive_int
from tinkex_trio._policy import ONE_ATTEMPT
from tinkex_trio._transport import Transport
from tinkex_trio._version import __version__
from tinkex_trio.admin import AdminClient
from tinkex_trio.config import Config
from tinkex_trio.download import DEFAULT_MAX_EXTRACTED_BYTES, DEFAULT_MAX_MEMBERS
from tinkex_trio.errors import (
    APIConnectionError,
    APIStatusError,
    InvalidInputError,
    MissingAPIKeyError,
    TinkexError,
)
from tinkex_trio.rest import RestClient

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130

DEFAULT_SAMPLE_MODEL: Final = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOCAL_EXTRA_MODULES: Final = ("torch", "safetensors", "gguf", "hypercorn")

_MISSING_KEY: Final = (
    "no Tinker API key is configured.\n"
    "  Set it with:  export TINKER_API_KEY=tml-...  (and TINKER_BASE_URL for a server other "
    "than the hosted one)\n"
    "  or pass --api-key and --base-url.\n"
    "  To work without an account, start the local backend with `tinkex-trio serve` and "
    "export the TINKER_BASE_URL and TINKER_API_KEY it prints."
)


class CliError(Exception):
    """A failure with a message for the user and the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- output ------------------------------------------------------------------------------------


class Output:
    """Where results go: rich tables on stdout, or one JSON document on stdout."""

    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"
        # Without a terminal rich assumes 80 columns and folds long tinker paths; a wide
        # virtual width keeps every row on one line for pipes and logs.
        out_tty = sys.stdout.isatty()
        # markup, emoji and highlighting off: ids such as `run:train:0` must print verbatim
        # (rich would turn `:train:` into an emoji).
        self.console = Console(
            file=sys.stdout,
            width=None if out_tty else 200,
            soft_wrap=not out_tty,
            markup=False,
            emoji=False,
            highlight=False,
        )
        self.err = Console(
            file=sys.stderr,
            width=None if sys.stderr.isatty() else 100,
            markup=False,
            emoji=False,
            highlight=False,
        )

    def emit(self, data: Any, render: Callable[[Console], None]) -> None:
        """Print `data` as JSON, or call `render` for the human-readable form."""
        if self.json:
            sys.stdout.write(json.dumps(_builtins(data), indent=2) + "\n")
            sys.stdout.flush()
        else:
            render(self.console)

    def message(self, text: str, data: dict[str, Any]) -> None:
        """A one-line confirmation (`text`), or `data` as JSON."""
        self.emit(data, lambda console: console.print(text))


def _builtins(value: Any) -> Any:
    return msgspec.to_builtins(value, enc_hook=t.enc_hook)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _kv_table(title: str, rows: Sequence[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table


def _checkpoints_table(checkpoints: Sequence[t.Checkpoint], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("tinker_path", no_wrap=True)
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("public")
    table.add_column("time")
    table.add_column("expires")
    for c in checkpoints:
        table.add_row(
            c.tinker_path,
            c.checkpoint_type,
            _size(c.size_bytes),
            "yes" if c.public else "no",
            _when(c.time),
            _when(c.expires_at),
        )
    return table


# --- connection --------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    try:
        config = Config.resolve(
            api_key=getattr(args, "api_key", None), base_url=getattr(args, "base_url", None)
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if config.api_key is None:
        raise CliError(_MISSING_KEY, EXIT_USAGE)
    return config


def _unreachable(config: Config, exc: BaseException) -> CliError:
    return CliError(
        f"cannot reach the Tinker server at {config.base_url} ({exc}).\n"
        "  Check --base-url / TINKER_BASE_URL, or start a local server with `tinkex-trio serve`.",
        EXIT_UNREACHABLE,
    )


async def _preflight(config: Config) -> None:
    """One quick, unretried request: fail fast (exit 3) if nobody answers at base_url.

    The SDK itself retries connection errors for minutes (PROTOCOL.md 9.3), which is right
    for a training job and wrong for a command typed at a prompt.
    """
    transport = Transport(config)
    try:
        await transport.request(
            "GET", "/api/v1/get_server_capabilities", policy=ONE_ATTEMPT, raise_for_status=False
        )
    except APIConnectionError as exc:
        raise _unreachable(config, exc) from None
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


async def _with_rest(config: Config, body: Callable[[RestClient], Awaitable[None]]) -> None:
    """Run `body` with a RestClient (no session is created for REST-only commands)."""
    await _preflight(config)
    transport = Transport(config)
    try:
        await body(RestClient(transport))
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


# --- commands ----------------------------------------------------------------------------------


def _cmd_version(args: argparse.Namespace, out: Output) -> None:
    out.emit(
        {"version": __version__, "python": sys.version.split()[0]},
        lambda console: console.print(f"tinkex-trio {__version__}"),
    )


def _parsed(path: str) -> t.ParsedTinkerPath:
    try:
        return t.ParsedTinkerPath.parse(path)
    except ValueError as exc:
        raise CliError(f"bad checkpoint path: {exc}", EXIT_USAGE) from None


async def _checkpoint_list(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    if args.run:
        checkpoints = list((await rest.list_checkpoints(args.run)).checkpoints)
        title = f"Checkpoints of {args.run}"
    else:
        checkpoints = []
        async for checkpoint in rest.iter_user_checkpoints():
            checkpoints.append(checkpoint)
            if args.limit is not None and len(checkpoints) >= args.limit:
                break
        title = "Checkpoints"
    if args.limit is not None:
        checkpoints = checkpoints[: args.limit]

    def render(console: Console) -> None:
        if not checkpoints:
            console.print("No checkpoints.")
        else:
            console.print(_checkpoints_table(checkpoints, f"{title} ({len(checkpoints)})"))

    out.emit({"checkpoints": checkpoints}, render)


async def _checkpoint_info(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    parsed = _parsed(args.path)
    info = await rest.get_weights_info_by_tinker_path(args.path)
    listed = await rest.list_checkpoints(parsed.training_run_id)
    record = next((c for c in listed.checkpoints if c.tinker_path == args.path), None)
    data: dict[str, Any] = {
        "tinker_path": args.path,
        "training_run_id": parsed.training_run_id,
        "checkpoint_id": parsed.checkpoint_id,
        "checkpoint": record,
        "weights_info": info,
    }
    rows: list[tuple[str, Any]] = [
        ("tinker_path", args.path),
        ("training_run_id", parsed.training_run_id),
        ("checkpoint_id", parsed.checkpoint_id),
        ("base_model", info.base_model),
        ("is_lora", info.is_lora),
        ("lora_rank", info.lora_rank),
    ]
    if record is not None:
        rows += [
            ("type", record.checkpoint_type),
            ("size", _size(record.size_bytes)),
            ("public", record.public),
            ("time", _when(record.time)),
            ("expires", _when(record.expires_at)),
        ]
    out.emit(data, lambda console: console.print(_kv_table("Checkpoint", rows)))


async def _checkpoint_download(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    from tinkex_trio.download import download, target_dirname

    _parsed(args.path)
    existing = Path(args.output_dir) / target_dirname(args.path)
    if existing.exists() and not args.force:
        raise CliError(f"{existing} already exists; pass --force to replace it")
    progress = Progress(
        TextColumn("[bold]downloading"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out.err,
    )
    task = progress.add_task("download", total=None)
    received = 0

    def on_progress(done: int, total: int | None) -> None:
        nonlocal received
        received = done
        progress.update(task, completed=done, total=total)

    try:
        with progress:
            target = await download(
                rest,
                args.path,
                output_dir=args.output_dir,
                force=args.force,
                progress=on_progress,
                max_extracted_bytes=args.max_bytes,
                max_members=args.max_members,
                identity=args.identity,
            )
    except FileExistsError:
        raise CliError(f"{existing} already exists; pass --force to replace it") from None
    files = sorted(p for p in target.rglob("*") if p.is_file())
    data = {
        "tinker_path": args.path,
        "path": str(target),
        "bytes": received,
        "files": [str(p.relative_to(target)) for p in files],
    }
    out.message(f"Downloaded {args.path} to {target} ({_size(received)}, {len(files)} files)", data)


async def _checkpoint_publish(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    _parsed(args.path)
    await rest.publish_checkpoint_from_tinker_path(args.path)
    out.message(f"Published {args.path}", {"tinker_path": args.path, "public": True})


async def _checkpoint_unpublish(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    _parsed(args.path)
    await rest.unpublish_checkpoint_from_tinker_path(args.path)
    out.message(f"Unpublished {args.path}", {"tinker_path": args.path, "public": False})


async def _checkpoint_delete(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    _parsed(args.path)
    await rest.delete_checkpoint_by_tinker_path(args.path)
    out.message(f"Deleted {args.path}", {"tinker_path": args.path, "deleted": True})


async def _checkpoint_set_ttl(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    _parsed(args.path)
    ttl: int | None = None if args.remove else args.seconds
    await rest.set_checkpoint_ttl_from_tinker_path(args.path, ttl)
    text = (
        f"Removed the expiry of {args.path}" if ttl is None else f"{args.path} expires in {ttl} s"
    )
    out.message(text, {"tinker_path": args.path, "ttl_seconds": ttl})


async def _run_list(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    runs: list[t.TrainingRun] = []
    async for run in rest.iter_training_runs():
        runs.append(run)
        if args.limit is not None and len(runs) >= args.limit:
            break

    def render(console: Console) -> None:
        if not runs:
            console.print("No training runs.")
            return
        table = Table(title=f"Training runs ({len(runs)})", title_justify="left")
        table.add_column("training_run_id", no_wrap=True)
        table.add_column("base_model")
        table.add_column("lora_rank", justify="right")
        table.add_column("last request")
        table.add_column("last checkpoint", no_wrap=True)
        for run in runs:
            last = run.last_checkpoint.tinker_path if run.last_checkpoint else "-"
            rank = "-" if run.lora_rank is None else str(run.lora_rank)
            table.add_row(
                run.training_run_id, run.base_model, rank, _when(run.last_request_time), last
            )
        console.print(table)

    out.emit({"training_runs": runs}, render)


async def _run_info(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    run = await rest.get_training_run(args.run_id)
    checkpoints = list((await rest.list_checkpoints(args.run_id)).checkpoints)
    rows: list[tuple[str, Any]] = [
        ("training_run_id", run.training_run_id),
        ("base_model", run.base_model),
        ("owner", run.model_owner),
        ("is_lora", run.is_lora),
        ("lora_rank", run.lora_rank),
        ("corrupted", run.corrupted),
        ("last request", _when(run.last_request_time)),
        ("last checkpoint", run.last_checkpoint.tinker_path if run.last_checkpoint else None),
        (
            "last sampler checkpoint",
            run.last_sampler_checkpoint.tinker_path if run.last_sampler_checkpoint else None,
        ),
    ]

    def render(console: Console) -> None:
        console.print(_kv_table("Training run", rows))
        if checkpoints:
            console.print(_checkpoints_table(checkpoints, f"Checkpoints ({len(checkpoints)})"))

    out.emit({"training_run": run, "checkpoints": checkpoints}, render)


async def _session_list(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    sessions: list[str] = []
    async for session_id in rest.iter_sessions():
        sessions.append(session_id)
        if args.limit is not None and len(sessions) >= args.limit:
            break

    def render(console: Console) -> None:
        if not sessions:
            console.print("No sessions.")
            return
        table = Table(title=f"Sessions ({len(sessions)})", title_justify="left")
        table.add_column("session_id", no_wrap=True)
        for session_id in sessions:
            table.add_row(session_id)
        console.print(table)

    out.emit({"sessions": sessions}, render)


async def _admin_audit(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    audit = await AdminClient(rest.transport).get_audit_log(args.event_type, args.day)

    def render(console: Console) -> None:
        if not audit.entries:
            console.print("No audit entries.")
            return
        table = Table(title=f"Audit log ({len(audit.entries)})", title_justify="left")
        for column in ("time", "event", "details"):
            table.add_column(column, no_wrap=column != "details")
        for entry in audit.entries:
            details = ", ".join(f"{k}={v}" for k, v in sorted(entry.event_details.items()))
            table.add_row(_when(entry.timestamp), entry.event, details)
        console.print(table)

    out.emit(audit, render)


async def _admin_usage(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    usage = await AdminClient(rest.transport).get_billing_usage(args.start, args.end)

    def render(console: Console) -> None:
        if not usage.data:
            console.print("No usage in this window.")
            return
        table = Table(title=f"Usage ({len(usage.data)} buckets)", title_justify="left")
        for column in ("hour", "kind", "quantity", "project", "session", "cost USD"):
            table.add_column(column, no_wrap=True)
        for event in usage.data:
            info = event.event_info
            quantity = msgspec.structs.asdict(info)
            cost = "-" if event.estimated_cost_usd is None else f"{event.estimated_cost_usd:.4f}"
            table.add_row(
                _when(event.bucket_start),
                str(info.__struct_config__.tag),
                ", ".join(f"{k}={v}" for k, v in quantity.items()),
                event.project_id or "-",
                event.session_id or "-",
                cost,
            )
        console.print(table)

    out.emit(usage, render)


async def _admin_storage(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    storage = await AdminClient(rest.transport).get_current_checkpoint_storage_usage(
        args.project_id
    )

    def render(console: Console) -> None:
        if not storage.data:
            console.print("No checkpoints stored.")
            return
        table = Table(title="Checkpoint storage", title_justify="left")
        for column in ("project", "owner", "checkpoints", "size", "monthly USD"):
            table.add_column(column, no_wrap=True)
        for item in storage.data:
            cost = item.estimated_monthly_cost_usd
            table.add_row(
                item.project_id or "-",
                item.org_user_urn or "-",
                str(item.checkpoint_count),
                _size(item.size_bytes),
                "-" if cost is None else f"{cost:.2f}",
            )
        console.print(table)

    out.emit(storage, render)


async def _session_info(args: argparse.Namespace, out: Output, rest: RestClient) -> None:
    session = await rest.get_session(args.session_id)
    rows: list[tuple[str, Any]] = [
        ("session_id", args.session_id),
        ("display_name", session.display_name),
        ("training runs", ", ".join(session.training_run_ids) or None),
        ("samplers", ", ".join(session.sampler_ids) or None),
    ]
    data = {"session_id": args.session_id, **_builtins(session)}
    out.emit(data, lambda console: console.print(_kv_table("Session", rows)))


async def _sample(args: argparse.Namespace, out: Output, config: Config) -> None:
    from tinkex_trio.service import open_service
    from tinkex_trio.tokenizer import get_tokenizer

    await _preflight(config)
    async with open_service(config) as service:
        if args.model_path is not None:
            _parsed(args.model_path)
            sampler = await service.create_sampling_client(model_path=args.model_path)
        else:
            sampler = await service.create_sampling_client(base_model=args.model)
        base_model = sampler.get_base_model() or args.model
        tokenizer = await trio.to_thread.run_sync(get_tokenizer, base_model)
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = t.ModelInput.from_ints(tokenizer.encode(text))
        try:
            params = t.SamplingParams(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=t.UNSET if args.seed is None else args.seed,
            )
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        response = await sampler.sample(
            prompt, num_samples=args.num_samples, sampling_params=params
        )
    samples = [
        {
            "text": tokenizer.decode(s.tokens, skip_special_tokens=True),
            "tokens": list(s.tokens),
            "stop_reason": s.stop_reason,
        }
        for s in response.sequences
    ]
    data = {
        "model": base_model,
        "model_path": args.model_path,
        "prompt": args.prompt,
        "samples": samples,
    }

    def render(console: Console) -> None:
        for index, sample in enumerate(samples):
            if len(samples) > 1:
                console.print(f"--- sample {index + 1} (stop: {sample['stop_reason']}) ---")
            console.print(sample["text"])

    out.emit(data, render)


def _local_command(command: str, argv: Sequence[str]) -> int:
    """`serve` and `hf-cache`: their own parsers in `tinkex_trio.local` (needs the extra)."""
    missing = [name for name in LOCAL_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"tinkex-trio {command}: the local backend needs {', '.join(missing)}, which "
            "is not installed.\n  Install it with:  pip install 'tinkex-trio[local]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if command == "hf-cache":
        from tinkex_trio.local.hf_cache import main as hf_cache_main

        return hf_cache_main(list(argv))
    from tinkex_trio.local.server import main as serve_main

    return serve_main(list(argv))


# --- parser ------------------------------------------------------------------------------------

RestCommand = Callable[[argparse.Namespace, Output, RestClient], Awaitable[None]]


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (SUPPRESS: the last one given wins)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--format",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="output format (default: table); json is one document on stdout",
    )
    common.add_argument(
        "--base-url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="server URL (default: $TINKER_BASE_URL, else the hosted service)",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        metavar="KEY",
        help="API key (default: $TINKER_API_KEY)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tinkex-trio",
        description="Manage Tinker checkpoints, runs and sessions; sample; run the local backend.",
        epilog="Exit codes: 0 ok, 1 server/SDK error, 2 bad arguments or missing credentials, "
        "3 server unreachable.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # serve: every argument after it goes to tinkex_trio.local.server.main.
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the local Tinker-compatible backend (`tinkex-trio serve --help`)",
    )

    # hf-cache: likewise, every argument goes to tinkex_trio.local.hf_cache.main.
    commands.add_parser(
        "hf-cache",
        add_help=False,
        help="write the served models into the Hugging Face hub cache, for offline tools "
        "(`tinkex-trio hf-cache --help`)",
    )

    commands.add_parser("version", help="print the version", parents=[common])

    checkpoint = commands.add_parser("checkpoint", help="list, inspect, download, publish...")
    ck = checkpoint.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ck.add_parser("list", help="list checkpoints (all, or of one run)", parents=[common])
    p.add_argument("--run", metavar="RUN_ID", help="only this training run's checkpoints")
    p.add_argument("--limit", type=positive_int, help="show at most this many")
    p.set_defaults(rest=_checkpoint_list)
    for name, func, text in (
        ("info", _checkpoint_info, "show a checkpoint's model, size, visibility, expiry"),
        ("publish", _checkpoint_publish, "make a checkpoint public"),
        ("unpublish", _checkpoint_unpublish, "make a checkpoint private again"),
        ("delete", _checkpoint_delete, "delete a checkpoint"),
    ):
        p = ck.add_parser(name, help=text, parents=[common])
        p.add_argument("path", metavar="PATH", help="tinker://RUN_ID/weights/NAME")
        p.set_defaults(rest=func)
    p = ck.add_parser("download", help="download and extract a checkpoint", parents=[common])
    p.add_argument("path", metavar="PATH", help="tinker://RUN_ID/weights/NAME")
    p.add_argument("--output-dir", type=Path, default=Path("."), help="default: .")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument(
        "--max-bytes",
        type=byte_size,
        default=DEFAULT_MAX_EXTRACTED_BYTES,
        metavar="SIZE",
        help="refuse an archive that extracts to more than SIZE (e.g. 500M; default 64G)",
    )
    p.add_argument(
        "--max-members",
        type=positive_int,
        default=DEFAULT_MAX_MEMBERS,
        metavar="N",
        help=f"refuse an archive with more than N files (default {DEFAULT_MAX_MEMBERS})",
    )
    p.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="FILE",
        help="decrypt age-encrypted external weights (<file>.age) with this age identity file "
        "or unencrypted OpenSSH private key (needs: pip install 'tinkex-trio[age]')",
    )
    p.set_defaults(rest=_checkpoint_download)
    p = ck.add_parser(
        "set-ttl", help="expire a checkpoint SECONDS from now (--remove: never)", parents=[common]
    )
    p.add_argument("path", metavar="PATH", help="tinker://RUN_ID/weights/NAME")
    p.add_argument("seconds", metavar="SECONDS", nargs="?", type=positive_int)
    p.add_argument("--remove", action="store_true", help="remove the expiry")
    p.set_defaults(rest=_checkpoint_set_ttl)

    run = commands.add_parser("run", help="training runs")
    rn = run.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = rn.add_parser("list", help="list training runs", parents=[common])
    p.add_argument("--limit", type=positive_int, help="show at most this many")
    p.set_defaults(rest=_run_list)
    p = rn.add_parser("info", help="show a training run and its checkpoints", parents=[common])
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(rest=_run_info)

    session = commands.add_parser("session", help="sessions")
    ss = session.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ss.add_parser("list", help="list sessions", parents=[common])
    p.add_argument("--limit", type=positive_int, help="show at most this many")
    p.set_defaults(rest=_session_list)
    p = ss.add_parser("info", help="show a session's training runs and samplers", parents=[common])
    p.add_argument("session_id", metavar="SESSION_ID")
    p.set_defaults(rest=_session_info)

    admin = commands.add_parser("admin", help="audit log, billing usage, checkpoint storage")
    ad = admin.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ad.add_parser("audit", help="the audit log of one UTC day", parents=[common])
    p.add_argument(
        "--event-type",
        choices=["all", "checkpoints", "projects", "teams", "organizations"],
        default="all",
    )
    p.add_argument("--day", type=date.fromisoformat, metavar="YYYY-MM-DD", help="default: today")
    p.set_defaults(rest=_admin_audit)
    p = ad.add_parser("usage", help="hourly billing usage of a window", parents=[common])
    p.add_argument("--start", required=True, metavar="TIME", help="e.g. 2026-01-05T00:00:00Z")
    p.add_argument("--end", required=True, metavar="TIME", help="at most 14 days after --start")
    p.set_defaults(rest=_admin_usage)
    p = ad.add_parser("storage", help="checkpoints stored now, by project", parents=[common])
    p.add_argument("--project-id", metavar="PROJECT", help="only this project")
    p.set_defaults(rest=_admin_storage)

    p = commands.add_parser("sample", help="generate text once", parents=[common])
    p.add_argument("--prompt", required=True, help="the prompt text")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default=DEFAULT_SAMPLE_MODEL,
        help=f"base model (default: {DEFAULT_SAMPLE_MODEL})",
    )
    source.add_argument("--model-path", metavar="TINKER_PATH", help="sampler weights to use")
    p.add_argument("--max-tokens", type=non_negative_int, default=64, help="default: 64")
    p.add_argument("--temperature", type=float, default=0.7, help="default: 0.7 (0: greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--num-samples", type=positive_int, default=1, help="default: 1")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    return parser


# --- main --------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    print(f"tinkex-trio: error: {message}", file=sys.stderr, flush=True)
    return code


def _api_message(exc: TinkexError) -> str:
    """The server's own message: `detail` of a JSON error body when there is one."""
    if isinstance(exc, APIStatusError):
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            return f"the server answered {exc.status_code}: {body['detail']}"
        return exc.message
    return str(exc) or type(exc).__name__


def _run(args: argparse.Namespace, out: Output) -> None:
    if args.command == "version":
        _cmd_version(args, out)
        return
    config = _config(args)
    try:
        if args.command == "sample":
            trio.run(_sample, args, out, config)
        else:
            rest_command: RestCommand = args.rest

            async def body(rest: RestClient) -> None:
                await rest_command(args, out, rest)

            trio.run(_with_rest, config, body)
    except APIConnectionError as exc:
        raise _unreachable(config, exc) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("serve", "hf-cache"):
        return _local_command(args.command, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "checkpoint" and args.action == "set-ttl":
        if args.remove == (args.seconds is not None):
            _usage_error(parser, "checkpoint set-ttl needs either SECONDS or --remove")
    out = Output(getattr(args, "format", "table"))
    try:
        _run(args, out)
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except MissingAPIKeyError:
        return _fail(_MISSING_KEY, EXIT_USAGE)
    except InvalidInputError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except TinkexError as exc:
        return _fail(_api_message(exc), EXIT_ERROR)
    except (OSError, ValueError) as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


if __name__ == "__main__":
    sys.exit(main())
