//! Log lines, on stderr. Under systemd (stderr is the journal's stream, `JOURNAL_STREAM`):
//! plain lines with a syslog priority prefix (`<6>`) and no timestamp, since the journal
//! stamps them; elsewhere with a timestamp. The level: `RUST_LOG` when set, else the config's
//! `ingest.log_level` (changed by a reload), else info.

use std::{env, io::Write as _, os::unix::fs::MetadataExt as _};

use log::{Level, LevelFilter};

use crate::config::LogLevel;

/// Installs the logger; call once, first thing.
pub fn init() {
    let mut builder = env_logger::Builder::new();
    match env::var("RUST_LOG") {
        Ok(spec) => {
            builder.parse_filters(&spec);
        }
        // Everything passes the logger's own filter: the global maximum, which a config's
        // `log_level` sets, decides.
        Err(_) => {
            builder.filter_level(LevelFilter::Trace);
        }
    }
    if under_journal() {
        // One journal entry per record: a multi-line message (a debug dump) is one line.
        builder.format(|buf, record| {
            let message = record.args().to_string().replace('\n', " ");
            writeln!(
                buf,
                "<{}>{}: {message}",
                priority(record.level()),
                record.target(),
            )
        });
    }
    builder.init();
    set_level(None);
}

/// Sets the level from the config, unless `RUST_LOG` says otherwise.
pub fn set_level(level: Option<LogLevel>) {
    if env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level.map_or(LevelFilter::Info, LevelFilter::from));
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode
/// (systemd sets it for the service; a child whose stderr was redirected must not believe it).
fn under_journal() -> bool {
    let Some(stream) = env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// The syslog priority of a level (sd-daemon(3)).
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}
