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
    _echoes: Vec<Echo>,
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
            _echoes: echoes,
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
    assert!(s.alive());
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
