//! `nsfail status`: channels and encoders as the data plane and the decider have them. Linear
//! in the channels: the input counters come in one batched read, the active encoders from
//! the data plane's mirror of its maps, SRT callers and `active_for` grouped in one pass.

use super::*;

impl Controller {
    pub fn status(&self) -> Result<Status> {
        let now = monotonic_ns();
        let stats = self.dp.all_channel_stats()?;
        let mut peers: HashMap<SocketAddr, Vec<SrtPeerStatus>> = HashMap::new();
        for p in self.dp.srt_peers().unwrap_or_default() {
            peers.entry(p.channel).or_default().push(SrtPeerStatus {
                caller: p.peer,
                socket_id: p.socket_id,
                idle_ms: now.saturating_sub(p.last_seen_ns) / 1_000_000,
            });
        }
        let mut active_for: HashMap<String, Vec<String>> = HashMap::new();
        let mut channels = Vec::with_capacity(self.effective.channels.len());
        for ch in &self.effective.channels {
            let stats = stats.get(&ch.listen).copied().unwrap_or_default();
            let active = self.active_of(ch);
            if let Some(a) = &active {
                match active_for.get_mut(a) {
                    Some(names) => names.push(ch.name.clone()),
                    None => {
                        active_for.insert(a.clone(), vec![ch.name.clone()]);
                    }
                }
            }
            channels.push(ChannelStatus {
                name: ch.name.clone(),
                listen: ch.listen,
                active,
                encoders: ch.encoders.clone(),
                port: ch.encoder_port(),
                protocol: ch.protocol.as_str().to_owned(),
                failback: ch.failback.as_str().to_owned(),
                packets: stats.packets,
                bytes: stats.bytes,
                idle_ms: (stats.packets > 0)
                    .then(|| now.saturating_sub(stats.last_seen_ns) / 1_000_000),
                srt_peers: peers.remove(&ch.listen).unwrap_or_default(),
            });
        }
        let mut encoders = Vec::new();
        for e in &self.effective.encoders {
            let stats = self.dp.encoder_stats(&e.name).unwrap_or_default();
            encoders.push(EncoderStatus {
                name: e.name.clone(),
                host: self
                    .shared
                    .as_ref()
                    .map(|s| s.host_of(&e.name).unwrap_or(s.host()).to_owned()),
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
                active_for: active_for.remove(&e.name).unwrap_or_default(),
                health_kind: e.health.kind.as_str().to_owned(),
                health_interval_ms: e.health.interval_ms,
            });
        }
        Ok(Status {
            channels,
            encoders,
            cluster: self.cluster_view(),
        })
    }
}
