//! Encoders in the operator's world: namespaces and veths made with `ip` and `unshare`, as an
//! operator's script or a container runtime makes them, not by nsfail or its lab. GRO on the
//! inner peer is left at the kernel's default (off) and no XDP program is put on it: making
//! them able to receive redirected frames is nsfail's job.
//!
//! Every object is uniquely named and removed on drop, panics included.

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use nsfail::lab::Netns;

use crate::{ChildGuard, run, unique, wait_for};

/// A network namespace with no name: held only by a process (`unshare --net sleep`), as a
/// container's is. Ends with the process, which is killed by PID on drop.
pub struct Unnamed {
    holder: ChildGuard,
}

impl Unnamed {
    pub fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn unshare --net");
        let ns = Self {
            holder: ChildGuard { child },
        };
        // Until unshare has run, the process is still in this namespace.
        let own = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        let moved = wait_for(Duration::from_secs(10), || {
            let theirs = std::fs::read_link(ns.path()).ok()?;
            (theirs != own).then_some(())
        });
        assert!(moved.is_some(), "unshare --net did not make a namespace");
        ns.run(|| run("ip", &["link", "set", "lo", "up"]));
        ns
    }

    pub fn pid(&self) -> u32 {
        self.holder.child.id()
    }

    /// `/proc/PID/ns/net` of the holding process.
    pub fn path(&self) -> PathBuf {
        nsfail::paths::proc_netns(self.pid())
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let target = File::open(self.path()).expect("open the unnamed namespace");
        std::thread::spawn(move || {
            setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread inside the unnamed namespace")
    }

    /// Spawns `cmd` inside the namespace (`nsenter --net`), killed by PID on drop.
    pub fn spawn(&self, cmd: &str, args: &[&str]) -> ChildGuard {
        let net = format!("--net={}", self.path().display());
        let mut full = vec![net.as_str(), cmd];
        full.extend_from_slice(args);
        ChildGuard::spawn("nsenter", &full)
    }
}

impl Default for Unnamed {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a foreign encoder's inner veth lives.
pub enum Home {
    Named(Netns),
    Unnamed(Unnamed),
}

impl Home {
    /// The namespace handle: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Named(ns) => nsfail::paths::netns(&ns.name),
            Self::Unnamed(u) => u.path(),
        }
    }

    /// What `ip link set DEV netns X` takes: the name or the PID.
    fn ip_target(&self) -> String {
        match self {
            Self::Named(ns) => ns.name.clone(),
            Self::Unnamed(u) => u.pid().to_string(),
        }
    }

    /// Runs `ip ARGS` inside.
    pub fn ip(&self, args: &[&str]) {
        match self {
            Self::Named(ns) => ns.ip(args).expect("ip in the encoder namespace"),
            Self::Unnamed(u) => {
                let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                u.run(move || {
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    run("ip", &a)
                })
            }
        }
    }
}

/// An encoder namespace made the way an operator makes one: `ip link add HOST type veth peer
/// name eth0 netns X` from the ingest namespace, addresses and a default route by `ip`.
pub struct ForeignEncoder {
    pub home: Home,
    /// Host side, in the ingest namespace.
    pub host_if: String,
    pub inner_if: &'static str,
    /// The encoder's address and the host side's, on a /24.
    pub addr: String,
    pub host_addr: String,
}

impl ForeignEncoder {
    /// `net` picks the /24 (10.88.`net`.0/24); `rt` is the ingest namespace.
    pub fn new(rt: &Netns, home: Home, net: u8) -> Self {
        let e = Self {
            home,
            host_if: unique("fv"),
            inner_if: "eth0",
            addr: format!("10.88.{net}.2"),
            host_addr: format!("10.88.{net}.1"),
        };
        e.plug(rt);
        e
    }

    /// Creates the veth pair and addresses it (again, after [`ForeignEncoder::unplug`]).
    pub fn plug(&self, rt: &Netns) {
        let target = self.home.ip_target();
        rt.ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            self.inner_if,
            "netns",
            &target,
        ])
        .expect("veth pair into the encoder namespace");
        rt.ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host_addr),
            "dev",
            &self.host_if,
        ])
        .expect("host address");
        rt.ip(&["link", "set", &self.host_if, "up"])
            .expect("host side up");
        self.home.ip(&[
            "addr",
            "add",
            &format!("{}/24", self.addr),
            "dev",
            self.inner_if,
        ]);
        self.home.ip(&["link", "set", self.inner_if, "up"]);
        self.home
            .ip(&["route", "add", "default", "via", &self.host_addr]);
    }

    /// Deletes the veth pair (both ends), as a container restart or a driver reload does.
    pub fn unplug(&self, rt: &Netns) {
        rt.ip(&["link", "del", &self.host_if])
            .expect("delete the veth");
    }

    /// Whether GRO is on at the inner peer (read with ethtool inside).
    pub fn peer_gro(&self) -> bool {
        let path = self.home.path();
        let inner = self.inner_if;
        let out = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["ethtool", "-k", inner])
            .output()
            .expect("ethtool -k");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "generic-receive-offload: on")
    }

    /// Turns GRO at the inner peer off, as an operator's tuning script might.
    pub fn peer_gro_off(&self) {
        let path = self.home.path();
        run(
            "nsenter",
            &[
                &format!("--net={}", path.display()),
                "ethtool",
                "-K",
                self.inner_if,
                "gro",
                "off",
            ],
        );
    }
}
