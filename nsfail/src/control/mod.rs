//! The controller: the effective configuration (the config file plus runtime changes), the
//! decisions (which encoder each channel goes to), and the events that record them. It drives
//! the data plane only through [`Dataplane`].
//!
//! Runtime changes are kept as a delta over the config file in a state file beside it, written
//! atomically after every change, so a restart keeps them and an edited config file still
//! takes effect for everything the operator did not change at run time.
//!
//! Scale: nothing here walks every channel per change, decision or request where an index
//! will do ([`config::Lookup`] for names and addresses, the decider's per-encoder indexes, the
//! data plane's in-memory mirror of its maps). A runtime change touches only what it changes;
//! start-up and `status` are linear in the number of channels; file writes run on the
//! writer thread (`writer`), once per batch of decisions. An audit (`audit`) re-syncs,
//! a slice of channels at a time, the maps with the decisions when something else wrote them.
//!
//! Must not: touch BPF maps other than through [`Dataplane`], or do network I/O of its own
//! beyond the SRT SHUTDOWNs of a repoint.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fs,
    io::Write,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use log::{debug, info, warn};
use nsfail_common::drop_reason;
use serde::{Deserialize, Serialize};

mod apply;
mod audit;
mod changes;
pub mod decision;
mod events;
mod input;
mod leadership;
pub use leadership::Placed;
mod links;
mod reload;
mod routed;
mod shared;
mod srt;
mod state;
mod status;
mod switchover;
mod writer;

use self::{
    decision::{ChannelPolicy, Decider, Decision, Reason},
    input::InputWatch,
    srt::Batch,
    state::*,
    switchover::PendingSwitch,
    writer::Writer,
};
pub use self::{
    events::{monotonic_ns, rfc3339, rotated},
    links::encoder_spec,
    shared::{Shared, SharedReport},
    srt::send_srt_shutdowns,
    state::{Delta, events_path, state_path},
    status::StatusView,
};
use crate::{
    Dataplane, DataplaneError, EncoderLink, EncoderSpec,
    api::{self, ChannelStatus, EncoderStatus, Event, SrtPeerStatus, Status},
    config::{self, Config, ConfigError},
    dataplane::ChannelOptions,
    net::{
        netns, provision,
        receive::{self, Verdict},
    },
};

fn policy(ch: &config::Channel) -> ChannelPolicy {
    ChannelPolicy {
        encoders: ch.encoders.clone(),
        failback: ch.failback,
        hold_down: Duration::from_millis(ch.hold_down_ms),
    }
}

/// What the data plane needs of a channel beyond where it forwards: SRT or not, its
/// `sources`, its SRT caller limit.
fn channel_options(ch: &config::Channel) -> ChannelOptions {
    ChannelOptions {
        srt: ch.protocol == config::Protocol::Srt,
        sources: ch.sources.clone(),
        srt_peer_limit: ch.srt_peer_limit(),
    }
}

/// How many events the daemon keeps in memory.
pub const EVENT_RING: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("state file {path}: {why}")]
    State { path: String, why: String },
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    #[error("unknown encoder {0:?}")]
    UnknownEncoder(String),
    #[error("{0}")]
    Refused(String),
    #[error("encoder {name:?}: {why}")]
    Encoder { name: String, why: String },
}

type Result<T, E = ControlError> = std::result::Result<T, E>;

