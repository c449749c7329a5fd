//! Every path nsfail uses, in one place. Nothing else spells a path.

use std::path::{Path, PathBuf};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The production pin directory.
pub const PIN_DIR: &str = "/sys/fs/bpf/nsfail";
/// The daemon's control socket.
pub const SOCKET: &str = "/run/nsfail/nsfail.sock";
/// Named network namespaces (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/run/netns";

/// The layout of one pin directory: maps, programs and links of one data plane.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps are pinned by name in here (`CHANNELS`, `REPLIES`, ...).
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The XDP link on the ingest interface.
    pub fn xdp_link(&self, ifname: &str) -> PathBuf {
        self.links().join(format!("xdp_{ifname}"))
    }

    /// The TC link on an encoder's host-side veth.
    pub fn tc_link(&self, ifname: &str) -> PathBuf {
        self.links().join(format!("tc_{ifname}"))
    }
}

impl Default for Pins {
    fn default() -> Self {
        Self::new(PIN_DIR)
    }
}

/// A named network namespace's handle.
pub fn netns(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}
