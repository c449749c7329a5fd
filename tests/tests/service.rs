//! Running nsfail as a service: reloading the config (SIGHUP, `nsfail reload`), systemd's
//! readiness and watchdog protocol, the unit file, the Debian package and `nsfail doctor`.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    daemon::{Daemon, HEALTH_TOLERANT, Policy, TempDir, cli, events, lab_config_with, status},
    traffic::{Echo, Receiver, check_seqs, spawn_burst},
    wait_for,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A lab of three encoders (enc-c used by no channel), the config for it and the daemon.
struct Reloadable {
    daemon: Daemon,
    echoes: Vec<Echo>,
    config: std::path::PathBuf,
    _pins: nsfail_tests::PinDir,
    _dir: TempDir,
    lab: nsfail::lab::Lab,
}

fn enc_c(lab: &nsfail::lab::Lab) -> String {
    let e = &lab.encoders[2];
    format!(
        "\n[[encoder]]\nname = \"enc-c\"\naddress = \"{}\"\ninterface = \"{}\"\nnetns = \"{}\"\n\
         health = {{ kind = \"flow\" }}\n",
        e.addr4, e.host_if, e.ns.name
    )
}

impl Reloadable {
    fn new() -> Self {
        let lab = nsfail_tests::lab(3);
        let echoes = lab.encoders[..2]
            .iter()
            .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
            .collect();
        let dir = TempDir::new();
        let config = dir.path.join("nsfail.toml");
        let text = lab_config_with(&lab, &Policy::tolerant()) + &enc_c(&lab);
        fs::write(&config, text).unwrap();
        let pins = nsfail_tests::PinDir::new();
        let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
        Self {
            daemon,
            echoes,
            config,
            _pins: pins,
            _dir: dir,
            lab,
        }
    }

    fn hangup(&self) {
        nix::sys::signal::kill(Pid::from_raw(self.daemon.child.pid()), Signal::SIGHUP).unwrap();
    }

    fn alive(&mut self) -> bool {
        matches!(self.daemon.child.child.try_wait(), Ok(None))
    }
}

fn names(status: &serde_json::Value, what: &str) -> Vec<String> {
    status[what]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_owned())
        .collect()
}

fn interval(status: &serde_json::Value, encoder: &str) -> u64 {
    status["encoders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == encoder)
        .unwrap()["health_interval_ms"]
        .as_u64()
        .unwrap()
}

/// What must not change across a refused reload: names, placement, health settings.
fn shape(status: &serde_json::Value) -> serde_json::Value {
    let pick = |list: &serde_json::Value, keys: &[&str]| -> Vec<serde_json::Value> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|o| keys.iter().map(|k| o[*k].clone()).collect())
            .collect()
    };
    serde_json::json!({
        "channels": pick(&status["channels"], &["name", "listen", "active", "encoders", "port"]),
        "encoders": pick(&status["encoders"], &["name", "address", "drained", "health_interval_ms"]),
    })
}

