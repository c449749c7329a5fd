//! The cluster's shared state as this host's controller holds it (issue 17): the channels
//! and the other hosts' encoders read from etcd. The effective configuration is composed
//! from the config file (ingest, this host's own encoders) and this state, and every change
//! read from etcd is applied by the reload's code ([`Controller::reload_with`]), the same
//! path as a SIGHUP: validated whole, applied object by object, undone on failure.
//!
//! Leadership (following the leader's choices, writing this host's as leader) is in
//! `leadership`.
//!
//! What cannot be applied is reported and skipped, never applied: a foreign or corrupt key,
//! a channel that is not valid with the others (an encoder nobody registered, a taken
//! ingest address), another host's encoder whose name is one of this host's.

use std::sync::Arc;

use super::{reload::Step, *};
use crate::cluster::{ActiveRecord, CallerRecord, Change, EncoderRecord, HostRecord};

/// What this host knows of the cluster.
#[derive(Debug)]
pub struct Shared {
    /// This host's name.
    pub(super) host: String,
    /// The config file as last read: ingest, this host's encoders, `[cluster]`.
    pub(super) file: Config,
    pub(super) channels: BTreeMap<String, config::Channel>,
    /// The revision each channel's key was created at (see [`Change::PutChannel`]).
    created: BTreeMap<String, i64>,
    hosts: BTreeMap<String, HostRecord>,
    /// Other hosts' encoders, by name; kept when their host's lease expires (down, not
    /// gone), so that the channels naming them stay valid.
    remote: BTreeMap<String, Remote>,
    /// What the last composition skipped, and why (reported once per change of reason).
    skipped: BTreeMap<String, String>,
    /// Encoders drained cluster-wide (`drains/`).
    pub(super) drains: BTreeSet<String>,
    /// The drains etcd held at the last [`Controller::sync_drains`]: an encoder that leaves
    /// this set is undrained here. (A drain this host holds that etcd never did, one from
    /// before drains were the cluster's, is kept and reported, not undone.)
    pub(super) synced_drains: BTreeSet<String>,
    /// Drains that could not be made here, and why (reported once per reason, tried again
    /// at the next change).
    pub(super) drain_failed: BTreeMap<String, String>,
    /// SRT callers other hosts published, by (channel, host, caller), with when their key
    /// went (`None`: still in etcd). A key that went is kept for [`CALLER_GRACE`]: a host
    /// that froze loses its keys with its lease, in the same breath as its encoders, and
    /// the repoint that follows must still tell its callers.
    pub(super) callers: BTreeMap<(String, String, SocketAddr), (CallerRecord, Option<Instant>)>,
    /// Each channel's active encoder as the leader wrote it.
    pub(super) actives: BTreeMap<String, ActiveRecord>,
    /// Whether this host is the leader (elected, and etcd reachable).
    pub(super) leading: bool,
    /// The leader as the election last said (`None`: none, or etcd unreachable).
    pub(super) leader: Option<String>,
    /// Whether this host is connected to etcd now.
    pub(super) etcd_up: bool,
    /// Leader: channels whose active encoder may differ from what etcd holds.
    pub(super) outbox: BTreeSet<String>,
    /// When a follower last compared all its channels with the leader's choices.
    pub(super) followed_at: Option<Instant>,
    /// The leader's records (encoder, term) this host moved channels away from by its own
    /// decision (without etcd, with no leader, or past a follower's grace), and since when
    /// (the later of the move and the start of following): not taken again, so that a stale
    /// choice (a frozen leader's, or one read back after an etcd outage) does not pull a
    /// stream back, until the leader writes another or [`Controller::override_hold`] passes.
    pub(super) overridden: BTreeMap<String, (String, i64, Instant)>,
    /// Woken when a local encoder's health changes, for the cluster's task to publish it
    /// without waiting for its next round.
    pub(super) health_changed: Arc<tokio::sync::Notify>,
    /// When applying what etcd holds last failed, and why (retried by the periodic work).
    failed: Option<(Instant, String)>,
    /// Per other host's encoder: why it is not routed (reached at its host's MAC instead),
    /// as last reported.
    pub(super) unrouted: BTreeMap<String, String>,
    /// Per routed encoder: why its next hop could not be resolved again (it forwards on the
    /// last one), as reported.
    pub(super) stale_routes: BTreeMap<String, String>,
    /// Per (channel, local encoder): why its transit entry could not be set, as reported.
    pub(super) transit_failed: BTreeMap<(String, String), String>,
    /// When the routed encoders' next hops were last resolved again.
    pub(super) routes_at: Option<Instant>,
    /// When the announced routes were last synced, and why the last sync failed.
    pub(super) announced_at: Option<Instant>,
    pub(super) announce_failed: Option<String>,
}

/// How long a published SRT caller whose key went is still told of repoints: longer than
/// libsrt's ~5 s peer-idle timeout, after which the caller reconnects by itself.
pub(super) const CALLER_GRACE: Duration = Duration::from_secs(10);

/// How often a failed application of etcd's state is tried again.
const RETRY_SHARED: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq)]
struct Remote {
    record: EncoderRecord,
    /// Whether its record is in etcd (under its host's live lease).
    registered: bool,
}

