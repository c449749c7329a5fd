//! The control socket: binding it (0600 from the start), one connection's requests, and
//! running each against the controller.

use super::{actor::ControlHandle, *};

/// Binds the socket (mode 0600). A socket file nobody answers on is stale and replaced; one
/// that answers belongs to a running daemon, and this one refuses to start.
pub(super) async fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another nsfail daemon is serving {}", socket.display());
        }
        fs::remove_file(socket).with_context(|| format!("removing stale {}", socket.display()))?;
    }
    // Created 0600: there is no moment at which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves one connection: requests one per line until the client closes. A malformed or
/// oversized request gets an error answer; an oversized one also ends the connection.
pub(super) async fn handle(stream: UnixStream, ctl: ControlHandle) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(api::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > api::MAX_REQUEST;
        let response = if too_long {
            Response::error(format!("request longer than {} bytes", api::MAX_REQUEST))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) if req.v != api::VERSION => Response::error(format!(
                    "protocol version {} not supported (this daemon speaks {})",
                    req.v,
                    api::VERSION
                )),
                Ok(req) => ctl.request(req.command).await,
                Err(e) => Response::error(format!("malformed request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}
