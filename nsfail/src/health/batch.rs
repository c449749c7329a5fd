//! Probing at scale: every `udp` echo and SRT induction probe of the daemon's namespace goes out
//! of one socket per address family, on one timer. Probes that are due together leave in one
//! `sendmmsg`; answers are read in batches as they arrive; a port unreachable comes back on the
//! socket's error queue (`IP_RECVERR`), naming the probe it answers by its destination, so a
//! dead responder still fails its probe at once although the socket is not connected.
//!
//! Each probe is matched to its answer by the encoder's address and port and by its contents
//! (the echo of `nsfail-probe <seq>`, or an induction answer addressed to the probe's SRT socket
//! ID); a datagram from a probed address that is neither fails that probe and is counted.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::fd::AsRawFd,
    time::Duration,
};

use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    HealthUpdate,
    mmsg::{INBOX, Inbox, open, refusal, send_batch, unmapped},
    srt,
};
use crate::config::{Check, HealthCheck};

/// How long reads wait after one: answers to a batch arrive within a millisecond or two of
/// each other, and are read together (a probe's measured latency grows by as much at most).
const GATHER: Duration = Duration::from_millis(1);

/// What the batch prober asks an encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// UDP echo of `nsfail-probe <seq>`.
    Echo,
    /// SRT HSv5 induction.
    Induction,
}

/// One probed encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub ask: Ask,
    pub at: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Target {
    /// The batch probe of a health check, if its kind is one (`udp`, and the induction of
    /// `srt` and of `flow` with a standby).
    pub fn of(check: &HealthCheck) -> Option<Self> {
        let (ask, at) = match &check.check {
            Check::Udp(at) => (Ask::Echo, *at),
            Check::Srt(_) | Check::Flow { .. } => (Ask::Induction, check.check.induction_target()?),
            _ => return None,
        };
        Some(Self {
            ask,
            at,
            interval: check.interval.max(Duration::from_millis(1)),
            timeout: check.timeout,
        })
    }
}

struct Probed {
    name: String,
    target: Target,
    next: Instant,
    /// The attempt in flight: its number (echo sequence or SRT socket ID), when it left, and
    /// its deadline.
    pending: Option<(u32, Instant, Instant)>,
    seq: u32,
}

/// Datagrams that were not the answer to a probe, ever.
pub static STRAYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Starts the one task that probes every target of `targets` (by encoder name, followed as it
/// changes) and reports each attempt on `tx`. Ends when `cancel` is cancelled or `tx` closes.
pub fn spawn(
    mut targets: watch::Receiver<BTreeMap<String, Target>>,
    tx: mpsc::Sender<HealthUpdate>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut probes: Vec<Probed> = Vec::new();
        let mut v4: Option<UdpSocket> = None;
        let mut v6: Option<UdpSocket> = None;
        let mut buf = Inbox::new();
        follow(&mut probes, &targets.borrow_and_update());
        // Probe by target address, rebuilt only when the targets change.
        let mut index = indexed(&probes);
        // After a read, the next waits until then: the answers to a batch are gathered in a
        // few reads rather than one wake-up (and a controller message) each.
        let mut gather: Option<Instant> = None;
        loop {
            let wake = probes
                .iter()
                .map(|p| p.pending.map_or(p.next, |(_, _, d)| d.min(p.next)))
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let readable = async {
                if let Some(until) = gather {
                    tokio::time::sleep_until(until).await;
                }
                match (&v4, &v6) {
                    (Some(a), Some(b)) => {
                        tokio::select! {
                            r = a.ready(Interest::READABLE | Interest::ERROR) => (4, r),
                            r = b.ready(Interest::READABLE | Interest::ERROR) => (6, r),
                        }
                    }
                    (Some(a), None) => (4, a.ready(Interest::READABLE | Interest::ERROR).await),
                    (None, Some(b)) => (6, b.ready(Interest::READABLE | Interest::ERROR).await),
                    (None, None) => std::future::pending().await,
                }
            };
            let mut updates = Vec::new();
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                changed = targets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    follow(&mut probes, &targets.borrow_and_update());
                    index = indexed(&probes);
                }
                (family, ready) = readable => {
                    let sock = if family == 4 { &v4 } else { &v6 };
                    if let (Some(sock), Ok(_)) = (sock, ready) {
                        receive(sock, &mut probes, &index, &mut buf, &mut updates);
                    }
                    gather = Some(Instant::now() + GATHER);
                }
                () = tokio::time::sleep_until(wake) => {
                    // Answers that came while reads were held back count before any deadline.
                    for sock in [&v4, &v6].into_iter().flatten() {
                        receive(sock, &mut probes, &index, &mut buf, &mut updates);
                    }
                    let now = Instant::now();
                    expire(&mut probes, now, &mut updates);
                    send_due(&mut probes, now, &mut v4, &mut v6, &mut updates);
                }
            }
            for u in updates {
                if tx.send(u).await.is_err() {
                    return;
                }
            }
        }
    })
}

