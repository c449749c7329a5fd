//! `nsfail status`: channels and encoders as the data plane and the decider have them. Linear
//! in the channels: the input counters come in one batched read, the active encoders from
//! the data plane's mirror of its maps, SRT callers and `active_for` grouped in one pass.
//!
//! The answer is a [`StatusView`]: what it needs is read once, and its channels are made one
//! at a time as they are serialized or sampled, so that 100,000 of them never exist at once
//! as a list of [`ChannelStatus`] (48 MB) beside their JSON.

use nsfail_common::FlowStats;
use serde::ser::{Serialize, SerializeStruct as _, Serializer};

use super::*;

/// A `status` answer, its channels made as they are read; serializes as [`Status`] does.
pub struct StatusView<'a> {
    c: &'a Controller,
    now: u64,
    stats: HashMap<SocketAddr, FlowStats>,
    peers: HashMap<SocketAddr, Vec<SrtPeerStatus>>,
    pub encoders: Vec<EncoderStatus>,
    /// A cluster host's view of its cluster.
    pub cluster: Option<api::ClusterView>,
}

impl Controller {
    pub fn status(&self) -> Result<Status> {
        let view = self.status_view()?;
        let channels = view.channels().collect();
        Ok(Status {
            channels,
            encoders: view.encoders,
            cluster: view.cluster,
        })
    }

    pub fn status_view(&self) -> Result<StatusView<'_>> {
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
        for ch in &self.effective.channels {
            if let Some(a) = self.dp.active_encoder(ch.listen) {
                match active_for.get_mut(a) {
                    Some(names) => names.push(ch.name.clone()),
                    None => {
                        active_for.insert(a.to_owned(), vec![ch.name.clone()]);
                    }
                }
            }
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
        Ok(StatusView {
            c: self,
            now,
            stats,
            peers,
            encoders,
            cluster: self.cluster_view(),
        })
    }
}

impl StatusView<'_> {
    /// The channels, in the config's order, each made when it is reached.
    pub fn channels(&self) -> impl ExactSizeIterator<Item = ChannelStatus> + '_ {
        self.c.effective.channels.iter().map(|ch| self.channel(ch))
    }

    fn channel(&self, ch: &config::Channel) -> ChannelStatus {
        let stats = self.stats.get(&ch.listen).copied().unwrap_or_default();
        ChannelStatus {
            name: ch.name.clone(),
            listen: ch.listen,
            active: self.c.active_of(ch),
            encoders: ch.encoders.clone(),
            port: ch.encoder_port(),
            protocol: ch.protocol.as_str().to_owned(),
            failback: ch.failback.as_str().to_owned(),
            packets: stats.packets,
            bytes: stats.bytes,
            idle_ms: (stats.packets > 0)
                .then(|| self.now.saturating_sub(stats.last_seen_ns) / 1_000_000),
            srt_peers: self.peers.get(&ch.listen).cloned().unwrap_or_default(),
        }
    }
}

impl Serialize for StatusView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        struct Channels<'a, 'b>(&'b StatusView<'a>);
        impl Serialize for Channels<'_, '_> {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_seq(self.0.channels())
            }
        }
        let mut st = s.serialize_struct("Status", 2 + usize::from(self.cluster.is_some()))?;
        st.serialize_field("channels", &Channels(self))?;
        st.serialize_field("encoders", &self.encoders)?;
        match &self.cluster {
            Some(cluster) => st.serialize_field("cluster", cluster)?,
            None => st.skip_field("cluster")?,
        }
        st.end()
    }
}
