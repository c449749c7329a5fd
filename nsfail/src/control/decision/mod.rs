//! The failover state machine, pure: no clock, no I/O. Callers pass the time in (`Instant`s
//! from a real or a fake clock) and apply the [`Decision`]s it returns to the data plane.
//!
//! Rules:
//! - an encoder that goes down moves every channel it is active for to the highest-priority
//!   healthy, undrained encoder of that channel, at once;
//! - with no such encoder the channel stays where it is and a critical decision (`to: None`)
//!   is returned, once per outage;
//! - failback (`auto` only) returns a channel to a better encoder only after that encoder has
//!   been healthy without interruption for the hold-down, and no sooner than a hold-down after
//!   the channel's last move: a flapping encoder cannot bounce a channel more than once per
//!   hold-down;
//! - a manual remap or drain always wins: it is applied as asked, and automatic failback
//!   leaves a manually placed channel alone until the next automatic failover; so does a
//!   cluster follower with a channel placed by its leader (failback is the leader's);
//! - a cluster follower (etcd reachable, a leader elected) makes no automatic move: it keeps
//!   the encoders' health and takes the leader's choices; once it decides again (it leads,
//!   etcd is lost, no host leads) it moves at once every channel its view says must move.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::config::Failback;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The active encoder went down.
    EncoderDown,
    /// The active encoder went down and no healthy backup exists: nothing moved.
    NoBackup,
    /// A channel without a healthy encoder got one back.
    Recovered,
    /// Automatic return to a better encoder after the hold-down.
    Failback,
    /// `nsfail remap`.
    Manual,
    /// `nsfail drain`.
    Drain,
    /// A cluster host follows the choice its leader wrote in etcd.
    Leader,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EncoderDown => "encoder down: failover",
            Self::NoBackup => "encoder down: no healthy backup (critical)",
            Self::Recovered => "encoder recovered: channel back on a healthy encoder",
            Self::Failback => "failback after hold-down",
            Self::Manual => "manual remap",
            Self::Drain => "drain",
            Self::Leader => "the cluster leader's choice",
        }
    }
}

/// A move of a channel (or, with `to: None`, a move that could not be made).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub channel: String,
    pub from: String,
    pub to: Option<String>,
    pub reason: Reason,
}

#[derive(Clone, Debug)]
pub struct ChannelPolicy {
    pub encoders: Vec<String>,
    pub failback: Failback,
    pub hold_down: Duration,
}

/// A name held once and shared by the maps and indexes that need it (a channel's name is in
/// up to four of them; an encoder's in every channel that lists it).
type Name = Arc<str>;

#[derive(Clone, Debug)]
struct ChannelState {
    /// Priority order; channels with the same list share it.
    encoders: Arc<[Name]>,
    failback: Failback,
    hold_down: Duration,
    active: Name,
    last_move: Option<Instant>,
    /// Placed by an operator: automatic failback leaves it alone.
    manual: bool,
    /// A `NoBackup` decision was returned for the current outage.
    stranded: bool,
}

#[derive(Clone, Copy, Debug)]
struct EncoderState {
    healthy: bool,
    /// When the current health state began.
    since: Instant,
}

/// Channel names by encoder, in name order (the order decisions come in).
type ByEncoder = HashMap<Name, BTreeSet<Name>>;

#[derive(Clone, Debug, Default)]
pub struct Decider {
    channels: BTreeMap<Name, ChannelState>,
    encoders: BTreeMap<String, EncoderState>,
    drained: BTreeSet<String>,
    /// Indexes, so that nothing walks every channel: the channels each encoder is active for,
    /// the channels that list each encoder, and the channels automatic failback may move
    /// (`auto`, not placed by hand, not on their first encoder).
    on: ByEncoder,
    members: ByEncoder,
    displaced: BTreeSet<Name>,
    /// Encoder names and encoder lists, each held once.
    names: HashSet<Name>,
    lists: HashSet<Arc<[Name]>>,
    /// A cluster follower: the leader decides; health is kept, nothing moves by itself.
    following: bool,
}

fn index(map: &mut ByEncoder, encoder: &Name, channel: &Name) {
    map.entry(encoder.clone())
        .or_default()
        .insert(channel.clone());
}

fn unindex(map: &mut ByEncoder, encoder: &str, channel: &str) {
    if let Some(set) = map.get_mut(encoder) {
        set.remove(channel);
        if set.is_empty() {
            map.remove(encoder);
        }
    }
}

impl Decider {
    pub fn new() -> Self {
        Self::default()
    }

