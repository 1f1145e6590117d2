"""The tunnel's TLS layer: Twisted's TLSMemoryBIOProtocol with a data path cut for bulk streams.

Verification, ALPN and shutdown are Twisted's, unchanged; only how plaintext goes into and
comes out of OpenSSL differs (measured in docs/performance.md):

- no small-write aggregation (BufferingTLSTransport): Tunnel.flush already hands over all
  an event produced in one call; the aggregator added a reactor turn (callLater(0)) to
  every tunnel write, and a copy;
- one SSL_write per write, on a memoryview: OpenSSL cuts the 16 KiB records itself, where
  Twisted sliced (copied) 16 KiB pieces and called SSL_write and bio_read for each;
- everything OpenSSL produced leaves in one write, and decrypted records reach the
  tunnel up to 64 KiB at a time (one whole DATA frame), not one call per 16 KiB record;
- that write, like a stream's delivery to its socket, goes to the kernel at once when
  nothing is queued (send_now), not at the reactor's next turn.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# The least ciphertext one bio_read asks for (more after a large write).
_BIO_READ_SIZE = 64 * 1024
# SSL_read returns at most one record's plaintext (16 KiB) per call.
_RECORD_READ_SIZE = 2**14 + 256
# Plaintext handed to the tunnel in one call: four whole 64 KiB DATA frames (one send to the
# stream's socket), but not a whole 1 MiB socket read, so what one call makes the tunnel
# allocate (PINGs' PONGs, say) stays small.
_DELIVER_SIZE = 256 * 1024 + 64


def send_now(transport, chunks: list[bytes]) -> None:
    """transport.writeSequence(chunks), but handed to the kernel at once when the transport
    has nothing queued: Twisted would wait for the next reactor turn (an epoll round and
    two epoll_ctl calls) before sending, on every hop of every small message.

    Only a plain TCP transport with an empty buffer is written to directly, so the order
    of bytes is kept; whatever the kernel does not take, and any error, goes to Twisted's
    own buffer, whose next write attempt then reports the error as it always does.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport._tempDataBuffer
        or transport.offset != len(transport.dataBuffer)
    ):
        _queue(transport, chunks)
        return
    try:
        sent = sock.sendmsg(chunks) if len(chunks) > 1 else sock.send(chunks[0])
    except OSError:  # EAGAIN, or an error Twisted will meet and handle on its own write
        sent = 0
    for index, chunk in enumerate(chunks):
        if sent < len(chunk):
            rest = chunks[index:]
            if sent:
                rest[0] = chunk[sent:]
            _queue(transport, rest)
            return
        sent -= len(chunk)


def _queue(transport, chunks: list) -> None:
    # Received payloads are memoryviews of the TLS read (frames.FrameDecoder); Twisted's
    # buffer takes only bytes, so what waits there is copied, what the kernel took was not.
    transport.writeSequence([c if type(c) is bytes else bytes(c) for c in chunks])


class TunnelTLSProtocol(TLSMemoryBIOProtocol):
    def _write(self, data) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += self._tlsConnection.send(view[done:])
            except WantReadError:
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO(done)

    def _flushSendBIO(self, written: int = 0) -> None:
        # Sized to hold all the records of what was just written, so one bio_read drains the
        # BIO; a read that comes back short proves it empty without a second call (whose
        # WantReadError would cost an exception per write).
        size = max(_BIO_READ_SIZE, written + written // 512 + 1024)
        chunks = []
        while True:
            try:
                chunk = self._tlsConnection.bio_read(size)
            except WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < size:
                break
        if chunks:
            send_now(self.transport, chunks)

    def _flushReceiveBIO(self) -> None:
        chunks: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                chunk = self._tlsConnection.recv(_RECORD_READ_SIZE)
            except WantReadError:
                break
            except ZeroReturnError:
                # What arrived before close_notify is delivered first, as Twisted does.
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(failure)
            else:
                chunks.append(chunk)
                size += len(chunk)
                if size >= _DELIVER_SIZE:
                    self._deliver(chunks)
                    chunks = []
                    size = 0
        self._deliver(chunks)
        self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))


class TunnelTLSFactory(TLSMemoryBIOFactory):
    protocol = TunnelTLSProtocol


@implementer(IStreamClientEndpoint)
class TunnelTLSClientEndpoint:
    """TLS over any client endpoint (TCP, a SOCKS or HTTP proxy), as wrapClientTLS does."""

    def __init__(self, creator, inner) -> None:
        self._creator = creator
        self._inner = inner

    def connect(self, factory):
        tls = TunnelTLSFactory(self._creator, True, factory)
        return self._inner.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)
