//! The controller: the effective configuration (the config file plus runtime changes), the
//! decisions (which encoder each channel goes to), and the events that record them. It drives
//! the data plane only through [`Dataplane`].
//!
//! Runtime changes are kept as a delta over the config file in a state file beside it, written
//! atomically after every change, so a restart keeps them and an edited config file still
//! takes effect for everything the operator did not change at run time.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
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

use crate::{
    Dataplane, DataplaneError, EncoderLink, EncoderSpec,
    api::{ChannelStatus, EncoderStatus, Event, SrtPeerStatus, Status},
    config::{self, Config, ConfigError},
    decision::{ChannelPolicy, Decider, Decision, Reason},
    managed, netns,
    receive::{self, Verdict},
};

fn policy(ch: &config::Channel) -> ChannelPolicy {
    ChannelPolicy {
        encoders: ch.encoders.clone(),
        failback: ch.failback,
        hold_down: Duration::from_millis(ch.hold_down_ms),
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

/// Runtime changes over the config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub v: u32,
    #[serde(default)]
    pub added_encoders: Vec<config::Encoder>,
    #[serde(default)]
    pub added_channels: Vec<config::Channel>,
    #[serde(default)]
    pub removed_encoders: BTreeSet<String>,
    #[serde(default)]
    pub removed_channels: BTreeSet<String>,
    /// Channel name → active encoder, where a decision moved it off its default.
    #[serde(default)]
    pub active: BTreeMap<String, String>,
    #[serde(default)]
    pub drained: BTreeSet<String>,
}

impl Delta {
    /// The effective configuration: the file's, with the runtime changes applied.
    pub fn apply(&self, base: &Config) -> Config {
        let mut cfg = base.clone();
        cfg.encoders
            .retain(|e| !self.removed_encoders.contains(&e.name));
        cfg.channels
            .retain(|c| !self.removed_channels.contains(&c.name));
        for e in &self.added_encoders {
            cfg.encoders.retain(|x| x.name != e.name);
            cfg.encoders.push(e.clone());
        }
        for c in &self.added_channels {
            cfg.channels.retain(|x| x.name != c.name);
            cfg.channels.push(c.clone());
        }
        cfg
    }
}

/// The state file beside a config file: `nsfail.toml` → `nsfail.state.json`.
pub fn state_path(config: &Path) -> PathBuf {
    sibling(config, "state.json")
}

/// The events file beside a config file: `nsfail.toml` → `nsfail.events.jsonl`.
pub fn events_path(config: &Path) -> PathBuf {
    sibling(config, "events.jsonl")
}

fn sibling(config: &Path, ext: &str) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "nsfail".into());
    config.with_file_name(format!("{stem}.{ext}"))
}

pub struct Controller {
    base: Config,
    delta: Delta,
    effective: Config,
    state_path: PathBuf,
    events_path: PathBuf,
    dp: Dataplane,
    /// Health, placement and the failover rules.
    decider: Decider,
    /// Per channel: input packets last seen and since when they have not moved.
    input: BTreeMap<String, InputWatch>,
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
    /// Per local encoder: whether its interface takes XDP-redirected frames, as last checked.
    receive: BTreeMap<String, Verdict>,
    /// Per encoder: what its probe (or flow check) last said; healthy until told otherwise.
    probed: BTreeMap<String, bool>,
    /// Why the XDP program is not on the ingest interface, while it is not.
    ingest_lost: Option<String>,
    /// Per local encoder: why re-attaching to its re-created interface failed, while it fails.
    relink_failed: BTreeMap<String, String>,
    /// Decisions whose map write failed, retried every tick.
    unapplied: Vec<Decision>,
    /// Why the state file could not be written, while it cannot.
    persist_failed: Option<String>,
    /// When persisting was last retried.
    persist_tried: Option<Instant>,
}

/// How often a state file that could not be written is tried again.
const PERSIST_RETRY: Duration = Duration::from_secs(1);

/// How often the input-loss watch reads the channels' counters.
const INPUT_WATCH_EVERY: Duration = Duration::from_millis(100);

