//! Events: every decision and observation, logged, kept in a ring and appended to the
//! events file (by the writer thread); the clocks they are stamped with.

use super::*;

impl Controller {
    /// The events in the ring (call [`Controller::drain_events`] first for the pending ones).
    pub fn events(&self) -> Vec<Event> {
        self.events.iter().cloned().collect()
    }

    /// Records an event: logged, kept in the ring, appended to the events file.
    pub(super) fn event(
        &mut self,
        channel: Option<&str>,
        from: Option<String>,
        to: Option<String>,
        reason: &str,
    ) {
        self.record(Event {
            time: String::new(),
            channel: channel.map(str::to_owned),
            from,
            to,
            reason: reason.to_owned(),
            switchover_ms: None,
            srt_reconnects: None,
        });
    }

    /// Records an event: stamped now, then, by [`Controller::drain_events`], logged, kept in
    /// the ring and appended to the events file. An event without a time gets this one.
    pub(super) fn record(&mut self, ev: Event) {
        self.pending_events.push_back((SystemTime::now(), ev));
    }

    /// Events not yet logged, kept and written.
    pub fn events_pending(&self) -> usize {
        self.pending_events.len()
    }

    /// Logs, keeps and writes up to `max` pending events, oldest first. A failover of many
    /// channels records an event per channel: the actor drains them a few at a time between
    /// requests, so that a `status` is not kept waiting for the bookkeeping of a failover
    /// whose map writes are done.
    pub fn drain_events(&mut self, max: usize) {
        for _ in 0..max {
            let Some((at, mut ev)) = self.pending_events.pop_front() else {
                // A start-up or a failover of many channels queues an event per channel:
                // the queue's room for them (20 MiB at 100,000 channels) goes once they are
                // written.
                if self.pending_events.capacity() > EVENT_RING {
                    self.pending_events.shrink_to_fit();
                }
                return;
            };
            if ev.time.is_empty() {
                ev.time = rfc3339(at);
            }
            info!(
                "event: channel={} from={} to={} reason={}",
                ev.channel.as_deref().unwrap_or("-"),
                ev.from.as_deref().unwrap_or("-"),
                ev.to.as_deref().unwrap_or("-"),
                ev.reason
            );
            // Appended by the writer thread, with whatever else is pending.
            let limits = &self.effective.daemon;
            self.writer
                .event(ev.clone(), limits.events_max_bytes, limits.events_keep);
            if self.events.len() == EVENT_RING {
                self.events.pop_front();
            }
            self.events.push_back(ev);
        }
    }

    /// Something about an encoder worth an event (its supervised process exiting, ...).
    pub fn encoder_event(&mut self, encoder: &str, reason: String) {
        self.event(None, None, Some(encoder.to_owned()), &reason);
    }
}

/// Appends `ev` as one JSON line to the events file at `path`; first, when the line would
/// take a non-empty file past `max_bytes`, the file is rotated: `path` becomes `path.1`,
/// `path.1` becomes `path.2`, ..., and the oldest beyond `keep` is removed.
pub(super) fn append_event(
    path: &Path,
    ev: &Event,
    max_bytes: u64,
    keep: u32,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(ev)?;
    line.push(b'\n');
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if size > 0 && size + line.len() as u64 > max_bytes {
        rotate(path, keep)?;
    }
    private_file(path, true)?.write_all(&line)
}

/// `path.N`, a rotated events file.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if keep == 0 {
        return gone(fs::remove_file(path));
    }
    gone(fs::remove_file(rotated(path, keep)))?;
    for n in (1..keep).rev() {
        gone(fs::rename(rotated(path, n), rotated(path, n + 1)))?;
    }
    fs::rename(path, rotated(path, 1))
}

/// `2026-11-27T23:09:47.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    /// `2026-11-27T23:09:47.123Z`: UTC, milliseconds.
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .expect("every SystemTime after 1970 has this form")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the data plane's last-seen times.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
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

    fn event(i: usize) -> Event {
        Event {
            time: "2026-12-05T13:00:00.000Z".into(),
            channel: Some(format!("cam{i:02}")),
            from: None,
            to: None,
            reason: "x".repeat(100),
            switchover_ms: None,
            srt_reconnects: None,
        }
    }

    #[test]
    fn events_rotate_at_the_size_limit_and_keep_n() {
        let dir = std::env::temp_dir().join(format!("nsfail-rot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.events.jsonl");
        let len = serde_json::to_vec(&event(0)).unwrap().len() as u64 + 1;
        // Room for exactly 4 lines a file.
        let max = 4 * len;
        for i in 0..4 {
            append_event(&path, &event(i), max, 2).unwrap();
        }
        assert_eq!(fs::metadata(&path).unwrap().len(), max, "full, not rotated");
        assert!(!rotated(&path, 1).exists());
        append_event(&path, &event(4), max, 2).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            len,
            "the fifth line starts a file"
        );
        assert_eq!(fs::metadata(rotated(&path, 1)).unwrap().len(), max);
        for i in 5..13 {
            append_event(&path, &event(i), max, 2).unwrap();
        }
        // 13 lines: 12 and 8..=11 and 4..=7 kept; 0..=3 rotated out (keep 2).
        let lines = |p: &Path| -> Vec<String> {
            fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Event>(l).unwrap().channel.unwrap())
                .collect()
        };
        assert_eq!(lines(&path), vec!["cam12"]);
        assert_eq!(
            lines(&rotated(&path, 1)),
            vec!["cam08", "cam09", "cam10", "cam11"]
        );
        assert_eq!(
            lines(&rotated(&path, 2)),
            vec!["cam04", "cam05", "cam06", "cam07"]
        );
        assert!(!rotated(&path, 3).exists());
        use std::os::unix::fs::PermissionsExt as _;
        for p in [path.clone(), rotated(&path, 1)] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
