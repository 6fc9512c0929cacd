"""Command line: argv → subcommand → the module that does the work. No logic of its own.

Every failure ends with a non-zero exit and one line on stderr: ``villaged: error: <reason>``.
Exit codes: 0 success, 1 the command failed, 2 the command line was wrong.
"""

from __future__ import annotations

import argparse
import json
import pwd
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from villaged import __version__
from villaged.admin import client as admin_client
from villaged.admin.client import AdminCommandError
from villaged.app import StartupError
from villaged.config import Config, ConfigError, check_config_files, load_config
from villaged.ops.control import ControlError
from villaged.storage.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class CommandError(Exception):
    """A command failed for a reason the user can act on; the message is the one line shown."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_version(args: argparse.Namespace) -> int:
    print(f"villaged {__version__}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from villaged.ops.provision import init_cluster, init_dev

    if not args.dev:
        raise CommandError("only development nodes can be initialised yet: pass --dev")
    directory = Path(args.dir)
    if args.cluster:
        zones = [zone.strip() for zone in (args.zones or "a,b,c").split(",")]
        cluster = init_cluster(
            directory,
            nodes=3 if args.nodes is None else args.nodes,
            zones=zones,
            domain=args.domain,
            port_base=args.port_base,
            demo_users=args.demo_users,
            force=args.force,
            now=datetime.now(UTC),
        )
        created, kept = cluster.created, cluster.kept
    elif args.nodes is not None or args.zones is not None:
        raise CommandError("--nodes and --zones make a cluster: pass --cluster too")
    else:
        result = init_dev(
            directory,
            domain=args.domain,
            port_base=args.port_base,
            force=args.force,
            now=datetime.now(UTC),
        )
        created, kept = result.created, result.kept
    for path in created:
        print(f"created {path}")
    for path in kept:
        print(f"kept    {path}")
    if args.cluster:
        print(
            f"cluster {cluster.cluster_id}: {', '.join(node.id for node in cluster.nodes)};"
            f" start it with: villaged cluster run-local --dir {directory}"
        )
        if args.demo_users:
            print(
                "the demo accounts are made once it runs;"
                f" passwords in {directory / 'demo-accounts.txt'}"
            )
    elif args.demo_users:
        from villaged.ops.demo import ensure_demo_users

        for line in trio.run(ensure_demo_users, directory / "villaged.toml"):
            print(line)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from villaged.ops.hostcheck import audit_host

    config = _config(args)
    uid: int | None = None
    if args.user:
        try:
            uid = pwd.getpwnam(args.user).pw_uid
        except KeyError:
            raise CommandError(f"--user {args.user}: no such user on this host") from None
    findings = audit_host(config, now=datetime.now(UTC), uid=uid)
    for finding in findings:
        # Verdicts worth reading go where diagnostics go; the ok lines are the report.
        print(finding, file=sys.stdout if finding.severity == "ok" else sys.stderr)
    errors = sum(finding.severity == "error" for finding in findings)
    if errors:
        raise CommandError(f"{errors} problem{'s' if errors > 1 else ''}")
    print(f"{args.config}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from villaged.app import run_node
    from villaged.ops.logging import configure_logging

    config = _config(args)
    check_config_files(config)
    try:
        configure_logging(config.log.level, config.server.node, file=config.log.file)
    except OSError as exc:
        raise CommandError(
            f"cannot open the log file {config.log.file} ([log] file): {exc.strerror or exc}"
        ) from None
    trio.run(run_node, config)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from villaged.ops.keys import rotate_keys

    result = trio.run(rotate_keys, _config(args))
    print(
        f"new primary key {result.primary_id} ({result.key_count} keys in the keyset); "
        f"re-wrapped {result.rewrapped} user data keys"
    )
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    from villaged.ops.keys import retire_old_keys

    result = trio.run(retire_old_keys, _config(args))
    retired = ", ".join(map(str, result.retired)) or "none"
    print(f"retired keys: {retired}; primary key {result.primary_id} remains")
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from villaged.ops import accounts

    config = _config(args)
    action = args.user_command
    if config.cluster.enabled:
        return _cluster_user(config, args)
    if action == "list":
        for jid in trio.run(accounts.list_users, config):
            print(jid)
        return 0
    if action == "delete":
        print(f"deleted {trio.run(accounts.delete_user, config, args.jid)} and destroyed its key")
        return 0
    password = accounts.read_new_password()
    if action == "add":
        print(f"added {trio.run(accounts.add_user, config, args.jid, password)}")
    else:
        print(
            f"changed the password of {trio.run(accounts.set_password, config, args.jid, password)}"
        )
    return 0


def _cluster_user(config: Config, args: argparse.Namespace) -> int:
    """``villaged user`` on a cluster node: the running node does it (its control socket)."""
    from villaged.ops import accounts

    action = args.user_command
    if action == "list":
        for jid in _control(config, "user.list", {}):
            print(jid)
        return 0
    if action == "delete":
        done = _control(config, "user.delete", {"jid": args.jid})
        print(f"deleted {done if isinstance(done, str) else args.jid} and destroyed its key")
        return 0
    password = accounts.read_new_password()
    done = _control(config, f"user.{action}", {"jid": args.jid, "password": password})
    jid = done if isinstance(done, str) else args.jid
    print(f"added {jid}" if action == "add" else f"changed the password of {jid}")
    return 0


def _control(config: Config, cmd: str, args: dict[str, object]) -> Any:
    from villaged.ops.control import call_control, control_socket_path

    return trio.run(call_control, control_socket_path(config), cmd, args)


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from villaged.ops.control import status_report

    config = _config(args)
    if not config.cluster.enabled:
        raise CommandError(f"{config.source}: this node is not in a cluster ([cluster] enabled)")
    document = _control(config, "cluster.status", {})
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        for line in status_report(document):
            print(line)
    return 0


def cmd_cluster_run_local(args: argparse.Namespace) -> int:
    from villaged.ops.devcluster import DevClusterError, run_local

    try:
        trio.run(run_local, Path(args.dir))
    except DevClusterError as exc:
        raise CommandError(str(exc)) from None
    return 0


def cmd_cluster_force_recover(args: argparse.Namespace) -> int:
    from villaged.cluster.recover import RecoverError, force_recover
    from villaged.storage.errors import StorageError

    config = _config(args)
    if not args.majority_lost:
        raise CommandError(
            "force-recover makes this node the only voter of every group and may lose writes"
            " that only the lost nodes held; run it on a stopped node only when the others are"
            " gone for good, with --majority-lost, and bring them back with empty data"
            " directories"
        )
    try:
        done = trio.run(force_recover, config)
    except (RecoverError, StorageError, OSError) as exc:
        raise CommandError(str(exc)) from None
    for item in done:
        before = ", ".join(sorted(item.voters_before)) or "none known"
        print(
            f"{item.group}: voters were {before} (now fenced); now only this node. Its log"
            f" ended at entry {item.index - 1} of term {item.last_term_before}"
            f" ({item.committed_before} known committed)"
        )
    print(
        f"{len(done)} groups recovered. Start this node, then the others with empty data"
        " directories: each rejoins as a new incarnation."
    )
    return 0


def cmd_storage_verify(args: argparse.Namespace) -> int:
    from villaged.storage.verify import verify_store

    config = _config(args)
    report = verify_store(config.storage.dir, max_record_bytes=config.storage.max_record_bytes)
    for line in report.summary_lines():
        print(line)
    if not report.ok:
        raise CommandError(f"storage is damaged: {report.problems[0]}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from villaged.ops import backup

    try:
        if args.backup_command == "keygen":
            from villaged.ops.backupkeys import RecoveryKeyError, generate_recovery_key

            try:
                public = generate_recovery_key(Path(args.out))
            except RecoveryKeyError as exc:
                raise CommandError(str(exc)) from None
            print(f"recovery key {args.out} (keep it off this host), public key {public}")
            print(f"set [backup] keyset_recipient = {str(public)!r} on the nodes")
            return 0
        if args.backup_command == "create":
            config = _config(args)
            target = Path(args.to) if args.to else config.backup.dir
            if target is None:
                raise CommandError(
                    f"where to? pass --to DIR or set [backup] dir in {config.source}"
                )
            made = backup.create_backup(config, target, keep=args.keep)
            print(
                f"backup {made.directory}: log up to index {made.last_index}, {made.users} users,"
                f" {made.archived_messages} archived messages"
            )
            for path in made.pruned:
                print(f"pruned {path}")
            return 0
        public_key = Path(args.public_key) if args.public_key else None
        recovery_key = Path(args.recovery_key) if args.recovery_key else None
        if public_key is None and args.config:
            # The node's own public key, kept beside the keyset: a backup re-signed with
            # another key (and carrying that key) fails against it.
            trusted = _config(args).storage.keyset.parent / backup.PUBLIC_KEY
            public_key = trusted if trusted.is_file() else None
        if args.backup_command == "verify":
            keyset = _config(args).storage.keyset if args.config else None
            checked = backup.verify_backup(
                Path(args.dir), public_key=public_key, keyset=keyset, recovery_key=recovery_key
            )
            verb = "ok"
            try:
                if checked.public_key_checked:  # only a trusted signature counts as verified
                    backup.record_verified(checked)
            except OSError as exc:  # the backup is fine; the node's metric will show it stale
                print(
                    f"villaged: warning: cannot note the verification beside the backup: {exc}",
                    file=sys.stderr,
                )
        else:
            checked = backup.restore_backup(
                Path(args.dir),
                _config(args),
                force=args.force,
                public_key=public_key,
                recovery_key=recovery_key,
            )
            verb = "restored"
    except backup.BackupError as exc:
        raise CommandError(str(exc)) from None
    signer = "--public-key" if checked.public_key_checked else "the key inside the backup only"
    print(
        f"{checked.directory}: {verb}: {checked.files} files, log up to index"
        f" {checked.last_index}, {checked.users} users, {checked.archived_messages} archived"
        f" messages; signature checked with {signer}"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from villaged.admin import audit

    config = _config(args)
    directory = config.storage.dir / "audit"
    origin = audit.origin_for(config.server.domain)
    # Records and checkpoints are UTF-8 whatever the terminal's locale: write bytes.
    sys.stdout.flush()
    out = sys.stdout.buffer
    if args.audit_command == "verify":
        report = audit.verify_log(
            directory,
            public_key_file=Path(args.public_key) if args.public_key else None,
            retained_checkpoint=(
                audit.read_checkpoint_file(Path(args.checkpoint)) if args.checkpoint else None
            ),
            origin=origin,
        )
        out.write(report.summary().encode("utf-8") + b"\n")
    elif args.audit_command == "checkpoint":
        out.write(audit.latest_checkpoint(directory, origin).encode("utf-8"))
    else:
        since = audit.parse_since(args.since) if args.since else None
        for line in audit.export_lines(directory, since=since):
            out.write(line + b"\n")
    out.flush()
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from villaged.admin.operators import OperatorError
    from villaged.ops import operators

    config = _config(args)
    action = args.operator_command
    uid = _uid(args.uid) if action == "enroll" else 0
    try:
        store = operators.open_operators(config)
        if action == "enroll":
            enrollment = operators.enroll(store, config, args.name, uid, time.time())
            print("\n".join(enrollment.lines()))
        elif action == "list":
            print("\n".join(operators.listing(store.list(), time.time())))
        else:
            done = {"disable": store.disable, "enable": store.enable, "remove": store.remove}
            done[action](args.name)
            print(f"{action}d operator {args.name}")
    except OperatorError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _uid(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise CommandError(f"--uid {text[:40]!r} is not a numeric Unix user id")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="villaged",
        description="villaged, the village messenger daemon (an XMPP server).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", required=True, metavar="FILE", help="villaged.toml")
        return p

    add("version", cmd_version, "print the version")

    p = add("init", cmd_init, "write a working config, TLS certificate and keyset")
    p.add_argument("--dev", action="store_true", help="a development node (self-signed cert)")
    p.add_argument("--dir", required=True, metavar="DIR", help="where to write the node's files")
    p.add_argument("--domain", default="localhost", help="the XMPP domain (default localhost)")
    p.add_argument(
        "--port-base",
        type=int,
        default=5222,
        metavar="N",
        help="c2s N, c2s TLS N+1, WebSocket N+2, HTTP N+3, s2s N+4, s2s TLS N+5, cluster N+6",
    )
    p.add_argument("--force", action="store_true", help="regenerate keys, certificate, config")
    p.add_argument("--demo-users", action="store_true", help="also create demo accounts")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="a dev cluster: DIR/ca (its CA) and one node directory DIR/n1, DIR/n2, … per node,"
        " node K on ports from N+10*(K-1)",
    )
    p.add_argument(
        "--nodes", type=int, metavar="K", help="with --cluster: how many nodes, 1 to 7 (default 3)"
    )
    p.add_argument(
        "--zones",
        metavar="A,B,…",
        help="with --cluster: zones given to the nodes in turn (default a,b,c)",
    )

    p = with_config(
        add("check", cmd_check, "validate a config and audit the host: file modes, TLS, listeners")
    )
    p.add_argument(
        "--user",
        metavar="NAME",
        help="the service's user, whom files must belong to (default: whoever runs the check)",
    )
    with_config(add("run", cmd_run, "run the node in the foreground"))

    keys = sub.add_parser("keys", help="manage the key-encryption keyset")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("rotate", help="add a new primary key and re-wrap user data keys")
    with_config(p).set_defaults(func=cmd_keys_rotate)
    p = keys_sub.add_parser(
        "retire", help="remove every key but the primary (after re-wrapping data keys under it)"
    )
    with_config(p).set_defaults(func=cmd_keys_retire)

    user = sub.add_parser(
        "user", help="manage accounts (a stopped single node, or a running cluster node)"
    )
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    for action, help_ in (
        ("add", "create an account; password from a prompt or stdin"),
        ("passwd", "change a password; password from a prompt or stdin"),
        ("delete", "delete an account and destroy its data key"),
    ):
        p = with_config(user_sub.add_parser(action, help=help_))
        p.add_argument("jid", metavar="JID", help="user@domain")
        p.set_defaults(func=cmd_user)
    with_config(user_sub.add_parser("list", help="list accounts")).set_defaults(func=cmd_user)

    cluster = sub.add_parser("cluster", help="a cluster of nodes serving one domain")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    p = with_config(
        cluster_sub.add_parser(
            "status", help="members, Raft groups and leaders, from a running node"
        )
    )
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.set_defaults(func=cmd_cluster_status)
    p = cluster_sub.add_parser(
        "run-local", help="run every node of a dev cluster (villaged init --dev --cluster)"
    )
    p.add_argument("--dir", required=True, metavar="DIR", help="the cluster's directory")
    p.set_defaults(func=cmd_cluster_run_local)
    p = with_config(
        cluster_sub.add_parser(
            "force-recover",
            help="last resort after losing most voters for good: make this stopped node the"
            " only voter of every group",
        )
    )
    p.add_argument(
        "--majority-lost",
        action="store_true",
        help="confirm: the other voters are gone for good (they come back with empty data)",
    )
    p.set_defaults(func=cmd_cluster_force_recover)

    storage = sub.add_parser("storage", help="inspect the data directory")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    p = storage_sub.add_parser("verify", help="offline integrity scan of the data directory")
    with_config(p).set_defaults(func=cmd_storage_verify)

    backup = sub.add_parser("backup", help="verified backups of the data directory")
    backup_sub = backup.add_subparsers(dest="backup_command", required=True, metavar="ACTION")
    p = with_config(backup_sub.add_parser("create", help="back up a (running) node"))
    p.add_argument("--to", metavar="DIR", help="where backups are kept (default: [backup] dir)")
    p.add_argument("--keep", type=int, metavar="N", help="then keep only the newest N backups")
    p.set_defaults(func=cmd_backup)
    recovery_help = "open the keyset wrapped in the backup with this recovery key"
    p = backup_sub.add_parser("verify", help="check a backup (or the newest in DIR) by replay")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-c", "--config", metavar="FILE", help="use this config's keyset")
    p.add_argument("--public-key", metavar="FILE", help="the backup public key kept elsewhere")
    p.add_argument("--recovery-key", metavar="FILE", help=recovery_help)
    p.set_defaults(func=cmd_backup)
    p = with_config(backup_sub.add_parser("restore", help="rebuild a stopped node's data"))
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace a non-empty data directory")
    p.add_argument("--public-key", metavar="FILE", help="the backup public key kept elsewhere")
    p.add_argument("--recovery-key", metavar="FILE", help=recovery_help + " (a new host)")
    p.set_defaults(func=cmd_backup)
    p = backup_sub.add_parser("keygen", help="make the recovery key pair the keyset is wrapped for")
    p.add_argument("--out", required=True, metavar="FILE", help="private key (FILE.pub: public)")
    p.set_defaults(func=cmd_backup)

    audit = sub.add_parser("audit", help="the operator audit log (stopped or running node)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = with_config(
        audit_sub.add_parser("verify", help="check the audit log against its signed checkpoints")
    )
    p.add_argument("--checkpoint", metavar="FILE", help="a checkpoint kept off this host")
    p.add_argument("--public-key", metavar="FILE", help="the audit public key kept off this host")
    p.set_defaults(func=cmd_audit)
    p = audit_sub.add_parser(
        "checkpoint", help="print the newest signed checkpoint (signing one if there is none)"
    )
    with_config(p).set_defaults(func=cmd_audit)
    p = with_config(audit_sub.add_parser("export", help="print the records as JSON lines"))
    p.add_argument("--since", metavar="TIME", help="only records from this RFC 3339 time on")
    p.set_defaults(func=cmd_audit)

    operator = sub.add_parser(
        "operator",
        help="manage the operators of the admin socket and their TOTP logins"
        " (stopped or running node)",
    )
    operator_sub = operator.add_subparsers(dest="operator_command", required=True, metavar="ACTION")
    p = with_config(
        operator_sub.add_parser(
            "enroll", help="enrol an operator; shows their new TOTP secret (URI, QR code) once"
        )
    )
    p.add_argument("name", metavar="NAME", help="operator name: a-z first, then a-z 0-9 _ -")
    p.add_argument("--uid", required=True, metavar="UID", help="their Unix user id")
    p.set_defaults(func=cmd_operator)
    p = with_config(operator_sub.add_parser("list", help="list operators (never their secrets)"))
    p.set_defaults(func=cmd_operator)
    for action, help_ in (
        ("disable", "refuse an operator's logins"),
        ("enable", "allow an operator's logins again (also ends a lockout)"),
        ("remove", "forget an operator and destroy their TOTP secret"),
    ):
        p = with_config(operator_sub.add_parser(action, help=help_))
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=cmd_operator)

    admin_client.add_parser(sub, with_config)
    return parser


def _fail(message: str) -> NoReturn:
    print(f"villaged: error: {message}", file=sys.stderr)
    sys.exit(1)


# (OSError and StartupError last: _reason treats the others before them alike.)
_EXPECTED = (
    AdminCommandError,
    CommandError,
    ControlError,
    ConfigError,
    StorageError,
    ValueError,
    OSError,
    StartupError,
)


def _reason(exc: BaseException) -> str | None:
    """The one-line reason for an expected failure, or None for a bug (which keeps its
    traceback). Nurseries wrap errors in groups; a group of one expected error is that error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and not isinstance(exc, _EXPECTED[:-2]):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, _EXPECTED):
        text = str(exc)
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BaseException as exc:
        reason = _reason(exc)
        if reason is None or isinstance(exc, SystemExit):
            raise
        _fail(reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
