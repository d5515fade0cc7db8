"""Link upkeep of a cell: accepting links, keeping the link to the parent up, reading each link
into the router, and the heartbeat that drops links gone silent.

One task per listener (accepting), one per link (reading), one for the parent link
(reconnecting with backoff), one heartbeat. The router owns the peers; this module only brings
them up, hands every frame to :meth:`Router.on_frame`, and tells the router when a link ends.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus

from flare_async.cell._links import (
    DISPLACED,
    Backoff,
    Displaced,
    HelloFactory,
    Peer,
    PeerVerifier,
    handshake_acceptor,
    handshake_connector,
)
from flare_async.cell._router import Router
from flare_async.errors import LinkBroken, LinkClosed, ProtocolError, TransportError
from flare_async.transport import Admission, Driver, DriverRegistry, Link, Listener
from flare_async.wire import Frame, Ping, Role, Session


class LinkKeeper:
    """Brings a cell's links up and keeps them (see the module text)."""

    def __init__(
        self,
        router: Router,
        drivers: DriverRegistry,
        hello: HelloFactory,
        *,
        listen: Sequence[str],
        parent: str | None,
        handshake_timeout: float,
        peers: Sequence[str] = (),
        admission: Admission,
        backoff: Backoff,
        verify_peer: PeerVerifier | None,
        heartbeat: float | None,
    ) -> None:
        self.router = router
        self.drivers = drivers
        self.hello = hello
        self.listen = list(listen)
        self.parent_url = parent
        self.peer_urls = list(peers)
        self.handshake_timeout = handshake_timeout
        self.admission = admission
        self.backoff = backoff
        self.verify_peer = verify_peer
        self.heartbeat = heartbeat
        self.listeners: list[Listener] = []
        self.listen_urls: list[str] = []

    async def start(self, tg: TaskGroup) -> None:
        """Listen, start the heartbeat, and connect to the parent (returns after the first
        attempt, whether it succeeded or not: the loop goes on retrying)."""
        name = self.router.name
        if self.heartbeat:
            tg.start_soon(self._heartbeat_loop, self.heartbeat, name=f"{name} heartbeat")
        limits = self.router.limits
        for url in self.listen:
            listener = await self.drivers.for_url(url).listen(url, limits=limits)
            listener.guard(self.admission)
            self.listeners.append(listener)
            self.listen_urls.append(listener.url)
            tg.start_soon(self._accept_loop, listener, name=f"{name} accept {url}")
        if self.parent_url is not None:
            await tg.start(self._parent_loop, self.parent_url, name=f"{name} parent")
        for url in self.peer_urls:
            await tg.start(self._peer_loop, url, name=f"{name} peer {url}")

    async def close(self) -> None:
        """Stop listening and say goodbye on every link, at once (1 s at most in all)."""
        with anyio.CancelScope(shield=True):
            for listener in self.listeners:
                await listener.aclose()
            async with anyio.create_task_group() as byes:
                for peer in self.router.peers():
                    byes.start_soon(self.router.say_bye, peer, "cell shutting down")

    # ------------------------------------------------------------------ children
    async def _accept_loop(self, listener: Listener) -> None:
        while True:
            try:
                link = await listener.accept()
            except LinkClosed:
                return
            self.router.spawn(
                self._accept_one, link, name=f"{self.router.name} link {link.peer_address}"
            )

    async def _accept_one(self, link: Link) -> None:
        router = self.router
        try:
            with anyio.fail_after(self.handshake_timeout):
                session = await handshake_acceptor(link, router.name, self.hello, self.verify_peer)
        except (ProtocolError, TransportError, TimeoutError) as exc:
            late = isinstance(exc, TimeoutError)
            reason = "no hello in time" if late else str(exc)
            self.admission.refused["no hello in time" if late else type(exc).__name__] += 1
            router.log.warning("link refused", peer=link.peer_address, reason=reason)
            with anyio.CancelScope(shield=True):
                await link.aclose()
            return
        peer = Peer(link, session, router.clock(), verified=self.verify_peer is not None)
        old = router.children.get(peer.name)
        if old is not None:
            # Last one wins: a reconnecting cell's old link is usually half-dead. If it is not
            # (two live cells claim one name), the displaced one is told so and stops retrying.
            router.log.warning("replacing link of reconnected cell", peer=peer.name)
            router.drop_peer(old, LinkClosed(f"{peer.name} reconnected on a new link"))
            await router.say_bye(old, f"{DISPLACED}: {peer.name} connected again on a new link")
        router.children[peer.name] = peer
        router.notify(peer, True)
        await self._serve(peer)

    # ------------------------------------------------------------------ dialled links
    async def _parent_loop(self, url: str, *, task_status: TaskStatus[None]) -> None:
        await self._link_loop(url, "child", task_status=task_status)

    async def _peer_loop(self, url: str, *, task_status: TaskStatus[None]) -> None:
        """Keep a direct link to a peer (a cell of another branch, e.g. another site: swarm
        and cyclic training pass models over it), served as a connected entry: messages for
        that cell, or below it, take it."""
        await self._link_loop(url, "peer", task_status=task_status)

    async def _link_loop(self, url: str, role: Role, *, task_status: TaskStatus[None]) -> None:
        """Keep a link we dial: to our parent (saying hello as its ``child``) or to a
        ``peer``. Dial, serve, and redial with backoff when it ends; returns to the caller
        after the first attempt, whether it succeeded or not."""
        router = self.router
        what = "parent" if role == "child" else "peer"
        attempt = 0
        started = False
        driver = self.drivers.for_url(url)
        while True:
            try:
                link, session = await self._dial(driver, url, role)
            except (ProtocolError, TransportError, TimeoutError) as exc:
                delay = self.backoff.delay(attempt, router.rng)
                attempt += 1
                router.log.warning(f"cannot reach {what}", url=url, error=str(exc), retry_in=delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                continue
            up_since = router.clock()
            peer = Peer(link, session, up_since, verified=self.verify_peer is not None)
            if role == "child":
                router.set_parent(peer)
            else:
                old = router.children.get(peer.name)
                if old is not None:  # it dialled us too: one link is enough, the newest serves
                    router.drop_peer(old, LinkClosed(f"{peer.name}: a newer link replaced it"))
                router.children[peer.name] = peer
                router.notify(peer, True)
            if not started:
                started = True
                task_status.started()
            ended = await self._serve(peer)
            if not router.running:
                return
            if isinstance(ended, Displaced):
                router.log.error(
                    f"displaced by another cell with our name; not redialling our {what}",
                    url=url,
                    reason=str(ended),
                )
                return
            if router.clock() - up_since >= self.backoff.maximum:
                attempt = 0  # it was a good link: try again at once
            else:
                # A link that drops right after its hello must not make us redial in a tight
                # loop: keep backing off until a link stays up.
                delay = self.backoff.delay(attempt, router.rng)
                attempt += 1
                await anyio.sleep(delay)

    async def _dial(self, driver: Driver, url: str, role: Role) -> tuple[Link, Session]:
        """Connect to ``url`` and say hello as ``role`` (``child``: to our parent; ``peer``);
        the link is closed again if the hello fails.

        Raises:
            ProtocolError, TransportError, TimeoutError: no link, or no acceptable hello.
        """
        link = await driver.connect(url, limits=self.router.limits)
        try:
            with anyio.fail_after(self.handshake_timeout):
                session = await handshake_connector(link, self.hello(role), self.verify_peer)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await link.aclose()
            raise
        return link, session

    # ------------------------------------------------------------------ reading
    async def _serve(self, peer: Peer) -> TransportError:
        """Read frames from one link until it ends; then forget the peer.

        Returns:
            why the link ended.
        """
        router = self.router
        log = router.log
        error: TransportError | None = None  # (not made up front: it lived as long as the link)
        clock = router.clock
        if peer.push is not None:
            peer.push.deliver_to(functools.partial(router.on_frame_now, peer))
        if peer.splicing is not None:
            peer.splicing.pass_through(functools.partial(router.may_pass, peer))
        try:
            with peer.serving:  # cancelled by give_up only, which says why in peer.dead
                while True:
                    frame = await peer.link.receive()
                    peer.last_rx = clock()
                    await router.on_frame(peer, frame)
        except LinkClosed as exc:
            # A link is closed on purpose only with a goodbye (either way); a connection that
            # just ends (a killed process, a crashed host) broke.
            if peer.orderly:
                error = exc
            else:
                error = LinkBroken(f"{peer.name} went away without a goodbye: {exc}")
                if peer.dead is None:
                    log.warning("link broke", peer=peer.name, error=str(error))
        except LinkBroken as exc:
            error = exc
            if peer.dead is None:
                log.warning("link broke", peer=peer.name, error=str(exc))
        except ProtocolError as exc:
            error = LinkBroken(f"protocol error from {peer.name}: {exc}")
            if peer.dead is None:
                log.warning("protocol error, closing link", peer=peer.name, error=str(exc))
        finally:
            if peer.dead is not None:
                # Given up (and aborted) by the heartbeat: what the link said since is moot.
                error = LinkBroken(peer.dead)
            if peer.push is not None:
                peer.push.deliver_to(None)
            if peer.splicing is not None:
                peer.splicing.pass_through(None)
            if error is None:
                error = LinkClosed(f"link to {peer.name} closed")
            router.drop_peer(peer, error)
            with anyio.CancelScope(shield=True):
                await peer.link.aclose()  # after an abort: only releases what is left
        return error

    # ------------------------------------------------------------------ liveness
    async def _heartbeat_loop(self, interval: float) -> None:
        """Ping links that have been quiet for ``interval``; drop those quiet past
        ``dead_after``. Liveness is the link's: handlers run in workers, so long local work
        never stops a cell from answering pings."""
        router = self.router
        seq = 0
        while True:
            await anyio.sleep(interval)
            now = router.clock()
            for peer in router.peers():
                quiet = now - peer.last_rx
                if quiet >= router.dead_after:
                    router.log.warning(
                        "peer unresponsive, dropping link", peer=peer.name, quiet=quiet
                    )
                    self.give_up(peer, f"no frame from {peer.name} for {quiet:.1f} s")
                elif quiet >= interval:
                    seq += 1
                    with contextlib.suppress(TransportError, ProtocolError):
                        ping = Frame(Ping(seq=seq))
                        if not peer.link.try_send(ping):
                            router.spawn(peer.send_within, ping, interval)

    def give_up(self, peer: Peer, why: str) -> None:
        """Drop a link that went silent, now, whatever the network does.

        The link is aborted, not closed: a goodbye, a drain, a TLS ``close_notify`` or a
        WebSocket closing handshake would each wait for the network that went silent (an
        accepted ``ws://`` link woke its reader only once its close frame was written, after
        the driver's ``close_timeout``). The peer is forgotten and every request waiting on the
        link fails with ``LinkBroken`` here, not when its reader notices; the reader is
        cancelled, so a parent link's loop starts reconnecting at once. Never blocks: the
        heartbeat goes on to the other links.
        """
        peer.dead = why
        peer.link.abort()
        self.router.drop_peer(peer, LinkBroken(why))
        peer.serving.cancel()


__all__ = ["LinkKeeper"]
