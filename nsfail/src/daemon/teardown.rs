//! `nsfail teardown`: what a daemon leaves in place on purpose so that forwarding outlives it
//! (its managed encoders, the pinned data plane, the anycast routes of a cluster host, the
//! lock file of its pin directory), removed.

use std::{io, net::IpAddr, os::unix::fs::MetadataExt as _};

use serde::{Deserialize, Serialize};

use super::*;
use crate::net::{announce, netns};

/// Where a cluster host's daemon announces its ingest addresses, recorded at its start (one
/// file per pin directory, [`Pins::announce_record`]) for [`teardown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceRecord {
    /// `ingest.netns`; `None`: the namespace the daemon was started in.
    pub netns: Option<String>,
    /// The inode of the daemon's network namespace, to tell it from teardown's own.
    pub netns_inode: u64,
    pub table: u32,
}

/// What [`teardown`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Managed encoders stopped.
    pub managed: usize,
    /// The announce table, and the ingest addresses withdrawn from it.
    pub withdrawn: Option<(u32, Vec<IpAddr>)>,
}

/// The calling thread's network namespace's inode.
fn own_netns() -> io::Result<u64> {
    fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
}

/// Records where this daemon announces (written once at start, replaced whole).
pub(super) fn record_announce(pins: &Pins, netns: Option<&str>, table: u32) -> io::Result<()> {
    let record = AnnounceRecord {
        netns: netns.map(str::to_owned),
        netns_inode: own_netns()?,
        table,
    };
    let path = pins.announce_record();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    fs::write(
        &tmp,
        serde_json::to_vec(&record).expect("a record serializes"),
    )?;
    fs::rename(&tmp, &path)
}

/// Stops the managed encoders, detaches and unpins the data plane, withdraws the announced
/// routes and removes the pin directory's lock file unless a daemon holds it.
pub fn teardown(pins: &Pins) -> Result<Removed> {
    let managed = records::teardown(pins);
    Dataplane::teardown(pins)?;
    let withdrawn = withdraw_recorded(pins)?;
    remove_lock(pins);
    Ok(Removed { managed, withdrawn })
}

/// Withdraws every nsfail route from the recorded announce table, in the recorded namespace
/// (one deleted since took its routes with it), and forgets the record.
fn withdraw_recorded(pins: &Pins) -> Result<Option<(u32, Vec<IpAddr>)>> {
    let path = pins.announce_record();
    let record: AnnounceRecord = match fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => {
            serde_json::from_slice(&other.with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("{}: not an announce record", path.display()))?
        }
    };
    let table = record.table;
    let withdrawn = match &record.netns {
        Some(ns) if !paths::netns(ns).exists() => Vec::new(),
        Some(ns) => netns::in_netns(ns, move || announce::withdraw(table))
            .and_then(|r| r)
            .with_context(|| format!("withdrawing the routes of table {table} in {ns}"))?,
        None if own_netns()? != record.netns_inode => bail!(
            "the routes of table {table} are in the daemon's network namespace (inode {}), \
             not this one: run nsfail teardown there",
            record.netns_inode
        ),
        None => announce::withdraw(table)
            .with_context(|| format!("withdrawing the routes of table {table}"))?,
    };
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Some((table, withdrawn)))
}

/// Removes the pin directory's lock file when no daemon holds it (taken first, so a running
/// daemon's is left alone).
fn remove_lock(pins: &Pins) {
    let path = pins.lock_file();
    let Ok(file) = fs::File::open(&path) else {
        return;
    };
    if let Ok(_held) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        && let Err(e) = fs::remove_file(&path)
    {
        warn!("removing {}: {e}", path.display());
    }
}
