//! A cluster's leadership as this host's controller sees it (issue 17): the leader writes
//! every decision it carries out (its outbox, emptied by the cluster task into etcd);
//! followers take the leader's choices through the same decision path; remaps and drains are
//! the leader's while etcd is reachable; without etcd every host decides for itself.

use std::sync::Arc;

use super::*;

/// A leader's decision to write to etcd: the channel's active encoder, and whether it was
/// placed by hand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub channel: String,
    pub encoder: String,
    pub manual: bool,
}

/// How often a follower compares all its channels with the leader's choices.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// How long a follower leaves a channel on an encoder it sees down for its leader to move
/// (the leader's write arrives in tens of ms): after that it fails the channel over itself.
/// A leader frozen but not yet expired costs a stream this much, not a lease and an
/// election.
pub const FOLLOWER_GRACE: Duration = Duration::from_millis(500);

impl Controller {
    /// A follower takes, for each of `channels`, the encoder the leader wrote, when it is one
    /// of the channel's and usable as this host sees it (healthy; not drained, unless the
    /// channel's encoder here is down or drained too): a choice
    /// written before this host saw the encoder fail (a stale one, read back after an etcd
    /// outage) never moves a stream onto a dead encoder. The leader keeps its own decisions.
    pub(super) fn follow(&mut self, channels: &BTreeSet<String>) {
        let Some(shared) = &self.shared else { return };
        // Only a follower takes the leader's records: a host deciding alone (etcd lost, no
        // leader) would take stale ones.
        if !self.decider.following() {
            return;
        }
        let now = Instant::now();
        let hold = self.override_hold();
        let mut decisions = Vec::new();
        // Overridden records the leader has replaced since.
        let mut stale = Vec::new();
        for name in channels {
            let Some(rec) = shared.actives.get(name) else {
                continue;
            };
            match shared.overridden.get(name) {
                Some((encoder, term, since))
                    if *encoder == rec.encoder
                        && *term == rec.term
                        && now.duration_since(*since) < hold =>
                {
                    continue;
                }
                Some(_) => stale.push(name.clone()),
                None => {}
            }
            let Some(i) = self.lookup.channel(&self.effective.channels, name) else {
                continue;
            };
            let ch = &self.effective.channels[i];
            let Some(active) = self.decider.active(name) else {
                continue;
            };
            // A drained encoder is taken only off one that no longer works (the leader may
            // not hold the drain this host does).
            let stays = self.decider.healthy(active);
            if active == rec.encoder
                || !ch.encoders.contains(&rec.encoder)
                || !self.has_encoder(&rec.encoder)
                || !self.decider.healthy(&rec.encoder)
                || (self.decider.drained(&rec.encoder) && stays)
            {
                continue;
            }
            decisions.extend(self.decider.follow(name, &rec.encoder, now));
        }
        if let Some(s) = self.shared.as_mut() {
            for name in stale {
                s.overridden.remove(&name);
            }
        }
        self.apply_all(decisions);
    }

    /// Periodic work of a follower: the leader's choices it could not take when they came
    /// (the encoder was down here then) are taken once it can; every [`FOLLOW_EVERY`].
    pub(super) fn follow_periodically(&mut self, now: Instant) {
        let Some(s) = self.shared.as_mut() else {
            return;
        };
        // Only a follower takes records (see `follow`): nothing to gather otherwise.
        if !self.decider.following()
            || s.followed_at
                .is_some_and(|t| now.duration_since(t) < FOLLOW_EVERY)
        {
            return;
        }
        s.followed_at = Some(now);
        let all: BTreeSet<String> = s.actives.keys().cloned().collect();
        self.follow(&all);
    }

    /// A follower's safeguard (see [`FOLLOWER_GRACE`]): channels on encoders down here for
    /// longer than the grace, which the leader has not moved, fail over here.
    pub(super) fn fail_over_overdue(&mut self, now: Instant) {
        let decisions = self.decider.overdue(now, FOLLOWER_GRACE);
        if decisions.is_empty() {
            return;
        }
        let leader = self
            .shared
            .as_ref()
            .and_then(|s| s.leader.clone())
            .unwrap_or_default();
        let moved = decisions.iter().filter(|d| d.to.is_some()).count();
        if moved > 0 {
            let reason = format!(
                "cluster: the leader ({leader}) has not moved {moved} channels off encoders down \
                 here for {} ms: this host fails them over itself",
                FOLLOWER_GRACE.as_millis()
            );
            warn!("{reason}");
            self.event(None, None, None, &reason);
        }
        self.apply_all(decisions);
    }

