//! Real SRT sessions for tests and benchmarks: `srt-live-transmit` listeners writing what they
//! receive to a file, a caller, and a feeder of MPEG-TS-sized datagrams into the caller.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use nsfail::lab::Netns;

use crate::{ChildGuard, spawn_in};

/// The UDP port inside the caller's namespace that the feeder sends to.
pub const FEED: &str = "127.0.0.1:9000";
/// One datagram: seven 188-byte TS packets.
pub const DATAGRAM: usize = 1316;

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
    pub fn start(ns: &str) -> Self {
        let on = Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        let ns = ns.to_owned();
        let handle = thread::spawn(move || {
            let _ = nsfail::net::netns::in_netns(&ns, move || {
                let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
                    return;
                };
                for i in 0..12_000u32 {
                    if !flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut p = vec![0x47u8; DATAGRAM];
                    p[1..5].copy_from_slice(&i.to_be_bytes());
                    let _ = sock.send_to(&p, FEED);
                    thread::sleep(Duration::from_millis(5));
                }
            });
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

/// The SRT stream of the daemon scenarios: a listener on port 7000 in each encoder of `bed`
/// (writing to its own file), a caller in the source namespace to cam1 (10.77.0.1:5000), and
/// the feeder. Everything stops when dropped.
pub struct Session {
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
        let caller = caller(&bed.lab.src, &target, passphrase);
        Self {
            listeners,
            outputs,
            _caller: caller,
            _feed: Feeder::start(&bed.lab.src.name),
            _dir: dir,
        }
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