fn indexed(probes: &[Probed]) -> HashMap<SocketAddr, usize> {
    probes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.target.at, i))
        .collect()
}

/// Keeps the probes of targets that stay, adds new ones (due now), drops the others.
fn follow(probes: &mut Vec<Probed>, wanted: &BTreeMap<String, Target>) {
    probes.retain(|p| wanted.get(&p.name) == Some(&p.target));
    let now = Instant::now();
    for (name, target) in wanted {
        if !probes.iter().any(|p| &p.name == name) {
            probes.push(Probed {
                name: name.clone(),
                target: target.clone(),
                next: now,
                pending: None,
                seq: std::process::id().wrapping_mul(0x9E37) & 0x00ff_ffff,
            });
        }
    }
}

fn update(p: &Probed, result: Result<Duration, String>, refused: bool) -> HealthUpdate {
    HealthUpdate {
        encoder: p.name.clone(),
        ok: result.is_ok(),
        latency: result.as_ref().ok().copied(),
        error: result.err(),
        refused,
    }
}

fn expire(probes: &mut [Probed], now: Instant, out: &mut Vec<HealthUpdate>) {
    for p in probes.iter_mut() {
        if let Some((_, _, deadline)) = p.pending
            && deadline <= now
        {
            p.pending = None;
            out.push(update(
                p,
                Err(format!("no answer within {:?}", p.target.timeout)),
                false,
            ));
        }
    }
}

fn payload(ask: Ask, n: u32) -> Vec<u8> {
    match ask {
        Ask::Echo => format!("nsfail-probe {n}").into_bytes(),
        Ask::Induction => srt::induction_request(n).to_vec(),
    }
}

/// Sends every due probe, one `sendmmsg` per address family.
fn send_due(
    probes: &mut [Probed],
    now: Instant,
    v4: &mut Option<UdpSocket>,
    v6: &mut Option<UdpSocket>,
    out: &mut Vec<HealthUpdate>,
) {
    for family in [4, 6] {
        let due: Vec<usize> = (0..probes.len())
            .filter(|&i| {
                let p = &probes[i];
                p.next <= now && p.pending.is_none() && p.target.at.is_ipv4() == (family == 4)
            })
            .collect();
        if due.is_empty() {
            continue;
        }
        let slot = if family == 4 { &mut *v4 } else { &mut *v6 };
        if slot.is_none() {
            match open(family) {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    for &i in &due {
                        probes[i].next = now + probes[i].target.interval;
                        out.push(update(&probes[i], Err(format!("probe socket: {e}")), false));
                    }
                    continue;
                }
            }
        }
        let sock = slot.as_ref().expect("opened above");
        let mut batch = Vec::with_capacity(due.len());
        for &i in &due {
            let p = &mut probes[i];
            // SRT socket IDs are 31-bit and never 0; echo numbers just grow.
            p.seq = (p.seq.wrapping_add(1) & 0x7fff_ffff).max(1);
            batch.push((p.target.at, payload(p.target.ask, p.seq)));
        }
        let sent = send_batch(sock.as_raw_fd(), &batch);
        for (k, &i) in due.iter().enumerate() {
            let p = &mut probes[i];
            p.next = now + p.target.interval;
            if k < sent {
                p.pending = Some((p.seq, now, now + p.target.timeout));
            } else {
                out.push(update(
                    p,
                    Err("send: the socket took no more".into()),
                    false,
                ));
            }
        }
    }
}

