"""The tunnel's TLS layer: Twisted's TLSMemoryBIOProtocol with a data path cut for bulk streams.

Verification, ALPN, the handshake and shutdown are Twisted's and pyOpenSSL's, unchanged; only
how plaintext goes into and comes out of OpenSSL once the handshake is done differs
(measured in docs/performance.md):

- no small-write aggregation (BufferingTLSTransport): Tunnel.flush already hands over all
  an event produced in one call; the aggregator added a reactor turn (callLater(0)) to
  every tunnel write, and a copy;
- whole writes: one SSL_write takes a whole piece (OpenSSL cuts the 16 KiB records), where
  pyOpenSSL's partial writes made a Python call per record; and a write's frames are not
  joined into one string, only the bytes that share a record are (record_aligned);
- SSL_read, SSL_write and BIO_read are called through pyOpenSSL's own cffi binding on
  buffers we allocate and hand on as memoryviews: pyOpenSSL's recv and bio_read copy
  every byte once more into a new bytes object, and recv/send check the verification
  callbacks after every 16 KiB record (they only run during the handshake; any failure
  still goes through pyOpenSSL's own error translation);
- everything OpenSSL produced leaves in one write, and decrypted records reach the
  tunnel up to 1 MiB (a whole socket read) at a time, not one call per 16 KiB record;
- that write, like a stream's delivery to its socket, goes to the kernel at once when
  nothing is queued (send_now), not at the reactor's next turn.
"""

from __future__ import annotations

