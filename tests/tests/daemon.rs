//! The daemon and the CLI, driven as an operator would: through the `nsfail` binary only.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    thread,
    time::{Duration, Instant},
};

use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    daemon::{Bed, Daemon, Policy, TempDir, cli, status},
    srt,
    traffic::{Receiver, check_seqs, send_burst, spawn_burst},
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn setup() -> Bed {
    Bed::new(&Policy::tolerant())
}

fn active(status: &serde_json::Value, channel: &str) -> String {
    status["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == channel)
        .unwrap_or_else(|| panic!("no channel {channel} in {status}"))["active"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn check_reports_config_errors_with_their_line() {
    let dir = TempDir::new();
    let socket = dir.path.join("none.sock");
    let good = dir.path.join("good.toml");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/nsfail.toml");
    fs::copy(example, &good).unwrap();
    let out = cli(
        &socket,
        &["check", "--portable", "--config", good.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "example config: {}", out.stderr);
    // Checked against this host, which has none of the example's interfaces: the first one
    // is named, with its line.
    let out = cli(&socket, &["check", "--config", good.to_str().unwrap()]);
    assert_eq!(out.code, 1, "example config on this host: {}", out.stdout);
    let text = fs::read_to_string(example).unwrap();
    let named: usize = out
        .stderr
        .split("good.toml:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line in {}", out.stderr));
    assert!(
        text.lines()
            .nth(named - 1)
            .unwrap()
            .starts_with("interface = ")
            && out
                .stderr
                .contains("does not exist in the ingest namespace"),
        "names the line of a missing interface ({named}): {}",
        out.stderr
    );

    let bad = dir.path.join("bad.toml");
    let text = fs::read_to_string(example)
        .unwrap()
        .replacen("address", "adress", 1);
    let line = text.lines().position(|l| l.contains("adress")).unwrap() + 1;
    fs::write(&bad, text).unwrap();
    let out = cli(
        &socket,
        &["check", "--portable", "--config", bad.to_str().unwrap()],
    );
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one line: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("bad.toml:{line}:")),
        "names line {line}: {}",
        out.stderr
    );

    let out = cli(&socket, &["check"]);
    assert_eq!(out.code, 2, "usage error: {}", out.stderr);
    let out = cli(&socket, &["status"]);
    assert_eq!(out.code, 1, "no daemon: {}", out.stderr);
    assert!(
        out.stderr.contains("cannot reach the daemon"),
        "{}",
        out.stderr
    );
}

#[test]
fn refused_requests_leave_state_unchanged() {
    let s = setup();
    let sock = &s.daemon.socket;
    let (ea, eb) = (&s.lab.encoders[0], &s.lab.encoders[1]);
    let rx_a = Receiver::start(&ea.ns, sa(&format!("{}:7002", ea.addr4)));
    let rx_b = Receiver::start(&eb.ns, sa(&format!("{}:7002", eb.addr4)));
    let cam2 = sa(&format!("{INGEST4}:5002"));
    let src = sa(&format!("{SRC4}:40002"));
    let burst = |seqs: std::ops::Range<u32>| {
        send_burst(
            &s.lab.src,
            src,
            cam2,
            seqs,
            Duration::from_millis(1),
            Duration::from_millis(500),
        )
    };
    let mode = fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let before = status(sock);
    assert_eq!(active(&before, "cam1"), "enc-a");

    let state_file = s.config.with_extension("state.json");
    let state_before = fs::read(&state_file).ok();
    assert!(before["cluster"].is_null(), "not a cluster host: {before}");

    let refusals: [(&[&str], &str); 9] = [
        (&["remap", "nope", "enc-b"], "unknown channel"),
        (&["remap", "cam1", "nope"], "unknown encoder"),
        (&["drain", "nope"], "unknown encoder"),
        (&["remove", "encoder", "enc-a"], "still used by channel"),
        (&["remove", "channel", "nope"], "unknown channel"),
        (
            &[
                "add",
                "channel",
                "cam3",
                "--listen",
                "10.77.0.1:5000",
                "--encoders",
                "enc-a",
            ],
            "10.77.0.1:5000",
        ),
        (
            &[
                "add",
                "channel",
                "cam3",
                "--listen",
                "10.77.0.1:5009",
                "--encoders",
                "enc-z",
            ],
            "enc-z",
        ),
        // Not a cluster host: it announces nothing to withdraw.
        (
            &["drain", "host"],
            "needs a [cluster] section with announce_table",
        ),
        (
            &["undrain", "host"],
            "needs a [cluster] section with announce_table",
        ),
    ];
    for (args, needle) in refusals {
        let out = cli(sock, args);
        assert_eq!(out.code, 1, "{args:?} must be refused: {}", out.stdout);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert_eq!(status(sock)["channels"], before["channels"], "{args:?}");
        assert!(status(sock)["cluster"].is_null(), "{args:?}");
    }
    assert_eq!(
        fs::read(&state_file).ok(),
        state_before,
        "the refusals wrote the state file"
    );
    // Draining enc-a moves both channels to enc-b; draining enc-b then would leave them
    // without a healthy encoder: refused, nothing moves.
    assert_eq!(cli(sock, &["drain", "enc-a"]).code, 0);
    let drained = status(sock);
    assert_eq!(active(&drained, "cam1"), "enc-b");
    assert_eq!(active(&drained, "cam2"), "enc-b");
    let out = cli(sock, &["drain", "enc-b"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("without a healthy encoder"),
        "{}",
        out.stderr
    );
    let after = status(sock);
    assert_eq!(after["channels"], drained["channels"]);
    let enc_b = after["encoders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "enc-b")
        .unwrap()
        .clone();
    assert_eq!(enc_b["drained"], false);
    let out = cli(sock, &["remap", "cam1", "enc-a"]);
    assert_eq!(out.code, 1, "remap to a drained encoder is refused");
    let out = cli(sock, &["remap", "cam2", "enc-a"]);
    assert_eq!(out.code, 1, "remap to a drained encoder is refused");
    // The drain moved cam2's packets to enc-b, and the refusals left them there: they reach
    // enc-b, and only enc-b. (After the status comparisons: traffic changes the counters.)
    burst(0..100);
    check_seqs(&rx_b.settled(), 0..100).unwrap_or_else(|e| panic!("enc-b after the drain: {e}"));
    assert_eq!(rx_a.settled().len(), 0, "enc-a got packets after the drain");
}

#[test]
fn socket_survives_bad_clients_and_concurrency() {
    let s = setup();
    let sock = s.daemon.socket.clone();
    let exchange = |payload: &[u8]| -> String {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(payload);
        let mut line = String::new();
        let _ = BufReader::new(c).read_line(&mut line);
        line
    };
    let answer: serde_json::Value = serde_json::from_str(&exchange(b"{not json\n")).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(answer["error"].as_str().unwrap().contains("malformed"));
    let answer: serde_json::Value =
        serde_json::from_str(&exchange(b"{\"v\":99,\"cmd\":\"status\"}\n")).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("version"),
        "{answer}"
    );
    let mut big = vec![b'x'; 200 * 1024];
    big.push(b'\n');
    let answer: serde_json::Value = serde_json::from_str(&exchange(&big)).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    // A client that connects and says nothing does not block the others.
    let _idle = UnixStream::connect(&sock).unwrap();

    let workers: Vec<_> = (0..8)
        .map(|_| {
            let sock = sock.clone();
            thread::spawn(move || {
                (0..20)
                    .filter(|_| cli(&sock, &["status", "--json"]).code == 0)
                    .count()
            })
        })
        .collect();
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(ok, 160, "every concurrent status call answered");
    assert_eq!(active(&status(&sock), "cam1"), "enc-a");
}

#[test]
fn runtime_changes_persist_and_a_restart_loses_nothing() {
    let mut s = setup();
    let sock = s.daemon.socket.clone();
    let (ea, eb) = (&s.lab.encoders[0], &s.lab.encoders[1]);
    let rx_a = Receiver::start(&ea.ns, sa(&format!("{}:7002", ea.addr4)));
    let rx_b = Receiver::start(&eb.ns, sa(&format!("{}:7002", eb.addr4)));
    let cam2 = sa(&format!("{INGEST4}:5002"));
    let src = sa(&format!("{SRC4}:40002"));
    let gap = Duration::from_millis(1);
    let linger = Duration::from_secs(2);

    send_burst(&s.lab.src, src, cam2, 0..100, gap, linger);
    assert_eq!(rx_a.settled().len(), 100);
    let st = status(&sock);
    let cam2_packets = st["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cam2")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cam2_packets, 100,
        "status counters come from the data plane"
    );

    let out = cli(&sock, &["remap", "cam2", "enc-b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cli(
        &sock,
        &[
            "add",
            "channel",
            "cam3",
            "--listen",
            "10.77.0.1:5004",
            "--encoders",
            "enc-b,enc-a",
            "--port",
            "7004",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);

    // SIGKILL the daemon while the stream runs: the data plane does not notice.
    let sender = spawn_burst(&s.lab.src.name, src, cam2, 100..1100, gap, linger);
    thread::sleep(Duration::from_millis(300));
    s.daemon.child.child.kill().unwrap();
    s.daemon.child.child.wait().unwrap();
    let replies = sender.join().unwrap();
    check_seqs(&rx_b.settled(), 100..1100)
        .unwrap_or_else(|e| panic!("{}: {e}", "no packet lost across SIGKILL"));
    assert_eq!(
        replies.seqs(),
        (100..1100).collect(),
        "and every reply came back"
    );

    // Restart: adopts, keeps enc-b for cam2 and the added cam3, still no loss.
    s.daemon = Daemon::start(&s.config, &sock, &s.pins);
    let st = status(&sock);
    assert_eq!(active(&st, "cam2"), "enc-b", "remap survived the restart");
    assert_eq!(
        active(&st, "cam3"),
        "enc-b",
        "added channel survived the restart"
    );
    let events = cli(&sock, &["events", "--json"]);
    assert_eq!(events.code, 0);
    send_burst(&s.lab.src, src, cam2, 1100..1200, gap, linger);
    check_seqs(&rx_b.settled(), 100..1200).unwrap();
    // The added channel forwards after the restart too: to enc-b, its first encoder.
    let rx_b3 = Receiver::start(&eb.ns, sa(&format!("{}:7004", eb.addr4)));
    let cam3 = sa(&format!("{INGEST4}:5004"));
    let src3 = sa(&format!("{SRC4}:40004"));
    send_burst(&s.lab.src, src3, cam3, 0..100, gap, linger);
    check_seqs(&rx_b3.settled(), 0..100).unwrap_or_else(|e| panic!("cam3 after the restart: {e}"));
    assert_eq!(
        rx_a.settled().len(),
        100,
        "enc-a got nothing after the remap"
    );

    // A clean stop leaves the data plane forwarding.
    assert_eq!(s.daemon.stop(), Some(0), "SIGTERM is a clean stop");
    send_burst(&s.lab.src, src, cam2, 1200..1300, gap, linger);
    check_seqs(&rx_b.settled(), 100..1300)
        .unwrap_or_else(|e| panic!("{}: {e}", "forwarding after SIGTERM"));
    let state = fs::read_to_string(s.dir.path.join("nsfail.state.json")).unwrap();
    assert!(state.contains("cam3") && state.contains("enc-b"), "{state}");
}

#[test]
fn srt_stream_moves_with_remap() {
    let s = setup();
    let sock = &s.daemon.socket;
    let session = srt::Session::start(&s, None);
    let grew = session.growth(0, 100_000, Duration::from_secs(15));
    assert!(
        grew.is_some(),
        "enc-a's SRT output did not grow: {} bytes",
        session.size(0)
    );
    let st = status(sock);
    assert_eq!(active(&st, "cam1"), "enc-a");
    assert!(st["channels"][0]["packets"].as_u64().unwrap() > 50, "{st}");

    let caller = session.caller_on_wire();
    let remapped = Instant::now();
    let out = cli(sock, &["remap", "cam1", "enc-b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The caller is told to reconnect, on the wire, and its stream is at enc-b sooner than
    // its own timeout could bring it there.
    let first = session.growth(1, 1, srt::TOLD_BOUND);
    session.assert_told_to_reconnect(caller, remapped);
    assert!(
        first.is_some(),
        "no output at enc-b within {:?} of the remap",
        srt::TOLD_BOUND
    );
    let moved = session.growth(1, 100_000, Duration::from_secs(20));
    assert!(
        moved.is_some(),
        "enc-b's SRT output did not grow: {} bytes",
        session.size(1)
    );
    let a_then = session
        .settled(0, Duration::from_secs(5))
        .expect("enc-a's output stops growing");
    thread::sleep(Duration::from_secs(1));
    assert_eq!(session.size(0), a_then, "enc-a's output stays stopped");
    assert_eq!(active(&status(sock), "cam1"), "enc-b");
}
