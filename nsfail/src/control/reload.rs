//! Reloading the config file (`SIGHUP`, `nsfail reload`): the difference between the running
//! configuration and the file is worked out object by object (the steps, which are also what
//! the events and the answer report), validated whole, and applied by one reconcile as a
//! runtime change is: each object that differs is written on its own (every map write
//! atomic), a channel the file did not change is not touched in a way its stream could notice,
//! and a failure puts the running configuration back whole. Linear in the number of channels,
//! however many changed.
//!
//! Who wins: the file wins for every object whose definition the file's edit touched (added,
//! changed or removed in the file since it was last loaded); runtime changes made with the CLI
//! to objects the edit did not touch stay (a channel added with `nsfail add` and not in the
//! file, an encoder removed with `nsfail remove` and unchanged in the file, drains, remaps).
//! Ingest settings that need a restart (interface, namespace, XDP mode, metrics address) keep
//! their running values and are reported.

use super::*;
use crate::api::ReloadReport;

/// One object's change.
#[derive(Clone, Debug)]
pub(super) enum Step {
    RemoveChannel(String),
    PutEncoder { encoder: config::Encoder, new: bool },
    PutChannel { channel: config::Channel, new: bool },
    RemoveEncoder(String),
    Ingest,
}

impl Step {
    pub(super) fn describe(&self) -> String {
        let verb = |new: bool| if new { "added" } else { "changed" };
        match self {
            Self::RemoveChannel(name) => format!("channel {name} removed"),
            Self::PutEncoder { encoder, new } => format!("encoder {} {}", encoder.name, verb(*new)),
            Self::PutChannel { channel, new } => format!("channel {} {}", channel.name, verb(*new)),
            Self::RemoveEncoder(name) => format!("encoder {name} removed"),
            Self::Ingest => "ingest settings changed".into(),
        }
    }
}

impl Controller {
    /// Re-reads the config file the daemon was started with and applies the difference. A
    /// file that cannot be used (syntax, unknown key, a semantic or host problem) is refused
    /// with its error, naming the line, and an event; nothing changes then.
    pub fn reload(&mut self) -> Result<ReloadReport> {
        let result = Config::load_for_host(&self.config_path)
            .map_err(ControlError::from)
            .and_then(|new| self.reload_clustered(new));
        match &result {
            Ok(report) => {
                let reason = match report.changes.len() {
                    0 => "config reloaded: no changes".to_owned(),
                    n => format!(
                        "config reloaded: {n} changes ({})",
                        report.changes.join(", ")
                    ),
                };
                info!("{reason}");
                self.event(None, None, None, &reason);
                if !report.at_restart.is_empty() {
                    let reason = format!(
                        "config reloaded: {} changed in the file, kept as running until the next \
                         start",
                        report.at_restart.join(", ")
                    );
                    warn!("{reason}");
                    self.event(None, None, None, &reason);
                }
            }
            Err(e) => {
                let reason = format!("config reload refused, nothing changed: {e}");
                warn!("{reason}");
                self.event(None, None, None, &reason);
            }
        }
        result
    }

    /// Applies `new` (the file's contents, parsed and validated) as a reload: see the module
    /// comment for what wins. All or nothing: a step that fails undoes the steps made.
    pub fn reload_with(&mut self, new: Config) -> Result<ReloadReport> {
        self.reload_from(new, "reload")
    }

    /// [`Controller::reload_with`], with `origin` naming in the events what brought the
    /// change (`reload`, or `cluster` for a change read from etcd).
    pub(super) fn reload_from(&mut self, mut new: Config, origin: &str) -> Result<ReloadReport> {
        let mut report = ReloadReport::default();
        let running = self.effective.ingest.clone();
        let restart_only = [
            (
                "ingest.interface",
                running.interface != new.ingest.interface,
            ),
            ("ingest.netns", running.netns != new.ingest.netns),
            ("ingest.xdp_mode", running.xdp_mode != new.ingest.xdp_mode),
            ("ingest.metrics", running.metrics != new.ingest.metrics),
        ];
        report.at_restart = restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| (*key).to_owned())
            .collect();
        new.ingest.interface = running.interface.clone();
        new.ingest.netns = running.netns.clone();
        new.ingest.xdp_mode = running.xdp_mode;
        new.ingest.metrics = running.metrics;

