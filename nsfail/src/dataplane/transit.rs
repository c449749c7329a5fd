//! Transit entries: how a cluster host takes in the packets another host routed to one of its
//! local encoders ([`EncoderLink::Routed`] there). The other host rewrote the packet towards
//! the encoder's own address and channel port and sent it to its next hop; here the entry
//! keyed by that endpoint, in the same CHANNELS maps, points at the local encoder: the XDP
//! program redirects the packet into the encoder's veth unchanged (its address and port are
//! already the encoder's), counts it for the channel and the encoder, and learns the caller
//! as the channel's source, so the encoder's replies leave this host rewritten to the ingest
//! address like those of any local stream. A transit entry's key is its own target's
//! address and port, which is how [`Mirror::load`] tells it from a channel's.

use super::*;

impl Dataplane {
    /// Takes in the packets of the channel on `listen` routed here for the local encoder
    /// `encoder`, one of the channel's encoders. Idempotent; the entry follows the encoder's
    /// MAC and the channel's `sources` flag, and goes with the channel or when the encoder
    /// leaves the channel's encoders.
    pub fn set_transit(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let ingest = endpoint(listen);
        let channel = *self
            .mirror
            .channels
            .get(&ingest)
            .ok_or(DataplaneError::UnknownChannel(listen))?;
        let (id, info) = self.encoder_checked(encoder, listen)?;
        let invalid = |why: String| DataplaneError::Invalid {
            what: format!("transit entry of channel {listen} for encoder {encoder:?}"),
            why,
        };
        if info.kind != ENCODER_LOCAL {
            return Err(invalid("the encoder is not local to this host".into()));
        }
        let key = reply_key(&info, channel.port);
        if !self.mirror.replies_of(&ingest).contains(&key) {
            return Err(invalid("the encoder is not one of the channel's".into()));
        }
        if self.mirror.channels.contains_key(&key) {
            return Err(invalid(format!(
                "{} is a channel's ingest address",
                socket_addr(&key)
            )));
        }
        let target = ChannelTarget {
            flags: channel.flags,
            ..target_for(&info, id, channel.channel_id, channel.port)
        };
        if self.mirror.transit.get(&key) == Some(&target) {
            return Ok(());
        }
        self.channels
            .insert(key, target)
            .map_err(map_err("CHANNELS"))?;
        self.mirror.transit.insert(key, target);
        Ok(())
    }

    /// Stops taking in the channel's packets for `encoder`. Removing what is not there is
    /// not an error.
    pub fn remove_transit(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let (_, info) = self.encoder_checked(encoder, listen)?;
        let Some(channel) = self.mirror.channels.get(&endpoint(listen)).copied() else {
            return Ok(());
        };
        let key = reply_key(&info, channel.port);
        if self.mirror.transit.contains_key(&key) {
            self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
            self.mirror.transit.remove(&key);
        }
        Ok(())
    }

    /// The transit entries: (encoder endpoint, channel's ingest address, encoder id).
    pub fn transits(&self) -> Vec<(SocketAddr, SocketAddr, u32)> {
        let by_id: std::collections::HashMap<u32, SocketAddr> = self
            .mirror
            .channels
            .iter()
            .map(|(k, t)| (t.channel_id, socket_addr(k)))
            .collect();
        let mut out: Vec<_> = self
            .mirror
            .transit
            .iter()
            .filter_map(|(k, t)| Some((socket_addr(k), *by_id.get(&t.channel_id)?, t.encoder_id)))
            .collect();
        out.sort();
        out
    }

    /// Brings the transit entries of channel `channel_id` in line with the channel (its key
    /// and target as just written, `None`: gone): entries of encoders no longer among its
    /// encoders (or of a channel gone) are removed, the others follow its `sources` flag and
    /// port. The caller passes the channel, so that a reconcile writing every channel does
    /// not search all of them for each (10,000 x 10,000 at 10,000 channels).
    pub(super) fn sync_transit(
        &mut self,
        channel_id: u32,
        channel: Option<(Endpoint, ChannelTarget)>,
    ) -> Result<()> {
        if self.mirror.transit.is_empty() {
            return Ok(());
        }
        let mine: Vec<(Endpoint, ChannelTarget)> = self
            .mirror
            .transit
            .iter()
            .filter(|(_, t)| t.channel_id == channel_id)
            .map(|(k, t)| (*k, *t))
            .collect();
        for (key, t) in mine {
            let keep = channel.and_then(|(ingest, c)| {
                let same_port = t.port == c.port;
                (same_port && self.mirror.replies_of(&ingest).contains(&key)).then_some(c)
            });
            match keep {
                Some(c) if c.flags != t.flags => {
                    let t = ChannelTarget {
                        flags: c.flags,
                        ..t
                    };
                    self.channels.insert(key, t).map_err(map_err("CHANNELS"))?;
                    self.mirror.transit.insert(key, t);
                }
                Some(_) => {}
                None => {
                    self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
                    self.mirror.transit.remove(&key);
                }
            }
        }
        Ok(())
    }
}