pub struct Controller {
    /// The config file as last read (at start-up or by a reload), as much of it as a reload
    /// needs to tell which runtime changes the new file overrides.
    loaded: reload::Loaded,
    /// Runtime changes over the config file.
    delta: Delta,
    effective: Config,
    /// The config file, re-read by [`Controller::reload`].
    config_path: PathBuf,
    /// `effective`'s indexes, changed with it.
    lookup: config::Lookup,
    /// Writes events and the state file off this thread.
    writer: Writer,
    dp: Dataplane,
    /// Health, placement and the failover rules.
    decider: Decider,
    /// Per channel (by ingest address): input packets last seen and since when they have not
    /// moved.
    input: HashMap<SocketAddr, InputWatch>,
    /// Failovers whose switchover time is still being measured.
    pending: Vec<PendingSwitch>,
    /// Channels moved since the last tick (for the failover counters).
    moved: Vec<String>,
    /// Per encoder: its last successful probe (CLOCK_MONOTONIC ns).
    alive_ns: BTreeMap<String, u64>,
    /// Bumped by every change of the effective configuration, so that the daemon re-reads it
    /// (probes, managed encoders) only when it changed.
    generation: u64,
    /// When the input-loss watch last ran.
    input_watched: Option<Instant>,
    events: VecDeque<Event>,
    /// Events recorded and not yet logged, kept and written (see
    /// [`Controller::drain_events`]), with the time they happened.
    pending_events: VecDeque<(SystemTime, Event)>,
    /// Per local encoder: whether its interface takes XDP-redirected frames, as last checked.
    receive: BTreeMap<String, Verdict>,
    /// Per encoder: what its probe (or flow check) last said; healthy until told otherwise.
    probed: BTreeMap<String, bool>,
    /// Why the XDP program is not on the ingest interface, while it is not.
    ingest_lost: Option<String>,
    /// Per local encoder: why re-attaching to its re-created interface failed, while it fails.
    relink_failed: BTreeMap<String, String>,
    /// Decisions whose map write failed (the newest per channel), retried every tick.
    unapplied: BTreeMap<String, Decision>,
    /// Why the state file could not be written, while it cannot.
    persist_failed: Option<String>,
    /// When persisting was last tried.
    persist_tried: Option<Instant>,
    /// When automatic failback was last checked.
    failback_checked: Option<Instant>,
    /// Where the audit of the maps against the decisions is.
    audit: audit::AuditCursor,
    /// A cluster host: what it read from etcd (`None`: one host, no cluster).
    shared: Option<Shared>,
    /// What the cluster's last composition skipped, as reported (see `shared`).
    skip_reported: BTreeSet<String>,
}

/// How often a state file that could not be written is tried again.
const PERSIST_RETRY: Duration = Duration::from_secs(1);

/// How often the input-loss watch reads the channels' counters (for every 10,000 channels,
/// up to a second: the read is one batched syscall, but its size grows with the channels).
const INPUT_WATCH_EVERY: Duration = Duration::from_millis(100);

/// Automatic failback is checked at every tick while few channels could fail back, and at
/// most this often while many could (each check looks at each of them).
const FAILBACK_CHECK_EVERY: Duration = Duration::from_millis(100);
const FAILBACK_CHECK_MANY: usize = 1000;

/// How long a channel's input may stand still before it is reported as lost.
pub const INPUT_LOSS_AFTER: Duration = Duration::from_secs(1);
/// SRT callers seen within this long are told to reconnect on a repoint.
const SRT_PEER_FRESH: Duration = Duration::from_secs(30);
/// How long a switchover measurement waits for the first packet at the new encoder.
const SWITCH_MEASURE_FOR: Duration = Duration::from_secs(5);

/// What a tick found, for metrics.
#[derive(Clone, Debug, Default)]
pub struct TickReport {
    pub moved: Vec<String>,
    pub switchovers: Vec<Switchover>,
    /// The part of the tick that took longest, and how long (for the log: the controller's
    /// thread does nothing else meanwhile, so a long part delays failovers and changes).
    pub slowest: (&'static str, Duration),
}

/// Times the parts of a tick one after the other and keeps the slowest.
struct PartTimer {
    at: Instant,
    slowest: (&'static str, Duration),
}

impl PartTimer {
    fn start() -> Self {
        Self {
            at: Instant::now(),
            slowest: ("", Duration::ZERO),
        }
    }

    /// Ends the part called `name` (begun when the previous one ended).
    fn done(&mut self, name: &'static str) {
        let now = Instant::now();
        let took = now.duration_since(self.at);
        self.at = now;
        if took > self.slowest.1 {
            self.slowest = (name, took);
        }
    }
}

/// A finished switchover measurement, for metrics.
#[derive(Clone, Debug)]
pub struct Switchover {
    pub channel: String,
    pub gap: Duration,
}

impl Controller {
    /// Builds the controller over an open data plane and brings the data plane in line with
    /// the effective configuration. When the data plane was adopted, channels keep the
    /// encoder they are on (if still valid), so a restart moves nothing.
    pub fn start(base: Config, config_path: &Path, dp: Dataplane) -> Result<Self> {
        Self::start_with(base, config_path, dp, None)
    }

