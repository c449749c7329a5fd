//! Running the real `nsfail` binary in tests: a daemon guard (stopped on drop), CLI calls with
//! their exit status, and a config for a lab.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use nsfail::lab::Lab;

use crate::{ChildGuard, PinDir, unique, wait_for};

/// The product binary, `target/<profile>/nsfail`: beside a binary of this package (the
/// benchmarks), or one level up from an integration test's `deps/` directory. `cargo test
/// --workspace` (what `cargo xtask test` runs) and `cargo xtask bench` build it.
pub fn nsfail_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().expect("target directory");
    let candidates = [dir.join("nsfail"), dir.join("../nsfail")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing: build it with `cargo build -p nsfail` (cargo xtask test does)",
                candidates[1].display()
            )
        })
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("nsfail-test-"));
        fs::create_dir_all(&path).expect("temp dir");
        Self { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The result of one CLI call.
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliOut {
    /// A finished process's exit code (-1: killed by a signal) and its output as text.
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `nsfail --socket SOCKET ARGS...` to completion.
pub fn cli(socket: &Path, args: &[&str]) -> CliOut {
    let out: Output = Command::new(nsfail_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nsfail");
    out.into()
}

/// `nsfail status --json`, parsed.
pub fn status(socket: &Path) -> serde_json::Value {
    let out = cli(socket, &["status", "--json"]);
    assert_eq!(out.code, 0, "status failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status --json is JSON")
}

/// Per-encoder health and cam2's failback, for [`lab_config_with`].
pub struct Policy<'a> {
    /// The `health = { ... }` inline table of enc-a and of enc-b.
    pub health: [&'a str; 2],
    /// cam2's failback: `manual` or `auto`.
    pub failback: &'a str,
    pub hold_down_ms: u64,
    /// cam1's protocol: `srt` or `udp`.
    pub cam1_protocol: &'a str,
    /// More TOML lines for cam1's and cam2's tables (`sources = [...]`, ...), or "".
    pub cam1_extra: &'a str,
    pub cam2_extra: &'a str,
}

/// The design setting of a `udp` check: an echo every 100 ms, 100 ms timeout, fall 3.
pub const HEALTH_DESIGN: &str = "{ kind = \"udp\", port = 9000 }";
/// For an encoder that is not meant to fail: a busy test machine may starve a responder
/// thread for a few probes, which must not fail it over.
pub const HEALTH_TOLERANT: &str = "{ kind = \"udp\", port = 9000, fall = 5 }";

impl Default for Policy<'_> {
    fn default() -> Self {
        Self {
            health: [HEALTH_DESIGN; 2],
            failback: "manual",
            hold_down_ms: 10_000,
            cam1_protocol: "srt",
            cam1_extra: "",
            cam2_extra: "",
        }
    }
}

impl Policy<'_> {
    /// The default with [`HEALTH_TOLERANT`] checks: for tests in which nothing fails.
    pub fn tolerant() -> Self {
        Self {
            health: [HEALTH_TOLERANT; 2],
            ..Self::default()
        }
    }
}

/// The config of a daemon on `lab`: channel cam1 on 10.77.0.1:5000 (SRT, encoder port 7000)
/// and cam2 on 10.77.0.1:5002 (UDP, encoder port 7002), both on enc-a then enc-b.
pub fn lab_config(lab: &Lab) -> String {
    lab_config_with(lab, &Policy::default())
}

/// [`lab_config`] with other health checks and failback.
pub fn lab_config_with(lab: &Lab, policy: &Policy) -> String {
    let mut s = format!(
        "[ingest]\ninterface = \"ing\"\nnetns = \"{}\"\nxdp_mode = \"native\"\n\
         metrics = \"127.0.0.1:9464\"\n\n",
        lab.rt.name
    );
    for (i, name) in ["enc-a", "enc-b"]
        .iter()
        .enumerate()
        .take(lab.encoders.len())
    {
        let e = &lab.encoders[i];
        s += &format!(
            "[[encoder]]\nname = \"{name}\"\naddress = \"{}\"\ninterface = \"{}\"\n\
             netns = \"{}\"\nhealth = {}\n\n",
            e.addr4, e.host_if, e.ns.name, policy.health[i]
        );
    }
    s += &format!(
        "[[channel]]\nname = \"cam1\"\nlisten = \"10.77.0.1:5000\"\n\
         encoders = [\"enc-a\", \"enc-b\"]\nport = 7000\nprotocol = \"{}\"\n{}\n\
         [[channel]]\nname = \"cam2\"\nlisten = \"10.77.0.1:5002\"\n\
         encoders = [\"enc-a\", \"enc-b\"]\nport = 7002\n{}",
        policy.cam1_protocol,
        extra_lines(policy.cam1_extra),
        extra_lines(policy.cam2_extra)
    );
    s += &format!(
        "failback = \"{}\"\nhold_down_ms = {}\n",
        policy.failback, policy.hold_down_ms
    );
    s
}

/// `extra` as whole TOML lines (a newline after it unless empty).
fn extra_lines(extra: &str) -> String {
    if extra.is_empty() {
        String::new()
    } else {
        format!("{}\n", extra.trim_end())
    }
}

/// A running daemon, stopped with SIGTERM (then SIGKILL) on drop. Its data plane stays pinned
/// until the test's [`PinDir`] is dropped.
pub struct Daemon {
    pub child: ChildGuard,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, socket: &Path, pins: &PinDir) -> Self {
        Self::start_bin(&nsfail_bin(), config, socket, pins)
    }

    /// [`Daemon::start`] with another build of nsfail (a benchmark's baseline).
    pub fn start_bin(bin: &Path, config: &Path, socket: &Path, pins: &PinDir) -> Self {
        let mut d = Self::spawn_bin(bin, config, socket, pins);
        d.wait_up(config);
        d
    }

    /// Starts the daemon without waiting for it to answer (its log is the config's path
    /// with the extension `log`).
    pub fn spawn(config: &Path, socket: &Path, pins: &PinDir) -> Self {
        Self::spawn_bin(&nsfail_bin(), config, socket, pins)
    }

    fn spawn_bin(bin: &Path, config: &Path, socket: &Path, pins: &PinDir) -> Self {
        let log = fs::File::create(config.with_extension("log")).expect("daemon log");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--pins")
            .arg(pins.pins.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        Self {
            child: ChildGuard { child },
            socket: socket.to_owned(),
        }
    }

    /// Waits (20 s at most) until the daemon answers `status`; panics with its log if it
    /// exits first.
    pub fn wait_up(&mut self, config: &Path) {
        let socket = self.socket.clone();
        let d = self;
        let up = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(status)) = d.child.child.try_wait() {
                panic!(
                    "daemon exited with {status}: {}",
                    fs::read_to_string(config.with_extension("log")).unwrap_or_default()
                );
            }
            (cli(&socket, &["status", "--json"]).code == 0).then_some(())
        });
        assert!(
            up.is_some(),
            "daemon did not answer on {}",
            socket.display()
        );
        d.child.child.stdout.take();
    }

    /// SIGTERM and wait: a clean stop. Returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_for(Duration::from_secs(10), || {
            self.child.child.try_wait().ok().flatten()
        })
        .and_then(|status| status.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // ChildGuard kills it if SIGTERM did not end it.
        if matches!(self.child.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// The encoder channel `channel` is active on, from `status --json`.
pub fn active(socket: &Path, channel: &str) -> String {
    status(socket)["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == channel))
        .and_then(|c| c["active"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// `nsfail events --json`, one object per line.
pub fn events(socket: &Path) -> Vec<serde_json::Value> {
    let out = cli(socket, &["events", "--json"]);
    assert_eq!(out.code, 0, "events: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

/// How many events of `channel` have a reason containing `reason`.
pub fn count_events(events: &[serde_json::Value], channel: &str, reason: &str) -> usize {
    events
        .iter()
        .filter(|e| e["channel"] == channel && e["reason"].as_str().unwrap_or("").contains(reason))
        .count()
}

/// A lab of two encoders with health responders, a config for it and the daemon running on
/// it: what the daemon, failover and benchmark scenarios start from.
pub struct Bed {
    pub daemon: Daemon,
    /// enc-a's and enc-b's `udp` health responders on port 9000.
    pub echoes: Vec<crate::traffic::Echo>,
    pub config: PathBuf,
    pub pins: PinDir,
    pub dir: TempDir,
    pub lab: Lab,
}

impl Bed {
    pub fn new(policy: &Policy) -> Self {
        let lab = crate::lab(2);
        let echoes = lab
            .encoders
            .iter()
            .map(|e| {
                let at = format!("{}:9000", e.addr4).parse().expect("address");
                crate::traffic::Echo::start(&e.ns, at)
            })
            .collect();
        let dir = TempDir::new();
        let config = dir.path.join("nsfail.toml");
        fs::write(&config, lab_config_with(&lab, policy)).expect("write config");
        let pins = PinDir::new();
        let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
        Self {
            daemon,
            echoes,
            config,
            pins,
            dir,
            lab,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.daemon.socket.clone()
    }
}

/// Whether channel `channel` is on encoder `encoder`, as `status --json` has it.
pub fn is_on(socket: &Path, channel: &str, encoder: &str) -> bool {
    placement(socket)
        .iter()
        .any(|(c, e)| c == channel && e == encoder)
}

/// Whether channel `channel` is on encoder `encoder` within `limit` (polling `status`).
pub fn placed_within(socket: &Path, channel: &str, encoder: &str, limit: Duration) -> bool {
    wait_for(limit, || is_on(socket, channel, encoder).then_some(())).is_some()
}

/// Channels and their active encoder, as `status --json` has them.
pub fn placement(socket: &Path) -> Vec<(String, String)> {
    status(socket)["channels"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or("").to_owned(),
                        c["active"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
