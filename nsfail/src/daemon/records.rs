//! What a daemon records about its managed encoders' running processes, so that the next
//! daemon on the same pin directory adopts them instead of starting them again: per encoder,
//! the encoder as it was configured and the process's [`Identity`]. Kept under /run (a reboot
//! forgets PIDs, and so does this record), readable by root only.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
    time::{Duration, Instant},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    child::{self, ENCODER_GRACE, Identity},
    config::Encoder,
    net::provision,
    paths::Pins,
};

/// One running managed encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) encoder: Encoder,
    pub(super) process: Identity,
}

/// The record file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    v: u32,
    running: BTreeMap<String, Record>,
}

/// Makes the children directory (0700).
pub(super) fn make_dir(pins: &Pins) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pins.children_dir())
}

/// Reads the records a previous daemon left; an unreadable record is reported and ignored
/// (its processes are then neither adopted nor stopped).
pub(super) fn load(pins: &Pins) -> BTreeMap<String, Record> {
    let path = pins.children_record();
    match fs::read_to_string(&path) {
        Ok(text) => match serde_json::from_str::<File>(&text) {
            Ok(f) => f.running,
            Err(e) => {
                warn!("{}: not a record of running encoders: {e}", path.display());
                BTreeMap::new()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            warn!("{}: {e}", path.display());
            BTreeMap::new()
        }
    }
}

fn save(path: &Path, running: &BTreeMap<String, Record>) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(&File {
        v: 1,
        running: running.clone(),
    })?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&text)?;
    fs::rename(&tmp, path)
}

/// Keeps the record file in line with the supervisors, one write at a time (off the
/// runtime thread).
#[derive(Clone)]
pub(super) struct Recorder {
    tx: mpsc::UnboundedSender<(String, Option<Record>)>,
}

impl Recorder {
    pub(super) fn start(
        pins: &Pins,
        mut running: BTreeMap<String, Record>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Option<Record>)>();
        let path = pins.children_record();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut apply = |(name, record): (String, Option<Record>)| match record {
                    Some(r) => {
                        running.insert(name, r);
                    }
                    None => {
                        running.remove(&name);
                    }
                };
                apply(first);
                while let Ok(more) = rx.try_recv() {
                    apply(more);
                }
                let (path, snapshot) = (path.clone(), running.clone());
                match tokio::task::spawn_blocking(move || save(&path, &snapshot)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(
                        "recording managed encoders' processes: {e} (a restarted daemon \
                         may not adopt them)"
                    ),
                    Err(e) => warn!("recording managed encoders' processes: {e}"),
                }
            }
        });
        (Self { tx }, task)
    }

    pub(super) fn set(&self, name: &str, record: Option<Record>) {
        // Err: the recorder has ended, which happens only once every supervisor has.
        let _ = self.tx.send((name.to_owned(), record));
    }
}

/// Stops a recorded process that no daemon supervises any more (its encoder is gone):
/// SIGTERM to its group, SIGKILL after [`ENCODER_GRACE`]. Only a process that still is the
/// one recorded, in the encoder's namespace, is signalled. Blocking.
pub(super) fn stop_recorded(name: &str, record: &Record) {
    let Some(ns) = record.encoder.namespace() else {
        return;
    };
    if let Err(why) = record.process.check(&ns) {
        info!("managed encoder {name}: nothing to stop ({why})");
        return;
    }
    let pgid = record.process.pid;
    let alive = || Identity::of(pgid).is_ok_and(|now| now == record.process);
    if let Err(e) = child::signal_group(pgid, nix::sys::signal::Signal::SIGTERM) {
        warn!("managed encoder {name}: SIGTERM: {e}");
    }
    let until = Instant::now() + ENCODER_GRACE;
    while alive() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = child::signal_group(pgid, nix::sys::signal::Signal::SIGKILL) {
        warn!("managed encoder {name}: SIGKILL: {e}");
    }
    info!("managed encoder {name}: process {pgid} stopped");
}

/// `nsfail teardown`: stops every managed encoder a daemon on `pins` recorded, removes their
/// namespaces and veths, and forgets them. Returns how many there were.
pub fn teardown(pins: &Pins) -> usize {
    let running = load(pins);
    for (name, record) in &running {
        stop_recorded(name, record);
        if let Some(plan) = record.encoder.provision_plan() {
            provision::deprovision_or_warn(&plan);
        }
    }
    forget(pins);
    running.len()
}

/// Removes the children directory (record and output FIFOs).
pub(super) fn forget(pins: &Pins) {
    let dir = pins.children_dir();
    if let Err(e) = fs::remove_dir_all(&dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", dir.display());
    }
}