        let delta = kept_delta(&self.loaded, &self.delta, &new);
        let target = delta.apply(&new);
        target.validate().map_err(|e| {
            ControlError::Refused(format!(
                "the new config with the runtime changes kept is not valid: {e}"
            ))
        })?;
        let steps = steps(&self.effective, &target);
        let saved_delta = self.delta.clone();
        self.delta = delta;
        if steps.is_empty() {
            // Nothing to write; the same objects, in the file's order (for status).
            self.effective = target;
            self.lookup = self.effective.lookup();
        } else {
            let written = if steps
                .iter()
                .all(|s| matches!(s, Step::PutChannel { new: true, .. }))
            {
                // New channels and nothing else (a channel added to a cluster's etcd): each
                // written on its own, as `add channel` writes one; the switch's reconcile
                // would write all the others again (about 100 ms at 10,000 channels, for
                // each one added).
                self.add_new_channels(target, &steps)
            } else {
                // One switch to the target, not one per step: the reconcile writes each
                // object that differs on its own (every map write atomic), encoders before
                // the channels that use them and removals last, and leaves every unchanged
                // object alone; it walks the channels once however many changed (a switch
                // per step made a reload of many changes cost changes x channels). On
                // failure it puts the running configuration back whole.
                self.switch_to(target)
            };
            self.generation += 1;
            if let Err(e) = written {
                self.delta = saved_delta;
                return Err(ControlError::Refused(format!(
                    "{e}; the reload was undone (it would have made: {})",
                    steps
                        .iter()
                        .map(Step::describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            for step in &steps {
                self.step_event(step, origin);
                report.changes.push(step.describe());
            }
        }
        self.loaded = Loaded::of(&new);
        self.persist_or_report();
        Ok(report)
    }

    /// Makes `target` the effective configuration when it differs from it only by the new
    /// channels of `steps` (all [`Step::PutChannel`] with `new`), writing only those. On a
    /// failure the previous configuration is restored and the data plane reconciled back.
    fn add_new_channels(&mut self, target: Config, steps: &[Step]) -> Result<()> {
        let previous = std::mem::replace(&mut self.effective, target);
        self.lookup = self.effective.lookup();
        for step in steps {
            let Step::PutChannel { channel: ch, .. } = step else {
                continue;
            };
            if let Err(e) = self.program_new_channel(ch) {
                self.restore(previous);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn step_event(&mut self, step: &Step, origin: &str) {
        let reason = format!("{} ({origin})", step.describe());
        match step {
            Step::RemoveChannel(name) => self.event(Some(name), None, None, &reason),
            Step::PutChannel { channel, .. } => {
                let active = self.decider.active(&channel.name).map(str::to_owned);
                self.event(Some(&channel.name), None, active, &reason);
            }
            Step::PutEncoder { encoder, .. } => {
                self.event(None, None, Some(encoder.name.clone()), &reason)
            }
            Step::RemoveEncoder(name) => self.event(None, Some(name.clone()), None, &reason),
            Step::Ingest => self.event(None, None, None, &reason),
        }
    }
}

/// What a reload compares the file with: the config file as last loaded (at start-up or by
/// the last reload), kept small. Its encoders (a few) whole; its channels (up to 100,000: a
/// copy of them all held 18 MiB) as one fingerprint each, since a reload only asks of a
/// channel whether the file's edit touched it.
pub(super) struct Loaded {
    encoders: Vec<config::Encoder>,
    /// (hash of the name, hash of the whole definition) per channel, sorted.
    channels: Vec<(u64, u64)>,
}

/// A 64-bit SipHash with fixed keys: stable for the life of the process, which is all a
/// fingerprint needs. Two different definitions of a channel, or two names, share one with
/// odds of about 1 in 10^19 per pair.
fn fingerprint(x: &(impl std::hash::Hash + ?Sized)) -> u64 {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(x)
}

impl Loaded {
    pub(super) fn of(cfg: &Config) -> Self {
        let mut channels: Vec<(u64, u64)> = cfg
            .channels
            .iter()
            .map(|c| (fingerprint(c.name.as_str()), fingerprint(c)))
            .collect();
        channels.sort_unstable();
        Self {
            encoders: cfg.encoders.clone(),
            channels,
        }
    }

    /// Takes in a channel added since (a cluster's channel added on its own, without a whole
    /// reload), as [`Loaded::of`] would have.
    pub(super) fn insert_channel(&mut self, channel: &config::Channel) {
        let entry = (fingerprint(channel.name.as_str()), fingerprint(channel));
        let at = self.channels.partition_point(|e| *e < entry);
        self.channels.insert(at, entry);
    }

    /// Whether the file's edit touched the channel `name`, `now` being its definition in the
    /// file now: added, removed or changed since the file was last loaded. (A name that
    /// shares its hash with another channel's counts as touched, whatever the odds.)
    fn touched(&self, name: &str, now: Option<&config::Channel>) -> bool {
        let key = fingerprint(name);
        let from = self.channels.partition_point(|&(n, _)| n < key);
        let mut then = self.channels[from..]
            .iter()
            .take_while(|&&(n, _)| n == key)
            .map(|&(_, print)| print);
        match (then.next(), then.next(), now) {
            (None, _, None) => false,
            (Some(print), None, Some(now)) => print != fingerprint(now),
            _ => true,
        }
    }
}

/// The runtime delta kept over `new` (the file as it is now; `old`: as last loaded): entries
/// for objects the file's edit touched go (the file wins there), and so do remaps and drains
/// of objects that are gone.
fn kept_delta(old: &Loaded, delta: &Delta, new: &Config) -> Delta {
    let mut delta = delta.clone();
    let new_c = Names::channels(new);
    let touched = |name: &str| old.touched(name, new_c.get(name));
    let (old_e, new_e) = (Names(first_by_name(&old.encoders)), Names::encoders(new));
    let encoders: BTreeSet<&str> = old_e
        .names()
        .chain(new_e.names())
        .filter(|n| old_e.get(n) != new_e.get(n))
        .collect();
    delta.added_channels.retain(|c| !touched(&c.name));
    delta.removed_channels.retain(|n| !touched(n));
    delta
        .added_encoders
        .retain(|e| !encoders.contains(e.name.as_str()));
    delta
        .removed_encoders
        .retain(|n| !encoders.contains(n.as_str()));
    let target = delta.apply(new);
    let (target_c, target_e) = (Names::channels(&target), Names::encoders(&target));
    delta
        .active
        .retain(|ch, enc| target_c.get(ch).is_some_and(|c| c.encoders.contains(enc)));
    delta.drained.retain(|e| target_e.get(e).is_some());
    delta
}

/// A config's channels or encoders by name (the first of a name, as [`Config::channel`]
/// finds it): what the comparisons of a reload look up, once per object rather than by a walk
/// of the list each time (a reload of 100,000 channels was quadratic).
struct Names<'a, T>(HashMap<&'a str, &'a T>);

impl<'a> Names<'a, config::Channel> {
    fn channels(cfg: &'a Config) -> Self {
        let mut m = HashMap::with_capacity(cfg.channels.len());
        for c in &cfg.channels {
            m.entry(c.name.as_str()).or_insert(c);
        }
        Self(m)
    }
}

impl<'a> Names<'a, config::Encoder> {
    fn encoders(cfg: &'a Config) -> Self {
        Self(first_by_name(&cfg.encoders))
    }
}

fn first_by_name(encoders: &[config::Encoder]) -> HashMap<&str, &config::Encoder> {
    let mut m = HashMap::with_capacity(encoders.len());
    for e in encoders {
        m.entry(e.name.as_str()).or_insert(e);
    }
    m
}

impl<'a, T> Names<'a, T> {
    fn get(&self, name: &str) -> Option<&'a T> {
        self.0.get(name).copied()
    }

    fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.0.keys().copied()
    }
}

/// The changes from `cur` to `target`, one object each, for the events and the answer, in
/// the order an operator reads them: channels that go, encoders that come or change, channels
/// that change, channels that come, encoders that go.
fn steps(cur: &Config, target: &Config) -> Vec<Step> {
    let (cur_c, target_c) = (Names::channels(cur), Names::channels(target));
    let (cur_e, target_e) = (Names::encoders(cur), Names::encoders(target));
    let mut steps: Vec<Step> = cur
        .channels
        .iter()
        .filter(|c| target_c.get(&c.name).is_none())
        .map(|c| Step::RemoveChannel(c.name.clone()))
        .collect();
    for e in &target.encoders {
        match cur_e.get(&e.name) {
            Some(x) if x == e => {}
            found => steps.push(Step::PutEncoder {
                encoder: e.clone(),
                new: found.is_none(),
            }),
        }
    }
    for new in [false, true] {
        for c in &target.channels {
            match cur_c.get(&c.name) {
                Some(x) if x == c => {}
                found if found.is_none() == new => steps.push(Step::PutChannel {
                    channel: c.clone(),
                    new,
                }),
                _ => {}
            }
        }
    }
    steps.extend(
        cur.encoders
            .iter()
            .filter(|e| target_e.get(&e.name).is_none())
            .map(|e| Step::RemoveEncoder(e.name.clone())),
    );
    if cur.ingest != target.ingest {
        steps.push(Step::Ingest);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[ingest]\ninterface = \"eth0\"\n\n\
             [[encoder]]\nname = \"a\"\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:01\"\nhealth = {{ kind = \"flow\" }}\n\n\
             [[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nmac = \"02:00:00:00:00:02\"\nhealth = {{ kind = \"flow\" }}\n\n\
             [[channel]]\nname = \"cam1\"\nlisten = \"10.0.0.1:5000\"\nencoders = [\"a\", \"b\"]\n\n\
             {extra}"
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    #[test]
    fn steps_remove_channels_first_and_encoders_last() {
        let cur = cfg(
            "[[encoder]]\nname = \"c\"\naddress = \"10.0.0.4\"\nmac = \"02:00:00:00:00:03\"\nhealth = { kind = \"flow\" }\n\n\
             [[channel]]\nname = \"old\"\nlisten = \"10.0.0.1:5002\"\nencoders = [\"c\"]\n",
        );
        let target = cfg(
            "[[encoder]]\nname = \"d\"\naddress = \"10.0.0.5\"\nmac = \"02:00:00:00:00:04\"\nhealth = { kind = \"flow\" }\n\n\
             [[channel]]\nname = \"new\"\nlisten = \"10.0.0.1:5002\"\nencoders = [\"d\"]\n",
        );
        let described: Vec<String> = steps(&cur, &target).iter().map(Step::describe).collect();
        assert_eq!(
            described,
            [
                "channel old removed",
                "encoder d added",
                "channel new added",
                "encoder c removed"
            ]
        );
        assert!(
            steps(&cur, &cur).is_empty(),
            "nothing to do for the same config"
        );
    }

    #[test]
    fn the_file_wins_only_where_its_edit_touched() {
        let old = cfg("");
        let extra = |name: &str, port: u16| -> config::Channel {
            let mut c = old.channels[0].clone();
            c.name = name.into();
            c.listen = format!("10.0.0.1:{port}").parse().unwrap();
            c
        };
        let delta = Delta {
            v: 1,
            added_channels: vec![extra("cli", 5010), extra("both", 5012)],
            removed_channels: ["cam1".to_owned()].into(),
            drained: ["b".to_owned()].into(),
            active: [("cli".to_owned(), "b".to_owned())].into(),
            ..Default::default()
        };
        // The file gains `both` (on another port) and changes nothing else.
        let mut new = old.clone();
        new.channels.push(extra("both", 5014));
        let kept = kept_delta(&Loaded::of(&old), &delta, &new);
        let names: Vec<&str> = kept
            .added_channels
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["cli"],
            "the runtime-only channel stays; the file's `both` wins"
        );
        assert!(
            kept.removed_channels.contains("cam1"),
            "an untouched removal stays"
        );
        assert!(kept.drained.contains("b") && kept.active["cli"] == "b");
        assert_eq!(
            kept.apply(&new).channel("both").unwrap().listen.port(),
            5014
        );

        // The file drops encoder b: its drain goes with it, and the remap onto it.
        let mut new = old.clone();
        new.encoders.retain(|e| e.name != "b");
        new.channels[0].encoders = vec!["a".into()];
        let mut delta = delta.clone();
        delta.added_channels.clear();
        delta.active = [("cam1".to_owned(), "b".to_owned())].into();
        let kept = kept_delta(&Loaded::of(&old), &delta, &new);
        assert!(
            kept.drained.is_empty() && kept.active.is_empty(),
            "{kept:?}"
        );
        assert!(
            kept.removed_channels.is_empty(),
            "the file's edit of cam1 wins"
        );
    }

    #[test]
    fn a_changed_health_interval_is_one_encoder_step() {
        let cur = cfg("");
        let mut target = cur.clone();
        target.encoders[0].health.interval_ms = 50;
        let described: Vec<String> = steps(&cur, &target).iter().map(Step::describe).collect();
        assert_eq!(described, ["encoder a changed"]);
    }
}