fn reloaded_events(socket: &Path) -> usize {
    events(socket)
        .iter()
        .filter(|e| {
            e["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("config reloaded")
        })
        .count()
}

#[test]
fn sighup_applies_the_difference_while_an_unchanged_channel_streams() {
    let mut s = Reloadable::new();
    let sock = s.daemon.socket.clone();
    let ea = &s.lab.encoders[0];
    let rx = Receiver::start(&ea.ns, sa(&format!("{}:7002", ea.addr4)));
    let before = status(&sock);
    assert_eq!(interval(&before, "enc-a"), 100);
    assert!(names(&before, "encoders").contains(&"enc-c".to_owned()));

    // cam2 streams on enc-a through the whole reload: 2,500 packets over about 2.5 s.
    let cam2 = sa(&format!("{INGEST4}:5002"));
    let sender = spawn_burst(
        &s.lab.src.name,
        sa(&format!("{SRC4}:40002")),
        cam2,
        0..2500,
        Duration::from_millis(1),
        Duration::from_secs(2),
    );
    std::thread::sleep(Duration::from_millis(500));

    // The new file: cam3 added, enc-a probed every 200 ms, enc-c removed.
    let policy = Policy {
        health: [
            "{ kind = \"udp\", port = 9000, fall = 5, interval_ms = 200 }",
            HEALTH_TOLERANT,
        ],
        ..Policy::tolerant()
    };
    let text = lab_config_with(&s.lab, &policy)
        + "\n[[channel]]\nname = \"cam3\"\nlisten = \"10.77.0.1:5004\"\n\
           encoders = [\"enc-b\", \"enc-a\"]\nport = 7004\n";
    fs::write(&s.config, text).unwrap();
    let asked = Instant::now();
    s.hangup();
    let seen = wait_for(Duration::from_secs(1), || {
        let st = status(&sock);
        (names(&st, "channels").contains(&"cam3".to_owned())
            && !names(&st, "encoders").contains(&"enc-c".to_owned())
            && interval(&st, "enc-a") == 200)
            .then_some(st)
    });
    let took = asked.elapsed();
    let st = seen.unwrap_or_else(|| {
        panic!(
            "the reload is not in status within 1 s: {}\nevents: {:?}",
            status(&sock),
            events(&sock)
        )
    });
    eprintln!("reload visible in status after {took:?}");
    assert_eq!(
        nsfail_tests::daemon::active(&sock, "cam3"),
        "enc-b",
        "cam3 is on its first encoder: {st}"
    );
    let replies = sender.join().unwrap();
    check_seqs(&rx.settled(), 0..2500)
        .unwrap_or_else(|e| panic!("cam2 lost packets during the reload: {e}"));
    assert_eq!(replies.seqs().len(), 2500, "every echo came back");
    assert_eq!(
        nsfail_tests::daemon::active(&sock, "cam2"),
        "enc-a",
        "the unchanged channel never moved"
    );
    let reasons: Vec<String> = events(&sock)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    for want in [
        "channel cam3 added (reload)",
        "encoder enc-a changed (reload)",
        "encoder enc-c removed (reload)",
        "config reloaded: 3 changes",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "no event {want:?} in {reasons:?}"
        );
    }
    // The same file again: nothing to do.
    let out = cli(&sock, &["reload"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "reloaded: no changes");
    // A setting that needs a restart keeps its running value, and the reload says so.
    let text = fs::read_to_string(&s.config)
        .unwrap()
        .replace("127.0.0.1:9464", "127.0.0.1:9465");
    fs::write(&s.config, text).unwrap();
    let out = cli(&sock, &["reload"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("changed in the file, applied at the next start: ingest.metrics"),
        "{}",
        out.stdout
    );
    assert!(s.alive());
    // Not under the journal: log lines carry their time.
    let log = fs::read_to_string(s.config.with_extension("log")).unwrap();
    let first = log.lines().next().unwrap_or_default();
    assert!(first.starts_with("[20"), "a timestamp: {first}");
}

#[test]
fn a_broken_config_is_refused_with_its_line_and_changes_nothing() {
    let mut s = Reloadable::new();
    let sock = s.daemon.socket.clone();
    let good = fs::read_to_string(&s.config).unwrap();
    let before = shape(&status(&sock));

    // An unknown key, and a bad value, each named by its line; the rest of the file would
    // remove enc-c and add a channel, none of which may happen.
    let broken = [
        good.replace("failback = ", "failbak = ")
            .replace(&enc_c(&s.lab), ""),
        good.replacen("port = 7002", "port = 70000", 1)
            + "\n[[channel]]\nname = \"cam9\"\nlisten = \"10.77.0.1:5010\"\nencoders = [\"enc-a\"]\n",
    ];
    for (i, text) in broken.iter().enumerate() {
        let line = text
            .lines()
            .position(|l| l.starts_with("failbak") || l.contains("70000"))
            .unwrap()
            + 1;
        fs::write(&s.config, text).unwrap();
        let out = cli(&sock, &["reload"]);
        assert_eq!(out.code, 1, "refused: {}", out.stdout);
        assert!(
            out.stderr.contains(&format!("nsfail.toml:{line}:")),
            "case {i}: names line {line}: {}",
            out.stderr
        );
        assert_eq!(shape(&status(&sock)), before, "case {i}: nothing changed");
        let refused = events(&sock)
            .iter()
            .filter(|e| {
                let r = e["reason"].as_str().unwrap_or("");
                r.starts_with("config reload refused") && r.contains(&format!(":{line}:"))
            })
            .count();
        assert!(refused >= 1, "case {i}: an event with the line");
    }
    // By SIGHUP too: refused, the daemon keeps running, an event says so.
    let refusals = |sock: &Path| {
        events(sock)
            .iter()
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("config reload refused")
            })
            .count()
    };
    let n = refusals(&sock);
    s.hangup();
    assert!(
        wait_for(Duration::from_secs(5), || (refusals(&sock) > n)
            .then_some(()))
        .is_some(),
        "SIGHUP with a broken file raises an event"
    );
    assert!(s.alive(), "a broken config never stops the daemon");
    assert_eq!(shape(&status(&sock)), before);

    // A burst of signals is coalesced: fewer reloads than signals, at least one.
    fs::write(&s.config, &good).unwrap();
    let n = reloaded_events(&sock);
    for _ in 0..20 {
        s.hangup();
    }
    let done = wait_for(Duration::from_secs(5), || {
        (reloaded_events(&sock) > n).then_some(())
    });
    assert!(done.is_some(), "the burst reloads");
    std::thread::sleep(Duration::from_millis(500));
    let reloads = reloaded_events(&sock) - n;
    eprintln!("20 SIGHUPs: {reloads} reloads");
    assert!(
        (1..20).contains(&reloads),
        "20 signals in a burst: {reloads} reloads"
    );
    assert!(s.alive());
    assert_eq!(
        shape(&status(&sock)),
        before,
        "the good file again: as before"
    );
}

