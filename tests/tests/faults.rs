//! Faults injected into a running daemon, each with a stream running and an exact outcome: a
//! second daemon started by mistake, a read-only config directory during a failover, a
//! corrupt state file, an unprivileged client.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    ChildGuard, PinDir,
    daemon::{
        Bed, Daemon, HEALTH_DESIGN, HEALTH_TOLERANT, Policy, TempDir, active, cli, events,
        lab_config_with, nsfail_bin, status,
    },
    lab, run,
    traffic::{Echo, Receiver, send_burst, spawn_burst},
    wait_for,
};

const GAP: Duration = Duration::from_millis(1);
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Channels and their active encoder, as `status --json` has them.
fn placement(socket: &Path) -> Vec<(String, String)> {
    status(socket)["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["active"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn reasons(socket: &Path) -> Vec<String> {
    events(socket)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// 1. A second `nsfail run` on the same data plane (another socket, a config without the
///    channels) is refused before it touches anything: the stream keeps every packet, and
///    the first daemon's channels are where they were.
#[test]
fn a_second_daemon_is_refused_before_it_touches_anything() {
    let bed = Bed::new(&Policy::tolerant());
    let enc = &bed.lab.encoders[0];
    let rx = Receiver::start(&enc.ns, sa(&enc.addr4, 7002));
    let before = placement(&bed.socket());
    let cam2 = sa(INGEST4, 5002);
    let burst = spawn_burst(
        &bed.lab.src.name,
        sa(SRC4, 41100),
        cam2,
        0..2000,
        GAP,
        LINGER,
    );

    let other = bed.dir.path.join("other.toml");
    let text = fs::read_to_string(&bed.config).unwrap();
    let no_channels = &text[..text.find("[[channel]]").unwrap()];
    fs::write(&other, no_channels).unwrap();
    let second = Command::new(nsfail_bin())
        .args(["--socket"])
        .arg(bed.dir.path.join("other.sock"))
        .args(["run", "--config"])
        .arg(&other)
        .arg("--pins")
        .arg(bed.pins.pins.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = ChildGuard { child: second };
    let code = wait_for(Duration::from_secs(10), || second.child.try_wait().unwrap())
        .expect("the second daemon exits by itself");
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(code.code(), Some(1), "{stderr}");
    let first_pid = bed.daemon.child.pid();
    assert!(
        stderr.contains("another nsfail daemon serves the data plane")
            && stderr.contains(&format!("pid {first_pid}")),
        "names the running daemon: {stderr}"
    );

    let replies = burst.join().unwrap();
    assert_eq!(
        rx.settled(),
        (0..2000).collect(),
        "every packet of the stream arrived"
    );
    assert_eq!(replies.seqs(), (0..2000).collect());
    assert_eq!(
        placement(&bed.socket()),
        before,
        "the first daemon's channels are unchanged"
    );
    assert!(!bed.dir.path.join("other.sock").exists());
}

/// A bind mount of `dir` over itself, read-only: root gets EROFS as anyone would. Undone on
/// drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let d = dir.to_str().unwrap();
        run("mount", &["--bind", d, d]);
        let ro = Self(dir.to_owned());
        run("mount", &["-o", "remount,bind,ro", d]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// 2. The config directory read-only, then the active encoder of three channels dies: every
///    channel moves (packets arrive at the backup), a critical event says persisting failed,
///    and persisting works again once the directory is writable.
#[test]
fn a_failover_finishes_on_a_read_only_disk() {
    let lab = lab(2);
    let echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let mut echoes = echoes.into_iter();
    let mut echo_a = echoes.next().unwrap();
    let _echo_b = echoes.next().unwrap();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    let policy = Policy {
        health: [HEALTH_DESIGN, HEALTH_TOLERANT],
        ..Policy::default()
    };
    let text = lab_config_with(&lab, &policy)
        + "\n[[channel]]\nname = \"cam3\"\nlisten = \"10.77.0.1:5004\"\n\
           encoders = [\"enc-a\", \"enc-b\"]\nport = 7004\n";
    fs::write(&config, text).unwrap();
    // The socket lives elsewhere: only the config, state and events are read-only.
    let sockdir = TempDir::new();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &sockdir.path.join("nsfail.sock"), &pins);
    let socket = daemon.socket.clone();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(active(&socket, cam), "enc-a");
    }

    let ro = ReadOnly::new(&dir.path);
    echo_a.stop();
    let moved = wait_for(Duration::from_secs(5), || {
        placement(&socket)
            .iter()
            .all(|(_, a)| a == "enc-b")
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "every channel moved: {:?}",
        placement(&socket)
    );
    let eb = &lab.encoders[1];
    for (cam, port) in [(5000u16, 7000u16), (5002, 7002), (5004, 7004)] {
        let rx = Receiver::start(&eb.ns, sa(&eb.addr4, port));
        send_burst(
            &lab.src,
            sa(SRC4, 41200),
            sa(INGEST4, cam),
            0..100,
            GAP,
            LINGER,
        );
        assert_eq!(
            rx.settled(),
            (0..100).collect(),
            "channel on port {cam} reaches enc-b"
        );
    }
    assert!(
        reasons(&socket)
            .iter()
            .any(|r| r.contains("persisting runtime state failed (critical)")),
        "{:?}",
        reasons(&socket)
    );

    drop(ro);
    let again = wait_for(Duration::from_secs(5), || {
        reasons(&socket)
            .iter()
            .any(|r| r == "runtime state persisted again")
            .then_some(())
    });
    assert!(
        again.is_some(),
        "persisting works again: {:?}",
        reasons(&socket)
    );
    let state = fs::read_to_string(dir.path.join("nsfail.state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(state["active"][cam], "enc-b", "{state}");
    }
}

/// 6. A corrupt state file: the daemon starts from the config, moves the file aside and says
///    so.
#[test]
fn a_corrupt_state_file_is_moved_aside() {
    let lab = lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    fs::write(&config, lab_config_with(&lab, &Policy::tolerant())).unwrap();
    let state = dir.path.join("nsfail.state.json");
    fs::write(&state, "{\"v\": 1, \"active\": {\"cam1\": ").unwrap();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
    assert_eq!(
        active(&daemon.socket, "cam1"),
        "enc-a",
        "started from the config"
    );
    let aside: Vec<_> = fs::read_dir(&dir.path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("nsfail.state.json.bad-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside");
    assert_eq!(
        fs::read_to_string(aside[0].path()).unwrap(),
        "{\"v\": 1, \"active\": {\"cam1\": ",
        "kept as it was"
    );
    assert!(
        reasons(&daemon.socket)
            .iter()
            .any(|r| r.contains("unusable (critical)") && r.contains("bad-")),
        "{:?}",
        reasons(&daemon.socket)
    );
}

/// 7. The control socket is root's from the moment it exists: another user cannot connect.
///    State and events files are root's only.
#[test]
fn an_unprivileged_user_cannot_use_the_socket() {
    let bed = Bed::new(&Policy::tolerant());
    let socket = bed.socket();
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(nsfail_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");
    // A change, so that the state file exists.
    let out = cli(&socket, &["remap", "cam2", "enc-b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in ["nsfail.state.json", "nsfail.events.jsonl"] {
        let mode = fs::metadata(bed.dir.path.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file} mode {mode:o}");
    }
}
