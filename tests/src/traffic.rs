//! Sequenced UDP traffic for end-to-end tests: a sender in one namespace, receivers in others
//! that check every payload byte and answer each packet, so the return path is exercised too.
//! Every loop is bounded in count and time.

use std::{
    collections::BTreeSet,
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use nsfail::lab::Netns;

const PAYLOAD_LEN: usize = 200;

/// Socket buffers of 8 MiB each way (root may exceed `rmem_max`), so that a test thread
/// descheduled for a while on a busy machine loses nothing to a full buffer: a test's
/// zero-loss check then fails only for loss in the path under test.
fn large_buffers(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    const SIZE: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket and a c_int option value that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SIZE as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "socket buffer: {}", std::io::Error::last_os_error());
    }
}

/// The payload of packet `seq`: the sequence number, then a pattern derived from it.
pub fn payload(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend((0..PAYLOAD_LEN - 4).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8));
    p
}

/// A UDP receiver on a thread inside a namespace. It records the sequence numbers of intact
/// packets, counts corrupt ones, and answers each packet with `ack` + its sequence number.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    seen: Arc<Mutex<(BTreeSet<u32>, u64)>>,
    /// When the last datagram arrived.
    last: Arc<Mutex<Option<Instant>>>,
    handle: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start(ns: &Netns, bind: SocketAddr) -> Self {
        Self::start_at(&nsfail::paths::netns(&ns.name), bind)
    }

    /// [`Receiver::start`] in the namespace `netns` is a handle of (a named one's
    /// `/run/netns/NAME`, or a process's `/proc/PID/ns/net`).
    pub fn start_at(netns: &std::path::Path, bind: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((BTreeSet::new(), 0u64)));
        let last = Arc::new(Mutex::new(None));
        let target = File::open(netns).expect("netns");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = {
            let stop = stop.clone();
            let paused = paused.clone();
            let seen = seen.clone();
            let last = last.clone();
            thread::spawn(move || {
                setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                let sock = UdpSocket::bind(bind).expect("bind receiver");
                large_buffers(&sock);
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                // Bounded: at most 10 minutes, normally stopped by the test.
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if paused.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    *last.lock().unwrap() = Some(Instant::now());
                    let mut s = seen.lock().unwrap();
                    if n == PAYLOAD_LEN {
                        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                        if buf[..n] == payload(seq)[..] {
                            s.0.insert(seq);
                            let mut ack = b"ack".to_vec();
                            ack.extend_from_slice(&seq.to_be_bytes());
                            let _ = sock.send_to(&ack, from);
                            continue;
                        }
                    }
                    s.1 += 1;
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("receiver ready");
        Self {
            stop,
            paused,
            seen,
            last,
            handle: Some(handle),
        }
    }

    /// Stops reading (and so answering) without closing the socket, as SIGSTOP would: a hung
    /// media receiver.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Closes the socket, as if the receiver process died.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    /// Sequence numbers received intact so far.
    pub fn seen(&self) -> BTreeSet<u32> {
        self.seen.lock().unwrap().0.clone()
    }

    /// Sequence numbers received intact, once nothing has arrived for 300 ms (waiting at
    /// most 5 s): what a stream that has ended delivered, however late this thread ran.
    pub fn settled(&self) -> BTreeSet<u32> {
        const QUIET: Duration = Duration::from_millis(300);
        crate::wait_for(Duration::from_secs(5), || {
            let last = *self.last.lock().unwrap();
            last.is_none_or(|t| t.elapsed() >= QUIET).then_some(())
        });
        self.seen()
    }

    /// Packets that arrived with a wrong length or payload.
    pub fn corrupt(&self) -> u64 {
        self.seen.lock().unwrap().1
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a burst of traffic brought back.
#[derive(Debug, Default)]
pub struct Replies {
    /// (from, seq) of every `ack` received.
    pub acks: Vec<(SocketAddr, u32)>,
    /// From the first packet sent to the last.
    pub sending: Duration,
}

impl Replies {
    pub fn from_only(&self, addr: SocketAddr) -> bool {
        self.acks.iter().all(|(from, _)| *from == addr)
    }

    pub fn seqs(&self) -> BTreeSet<u32> {
        self.acks.iter().map(|(_, s)| *s).collect()
    }
}

/// Sends packets `seqs` from `bind` to `dst` inside `ns`, one every `gap`, then collects the
/// answers until every packet is answered (and 100 ms more) or `linger` has passed.
pub fn send_burst(
    ns: &Netns,
    bind: SocketAddr,
    dst: SocketAddr,
    seqs: std::ops::Range<u32>,
    gap: Duration,
    linger: Duration,
) -> Replies {
    send_burst_in(&ns.name, bind, dst, seqs, gap, linger)
}

/// [`send_burst_in`] on a thread of its own, while the caller does something to the path.
pub fn spawn_burst(
    ns: &str,
    bind: SocketAddr,
    dst: SocketAddr,
    seqs: std::ops::Range<u32>,
    gap: Duration,
    linger: Duration,
) -> JoinHandle<Replies> {
    let ns = ns.to_owned();
    thread::spawn(move || send_burst_in(&ns, bind, dst, seqs, gap, linger))
}

/// [`send_burst`] by namespace name (for use from another thread).
pub fn send_burst_in(
    ns: &str,
    bind: SocketAddr,
    dst: SocketAddr,
    seqs: std::ops::Range<u32>,
    gap: Duration,
    linger: Duration,
) -> Replies {
    nsfail::net::netns::in_netns(ns, move || {
        let sock = UdpSocket::bind(bind).expect("bind sender");
        large_buffers(&sock);
        sock.set_nonblocking(true).unwrap();
        let sent = seqs.len();
        let mut replies = Replies::default();
        let mut buf = [0u8; 64];
        let mut drain = |sock: &UdpSocket, replies: &mut Replies| {
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                if n == 7 && &buf[..3] == b"ack" {
                    let seq = u32::from_be_bytes(buf[3..7].try_into().unwrap());
                    replies.acks.push((from, seq));
                }
            }
        };
        let start = Instant::now();
        for seq in seqs {
            sock.send_to(&payload(seq), dst).expect("send");
            drain(&sock, &mut replies);
            thread::sleep(gap);
        }
        replies.sending = start.elapsed();
        let end = Instant::now() + linger;
        while Instant::now() < end && replies.acks.len() < sent {
            drain(&sock, &mut replies);
            thread::sleep(Duration::from_millis(5));
        }
        // Everything answered: a little longer still, so that an extra or wrongly addressed
        // answer is caught too.
        let extra = Instant::now() + Duration::from_millis(100).min(linger);
        while Instant::now() < extra {
            drain(&sock, &mut replies);
            thread::sleep(Duration::from_millis(5));
        }
        replies
    })
    .expect("enter namespace")
}

/// Sends `msg` from a socket bound to `bind` (in the calling thread's namespace) to `to`, up
/// to `tries` times, each time waiting `wait` for an answer: the first that comes from `to`.
pub fn ask(
    bind: SocketAddr,
    to: SocketAddr,
    msg: &[u8],
    tries: u32,
    wait: Duration,
) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(bind).expect("bind");
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    (0..tries).find_map(|_| {
        sock.send_to(msg, to).expect("send");
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == to => Some(buf[..n].to_vec()),
            _ => None,
        }
    })
}

/// A UDP echo responder (what the encoders' `udp` health checks talk to) on a thread inside a
/// namespace. Stops when dropped, or when [`Echo::stop`] is called (an encoder "dying").
pub struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &Netns, bind: SocketAddr) -> Self {
        Self::start_at(&nsfail::paths::netns(&ns.name), bind)
    }

    /// [`Echo::start`] in the namespace `netns` is a handle of.
    pub fn start_at(netns: &std::path::Path, bind: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let target = File::open(netns).expect("netns");
        let sock = thread::spawn(move || {
            setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            UdpSocket::bind(bind)
        })
        .join()
        .expect("enter namespace")
        .expect("bind echo");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let handle = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                // Bounded: at most 10 minutes, normally stopped by the test.
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Compares received sequence numbers with the expected range, reporting what is missing or
/// extra rather than both whole sets.
pub fn check_seqs(seen: &BTreeSet<u32>, want: std::ops::Range<u32>) -> Result<(), String> {
    let want: BTreeSet<u32> = want.collect();
    let missing: Vec<_> = want.difference(seen).collect();
    let extra: Vec<_> = seen.difference(&want).collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} missing (first {:?}), {} unexpected (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)]
    ))
}
