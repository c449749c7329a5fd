//! Health probes against real loopback servers (UDP echo, TCP, HTTP), commands in this and in
//! a fresh network namespace, and the runner's rise/fall transitions.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::Command as StdCommand,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nsfail::{
    config::{Encoder, Health, HealthCheck, HealthKind},
    health::{self, Counter, HealthUpdate, Probe, ProbeError, probe_once},
    paths,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Generous: these tests check outcomes, not speed.
const PATIENCE: Duration = Duration::from_secs(2);

fn encoder(health: Health, netns: Option<&str>) -> Encoder {
    Encoder {
        name: "enc-t".into(),
        address: LOCALHOST,
        interface: None,
        netns: netns.map(str::to_owned),
        mac: None,
        allow: Vec::new(),
        health,
        spawn: None,
        restart: Default::default(),
        env: Default::default(),
        prefix: None,
    }
}

/// The check the config builds for `health` (no channels).
fn check(health: Health, netns: Option<&str>) -> HealthCheck {
    HealthCheck::build(&encoder(health, netns), &[]).expect("a valid health check")
}

fn probe(health: Health, netns: Option<&str>) -> Option<Box<dyn Probe>> {
    health::probe_for(&check(health, netns))
}

fn local_probe(health: Health) -> Box<dyn Probe> {
    probe(health, None).expect("a network probe")
}

fn udp(port: u16) -> Health {
    Health {
        kind: HealthKind::Udp,
        port: Some(port),
        ..Health::default()
    }
}

fn exec(command: &[&str]) -> Health {
    Health {
        kind: HealthKind::Exec,
        command: Some(command.iter().map(|s| s.to_string()).collect()),
        ..Health::default()
    }
}

/// How a test UDP responder answers a probe.
#[derive(Clone, Copy)]
enum Echo {
    Same,
    Wrong,
    /// Also sends, before the real echo, the previous probe's echo (late) and junk from
    /// another port (a stranger).
    WithNoise,
}

/// A UDP responder on loopback, answering while `answering` is set; returns its address.
async fn responder(mode: Echo, answering: Arc<AtomicBool>) -> SocketAddr {
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let stranger = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
            if !answering.load(Ordering::SeqCst) {
                continue;
            }
            let request = buf[..len].to_vec();
            match mode {
                Echo::Same => {}
                Echo::Wrong => {
                    socket.send_to(b"nsfail-probe 999999", peer).await.unwrap();
                    continue;
                }
                Echo::WithNoise => {
                    stranger.send_to(b"junk", peer).await.unwrap();
                    if let Some(previous) = &previous {
                        socket.send_to(previous, peer).await.unwrap();
                    }
                }
            }
            socket.send_to(&request, peer).await.unwrap();
            previous = Some(request);
        }
    });
    addr
}

#[tokio::test]
async fn udp_echo_is_healthy_with_a_latency() {
    let addr = responder(Echo::Same, Arc::new(AtomicBool::new(true))).await;
    let probe = local_probe(udp(addr.port()));
    assert_eq!(probe.kind(), "udp");
    // Twice: the second attempt reuses the socket with the next sequence number.
    for _ in 0..2 {
        let start = Instant::now();
        let latency = probe_once(probe.as_ref(), PATIENCE).await.unwrap();
        // The latency is measured within this call: not zero, not longer than the call.
        let call = start.elapsed();
        assert!(
            Duration::ZERO < latency && latency <= call,
            "latency {latency:?} of a {call:?} call"
        );
    }
}

#[tokio::test]
async fn udp_skips_late_echoes_and_strangers() {
    let addr = responder(Echo::WithNoise, Arc::new(AtomicBool::new(true))).await;
    let probe = local_probe(udp(addr.port()));
    for _ in 0..3 {
        probe_once(probe.as_ref(), PATIENCE).await.unwrap();
    }
}

#[tokio::test]
async fn udp_without_an_answer_times_out() {
    // Bound but never read: no answer, and no ICMP error either.
    let silent = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let probe = local_probe(udp(silent.local_addr().unwrap().port()));
    let limit = Duration::from_millis(200);
    let start = Instant::now();
    let result = timeout(limit + PATIENCE, probe_once(probe.as_ref(), limit))
        .await
        .expect("the probe gives up at its own limit");
    assert!(
        matches!(result, Err(ProbeError::Timeout(t)) if t == limit),
        "{result:?}"
    );
    // A timeout is not declared before its time.
    assert!(start.elapsed() >= limit, "{:?}", start.elapsed());
}

