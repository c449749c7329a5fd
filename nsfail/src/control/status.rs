//! `nsfail status`: channels and encoders as the data plane and the decider have them.

use super::*;

impl Controller {
    pub fn status(&self) -> Result<Status> {
        let now = monotonic_ns();
        let active: BTreeMap<_, _> = self
            .dp
            .channels()?
            .into_iter()
            .map(|c| (c.listen, c.encoder))
            .collect();
        let peers = self.dp.srt_peers().unwrap_or_default();
        let mut channels = Vec::new();
        for ch in &self.effective.channels {
            let stats = self.dp.channel_stats(ch.listen).unwrap_or_default();
            channels.push(ChannelStatus {
                name: ch.name.clone(),
                listen: ch.listen,
                active: active.get(&ch.listen).cloned(),
                encoders: ch.encoders.clone(),
                port: ch.encoder_port(),
                protocol: ch.protocol.as_str().to_owned(),
                failback: ch.failback.as_str().to_owned(),
                packets: stats.packets,
                bytes: stats.bytes,
                idle_ms: (stats.packets > 0)
                    .then(|| now.saturating_sub(stats.last_seen_ns) / 1_000_000),
                srt_peers: peers
                    .iter()
                    .filter(|p| p.channel == ch.listen)
                    .map(|p| SrtPeerStatus {
                        caller: p.peer,
                        socket_id: p.socket_id,
                        idle_ms: now.saturating_sub(p.last_seen_ns) / 1_000_000,
                    })
                    .collect(),
            });
        }
        let mut encoders = Vec::new();
        for e in &self.effective.encoders {
            let stats = self.dp.encoder_stats(&e.name).unwrap_or_default();
            encoders.push(EncoderStatus {
                name: e.name.clone(),
                address: e.address.to_string(),
                local: e.interface.is_some(),
                healthy: self.decider.healthy(&e.name),
                drained: self.decider.drained(&e.name),
                can_receive: self.receive.get(&e.name).map(|v| v.can_receive),
                receive: self.receive.get(&e.name).map(|v| v.reason.clone()),
                // Handed to the device and not refused by it: what the encoder was given.
                packets: stats
                    .rx
                    .packets
                    .saturating_sub(stats.drops[drop_reason::REDIRECT_FAILED]),
                redirect_failed: stats.drops[drop_reason::REDIRECT_FAILED],
                bytes: stats.rx.bytes,
                replies: stats.tx.packets,
                drops: stats.drops.iter().sum(),
                active_for: channels
                    .iter()
                    .filter(|c| c.active.as_deref() == Some(e.name.as_str()))
                    .map(|c| c.name.clone())
                    .collect(),
                health_kind: e.health.kind.as_str().to_owned(),
                health_interval_ms: e.health.interval_ms,
            });
        }
        Ok(Status { channels, encoders })
    }
}
