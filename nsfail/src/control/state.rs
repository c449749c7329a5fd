//! Runtime changes kept as a delta over the config file, in a state file beside it, written
//! atomically and readable by root only; events appended beside it. A state file that cannot
//! be written is reported and retried, one that cannot be read is moved aside.

use super::*;

impl Controller {
    /// Writes the delta atomically (temporary file, then rename).
    pub(super) fn persist(&self) -> Result<()> {
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

    /// Persists the state; a failure (a read-only or full disk) is a critical event, once per
    /// cause, and is retried by [`Controller::tick`] until it works.
    pub(super) fn persist_or_report(&mut self) {
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