#[tokio::test]
async fn udp_to_a_closed_port_is_refused_at_once() {
    // One echo, then the port closes: the probe's kept socket hears the port unreachable.
    let echo = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let addr = echo.local_addr().unwrap();
    let once = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let (len, peer) = echo.recv_from(&mut buf).await.unwrap();
        echo.send_to(&buf[..len], peer).await.unwrap();
    });
    let probe = local_probe(udp(addr.port()));
    let long = Duration::from_secs(5);
    probe_once(probe.as_ref(), long).await.unwrap();
    once.await.unwrap();
    let start = Instant::now();
    let result = probe_once(probe.as_ref(), long).await;
    assert!(matches!(result, Err(ProbeError::Refused)), "{result:?}");
    assert!(start.elapsed() < long / 2, "{:?}", start.elapsed());
}

#[tokio::test]
async fn udp_wrong_echo_fails() {
    let addr = responder(Echo::Wrong, Arc::new(AtomicBool::new(true))).await;
    let probe = local_probe(udp(addr.port()));
    let result = probe_once(probe.as_ref(), PATIENCE).await;
    assert!(
        matches!(result, Err(ProbeError::WrongEcho { from, .. }) if from == addr),
        "{result:?}"
    );
}

#[tokio::test]
async fn tcp_connect_ok_and_refused() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let health = Health {
        kind: HealthKind::Tcp,
        port: Some(port),
        ..Health::default()
    };
    let probe = local_probe(health.clone());
    assert_eq!(probe.kind(), "tcp");
    probe_once(probe.as_ref(), PATIENCE).await.unwrap();

    drop(listener);
    let result = probe_once(probe.as_ref(), PATIENCE).await;
    assert!(
        matches!(&result, Err(ProbeError::Io { op: "connect", source })
            if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{result:?}"
    );
}

/// A one-connection-at-a-time HTTP server answering every request with `answer`; returns its
/// port and the requests it received.
async fn http_server(answer: &'static [u8]) -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
            let _ = stream.write_all(answer).await;
        }
    });
    (port, rx)
}

fn http(port: u16, path: &str) -> Health {
    Health {
        kind: HealthKind::Http,
        url: Some(format!("http://127.0.0.1:{port}{path}")),
        ..Health::default()
    }
}

#[tokio::test]
async fn http_2xx_is_healthy() {
    let (port, mut requests) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let probe = local_probe(http(port, "/health?full=1"));
    assert_eq!(probe.kind(), "http");
    probe_once(probe.as_ref(), PATIENCE).await.unwrap();
    let request = requests.recv().await.unwrap();
    let lines: Vec<&str> = request.split("\r\n").collect();
    assert_eq!(lines[0], "GET /health?full=1 HTTP/1.1");
    // Header names are case-insensitive (hyper writes them in lower case).
    let headers: Vec<String> = lines[1..].iter().map(|l| l.to_ascii_lowercase()).collect();
    assert!(
        headers.contains(&format!("host: 127.0.0.1:{port}")),
        "{request:?}"
    );
    assert!(
        headers.contains(&"connection: close".to_owned()),
        "{request:?}"
    );

    let (port, _requests) = http_server(b"HTTP/1.0 204 No Content\r\n\r\n").await;
    probe_once(local_probe(http(port, "")).as_ref(), PATIENCE)
        .await
        .unwrap();
}