/// Reads every answer and every queued refusal, and settles the probes they answer.
fn receive(
    sock: &UdpSocket,
    probes: &mut [Probed],
    index: &HashMap<SocketAddr, usize>,
    buf: &mut Inbox,
    out: &mut Vec<HealthUpdate>,
) {
    let now = Instant::now();
    // Bounded: a flood cannot keep the task here.
    for _ in 0..1024 / INBOX {
        let Ok(got) = sock.try_io(Interest::READABLE, || buf.read(sock.as_raw_fd())) else {
            break;
        };
        for k in 0..got {
            let Some((from, data)) = buf.datagram(k) else {
                continue;
            };
            settle(probes, index, from, data, now, out);
        }
        // Read on until the socket says it is empty: that clears its readiness, so the task
        // is not woken again for nothing.
    }
    for _ in 0..1024 {
        let Some(dest) = refusal(sock) else {
            break;
        };
        if let Some(&i) = index.get(&unmapped(dest))
            && probes[i].pending.take().is_some()
        {
            out.push(update(
                &probes[i],
                Err("refused: nothing listens on the health port".into()),
                true,
            ));
        }
    }
}

/// Settles the probe a datagram from `from` answers, if any.
fn settle(
    probes: &mut [Probed],
    index: &HashMap<SocketAddr, usize>,
    from: SocketAddr,
    data: &[u8],
    now: Instant,
    out: &mut Vec<HealthUpdate>,
) {
    let n = data.len();
    let Some(&i) = index.get(&unmapped(from)) else {
        return;
    };
    let p = &mut probes[i];
    let Some((want, sent, _)) = p.pending else {
        return;
    };
    let answered = match p.target.ask {
        Ask::Echo => {
            if data == payload(Ask::Echo, want) {
                Some(true)
            } else if echo_number(data).is_some_and(|k| k < want) {
                None
            } else {
                Some(false)
            }
        }
        Ask::Induction => match srt::answer_to(data) {
            Some(to) if to == want => Some(true),
            Some(to) if to < want && want - to < 1024 => None,
            _ => Some(false),
        },
    };
    match answered {
        None => {}
        Some(true) => {
            p.pending = None;
            out.push(update(p, Ok(now.duration_since(sent)), false));
        }
        Some(false) => {
            p.pending = None;
            let count = STRAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let what = match p.target.ask {
                Ask::Echo => format!("echo from {from} does not match the probe ({n} bytes)"),
                Ask::Induction => format!(
                    "not an SRT induction answer ({n} bytes; {count} such datagrams so far)"
                ),
            };
            out.push(update(p, Err(what), false));
        }
    }
}

fn echo_number(data: &[u8]) -> Option<u32> {
    std::str::from_utf8(data.strip_prefix(b"nsfail-probe ")?)
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;

    use super::{Ask, Target, spawn};

    fn target(ask: Ask, at: std::net::SocketAddr) -> Target {
        Target {
            ask,
            at,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(40),
        }
    }

    #[tokio::test]
    async fn one_socket_probes_many_echoes_and_hears_refusals() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 128];
            for _ in 0..20 {
                let Ok((n, from)) = echo.recv_from(&mut buf) else {
                    return;
                };
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead_at = dead.local_addr().unwrap();
        drop(dead);
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut wanted = BTreeMap::new();
        wanted.insert("live".to_owned(), target(Ask::Echo, at));
        wanted.insert("dead".to_owned(), target(Ask::Echo, dead_at));
        wanted.insert(
            "silent".to_owned(),
            target(Ask::Induction, silent.local_addr().unwrap()),
        );
        let (_targets_tx, targets) = watch::channel(wanted);
        let (tx, mut rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let task = spawn(targets, tx, cancel.clone());
        let mut seen = BTreeMap::new();
        while seen.len() < 3 {
            let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            seen.entry(u.encoder.clone()).or_insert(u);
        }
        assert!(seen["live"].ok, "{:?}", seen["live"]);
        assert!(
            !seen["dead"].ok && seen["dead"].refused,
            "{:?}",
            seen["dead"]
        );
        assert!(
            !seen["silent"].ok && !seen["silent"].refused,
            "{:?}",
            seen["silent"]
        );
        assert!(seen["silent"].error.as_ref().unwrap().contains("no answer"));
        cancel.cancel();
        task.await.unwrap();
    }
}
