//! SRT reconnects: after a repoint, each live caller of the channel is sent a SHUTDOWN from
//! the ingest address, so that it reconnects to the encoder the channel now points to. In a
//! cluster the leader also tells the callers that other hosts published in etcd.

use super::*;

impl Controller {
    /// The SRT callers this host has learned and heard from lately, for the cluster to publish:
    /// (channel, caller, record). Empty outside a cluster.
    pub fn local_callers(&self) -> Vec<(String, SocketAddr, crate::cluster::CallerRecord)> {
        if self.shared.is_none() {
            return Vec::new();
        }
        let by_listen: HashMap<SocketAddr, &str> = self
            .config()
            .channels
            .iter()
            .filter(|ch| ch.protocol == config::Protocol::Srt)
            .map(|ch| (ch.listen, ch.name.as_str()))
            .collect();
        let now = monotonic_ns();
        match self.dp.srt_peers() {
            Ok(peers) => peers
                .into_iter()
                .filter(|p| now.saturating_sub(p.last_seen_ns) < SRT_PEER_FRESH.as_nanos() as u64)
                .filter_map(|p| {
                    let name = by_listen.get(&p.channel)?;
                    Some((
                        (*name).to_owned(),
                        p.peer,
                        crate::cluster::CallerRecord {
                            listen: p.channel,
                            socket_id: p.socket_id,
                        },
                    ))
                })
                .collect(),
            Err(e) => {
                warn!("reading SRT peers to publish: {e}");
                Vec::new()
            }
        }
    }

    /// Sends each live SRT caller of `ch` a SHUTDOWN from the channel's ingest address, three
    /// times a few ms apart (loss-safe; a caller ignores a wrong or stale ID). The caller drops
    /// its session at once and its new handshake lands on the encoder the channel now points
    /// to, instead of waiting out libsrt's ~5 s peer-idle timeout. They are sent when the
    /// batch is finished ([`Batch::finish`]). Returns the callers told.
    pub(super) fn srt_reconnect(&self, ch: &config::Channel, batch: &mut Batch) -> u32 {
        let peers = batch.peers.get_or_insert_with(|| {
            let now = monotonic_ns();
            let mut by_channel: HashMap<SocketAddr, Vec<(SocketAddr, u32)>> = HashMap::new();
            match self.dp.srt_peers() {
                Ok(peers) => {
                    for p in peers {
                        if now.saturating_sub(p.last_seen_ns) < SRT_PEER_FRESH.as_nanos() as u64 {
                            by_channel
                                .entry(p.channel)
                                .or_default()
                                .push((p.peer, p.socket_id));
                        }
                    }
                }
                Err(e) => warn!("reading SRT peers: {e}"),
            }
            by_channel
        });
        let mut callers = peers.remove(&ch.listen).unwrap_or_default();
        // Cluster: the leader also tells the callers other hosts learned, whichever host
        // that was and whether it is up. Each host tells its own as well, so a caller may
        // get its SHUTDOWN twice: harmless, the second finds the session gone (or a new
        // socket ID) and is ignored.
        if let Some(shared) = self.shared.as_ref().filter(|s| s.leading) {
            for c in shared.published_callers(&ch.name) {
                if !callers.contains(&c) {
                    callers.push(c);
                }
            }
        }
        if callers.is_empty() {
            return 0;
        }
        let count = callers.len() as u32;
        batch.shutdowns.push((ch.name.clone(), ch.listen, callers));
        count
    }
}

/// An SRT channel's SHUTDOWNs: its name, its ingest address, its callers and their IDs.
type Shutdowns = (String, SocketAddr, Vec<(SocketAddr, u32)>);

/// What the decisions of one batch share: the SRT callers (read once), the SHUTDOWNs to send
/// (on one thread, after every map write of the batch), the encoders' counters at the
/// switch.
#[derive(Default)]
pub(super) struct Batch {
    /// Fresh SRT callers by channel, read at the batch's first SRT repoint.
    peers: Option<HashMap<SocketAddr, Vec<(SocketAddr, u32)>>>,
    shutdowns: Vec<Shutdowns>,
    /// Switchover baselines by (from, to) encoder.
    pub(super) baselines: HashMap<(String, String), Option<(u64, u64)>>,
}

impl Batch {
    /// Sends the batch's SHUTDOWNs, off the controller's thread.
    pub(super) fn finish(self) {
        if self.shutdowns.is_empty() {
            return;
        }
        std::thread::spawn(move || {
            for (name, listen, callers) in self.shutdowns {
                if let Err(e) = send_srt_shutdowns(listen, &callers) {
                    warn!("channel {name}: SRT shutdown to callers: {e}");
                }
            }
        });
    }
}

/// Sends the SHUTDOWNs from the ingest address (IP_FREEBIND and, for IPv4, IP_TRANSPARENT: the
/// address need not be configured on this host for the packets to carry it), three rounds
/// 3 ms apart.
pub fn send_srt_shutdowns(from: SocketAddr, callers: &[(SocketAddr, u32)]) -> std::io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, sendto, setsockopt, socket,
        sockopt,
    };
    let family = if from.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    // A cluster host need not hold the ingest address at all (the router sends it to
    // another host): without IP_TRANSPARENT the kernel refuses to route from an IPv4 source
    // that is not local (ENETUNREACH). IPv6 routes such a source with IP_FREEBIND alone
    // (`cross_host.rs` tests both). IPV6_TRANSPARENT is left unset: it is not needed, and
    // with it a SHUTDOWN sent within a second of the interface coming up (its link-local
    // address still tentative) was lost here, where without it none was.
    if from.is_ipv4() {
        setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
        for (caller, id) in callers {
            let packet = nsfail_common::srt::shutdown(*id);
            sendto(
                fd.as_raw_fd(),
                &packet,
                &SockaddrStorage::from(*caller),
                nix::sys::socket::MsgFlags::empty(),
            )?;
        }
    }
    Ok(())
}