impl Remote {
    fn usable(&self) -> bool {
        self.registered && self.record.healthy && !self.record.drained
    }
}

/// What applying a batch of changes did, for the daemon's log.
#[derive(Clone, Debug, Default)]
pub struct SharedReport {
    /// What the reload's code changed.
    pub changes: Vec<String>,
    /// Keys or objects skipped, each with its reason.
    pub skipped: Vec<String>,
}

impl Shared {
    pub fn new(host: String, file: Config) -> Self {
        Self {
            host,
            file,
            channels: BTreeMap::new(),
            created: BTreeMap::new(),
            hosts: BTreeMap::new(),
            remote: BTreeMap::new(),
            skipped: BTreeMap::new(),
            drains: BTreeSet::new(),
            synced_drains: BTreeSet::new(),
            drain_failed: BTreeMap::new(),
            callers: BTreeMap::new(),
            actives: BTreeMap::new(),
            leading: false,
            leader: None,
            etcd_up: true,
            outbox: BTreeSet::new(),
            followed_at: None,
            overridden: BTreeMap::new(),
            health_changed: Arc::default(),
            failed: None,
            unrouted: BTreeMap::new(),
            stale_routes: BTreeMap::new(),
            transit_failed: BTreeMap::new(),
            routes_at: None,
            announced_at: None,
            announce_failed: None,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `encoder` is another host's (its health comes from etcd, not from a probe).
    /// An encoder of this host's file is its own, whatever another host claims.
    pub fn is_remote(&self, encoder: &str) -> bool {
        self.remote.contains_key(encoder) && self.file.encoder(encoder).is_none()
    }

    /// The host of a remote encoder.
    pub fn host_of(&self, encoder: &str) -> Option<&str> {
        self.remote
            .get(encoder)
            .filter(|_| self.is_remote(encoder))
            .map(|r| r.record.host.as_str())
    }

    /// The SRT callers of `channel` that other hosts published (or did until less than
    /// [`CALLER_GRACE`] ago), for the leader to tell of a repoint: (caller, socket ID).
    pub(super) fn published_callers(&self, channel: &str) -> Vec<(SocketAddr, u32)> {
        let now = Instant::now();
        self.callers
            .iter()
            .filter(|((ch, _, _), (_, gone))| {
                ch == channel && gone.is_none_or(|t| now - t < CALLER_GRACE)
            })
            .map(|((_, _, caller), (rec, _))| (*caller, rec.socket_id))
            .collect()
    }

    /// Records `changes`: see [`Recorded`].
    fn record(&mut self, changes: Vec<Change>) -> Recorded {
        let mut bad = Vec::new();
        let mut recompose = false;
        let mut touched = BTreeSet::new();
        let mut added = Vec::new();
        for change in changes {
            match change {
                Change::PutChannel {
                    channel: ch,
                    revision,
                } => {
                    match self.channels.get(&ch.name) {
                        None => added.push(ch.name.clone()),
                        Some(old) => recompose |= *old != ch,
                    }
                    touched.insert(ch.name.clone());
                    self.created.insert(ch.name.clone(), revision);
                    self.channels.insert(ch.name.clone(), ch);
                }
                Change::PutActive { channel, record } => {
                    touched.insert(channel.clone());
                    self.actives.insert(channel, record);
                }
                Change::DeleteActive(channel) => {
                    self.actives.remove(&channel);
                }
                Change::PutDrain { encoder, .. } => {
                    self.drains.insert(encoder);
                }
                Change::DeleteDrain(encoder) => {
                    self.drains.remove(&encoder);
                }
                Change::Election => {}
                Change::PutCaller {
                    channel,
                    host,
                    caller,
                    record,
                } => {
                    if host != self.host {
                        self.callers.insert((channel, host, caller), (record, None));
                    }
                }
                Change::DeleteCaller {
                    channel,
                    host,
                    caller,
                } => {
                    let now = Instant::now();
                    self.callers
                        .retain(|_, (_, gone)| gone.is_none_or(|t| now - t < CALLER_GRACE));
                    if let Some((_, gone)) = self.callers.get_mut(&(channel, host, caller)) {
                        gone.get_or_insert(now);
                    }
                }
                Change::DeleteChannel(name) => {
                    self.created.remove(&name);
                    recompose |= self.channels.remove(&name).is_some();
                }
                Change::PutHost(rec) => {
                    if rec.host != self.host {
                        let mac = self.hosts.get(&rec.host).map(|h| h.mac.clone());
                        recompose |= mac.as_ref() != Some(&rec.mac);
                        self.hosts.insert(rec.host.clone(), rec);
                    }
                }
                Change::DeleteHost(host) => {
                    // Its encoders' keys go with the same lease and say so themselves; the
                    // MAC stays known for when the host comes back.
                    if host != self.host {
                        debug!("cluster host {host} is down");
                    }
                }
                Change::PutEncoder(rec) => {
                    if rec.host == self.host {
                        continue;
                    }
                    let before = self.remote.get(&rec.definition.name);
                    recompose |= before.is_none_or(|r| r.record.definition != rec.definition);
                    if let Some(r) = before
                        && r.record.host != rec.host
                    {
                        bad.push(format!(
                            "encoder {} registered by host {} and by host {}: the later one \
                             is used",
                            rec.definition.name, r.record.host, rec.host
                        ));
                    }
                    self.remote.insert(
                        rec.definition.name.clone(),
                        Remote {
                            record: rec,
                            registered: true,
                        },
                    );
                }
                Change::DeleteEncoder { host, encoder } => {
                    if let Some(r) = self.remote.get_mut(&encoder)
                        && r.record.host == host
                    {
                        r.registered = false;
                    }
                }
                Change::Bad { key, why } => bad.push(format!("{key}: {why}")),
            }
        }
        // A channel added and changed or removed again in the same batch is for the whole
        // composition, which covers it.
        added.retain(|name| self.channels.contains_key(name));
        added.dedup();
        Recorded {
            bad,
            recompose,
            touched,
            added,
        }
    }

    /// The effective configuration's base: the file's ingest and own encoders, the other
    /// hosts' encoders (as remote encoders reached through the ingest interface at their
    /// host's MAC) and the cluster's channels, each checked against what is already in; what
    /// does not fit is left out, with its reason in `self.skipped`.
    ///
    /// Bad input never displaces a running stream. The channels `running` here go first:
    /// those etcd holds unchanged, then those whose definition changed (a new definition
    /// that does not fit leaves the running one in place, reported). The channels not
    /// running here come last, oldest first (the revision etcd created each key at, which a
    /// change keeps; then the name): of two that collide, the one created later is left out,
    /// whatever their names, and a host with neither running (a restarted one) makes the
    /// same choice.
    fn compose(&mut self, running: &[config::Channel]) -> Config {
        let mut cfg = Config {
            channels: Vec::new(),
            ..self.file.clone()
        };
        let mut skipped = BTreeMap::new();
        let mut lookup = cfg.lookup();
        for (name, r) in &self.remote {
            let what = format!("encoder {name} of host {}", r.record.host);
            if lookup.encoder(name).is_some() {
                skipped.insert(
                    what,
                    format!("this host ({}) has an encoder of that name", self.host),
                );
                continue;
            }
            let Some(host) = self.hosts.get(&r.record.host) else {
                skipped.insert(what, "its host has never registered".into());
                continue;
            };
            let remote = config::Encoder {
                interface: None,
                netns: None,
                mac: Some(host.mac.clone()),
                spawn: None,
                restart: config::Restart::default(),
                env: BTreeMap::new(),
                prefix: None,
                ..r.record.definition.clone()
            };
            let mut candidate = Config {
                channels: Vec::new(),
                ..cfg.clone()
            };
            candidate.encoders.push(remote.clone());
            match candidate.validate() {
                Ok(()) => cfg.push_encoder(&mut lookup, remote),
                Err(e) => {
                    skipped.insert(what, e.to_string());
                }
            }
        }
        let running: BTreeMap<&str, &config::Channel> =
            running.iter().map(|c| (c.name.as_str(), c)).collect();
        let created = |c: &config::Channel| self.created.get(&c.name).copied().unwrap_or(0);
        // (pass, creation, name): unchanged running channels, changed running ones, the rest.
        let mut unchanged = Vec::new();
        let mut changed = Vec::new();
        let mut rest = Vec::new();
        for c in self.channels.values() {
            match running.get(c.name.as_str()) {
                Some(r) if *r == c => unchanged.push(c),
                Some(r) => changed.push((c, *r)),
                None => rest.push(c),
            }
        }
        // Stable: of equal revisions (none known), name order.
        unchanged.sort_by_cached_key(|c| created(c));
        changed.sort_by_cached_key(|(c, _)| created(c));
        rest.sort_by_cached_key(|c| created(c));
        let push = |cfg: &mut Config, lookup: &mut config::Lookup, ch: &config::Channel| {
            cfg.check_new_channel(lookup, ch)
                .map(|()| cfg.push_channel(lookup, ch.clone()))
                .map_err(|e| e.to_string())
        };
        for ch in unchanged {
            if let Err(e) = push(&mut cfg, &mut lookup, ch) {
                skipped.insert(format!("channel {}", ch.name), e);
            }
        }
        // Changed running channels: a new definition that does not fit leaves the running
        // one, which goes before the other changes, and the changes are tried again, until
        // no new definition fails (so that no change takes the address of a running channel
        // whose own change failed). At most one round per changed channel.
        let mut kept: BTreeMap<&str, String> = BTreeMap::new();
        while !changed.is_empty() {
            let (mut c, mut l) = (cfg.clone(), lookup.clone());
            let mut failed = None;
            let mut round = BTreeMap::new();
            for (ch, r) in &changed {
                if let Some(why) = kept.get(ch.name.as_str()) {
                    let outcome = match push(&mut c, &mut l, r) {
                        Ok(()) => format!(
                            "its new definition in etcd is not applied ({why}); its running \
                             definition stays until the new one fits"
                        ),
                        Err(e) => e,
                    };
                    round.insert(format!("channel {}", ch.name), outcome);
                }
            }
            for (ch, _) in &changed {
                if kept.contains_key(ch.name.as_str()) {
                    continue;
                }
                if let Err(e) = push(&mut c, &mut l, ch) {
                    failed = Some((ch.name.as_str(), e));
                    break;
                }
            }
            match failed {
                Some((name, why)) => {
                    kept.insert(name, why);
                }
                None => {
                    (cfg, lookup) = (c, l);
                    skipped.extend(round);
                    break;
                }
            }
        }
        for ch in rest {
            if let Err(e) = push(&mut cfg, &mut lookup, ch) {
                skipped.insert(format!("channel {}", ch.name), e);
            }
        }
        self.skipped = skipped;
        cfg
    }
}

/// What [`Shared::record`] made of a batch of changes.
#[derive(Debug)]
struct Recorded {
    /// The keys skipped as bad, each with its reason.
    bad: Vec<String>,
    /// Whether the composed configuration may differ other than by `added`: a channel
    /// changed or removed, an encoder definition or a host's MAC changed.
    recompose: bool,
    /// The channels whose definition or active encoder changed.
    touched: BTreeSet<String>,
    /// The channels this host did not know before (a channel put into etcd).
    added: Vec<String>,
}

/// A cluster host's file lists channels: they are not used (said, not silently dropped).
fn unused_channels(file: &Config) -> Option<String> {
    (!file.channels.is_empty()).then(|| {
        format!(
            "cluster: the config file's {} channels are not used by this host: a cluster's \
             channels live in etcd (nsfail apply --config FILE writes them there)",
            file.channels.len()
        )
    })
}

impl Controller {
    /// Starts the controller of a cluster host: the effective configuration is composed from
    /// `file` and what was read from etcd (`changes`, a whole snapshot of the prefix).
    pub fn start_clustered(
        file: Config,
        host: String,
        changes: Vec<Change>,
        config_path: &Path,
        dp: Dataplane,
    ) -> Result<(Self, SharedReport)> {
        let unused = unused_channels(&file);
        let mut shared = Shared::new(host, file);
        let bad = shared.record(changes).bad;
        let composed = shared.compose(&[]);
        let all: BTreeSet<String> = shared.channels.keys().cloned().collect();
        let mut c = Self::start_with(composed, config_path, dp, Some(shared))?;
        let mut report = SharedReport::default();
        if let Some(reason) = unused {
            warn!("{reason}");
            c.event(None, None, None, &reason);
        }
        let shared = c.shared.take().expect("started with it");
        c.report_skipped(bad, &shared, &mut report);
        c.shared = Some(shared);
        c.sync_remote_health()?;
        c.sync_transits();
        c.sync_announce();
        c.sync_drains();
        c.follow(&all);
        c.generation += 1;
        Ok((c, report))
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// Applies changes read from etcd: definitions through the reload's code, other hosts'
    /// encoders' health through [`Controller::on_health`]. With `resync`, `changes` is a
    /// whole new snapshot (after etcd was lost): what it does not name is gone.
    pub fn apply_shared(&mut self, changes: Vec<Change>, resync: bool) -> Result<SharedReport> {
        let mut report = SharedReport::default();
        let Some(mut shared) = self.shared.take() else {
            return Err(ControlError::Refused(
                "this host is not in a cluster".into(),
            ));
        };
        if resync {
            shared.channels.clear();
            shared.created.clear();
            shared.actives.clear();
            shared.drains.clear();
            for r in shared.remote.values_mut() {
                r.registered = false;
            }
            // Callers the snapshot does not hold again count as gone from now.
            let now = Instant::now();
            for (_, gone) in shared.callers.values_mut() {
                gone.get_or_insert(now);
            }
        }
        let Recorded {
            bad,
            recompose,
            mut touched,
            added,
        } = shared.record(changes);
        if resync {
            touched = shared.channels.keys().cloned().collect();
        }
        let retrying = shared.failed.is_some();
        self.shared = Some(shared);
        let result = if recompose || resync || retrying {
            self.recompose()
        } else if !added.is_empty() {
            self.add_shared_channels(&added)
        } else {
            Ok(Vec::new())
        };
        let shared = self.shared.take().expect("put back above");
        self.report_skipped(bad, &shared, &mut report);
        self.shared = Some(shared);
        // Drains hold whatever became of the composition (a failed one is retried).
        self.sync_drains();
        report.changes = result?;
        self.sync_remote_health()?;
        self.follow(&touched);
        if let Some(s) = self.shared.as_mut()
            && s.leading
        {
            s.outbox.extend(touched);
        }
        Ok(report)
    }

    /// Applies the composition of the file and what etcd holds through the reload's code. A
    /// failure (a map write the kernel refused, say) is reported once per reason and retried
    /// every [`RETRY_SHARED`] by the periodic work until it succeeds: what etcd holds is not
    /// given up because one attempt failed.
    fn recompose(&mut self) -> Result<Vec<String>> {
        let Some(shared) = self.shared.as_mut() else {
            return Ok(Vec::new());
        };
        let composed = shared.compose(&self.effective.channels);
        let result = self.reload_from(composed, "cluster").map(|r| r.changes);
        let Some(shared) = self.shared.as_mut() else {
            return result;
        };
        match &result {
            Ok(_) => {
                let recovered = shared.failed.take().is_some();
                self.sync_transits();
                self.sync_announce();
                if recovered {
                    let reason = "cluster: etcd's state applied after failed attempts";
                    info!("{reason}");
                    self.event(None, None, None, reason);
                }
            }
            Err(e) => {
                let why = e.to_string();
                self.shared_failed(why);
            }
        }
        result
    }

    /// Makes this host's drains those etcd holds (`drains/`): an encoder drained there is
    /// drained here (its channels moved off it, as `drain` moves them), one undrained there
    /// is undrained here. A drain that would leave a channel here without a healthy encoder
    /// (this host sees other health than the leader did) is reported once per reason and
    /// tried again at the next change.
    pub(super) fn sync_drains(&mut self) {
        let Some(wanted) = self.shared.as_ref().map(|s| s.drains.clone()) else {
            return;
        };
        let mut failed = BTreeMap::new();
        for encoder in &wanted {
            if !self.has_encoder(encoder) || self.decider.drained(encoder) {
                continue;
            }
            if let Err(e) = self.drain_here(encoder) {
                failed.insert(encoder.clone(), e.to_string());
            }
        }
        let Some(s) = self.shared.as_mut() else {
            return;
        };
        let undrained: Vec<String> = s.synced_drains.difference(&wanted).cloned().collect();
        s.synced_drains = wanted.clone();
        for encoder in undrained {
            if self.has_encoder(&encoder)
                && let Err(e) = self.undrain(&encoder)
            {
                warn!("cluster: undraining {encoder}: {e}");
            }
        }
        let local_only: Vec<String> = self
            .delta
            .drained
            .iter()
            .filter(|e| !wanted.contains(*e) && self.has_encoder(e))
            .cloned()
            .collect();
        for encoder in local_only {
            failed.insert(
                encoder.clone(),
                format!(
                    "encoder {encoder:?} is drained on this host only, not in etcd (a drain \
                     from before drains were the cluster's): `nsfail drain {encoder}` on the \
                     leader makes it the cluster's, `nsfail undrain {encoder}` ends it"
                ),
            );
        }
        let Some(s) = self.shared.as_mut() else {
            return;
        };
        for (encoder, why) in newly_failed(&mut s.drain_failed, failed) {
            let reason = format!("cluster: drain differs from etcd's (critical): {why}");
            warn!("encoder {encoder}: {reason}");
            self.event(None, Some(encoder), None, &reason);
        }
    }

    /// Whether `drain` may be written to etcd for `encoder`: on the leader only, for an
    /// encoder this host knows, when no channel would be left without a healthy encoder.
    pub fn check_drain(&self, encoder: &str) -> Result<(), String> {
        self.refuse_unless_leader("drain")
            .map_err(|e| e.to_string())?;
        if !self.has_encoder(encoder) {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()).to_string());
        }
        self.decider
            .plan_drain(encoder)
            .map(|_| ())
            .map_err(|channel| would_strand(encoder, &channel).to_string())
    }

    /// Whether `encoder` is drained here, or why a drain etcd holds could not be made.
    pub fn drain_state(&self, encoder: &str) -> Result<(), String> {
        if self.decider.drained(encoder) {
            return Ok(());
        }
        Err(self
            .shared
            .as_ref()
            .and_then(|s| s.drain_failed.get(encoder).cloned())
            .unwrap_or_else(|| format!("encoder {encoder:?} is not drained on this host")))
    }

    /// Records that applying etcd's state failed, for [`Controller::retry_shared`] to compose
    /// it whole again; reported once per reason.
    fn shared_failed(&mut self, why: String) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        let again = shared.failed.as_ref().is_some_and(|(_, w)| *w == why);
        shared.failed = Some((Instant::now(), why.clone()));
        if !again {
            let reason =
                format!("cluster: applying etcd's state failed (critical), retrying: {why}");
            warn!("{reason}");
            self.event(None, None, None, &reason);
        }
    }

