//! Test fixtures for nsfail's integration tests: RAII guards for everything a test creates in
//! the kernel (namespaces, veths, pin directories, processes), so that every path out of a
//! test, panics included, cleans up after itself.
//!
//! Every name is unique to the test process and call (`unique`), so tests can run in parallel.

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use nsfail::{Dataplane, paths::Pins};

pub mod cluster;
pub mod daemon;
pub mod foreign;
pub mod frames;
pub mod hosts;
pub mod srt;
pub mod traffic;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `{prefix}{pid % 10000}x{n}`. Interface names
/// must stay under 16 bytes, so keep prefixes to 4 characters.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 10000)
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A uniquely named network namespace, deleted on drop.
pub struct Netns(pub nsfail::lab::Netns);

impl Netns {
    pub fn new(prefix: &str) -> Self {
        Self(nsfail::lab::Netns::new(&unique(prefix)).expect("create namespace"))
    }
}

impl std::ops::Deref for Netns {
    type Target = nsfail::lab::Netns;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Runs `ip` inside namespace `ns`, panicking on failure.
pub fn ip_in(ns: &str, args: &[&str]) {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full);
}

/// Spawns `cmd` inside namespace `ns` (`ip netns exec`), killed when the guard drops.
pub fn spawn_in(ns: &nsfail::lab::Netns, cmd: &str, args: &[&str]) -> ChildGuard {
    let mut full = vec!["netns", "exec", &ns.name, cmd];
    full.extend_from_slice(args);
    ChildGuard::spawn("ip", &full)
}

/// The lab of `nsfail::lab` with namespace names unique to this test.
pub fn lab(encoders: usize) -> nsfail::lab::Lab {
    nsfail::lab::Lab::new(&unique("l"), encoders).expect("build the lab")
}

/// Switches the calling thread into a namespace until dropped. Used where a library call
/// (aya's attach by interface name) must run in the test's namespace on this thread.
pub struct Entered {
    home: File,
}

impl Entered {
    pub fn new(ns: &nsfail::lab::Netns) -> Self {
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(nsfail::paths::netns(&ns.name)).expect("test netns");
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        Self { home }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET);
    }
}

/// A pin directory for one test's data plane, torn down on drop.
pub struct PinDir {
    pub pins: Pins,
}

impl PinDir {
    pub fn new() -> Self {
        let root = PathBuf::from(nsfail::paths::BPFFS).join(unique("nsfail-test-"));
        Self {
            pins: Pins::new(root),
        }
    }

    pub fn open(&self) -> Dataplane {
        Dataplane::open(self.pins.clone()).expect("open data plane")
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Also what a daemon left on purpose: managed encoders, announced routes.
        if let Err(e) = nsfail::daemon::teardown(&self.pins) {
            eprintln!("teardown of {}: {e}", self.pins.root().display());
        }
    }
}

/// A child process, killed (by its PID) and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(cmd: &str, args: &[&str]) -> Self {
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
