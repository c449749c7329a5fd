//! SRT induction: ask the encoder's SRT listener for the first step of an HSv5 handshake and
//! wait for its induction answer. The listener answers from a SYN cookie without creating a
//! session, and the probe never sends the conclusion, so the listener never logs a connection.
//!
//! While the listener has a live session it has closed its listening socket and stays silent;
//! the controller's judge then takes the session (the encoder's replies) as the probe and sets
//! these results aside.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::Mutex, time::Instant};

use super::{
    Probe, ProbeError, ProbeFuture,
    udp::{bind, io_error},
};

/// Handshake packet: 16-byte header and the 48-byte handshake body.
const HANDSHAKE_LEN: usize = 64;
/// Control packet, type 0 (handshake).
const CONTROL_HANDSHAKE: [u8; 4] = [0x80, 0x00, 0x00, 0x00];
/// HSv5 induction request: version 4, extension field 2 (the HSv5 caller's magic).
const INDUCTION_VERSION: u32 = 4;
const INDUCTION_EXT: u16 = 2;
/// The listener's HSv5 induction answer: version 5, extension field 0x4A17.
const ANSWER_VERSION: u32 = 5;
const ANSWER_EXT: u16 = 0x4A17;
/// Handshake type 1: induction.
const HS_INDUCTION: u32 = 1;

/// Induction probe of one SRT listener.
///
/// Its socket is connected to the listener, so a listener whose process died while its
/// namespace lives fails the attempt at once (ICMP port unreachable), as the `udp` probe does.
pub struct SrtProbe {
    target: SocketAddr,
    state: Mutex<State>,
    /// Datagrams that were not an induction answer to this probe, ever.
    strays: AtomicU64,
}

struct State {
    socket: Option<UdpSocket>,
    /// The SRT socket ID this probe claims; a fresh one per attempt, so a late answer to an
    /// earlier attempt is told apart.
    socket_id: u32,
}

impl SrtProbe {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            state: Mutex::new(State {
                socket: None,
                socket_id: std::process::id().wrapping_mul(0x9E37_79B9),
            }),
            strays: AtomicU64::new(0),
        }
    }

    /// Datagrams received that were not an induction answer.
    pub fn strays(&self) -> u64 {
        self.strays.load(Ordering::Relaxed)
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let mut state = self.state.lock().await;
        let State { socket, socket_id } = &mut *state;
        let sock = match socket {
            Some(sock) => sock,
            None => socket.insert(bind(self.target).await?),
        };
        // SRT socket IDs are 31-bit; 0 means "none".
        *socket_id = (socket_id.wrapping_add(1) & 0x7fff_ffff).max(1);
        let result = self.exchange(sock, *socket_id).await;
        if let Err(ProbeError::Io { .. }) = result {
            *socket = None;
        }
        result
    }

    async fn exchange(&self, socket: &UdpSocket, id: u32) -> Result<Duration, ProbeError> {
        // A refusal of an earlier attempt's datagram is that attempt's, counted already.
        let _ = socket.take_error();
        let start = Instant::now();
        socket
            .send(&induction_request(id))
            .await
            .map_err(|source| io_error("send", source))?;
        let mut buf = [0u8; 1500];
        loop {
            let len = socket
                .recv(&mut buf)
                .await
                .map_err(|source| io_error("receive", source))?;
            match answer_to(&buf[..len]) {
                Some(to) if to == id => return Ok(start.elapsed()),
                // A late answer to an earlier attempt (it timed out): skipped.
                Some(to) if to < id && id - to < 1024 => continue,
                _ => {
                    let count = self.strays.fetch_add(1, Ordering::Relaxed) + 1;
                    return Err(ProbeError::NotInduction { len, count });
                }
            }
        }
    }
}

impl Probe for SrtProbe {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(self.attempt())
    }

    fn kind(&self) -> &'static str {
        "srt"
    }
}