#[tokio::test]
async fn http_error_status_fails() {
    let (port, _requests) =
        http_server(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
    let result = probe_once(local_probe(http(port, "/")).as_ref(), PATIENCE).await;
    assert!(
        matches!(result, Err(ProbeError::HttpStatus(500))),
        "{result:?}"
    );

    let (port, _requests) = http_server(b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n").await;
    let result = probe_once(local_probe(http(port, "/")).as_ref(), PATIENCE).await;
    assert!(
        matches!(result, Err(ProbeError::HttpStatus(301))),
        "{result:?}"
    );
}

#[tokio::test]
async fn http_garbage_or_silence_fails() {
    for answer in [
        &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
        b"HTTP/1.1 200",
        b"",
        b"\r\n",
    ] {
        let answer: &'static [u8] = answer;
        let (port, _requests) = http_server(answer).await;
        let result = probe_once(local_probe(http(port, "/")).as_ref(), PATIENCE).await;
        assert!(
            matches!(result, Err(ProbeError::BadResponse(_))),
            "{answer:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn exec_exit_status_decides() {
    let ok = local_probe(exec(&["true"]));
    assert_eq!(ok.kind(), "exec");
    probe_once(ok.as_ref(), PATIENCE).await.unwrap();

    let result = probe_once(local_probe(exec(&["false"])).as_ref(), PATIENCE).await;
    assert!(
        matches!(&result, Err(ProbeError::Exit(status)) if status.code() == Some(1)),
        "{result:?}"
    );

    let result = probe_once(
        local_probe(exec(&["/nonexistent/nsfail-probe"])).as_ref(),
        PATIENCE,
    )
    .await;
    assert!(
        matches!(result, Err(ProbeError::Spawn { .. })),
        "{result:?}"
    );
}

/// A scratch file path unique to this process and call.
fn scratch(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "nsfail-health-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Whether `pid` is still running (a zombie has already died).
fn running(pid: u32) -> bool {
    match fs::read_to_string(paths::proc_file(pid, "stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        }
    }
}

#[tokio::test]
async fn exec_timeout_kills_the_command_and_its_children() {
    let pids = scratch("pids");
    let script = format!("sleep 5 & echo $$ $! > {}; wait", pids.display());
    let probe = local_probe(exec(&["sh", "-c", &script]));
    let limit = Duration::from_millis(200);
    let result = probe_once(probe.as_ref(), limit).await;
    assert!(matches!(result, Err(ProbeError::Timeout(_))), "{result:?}");

    let text = fs::read_to_string(&pids).expect("the shell wrote its pids");
    let _ = fs::remove_file(&pids);
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{text:?}");
    // Well before `sleep 5` could end by itself.
    let deadline = Instant::now() + PATIENCE;
    while pids.iter().any(|&pid| running(pid)) {
        assert!(Instant::now() < deadline, "still running: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A uniquely named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nsf-health-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let status = StdCommand::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = StdCommand::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[tokio::test]
async fn exec_runs_inside_the_encoders_namespace() {
    let ns = Netns::new();
    let inode = fs::metadata(paths::netns(&ns.0)).unwrap().ino();
    let script = format!("test \"$(readlink /proc/self/ns/net)\" = 'net:[{inode}]'");
    let inside = probe(exec(&["sh", "-c", &script]), Some(&ns.0)).unwrap();
    probe_once(inside.as_ref(), PATIENCE).await.unwrap();

    // The same check from the daemon's namespace fails: it really tells them apart.
    let outside = local_probe(exec(&["sh", "-c", &script]));
    let result = probe_once(outside.as_ref(), PATIENCE).await;
    assert!(matches!(result, Err(ProbeError::Exit(_))), "{result:?}");

    // A fresh namespace has a loopback interface and nothing else.
    let only_lo = "[ \"$(ip -o link show | cut -d: -f2 | tr -d ' ')\" = lo ]";
    let links = probe(exec(&["sh", "-c", only_lo]), Some(&ns.0)).unwrap();
    probe_once(links.as_ref(), PATIENCE).await.unwrap();
}

#[tokio::test]
async fn exec_in_a_missing_namespace_fails() {
    let probe = probe(exec(&["true"]), Some("nsf-health-missing")).unwrap();
    let result = probe_once(probe.as_ref(), PATIENCE).await;
    assert!(
        matches!(&result, Err(ProbeError::Netns { name, .. }) if name == "nsf-health-missing"),
        "{result:?}"
    );
}

#[test]
fn flow_has_no_probe_and_an_incomplete_check_always_fails() {
    let flow = Health {
        kind: HealthKind::Flow,
        ..Health::default()
    };
    assert!(probe(flow, None).is_none());

    // Parse, don't re-validate: a check missing what its kind needs is never built, so no
    // probe can run unchecked.
    let problems = HealthCheck::build(&encoder(Health::default(), None), &[]).unwrap_err();
    assert_eq!(problems[0].key, "kind");
    assert!(problems[0].message.contains("needs a port"), "{problems:?}");
}

/// Reads updates until one makes a transition of `counter` (the rise/fall count the
/// controller's judge keeps); returns it, the transition, and how many results in a row
/// before it (itself included) agreed with it.
async fn until_transition(
    rx: &mut mpsc::Receiver<HealthUpdate>,
    counter: &mut Counter,
) -> (HealthUpdate, bool, u32) {
    let mut streak = (false, 0);
    loop {
        let update = rx.recv().await.expect("the runner is running");
        assert_eq!(update.encoder, "enc-t");
        assert_eq!(update.ok, update.latency.is_some(), "{update:?}");
        assert_eq!(update.ok, update.error.is_none(), "{update:?}");
        streak = if streak.0 == update.ok {
            (update.ok, streak.1 + 1)
        } else {
            (update.ok, 1)
        };
        if let Some(state) = counter.record(update.ok) {
            assert_eq!(state, update.ok, "{update:?}");
            return (update, state, streak.1);
        }
    }
}

#[tokio::test]
async fn runner_reports_fall_and_rise() {
    let answering = Arc::new(AtomicBool::new(true));
    let addr = responder(Echo::Same, answering.clone()).await;
    let health = Health {
        interval_ms: 20,
        timeout_ms: 20,
        rise: 2,
        fall: 3,
        ..udp(addr.port())
    };
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = health::spawn(
        "enc-t".into(),
        local_probe(health.clone()),
        &check(health.clone(), None),
        tx,
        cancel.clone(),
    );

    let steps = async {
        // Starts healthy: an answered probe is reported, without a transition.
        let mut counter = Counter::new(health.rise, health.fall, true);
        let first = rx.recv().await.unwrap();
        assert!(first.ok, "{first:?}");
        assert_eq!(counter.record(first.ok), None);

        answering.store(false, Ordering::SeqCst);
        let (down, state, failures) = until_transition(&mut rx, &mut counter).await;
        assert!(!state);
        assert_eq!(failures, health.fall);
        assert!(down.error.unwrap().contains("no answer"));

        answering.store(true, Ordering::SeqCst);
        let (_, state, successes) = until_transition(&mut rx, &mut counter).await;
        assert!(state);
        assert_eq!(successes, health.rise);
    };
    timeout(Duration::from_secs(20), steps)
        .await
        .expect("transitions within 20 s");

    cancel.cancel();
    timeout(PATIENCE, task)
        .await
        .expect("stops when cancelled")
        .unwrap();
}

#[tokio::test]
async fn runner_stops_promptly_mid_probe() {
    let silent = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    // A probe that would take a minute to time out.
    let health = Health {
        interval_ms: 60_000,
        timeout_ms: 60_000,
        ..udp(silent.local_addr().unwrap().port())
    };
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = health::spawn(
        "enc-t".into(),
        local_probe(health.clone()),
        &check(health.clone(), None),
        tx,
        cancel.clone(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancel.cancel();
    timeout(PATIENCE, task)
        .await
        .expect("stops when cancelled")
        .unwrap();
    assert!(
        rx.recv().await.is_none(),
        "no update from a cancelled probe"
    );
}

#[tokio::test]
async fn exec_gets_a_cleared_environment_plus_the_encoders_env() {
    // SAFETY: set before any probe forks; only this test reads it (through the child).
    unsafe { std::env::set_var("NSFAIL_TEST_LEAK", "from-the-daemon") };
    let script = "test \"$FOO\" = bar && test -z \"$NSFAIL_TEST_LEAK\" && test -n \"$PATH\"";
    let mut e = encoder(exec(&["sh", "-c", script]), None);
    e.env.insert("FOO".into(), "bar".into());
    let checked = HealthCheck::build(&e, &[]).expect("a valid health check");
    let probe = health::probe_for(&checked).expect("a probe");
    probe_once(probe.as_ref(), PATIENCE).await.unwrap();
    // Without the configured variable the same check fails: nothing else provides it.
    let bare = local_probe(exec(&["sh", "-c", script]));
    let result = probe_once(bare.as_ref(), PATIENCE).await;
    assert!(matches!(result, Err(ProbeError::Exit(_))), "{result:?}");
}

#[tokio::test]
async fn exec_abandoned_ignoring_sigterm_is_killed_after_the_grace() {
    let pids = scratch("term");
    let script = format!("trap \"\" TERM; echo $$ > {}; sleep 30", pids.display());
    let probe = local_probe(exec(&["sh", "-c", &script]));
    let result = probe_once(probe.as_ref(), Duration::from_millis(300)).await;
    assert!(matches!(result, Err(ProbeError::Timeout(_))), "{result:?}");
    let pid: u32 = fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    let _ = fs::remove_file(&pids);
    let abandoned = Instant::now();
    while running(pid) {
        assert!(
            abandoned.elapsed() < nsfail::child::PROBE_GRACE + PATIENCE,
            "still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn an_exec_probe_dies_with_the_daemon_thread_that_started_it() {
    let pids = scratch("pdeath");
    // It ignores SIGTERM: only the parent-death SIGKILL can end it before 30 s.
    let script = format!("trap \"\" TERM; echo $$ > {}; sleep 30", pids.display());
    let written = pids.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let probe = local_probe(exec(&["sh", "-c", &script]));
            let mut attempt = probe.probe();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !written.exists() && Instant::now() < deadline {
                let _ = timeout(Duration::from_millis(50), &mut attempt).await;
            }
            // Neither cancelled nor dropped: nothing but the parent-death signal stops it.
            std::mem::forget(attempt);
            std::mem::forget(probe);
        });
    })
    .join()
    .unwrap();
    let pid: u32 = fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    let _ = fs::remove_file(&pids);
    let gone = Instant::now();
    while running(pid) {
        assert!(
            gone.elapsed() < PATIENCE,
            "still running after its parent thread exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