    fn intern(&mut self, name: &str) -> Name {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Name = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    fn intern_list(&mut self, encoders: &[String]) -> Arc<[Name]> {
        let list: Vec<Name> = encoders.iter().map(|e| self.intern(e)).collect();
        if let Some(l) = self.lists.get(list.as_slice()) {
            return l.clone();
        }
        let l: Arc<[Name]> = Arc::from(list);
        self.lists.insert(l.clone());
        l
    }

    /// Adds or replaces a channel, currently on `active`.
    pub fn set_channel(&mut self, name: &str, policy: ChannelPolicy, active: &str) {
        let prev = self.take_channel(name);
        let name: Name = Arc::from(name);
        let encoders = self.intern_list(&policy.encoders);
        let active = self.intern(active);
        for e in encoders.iter() {
            index(&mut self.members, e, &name);
        }
        index(&mut self.on, &active, &name);
        let manual = prev
            .as_ref()
            .is_some_and(|p| p.manual && p.active == active);
        self.channels.insert(
            name.clone(),
            ChannelState {
                encoders,
                failback: policy.failback,
                hold_down: policy.hold_down,
                active,
                last_move: prev.as_ref().and_then(|p| p.last_move),
                manual,
                stranded: false,
            },
        );
        self.refresh_displaced(&name);
    }

    /// Removes a channel from the map and the indexes.
    fn take_channel(&mut self, name: &str) -> Option<ChannelState> {
        let st = self.channels.remove(name)?;
        for e in st.encoders.iter() {
            unindex(&mut self.members, e, name);
        }
        unindex(&mut self.on, &st.active, name);
        self.displaced.remove(name);
        Some(st)
    }

    /// Keeps the failback candidates in step with a channel's state.
    fn refresh_displaced(&mut self, name: &Name) {
        let candidate = self.channels.get(name).is_some_and(|st| {
            st.failback == Failback::Auto && !st.manual && st.encoders.first() != Some(&st.active)
        });
        if candidate {
            self.displaced.insert(name.clone());
        } else {
            self.displaced.remove(name);
        }
    }

    pub fn channel_names(&self) -> Vec<String> {
        self.channels.keys().map(|n| n.to_string()).collect()
    }

    pub fn remove_channel(&mut self, name: &str) {
        self.take_channel(name);
    }

    /// Adds an encoder (healthy until told otherwise) if unknown.
    pub fn add_encoder(&mut self, name: &str, now: Instant) {
        self.encoders
            .entry(name.to_owned())
            .or_insert(EncoderState {
                healthy: true,
                since: now,
            });
    }

    pub fn remove_encoder(&mut self, name: &str) {
        self.encoders.remove(name);
        self.drained.remove(name);
    }

    pub fn healthy(&self, encoder: &str) -> bool {
        self.encoders.get(encoder).is_some_and(|e| e.healthy)
    }

    /// Whether the channel's placement was manual (a remap or drain, or a leader's choice
    /// followed): automatic failback leaves it alone.
    pub fn manual(&self, channel: &str) -> Option<bool> {
        self.channels.get(channel).map(|st| st.manual)
    }

    /// A host that takes the lead adopts, for a channel it had followed, whether the leader
    /// before it placed the channel by hand, so that failback goes on as it would have.
    pub fn set_manual(&mut self, channel: &str, manual: bool) {
        let Some((name, _)) = self.channels.get_key_value(channel) else {
            return;
        };
        let name = name.clone();
        if let Some(st) = self.channels.get_mut(&name) {
            st.manual = manual;
        }
        self.refresh_displaced(&name);
    }

    /// A cluster follower's decisions are its leader's (`true`), or this host decides again
    /// (`false`: it leads, etcd is lost, or no host leads). Deciding again returns the moves
    /// this host's view calls for now: every channel on an encoder that is down or drained
    /// moves to its best usable one (or is reported stranded); failback follows from
    /// [`Decider::tick`].
    pub fn set_following(&mut self, following: bool, now: Instant) -> Vec<Decision> {
        let was = std::mem::replace(&mut self.following, following);
        if following || !was {
            return Vec::new();
        }
        self.move_off(|d, e| !d.usable(e), false, now)
    }

    /// A follower's safeguard: the channels on an encoder this host has seen down for
    /// `grace` or longer, which its leader has not moved (a leader frozen but not yet
    /// expired, or one whose choice this host cannot take), fail over here as a deciding
    /// host's would. Nothing for a host that decides (it moved them when the encoder fell).
    pub fn overdue(&mut self, now: Instant, grace: Duration) -> Vec<Decision> {
        if !self.following {
            return Vec::new();
        }
        self.move_off(
            |d, e| {
                d.encoders
                    .get(e)
                    .is_some_and(|s| !s.healthy && s.since + grace <= now)
            },
            true,
            now,
        )
    }

    /// Moves every channel active on an encoder that `leave` picks (in name order) to its
    /// best usable encoder: off a down one as a failover (stranded, and reported once, when
    /// none is left), off a drained one that still works as a drain (it stays when there is
    /// nowhere to go). With `skip_stranded`, channels already reported stranded are left
    /// alone (nowhere to go until an encoder of theirs recovers, which unstrands them).
    fn move_off(
        &mut self,
        leave: impl Fn(&Self, &str) -> bool,
        skip_stranded: bool,
        now: Instant,
    ) -> Vec<Decision> {
        let mut encoders: Vec<Name> = self.on.keys().filter(|e| leave(self, e)).cloned().collect();
        encoders.sort();
        let mut out = Vec::new();
        for encoder in encoders {
            let names: Vec<Name> = self
                .on
                .get(&encoder)
                .map(|set| set.iter().cloned().collect())
                .unwrap_or_default();
            let reason = if self.healthy(&encoder) {
                Reason::Drain
            } else {
                Reason::EncoderDown
            };
            for name in names {
                let st = &self.channels[&name];
                if skip_stranded && st.stranded {
                    continue;
                }
                match self.best(&st.encoders, Some(&encoder)) {
                    Some(to) => out.push(self.apply(&name, &to, reason, now)),
                    // A drained encoder that still works keeps what has nowhere else to go.
                    None if reason == Reason::Drain => {}
                    None => out.extend(self.strand(&name)),
                }
            }
        }
        out
    }

    pub fn following(&self) -> bool {
        self.following
    }

    /// The `NoBackup` decision for a channel left on an unusable encoder, once per outage.
    fn strand(&mut self, name: &Name) -> Option<Decision> {
        let st = self.channels.get_mut(name).expect("known channel");
        if st.stranded {
            return None;
        }
        st.stranded = true;
        Some(Decision {
            channel: name.to_string(),
            from: st.active.to_string(),
            to: None,
            reason: Reason::NoBackup,
        })
    }

    pub fn active(&self, channel: &str) -> Option<&str> {
        self.channels.get(channel).map(|c| &*c.active)
    }

    pub fn drained(&self, encoder: &str) -> bool {
        self.drained.contains(encoder)
    }

    fn usable(&self, encoder: &str) -> bool {
        self.healthy(encoder) && !self.drained.contains(encoder)
    }

    /// The highest-priority usable encoder of a channel, other than `except`.
    fn best(&self, encoders: &[Name], except: Option<&str>) -> Option<Name> {
        encoders
            .iter()
            .find(|e| Some(&***e) != except && self.usable(e))
            .cloned()
    }

    fn apply(&mut self, channel: &Name, to: &str, reason: Reason, now: Instant) -> Decision {
        let to = self.intern(to);
        let st = self.channels.get_mut(channel).expect("known channel");
        let from = std::mem::replace(&mut st.active, to.clone());
        st.last_move = Some(now);
        // A cluster follower leaves failback to its leader, whose choices it follows: its own
        // failback would undo a leader's manual remap, and the leader's choice would move it
        // back a second later.
        st.manual = matches!(reason, Reason::Manual | Reason::Drain | Reason::Leader);
        st.stranded = false;
        unindex(&mut self.on, &from, channel);
        index(&mut self.on, &to, channel);
        self.refresh_displaced(channel);
        Decision {
            channel: channel.to_string(),
            from: from.to_string(),
            to: Some(to.to_string()),
            reason,
        }
    }

    /// A health transition (from the rise/fall counters, or the flow check).
    pub fn set_health(&mut self, encoder: &str, healthy: bool, now: Instant) -> Vec<Decision> {
        let Some(e) = self.encoders.get_mut(encoder) else {
            return Vec::new();
        };
        if e.healthy == healthy {
            return Vec::new();
        }
        *e = EncoderState {
            healthy,
            since: now,
        };
        if healthy {
            // Channels stranded on it are whole again (their next outage is reported anew),
            // and those stranded elsewhere that list it have somewhere to go again.
            for name in self.members.get(encoder).into_iter().flatten() {
                if let Some(st) = self.channels.get_mut(name) {
                    st.stranded = false;
                }
            }
        }
        if self.following {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Down: the channels on it; up: the channels that list it (stuck ones among them).
        let index = if healthy { &self.members } else { &self.on };
        let names: Vec<Name> = index
            .get(encoder)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let st = &self.channels[&name];
            if !healthy && &*st.active == encoder {
                match self.best(&st.encoders, Some(encoder)) {
                    Some(to) => out.push(self.apply(&name, &to, Reason::EncoderDown, now)),
                    None => out.extend(self.strand(&name)),
                }
            } else if healthy
                && !self.healthy(&st.active)
                && st.encoders.iter().any(|x| &**x == encoder)
            {
                // A channel stuck on a dead encoder takes the first one that comes back.
                if let Some(to) = self.best(&st.encoders, None) {
                    out.push(self.apply(&name, &to, Reason::Recovered, now));
                }
            }
        }
        out
    }

    /// Time passes: automatic failback where its conditions hold.
    pub fn tick(&mut self, now: Instant) -> Vec<Decision> {
        let mut out = Vec::new();
        // Only channels off their first encoder can move up; a follower's failback is its
        // leader's.
        if self.displaced.is_empty() || self.following {
            return out;
        }
        let names: Vec<Name> = self.displaced.iter().cloned().collect();
        for name in names {
            let st = &self.channels[&name];
            if st.failback != Failback::Auto || st.manual {
                continue;
            }
            let Some(best) = self.best(&st.encoders, None) else {
                continue;
            };
            if best == st.active {
                continue;
            }
            let hold = st.hold_down;
            let stable = self.encoders[&*best].since + hold <= now;
            let rested = st.last_move.is_none_or(|t| t + hold <= now);
            // Failback only moves up the priority list, never sideways.
            let rank = |e: &str| st.encoders.iter().position(|x| &**x == e);
            if stable && rested && rank(&best) < rank(&st.active) {
                out.push(self.apply(&name, &best, Reason::Failback, now));
            }
        }
        out
    }

    /// `nsfail remap`: always applied (the caller has checked the encoder belongs to the
    /// channel and is not drained).
    pub fn remap(&mut self, channel: &str, encoder: &str, now: Instant) -> Option<Decision> {
        let (name, _) = self.channels.get_key_value(channel)?;
        let name = name.clone();
        Some(self.apply(&name, encoder, Reason::Manual, now))
    }

    /// A cluster follower takes the encoder its leader chose for `channel`.
    pub fn follow(&mut self, channel: &str, encoder: &str, now: Instant) -> Option<Decision> {
        let (name, _) = self.channels.get_key_value(channel)?;
        let name = name.clone();
        Some(self.apply(&name, encoder, Reason::Leader, now))
    }

    /// The moves a drain of `encoder` needs, or the first channel it would strand. Nothing
    /// changes until [`Decider::drain`].
    pub fn plan_drain(&self, encoder: &str) -> Result<Vec<(String, String)>, String> {
        self.plan(encoder)
            .map(|moves| {
                moves
                    .into_iter()
                    .map(|(c, e)| (c.to_string(), e.to_string()))
                    .collect()
            })
            .map_err(|c| c.to_string())
    }

    fn plan(&self, encoder: &str) -> Result<Vec<(Name, Name)>, Name> {
        let mut moves = Vec::new();
        for name in self.on.get(encoder).into_iter().flatten() {
            let st = &self.channels[name];
            match self.best(&st.encoders, Some(encoder)) {
                Some(to) => moves.push((name.clone(), to)),
                None => return Err(name.clone()),
            }
        }
        Ok(moves)
    }

    /// Drains `encoder`: its channels move to their best usable encoders, or nothing changes
    /// when one would be stranded. A follower checks the same, and only marks it drained:
    /// its leader moves the channels.
    pub fn drain(&mut self, encoder: &str, now: Instant) -> Result<Vec<Decision>, String> {
        let moves = self.plan(encoder).map_err(|c| c.to_string())?;
        if self.following {
            self.drained.insert(encoder.to_owned());
            return Ok(Vec::new());
        }
        self.drained.insert(encoder.to_owned());
        Ok(moves
            .into_iter()
            .map(|(ch, to)| self.apply(&ch, &to, Reason::Drain, now))
            .collect())
    }

    pub fn undrain(&mut self, encoder: &str) -> bool {
        self.drained.remove(encoder)
    }

    /// Marks a drained encoder at start-up (from persisted state), without moving anything.
    pub fn restore_drained(&mut self, encoder: &str) {
        self.drained.insert(encoder.to_owned());
    }

    /// Whether `encoder` is active for any channel.
    pub fn is_active(&self, encoder: &str) -> bool {
        self.on.get(encoder).is_some_and(|set| !set.is_empty())
    }

    /// Channels whose active encoder is `encoder`, in name order.
    pub fn channels_on(&self, encoder: &str) -> Vec<String> {
        self.on
            .get(encoder)
            .map(|set| set.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    /// How many channels automatic failback may move (what [`Decider::tick`] looks at).
    pub fn displaced(&self) -> usize {
        self.displaced.len()
    }

    /// The first channel (by name) that lists `encoder`, if any.
    pub fn listed_by(&self, encoder: &str) -> Option<&str> {
        self.members
            .get(encoder)
            .and_then(|set| set.first())
            .map(|n| &**n)
    }
}

#[cfg(test)]
mod tests;
