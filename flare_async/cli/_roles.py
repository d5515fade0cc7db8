"""The deployed roles, built in one place: a kit's cell and its part in FL jobs.

``flare-async run KIT [--jobs DIR]`` and the repo's ``cells/server.py``, ``cells/relay.py`` and
``cells/edge.py`` build a role with :class:`RoleCell`; nothing else composes one. Each role is
made of public names only (``flare_async.fl``, ``flare_async.security``):

* server: the job service, :class:`~flare_async.fl.JobManager`, with the admins' rights
  (:class:`~flare_async.fl.AdminRights`, ``admins.toml`` beside the kit's certificate), the
  kit's signer and end-to-end decryptor, and the admin sessions the cell admitted;
* relay: a :class:`~flare_async.fl.RelayAggregator` folding its subtree's signed results;
* edge (a site): :class:`~flare_async.fl.SiteJobs` running the jobs' training processes under
  the site's privacy policy (:func:`~flare_async.fl.load_policy`, ``policy.toml`` beside the
  kit's certificate), which also decides what the cell accepts.

Each keeps its audit log in ``DIR/audit.jsonl``. Results are signed end to end with the sites'
(and relays') keys and checked against the project CA by whoever folds them.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

import anyio

from flare_async.cell import HandlerTable
from flare_async.cli._kit import cell_from_kit
from flare_async.errors import ConfigError
from flare_async.fl import (
    AdminRights,
    JobManager,
    RelayAggregator,
    SiteJobs,
    SitePolicy,
    load_policy,
)
from flare_async.security import (
    AuditLog,
    Decryptor,
    Identity,
    Kit,
    Role,
    SignatureVerifier,
    Signer,
)


class RoleCell:
    """The cell a startup kit describes (:func:`~flare_async.cli.cell_from_kit`), and with
    ``jobs`` (a folder) its part in FL jobs as its role has it: the server's job service (its
    jobs kept in ``jobs``), a relay's aggregator, a site's job runner (its jobs' logs in
    ``jobs``). ``async with RoleCell(kit, jobs=...) as role:`` starts the cell and the role's
    work; leaving stops both. ``role.cell`` is the cell.

    Args:
        handlers: more handler tables to mount (``sys`` is always mounted).
        on_event: called with each job event (``on_event("job-started", job=...)``);
            ``flare-async run`` writes them as JSON lines.
        handshake_timeout, heartbeat: see :class:`~flare_async.Cell`.
        role: the role the kit must have (``cells/``' ``from_kit`` of each role).

    Raises:
        IdentityError: an admin kit (admins are not cells).
        ConfigError: a kit of another role than ``role``.
        ConfigError: the role's files (``admins.toml``, ``policy.toml``, the CA) do not load.
    """

    def __init__(
        self,
        kit: Kit,
        *,
        jobs: str | os.PathLike[str] | None = None,
        handlers: Iterable[HandlerTable] = (),
        on_event: Callable[..., None] | None = None,
        handshake_timeout: float = 10.0,
        heartbeat: float | None = 15.0,
        role: Role | None = None,
    ) -> None:
        if role is not None and kit.role is not role:
            raise ConfigError(f"{kit.name!r} is a {kit.role.value}'s kit, not a {role.value}'s")
        self.kit = kit
        self.folder = Path(jobs) if jobs is not None else None
        self.on_event = on_event
        self.manager: JobManager | None = None
        self.relay: RelayAggregator | None = None
        self.site: SiteJobs | None = None
        # The server admits admin sessions and keeps who is behind each (jobs or not).
        self.admins: dict[str, Identity] | None = {} if kit.role is Role.SERVER else None
        self.audit: AuditLog | None = None
        self.policy: SitePolicy | None = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.audit = AuditLog(self.folder / "audit.jsonl")
            if kit.role is Role.CLIENT:
                self.policy = load_policy(beside_cert(kit, "policy.toml"))
        self.cell = cell_from_kit(
            kit,
            handlers=handlers,
            heartbeat=heartbeat,
            handshake_timeout=handshake_timeout,
            admins=self.admins,
            on_link=self._link_changed if self.folder is not None else None,
            accept=self._accept if self.policy is not None else None,
            on_refused=self._refused if self.audit is not None else None,
        )
        if self.folder is not None:
            self._mount(self.folder)
        self._stack: AsyncExitStack | None = None

    def _mount(self, folder: Path) -> None:
        """The role's job services on the cell."""
        if self.kit.role is Role.SERVER:
            self.manager = self._server_jobs(folder)
            self.cell.mount(self.manager.handlers())
        elif self.kit.role is Role.RELAY:
            self.relay = self._relay_aggregator()
            self.cell.mount(self.relay.handlers())
        else:
            self.site = self._site_jobs(folder)
            self.cell.mount(self.site.handlers())

    def _server_jobs(self, folder: Path) -> JobManager:
        """The server's job service: jobs kept in ``folder``, commands taken from the admin
        sessions the cell admitted, under the rights of ``admins.toml``; results checked
        against the project CA, sealed results opened with the kit's key."""
        kit, sessions = self.kit, self.admins if self.admins is not None else {}

        def admin_of(src: str) -> str | None:
            identity = sessions.get(src)
            return identity.name if identity is not None else None

        def org_of(admin: str) -> str:
            return next((i.org for i in sessions.values() if i.name == admin), "")

        return JobManager(
            self.cell,
            folder,
            admin_of=admin_of,
            on_event=self.on_event,
            audit=self.audit,
            verifier=SignatureVerifier.from_kit(kit),
            rights=AdminRights.load(beside_cert(kit, "admins.toml")),
            org_of=org_of,
            certificate=ssl.PEM_cert_to_DER_cert(Path(kit.cert).read_text()),
            decryptor=Decryptor(kit),
            signer=Signer(kit),
        )

    def _relay_aggregator(self) -> RelayAggregator:
        """A relay folds its subtree's results, checked against the project CA, and signs its
        partial sums with its own key."""
        return RelayAggregator(
            self.cell, verifier=SignatureVerifier.from_kit(self.kit), signer=Signer(self.kit)
        )

    def _site_jobs(self, folder: Path) -> SiteJobs:
        """A site runs the server's jobs (their logs in ``folder``) under its policy and signs
        its results with its own key."""
        return SiteJobs(
            self.cell,
            folder,
            server=self.kit.name.split(".", 1)[0],
            on_event=self.on_event,
            audit=self.audit,
            signer=Signer(self.kit),
            policy=self.policy,
            verifier=SignatureVerifier.from_kit(self.kit),
        )

    def _accept(self, src: str, channel: str, topic: str) -> bool:
        """The site's ``[accept]`` rules; a refusal is audited."""
        assert self.policy is not None
        if self.policy.accepts(src, channel, topic):
            return True
        if self.audit is not None:
            self.audit.append(
                "refused",
                now=time.time(),
                src=src,
                command=f"{channel}/{topic}",
                why="not accepted by the site's policy",
            )
        return False

    def _refused(self, identity: str, cell: str, topic: str, reason: str) -> None:
        """A message whose signature failed, refused by the cell: audited."""
        if self.audit is not None:
            self.audit.append(
                "refused", now=time.time(), src=cell, by=identity, command=topic, why=reason
            )

    def _link_changed(self, peer: str, role: str, up: bool) -> None:
        if up and role == "parent" and self.site is not None:
            self.site.parent_up()

    async def _run(self) -> None:
        if self.manager is not None:
            await self.manager.run()
        elif self.site is not None:
            await self.site.run()

    async def __aenter__(self) -> RoleCell:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.cell)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # leaving stops the role's work first
            tg.start_soon(self._run)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._stack is None:
            raise RuntimeError("RoleCell exited without being entered")
        stack, self._stack = self._stack, None
        return await stack.__aexit__(exc_type, exc, tb)


def beside_cert(kit: Kit, name: str) -> Path:
    """A role's file kept in the kit's folder (where its certificate is)."""
    return Path(kit.cert).parent / name


__all__ = ["RoleCell"]
