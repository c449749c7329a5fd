//! Real SRT sessions for tests and benchmarks: `srt-live-transmit` listeners writing what they
//! receive to a file, a caller, and a feeder of MPEG-TS-sized datagrams into the caller.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
        sockopt,
    },
    time::TimeVal,
};
use nsfail::lab::Netns;

use crate::{ChildGuard, spawn_in};

/// The UDP port inside the caller's namespace that the feeder sends to.
pub const FEED: &str = "127.0.0.1:9000";
/// One datagram: seven 188-byte TS packets.
pub const DATAGRAM: usize = 1316;

/// How soon after a repoint an SRT caller's stream must be back at the new encoder. A caller
/// that is not told to reconnect waits out libsrt's 5 s peer-idle timeout, counted from the old
/// encoder's last answer before the repoint (or forever, while that encoder still answers), so
/// it cannot meet this bound (`udp_channel_carrying_srt_recovers_only_by_the_callers_timeout`
/// shows it does not): the bound separates a SHUTDOWN that worked from none.
pub const TOLD_BOUND: Duration = Duration::from_secs(3);

/// The `&passphrase=...` of an SRT URI (empty for none).
fn secret(passphrase: Option<&str>) -> String {
    passphrase.map_or(String::new(), |p| format!("&passphrase={p}"))
}

/// A listener on `port` inside `ns`, appending what it receives to `out`.
pub fn listener(ns: &Netns, port: u16, out: &Path, passphrase: Option<&str>) -> ChildGuard {
    let shell = format!(
        "exec srt-live-transmit -q 'srt://:{port}?mode=listener{}' file://con > {}",
        secret(passphrase),
        out.display()
    );
    spawn_in(ns, "sh", &["-c", &shell])
}

/// A caller inside `ns` that reconnects by itself (`-a yes`), from [`FEED`] to `target`.
pub fn caller(ns: &Netns, target: &str, passphrase: Option<&str>) -> ChildGuard {
    let uri = format!("srt://{target}?mode=caller{}", secret(passphrase));
    spawn_in(
        ns,
        "srt-live-transmit",
        &["-q", "-a", "yes", &format!("udp://{FEED}"), &uri],
    )
}

/// The size of a listener's output so far.
pub fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The output file of listener `i` in `dir`.
pub fn output(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("enc{i}.ts"))
}

/// Datagrams into the caller every 5 ms from a thread inside `ns`, until dropped; bounded to
/// 12,000 datagrams (60 s).
pub struct Feeder {
    on: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Feeder {
    /// Panics, naming the cause, when it cannot enter `ns` or bind its socket there: a feeder
    /// that sends nothing would only surface later as a stream that never started.
    pub fn start(ns: &str) -> Self {
        let sock = nsfail::net::netns::in_netns(ns, || std::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("feeder: entering namespace {ns}: {e}"))
            .unwrap_or_else(|e| panic!("feeder: binding 127.0.0.1:0 in namespace {ns}: {e}"));
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let handle = thread::spawn(move || {
            for i in 0..12_000u32 {
                if !flag.load(Ordering::Relaxed) {
                    break;
                }
                let mut p = vec![0x47u8; DATAGRAM];
                p[1..5].copy_from_slice(&i.to_be_bytes());
                // An unconnected UDP send to loopback fails only for want of buffer space;
                // the listeners' output, which the tests check, shows what arrived.
                let _ = sock.send_to(&p, FEED);
                thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            on,
            handle: Some(handle),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One UDP datagram as it arrived in a namespace.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub at: Instant,
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub payload: Vec<u8>,
}

impl Datagram {
    /// The Destination Socket ID of an SRT SHUTDOWN (a 16-byte control header, control type
    /// 0x0005, and a 4-byte control information field); `None` for anything else.
    pub fn srt_shutdown(&self) -> Option<u32> {
        let p = &self.payload;
        let control_type = u16::from_be_bytes([p.first()? & 0x7f, *p.get(1)?]);
        if p.len() == nsfail_common::srt::SHUTDOWN_LEN && p[0] & 0x80 != 0 && control_type == 5 {
            nsfail_common::srt::dest_socket_id(p)
        } else {
            None
        }
    }
}

/// Every IPv4 UDP datagram from `from` that arrives in a namespace, seen by a raw socket
/// there: what went over the wire, whether or not any process reads it. Bounded to 100,000
/// datagrams and 10 minutes; stops when dropped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Datagram>>>,
    handle: Option<JoinHandle<()>>,
}

impl Capture {
    /// Panics, naming the cause, when it cannot enter `ns` or open its raw socket.
    pub fn start(ns: &Netns, from: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Opened inside the namespace, the socket stays there whichever thread reads it.
        let fd = nsfail::net::netns::in_netns(&ns.name, || {
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Udp,
            )
        })
        .unwrap_or_else(|e| panic!("capture: entering namespace {}: {e}", ns.name))
        .unwrap_or_else(|e| panic!("capture: raw UDP socket in {}: {e}", ns.name));
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 50_000))
            .unwrap_or_else(|e| panic!("capture: receive timeout: {e}"));
        let handle = {
            let (stop, seen) = (stop.clone(), seen.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                        continue;
                    };
                    let Some(d) = parse_udp4(&buf[..n]).filter(|d| d.from == from) else {
                        continue;
                    };
                    let mut seen = seen.lock().unwrap();
                    if seen.len() >= 100_000 {
                        break;
                    }
                    seen.push(d);
                }
            })
        };
        Self {
            stop,
            seen,
            handle: Some(handle),
        }
    }

    /// Everything captured so far, in arrival order.
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }

    /// The SHUTDOWNs captured so far.
    pub fn shutdowns(&self) -> Vec<Datagram> {
        let mut all = self.datagrams();
        all.retain(|d| d.srt_shutdown().is_some());
        all
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An IPv4 packet carrying UDP, as a raw socket delivers it (IP header first).
fn parse_udp4(ip: &[u8]) -> Option<Datagram> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip.get(9) != Some(&17) || ihl < 20 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([udp[at], udp[at + 1]]);
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    Some(Datagram {
        at: Instant::now(),
        from: SocketAddrV4::new(addr(12), port(0)),
        to: SocketAddrV4::new(addr(16), port(2)),
        payload: udp.get(8..len)?.to_vec(),
    })
}