    /// [`Controller::start`], for a cluster host with what it read from etcd.
    fn start_with(
        base: Config,
        config_path: &Path,
        dp: Dataplane,
        shared: Option<Shared>,
    ) -> Result<Self> {
        let state_path = state_path(config_path);
        let writer = Writer::start(state_path.clone(), events_path(config_path));
        // A state file that cannot be read back, or whose changes no longer fit the config
        // file, is moved aside: the daemon starts from the config, and says so.
        let mut set_aside = None;
        let delta = match fs::read_to_string(&state_path) {
            Ok(text) => match serde_json::from_str::<Delta>(&text)
                .map_err(|e| format!("not a state file: {e}"))
                .and_then(|d| match d.apply(&base).validate() {
                    Ok(()) => Ok(d),
                    Err(e) => Err(format!("its changes no longer fit the config file: {e}")),
                }) {
                Ok(d) => d,
                Err(why) => {
                    set_aside = Some(set_aside_state(&state_path, &why)?);
                    Delta {
                        v: 1,
                        ..Default::default()
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Delta {
                v: 1,
                ..Default::default()
            },
            Err(e) => {
                return Err(ControlError::State {
                    path: state_path.display().to_string(),
                    why: e.to_string(),
                });
            }
        };
        // A copy, even without runtime changes, on purpose: the parsed config is scattered
        // among the parse's garbage, the copy is packed, and once the parsed one is dropped
        // that garbage can go back to the system (about 60 MiB at 100,000 channels).
        let effective = delta.apply(&base);
        let mut c = Self {
            loaded: reload::Loaded::of(&base),
            delta,
            lookup: effective.lookup(),
            effective,
            config_path: config_path.to_owned(),
            writer,
            dp,
            decider: Decider::new(),
            input: HashMap::new(),
            pending: Vec::new(),
            moved: Vec::new(),
            alive_ns: BTreeMap::new(),
            generation: 1,
            input_watched: None,
            events: VecDeque::new(),
            pending_events: VecDeque::new(),
            receive: BTreeMap::new(),
            probed: BTreeMap::new(),
            ingest_lost: None,
            relink_failed: BTreeMap::new(),
            unapplied: BTreeMap::new(),
            persist_failed: None,
            persist_tried: None,
            failback_checked: None,
            audit: Default::default(),
            shared,
            skip_reported: BTreeSet::new(),
        };
        drop(base);
        if let Some(reason) = set_aside {
            warn!("{reason}");
            c.event(None, None, None, &reason);
        }
        for name in c.delta.drained.clone() {
            c.decider.restore_drained(&name);
        }
        c.reconcile()?;
        // Start-up's events (one per channel configured) are all written before the first
        // request, which would otherwise wait for them.
        c.drain_events(usize::MAX);
        Ok(c)
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn config(&self) -> &Config {
        &self.effective
    }

    /// Changes whenever [`Controller::config`] does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the data plane match `effective`: encoders, then channels, then removal of
    /// whatever the data plane has that the config does not. Linear in the channels (at
    /// start-up, and after the ingest interface was re-created).
    fn reconcile(&mut self) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.effective.encoders.len() {
            let e = self.effective.encoders[i].clone();
            self.reconcile_encoder(&e, now)?;
        }
        let current: HashMap<_, _> = self
            .dp
            .channels()?
            .into_iter()
            .map(|c| (c.listen, c))
            .collect();
        let mut configured = Vec::new();
        for ch in &self.effective.channels {
            let before = current.get(&ch.listen).map(|c| &c.encoder);
            let active = self.choose_initial(ch, before);
            let members: Vec<&str> = ch.encoders.iter().map(String::as_str).collect();
            self.dp.set_channel_with(
                ch.listen,
                ch.encoder_port(),
                &active,
                &members,
                &channel_options(ch),
            )?;
            self.decider.set_channel(&ch.name, policy(ch), &active);
            if before != Some(&active) {
                configured.push((ch.name.clone(), before.cloned(), active));
            }
        }
        for (name, before, active) in configured {
            self.event(Some(&name), before, Some(active), "configured");
        }
        let listens: BTreeSet<_> = self.effective.channels.iter().map(|c| c.listen).collect();
        for listen in current.keys().filter(|l| !listens.contains(l)) {
            self.dp.remove_channel(*listen)?;
        }
        self.input.retain(|listen, _| listens.contains(listen));
        for name in self.decider.channel_names() {
            if self
                .lookup
                .channel(&self.effective.channels, &name)
                .is_none()
            {
                self.decider.remove_channel(&name);
            }
        }
        for e in self.dp.encoders()? {
            if self.lookup.encoder(&e.name).is_none() {
                self.dp.remove_encoder(&e.name)?;
                self.decider.remove_encoder(&e.name);
            }
        }
        Ok(())
    }

    /// Brings one configured encoder into the data plane and the decider: its namespace and
    /// veth when managed, its registration and egress policy, its receive readiness.
    fn reconcile_encoder(&mut self, e: &config::Encoder, now: Instant) -> Result<()> {
        if let Some(plan) = e.provision_plan() {
            provision::provision(&plan).map_err(|x| ControlError::Encoder {
                name: e.name.clone(),
                why: x.to_string(),
            })?;
        }
        let spec = encoder_spec(e)?;
        if self.shared.as_ref().is_some_and(|s| s.is_remote(&e.name)) {
            return self.reconcile_routed(spec, now);
        }
        let policy = policy_from_config(&self.effective, e)?;
        self.dp.upsert_encoder_policed(&spec, Some(&policy))?;
        self.decider.add_encoder(&e.name, now);
        if e.spawn.is_none()
            && let Some(ns) = &e.netns
        {
            report_icmp_ratelimit(&e.name, ns);
        }
        if let Some(ifname) = e.host_interface() {
            let verdict = receive::ensure(&ifname, e.namespace().as_deref());
            self.set_receive(&e.name, verdict)?;
        }
        Ok(())
    }

    /// The encoder a channel starts on: a recorded decision, else what the adopted data plane
    /// forwards to, else the first healthy undrained encoder in priority order.
    fn choose_initial(&self, ch: &config::Channel, in_dataplane: Option<&String>) -> String {
        let usable = |n: &String| ch.encoders.contains(n) && !self.delta.drained.contains(n);
        if let Some(a) = self.delta.active.get(&ch.name).filter(|a| usable(a)) {
            return a.clone();
        }
        if let Some(a) = in_dataplane.filter(|a| usable(a)) {
            return a.clone();
        }
        self.best(ch, None)
            .unwrap_or_else(|| ch.encoders[0].clone())
    }

    /// The highest-priority healthy, undrained encoder of `ch`, other than `except`.
    fn best(&self, ch: &config::Channel, except: Option<&str>) -> Option<String> {
        ch.encoders
            .iter()
            .find(|n| {
                Some(n.as_str()) != except && !self.decider.drained(n) && self.decider.healthy(n)
            })
            .cloned()
    }

    fn channel(&self, name: &str) -> Result<config::Channel> {
        self.lookup
            .channel(&self.effective.channels, name)
            .map(|i| self.effective.channels[i].clone())
            .ok_or_else(|| ControlError::UnknownChannel(name.to_owned()))
    }

    fn has_encoder(&self, name: &str) -> bool {
        self.lookup.encoder(name).is_some()
    }

    /// The encoder the data plane forwards a channel to now.
    fn active_of(&self, ch: &config::Channel) -> Option<String> {
        self.dp.active_encoder(ch.listen).map(str::to_owned)
    }

    /// Manual failover: `channel` to `encoder`, which must be one of its encoders and not
    /// drained.
    pub fn remap(&mut self, channel: &str, encoder: &str) -> Result<()> {
        self.refuse_unless_leader("remap")?;
        let ch = self.channel(channel)?;
        if !self.has_encoder(encoder) {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()));
        }
        if !ch.encoders.iter().any(|e| e == encoder) {
            return Err(ControlError::Refused(format!(
                "encoder {encoder:?} is not one of channel {channel:?}'s encoders ({})",
                ch.encoders.join(", ")
            )));
        }
        if self.decider.drained(encoder) {
            return Err(ControlError::Refused(format!(
                "encoder {encoder:?} is drained (nsfail undrain {encoder} first)"
            )));
        }
        let decision = self
            .decider
            .remap(channel, encoder, Instant::now())
            .ok_or_else(|| ControlError::UnknownChannel(channel.to_owned()))?;
        self.apply_all(vec![decision]);
        Ok(())
    }

    /// Moves every channel off `encoder` and keeps them off until undrained. Refused, with
    /// nothing moved, when some channel would be left without a healthy encoder.
    pub fn drain(&mut self, encoder: &str) -> Result<()> {
        self.refuse_unless_leader("drain")?;
        self.drain_here(encoder)
    }

    /// [`Controller::drain`] on this host, whoever leads (a cluster's drain, read from etcd).
    pub(super) fn drain_here(&mut self, encoder: &str) -> Result<()> {
        if !self.has_encoder(encoder) {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()));
        }
        let decisions = self
            .decider
            .drain(encoder, Instant::now())
            .map_err(|channel| would_strand(encoder, &channel))?;
        self.delta.drained.insert(encoder.to_owned());
        self.event(None, Some(encoder.to_owned()), None, "drained");
        let moved_none = decisions.is_empty();
        self.apply_all(decisions);
        if moved_none {
            self.persist_or_report();
        }
        Ok(())
    }

