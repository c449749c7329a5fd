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
/// The persistent demo lab of `nsfail lab up`: its record, the daemon config it writes, the
/// streams its encoders receive and its processes' logs.
pub const LAB_DIR: &str = "/run/nsfail/lab";
/// The cluster lab of `nsfail lab cluster up`: its record, the hosts' configs, sockets and
/// logs, etcd's data, the BIRD configs and the streams its encoders receive.
pub const LAB_CLUSTER_DIR: &str = "/run/nsfail/lab-cluster";
/// The running kernel's own type information.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where a daemon's lock on its pin directory is kept (bpffs holds no regular files).
pub const LOCK_DIR: &str = "/run/nsfail/locks";
/// Where the daemon keeps what its managed encoders' processes need across its restarts
/// (their identities and output FIFOs), one directory per pin directory.
pub const CHILDREN_DIR: &str = "/run/nsfail/children";
/// Where a cluster daemon records the routing table it announces its ingest addresses in
/// (and the namespace of that table), one file per pin directory, so that `nsfail teardown`
/// can withdraw them.
pub const ANNOUNCE_DIR: &str = "/run/nsfail/announce";
/// Where the kernel shows processes.
pub const PROC: &str = "/proc";

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

    /// The file a daemon holds an exclusive lock on while it serves this pin directory, with
    /// its PID and socket inside: `/run/nsfail/locks/<pin dir, '/' as '_'>.lock`.
    pub fn lock_file(&self) -> PathBuf {
        Path::new(LOCK_DIR).join(format!("{}.lock", self.tail()))
    }

    /// The pin directory as one file name: its path under bpffs, '/' as '_'.
    fn tail(&self) -> String {
        self.root
            .strip_prefix(BPFFS)
            .unwrap_or(&self.root)
            .to_string_lossy()
            .trim_matches('/')
            .replace('/', "_")
    }

    /// The managed encoders of the daemon serving this pin directory:
    /// `/run/nsfail/children/<pin dir, '/' as '_'>/`, holding [`Pins::children_record`] and
    /// one output FIFO per encoder.
    pub fn children_dir(&self) -> PathBuf {
        Path::new(CHILDREN_DIR).join(self.tail())
    }

    /// The running managed encoders' identities, for the next daemon to adopt them.
    pub fn children_record(&self) -> PathBuf {
        self.children_dir().join("running.json")
    }

    /// A managed encoder's output FIFO (stdout and stderr both).
    pub fn child_output(&self, encoder: &str) -> PathBuf {
        self.children_dir().join(format!("{encoder}.out"))
    }

    /// The announce table of the daemon serving this pin directory:
    /// `/run/nsfail/announce/<pin dir, '/' as '_'>.json`.
    pub fn announce_record(&self) -> PathBuf {
        Path::new(ANNOUNCE_DIR).join(format!("{}.json", self.tail()))
    }

    /// The link of one of the redirect tracepoints (`xdp_devmap_xmit`, `xdp_redirect_err`).
    pub fn trace_link(&self, tracepoint: &str) -> PathBuf {
        self.links().join(format!("trace_{tracepoint}"))
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

/// The layout of one lab directory (`nsfail lab up`), owned whole by that lab: `lab down`
/// removes it.
#[derive(Clone, Debug)]
pub struct LabDir {
    root: PathBuf,
}

impl LabDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What `lab up` made (namespaces, processes), as JSON; `lab down` removes exactly that.
    pub fn record(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    /// The record while it is being replaced (written, then renamed over `record`).
    pub fn record_tmp(&self) -> PathBuf {
        self.root.join("lab.json.tmp")
    }

    /// The daemon config written for the lab.
    pub fn config(&self) -> PathBuf {
        self.root.join("nsfail.toml")
    }

    /// The stream an encoder receives, appended as it arrives.
    pub fn output(&self, encoder: &str) -> PathBuf {
        self.root.join(format!("{encoder}.ts"))
    }

    /// One lab process's stderr (and stdout, unless that is a stream).
    pub fn log(&self, process: &str) -> PathBuf {
        self.root.join(format!("{process}.log"))
    }

    /// A cluster lab host's daemon config.
    pub fn host_config(&self, host: &str) -> PathBuf {
        self.root.join(format!("{host}.toml"))
    }

    /// A cluster lab host's control socket.
    pub fn socket(&self, host: &str) -> PathBuf {
        self.root.join(format!("{host}.sock"))
    }

    /// The config of the BIRD named `name` (a cluster lab host's, or the router's).
    pub fn bird_config(&self, name: &str) -> PathBuf {
        self.root.join(format!("bird-{name}.conf"))
    }

    /// That BIRD's control socket (`birdc -s` it).
    pub fn bird_socket(&self, name: &str) -> PathBuf {
        self.root.join(format!("bird-{name}.ctl"))
    }

    /// etcd's data directory.
    pub fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }
}

/// One file of process `pid` under [`PROC`] (`stat`, `cmdline`, ...).
pub fn proc_file(pid: u32, name: &str) -> PathBuf {
    Path::new(PROC).join(pid.to_string()).join(name)
}

/// A lab's pin directory named `name` (a cluster lab host's data plane, or the programs the
/// lab pins itself).
pub fn lab_pins(name: &str) -> PathBuf {
    Path::new(BPFFS).join(name)
}

/// A named network namespace's handle.
pub fn netns(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// A process's network namespace handle.
pub fn proc_netns(pid: u32) -> PathBuf {
    proc_file(pid, "ns/net")
}