/// The SRT stream of the daemon scenarios: a listener on port 7000 in each encoder of `bed`
/// (writing to its own file), a caller in the source namespace to cam1 (10.77.0.1:5000), and
/// the feeder, and a [`Capture`] in the source namespace of everything cam1's ingest address
/// sends. Everything stops when dropped.
pub struct Session {
    /// What reached the caller's namespace from cam1's ingest address.
    pub wire: Capture,
    listeners: Vec<Option<ChildGuard>>,
    outputs: Vec<PathBuf>,
    _caller: ChildGuard,
    _feed: Feeder,
    _dir: crate::daemon::TempDir,
}

impl Session {
    pub fn start(bed: &crate::daemon::Bed, passphrase: Option<&str>) -> Self {
        let dir = crate::daemon::TempDir::new();
        let outputs: Vec<PathBuf> = (0..bed.lab.encoders.len())
            .map(|i| output(&dir.path, i))
            .collect();
        let listeners = bed
            .lab
            .encoders
            .iter()
            .zip(&outputs)
            .map(|(e, out)| Some(listener(&e.ns, 7000, out, passphrase)))
            .collect();
        let target = format!("{}:5000", nsfail::lab::INGEST4);
        let wire = Capture::start(&bed.lab.src, target.parse().expect("ingest address"));
        let caller = caller(&bed.lab.src, &target, passphrase);
        Self {
            wire,
            listeners,
            outputs,
            _caller: caller,
            _feed: Feeder::start(&bed.lab.src.name),
            _dir: dir,
        }
    }

    /// The caller's address and socket ID in the session running now, from the wire: the
    /// Destination Socket ID of the latest packet the ingest address sent it (its listener's
    /// ACKs, rewritten by the return path).
    pub fn caller_on_wire(&self) -> (SocketAddrV4, u32) {
        self.wire
            .datagrams()
            .iter()
            .rev()
            .filter(|d| d.srt_shutdown().is_none())
            .find_map(|d| Some((d.to, nsfail_common::srt::dest_socket_id(&d.payload)?)))
            .expect("no SRT packet from the ingest address reached the caller")
    }

    /// Checks the wire for the SHUTDOWN that tells `caller` (its address and socket ID, from
    /// [`Session::caller_on_wire`]) to reconnect: none before `since` (the kill or the remap
    /// that should cause them), at least one within [`TOLD_BOUND`] after it, from the ingest
    /// address and port (the capture sees nothing else), to the caller's address, each a
    /// 16-byte control header of type 0x0005 plus 4 bytes, addressed to the caller's socket
    /// ID. Later ones are not counted: the old encoder's own libsrt, still alive after a
    /// remap, sends one through the return path when its 5 s peer-idle timeout expires.
    /// Returns how many arrived in time.
    pub fn assert_told_to_reconnect(&self, caller: (SocketAddrV4, u32), since: Instant) -> usize {
        let shutdowns = self.wire.shutdowns();
        let before: Vec<_> = shutdowns.iter().filter(|d| d.at < since).collect();
        assert!(before.is_empty(), "SHUTDOWN before its cause: {before:?}");
        let told: Vec<_> = shutdowns
            .iter()
            .filter(|d| d.at.duration_since(since) < TOLD_BOUND)
            .collect();
        assert!(
            !told.is_empty(),
            "no SRT SHUTDOWN from the ingest address reached the caller {caller:?} within \
             {TOLD_BOUND:?}; later ones: {:?}; the last datagrams that did: {:?}",
            shutdowns
                .iter()
                .map(|d| d.at.duration_since(since))
                .collect::<Vec<_>>(),
            self.wire
                .datagrams()
                .iter()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        );
        for d in &told {
            assert_eq!(
                (d.to, d.srt_shutdown()),
                (caller.0, Some(caller.1)),
                "SHUTDOWN to the caller's address and socket ID: {d:?}"
            );
        }
        told.len()
    }

    /// Bytes encoder `i`'s listener has written.
    pub fn size(&self, i: usize) -> u64 {
        size(&self.outputs[i])
    }

    /// Waits (at most `limit`) until encoder `i`'s output has grown by `bytes` from now, and
    /// says how long that took.
    pub fn growth(&self, i: usize, bytes: u64, limit: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        let from = self.size(i);
        crate::wait_for(limit, || {
            (self.size(i) >= from + bytes).then(|| start.elapsed())
        })
    }

    /// Waits until encoder `i`'s output has not grown for 500 ms (its listener writes what
    /// it still holds in its latency buffer, in stdio-sized chunks) and returns its size;
    /// `None` if it was still growing after `limit`.
    pub fn settled(&self, i: usize, limit: Duration) -> Option<u64> {
        const QUIET: Duration = Duration::from_millis(500);
        let mut last = (self.size(i), std::time::Instant::now());
        crate::wait_for(limit, || {
            let now = self.size(i);
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
            (last.1.elapsed() >= QUIET).then_some(now)
        })
    }

    /// Ends encoder `i`'s listener, as if it died.
    pub fn kill(&mut self, i: usize) {
        self.listeners[i].take();
    }
}