    pub fn undrain(&mut self, encoder: &str) -> Result<()> {
        if !self.has_encoder(encoder) {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()));
        }
        // A cluster's drain ends when its key goes: one etcd holds (put again since an
        // undrain deleted it, say) is not undone here alone.
        if self
            .shared
            .as_ref()
            .is_some_and(|s| s.drains.contains(encoder))
        {
            return Err(ControlError::Refused(format!(
                "encoder {encoder:?} is drained in etcd (drains/{encoder}): undrain it again"
            )));
        }
        if self.decider.undrain(encoder) {
            self.delta.drained.remove(encoder);
            self.event(None, None, Some(encoder.to_owned()), "undrained");
            self.persist_or_report();
        }
        Ok(())
    }

    /// A health transition of an encoder (from its probe's rise/fall counter, or the flow
    /// check): logged as an event, and failovers carried out.
    pub fn on_health(&mut self, encoder: &str, healthy: bool) -> Result<()> {
        if !self.has_encoder(encoder) {
            return Ok(());
        }
        let before = self.probed.insert(encoder.to_owned(), healthy);
        if before.unwrap_or(true) != healthy {
            let reason = if healthy {
                "encoder healthy"
            } else {
                "encoder unhealthy"
            };
            self.event(None, None, Some(encoder.to_owned()), reason);
        }
        self.sync_health(encoder)
    }

    /// An encoder is usable when its probe says so and, for a local one, its interface takes
    /// XDP-redirected frames: the decider is told when that changes.
    fn sync_health(&mut self, encoder: &str) -> Result<()> {
        let healthy = self.probed.get(encoder).copied().unwrap_or(true)
            && self.receive.get(encoder).is_none_or(|v| v.can_receive);
        if self.decider.healthy(encoder) == healthy {
            return Ok(());
        }
        let decisions = self.decider.set_health(encoder, healthy, Instant::now());
        // A cluster host publishes its own encoders' health at once: the leader decides
        // on it.
        if let Some(s) = &self.shared
            && !s.is_remote(encoder)
        {
            s.health_changed.notify_one();
        }
        self.apply_all(decisions);
        // A follower whose channels sit on an encoder now down takes at once the leader's
        // choices it could not take before (the encoder it chose was down here then).
        if !healthy && self.decider.following() {
            let on: BTreeSet<String> = self.decider.channels_on(encoder).into_iter().collect();
            self.follow(&on);
        }
        Ok(())
    }

    /// Periodic work: automatic failback, input-loss watch, switchover measurements. Reports
    /// the channels moved and the switchovers measured since the last call.
    pub fn tick(&mut self) -> Result<TickReport> {
        let now = Instant::now();
        let mut parts = PartTimer::start();
        if self.decider.displaced() <= FAILBACK_CHECK_MANY
            || self
                .failback_checked
                .is_none_or(|t| now.duration_since(t) >= FAILBACK_CHECK_EVERY)
        {
            self.failback_checked = Some(now);
            let decisions = self.decider.tick(now);
            self.apply_all(decisions);
        }
        parts.done("failback");
        self.retry_unapplied();
        parts.done("retrying writes");
        self.retry_shared(now);
        parts.done("retrying the cluster's state");
        self.follow_periodically(now);
        self.fail_over_overdue(now);
        parts.done("following the leader");
        self.refresh_routes_periodically(now);
        parts.done("resolving next hops");
        self.announce_periodically(now);
        parts.done("announcing routes");
        self.audit(now);
        parts.done("audit");
        self.check_persisted(now);
        parts.done("checking the state file");
        // Input loss is judged over seconds: a tenth of a second is fine grain, and spares a
        // map read on every tick; with many channels (a read of them all each time), a tenth
        // of a second per 2,000 channels, a second at most.
        let every = (INPUT_WATCH_EVERY * (self.effective.channels.len() / 2_000).max(1) as u32)
            .min(Duration::from_secs(1));
        if self
            .input_watched
            .is_none_or(|t| now.duration_since(t) >= every)
        {
            self.input_watched = Some(now);
            self.watch_input(now)?;
        }
        parts.done("input watch");
        let switchovers = self.measure_switchovers(now);
        parts.done("switchover measurement");
        Ok(TickReport {
            switchovers,
            moved: std::mem::take(&mut self.moved),
            slowest: parts.slowest,
        })
    }

    /// Whether the periodic work has something time-critical to do: switchovers to time (the
    /// figure is as late as the tick that sees the new encoder's first packet) or decisions
    /// to write again.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || !self.unapplied.is_empty()
    }

    /// Channels an encoder is active for.
    pub fn channels_on(&self, encoder: &str) -> Vec<String> {
        self.decider.channels_on(encoder)
    }

    /// Whether an encoder is active for any channel.
    pub fn is_active(&self, encoder: &str) -> bool {
        self.decider.is_active(encoder)
    }
}

