//! The maps against what this process wrote: CHANNELS and REPLIES have one writer, this
//! type, and its [`Mirror`] holds what it wrote. Anything else in them (a `bpftool map
//! update`, a second daemon that got past the lock, a bug) is put back, a little at a time so
//! that 100,000 channels cost no more per call than ten.

use std::{collections::HashSet, net::SocketAddr};

use super::*;

/// What an audit found wrong and put right.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Entries that were missing or differed from what nsfail wrote, written again.
    pub rewritten: usize,
    /// Entries nsfail never wrote, removed.
    pub removed: usize,
}

impl Repairs {
    pub fn any(&self) -> bool {
        self.rewritten + self.removed > 0
    }
}

impl Dataplane {
    /// Compares the kernel's CHANNELS entry of the channel on `listen`, and its REPLIES
    /// entries, with what nsfail wrote, and writes back whatever differs or is missing. A
    /// channel nsfail does not have is left to [`Dataplane::remove_foreign`].
    pub fn audit_channel(&mut self, listen: SocketAddr) -> Result<Repairs> {
        let key = endpoint(listen);
        let mut repairs = Repairs::default();
        let Some(&wanted) = self.mirror.channels.get(&key) else {
            return Ok(repairs);
        };
        if self.channels.get(&key).ok() != Some(wanted) {
            self.channels
                .insert(key, wanted)
                .map_err(map_err("CHANNELS"))?;
            repairs.rewritten += 1;
        }
        for rkey in self.mirror.replies_of(&key) {
            let Some(&wanted) = self.mirror.replies.get(&rkey) else {
                continue;
            };
            if self.replies.get(&rkey, 0).ok() != Some(wanted) {
                self.replies
                    .insert(rkey, wanted, 0)
                    .map_err(map_err("REPLIES"))?;
                repairs.rewritten += 1;
            }
        }
        Ok(repairs)
    }

    /// Removes every CHANNELS and REPLIES entry nsfail did not write: a walk of both maps'
    /// keys (one syscall per entry), for an audit's round, not for every call.
    pub fn remove_foreign(&mut self) -> Result<Repairs> {
        let mut repairs = Repairs::default();
        let foreign: HashSet<Endpoint> = self
            .channels
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                !self.mirror.channels.contains_key(k) && !self.mirror.transit.contains_key(k)
            })
            .collect();
        for k in foreign {
            self.channels.remove(&k).map_err(map_err("CHANNELS"))?;
            repairs.removed += 1;
        }
        let foreign: HashSet<Endpoint> = self
            .replies
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !self.mirror.replies.contains_key(k))
            .collect();
        for k in foreign {
            self.replies.remove(&k).map_err(map_err("REPLIES"))?;
            repairs.removed += 1;
        }
        Ok(repairs)
    }
}
