"""serve/hangups.py on real sockets: a client that closes or resets its connection is told at once, one that
is still there (or sends its next request early) is not, and a watch that ended is never called."""

import socket
import struct
import threading

from serve.hangups import HangUps

NEVER = 1.0  # how long a test waits for a call that must not come


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """The server's side of a TCP connection, and the client's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        return listener.accept()[0], client


def watched(hang_ups: HangUps, server_side: socket.socket):
    called = threading.Event()
    return called, hang_ups.watch(server_side, called.set)


def test_a_client_that_closes_or_resets_is_noticed_at_once_and_one_that_stays_is_not():
    hang_ups = HangUps()
    closing, resetting, staying = tcp_pair(), tcp_pair(), tcp_pair()
    with closing[0], closing[1], resetting[0], resetting[1], staying[0], staying[1]:
        closed, closed_watch = watched(hang_ups, closing[0])
        reset, reset_watch = watched(hang_ups, resetting[0])
        stayed, stayed_watch = watched(hang_ups, staying[0])
        with closed_watch, reset_watch, stayed_watch:
            staying[1].sendall(b"GET /ping HTTP/1.1\r\n\r\n")  # its next request, early: still there
            closing[1].close()
            resetting[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            resetting[1].close()
            assert closed.wait(30) and reset.wait(30)
            assert not stayed.wait(NEVER)


def test_a_watch_that_ended_is_never_called_and_the_socket_can_be_watched_again():
    hang_ups = HangUps()
    server_side, client_side = tcp_pair()
    with server_side:
        first, first_watch = watched(hang_ups, server_side)
        with first_watch:
            pass
        second, second_watch = watched(hang_ups, server_side)
        with second_watch:
            client_side.close()
            assert second.wait(30)
        assert not first.wait(NEVER)


def test_no_socket_is_nothing_to_watch():
    with HangUps().watch(None, lambda: None):
        pass


def test_an_event_read_before_its_watch_ended_does_not_reach_the_connection_that_took_its_number():
    """The watching thread may hold a hang-up event for a number that a new connection now has: the new
    connection, still there, is not told it is gone."""
    hang_ups = HangUps()
    server_side, client_side = tcp_pair()
    with server_side, client_side:
        called, watch = watched(hang_ups, server_side)
        with watch:
            hang_ups._dispatch(server_side.fileno())  # as if an event of the number's last owner came late
            assert not called.wait(NEVER)
            client_side.close()
            assert called.wait(30)
