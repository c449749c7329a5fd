//! UDP echo: send `nsfail-probe <seq>` to the encoder and wait for the same bytes back.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::Mutex, time::Instant};

use super::{Probe, ProbeError, ProbeFuture};

const PREFIX: &[u8] = b"nsfail-probe ";

/// Echo probe of one `(address, port)`.
///
/// Its socket is bound to the wildcard address in the daemon's own namespace, connected to the
/// target and reaches the encoder by ordinary routing (for a local encoder, through the host
/// side of its veth). It is created on first use and kept: attempts are numbered, and a late
/// echo of an earlier attempt is skipped rather than taken for the current one.
///
/// Being connected, the socket hears ICMP port unreachable: an encoder whose process died
/// while its host (or namespace) lives fails the attempt at once, not after the timeout.
pub struct UdpProbe {
    target: SocketAddr,
    /// Held for a whole attempt: two attempts on one socket would read each other's echoes.
    state: Mutex<State>,
}

struct State {
    socket: Option<UdpSocket>,
    seq: u64,
}

impl UdpProbe {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            state: Mutex::new(State {
                socket: None,
                seq: 0,
            }),
        }
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let mut state = self.state.lock().await;
        let State { socket, seq } = &mut *state;
        let sock = match socket {
            Some(sock) => sock,
            None => socket.insert(bind(self.target).await?),
        };
        *seq += 1;
        let result = exchange(sock, *seq, self.target).await;
        if let Err(ProbeError::Io { .. }) = result {
            // A route or local address may have changed under the connected socket: the next
            // attempt binds and connects afresh.
            *socket = None;
        }
        result
    }
}

/// Sends probe `seq` on `socket`, connected to `target`, and waits for its echo.
async fn exchange(
    socket: &UdpSocket,
    seq: u64,
    target: SocketAddr,
) -> Result<Duration, ProbeError> {
    // A port unreachable for an attempt cut off by its timeout may have come since: that
    // attempt is counted already, and this one is still to be sent.
    let _ = socket.take_error();
    let payload = format!("nsfail-probe {seq}");
    let start = Instant::now();
    socket
        .send(payload.as_bytes())
        .await
        .map_err(|source| io_error("send", source))?;
    // Larger than any probe, so a longer answer is seen as longer, not cut to size.
    let mut buf = [0u8; 128];
    loop {
        let len = socket
            .recv(&mut buf)
            .await
            .map_err(|source| io_error("receive", source))?;
        let echo = &buf[..len];
        if echo == payload.as_bytes() {
            return Ok(start.elapsed());
        }
        if !is_earlier(echo, seq) {
            return Err(ProbeError::WrongEcho { from: target, len });
        }
    }
}

impl Probe for UdpProbe {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(self.attempt())
    }

    fn kind(&self) -> &'static str {
        "udp"
    }
}

/// A socket connected to `target` (the `udp` and `srt` probes' own).
pub(super) async fn bind(target: SocketAddr) -> Result<UdpSocket, ProbeError> {
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(any)
        .await
        .map_err(|source| ProbeError::Io { op: "bind", source })?;
    // Only the target's datagrams are delivered, and its port-unreachables are reported.
    socket
        .connect(target)
        .await
        .map_err(|source| ProbeError::Io {
            op: "connect",
            source,
        })?;
    Ok(socket)
}

/// ECONNREFUSED (a port unreachable for this attempt's datagram) is [`ProbeError::Refused`].
pub(super) fn io_error(op: &'static str, source: std::io::Error) -> ProbeError {
    if source.kind() == std::io::ErrorKind::ConnectionRefused {
        ProbeError::Refused
    } else {
        ProbeError::Io { op, source }
    }
}

/// Whether `echo` is the echo of an attempt before `seq` (one that timed out).
fn is_earlier(echo: &[u8], seq: u64) -> bool {
    echo.strip_prefix(PREFIX)
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n < seq)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{UdpProbe, is_earlier};
    use crate::health::probe_once;

    /// An echo responder on `sock` for one datagram, on a thread.
    fn echo_once(sock: std::net::UdpSocket) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            sock.send_to(&buf[..n], from).unwrap();
        })
    }

    #[tokio::test]
    async fn a_refusal_left_over_from_an_earlier_datagram_is_not_this_attempts() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = echo.local_addr().unwrap();
        let probe = UdpProbe::new(at);
        let long = Duration::from_secs(5);
        let responder = echo_once(echo);
        probe_once(&probe, long).await.expect("echo answered");
        responder.join().unwrap();
        // What an attempt cut off by its timeout leaves behind once the port has closed: its
        // datagram's port unreachable pending on the socket.
        {
            let mut state = probe.state.lock().await;
            let sock = state.socket.as_ref().expect("socket kept");
            sock.send(b"nsfail-probe 2").await.unwrap();
            state.seq = 2;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The encoder is back before the next attempt: that attempt succeeds.
        let responder = echo_once(std::net::UdpSocket::bind(at).unwrap());
        probe_once(&probe, long)
            .await
            .expect("the next attempt is sent and answered");
        responder.join().unwrap();
    }

    #[test]
    fn only_echoes_of_earlier_attempts_are_stale() {
        assert!(is_earlier(b"nsfail-probe 1", 2));
        assert!(is_earlier(b"nsfail-probe 41", 42));
        assert!(!is_earlier(b"nsfail-probe 42", 42));
        assert!(!is_earlier(b"nsfail-probe 43", 42));
        assert!(!is_earlier(b"nsfail-probe -1", 42));
        assert!(!is_earlier(b"nsfail-probe 1 ", 42));
        assert!(!is_earlier(b"hello", 42));
        assert!(!is_earlier(b"", 42));
    }
}