/// The refusal of a drain of `encoder` that would leave `channel` without a healthy encoder.
/// Makes `now` what is reported (`reported`) and returns what in it is new, or holds for
/// another reason than before: what to report, once per reason.
fn newly_failed<K: Ord + Clone>(
    reported: &mut BTreeMap<K, String>,
    now: BTreeMap<K, String>,
) -> Vec<(K, String)> {
    let new = now
        .iter()
        .filter(|(k, why)| reported.get(*k) != Some(*why))
        .map(|(k, why)| (k.clone(), why.clone()))
        .collect();
    *reported = now;
    new
}

fn would_strand(encoder: &str, channel: &str) -> ControlError {
    ControlError::Refused(format!(
        "draining {encoder:?} would leave channel {channel:?} without a healthy encoder"
    ))
}

/// Warns when an encoder namespace nsfail does not manage limits ICMP errors so that a dead
/// receiver's refusals of the stream come too rarely to fail it at once (the kernel default:
/// one a second per destination after a burst of six). Managed namespaces get 10 ms.
fn report_icmp_ratelimit(encoder: &str, ns: &str) {
    match netns::icmp_ratelimit_ms(ns) {
        Ok(ms) if ms > 100 => warn!(
            "encoder {encoder}: namespace {ns} has net.ipv4.icmp_ratelimit = {ms} ms: after a \
             burst of six, its kernel refuses a dead receiver's stream once per {ms} ms per \
             source; `ip netns exec {ns} sysctl -w net.ipv4.icmp_ratelimit=10 \
             net.ipv6.icmp.ratelimit=10` lets every refusal through"
        ),
        Ok(_) => {}
        Err(e) => debug!("encoder {encoder}: reading icmp_ratelimit in {ns}: {e}"),
    }
}

/// The kernel egress policy of a configured encoder: its allow-list, and the protocol and port
/// its health check is answered from (the daemon probes from the ingest host, so the answers
/// pass to this host's address whatever the allow-list says).
pub fn policy_from_config(
    cfg: &Config,
    e: &config::Encoder,
) -> Result<crate::dataplane::EgressPolicy> {
    let err = |why: String| ControlError::Encoder {
        name: e.name.clone(),
        why,
    };
    let allow = e.allow_rules().map_err(|x| err(x.to_string()))?;
    let check = cfg.health_check(e).map_err(|problems| {
        let why: Vec<String> = problems.into_iter().map(|p| p.message).collect();
        err(why.join("; "))
    })?;
    Ok(crate::dataplane::EgressPolicy {
        allow,
        health: check.check.answers(),
    })
}
