"""The `relay` console script: `relay init`, `relay agent-token`, `relay agent-cert` and
`relay agent-revoke` manage the state dir.

Exit codes: 0 success, 2 usage error, 1 runtime error; every error is one stderr
line, "relay ...: error: ...", that says what to do.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from relay import defaults
from relay.state import (
    CERTIFICATE,
    TOKEN,
    PortSet,
    State,
    StateError,
    init_state,
    validate_agent_name,
    validate_hostname,
    write_private_file,
)

_LOW, _HIGH = defaults.AGENT_PORT_RANGE
_POLL = 2.0  # relay.server.CREDENTIAL_POLL_INTERVAL, not imported: it would pull in Twisted
_ANY_PORT = f"any port {_LOW}-{_HIGH} but the relay's own"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, as the SPEC promises (no usage block before)."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _checked(validate: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type that turns VALIDATE's ValueError into a usage error."""

    def convert(text: str) -> object:
        try:
            return validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _parser() -> _Parser:
    parser = _Parser(
        prog="relay",
        description="Manage a relay's state dir: its CA, server certificate and agent credentials.",
        epilog="Run the relay itself with `twistd -n relay-server`.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_help = f"state dir (default: {defaults.STATE_DIR})"

    init = commands.add_parser(
        "init",
        help="create or update the state dir (CA and server certificate)",
        description="Create DIR (mode 0700) with a CA and a server certificate signed by it. "
        "Idempotent: the CA is kept; other --hostname values re-issue the server "
        "certificate under the same CA (without --hostname an existing one is kept). "
        "Prints the CA pin.",
    )
    init.add_argument("--state", metavar="DIR", default=defaults.STATE_DIR, help=state_help)
    init.add_argument(
        "--hostname",
        metavar="NAME",
        action="append",
        type=_checked(validate_hostname),
        help="DNS name or IP address agents use to reach the relay; repeat for more "
        "(default for a new certificate: localhost, 127.0.0.1, ::1 and this machine's FQDN)",
    )
    init.set_defaults(run=_init)

    token = commands.add_parser(
        "agent-token",
        help="create or rotate an agent's token",
        description="Create agent NAME, or give it a new token (the old one stops working), "
        "and print the token alone on stdout. Only a hash is stored: save it now.",
    )
    token.add_argument("--state", metavar="DIR", default=defaults.STATE_DIR, help=state_help)
    token.add_argument(
        "--ports",
        metavar="SPEC",
        type=_checked(PortSet.parse),
        help="ports and ranges this agent may have the relay listen on, e.g. 8080,2000-2007 "
        f"(default: {_ANY_PORT})",
    )
    token.add_argument(
        "name", metavar="NAME", type=_checked(validate_agent_name), help="the agent's name"
    )
    token.set_defaults(run=_agent_token)

    cert = commands.add_parser(
        "agent-cert",
        help="issue an agent's client certificate",
        description="Issue agent NAME a new EC P-256 key and a client certificate signed by "
        "the relay's CA (valid for a year), write both to FILE (mode 0600) and record the "
        "certificate as the agent's one valid certificate: a previous one stops working, a "
        "token of the agent stays valid. Needs DIR/ca.key. Run the agent with --cert FILE.",
    )
    cert.add_argument("--state", metavar="DIR", default=defaults.STATE_DIR, help=state_help)
    cert.add_argument(
        "--ports",
        metavar="SPEC",
        type=_checked(PortSet.parse),
        help="ports and ranges this agent may have the relay listen on, e.g. 8080,2000-2007 "
        f"(default: {_ANY_PORT}); replaces the ports of an existing agent",
    )
    cert.add_argument(
        "--out",
        metavar="FILE",
        required=True,
        help="where to write the key and certificate (PEM, mode 0600)",
    )
    cert.add_argument("--force", action="store_true", help="replace FILE if it exists")
    cert.add_argument(
        "name", metavar="NAME", type=_checked(validate_agent_name), help="the agent's name"
    )
    cert.set_defaults(run=_agent_cert)

    revoke = commands.add_parser(
        "agent-revoke",
        help="remove an agent and all its credentials",
        description="Remove agent NAME with its token and its client certificate. A running "
        f"relay closes the agent's tunnel and frees its ports within {_POLL:g} s (at once on "
        "SIGHUP).",
    )
    revoke.add_argument("--state", metavar="DIR", default=defaults.STATE_DIR, help=state_help)
    revoke.add_argument(
        "name", metavar="NAME", type=_checked(validate_agent_name), help="the agent's name"
    )
    revoke.set_defaults(run=_agent_revoke)
    return parser


def _init(args: argparse.Namespace) -> None:
    pin = init_state(args.state, args.hostname)
    state = State(args.state)
    _say(f"CA pin: {pin}")
    _say(f"State dir: {state.path.resolve()}")
    _say(
        f"Server certificate: {state.server_cert_path} (names: {', '.join(state.server_hostnames())})"
    )
    _say(
        f"Agents trust this relay with --ca {state.ca_cert_path} (copy the file to the "
        f"inside host) or --pin {pin}"
    )
    _say(f"Next: relay agent-token --state {shlex.quote(args.state)} NAME")


def _agent_token(args: argparse.Namespace) -> None:
    state = State(args.state)
    rotated = args.name in state.agents()
    token = state.issue_token(args.name, args.ports)
    _say(token)
    ports = args.ports or _ANY_PORT
    what = "rotated (the old token no longer works)" if rotated else "created"
    # stderr, so that `relay agent-token NAME > FILE` captures the token alone.
    print(
        f"relay agent-token: agent {args.name!r} {what}, ports: {ports}. The token is shown "
        "only once: save it to a file (mode 0600) and start the agent with --token-file FILE.",
        file=sys.stderr,
    )


def _agent_cert(args: argparse.Namespace) -> None:
    state = State(args.state)
    out = args.out
    if not args.force and os.path.lexists(out):
        raise StateError(f"{out} exists; give another --out, or --force to replace it")
    had = state.credentials(args.name)
    issued = state.issue_certificate(args.name, args.ports)
    try:
        write_private_file(out, issued.pem, overwrite=args.force)
    except FileExistsError:  # created since the check above
        raise StateError(f"{out} exists; give another --out, or --force to replace it") from None
    except OSError as exc:
        raise StateError(
            f"cannot write --out {out}: {exc.strerror or exc}; check the path and its permissions"
        ) from None
    state.record_certificate(args.name, issued, args.ports)
    if CERTIFICATE in had:
        what = "re-issued (its previous certificate no longer works)"
    elif had:
        what = "given a certificate"
    else:
        what = "created"
    _say(f"relay agent-cert: agent {args.name!r} {what}, ports: {args.ports or _ANY_PORT}.")
    if TOKEN in had:
        _say(
            "Its token stays valid too; `relay agent-revoke` removes both, `relay agent-token` "
            "rotates the token."
        )
    _say(f"Key and certificate: {out} (mode 0600; it is the agent's secret)")
    _say(f"Certificate: {issued.fingerprint}, valid until {issued.not_after:%Y-%m-%d %H:%M} UTC")
    _say(
        f"Copy {out} and {state.ca_cert_path} to the inside host and run: twistd -n relay-agent "
        f"--relay HOST:PORT --cert {shlex.quote(os.path.basename(out))} --ca ca.pem "
        "--expose PUBLIC=HOST:PORT"
    )


def _agent_revoke(args: argparse.Namespace) -> None:
    state = State(args.state)
    try:
        revoked = state.revoke(args.name)
    except KeyError:
        known = ", ".join(sorted(state.agents())) or "none"
        raise StateError(
            f"no agent {args.name!r} in {state.agents_path} (known agents: {known}); "
            "check the name and --state"
        ) from None
    kinds = [k for k, had in (("token", revoked.token), ("certificate", revoked.certificate)) if had]
    _say(
        f"relay agent-revoke: agent {args.name!r} removed with its {' and '.join(kinds)}. A "
        f"running relay closes its tunnel and frees its ports within {_POLL:g} s (at once "
        "after `kill -HUP` of the relay)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `relay` with ARGV (default sys.argv[1:]); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.run(args)
    except _OutputError as exc:
        _quiet_stdout()
        return _fail(args.command, f"cannot write to standard output: {exc}; {_DONE_ANYWAY[args.command]}")
    except StateError as exc:
        return _fail(args.command, str(exc))
    except OSError as exc:
        where = exc.filename or args.state
        return _fail(
            args.command,
            f"cannot use {where}: {exc.strerror or exc}; check the path and its permissions",
        )
    return 0


# What a command had already done when its output could not be written.
_DONE_ANYWAY = {
    "init": "the state dir is set up all the same; run relay init again (it changes nothing) to see the pin",
    "agent-token": "the agent's new token was stored but not shown (any older one no longer "
    "works); run relay agent-token again into a writable place",
    "agent-cert": "the certificate and key were written to --out all the same",
    "agent-revoke": "the agent was removed all the same",
}


class _OutputError(Exception):
    """Standard output did not take what a command printed (a closed pipe, a full disk)."""


def _say(text: str) -> None:
    """print(text), at once: a closed pipe or a full disk is reported as such, not as a
    problem with the state dir, and after what the command already did (_DONE_ANYWAY)."""
    try:
        print(text, flush=True)
    except OSError as exc:
        raise _OutputError(exc.strerror or str(exc)) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit fails no more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (tests)
        pass


def _fail(command: str, message: str) -> int:
    message = " ".join(message.split())  # the SPEC promises one line
    print(f"relay {command}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
