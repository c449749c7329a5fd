//! Runtime changes kept as a delta over the config file, in a state file beside it, written
//! atomically and readable by root only; events appended beside it. A state file that cannot
//! be written is reported and retried, one that cannot be read is moved aside.

use super::*;

impl Controller {
    /// Queues the delta to be written atomically (temporary file, then rename) on the writer
    /// thread: once per batch of decisions, however many channels moved. Its outcome is
    /// picked up by [`Controller::check_persisted`].
    pub(super) fn persist_or_report(&mut self) {
        let text = serde_json::to_string_pretty(&self.delta).expect("delta serializes");
        self.persist_tried = Some(Instant::now());
        self.writer.state(text);
    }

    /// Reports what the writer thread made of the state file: a failure (a read-only or full
    /// disk) is a critical event, once per cause, and is retried every [`PERSIST_RETRY`]
    /// until it works.
    pub(super) fn check_persisted(&mut self, now: Instant) {
        for outcome in self.writer.outcomes() {
            match outcome {
                Ok(()) => {
                    if self.persist_failed.take().is_some() {
                        self.event(None, None, None, "runtime state persisted again");
                    }
                }
                Err(why) => {
                    if self.persist_failed.as_ref() != Some(&why) {
                        let reason = format!(
                            "persisting runtime state failed (critical), retrying; a restart \
                             now would lose the last changes: {why}"
                        );
                        warn!("{reason}");
                        self.event(None, None, None, &reason);
                        self.persist_failed = Some(why);
                    }
                }
            }
        }
        if self.persist_failed.is_some()
            && self
                .persist_tried
                .is_none_or(|t| now.duration_since(t) >= PERSIST_RETRY)
        {
            self.persist_or_report();
        }
    }

    /// Waits until every event and state write queued so far is on disk, and reports the
    /// state's outcome: an operator's change is answered only once it is persisted (or
    /// reported as not).
    pub fn flush(&mut self) {
        self.drain_events(usize::MAX);
        self.writer.flush();
        self.check_persisted(Instant::now());
    }
}

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
    /// `nsfail drain host`: this cluster host announces none of its ingest addresses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_drained: bool,
}

impl Delta {
    /// The effective configuration: the file's, with the runtime changes applied.
    pub fn apply(&self, base: &Config) -> Config {
        // An added entry replaces any of the same name; of several, the last one counts, in
        // its place. Linear: no list is searched per entry.
        fn last_of<T>(added: &[T], name: impl Fn(&T) -> &str) -> Vec<&T> {
            let mut last = std::collections::HashMap::new();
            for (i, x) in added.iter().enumerate() {
                last.insert(name(x), i);
            }
            added
                .iter()
                .enumerate()
                .filter(|(i, x)| last[name(x)] == *i)
                .map(|(_, x)| x)
                .collect()
        }
        let encoders = last_of(&self.added_encoders, |e| &e.name);
        let channels = last_of(&self.added_channels, |c| &c.name);
        let added_e: BTreeSet<&str> = encoders.iter().map(|e| e.name.as_str()).collect();
        let added_c: BTreeSet<&str> = channels.iter().map(|c| c.name.as_str()).collect();
        let mut cfg = Config {
            ingest: base.ingest.clone(),
            encoders: Vec::new(),
            channels: Vec::new(),
            daemon: base.daemon.clone(),
            cluster: base.cluster.clone(),
        };
        cfg.encoders.extend(
            base.encoders
                .iter()
                .filter(|e| {
                    !self.removed_encoders.contains(&e.name) && !added_e.contains(e.name.as_str())
                })
                .cloned(),
        );
        cfg.encoders.extend(encoders.into_iter().cloned());
        cfg.channels.reserve(base.channels.len() + channels.len());
        cfg.channels.extend(
            base.channels
                .iter()
                .filter(|c| {
                    !self.removed_channels.contains(&c.name) && !added_c.contains(c.name.as_str())
                })
                .cloned(),
        );
        cfg.channels.extend(channels.into_iter().cloned());
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

pub(super) fn sibling(config: &Path, ext: &str) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "nsfail".into());
    config.with_file_name(format!("{stem}.{ext}"))
}

/// Moves an unusable state file aside (`<file>.bad-<unix seconds>`); returns the event's
/// reason.
pub(super) fn set_aside_state(path: &Path, why: &str) -> Result<String> {
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
pub(super) fn private_file(path: &Path, append: bool) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn state_files_sit_beside_the_config() {
        let p = Path::new("/etc/nsfail/site.toml");
        assert_eq!(state_path(p), Path::new("/etc/nsfail/site.state.json"));
        assert_eq!(events_path(p), Path::new("/etc/nsfail/site.events.jsonl"));
    }
}
