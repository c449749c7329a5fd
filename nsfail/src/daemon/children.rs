//! Managed encoders' processes: started inside their namespaces, restarted with backoff,
//! stopped (and their namespaces removed) when the encoder is removed.

use std::{fs::File, io, os::fd::AsFd as _, process::Stdio};

use tokio::{io::AsyncBufReadExt as _, process::Command};

use super::{
    actor::{ControlHandle, Msg},
    *,
};
use crate::config::{Encoder, Restart};

/// The supervised processes of managed encoders. A removed encoder's process is stopped, then
/// its namespace and veth are removed; at shutdown processes stop and namespaces stay (a
/// restarted daemon finds them in place).
pub(super) struct Managed {
    ctl: ControlHandle,
    running: BTreeMap<String, (config::Encoder, watch::Sender<bool>, JoinHandle<()>)>,
}

impl Managed {
    pub(super) fn new(ctl: ControlHandle) -> Self {
        Self {
            ctl,
            running: BTreeMap::new(),
        }
    }

    pub(super) fn sync(&mut self, cfg: &Config) {
        let wanted: BTreeMap<&str, &config::Encoder> = cfg
            .encoders
            .iter()
            .filter(|e| e.spawn.is_some())
            .map(|e| (e.name.as_str(), e))
            .collect();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, (e, _, _))| wanted.get(name.as_str()) != Some(&e))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let (e, stop, task) = self.running.remove(&name).expect("listed above");
            let _ = stop.send(true);
            let removed = !wanted.contains_key(name.as_str());
            tokio::spawn(async move {
                let _ = task.await;
                if removed && let Some(plan) = e.provision_plan() {
                    let _ =
                        tokio::task::spawn_blocking(move || provision::deprovision_or_warn(&plan))
                            .await;
                }
            });
        }
        for (name, e) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let ctl = self.ctl.clone();
            let report: Report = Arc::new(move |encoder: &str, msg: String| {
                warn!("managed encoder {encoder}: {msg}");
                ctl.tell(Msg::EncoderEvent(encoder.to_owned(), msg));
            });
            let task = tokio::spawn(supervise(e.clone(), stop_rx, report));
            self.running
                .insert(name.to_owned(), (e.clone(), stop, task));
        }
    }

    pub(super) async fn stop_all(&mut self) {
        for (_, (_, stop, task)) in std::mem::take(&mut self.running) {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
}

/// Something the supervisor has to say, for the event log.
pub(super) type Report = Arc<dyn Fn(&str, String) + Send + Sync>;

/// Runs a managed encoder's command inside its namespace until `stop` turns true, restarting
/// it with exponential backoff (0.5 s doubling to 30 s, back to 0.5 s after 10 s of running)
/// when `restart = "always"`. Its stdout and stderr go to the log, line by line.
pub(super) async fn supervise(e: Encoder, mut stop: watch::Receiver<bool>, report: Report) {
    let Some(spawn) = e.spawn.clone() else { return };
    let ns = e.namespace().unwrap_or_default();
    let mut backoff = Duration::from_millis(500);
    loop {
        let handle = match File::open(paths::netns(&ns)) {
            Ok(f) => f,
            Err(err) => {
                report(&e.name, format!("namespace {ns} missing: {err}"));
                return;
            }
        };
        let mut cmd = Command::new(&spawn.command);
        cmd.args(&spawn.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only setns (async-signal-safe) runs between fork and exec; the namespace
        // file was opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                setns(handle.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(err) => {
                report(&e.name, format!("cannot start {}: {err}", spawn.command));
                if e.restart == Restart::Never || wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        info!(
            "managed encoder {}: started {} (pid {:?})",
            e.name,
            spawn.command,
            child.id()
        );
        for (stream, name) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "stdout",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                "stderr",
            ),
        ] {
            let Some(stream) = stream else { continue };
            let who = e.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    info!("[{who} {name}] {line}");
                }
            });
        }
        let status = tokio::select! {
            status = child.wait() => status,
            () = stopped(&mut stop) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                info!("managed encoder {}: stopped", e.name);
                return;
            }
        };
        let ran = started.elapsed();
        let status = status.map_or_else(|err| err.to_string(), |s| s.to_string());
        if e.restart == Restart::Never {
            report(
                &e.name,
                format!("process exited ({status}); restart = never"),
            );
            return;
        }
        if ran > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        report(
            &e.name,
            format!(
                "process exited ({status}); restarting in {} ms",
                backoff.as_millis()
            ),
        );
        if wait_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Sleeps `d`; true if `stop` turned true meanwhile.
pub(super) async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        () = stopped(stop) => true,
    }
}

/// Resolves once `stop` is true or its sender is gone.
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
