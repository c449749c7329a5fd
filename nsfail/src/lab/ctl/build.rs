//! Building the persistent lab step by step (namespaces, then each process), recording each
//! step before the next, and the daemon config written for it.

use std::net::SocketAddr;

use super::*;
use crate::{
    config::{Channel, Config, Encoder, Failback, Health, HealthKind, Ingest, Protocol, Restart},
    dataplane::XdpMode,
};

/// ffmpeg's video encoder arguments: H.264 when this ffmpeg has libx264, else MPEG-2.
pub(super) fn video_codec() -> Vec<&'static str> {
    let has_x264 = Command::new("ffmpeg")
        .args(["-hide_banner", "-encoders"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(" libx264 "));
    if has_x264 {
        vec![
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ]
    } else {
        vec!["-pix_fmt", "yuv420p", "-c:v", "mpeg2video"]
    }
}

/// One encoder of the lab, as the config and its processes need it.
pub(super) struct LabEncoder {
    pub(super) name: String,
    pub(super) netns: String,
    pub(super) host_if: String,
    pub(super) addr4: String,
}

/// The daemon's config for the lab (the keys of DESIGN.md's contract, plus `ingest.netns`),
/// built as a [`Config`] and written with [`Config::to_toml`]: what `nsfail run` reads back is
/// what was built, and a field the config gains cannot be spelled wrong here.
pub(super) fn daemon_config(rt: &str, encoders: &[LabEncoder], protocol: LabProtocol) -> String {
    // SRT listeners answer their own health check (the srt kind, on the channel's port); a
    // UDP receiver cannot, so a sidecar echo answers for its namespace, and the stream itself
    // (the kernel's refusals once the receiver is gone) tells that the receiver died.
    let health = match protocol {
        LabProtocol::Srt => Health {
            kind: HealthKind::Srt,
            rise: 3,
            fall: 2,
            ..Health::default()
        },
        LabProtocol::Udp => Health {
            kind: HealthKind::Udp,
            port: Some(ECHO_PORT),
            rise: 3,
            fall: 3,
            ..Health::default()
        },
    };
    let config = Config {
        ingest: Ingest {
            interface: INGEST_IF.to_owned(),
            xdp_mode: XdpMode::Native,
            metrics: METRICS.parse().expect("a socket address"),
            netns: Some(rt.to_owned()),
            log_level: None,
        },
        encoders: encoders
            .iter()
            .map(|e| Encoder {
                name: e.name.clone(),
                address: e.addr4.parse().expect("the plan's addresses parse"),
                interface: Some(e.host_if.clone()),
                netns: Some(e.netns.clone()),
                mac: None,
                allow: vec![format!("{}:{SERVICE_PORT}/tcp", lab_gateway(&e.addr4))],
                health: health.clone(),
                spawn: None,
                restart: Restart::default(),
                env: Default::default(),
                prefix: None,
            })
            .collect(),
        channels: vec![Channel {
            name: "cam1".into(),
            listen: SocketAddr::new(INGEST4.parse().expect("an address"), STREAM_PORT),
            encoders: encoders.iter().map(|e| e.name.clone()).collect(),
            port: Some(STREAM_PORT),
            failback: Failback::Manual,
            hold_down_ms: crate::config::DEFAULT_HOLD_DOWN_MS,
            protocol: match protocol {
                LabProtocol::Srt => Protocol::Srt,
                LabProtocol::Udp => Protocol::Udp,
            },
            sources: Vec::new(),
            srt_peer_limit: None,
        }],
        daemon: Default::default(),
        cluster: None,
    };
    format!(
        "# The demo lab's daemon config, written by `nsfail lab up`; `nsfail lab down` removes \
         it.\n\n{}",
        config.to_toml()
    )
}

/// A lab being built: the record so far, and the processes started, still held as children so
/// that undoing never depends on recognising them.
pub(in crate::lab) struct Builder<R: Record = LabInfo> {
    pub(in crate::lab) dir: LabDir,
    pub(in crate::lab) info: R,
    pub(in crate::lab) children: Vec<(String, Child)>,
}

impl Builder {
    pub(super) fn build(&mut self, opts: &LabOptions) -> Result<()> {
        let prefix = &opts.prefix;
        let planned = ["rt".to_owned(), "src".to_owned()]
            .into_iter()
            .chain((0..opts.encoders).map(|i| format!("e{}", letter(i))));
        for name in planned.map(|n| format!("{prefix}{n}")) {
            if paths::netns(&name).exists() {
                return Err(LabCtlError::NamespaceExists(name));
            }
        }

        let lab = Lab::new(prefix, opts.encoders)?;
        let rt = lab.rt.name.clone();
        let src = lab.src.name.clone();
        let encoders: Vec<LabEncoder> = lab
            .encoders
            .iter()
            .enumerate()
            .map(|(i, e)| LabEncoder {
                name: format!("enc-{}", letter(i)),
                netns: e.ns.name.clone(),
                host_if: e.host_if.clone(),
                addr4: e.addr4.clone(),
            })
            .collect();
        // From here the record, not the Lab's guards, is what removes the namespaces.
        self.info.namespaces = lab.keep();
        self.save()?;

        let config = daemon_config(&rt, &encoders, opts.protocol);
        fs::write(&self.info.config, config)
            .map_err(io_err(format!("write {}", self.info.config.display())))?;

        self.start_encoders(&encoders, opts.protocol)?;
        self.start_host_and_source(&rt, &src, opts.protocol)?;
        self.settle()
    }