/// How long a channel's input may stand still before it is reported as lost.
pub const INPUT_LOSS_AFTER: Duration = Duration::from_secs(1);
/// SRT callers seen within this long are told to reconnect on a repoint.
const SRT_PEER_FRESH: Duration = Duration::from_secs(30);
/// How long a switchover measurement waits for the first packet at the new encoder.
const SWITCH_MEASURE_FOR: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
struct InputWatch {
    packets: u64,
    since: Instant,
    lost: bool,
}

/// A failover waiting for the new encoder's first packet.
#[derive(Clone, Debug)]
struct PendingSwitch {
    channel: String,
    from: String,
    to: String,
    /// The old encoder's last sign of life (CLOCK_MONOTONIC ns).
    last_old_ns: u64,
    /// The new encoder's packet count at the switch.
    new_packets: u64,
    started: Instant,
}

/// What a tick found, for metrics.
#[derive(Clone, Debug, Default)]
pub struct TickReport {
    pub moved: Vec<String>,
    pub switchovers: Vec<Switchover>,
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
        let state_path = state_path(config_path);
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
        let effective = delta.apply(&base);
        let mut c = Self {
            base,
            delta,
            effective,
            state_path,
            events_path: events_path(config_path),
            dp,
            decider: Decider::new(),
            input: BTreeMap::new(),
            pending: Vec::new(),
            moved: Vec::new(),
            alive_ns: BTreeMap::new(),
            generation: 1,
            input_watched: None,
            events: VecDeque::new(),
            receive: BTreeMap::new(),
            probed: BTreeMap::new(),
            ingest_lost: None,
            relink_failed: BTreeMap::new(),
            unapplied: Vec::new(),
            persist_failed: None,
            persist_tried: None,
        };
        if let Some(reason) = set_aside {
            warn!("{reason}");
            c.event(None, None, None, &reason);
        }
        for name in c.delta.drained.clone() {
            c.decider.restore_drained(&name);
        }
        c.reconcile()?;
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
    /// whatever the data plane has that the config does not.
    fn reconcile(&mut self) -> Result<()> {
        let cfg = self.effective.clone();
        let now = Instant::now();
        for e in &cfg.encoders {
            if let Some(plan) = managed::Plan::of(e) {
                managed::provision(&plan).map_err(|x| ControlError::Encoder {
                    name: e.name.clone(),
                    why: x.to_string(),
                })?;
            }
            let spec = encoder_spec(e)?;
            self.dp.upsert_encoder(&spec)?;
            self.dp.set_policy(&e.name, &policy_from_config(e)?)?;
            self.decider.add_encoder(&e.name, now);
            if let Some(ifname) = e.host_interface() {
                let verdict = receive::ensure(&ifname, e.namespace().as_deref());
                self.set_receive(&e.name, verdict)?;
            }
        }
        let current: BTreeMap<_, _> = self
            .dp
            .channels()?
            .into_iter()
            .map(|c| (c.listen, c))
            .collect();
        for ch in &cfg.channels {
            let active = self.choose_initial(ch, current.get(&ch.listen).map(|c| &c.encoder));
            let members: Vec<&str> = ch.encoders.iter().map(String::as_str).collect();
            let before = current.get(&ch.listen).map(|c| c.encoder.clone());
            self.dp.set_channel(
                ch.listen,
                ch.encoder_port(),
                &active,
                &members,
                ch.protocol == config::Protocol::Srt,
            )?;
            self.decider.set_channel(&ch.name, policy(ch), &active);
            if before.as_deref() != Some(active.as_str()) {
                self.event(Some(&ch.name), before, Some(active.clone()), "configured");
            }
        }
        let listens: BTreeSet<_> = cfg.channels.iter().map(|c| c.listen).collect();
        for (listen, _) in current.iter().filter(|(l, _)| !listens.contains(l)) {
            self.dp.remove_channel(*listen)?;
        }
        let channel_names: BTreeSet<_> = cfg.channels.iter().map(|c| c.name.clone()).collect();
        for gone in self
            .input
            .keys()
            .filter(|n| !channel_names.contains(*n))
            .cloned()
            .collect::<Vec<_>>()
        {
            self.input.remove(&gone);
        }
        for name in self.decider.channel_names() {
            if !channel_names.contains(&name) {
                self.decider.remove_channel(&name);
            }
        }
        let names: BTreeSet<_> = cfg.encoders.iter().map(|e| e.name.as_str()).collect();
        for e in self.dp.encoders()? {
            if !names.contains(e.name.as_str()) {
                self.dp.remove_encoder(&e.name)?;
                self.decider.remove_encoder(&e.name);
            }
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
        self.effective
            .channel(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownChannel(name.to_owned()))
    }

    fn active_of(&self, ch: &config::Channel) -> Result<Option<String>> {
        Ok(self
            .dp
            .channels()?
            .into_iter()
            .find(|c| c.listen == ch.listen)
            .map(|c| c.encoder))
    }

    /// Manual failover: `channel` to `encoder`, which must be one of its encoders and not
    /// drained.
    pub fn remap(&mut self, channel: &str, encoder: &str) -> Result<()> {
        let ch = self.channel(channel)?;
        if self.effective.encoder(encoder).is_none() {
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

    /// Carries out a batch of decisions: every map write first, each tried whatever the
    /// others do, then the state persisted once. A map write that fails is retried by
    /// [`Controller::tick`] and raises a critical event; so does a persist that fails. A
    /// failover that has started finishes for every channel.
    fn apply_all(&mut self, decisions: Vec<Decision>) {
        if decisions.is_empty() {
            return;
        }
        for d in decisions {
            if let Err(e) = self.apply(d.clone()) {
                let reason = format!("repointing failed (critical), retrying: {e}");
                warn!("channel {}: {reason}", d.channel);
                self.event(
                    Some(&d.channel),
                    Some(d.from.clone()),
                    d.to.clone(),
                    &reason,
                );
                self.unapplied.retain(|u| u.channel != d.channel);
                self.unapplied.push(d);
            }
        }
        self.persist_or_report();
    }

    /// Retries the decisions whose map write failed (the newest for each channel).
    fn retry_unapplied(&mut self) {
        for d in std::mem::take(&mut self.unapplied) {
            // A channel removed since, or moved by a later decision, needs nothing.
            if self.decider.active(&d.channel) != d.to.as_deref() {
                continue;
            }
            if let Err(e) = self.apply(d.clone()) {
                debug!("channel {}: repointing still fails: {e}", d.channel);
                self.unapplied.push(d);
            } else {
                self.event(
                    Some(&d.channel),
                    None,
                    d.to.clone(),
                    "repointed after a retry",
                );
                self.persist_or_report();
            }
        }
    }

    /// Persists the state; a failure (a read-only or full disk) is a critical event, once per
    /// cause, and is retried by [`Controller::tick`] until it works.
    fn persist_or_report(&mut self) {
        match self.persist() {
            Ok(()) => {
                if self.persist_failed.take().is_some() {
                    self.event(None, None, None, "runtime state persisted again");
                }
            }
            Err(e) => {
                let why = e.to_string();
                if self.persist_failed.as_ref() != Some(&why) {
                    let reason = format!(
                        "persisting runtime state failed (critical), retrying; a restart now \
                         would lose the last changes: {why}"
                    );
                    warn!("{reason}");
                    self.event(None, None, None, &reason);
                    self.persist_failed = Some(why);
                }
            }
        }
    }

    /// Carries one decision out: the map write, the event. A decision without a target (no
    /// healthy backup) is only recorded. The caller persists.
    fn apply(&mut self, d: Decision) -> Result<()> {
        let Some(to) = d.to.clone() else {
            self.event(Some(&d.channel), Some(d.from), None, d.reason.as_str());
            return Ok(());
        };
        let ch = self.channel(&d.channel)?;
        let measure = matches!(d.reason, Reason::EncoderDown | Reason::Recovered)
            .then(|| self.switch_baseline(&d.channel, &d.from, &to))
            .flatten();
        self.dp.activate(ch.listen, &to)?;
        // Repoint first, then tell SRT callers: their reconnect must reach the new encoder.
        let reconnects =
            (ch.protocol == config::Protocol::Srt && d.from != to).then(|| self.srt_reconnect(&ch));
        self.delta.active.insert(d.channel.clone(), to.clone());
        self.record(Event {
            time: rfc3339(SystemTime::now()),
            channel: Some(d.channel.clone()),
            from: Some(d.from),
            to: Some(to),
            reason: d.reason.as_str().to_owned(),
            switchover_ms: None,
            srt_reconnects: reconnects,
        });
        self.pending.extend(measure);
        self.moved.push(d.channel);
        Ok(())
    }

    /// A successful probe of `encoder`: a sign of life, for switchover measurement.
    pub fn note_alive(&mut self, encoder: &str) {
        self.alive_ns.insert(encoder.to_owned(), monotonic_ns());
    }

    /// The start of a switchover: the failed encoder's last sign of life. The data plane
    /// forwards to a dead encoder until the switch, so its forwarded-packet time says nothing
    /// about when it died; its last reply through the return path (SRT ACKs, any answer) or
    /// its last successful probe, whichever is later, does. With neither, the last packet
    /// forwarded to it is used.
    /// Sends each live SRT caller of `ch` a SHUTDOWN from the channel's ingest address, three
    /// times a few ms apart (loss-safe; a caller ignores a wrong or stale ID). The caller drops
    /// its session at once and its new handshake lands on the encoder the channel now points
    /// to, instead of waiting out libsrt's ~5 s peer-idle timeout. Returns the callers told.
    fn srt_reconnect(&self, ch: &config::Channel) -> u32 {
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

    fn switch_baseline(&self, channel: &str, from: &str, to: &str) -> Option<PendingSwitch> {
        let old = self.dp.encoder_stats(from).ok()?;
        let new = self.dp.encoder_stats(to).ok()?;
        let alive = old
            .tx
            .last_seen_ns
            .max(self.alive_ns.get(from).copied().unwrap_or(0));
        Some(PendingSwitch {
            channel: channel.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            last_old_ns: if alive > 0 {
                alive
            } else {
                old.rx.last_seen_ns
            },
            new_packets: new.rx.packets,
            started: Instant::now(),
        })
    }

    /// Moves every channel off `encoder` and keeps them off until undrained. Refused, with
    /// nothing moved, when some channel would be left without a healthy encoder.
    pub fn drain(&mut self, encoder: &str) -> Result<()> {
        if self.effective.encoder(encoder).is_none() {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()));
        }
        let decisions = self
            .decider
            .drain(encoder, Instant::now())
            .map_err(|channel| {
                ControlError::Refused(format!(
                    "draining {encoder:?} would leave channel {channel:?} without a healthy encoder"
                ))
            })?;
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
        if self.effective.encoder(encoder).is_none() {
            return Err(ControlError::UnknownEncoder(encoder.to_owned()));
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
        if self.effective.encoder(encoder).is_none() {
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
        self.apply_all(decisions);
        Ok(())
    }

    /// Records whether a local encoder can receive (see [`receive::ensure`]): every repair
    /// and every change is an event, one that cannot receive is down (its channels fail
    /// over), and it comes back when it can receive again and its probe agrees.
    pub fn set_receive(&mut self, encoder: &str, verdict: Verdict) -> Result<()> {
        if self.effective.encoder(encoder).is_none() {
            return Ok(());
        }
        if let Some(done) = &verdict.repaired {
            warn!("encoder {encoder}: {done}");
            self.event(None, None, Some(encoder.to_owned()), done);
        }
        let before = self.receive.get(encoder).map(|v| v.can_receive);
        if before != Some(verdict.can_receive) {
            if verdict.can_receive {
                if before.is_some() {
                    let reason = format!("can receive again: {}", verdict.reason);
                    self.event(None, None, Some(encoder.to_owned()), &reason);
                }
            } else {
                let reason = format!("cannot receive (critical): {}", verdict.reason);
                warn!("encoder {encoder}: {reason}");
                self.event(None, Some(encoder.to_owned()), None, &reason);
            }
        }
        self.receive.insert(encoder.to_owned(), verdict);
        self.sync_health(encoder)
    }

    /// Local encoders whose interface readiness is watched: (name, host interface, the
    /// configured namespace to look for the peer in first).
    pub fn receive_targets(&self) -> Vec<(String, String, Option<String>)> {
        self.effective
            .encoders
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.host_interface()?, e.namespace())))
            .collect()
    }

    /// Puts the programs back on interfaces that were deleted and re-created (a driver
    /// reload, a container restart): the XDP program on the ingest interface, the TC program
    /// and the DEVMAP entry on each local encoder's veth. Each re-attach is an event; an
    /// interface that is gone is reported once and retried at the next call.
    pub fn check_attachments(&mut self) {
        let ingest = self.effective.ingest.interface.clone();
        match self.dp.ingest_attached(&ingest) {
            Ok(true) => {}
            Ok(false) => match self
                .dp
                .attach_ingest(&ingest, self.effective.ingest.xdp_mode.into())
            {
                Ok(_) => {
                    self.ingest_lost = None;
                    let reason = format!("XDP re-attached to ingest interface {ingest}");
                    warn!("{reason}");
                    self.event(None, None, None, &reason);
                    // Replies leave by the ingest interface's new index, and remote encoders
                    // are reached with its new MAC.
                    if let Err(e) = self.reconcile() {
                        warn!("re-applying the configuration after re-attaching: {e}");
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.ingest_lost.as_ref() != Some(&why) {
                        let reason = format!("ingest interface {ingest} lost (critical): {why}");
                        warn!("{reason}");
                        self.event(None, None, None, &reason);
                        self.ingest_lost = Some(why);
                    }
                }
            },
            Err(e) => warn!("checking the XDP link on {ingest}: {e}"),
        }
        let registered: BTreeMap<String, u32> = match self.dp.encoders() {
            Ok(list) => list.into_iter().map(|e| (e.name, e.ifindex)).collect(),
            Err(e) => {
                warn!("reading the encoders: {e}");
                return;
            }
        };
        for e in self.effective.encoders.clone() {
            let Some(ifname) = e.host_interface() else {
                continue;
            };
            // Gone: nothing to attach to; its receive check says so and fails it over.
            let Ok(link) = netns::link(&ifname) else {
                continue;
            };
            let stale = registered.get(&e.name) != Some(&link.ifindex)
                || !self.dp.egress_attached(&ifname).unwrap_or(false);
            if !stale {
                self.relink_failed.remove(&e.name);
                continue;
            }
            let relinked = encoder_spec(&e).and_then(|spec| {
                self.dp.upsert_encoder(&spec)?;
                self.dp.set_policy(&e.name, &policy_from_config(&e)?)?;
                Ok(())
            });
            match relinked {
                Ok(()) => {
                    self.relink_failed.remove(&e.name);
                    let reason = format!("re-attached to {ifname} (interface re-created)");
                    warn!("encoder {}: {reason}", e.name);
                    self.event(None, None, Some(e.name.clone()), &reason);
                }
                Err(err) => {
                    let why = err.to_string();
                    if self.relink_failed.get(&e.name) != Some(&why) {
                        let reason = format!("cannot re-attach to {ifname} (critical): {why}");
                        warn!("encoder {}: {reason}", e.name);
                        self.event(None, Some(e.name.clone()), None, &reason);
                        self.relink_failed.insert(e.name.clone(), why);
                    }
                }
            }
        }
    }

    /// Periodic work: automatic failback, input-loss watch, switchover measurements. Reports
    /// the channels moved and the switchovers measured since the last call.
    pub fn tick(&mut self) -> Result<TickReport> {
        let now = Instant::now();
        let decisions = self.decider.tick(now);
        self.apply_all(decisions);
        self.retry_unapplied();
        if self.persist_failed.is_some()
            && self
                .persist_tried
                .is_none_or(|t| now.duration_since(t) >= PERSIST_RETRY)
        {
            self.persist_tried = Some(now);
            self.persist_or_report();
        }
        // Input loss is judged over seconds: a tenth of a second is fine grain, and spares a
        // map read per channel on every tick.
        if self
            .input_watched
            .is_none_or(|t| now.duration_since(t) >= INPUT_WATCH_EVERY)
        {
            self.input_watched = Some(now);
            self.watch_input(now)?;
        }
        Ok(TickReport {
            switchovers: self.measure_switchovers(now),
            moved: std::mem::take(&mut self.moved),
        })
    }

    /// Input loss is the sender's problem, not the encoder's: reported, never failed over.
    fn watch_input(&mut self, now: Instant) -> Result<()> {
        for ch in self.effective.channels.clone() {
            let packets = self
                .dp
                .channel_stats(ch.listen)
                .map(|s| s.packets)
                .unwrap_or(0);
            let w = self.input.entry(ch.name.clone()).or_insert(InputWatch {
                packets,
                since: now,
                lost: false,
            });
            if packets != w.packets {
                let restored = w.lost;
                *w = InputWatch {
                    packets,
                    since: now,
                    lost: false,
                };
                if restored {
                    self.event(Some(&ch.name), None, None, "input restored");
                }
            } else if packets > 0 && !w.lost && now.duration_since(w.since) >= INPUT_LOSS_AFTER {
                w.lost = true;
                let active = self.decider.active(&ch.name).map(str::to_owned);
                self.event(Some(&ch.name), active, None, "input loss (no failover)");
            }
        }
        Ok(())
    }

    /// Whether a channel's input moved within `window` (for the flow check), from the data
    /// plane's last-seen time.
    pub fn input_moving(&self, channel: &str, window: Duration) -> bool {
        let Some(ch) = self.effective.channel(channel) else {
            return false;
        };
        self.dp.channel_stats(ch.listen).is_ok_and(|s| {
            s.packets > 0
                && monotonic_ns().saturating_sub(s.last_seen_ns) < window.as_nanos() as u64
        })
    }

    /// Something about an encoder worth an event (its supervised process exiting, ...).
    pub fn encoder_event(&mut self, encoder: &str, reason: String) {
        self.event(None, None, Some(encoder.to_owned()), &reason);
    }

    /// Channels an encoder is active for.
    pub fn channels_on(&self, encoder: &str) -> Vec<String> {
        self.decider.channels_on(encoder)
    }

    /// Switchover time: the old encoder's last sign of life to the new encoder's first packet
    /// (data-plane timestamps and probe times, all CLOCK_MONOTONIC). The new encoder's first packet is taken as its last-seen
    /// time when its count first moves, so the figure is at most one tick (plus one packet
    /// interval) late.
    fn measure_switchovers(&mut self, now: Instant) -> Vec<Switchover> {
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let Ok(new) = self.dp.encoder_stats(&p.to) else {
                continue;
            };
            if new.rx.packets > p.new_packets {
                let gap = Duration::from_nanos(new.rx.last_seen_ns.saturating_sub(p.last_old_ns));
                let ev = Event {
                    time: rfc3339(SystemTime::now()),
                    channel: Some(p.channel.clone()),
                    from: Some(p.from.clone()),
                    to: Some(p.to.clone()),
                    reason: "switchover complete".into(),
                    switchover_ms: Some(gap.as_secs_f64() * 1e3),
                    srt_reconnects: None,
                };
                self.record(ev);
                done.push(Switchover {
                    channel: p.channel,
                    gap,
                });
            } else if now.duration_since(p.started) < SWITCH_MEASURE_FOR {
                keep.push(p);
            }
        }
        self.pending = keep;
        done
    }

    /// Applies a candidate effective configuration: validated first; on any failure the
    /// previous delta is restored and the data plane reconciled back.
    fn change(&mut self, edit: impl FnOnce(&mut Delta)) -> Result<()> {
        let saved = self.delta.clone();
        edit(&mut self.delta);
        let candidate = self.delta.apply(&self.base);
        if let Err(e) = candidate.validate() {
            self.delta = saved;
            return Err(e.into());
        }
        let previous = std::mem::replace(&mut self.effective, candidate);
        if let Err(e) = self.reconcile() {
            // Managed encoders this change provisioned are taken away again.
            for enc in &self.effective.encoders {
                if previous.encoder(&enc.name).is_none()
                    && let Some(plan) = managed::Plan::of(enc)
                {
                    managed::deprovision_or_warn(&plan);
                }
            }
            self.delta = saved;
            self.effective = previous;
            if let Err(again) = self.reconcile() {
                warn!("restoring the data plane after a failed change: {again}");
            }
            return Err(e);
        }
        self.generation += 1;
        // The change is made: a state file that cannot be written is reported (and retried),
        // not presented as a refusal of what is already in the data plane.
        self.persist_or_report();
        Ok(())
    }

    pub fn add_channel(&mut self, ch: config::Channel) -> Result<()> {
        if self.effective.channel(&ch.name).is_some() {
            return Err(ControlError::Refused(format!(
                "channel {:?} already exists",
                ch.name
            )));
        }
        let name = ch.name.clone();
        self.change(|d| {
            d.removed_channels.remove(&ch.name);
            d.added_channels.push(ch);
        })?;
        let active = self.active_of(&self.channel(&name)?)?;
        self.event(Some(&name), None, active, "channel added");
        Ok(())
    }

    pub fn add_encoder(&mut self, e: config::Encoder) -> Result<()> {
        if self.effective.encoder(&e.name).is_some() {
            return Err(ControlError::Refused(format!(
                "encoder {:?} already exists",
                e.name
            )));
        }
        // Resolve before changing anything, for a clear error (a managed encoder's namespace
        // does not exist yet: it is made by the change itself).
        if e.spawn.is_none() {
            encoder_spec(&e)?;
        }
        let name = e.name.clone();
        self.change(|d| {
            d.removed_encoders.remove(&e.name);
            d.added_encoders.push(e);
        })?;
        self.event(None, None, Some(name), "encoder added");
        Ok(())
    }

    pub fn remove_channel(&mut self, name: &str) -> Result<()> {
        let ch = self.channel(name)?;
        let active = self.active_of(&ch)?;
        self.change(|d| {
            d.added_channels.retain(|c| c.name != ch.name);
            d.active.remove(&ch.name);
            d.removed_channels.insert(ch.name.clone());
        })?;
        self.event(Some(name), active, None, "channel removed");
        Ok(())
    }

    pub fn remove_encoder(&mut self, name: &str) -> Result<()> {
        if self.effective.encoder(name).is_none() {
            return Err(ControlError::UnknownEncoder(name.to_owned()));
        }
        if let Some(ch) = self
            .effective
            .channels
            .iter()
            .find(|c| c.encoders.iter().any(|e| e == name))
        {
            return Err(ControlError::Refused(format!(
                "encoder {name:?} is still used by channel {:?} (remove it there first)",
                ch.name
            )));
        }
        self.change(|d| {
            d.added_encoders.retain(|e| e.name != name);
            d.drained.remove(name);
            d.removed_encoders.insert(name.to_owned());
        })?;
        self.event(None, Some(name.to_owned()), None, "encoder removed");
        Ok(())
    }

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
            });
        }
        Ok(Status { channels, encoders })
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.iter().cloned().collect()
    }

    /// Records an event: logged, kept in the ring, appended to the events file.
    fn event(
        &mut self,
        channel: Option<&str>,
        from: Option<String>,
        to: Option<String>,
        reason: &str,
    ) {
        self.record(Event {
            time: rfc3339(SystemTime::now()),
            channel: channel.map(str::to_owned),
            from,
            to,
            reason: reason.to_owned(),
            switchover_ms: None,
            srt_reconnects: None,
        });
    }

    fn record(&mut self, ev: Event) {
        info!(
            "event: channel={} from={} to={} reason={}",
            ev.channel.as_deref().unwrap_or("-"),
            ev.from.as_deref().unwrap_or("-"),
            ev.to.as_deref().unwrap_or("-"),
            ev.reason
        );
        if let Err(e) = append_line(&self.events_path, &ev) {
            warn!("events file {}: {e}", self.events_path.display());
        }
        if self.events.len() == EVENT_RING {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Writes the delta atomically (temporary file, then rename).
    fn persist(&self) -> Result<()> {
        let err = |e: std::io::Error| ControlError::State {
            path: self.state_path.display().to_string(),
            why: e.to_string(),
        };
        let tmp = self.state_path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&self.delta).expect("delta serializes");
        let mut f = private_file(&tmp, false).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &self.state_path).map_err(err)
    }
}