# pyOpenSSL's binding of libssl (cryptography's), and its allocator that skips zeroing.
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _uninitialised
from OpenSSL.SSL import Connection, Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Plaintext per TLS record (OpenSSL's default max_send_fragment).
RECORD_SIZE = 2**14
# Plaintext handed to the tunnel in one call: as much as one read of the tunnel's socket
# (TUNNEL_BUFFER_SIZE, 1 MiB) brings, so a bulk stream's 16 frames go to its socket in one
# send. A quarter of it cost one stream 10-12 % of its throughput (bench/, A/B). What one
# call makes the tunnel allocate in reply (PONGs for PINGs, say) is at most about as
# much as the read itself.
_DELIVER_SIZE = 1024 * 1024 + 64
# A read of the tunnel's socket this large carries a bulk stream: decrypting and delivering
# it takes a millisecond or more. It waits until the end of the reactor turn, so the other
# sockets ready in the same turn (a small stream's reply) are read and sent first.
BULK_TUNNEL_READ = 256 * 1024
# OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (ssl.h, part of its stable API).
_PARTIAL_WRITE = 0x00000001


# What the data path takes from pyOpenSSL's internals, beside Connection's _ssl, _from_ssl
# and _into_ssl (all there since long before pyopenssl 24, cryptography 42).
_LIBSSL_CALLS = ("SSL_read", "SSL_write", "SSL_pending", "SSL_clear_mode", "BIO_read", "BIO_get_mem_data")


def missing_internals(lib, connection_class) -> list[str]:
    """The pieces of pyOpenSSL this module needs that `lib` (its binding of libssl) and
    `connection_class` lack: a pyOpenSSL that renamed them fails here, at start-up, with
    their names, not with an AttributeError at the first tunnel."""
    missing = [name for name in _LIBSSL_CALLS if not hasattr(lib, name)]
    if not hasattr(connection_class, "_raise_ssl_error"):
        missing.append("Connection._raise_ssl_error")
    return missing


_MISSING = missing_internals(_lib, Connection)
if _MISSING:
    raise ImportError(
        "relay's TLS data path needs pyOpenSSL internals this pyOpenSSL lacks: "
        + ", ".join(_MISSING)
        + "; install a pyOpenSSL release that has them (26.x does)"
    )


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
    # Received payloads and ciphertext are memoryviews (of a TLS read, of a BIO read);
    # Twisted's buffer takes only bytes, so what waits there is copied, what the kernel
    # took was not.
    transport.writeSequence([c if type(c) is bytes else bytes(c) for c in chunks])


def record_aligned(chunks: list) -> list:
    """The chunks of one tunnel write as the pieces to hand SSL_write one by one, each
    (but the last) a whole number of records, so the records are as full as if the chunks
    had been joined into one string, but only the bytes that share a record with a
    neighbouring chunk are copied: a DATA header and the start of its payload, or the end
    of one payload and the next header. Of a 64 KiB frame 16 KiB is copied, not all of it.
    """
    pieces: list = []
    carry: list = []  # small chunks and tails, joined once a record's worth is here
    carried = 0
    for chunk in chunks:
        size = len(chunk)
        if not size:
            continue
        if size < RECORD_SIZE:
            carry.append(chunk)
            carried += size
            continue
        view = memoryview(chunk)
        head = -carried % RECORD_SIZE  # what fills the carried bytes up to a record boundary
        if carry:
            carry.append(view[:head])
            pieces.append(b"".join(carry))
        whole = (size - head) // RECORD_SIZE * RECORD_SIZE
        if whole:
            pieces.append(view[head : head + whole])
        tail = view[head + whole :]
        carry, carried = ([tail], len(tail)) if len(tail) else ([], 0)
    if carry:
        pieces.append(carry[0] if len(carry) == 1 else b"".join(carry))
    return pieces


def _ssl_error(connection, ssl, result: int, call: str) -> Error:
    """What pyOpenSSL raises for an SSL_read or SSL_write that returned `result` <= 0:
    WantReadError, ZeroReturnError, or an Error with OpenSSL's reasons (after any problem
    a verification callback left behind).

    Returned without its traceback. Every tunnel read ends in a WantReadError; kept, its
    traceback held this frame, whose `error` is the exception: a reference cycle that took
    every frame up to the reactor's loop with it, and their locals, the read and the
    buffer it was decrypted into (up to 1 MiB each). Only the garbage collector freed
    them, every few dozen reads: its young collections took about 2 % of the agent's CPU
    under a bulk stream, and the buffers stayed allocated until then (bench/, gc.callbacks).
    """
    try:
        connection._raise_ssl_error(ssl, result)
    except Error as error:
        return error.with_traceback(None)
    return Error(f"{call} returned {result}")  # not reached: a failed call always raises


class TunnelTLSProtocol(TLSMemoryBIOProtocol):
    _later: list | None = None  # bulk reads waiting for the end of the reactor turn

    def dataReceived(self, data) -> None:
        if self._later is not None:
            self._later.append(data)  # behind a read still waiting: in order
        elif len(data) >= BULK_TUNNEL_READ and self._handshakeDone and self.wrappedProtocol.bulk_waits():
            # epoll hands out the tunnel's socket, always ready under bulk load, before a
            # stream's socket that became ready after it: the small stream's bytes waited
            # for the whole read to be decrypted and delivered (bench/ echo beside bulk).
            self._later = [data]
            self.factory._clock.callLater(0, self._read_later)
        else:
            super().dataReceived(data)

    def _read_later(self) -> None:
        later, self._later = self._later, None
        for data in later or ():
            if self._lostTLSConnection:
                return
            super().dataReceived(data)

    def write(self, data) -> None:
        if self.disconnecting and self._producer is None:
            return  # as Twisted: no writes after loseConnection unless a producer is registered
        self._write_pieces([data])

    def writeSequence(self, chunks) -> None:
        if self.disconnecting and self._producer is None:
            return
        self._write_pieces(record_aligned(chunks))

    def _write(self, data) -> None:
        # Twisted's own path for writes buffered before the handshake finished.
        self._write_pieces([data])

    def _write_pieces(self, pieces: list) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        ssl = connection._ssl
        for index, piece in enumerate(pieces):
            with _ffi.from_buffer(piece) as data:
                done = 0
                while done < len(data):
                    result = _lib.SSL_write(ssl, data + done, len(data) - done)
                    if result > 0:
                        done += result
                        continue
                    error = _ssl_error(connection, ssl, result, "SSL_write")
                    if isinstance(error, WantReadError):
                        # Mid-handshake: Twisted retries these bytes first once it is done.
                        rest = [memoryview(piece)[done:], *pieces[index + 1 :]]
                        self._bufferedWrite(b"".join(rest))
                        self._flushSendBIO()
                    else:
                        self._tlsShutdownFinished(Failure(error))
                    return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        # All the ciphertext OpenSSL produced, in one BIO_read sized by the BIO itself, sent
        # as a view of our buffer (pyOpenSSL's bio_read copies it once more into bytes).
        bio = self._tlsConnection._from_ssl
        pending = _lib.BIO_get_mem_data(bio, _ffi.NULL)
        if pending <= 0:
            return
        buffer = _uninitialised("char[]", pending)
        size = _lib.BIO_read(bio, buffer, pending)
        if size > 0:
            send_now(self.transport, [memoryview(_ffi.buffer(buffer, size))])

    def _flushReceiveBIO(self) -> None:
        connection = self._tlsConnection
        ssl = connection._ssl
        while not self._lostTLSConnection:
            # Room for all the plaintext of the ciphertext received (plaintext is never
            # longer), up to one delivery; at least one whole record.
            room = _lib.BIO_get_mem_data(connection._into_ssl, _ffi.NULL) + _lib.SSL_pending(ssl)
            room = min(_DELIVER_SIZE, max(room, RECORD_SIZE + 256))
            buffer = _uninitialised("char[]", room)
            size = 0
            ending = None  # the buffer filled up: read on
            while size < room:  # SSL_read returns one record's plaintext at most
                result = _lib.SSL_read(ssl, buffer + size, room - size)
                if result <= 0:
                    ending = _ssl_error(connection, ssl, result, "SSL_read")
                    break
                size += result
            if size:
                # A fresh buffer, never written again: the frame decoder may keep views of it.
                self._deliver(memoryview(_ffi.buffer(buffer, size)).toreadonly())
            if isinstance(ending, WantReadError):
                break  # all that was received is read
            if isinstance(ending, ZeroReturnError):
                # What arrived before close_notify was delivered first, as Twisted does.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            elif ending is not None:
                self._tlsShutdownFinished(Failure(ending))
        self._flushSendBIO()

    def _deliver(self, data: memoryview) -> None:
        if not self._aborted:
            ProtocolWrapper.dataReceived(self, data)

    def connectionLost(self, reason) -> None:
        # What was read before the socket closed is handled first, as if it had not waited.
        self._read_later()
        super().connectionLost(reason)
        # Twisted lets go of the wrapped protocol here but not of the producer it
        # registered with us: the tunnel (through Twisted's _ProducerMembrane), whose
        # transport we are. Every tunnel that ended without unregistering (aborted, dead,
        # refused at connect, failed TLS: all but an orderly close()) stayed a reference
        # cycle with its session and TLS state, freed only by the garbage collector.
        self._producer = None


class TunnelTLSFactory(TLSMemoryBIOFactory):
    protocol = TunnelTLSProtocol

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        create = self._creatorCallable

        def whole_writes(protocol):
            connection = create(protocol)
            # pyOpenSSL turns partial writes on for every context, and a context cannot be
            # changed once used (Twisted's client options make theirs inside), so they go
            # off here, on each connection. A write that meets WANT_READ is retried with
            # the same bytes first (Twisted buffers them), which whole writes allow.
            _lib.SSL_clear_mode(connection._ssl, _PARTIAL_WRITE)
            return connection

        self._creatorCallable = whole_writes


@implementer(IStreamClientEndpoint)
class TunnelTLSClientEndpoint:
    """TLS over any client endpoint (TCP, a SOCKS or HTTP proxy), as wrapClientTLS does."""

    def __init__(self, creator, inner) -> None:
        self._creator = creator
        self._inner = inner

    def connect(self, factory):
        tls = TunnelTLSFactory(self._creator, True, factory)
        return self._inner.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)