/// `nsfail doctor --json` with these arguments: exit code and one object per check.
fn doctor(socket: &Path, args: &[&str]) -> (i32, Vec<serde_json::Value>) {
    let mut full = vec!["doctor", "--json"];
    full.extend_from_slice(args);
    let out = cli(socket, &full);
    let checks = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (out.code, checks)
}

/// The check named `name`: its status and fix.
fn check<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

fn failed(checks: &[serde_json::Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["check"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn doctor_passes_on_a_good_host_and_names_each_fault_with_its_fix() {
    let lab = nsfail_tests::lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    fs::write(&config, lab_config_with(&lab, &Policy::tolerant())).unwrap();
    let socket = dir.path.join("nsfail.sock");
    let pins = nsfail_tests::PinDir::new();
    let pin_root = pins.pins.root().to_str().unwrap().to_owned();
    let args = ["--config", config.to_str().unwrap(), "--pins", &pin_root];

    let (code, checks) = doctor(&socket, &args);
    assert_eq!(failed(&checks), Vec::<String>::new(), "{checks:?}");
    assert_eq!(code, 0);
    for name in [
        "kernel",
        "btf",
        "bpffs",
        "tcx",
        "pins",
        "socket",
        "ingest ing",
        "encoder enc-a",
        "encoder enc-b",
        "icmp enc-a",
    ] {
        assert_eq!(check(&checks, name)["status"], "ok", "{name}: {checks:?}");
    }

    // GRO off at enc-a's peer: it cannot receive, and the fix names the peer.
    let ea = &lab.encoders[0];
    nsfail_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &ea.ns.name,
            "ethtool",
            "-K",
            &ea.inner_if,
            "gro",
            "off",
        ],
    );
    let (code, checks) = doctor(&socket, &args);
    assert_eq!(
        (code, failed(&checks)),
        (1, vec!["encoder enc-a".to_owned()])
    );
    let fix = check(&checks, "encoder enc-a")["fix"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        fix.contains(&format!(
            "ip netns exec {} ethtool -K {} gro on",
            ea.ns.name, ea.inner_if
        )),
        "{fix}"
    );
    nsfail_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &ea.ns.name,
            "ethtool",
            "-K",
            &ea.inner_if,
            "gro",
            "on",
        ],
    );

    // The kernel's default ICMP rate limit in enc-b's namespace defeats fast refusal.
    let eb = &lab.encoders[1];
    let sysctl = |v: &'static str| {
        nsfail::net::netns::in_netns(&eb.ns.name, move || {
            fs::write("/proc/sys/net/ipv4/icmp_ratelimit", v)
        })
        .unwrap()
        .unwrap()
    };
    sysctl("1000");
    let (code, checks) = doctor(&socket, &args);
    assert_eq!((code, failed(&checks)), (1, vec!["icmp enc-b".to_owned()]));
    assert!(
        check(&checks, "icmp enc-b")["fix"]
            .as_str()
            .unwrap()
            .contains("sysctl -w net.ipv4.icmp_ratelimit="),
        "{checks:?}"
    );
    sysctl("10");

    // A data plane pinned with no daemon serving it.
    drop(pins.open());
    let (code, checks) = doctor(&socket, &args);
    assert_eq!((code, failed(&checks)), (1, vec!["pins".to_owned()]));
    assert!(
        check(&checks, "pins")["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("nsfail teardown --pins {pin_root}")),
        "{checks:?}"
    );
    // A daemon adopts it: pins and its 0600 socket pass.
    let daemon = Daemon::start(&config, &socket, &pins);
    let (code, checks) = doctor(&socket, &args);
    assert_eq!(
        (code, failed(&checks)),
        (0, Vec::<String>::new()),
        "{checks:?}"
    );
    assert!(
        check(&checks, "pins")["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", daemon.child.pid())),
        "{checks:?}"
    );
    assert!(
        check(&checks, "socket")["detail"]
            .as_str()
            .unwrap()
            .contains("0600")
    );
    drop(daemon);

    // bpffs unmounted, in a mount namespace of this check's own.
    let script = format!(
        "while umount -l {bpffs} 2>/dev/null; do :; done; exec {bin} --socket {sock} doctor --json",
        bpffs = nsfail::paths::BPFFS,
        bin = nsfail_tests::daemon::nsfail_bin().display(),
        sock = socket.display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let checks: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.status.code(), Some(1), "{checks:?}");
    assert_eq!(failed(&checks), vec!["bpffs".to_owned()], "{checks:?}");
    assert!(
        check(&checks, "bpffs")["fix"]
            .as_str()
            .unwrap()
            .contains("mount -t bpf bpf /sys/fs/bpf")
    );
    // Outside it, bpffs is as it was; the stopped daemon left its data plane forwarding.
    let (_, checks) = doctor(&socket, &args);
    assert_eq!(check(&checks, "bpffs")["status"], "ok");
    assert_eq!(failed(&checks), vec!["pins".to_owned()], "{checks:?}");
}