/// What the data plane needs for a configured encoder; a local encoder's MAC is looked up in
/// its namespace unless the config gives it.
pub fn encoder_spec(e: &config::Encoder) -> Result<EncoderSpec> {
    let err = |why: String| ControlError::Encoder {
        name: e.name.clone(),
        why,
    };
    let mac = match (&e.mac, e.host_interface(), e.namespace()) {
        (Some(m), _, _) => config::parse_mac(m).ok_or_else(|| err(format!("bad MAC {m:?}")))?,
        // A local encoder receives on its veth's peer: that peer's MAC, found wherever its
        // namespace is (named or not); an interface that is not a veth is looked up by the
        // encoder's address in its namespace.
        (None, Some(ifname), ns) => match receive::peer_mac(&ifname, ns.as_deref()) {
            Ok(mac) => mac,
            Err(peer_err) => match &ns {
                Some(ns) => {
                    netns::link_with_addr(ns, e.address)
                        .map_err(|x| err(format!("{ifname}'s peer: {peer_err}; {x}")))?
                        .mac
                }
                None => return Err(err(format!("{ifname}'s peer: {peer_err}"))),
            },
        },
        (None, None, Some(ns)) => {
            netns::link_with_addr(&ns, e.address)
                .map_err(|x| err(x.to_string()))?
                .mac
        }
        (None, None, None) => {
            return Err(err(
                "no `mac` and no `netns` or `interface` to find it by: set one of them".into(),
            ));
        }
    };
    let link = match e.host_interface() {
        Some(ifname) => EncoderLink::Local { ifname },
        None => EncoderLink::Remote,
    };
    Ok(EncoderSpec {
        name: e.name.clone(),
        addr: e.address,
        mac,
        link,
    })
}