/// An HSv5 induction request from SRT socket `id`.
pub fn induction_request(id: u32) -> [u8; HANDSHAKE_LEN] {
    let mut p = [0u8; HANDSHAKE_LEN];
    p[..4].copy_from_slice(&CONTROL_HANDSHAKE);
    // Type-specific information, timestamp and destination socket ID (0: the listener) stay 0.
    let body = &mut p[16..];
    body[0..4].copy_from_slice(&INDUCTION_VERSION.to_be_bytes());
    // Encryption field 0, extension field 2.
    body[6..8].copy_from_slice(&INDUCTION_EXT.to_be_bytes());
    // Initial packet sequence number: any 31-bit value.
    body[8..12].copy_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    body[12..16].copy_from_slice(&1500u32.to_be_bytes());
    body[16..20].copy_from_slice(&8192u32.to_be_bytes());
    body[20..24].copy_from_slice(&HS_INDUCTION.to_be_bytes());
    body[24..28].copy_from_slice(&id.to_be_bytes());
    // SYN cookie 0 and the peer IP address (zeros: the listener fills in what it sees).
    p
}

/// The destination socket ID of `datagram` if it is an HSv5 induction answer.
pub fn answer_to(datagram: &[u8]) -> Option<u32> {
    if datagram.len() < HANDSHAKE_LEN || datagram[..4] != CONTROL_HANDSHAKE {
        return None;
    }
    let word = |off: usize| u32::from_be_bytes(datagram[off..off + 4].try_into().unwrap());
    let body = 16;
    let ext = u16::from_be_bytes([datagram[body + 6], datagram[body + 7]]);
    (word(body) == ANSWER_VERSION && ext == ANSWER_EXT && word(body + 20) == HS_INDUCTION)
        .then(|| word(12))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{SrtProbe, answer_to, induction_request};
    use crate::health::{ProbeError, probe_once};

    /// What a libsrt listener answers: the request turned into version 5, extension 0x4A17,
    /// a cookie, addressed to the caller's socket ID.
    fn answer(request: &[u8]) -> Vec<u8> {
        let mut a = request.to_vec();
        let id: [u8; 4] = request[16 + 24..16 + 28].try_into().unwrap();
        a[12..16].copy_from_slice(&id);
        a[16..20].copy_from_slice(&5u32.to_be_bytes());
        a[22..24].copy_from_slice(&0x4A17u16.to_be_bytes());
        a[16 + 28..16 + 32].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        a
    }

    #[test]
    fn a_request_is_no_answer_and_an_answer_names_the_caller() {
        let req = induction_request(77);
        assert_eq!(answer_to(&req), None);
        assert_eq!(answer_to(&answer(&req)), Some(77));
        assert_eq!(answer_to(&answer(&req)[..63]), None);
        assert_eq!(answer_to(b""), None);
        assert_eq!(answer_to(&[0xff; 64]), None);
    }

    #[tokio::test]
    async fn answers_pass_and_strays_fail_and_are_counted() {
        let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let probe = SrtProbe::new(at);
        let serve = |reply: fn(&[u8]) -> Vec<u8>| {
            let sock = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 128];
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                sock.send_to(&reply(&buf[..n]), from).unwrap();
            })
        };
        let long = Duration::from_secs(5);
        let t = serve(answer);
        probe_once(&probe, long).await.expect("induction answered");
        t.join().unwrap();
        let t = serve(|_| b"garbage".to_vec());
        let err = probe_once(&probe, long).await.unwrap_err();
        assert!(
            matches!(err, ProbeError::NotInduction { len: 7, count: 1 }),
            "{err}"
        );
        t.join().unwrap();
        assert_eq!(probe.strays(), 1);
        // The prober is fine afterwards.
        let t = serve(answer);
        probe_once(&probe, long).await.expect("answered again");
        t.join().unwrap();
        // Nothing listening: refused at once, not timed out.
        drop(listener);
        let err = probe_once(&probe, long).await.unwrap_err();
        assert!(matches!(err, ProbeError::Refused), "{err}");
    }
}