    /// Each encoder's receiver (its output file), and for UDP its health echo.
    fn start_encoders(&mut self, encoders: &[LabEncoder], protocol: LabProtocol) -> Result<()> {
        for e in encoders {
            let output = self.dir.output(&e.name);
            File::create(&output).map_err(io_err(format!("create {}", output.display())))?;
            self.info.outputs.push((e.name.clone(), output.clone()));
            let receiver = match protocol {
                LabProtocol::Srt => srt_receiver(STREAM_PORT),
                LabProtocol::Udp => udp_receiver(STREAM_PORT),
            };
            self.spawn(
                &format!("{}-receiver", e.name),
                &e.netns,
                receiver,
                Some(&output),
            )?;
            if protocol == LabProtocol::Udp {
                let echo = udp_echo(ECHO_PORT);
                self.spawn(&format!("{}-echo", e.name), &e.netns, echo, None)?;
            }
        }
        Ok(())
    }

    /// The ingest host's service, and the source: ffmpeg's test stream, through an SRT relay
    /// for an SRT lab.
    fn start_host_and_source(&mut self, rt: &str, src: &str, protocol: LabProtocol) -> Result<()> {
        // A service on the ingest host that the encoders may use (their allow-lists name it):
        // reachable on SERVICE_PORT, and nothing else is.
        let service = vec![
            "socat".to_owned(),
            format!("TCP-LISTEN:{SERVICE_PORT},fork,reuseaddr"),
            "SYSTEM:echo nsfail lab host service".to_owned(),
        ];
        self.spawn("rt-service", rt, service, None)?;

        let target = match protocol {
            LabProtocol::Srt => {
                let relay = vec![
                    "srt-live-transmit".to_owned(),
                    "-a".to_owned(),
                    "yes".to_owned(),
                    "-q".to_owned(),
                    RELAY.to_owned(),
                    format!("srt://{INGEST4}:{STREAM_PORT}?mode=caller"),
                ];
                self.spawn("src-relay", src, relay, None)?;
                format!("{RELAY}?pkt_size=1316")
            }
            LabProtocol::Udp => format!("udp://{INGEST4}:{STREAM_PORT}?pkt_size=1316"),
        };
        let ffmpeg = test_stream(&["-f".to_owned(), "mpegts".to_owned(), target]);
        self.spawn("src-ffmpeg", src, ffmpeg, None)
    }
}

