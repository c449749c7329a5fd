//! The metrics endpoint: `GET /metrics` over HTTP/1.1, served by hyper, bounded in
//! connections, request size and time, refreshing the registry before each scrape.

use std::{convert::Infallible, pin::pin};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::*;

/// Bounds on what one client of the endpoint may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request head (request line and headers) accepted; longer ones get 431. hyper
    /// takes no less than 8 KiB.
    pub max_request: usize,
    /// How long a client may take to send its request head, and again to take the response.
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

/// hyper's smallest read buffer.
const MIN_BUF: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Binds the metrics endpoint on `addr` now, so that a taken port is an error before the daemon
/// reports ready, and serves it on a spawned task until `shutdown` is cancelled. Returns the bound address (useful with port 0) and that task.
///
/// `GET /metrics` (and `HEAD`) calls `refresh` (on a blocking thread, so it may lock and read
/// maps) and answers with [`Metrics::encode`]. Other paths get 404, other methods 405. One
/// request per connection.
pub async fn serve(
    addr: SocketAddr,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
    shutdown: CancellationToken,
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
    shutdown: CancellationToken,
) {
    // Dropping the set when the loop ends aborts the connections still in flight.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
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

/// Serves one connection: one request, then the connection closes. A client that does not
/// send its head within the timeout is dropped (hyper answers 408 where it can); a head
/// longer than the limit gets 431; the whole exchange is bounded by twice the timeout.
pub(super) async fn handle(
    stream: TcpStream,
    limits: Limits,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> io::Result<()> {
    let service = service_fn(move |req| {
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        async move { Ok::<_, Infallible>(respond(req, metrics, refresh).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.timeout)
        .max_buf_size(limits.max_request.max(MIN_BUF))
        .keep_alive(false);
    let conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let served = timeout(2 * limits.timeout, conn).await;
    // The exposition (tens of MB with 100,000 channels) is freed now: give it back.
    tokio::task::spawn_blocking(crate::heap::trim);
    match served {
        Ok(served) => served.map_err(io::Error::other),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not take the response",
        )),
    }
}

fn reply(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{status}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE_HEADER,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) async fn respond(
    req: Request<hyper::body::Incoming>,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // hyper leaves out the body of an answer to HEAD, keeping its length.
    match tokio::task::spawn_blocking(move || {
        refresh();
        metrics.encode()
    })
    .await
    {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut()
                .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(CONTENT_TYPE));
            r
        }
        Err(e) => {
            warn!("metrics endpoint: refreshing or encoding the metrics failed: {e}");
            reply(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Sends `request` to the endpoint and reads until it closes the connection.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_scrapes_and_refuses_the_rest() {
        let limits = Limits {
            timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let shutdown = CancellationToken::new();
        let refreshed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = refreshed.clone();
        let refresh = move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let addr = "127.0.0.1:0".parse().unwrap();
        let (addr, _task) = serve(addr, limits, Arc::new(Metrics::new()), refresh, shutdown)
            .await
            .unwrap();

        let get = exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains(CONTENT_TYPE), "{get}");
        assert!(get.ends_with("# EOF\n"), "{get}");
        let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::Relaxed), 2);

        let missing = exchange(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get, head"),
            "{post}"
        );
        let long = format!(
            "GET /metrics HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
            "a".repeat(2 * MIN_BUF)
        );
        let big = exchange(addr, long.as_bytes()).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::Relaxed), 2);

        // A client that never finishes its head is let go after the timeout.
        let t = Instant::now();
        let slow = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "held {:?}",
            t.elapsed()
        );
        assert!(
            slow.is_empty() || slow.starts_with("HTTP/1.1 408"),
            "{slow}"
        );
    }
}
