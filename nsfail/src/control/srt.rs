//! SRT reconnects: after a repoint, each live caller of the channel is sent a SHUTDOWN from
//! the ingest address, so that it reconnects to the encoder the channel now points to.

use super::*;

impl Controller {
    /// The start of a switchover: the failed encoder's last sign of life. The data plane
    /// forwards to a dead encoder until the switch, so its forwarded-packet time says nothing
    /// about when it died; its last reply through the return path (SRT ACKs, any answer) or
    /// its last successful probe, whichever is later, does. With neither, the last packet
    /// forwarded to it is used.
    /// Sends each live SRT caller of `ch` a SHUTDOWN from the channel's ingest address, three
    /// times a few ms apart (loss-safe; a caller ignores a wrong or stale ID). The caller drops
    /// its session at once and its new handshake lands on the encoder the channel now points
    /// to, instead of waiting out libsrt's ~5 s peer-idle timeout. Returns the callers told.
    pub(super) fn srt_reconnect(&self, ch: &config::Channel) -> u32 {
        let now = monotonic_ns();
        let callers: Vec<(SocketAddr, u32)> = match self.dp.srt_peers() {
            Ok(peers) => peers
                .into_iter()
                .filter(|p| {
                    p.channel == ch.listen
                        && now.saturating_sub(p.last_seen_ns) < SRT_PEER_FRESH.as_nanos() as u64
                })
                .map(|p| (p.peer, p.socket_id))
                .collect(),
            Err(e) => {
                warn!("channel {}: reading SRT peers: {e}", ch.name);
                return 0;
            }
        };
        if callers.is_empty() {
            return 0;
        }
        let listen = ch.listen;
        let name = ch.name.clone();
        let count = callers.len() as u32;
        std::thread::spawn(move || {
            if let Err(e) = send_srt_shutdowns(listen, &callers) {
                warn!("channel {name}: SRT shutdown to callers: {e}");
            }
        });
        count
    }
}

/// Sends the SHUTDOWNs from the ingest address (IP_FREEBIND: the address need not be
/// configured on this host for the packets to carry it).
pub(super) fn send_srt_shutdowns(
    from: SocketAddr,
    callers: &[(SocketAddr, u32)],
) -> std::io::Result<()> {
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