    /// Channels new to this host, and nothing else that changes the composition (a channel
    /// put into etcd): each checked against the effective configuration and added on its own,
    /// as `add channel` adds one. The whole composition again (what [`Controller::recompose`]
    /// does) is linear in the channels: 35 ms of CPU for one channel put at 10,000, on every
    /// host. The outcome is the same: a channel that does not fit is skipped with its reason
    /// (and reconsidered at the next whole composition, when what it collided with may be
    /// gone); a map write that fails is retried by a whole composition.
    fn add_shared_channels(&mut self, names: &[String]) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        for name in names {
            let Some(ch) = self
                .shared
                .as_ref()
                .and_then(|s| s.channels.get(name))
                .cloned()
            else {
                continue;
            };
            let present = self
                .lookup
                .channel(&self.effective.channels, name)
                .is_some();
            let runtime = self.delta.removed_channels.contains(name)
                || self.delta.added_channels.iter().any(|c| c.name == *name);
            if present || runtime {
                // Not new here after all (or a runtime change names it): the whole
                // composition decides.
                return self.recompose().map(|more| [changes, more].concat());
            }
            if let Err(e) = self.effective.check_new_channel(&self.lookup, &ch) {
                if let Some(s) = self.shared.as_mut() {
                    s.skipped.insert(format!("channel {name}"), e.to_string());
                }
                continue;
            }
            if let Err(e) = self.program_new_channel(&ch) {
                self.shared_failed(format!("channel {name}: {e}"));
                if !changes.is_empty() {
                    self.sync_transits();
                    self.changed();
                }
                return Err(e);
            }
            let new_address = !self
                .effective
                .channels
                .iter()
                .any(|c| c.listen.ip() == ch.listen.ip());
            self.loaded.insert_channel(&ch);
            let step = Step::PutChannel {
                channel: ch.clone(),
                new: true,
            };
            self.effective.push_channel(&mut self.lookup, ch);
            self.step_event(&step, "cluster");
            changes.push(step.describe());
            if new_address {
                self.sync_announce();
            }
        }
        if !changes.is_empty() {
            self.sync_transits();
            self.changed();
        }
        Ok(changes)
    }

    /// Periodic work: a composition that failed is tried again (see
    /// [`Controller::recompose`]); once it succeeds the leader's choices are taken.
    pub(super) fn retry_shared(&mut self, now: Instant) {
        let due = self
            .shared
            .as_ref()
            .and_then(|s| s.failed.as_ref())
            .is_some_and(|(at, _)| now.duration_since(*at) >= RETRY_SHARED);
        if !due {
            return;
        }
        if self.recompose().is_ok() {
            if let Err(e) = self.sync_remote_health() {
                warn!("cluster: other hosts' encoders' health: {e}");
            }
            let all: BTreeSet<String> = self
                .shared
                .as_ref()
                .map(|s| s.channels.keys().cloned().collect())
                .unwrap_or_default();
            self.sync_drains();
            self.follow(&all);
        }
    }

    /// Re-reads the config file of a cluster host (a reload): the file's part is replaced,
    /// the cluster's part stays.
    pub(super) fn reload_clustered(&mut self, file: Config) -> Result<api::ReloadReport> {
        let Some(mut shared) = self.shared.take() else {
            return self.reload_with(file);
        };
        if file.cluster != shared.file.cluster {
            self.shared = Some(shared);
            return Err(ControlError::Refused(
                "[cluster] changed: it takes effect at the next start (nothing changed)".into(),
            ));
        }
        if let Some(reason) = unused_channels(&file) {
            warn!("{reason}");
            self.event(None, None, None, &reason);
        }
        let saved = std::mem::replace(&mut shared.file, file);
        let composed = shared.compose(&self.effective.channels);
        self.shared = Some(shared);
        let result = self.reload_with(composed);
        if result.is_err()
            && let Some(shared) = self.shared.as_mut()
        {
            shared.file = saved;
        }
        result
    }

    /// Logs and records (as events) the keys and objects skipped, each once per reason.
    fn report_skipped(&mut self, bad: Vec<String>, shared: &Shared, report: &mut SharedReport) {
        for b in bad {
            let reason = format!("cluster: skipped {b}");
            warn!("{reason}");
            self.event(None, None, None, &reason);
            report.skipped.push(b);
        }
        for (what, why) in &shared.skipped {
            let line = format!("{what}: {why}");
            if self.skip_reported.contains(&line) {
                continue;
            }
            let reason = format!("cluster: skipped {line}");
            warn!("{reason}");
            self.event(None, None, None, &reason);
            report.skipped.push(line);
        }
        self.skip_reported = shared
            .skipped
            .iter()
            .map(|(what, why)| format!("{what}: {why}"))
            .collect();
    }

    /// Other hosts' encoders are as healthy as their hosts say, and down when their host's
    /// lease expired.
    fn sync_remote_health(&mut self) -> Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let health: Vec<(String, bool)> = shared
            .remote
            .iter()
            .filter(|(name, _)| shared.is_remote(name) && self.has_encoder(name))
            .map(|(name, r)| (name.clone(), r.usable()))
            .collect();
        for (name, usable) in health {
            if self.probed.get(&name).copied() != Some(usable) {
                self.on_health(&name, usable)?;
            }
        }
        Ok(())
    }

    /// This host's own encoders and their health (healthy, drained), to publish in etcd.
    pub fn local_health(&self) -> Vec<(config::Encoder, bool, bool)> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        shared
            .file
            .encoders
            .iter()
            .filter(|e| self.has_encoder(&e.name))
            .map(|e| {
                (
                    e.clone(),
                    self.decider.healthy(&e.name),
                    self.decider.drained(&e.name),
                )
            })
            .collect()
    }

    /// Whether channel `name`, read from etcd, is in the effective configuration, or why not.
    pub fn shared_channel(&self, name: &str) -> Result<(), String> {
        if self
            .lookup
            .channel(&self.effective.channels, name)
            .is_some()
        {
            return Ok(());
        }
        let skipped = self
            .shared
            .as_ref()
            .and_then(|s| s.skipped.get(&format!("channel {name}")));
        Err(skipped.cloned().unwrap_or_else(|| "not applied".into()))
    }

    /// Whether a new channel fits the effective configuration (its name, ingest address and
    /// encoders), as `add channel` checks it on one host.
    pub fn check_new_channel(&self, ch: &config::Channel) -> Result<(), String> {
        if self
            .lookup
            .channel(&self.effective.channels, &ch.name)
            .is_some()
        {
            return Err(format!("channel {:?} already exists", ch.name));
        }
        self.effective
            .check_new_channel(&self.lookup, ch)
            .map_err(|e| e.to_string())
    }

    /// An event of the cluster's task (etcd lost, back).
    pub fn cluster_event(&mut self, reason: &str) {
        self.event(None, None, None, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Config {
        Config::parse(
            "[ingest]\ninterface = \"eth0\"\n\
             [[encoder]]\nname = \"enc-a\"\naddress = \"10.0.1.2\"\nmac = \"02:00:00:00:01:02\"\n\
             health = { kind = \"udp\", port = 9000 }\n\
             [cluster]\nname = \"studio\"\nhost = \"h1\"\netcd = [\"http://127.0.0.1:2379\"]\n",
            "t",
        )
        .unwrap()
    }

    fn host(name: &str, mac: &str) -> Change {
        Change::PutHost(HostRecord {
            host: name.into(),
            lease: 1,
            lease_s: 1,
            pid: 1,
            mac: mac.into(),
        })
    }

    fn encoder(host: &str, name: &str, healthy: bool) -> Change {
        let definition: config::Encoder = serde_json::from_value(serde_json::json!({
            "name": name, "address": "10.0.9.2", "interface": "veth-x", "netns": "ns-x",
            "health": {"kind": "udp", "port": 9000}
        }))
        .unwrap();
        Change::PutEncoder(EncoderRecord {
            host: host.into(),
            definition,
            healthy,
            drained: false,
        })
    }

    fn channel(name: &str, listen: &str, encoders: &[&str]) -> Change {
        channel_at(name, listen, encoders, 0)
    }

    fn channel_at(name: &str, listen: &str, encoders: &[&str], revision: i64) -> Change {
        Change::PutChannel {
            channel: serde_json::from_value(serde_json::json!({
                "name": name, "listen": listen, "encoders": encoders
            }))
            .unwrap(),
            revision,
        }
    }

    #[test]
    fn composition_takes_what_fits_and_says_why_it_skips_the_rest() {
        let mut s = Shared::new("h1".into(), file());
        let Recorded {
            bad,
            recompose,
            touched,
            added,
        } = s.record(vec![
            host("h2", "02:00:00:00:00:22"),
            encoder("h2", "enc-r", true),
            // Another host claiming this host's encoder name.
            encoder("h3", "enc-a", true),
            encoder("h4", "enc-z", true),
            channel("cam1", "10.0.0.1:5000", &["enc-r", "enc-a"]),
            channel("cam2", "10.0.0.1:5002", &["enc-x"]),
            channel("cam3", "10.0.0.1:5000", &["enc-a"]),
            Change::Bad {
                key: "/nsfail/studio/junk".into(),
                why: "not a key of nsfail's layout".into(),
            },
        ]);
        assert!(recompose);
        assert_eq!(added, ["cam1", "cam2", "cam3"]);
        assert_eq!(bad, ["/nsfail/studio/junk: not a key of nsfail's layout"]);
        assert_eq!(
            touched.into_iter().collect::<Vec<_>>(),
            ["cam1", "cam2", "cam3"]
        );
        let cfg = s.compose(&[]);
        let names: Vec<&str> = cfg.encoders.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["enc-a", "enc-r"]);
        let remote = cfg.encoder("enc-r").unwrap();
        assert_eq!(
            (
                remote.interface.as_deref(),
                remote.netns.as_deref(),
                remote.mac.as_deref()
            ),
            (None, None, Some("02:00:00:00:00:22")),
            "another host's encoder is remote here, at its host's MAC"
        );
        assert_eq!(
            cfg.encoder("enc-a").unwrap().address.to_string(),
            "10.0.1.2"
        );
        let channels: Vec<&str> = cfg.channels.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(channels, ["cam1"]);
        let skipped: Vec<&str> = s.skipped.keys().map(String::as_str).collect();
        assert_eq!(
            skipped,
            [
                "channel cam2",
                "channel cam3",
                "encoder enc-a of host h3",
                "encoder enc-z of host h4"
            ]
        );
        assert!(s.skipped["encoder enc-z of host h4"].contains("never registered"));
        // Of two that collide, the definition written first wins, whatever the names.
        s.record(vec![
            channel_at("cam3", "10.0.0.1:5000", &["enc-a"], 7),
            channel_at("cam1", "10.0.0.1:5000", &["enc-r", "enc-a"], 9),
        ]);
        let older = s.compose(&[]);
        let channels: Vec<&str> = older.channels.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(channels, ["cam3"]);
        assert!(
            s.skipped["channel cam1"].contains("10.0.0.1:5000"),
            "{:?}",
            s.skipped
        );
        // A change keeps the key's create revision: cam3, given a backup, is still the
        // older, on a host running it or not.
        s.record(vec![channel_at(
            "cam3",
            "10.0.0.1:5000",
            &["enc-a", "enc-r"],
            7,
        )]);
        let names = |cfg: &Config| -> Vec<String> {
            let mut n: Vec<String> = cfg.channels.iter().map(|c| c.name.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&s.compose(&[])), ["cam3"]);
        let changed = s.compose(&older.channels);
        assert_eq!(names(&changed), ["cam3"]);
        assert_eq!(
            changed.channel("cam3").unwrap().encoders,
            ["enc-a", "enc-r"]
        );

        s.record(vec![
            Change::DeleteChannel("cam1".into()),
            Change::DeleteChannel("cam2".into()),
        ]);
        // A running channel changed into a collision with another running one keeps its
        // running definition, and the other keeps its address; the change is reported.
        s.record(vec![channel_at("cam4", "10.0.0.1:5004", &["enc-a"], 12)]);
        let running = s.compose(&changed.channels);
        assert_eq!(names(&running), ["cam3", "cam4"]);
        s.record(vec![channel_at("cam3", "10.0.0.1:5004", &["enc-a"], 7)]);
        let kept = s.compose(&running.channels);
        assert_eq!(names(&kept), ["cam3", "cam4"]);
        assert_eq!(
            kept.channel("cam3").unwrap().listen.to_string(),
            "10.0.0.1:5000",
            "cam3 runs on with its old definition"
        );
        assert_eq!(
            kept.channel("cam4").unwrap().listen.to_string(),
            "10.0.0.1:5004"
        );
        assert!(
            s.skipped["channel cam3"].contains("running definition stays"),
            "{:?}",
            s.skipped
        );
        // Once cam4 goes, cam3's new definition fits and is applied.
        s.record(vec![Change::DeleteChannel("cam4".into())]);
        let fixed = s.compose(&kept.channels);
        assert_eq!(names(&fixed), ["cam3"]);
        assert_eq!(
            fixed.channel("cam3").unwrap().listen.to_string(),
            "10.0.0.1:5004"
        );
        assert!(!s.skipped.contains_key("channel cam3"));
        // Two running channels may swap addresses in one change.
        s.record(vec![
            channel_at("cam3", "10.0.0.1:5000", &["enc-a"], 7),
            channel_at("cam4", "10.0.0.1:5004", &["enc-a"], 13),
        ]);
        let before = s.compose(&fixed.channels);
        s.record(vec![
            channel_at("cam3", "10.0.0.1:5004", &["enc-a"], 7),
            channel_at("cam4", "10.0.0.1:5000", &["enc-a"], 13),
        ]);
        let swapped = s.compose(&before.channels);
        assert_eq!(
            swapped.channel("cam3").unwrap().listen.to_string(),
            "10.0.0.1:5004"
        );
        assert_eq!(
            swapped.channel("cam4").unwrap().listen.to_string(),
            "10.0.0.1:5000"
        );
        assert!(
            s.skipped.keys().all(|k| !k.starts_with("channel")),
            "{:?}",
            s.skipped
        );
        // A chain of changes: cam3 onto cam4's address, cam4 onto cam5's, which stays. cam4's
        // change fails, so cam3's must too: all three run on as they were.
        s.record(vec![channel_at("cam5", "10.0.0.1:5008", &["enc-a"], 14)]);
        let three = s.compose(&swapped.channels);
        assert_eq!(names(&three), ["cam3", "cam4", "cam5"]);
        s.record(vec![
            channel_at("cam3", "10.0.0.1:5000", &["enc-a"], 7),
            channel_at("cam4", "10.0.0.1:5008", &["enc-a"], 13),
        ]);
        let chained = s.compose(&three.channels);
        for (name, listen) in [
            ("cam3", "10.0.0.1:5004"),
            ("cam4", "10.0.0.1:5000"),
            ("cam5", "10.0.0.1:5008"),
        ] {
            assert_eq!(
                chained.channel(name).unwrap().listen.to_string(),
                listen,
                "{name} runs on: {:?}",
                s.skipped
            );
        }
        assert!(s.skipped["channel cam3"].contains("running definition stays"));
        assert!(s.skipped["channel cam4"].contains("running definition stays"));
        assert!(s.is_remote("enc-r") && !s.is_remote("enc-a"));
        assert_eq!(
            s.host_of("enc-a"),
            None,
            "this host's own, whatever h3 says"
        );

        // Its host's lease expires: the encoder stays defined, and is down.
        assert!(s.remote["enc-r"].usable());
        let r = s.record(vec![Change::DeleteEncoder {
            host: "h2".into(),
            encoder: "enc-r".into(),
        }]);
        assert!(!r.recompose);
        assert!(!s.remote["enc-r"].usable());
        assert_eq!(s.compose(&[]).encoders.len(), 2);
    }
}