/// The unit's `CapabilityBoundingSet`, as setpriv spells it: `-all,+bpf,+perfmon,...`.
fn unit_capabilities() -> String {
    let unit = fs::read_to_string(unit_path()).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

fn unit_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nsfail.service")
}

#[test]
fn systemd_hears_ready_after_the_data_plane_then_the_watchdog() {
    use std::os::unix::{fs::MetadataExt as _, net::UnixDatagram};

    let lab = nsfail_tests::lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&format!("{}:9000", e.addr4))))
        .collect();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    let text = lab_config_with(&lab, &Policy::tolerant()).replacen(
        "[ingest]\n",
        "[ingest]\nlog_level = \"debug\"\n",
        1,
    );
    fs::write(&config, text).unwrap();
    let socket = dir.path.join("nsfail.sock");
    let pins = nsfail_tests::PinDir::new();
    let notify_path = dir.path.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log_path = dir.path.join("daemon.log");
    let log = fs::File::create(&log_path).unwrap();
    let journal = format!(
        "{}:{}",
        log.metadata().unwrap().dev(),
        log.metadata().unwrap().ino()
    );
    // Under the unit's capabilities only, as systemd would run it.
    let child = std::process::Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            &format!("--bounding-set={}", unit_capabilities()),
            "--",
        ])
        .arg(nsfail_tests::daemon::nsfail_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--pins")
        .arg(pins.pins.root())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env("JOURNAL_STREAM", &journal)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = nsfail_tests::ChildGuard { child };
    let pid = Pid::from_raw(daemon.pid());
    let recv = || -> Option<String> {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    };

    // READY=1, and at that moment the XDP link is pinned and the socket answers.
    let start = Instant::now();
    let mut before_ready = Vec::new();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no READY=1: {before_ready:?}; log: {}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
        assert!(
            matches!(daemon.child.try_wait(), Ok(None)),
            "the daemon exited"
        );
        match recv() {
            Some(m) if m == "READY=1" => break,
            Some(m) => before_ready.push(m),
            None => {}
        }
    }
    assert!(
        pins.pins.xdp_link("ing").exists(),
        "READY=1 before the XDP link is pinned"
    );
    assert_eq!(
        cli(&socket, &["status", "--json"]).code,
        0,
        "READY=1 before the socket serves"
    );
    assert!(
        before_ready.iter().all(|m| m == "WATCHDOG=1"),
        "before READY: {before_ready:?}"
    );

    // WATCHDOG=1 every WATCHDOG_USEC / 2 = 100 ms: about 20 in 2 s.
    let window = Instant::now();
    let mut pings = 0;
    while window.elapsed() < Duration::from_secs(2) {
        if recv().as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    eprintln!("WATCHDOG=1: {pings} in 2 s (every 100 ms asked)");
    assert!((10..=30).contains(&pings), "{pings} watchdog pings in 2 s");

    // A reload is bracketed by RELOADING=1 and READY=1; a stop says STOPPING=1.
    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !seen.iter().any(|m: &String| m == "READY=1") {
        if let Some(m) = recv().filter(|m| m != "WATCHDOG=1") {
            seen.push(m);
        }
    }
    assert!(
        seen.len() == 2 && seen[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{seen:?}"
    );
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    let stopping = wait_for(Duration::from_secs(10), || {
        recv().filter(|m| m == "STOPPING=1")
    });
    assert!(stopping.is_some(), "STOPPING=1");
    let status = wait_for(Duration::from_secs(10), || {
        daemon.child.try_wait().ok().flatten()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0), "a clean stop");

    // The journal's lines: a priority, no timestamp; debug lines at log_level = "debug".
    let log = fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.starts_with('<') && !l.contains("Z ")),
        "{log}"
    );
    assert!(lines.iter().any(|l| l.starts_with("<6>")), "{log}");
    assert!(
        lines.iter().any(|l| l.starts_with("<7>")),
        "debug lines: {log}"
    );
}

