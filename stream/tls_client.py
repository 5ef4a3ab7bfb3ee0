"""A client-side TLS byte stream that can half-close (`send_eof`).

The `send` client learns every rejection by half-closing its connection after the last
frame and reading replies until the daemon closes (`stream.send`). anyio's `TLSStream`
cannot half-close: its `send_eof` raises `NotImplementedError`. TLS 1.3 can: a party that
has sent its `close_notify` may go on reading what the peer still sends. `TLSClientStream`
does that over `ssl.SSLObject` and `ssl.MemoryBIO`: `send_eof` sends the `close_notify`
(`SSLObject.unwrap`, without waiting for the peer's) and `receive` keeps decrypting until
the peer closes. The daemon's TLS stream sees the `close_notify` as the end of the
frames, writes its remaining replies, then closes.

Only TLS 1.3 makes the `close_notify` a half-close (RFC 8446, section 6.1: it "does not
have any effect on its read side"); before it, the peer had to answer with its own and
discard what it had yet to write, the replies included. So `connect` refuses an older
version.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute

__all__ = ["TLSClientStream"]

_READ_BYTES = 1 << 16


class TLSClientStream(ByteStream):
    """The client side of a TLS 1.3 connection over `transport`; make one with `connect`.

    One task may receive while another sends. `send_eof` sends the `close_notify` and
    `receive` still returns what the peer sends after it; the peer's end of the
    connection, with or without its own `close_notify`, is `anyio.EndOfStream` (the
    daemon closes without one). `aclose` closes the transport without a closing
    handshake.
    """

    def __init__(self, transport: ByteStream, context: ssl.SSLContext, hostname: str) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._plaintext = b""
        self._ended = False
        self._eof_sent = False
        self._send_lock = anyio.Lock()

    @classmethod
    async def connect(
        cls, transport: ByteStream, context: ssl.SSLContext, hostname: str
    ) -> TLSClientStream:
        """Run the TLS handshake on `transport` as the client of `hostname`.

        **Arguments:**

        - `transport`: a connected byte stream (`anyio.connect_tcp`); closed by the caller
            when this fails.
        - `context`: the client context (CA, client certificate); the daemon's certificate
            is verified against `hostname` when `context.check_hostname` is set.
        - `hostname`: the name (or address) the daemon was reached by.

        **Returns:**

        The stream, ready to send.

        **Raises:**

        `ssl.SSLError` when the handshake fails (an untrusted certificate, the peer not
        speaking TLS or closing) or negotiated a version older than TLS 1.3.
        """
        stream = cls(transport, context, hostname)
        while True:
            try:
                stream._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await stream._fill(reset_is_eof=True)
        await stream._flush()
        version = stream._ssl.version() or "an unknown version"
        if version != "TLSv1.3":
            raise ssl.SSLError(
                f"{version} negotiated; the client needs TLS 1.3 to half-close the connection "
                "and still read the daemon's replies"
            )
        return stream

    async def receive(self, max_bytes: int = _READ_BYTES) -> bytes:
        while not self._plaintext:
            if self._ended:
                raise anyio.EndOfStream
            self._decrypt()
            if not self._plaintext and not self._ended:
                await self._fill()
        data, self._plaintext = self._plaintext[:max_bytes], self._plaintext[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        if self._eof_sent:
            raise anyio.ClosedResourceError
        try:
            self._ssl.write(item)  # (memory BIOs: a write never waits; TLS 1.3 never reads)
        except ssl.SSLError as e:  # (after a fatal alert from the peer)
            raise anyio.BrokenResourceError(f"TLS: {e}") from e
        await self._flush()

    async def send_eof(self) -> None:
        """Send the `close_notify`; what the peer sends after it can still be received.

        **Raises:** `anyio.BrokenResourceError` when the connection is broken.
        """
        if self._eof_sent:
            return
        self._eof_sent = True
        # `unwrap` sends the close_notify, then reads the incoming records for the
        # peer's; an application-data record among them would fail it (OpenSSL:
        # "application data after close notify"). Decrypt every complete one first.
        self._decrypt()
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # the close_notify is out; the peer's, if any, comes after its replies
        except ssl.SSLError as e:
            raise anyio.BrokenResourceError(f"TLS: {e}") from e
        await self._flush()

    async def aclose(self) -> None:
        await self.transport.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            **self.transport.extra_attributes,
            TLSAttribute.ssl_object: lambda: self._ssl,
            TLSAttribute.tls_version: self._ssl.version,
            TLSAttribute.peer_certificate: lambda: self._ssl.getpeercert(False),
        }

    def _decrypt(self) -> None:
        """Move the plaintext of every complete record received into `_plaintext`; note
        the end of the stream (`_ended`) when the peer closed.

        **Raises:** `anyio.BrokenResourceError` for a TLS error (an alert from the peer),
        with the `ssl.SSLError` as its cause.
        """
        while not self._ended:
            try:
                data = self._ssl.read(_READ_BYTES)
            except ssl.SSLWantReadError:
                self._ended = self._incoming.eof  # (no more to come)
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._ended = True  # its close_notify, or a ragged end: both end it
                return
            except ssl.SSLError as e:
                raise anyio.BrokenResourceError(f"TLS: {e}") from e
            if not data:
                self._ended = True
                return
            self._plaintext += data

    async def _fill(self, *, reset_is_eof: bool = False) -> None:
        """Send what OpenSSL has to send, then feed it the next bytes from the transport
        (or the end of the stream).

        **Raises:** `anyio.BrokenResourceError` when the transport broke (unless
        `reset_is_eof`: the handshake then fails in OpenSSL's words).
        """
        await self._flush()
        try:
            self._incoming.write(await self.transport.receive())
        except anyio.EndOfStream:
            self._incoming.write_eof()
        except anyio.BrokenResourceError:
            if not reset_is_eof:
                raise
            self._incoming.write_eof()

    async def _flush(self) -> None:
        """Send the records waiting in the outgoing BIO, in the order they were made."""
        if not self._outgoing.pending:
            return
        async with self._send_lock:
            data = self._outgoing.read()  # (read under the lock: records stay in order)
            if data:
                await self.transport.send(data)