/// An SRT listener on `port` writing what it receives to stdout (and answering the `srt`
/// health check itself).
pub(in crate::lab) fn srt_receiver(port: u16) -> Vec<String> {
    [
        "srt-live-transmit",
        "-a",
        "yes",
        "-q",
        &format!("srt://:{port}?mode=listener"),
        "file://con",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A UDP receiver on `port` writing what it receives to stdout.
pub(in crate::lab) fn udp_receiver(port: u16) -> Vec<String> {
    ["socat", "-u", &format!("UDP-RECV:{port}"), "STDOUT"]
        .map(str::to_owned)
        .to_vec()
}

/// A UDP echo on `port` for the daemon's `udp` health probes: one datagram in, the same
/// datagram back to its sender.
pub(in crate::lab) fn udp_echo(port: u16) -> Vec<String> {
    ["socat", "-T1", &format!("UDP-RECVFROM:{port},fork"), "PIPE"]
        .map(str::to_owned)
        .to_vec()
}

/// ffmpeg sending a live MPEG-TS test picture (25 frames a second, 1 Mbit/s) to `output` (its
/// format and target arguments).
pub(in crate::lab) fn test_stream(output: &[String]) -> Vec<String> {
    [
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=640x360:rate=25",
    ]
    .into_iter()
    .chain(video_codec())
    .chain(["-g", "25", "-b:v", "1M"])
    .map(str::to_owned)
    .chain(output.iter().cloned())
    .collect()
}

impl<R: Record> Builder<R> {
    /// Waits [`SETTLE`], then fails if a started process has exited: one that cannot bind,
    /// connect or find its codec exits at once.
    pub(in crate::lab) fn settle(&mut self) -> Result<()> {
        thread::sleep(SETTLE);
        self.exited()
    }

    /// Fails, naming it and the end of its log, if a started process has exited.
    pub(in crate::lab) fn exited(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child
                .try_wait()
                .map_err(io_err(format!("wait for {name}")))?
            {
                return Err(LabCtlError::Start {
                    name: name.clone(),
                    detail: format!("{status}: {}", log_tail(&self.dir.log(name))),
                });
            }
        }
        Ok(())
    }

    /// [`start`]s `cmdline` in namespace `netns` and records it.
    pub(in crate::lab) fn spawn(
        &mut self,
        name: &str,
        netns: &str,
        cmdline: Vec<String>,
        stdout: Option<&Path>,
    ) -> Result<()> {
        start(
            &self.dir,
            &mut self.children,
            name,
            Some(netns),
            cmdline,
            stdout,
        )
        .map(|p| self.info.processes().push(p))?;
        self.save()
    }

    pub(in crate::lab) fn save(&self) -> Result<()> {
        save(&self.dir, &self.info)
    }

    /// Undoes a failed build: stops the children (by handle, which cannot name another
    /// process), then removes the namespaces and the directory. Returns the error to report.
    pub(in crate::lab) fn undo(mut self, cause: LabCtlError) -> LabCtlError {
        for (_, child) in &self.children {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let start = Instant::now();
        for (_, child) in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < GRACE {
                thread::sleep(POLL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.info.processes().clear();
        match teardown(&self.dir, &mut self.info) {
            Ok(()) => cause,
            Err(e) => LabCtlError::Rollback {
                cause: Box::new(cause),
                cleanup: e.to_string(),
            },
        }
    }
}

/// Starts `cmdline` as a detached process (own session, stdin from /dev/null, output to
/// files in `dir`), in namespace `netns` if given, and waits until it runs as itself. The
/// child is pushed on `children` as soon as it exists (so that undoing never depends on
/// recognising it); returns what to record.
pub(in crate::lab) fn start(
    dir: &LabDir,
    children: &mut Vec<(String, Child)>,
    name: &str,
    netns: Option<&str>,
    cmdline: Vec<String>,
    stdout: Option<&Path>,
) -> Result<LabProcess> {
    let log_path = dir.log(name);
    let log = open_append(&log_path)?;
    let out = match stdout {
        Some(path) => open_append(path)?,
        None => log
            .try_clone()
            .map_err(io_err(format!("open {}", log_path.display())))?,
    };
    let ns = netns
        .map(|netns| {
            File::open(paths::netns(netns))
                .map_err(io_err(format!("open network namespace {netns}")))
        })
        .transpose()?;
    let mut command = Command::new(&cmdline[0]);
    command
        .args(&cmdline[1..])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log);
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: setns(2) and setsid(2) are async-signal-safe, and the closure allocates
    // nothing; `ns` outlives the spawn below.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            nix::unistd::setsid().map(drop).map_err(io::Error::from)
        });
    }
    let child = command
        .spawn()
        .map_err(io_err(format!("start {}", cmdline.join(" "))))?;
    let pid = child.id();
    children.push((name.to_owned(), child));
    let child = &mut children.last_mut().expect("just pushed").1;

    // Wait until the PID runs the program itself (past the fork and exec).
    let begun = Instant::now();
    while proc_cmdline(pid).as_ref() != Some(&cmdline) {
        if let Some(status) = child
            .try_wait()
            .map_err(io_err(format!("wait for {name}")))?
        {
            return Err(LabCtlError::Start {
                name: name.to_owned(),
                detail: format!("{status}: {}", log_tail(&log_path)),
            });
        }
        if begun.elapsed() > EXEC_WAIT {
            return Err(LabCtlError::Start {
                name: name.to_owned(),
                detail: format!("not running as `{}` after {EXEC_WAIT:?}", cmdline.join(" ")),
            });
        }
        thread::sleep(POLL);
    }
    let (_, start_time) = proc_stat(pid).ok_or_else(|| LabCtlError::Start {
        name: name.to_owned(),
        detail: "exited at once".to_owned(),
    })?;
    Ok(LabProcess {
        name: name.to_owned(),
        netns: netns.unwrap_or_default().to_owned(),
        pid,
        start_time,
        cmdline,
        log: log_path,
    })
}

/// The letter of encoder `i`: a, b, ... (as in [`Lab`]'s namespace and interface names).
pub(super) fn letter(i: usize) -> char {
    (b'a' + i as u8) as char
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_config_reads_back_as_built() {
        let encoders: Vec<LabEncoder> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, l)| LabEncoder {
                name: format!("enc-{l}"),
                netns: format!("nsfail-e{l}"),
                host_if: format!("nsf-e{l}"),
                addr4: lab::v4(i as u8 + 1, 2).to_string(),
            })
            .collect();
        for protocol in [LabProtocol::Udp, LabProtocol::Srt] {
            let text = daemon_config("nsfail-rt", &encoders, protocol);
            assert!(text.starts_with("# The demo lab's daemon config"), "{text}");
            let cfg = Config::parse(&text, "lab").expect("the lab's config parses");
            assert_eq!(cfg.encoders.len(), 2);
            assert_eq!(cfg.channels[0].encoders, ["enc-a", "enc-b"]);
            assert_eq!(cfg.ingest.netns.as_deref(), Some("nsfail-rt"));
            let kind = cfg.encoders[0].health.kind;
            match protocol {
                LabProtocol::Srt => assert_eq!(kind, HealthKind::Srt),
                LabProtocol::Udp => assert_eq!(cfg.encoders[1].health.port, Some(ECHO_PORT)),
            }
            // Health checks build (an srt check takes its port from the channel).
            assert!(cfg.health_check(&cfg.encoders[0]).is_ok());
        }
    }
}
