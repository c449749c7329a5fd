//! The metrics endpoint: a small HTTP/1.1 server for `GET /metrics`, bounded in
//! connections, request size and time, that refreshes the registry before each scrape.

use super::*;

/// Bounds on what one client of the endpoint may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request head (request line and headers) accepted; longer ones get 431.
    pub max_request: usize,
    /// How long a client may take to send its request head (then it gets 408), and again to
    /// take the response.
    pub timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 8 * 1024,
            timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Binds the metrics endpoint on `addr` now, so that a taken port is an error before the daemon
/// reports ready, and serves it on a spawned task until `shutdown` turns true (or its sender is
/// dropped). Returns the bound address (useful with port 0) and that task.
///
/// `GET /metrics` (and `HEAD`) calls `refresh` (on a blocking thread, so it may lock and read
/// maps) and answers with [`Metrics::encode`]. Other paths get 404, other methods 405. One
/// request per connection.
pub async fn serve(
    addr: SocketAddr,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(refresh);
    let task = tokio::spawn(accept_loop(listener, limits, metrics, refresh, shutdown));
    Ok((bound, task))
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Dropping the set when the loop ends aborts the connections still in flight.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < limits.max_connections => {
                match accepted {
                    Ok((stream, peer)) => {
                        let (metrics, refresh) = (metrics.clone(), refresh.clone());
                        connections.spawn(async move {
                            if let Err(e) = handle(stream, limits, metrics, refresh).await {
                                debug!("metrics client {peer}: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors, typically: back off instead of spinning.
                        warn!("metrics endpoint: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Resolves when `shutdown` turns true or its sender is dropped (which also means stop).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller's select.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// How long a client gets to close its end after the response before it is closed anyway.
pub(super) const LINGER: Duration = Duration::from_secs(1);

/// An HTTP response: status line, content type and body.
pub(super) struct Reply {
    status: &'static str,
    content_type: &'static str,
    allow: bool,
    body: Vec<u8>,
    head_only: bool,
}

impl Reply {
    fn error(status: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: format!("{status}\n").into_bytes(),
            head_only: false,
        }
    }
}

pub(super) async fn handle(
    mut stream: TcpStream,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> io::Result<()> {
    let reply = match timeout(limits.timeout, read_head(&mut stream, limits.max_request)).await {
        Err(_) => Reply::error("408 Request Timeout"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Reply::error("431 Request Header Fields Too Large"),
        Ok(Ok(Head::Complete(head))) => respond(&head, metrics, refresh).await,
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    if reply.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !reply.head_only {
        out.extend_from_slice(&reply.body);
    }
    timeout(limits.timeout, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client did not take the response"))??;
    // Closing with unread input makes the kernel send a reset, which can destroy the response
    // before the client reads it: read until the client closes, for a moment at most.
    let mut sink = [0u8; 4096];
    let _ = timeout(LINGER, async {
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
    Ok(())
}

pub(super) enum Head {
    /// The request line and headers, without the blank line.
    Complete(String),
    TooLarge,
    /// The client closed before finishing its request.
    Closed,
}

pub(super) async fn read_head(stream: &mut TcpStream, max: usize) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        // The terminator may straddle two reads.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            let end = from + end;
            if end > max {
                return Ok(Head::TooLarge);
            }
            return Ok(Head::Complete(
                String::from_utf8_lossy(&buf[..end]).into_owned(),
            ));
        }
        if buf.len() > max {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the blank line ending a request head starts: CRLF CRLF, or bare LF LF from lenient
/// clients.
pub(super) fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(super) async fn respond(
    head: &str,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> Reply {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Reply::error("400 Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Reply::error("505 HTTP Version Not Supported");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path != "/metrics" {
        return Reply::error("404 Not Found");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Reply {
                allow: true,
                ..Reply::error("405 Method Not Allowed")
            };
        }
    };
    match tokio::task::spawn_blocking(move || {
        refresh();
        metrics.encode()
    })
    .await
    {
        Ok(body) => Reply {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            allow: false,
            body: body.into_bytes(),
            head_only,
        },
        Err(e) => {
            warn!("metrics endpoint: refreshing or encoding the metrics failed: {e}");
            Reply::error("500 Internal Server Error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