#[test]
fn the_unit_file_verifies() {
    // The unit as shipped, with ExecStart pointing at this build (verify wants it to exist).
    let dir = TempDir::new();
    let unit = fs::read_to_string(unit_path()).unwrap().replace(
        "/usr/bin/nsfail",
        nsfail_tests::daemon::nsfail_bin().to_str().unwrap(),
    );
    let path = dir.path.join("nsfail.service");
    fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command to completion: (exit code, stdout, stderr).
fn sh(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(program.as_ref())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.as_ref().to_string_lossy()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file and symlink under `root`, relative to it, except dpkg's own database.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == "var/lib/dpkg" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_debian_package_installs_upgrades_and_removes_cleanly() {
    let dir = TempDir::new();
    let bin = nsfail_tests::daemon::nsfail_bin();
    let xtask = bin.with_file_name("xtask");
    assert!(
        xtask.is_file(),
        "{} is missing: `cargo xtask test` builds it (or `cargo build -p xtask`)",
        xtask.display()
    );
    // The debug build already made, packaged twice (an upgrade needs a newer version).
    let deb = |version: &str| {
        let out = dir.path.join(format!("nsfail_{version}.deb"));
        let (code, _, err) = sh(
            &xtask,
            &[
                "package",
                "--no-build",
                "--profile",
                "dev",
                "--deb-version",
                version,
                "--output",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "cargo xtask package: {err}");
        out
    };
    let (v1, v2) = (deb("0.1.0-1"), deb("0.1.1-1"));

    // Its files, extracted; the help, completions and man page come from the packaged binary.
    let x = dir.path.join("x");
    let (code, _, err) = sh(
        "dpkg-deb",
        &["-x", v1.to_str().unwrap(), x.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let files = files_under(&x);
    for want in [
        "usr/bin/nsfail",
        "lib/systemd/system/nsfail.service",
        "etc/nsfail/nsfail.toml.example",
        "usr/share/bash-completion/completions/nsfail",
        "usr/share/zsh/vendor-completions/_nsfail",
        "usr/share/fish/vendor_completions.d/nsfail.fish",
        "usr/share/man/man1/nsfail.1.gz",
    ] {
        assert!(files.contains(&want.to_owned()), "{want} not in {files:?}");
    }
    assert_eq!(
        fs::read_to_string(x.join("lib/systemd/system/nsfail.service")).unwrap(),
        fs::read_to_string(unit_path()).unwrap()
    );
    let installed = x.join("usr/bin/nsfail");
    let (code, help, _) = sh(&installed, &["--help"]);
    assert!(code == 0 && help.contains("Keeps live-video"), "{help}");
    for sub in ["reload", "doctor", "run"] {
        assert!(help.contains(sub), "--help lists {sub}: {help}");
    }
    let (_, bash, _) = sh(&installed, &["completions", "bash"]);
    assert_eq!(
        fs::read_to_string(x.join("usr/share/bash-completion/completions/nsfail")).unwrap(),
        bash
    );
    assert!(bash.contains("reload") && bash.contains("doctor"));
    let (_, man, _) = sh(&installed, &["man"]);
    let (code, page, _) = sh(
        "gzip",
        &[
            "-dc",
            x.join("usr/share/man/man1/nsfail.1.gz").to_str().unwrap(),
        ],
    );
    assert!(
        code == 0 && page == man && page.contains(".TH nsfail"),
        "{page}"
    );
    let example = x.join("etc/nsfail/nsfail.toml.example");
    let (code, _, err) = sh(
        &installed,
        &["check", "--portable", "--config", example.to_str().unwrap()],
    );
    assert_eq!(code, 0, "the example config: {err}");

    // Installed into a scratch root with dpkg: twice, upgraded, removed, purged.
    let root = dir.path.join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    let root_arg = format!("--root={}", root.display());
    let dpkg = |args: &[&str]| {
        let mut full = vec![
            root_arg.as_str(),
            "--force-not-root",
            "--force-depends",
            "--force-script-chrootless",
            "--log=/dev/null",
        ];
        full.extend_from_slice(args);
        let (code, out, err) = sh("dpkg", &full);
        assert_eq!(code, 0, "dpkg {args:?}: {out}{err}");
        err
    };
    let version = || {
        let (_, out, _) = sh(
            "dpkg-query",
            &[&root_arg, "-W", "-f", "${Version} ${Status}", "nsfail"],
        );
        out
    };
    dpkg(&["-i", v1.to_str().unwrap()]);
    let after_one = files_under(&root);
    dpkg(&["-i", v1.to_str().unwrap()]);
    assert_eq!(
        files_under(&root),
        after_one,
        "installing twice changes nothing"
    );
    dpkg(&["-i", v2.to_str().unwrap()]);
    assert_eq!(version(), "0.1.1-1 install ok installed");
    assert_eq!(
        files_under(&root),
        after_one,
        "the upgrade leaves the same files"
    );

    // What a running host adds: the operator's enablement, the daemon's state, its pins.
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/lib/systemd/system/nsfail.service",
        wants.join("nsfail.service"),
    )
    .unwrap();
    fs::write(root.join("etc/nsfail/nsfail.state.json"), "{}").unwrap();
    fs::write(root.join("etc/nsfail/nsfail.events.jsonl"), "").unwrap();
    let pin = root.join("sys/fs/bpf/nsfail/maps/CHANNELS_V4");
    fs::create_dir_all(pin.parent().unwrap()).unwrap();
    fs::write(&pin, "").unwrap();

    let said = dpkg(&["--remove", "nsfail"]);
    assert!(
        said.contains("keeps forwarding") && said.contains("rm -r /sys/fs/bpf/nsfail"),
        "removal says the data plane stays: {said}"
    );
    assert!(pin.exists(), "removal never tears down the data plane");
    assert!(
        !wants.join("nsfail.service").exists(),
        "the enablement link went"
    );
    dpkg(&["--purge", "nsfail"]);
    assert_eq!(
        files_under(&root),
        vec!["sys/fs/bpf/nsfail/maps/CHANNELS_V4".to_owned()],
        "after the purge only the (left alone) data plane remains"
    );
    assert!(
        !root.join("etc/nsfail").exists(),
        "purge removes /etc/nsfail"
    );
}

#[test]
fn a_reload_during_a_failover_waits_for_it_and_undoes_nothing() {
    let mut s = Reloadable::new();
    let sock = s.daemon.socket.clone();
    assert_eq!(nsfail_tests::daemon::active(&sock, "cam2"), "enc-a");
    // enc-a's health responder dies: its channels fail over to enc-b within about a second,
    // while reloads of a file that changes cam2's failback keep arriving.
    let policy = Policy {
        failback: "auto",
        ..Policy::tolerant()
    };
    fs::write(&s.config, lab_config_with(&s.lab, &policy) + &enc_c(&s.lab)).unwrap();
    s.echoes[0].stop();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        s.hangup();
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = wait_for(Duration::from_secs(10), || {
        let st = status(&sock);
        let on_b = |ch: &str| {
            st["channels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == ch && c["active"] == "enc-b")
        };
        (on_b("cam1") && on_b("cam2")).then_some(st)
    })
    .unwrap_or_else(|| panic!("no failover: {:?}", events(&sock)));
    let cam2 = moved["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cam2")
        .unwrap()
        .clone();
    assert_eq!(cam2["failback"], "auto", "the reload applied: {cam2}");
    // Later reloads (the same file) leave the failover alone.
    let out = cli(&sock, &["reload"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(nsfail_tests::daemon::active(&sock, "cam2"), "enc-b");
    assert_eq!(nsfail_tests::daemon::active(&sock, "cam1"), "enc-b");
    let reasons: Vec<String> = events(&sock)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "channel cam2 changed (reload)"),
        "{reasons:?}"
    );
    assert!(s.alive());
}
