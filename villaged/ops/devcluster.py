"""A dev cluster on this machine (``villaged cluster run-local``, ``make cluster``).

Runs ``villaged run`` for every node directory ``init_cluster`` wrote (``DIR/n1``, ``DIR/n2``,
…) as child processes, each logging to ``DIR/nK/villaged.log``; waits (at most
`READY_TIMEOUT_S`) until every node answers ``cluster.status`` on its control socket with a
leader in every group; creates the demo accounts of ``DIR/demo-accounts.txt`` through n1's
control socket; says how to connect; then waits. SIGINT or SIGTERM stops every child (SIGTERM,
then SIGKILL after `STOP_TIMEOUT_S`); a child that exits on its own is reported and the others
are stopped.

The children run in their own session, so Ctrl-C in the terminal reaches this process only,
and the nodes are stopped in order rather than all hit at once.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Final

import trio

from villaged.config import load_config
from villaged.ops.control import ControlError, call_control, control_socket_path
from villaged.ops.provision import CONFIG_NAME, DEMO_ACCOUNTS_NAME, read_demo_accounts

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

__all__ = ["DevClusterError", "LocalNode", "find_nodes", "run_local"]

READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
POLL_INTERVAL_S: Final = 0.5
LOG_NAME: Final = "villaged.log"


class DevClusterError(Exception):
    """The dev cluster could not start or stopped on its own; the message is one line."""


@dataclass(frozen=True, slots=True)
class LocalNode:
    id: str
    config: Path
    control: Path
    domain: str
    c2s: tuple[str, ...]
    zone: str

    @property
    def log(self) -> Path:
        return self.config.parent / LOG_NAME


def find_nodes(directory: Path) -> list[LocalNode]:
    """The nodes ``init_cluster`` wrote into ``directory``, in order (n1, n2, …)."""
    configs = sorted(
        (path for path in directory.glob(f"n*/{CONFIG_NAME}") if path.parent.name[1:].isdigit()),
        key=lambda path: int(path.parent.name[1:]),
    )
    if not configs:
        raise DevClusterError(
            f"no node directories (n1, n2, …) in {directory}: make them with"
            f" `villaged init --dev --cluster --dir {directory}`"
        )
    nodes = []
    for path in configs:
        config = load_config(path)
        if not config.cluster.enabled:
            raise DevClusterError(f"{path} is not a cluster node ([cluster] enabled is false)")
        member = config.cluster.member(config.server.node)
        nodes.append(
            LocalNode(
                id=config.server.node,
                config=path,
                control=control_socket_path(config),
                domain=config.server.domain,
                c2s=tuple(str(endpoint) for endpoint in config.listeners.c2s.bind),
                zone=member.zone if member else "-",
            )
        )
    return nodes


def node_command(config: Path) -> list[str]:
    """How a node is started: this Python, this villaged."""
    return [sys.executable, "-m", "villaged", "run", "-c", str(config)]


@dataclass
class _Children:
    processes: dict[str, trio.Process] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)
    #: Why the cluster stopped by itself, if it did.
    failure: str | None = None


async def run_local(
    directory: Path,
    *,
    out: Callable[[str], None] = print,
    command: Callable[[Path], list[str]] = node_command,
    ready_timeout: float = READY_TIMEOUT_S,
) -> None:
    """Run the dev cluster in ``directory`` until SIGINT/SIGTERM or until a node exits
    (which raises :class:`DevClusterError` naming it)."""
    nodes = find_nodes(directory)
    children = _Children()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope, out)
                await _supervise(directory, nodes, children, nursery, out, command, ready_timeout)
    finally:
        with trio.CancelScope(shield=True):
            await _stop_all(children, out)
    if children.failure is not None:
        raise DevClusterError(children.failure)


async def _supervise(
    directory: Path,
    nodes: Sequence[LocalNode],
    children: _Children,
    nursery: trio.Nursery,
    out: Callable[[str], None],
    command: Callable[[Path], list[str]],
    ready_timeout: float,
) -> None:
    """Start the nodes (watched in ``nursery``), wait for them, then serve until cancelled."""
    for node in nodes:
        process = await _start(node, command, children)
        nursery.start_soon(_watch, node, process, children, nursery.cancel_scope)
    out(f"started {len(nodes)} nodes; logs in {directory}/nK/{LOG_NAME}")
    with trio.move_on_after(ready_timeout) as waiting:
        await _wait_ready(nodes)
    if waiting.cancelled_caught:
        reason = await _not_ready_reason(nodes)
        children.failure = f"the cluster is not ready after {ready_timeout:g} s: {reason}"
        nursery.cancel_scope.cancel()
        return
    accounts = directory / DEMO_ACCOUNTS_NAME
    if accounts.is_file():
        try:
            for line in await _create_demo_accounts(nodes[0], accounts):
                out(line)
        except DevClusterError as exc:
            children.failure = str(exc)
            nursery.cancel_scope.cancel()
            return
    for line in _how_to_connect(nodes, accounts):
        out(line)
    await trio.sleep_forever()


async def _start(
    node: LocalNode, command: Callable[[Path], list[str]], children: _Children
) -> trio.Process:
    log = node.log.open("ab")
    children.logs.append(log)
    process = await trio.lowlevel.open_process(
        command(node.config),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children.processes[node.id] = process
    return process


async def _stop_on_signal(
    signals: AsyncIterator[int], scope: trio.CancelScope, out: Callable[[str], None]
) -> None:
    async for signum in signals:
        out(f"{signal.Signals(signum).name}: stopping the nodes")
        scope.cancel()
        return


async def _watch(
    node: LocalNode, process: trio.Process, children: _Children, scope: trio.CancelScope
) -> None:
    code = await process.wait()
    if children.failure is None:
        children.failure = f"node {node.id} exited with code {code}; {_last_log_line(node)}"
    scope.cancel()


def _last_log_line(node: LocalNode) -> str:
    try:
        with node.log.open("rb") as stream:
            stream.seek(0, 2)
            stream.seek(max(0, stream.tell() - 4096))
            lines = stream.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        lines = []
    last = lines[-1].strip()[:300] if lines else ""
    return f"its log {node.log} ends: {last}" if last else f"its log {node.log} is empty"


async def _wait_ready(nodes: Sequence[LocalNode]) -> None:
    for node in nodes:
        while True:
            if await _readiness_problem(node) is None:
                break
            await trio.sleep(POLL_INTERVAL_S)


async def _not_ready_reason(nodes: Sequence[LocalNode]) -> str:
    for node in nodes:
        problem = await _readiness_problem(node)
        if problem is not None:
            return f"{node.id}: {problem}"
    return "it became ready just now"  # pragma: no cover - a race at the deadline


async def _readiness_problem(node: LocalNode) -> str | None:
    """Why ``node`` is not ready yet, or None when every group it reports has a leader."""
    try:
        status = await call_control(node.control, "cluster.status", {}, timeout=5.0)
    except ControlError as exc:
        return str(exc)
    groups = status.get("groups") if isinstance(status, dict) else None
    if not isinstance(groups, list) or not groups:
        return "no Raft groups reported yet"
    leaderless = [
        str(group.get("group"))
        for group in groups
        if not isinstance(group, dict) or group.get("leader") is None
    ]
    if leaderless:
        return f"no leader yet in {', '.join(leaderless)}"
    return None


async def _create_demo_accounts(node: LocalNode, accounts: Path) -> list[str]:
    try:
        existing = set(await call_control(node.control, "user.list", {}))
        lines = []
        for jid, password in read_demo_accounts(accounts):
            if jid in existing:
                lines.append(f"kept    demo account {jid}")
                continue
            await call_control(node.control, "user.add", {"jid": jid, "password": password})
            lines.append(f"created demo account {jid}")
    except ControlError as exc:
        raise DevClusterError(f"creating the demo accounts through {node.id}: {exc}") from None
    return lines


def _how_to_connect(nodes: Sequence[LocalNode], accounts: Path) -> list[str]:
    lines = [f"cluster of {len(nodes)} nodes serving {nodes[0].domain} is ready:"]
    lines += [f"  {node.id} (zone {node.zone}): c2s {', '.join(node.c2s)}" for node in nodes]
    lines.append("  (self-signed TLS certificates: tell the client to accept them)")
    if accounts.is_file():
        lines.append(f"  demo accounts and passwords: {accounts}")
    lines.append(f"  status: villaged cluster status -c {nodes[0].config}")
    lines.append("Ctrl-C stops the cluster.")
    return lines


async def _stop_all(children: _Children, out: Callable[[str], None]) -> None:
    """SIGTERM every live child, then SIGKILL what is still running after STOP_TIMEOUT_S."""
    running = {name: p for name, p in children.processes.items() if p.returncode is None}
    for process in running.values():
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    with trio.move_on_after(STOP_TIMEOUT_S):
        for process in running.values():
            await process.wait()
    for name, process in running.items():
        if process.returncode is None:
            out(f"node {name} did not stop within {STOP_TIMEOUT_S:g} s: killing it")
            process.kill()
            await process.wait()
    for log in children.logs:
        log.close()
    if running:
        out(f"stopped {', '.join(running)}")