    /// What the cluster's task says of the election and of etcd: whether this host leads,
    /// who does, whether etcd is reachable. Becoming leader puts every channel in the
    /// outbox (what etcd holds is compared with this host's decisions).
    pub fn set_cluster_view(&mut self, leading: bool, leader: Option<String>, etcd_up: bool) {
        let Some(s) = self.shared.as_mut() else {
            return;
        };
        let was = s.leading;
        s.leading = leading;
        s.leader = leader;
        s.etcd_up = etcd_up;
        if leading && !was {
            s.outbox = s.channels.keys().cloned().collect();
            // Where this host followed the leader before it, it takes over how that leader
            // placed each channel: by hand (failback waits for the next automatic failover)
            // or automatically (failback goes on). A channel this host moved itself since
            // (etcd unreachable, say) keeps its own state.
            for (name, rec) in &s.actives {
                if self.decider.active(name) == Some(rec.encoder.as_str()) {
                    self.decider.set_manual(name, rec.manual);
                }
            }
            let reason = format!("cluster: this host ({}) is the leader", s.host);
            info!("{reason}");
            self.event(None, None, None, &reason);
        } else if !leading && was {
            s.outbox.clear();
            let reason = format!("cluster: this host ({}) is no longer the leader", s.host);
            warn!("{reason}");
            self.event(None, None, None, &reason);
        }
        self.set_following();
    }

    /// Whether this host's decisions are its leader's: while etcd is reachable and another
    /// host leads, the leader alone runs the failover rules and this host takes its choices
    /// ([`Controller::follow`]); otherwise (this host leads, etcd is lost, no host leads)
    /// this host decides, and at once moves what its own view says must move.
    fn set_following(&mut self) {
        let Some(s) = &self.shared else { return };
        // A host named leader before its own campaign has answered is not its own follower.
        let following = s.etcd_up && !s.leading && s.leader.as_ref().is_some_and(|l| *l != s.host);
        if following == self.decider.following() {
            return;
        }
        let reason = if following {
            format!(
                "cluster: failover decisions are the leader's ({})",
                s.leader.as_deref().unwrap_or_default()
            )
        } else {
            "cluster: this host makes its own failover decisions".to_owned()
        };
        info!("{reason}");
        self.event(None, None, None, &reason);
        let now = Instant::now();
        if let Some(s) = self.shared.as_mut() {
            if s.leading {
                s.overridden.clear();
            } else if following {
                // The hold on a stale record starts when this host follows again.
                for (_, _, since) in s.overridden.values_mut() {
                    *since = now;
                }
            }
        }
        let decisions = self.decider.set_following(following, now);
        self.apply_all(decisions);
    }

    /// What the cluster's task waits on to publish this host's encoders' health at once.
    pub fn health_changed(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.shared.as_ref().map(|s| s.health_changed.clone())
    }

    /// Leader: up to `limit` channels whose active encoder here (or whether it was placed by
    /// hand) differs from what etcd holds, to write there; they leave the outbox, the rest
    /// stay for the next call (a new leader of many channels writes them a slice at a time,
    /// between its keep-alives).
    pub fn take_outbox(&mut self, limit: usize) -> Vec<Placed> {
        let Some(s) = self.shared.as_mut() else {
            return Vec::new();
        };
        if !s.leading {
            return Vec::new();
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(ch) = s.outbox.pop_first() else {
                break;
            };
            let (Some(active), Some(manual)) = (self.decider.active(&ch), self.decider.manual(&ch))
            else {
                continue;
            };
            let written = s.actives.get(&ch).map(|r| (r.encoder.as_str(), r.manual));
            if written != Some((active, manual)) {
                out.push(Placed {
                    encoder: active.to_owned(),
                    channel: ch,
                    manual,
                });
            }
        }
        out
    }

    /// A decision carried out: the leader writes it to etcd; any other host that made it
    /// itself (not by the leader's choice) remembers the record it moved away from.
    pub(super) fn note_decided(&mut self, channel: &str, reason: Reason) {
        let Some(s) = self.shared.as_mut() else {
            return;
        };
        if s.leading {
            s.outbox.insert(channel.to_owned());
        } else if reason != Reason::Leader
            && let Some(rec) = s.actives.get(channel)
        {
            s.overridden.insert(
                channel.to_owned(),
                (rec.encoder.clone(), rec.term, Instant::now()),
            );
        }
    }

    /// How long a follower leaves a record it moved away from by itself (see
    /// `Shared::overridden`): two leases and a second, time for a new leader to be elected
    /// and write its own choices; after that the record is the leader's real choice.
    fn override_hold(&self) -> Duration {
        let lease = self
            .shared
            .as_ref()
            .and_then(|s| s.file.cluster.as_ref())
            .map_or(1, |c| c.lease_s);
        Duration::from_secs(2 * lease + 1)
    }

    /// Remaps and drains are the leader's in a cluster (a follower's would be overwritten by
    /// the leader's choice); while etcd is unreachable every host may remap locally. (A
    /// cluster host's drain is also written to etcd, so it is refused then: see the daemon's
    /// cluster writes.)
    pub(super) fn refuse_unless_leader(&self, what: &str) -> Result<()> {
        match &self.shared {
            Some(s) if s.etcd_up && !s.leading => Err(ControlError::Refused(format!(
                "{what} is the cluster leader's to do: this host ({}) is not it (leader: {})",
                s.host,
                s.leader.as_deref().unwrap_or("none now")
            ))),
            _ => Ok(()),
        }
    }

    /// The cluster as this host sees it, for `status`.
    pub fn cluster_view(&self) -> Option<api::ClusterView> {
        let s = self.shared.as_ref()?;
        Some(api::ClusterView {
            name: s
                .file
                .cluster
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            host: s.host.clone(),
            leader: s.leader.clone(),
            leading: s.leading,
            etcd: s.etcd_up,
            drained: self.delta.host_drained,
        })
    }
}