/// Sends the SHUTDOWNs from the ingest address (IP_FREEBIND: the address need not be
/// configured on this host for the packets to carry it).
fn send_srt_shutdowns(from: SocketAddr, callers: &[(SocketAddr, u32)]) -> std::io::Result<()> {
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

/// Moves an unusable state file aside (`<file>.bad-<unix seconds>`); returns the event's
/// reason.
fn set_aside_state(path: &Path, why: &str) -> Result<String> {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = path.with_extension(format!("json.bad-{secs}"));
    fs::rename(path, &aside).map_err(|e| ControlError::State {
        path: path.display().to_string(),
        why: format!("{why}; moving it aside failed: {e}"),
    })?;
    Ok(format!(
        "state file {} unusable (critical), moved to {}; started from the config file: {why}",
        path.display(),
        aside.display()
    ))
}

/// Opens a file nsfail writes (state, events) readable by root only: spawn arguments can
/// hold an SRT passphrase.
fn private_file(path: &Path, append: bool) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(path)
}

fn append_line<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut f = private_file(path, true)?;
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    f.write_all(&line)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the data plane's last-seen times.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// `2026-11-27T23:09:47.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The kernel egress policy of a configured encoder: its allow-list, and the protocol and port
/// its health check is answered from (the daemon probes from the ingest host, so the answers
/// pass whatever the allow-list says).
pub fn policy_from_config(e: &config::Encoder) -> Result<crate::dataplane::EgressPolicy> {
    use crate::{
        config::{AllowProto, HealthKind},
        dataplane::{EgressPolicy, HealthAnswers},
    };
    let err = |why: String| ControlError::Encoder {
        name: e.name.clone(),
        why,
    };
    let allow = e.allow_rules().map_err(|x| err(x.to_string()))?;
    let answers = |proto, port| HealthAnswers { proto, port };
    let health = match e.health.kind {
        HealthKind::Udp => e.health.port.map(|p| answers(AllowProto::Udp, p)),
        HealthKind::Tcp => e.health.port.map(|p| answers(AllowProto::Tcp, p)),
        HealthKind::Http => match e.health.url.as_deref() {
            Some(url) => {
                let url = crate::health::HttpUrl::parse(url).map_err(err)?;
                Some(answers(AllowProto::Tcp, url.port))
            }
            None => None,
        },
        HealthKind::Exec | HealthKind::Flow => None,
    };
    Ok(EgressPolicy { allow, health })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_820_987_123);
        assert_eq!(rfc3339(t), "2026-11-27T23:09:47.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn state_files_sit_beside_the_config() {
        let p = Path::new("/etc/nsfail/site.toml");
        assert_eq!(state_path(p), Path::new("/etc/nsfail/site.state.json"));
        assert_eq!(events_path(p), Path::new("/etc/nsfail/site.events.jsonl"));
    }
}
