//! The controller's file writes, on a thread of their own: events appended to the events file
//! and the state file replaced, so that a failover's bookkeeping (an append per event, an
//! fsync of the state) never holds up the controller. Jobs queued together are written
//! together: every pending event in one append, only the newest state once.
//!
//! The state file's outcome comes back to the controller ([`Writer::outcomes`]), which reports
//! and retries a failure. [`Writer::flush`] waits until everything queued is on disk (an
//! operator's request is answered only then); dropping the writer does the same.

use std::{
    path::PathBuf,
    sync::mpsc::{self, Receiver, Sender},
    thread::{self, JoinHandle},
};

use super::*;

enum Job {
    /// An event, and the events file's size limit and rotated files to keep.
    Event(Event, u64, u32),
    /// The state file's whole new text.
    State(String),
    /// Answered once every job before it is done.
    Flush(Sender<()>),
}

pub(super) struct Writer {
    tx: Option<Sender<Job>>,
    outcomes: Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(state_path: PathBuf, events_path: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel();
        let (out_tx, outcomes) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("nsfail-writer".into())
            .spawn(move || run(rx, out_tx, &state_path, &events_path))
            .expect("spawning the writer thread");
        Self {
            tx: Some(tx),
            outcomes,
            thread: Some(thread),
        }
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Err: the thread is gone (it panicked); logged when it is joined.
            let _ = tx.send(job);
        }
    }

    pub(super) fn event(&self, ev: Event, max_bytes: u64, keep: u32) {
        self.send(Job::Event(ev, max_bytes, keep));
    }

    pub(super) fn state(&self, text: String) {
        self.send(Job::State(text));
    }

    /// Waits until everything queued so far is written (or has failed).
    pub(super) fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        let _ = rx.recv();
    }

    /// Outcomes of state writes since the last call, oldest first.
    pub(super) fn outcomes(&self) -> Vec<Result<(), String>> {
        self.outcomes.try_iter().collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("the writer thread panicked: events or state may be missing");
        }
    }
}

fn run(
    rx: Receiver<Job>,
    outcomes: Sender<Result<(), String>>,
    state_path: &Path,
    events_path: &Path,
) {
    while let Ok(first) = rx.recv() {
        let mut events = Vec::new();
        let mut state = None;
        let mut flushes = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Event(ev, max_bytes, keep) => events.push((ev, max_bytes, keep)),
                Job::State(text) => state = Some(text),
                Job::Flush(done) => flushes.push(done),
            }
        }
        for (ev, max_bytes, keep) in &events {
            if let Err(e) = events::append_event(events_path, ev, *max_bytes, *keep) {
                warn!("events file {}: {e}", events_path.display());
                break;
            }
        }
        if let Some(text) = state {
            let outcome = write_state(state_path, &text).map_err(|e| {
                ControlError::State {
                    path: state_path.display().to_string(),
                    why: e.to_string(),
                }
                .to_string()
            });
            // Err: the controller is gone; nobody is left to tell.
            let _ = outcomes.send(outcome);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Writes the state atomically: a temporary file, synced, then renamed over the old one.
fn write_state(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = private_file(&tmp, false)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
