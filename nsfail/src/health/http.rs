//! HTTP status: `GET` a `http://` URL over HTTP/1.1 (hyper's client); a 2xx status is
//! healthy. Only the status is read, never the body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Request,
    header::{ACCEPT, CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

use super::{Probe, ProbeError, ProbeFuture};
use crate::config::HttpUrl;

/// Status probe of one URL.
pub struct HttpProbe {
    url: HttpUrl,
}

impl HttpProbe {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self::from_url(HttpUrl::parse(url)?))
    }

    /// The probe of a URL the config has parsed already.
    pub fn from_url(url: HttpUrl) -> Self {
        Self { url }
    }

    pub fn url(&self) -> &HttpUrl {
        &self.url
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let start = Instant::now();
        let io = |op| move |source| ProbeError::Io { op, source };
        let stream = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(io("connect"))?;
        let bad = |e: hyper::Error| ProbeError::BadResponse(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(bad)?;
        let request = Request::get(self.url.target.as_str())
            .header(HOST, self.url.authority.as_str())
            .header(USER_AGENT, "nsfail")
            .header(ACCEPT, "*/*")
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Request(e.to_string()))?;
        // The connection is driven on its own task, which ends when the answer (its body
        // unread) and the sender are dropped; its failures reach the request as errors.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender.send_request(request).await.map_err(bad)?;
        match response.status().as_u16() {
            200..=299 => Ok(start.elapsed()),
            code => Err(ProbeError::HttpStatus(code)),
        }
    }
}

impl Probe for HttpProbe {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(self.attempt())
    }

    fn kind(&self) -> &'static str {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::{Duration, HttpProbe, HttpUrl, ProbeError};

    fn url(host: &str, port: u16, authority: &str, target: &str) -> HttpUrl {
        HttpUrl {
            host: host.into(),
            port,
            authority: authority.into(),
            target: target.into(),
        }
    }

    #[test]
    fn parses_urls() {
        let cases = [
            ("http://10.0.0.2", url("10.0.0.2", 80, "10.0.0.2", "/")),
            (
                "http://10.0.0.2:8080/health?full=1#top",
                url("10.0.0.2", 8080, "10.0.0.2:8080", "/health?full=1"),
            ),
            (
                "http://enc-a.local?x",
                url("enc-a.local", 80, "enc-a.local", "/?x"),
            ),
            (
                "http://[fd00::2]:81/s",
                url("fd00::2", 81, "[fd00::2]:81", "/s"),
            ),
            ("http://[fd00::2]", url("fd00::2", 80, "[fd00::2]", "/")),
            ("http://h:/", url("h", 80, "h:", "/")),
        ];
        for (text, want) in cases {
            assert_eq!(HttpUrl::parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for text in [
            "https://10.0.0.2/",
            "http://",
            "http:///path",
            "http://:80/",
            "http://h:0/",
            "http://h:65536/",
            "http://h:x/",
            "http://u@h/",
            "http://[fd00::2/",
            "http://[fd00::2]x/",
            "http://[nope]/",
            "http://h/a b",
            "http://h/\r\nX: y",
        ] {
            assert!(HttpUrl::parse(text).is_err(), "{text}");
        }
    }

    /// The status line a server sends, and what the probe makes of it.
    async fn verdict(line: &'static [u8]) -> Result<Duration, ProbeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            if !line.is_empty() {
                let _ = s.write_all(line).await;
                let _ = s.write_all(b"\r\n\r\n").await;
            }
        });
        let probe = HttpProbe::new(&format!("http://127.0.0.1:{port}/health")).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), probe.attempt())
            .await
            .expect("the probe ends");
        let _ = server.await;
        result
    }

    #[tokio::test]
    async fn reads_status_lines() {
        let ok = [
            (&b"HTTP/1.1 200 OK"[..], 200),
            (b"HTTP/1.0 204", 204),
            (b"HTTP/1.1 500 Internal Server Error", 500),
            (b"HTTP/1.1 301 ", 301),
        ];
        for (line, code) in ok {
            let got = match verdict(line).await {
                Ok(_) => (200..300).contains(&code).then_some(code),
                Err(ProbeError::HttpStatus(c)) => Some(c),
                Err(_) => None,
            };
            assert_eq!(got, Some(code), "{line:?}");
        }
        for line in [
            &b""[..],
            b"SSH-2.0-OpenSSH_9.6",
            b"HTTP/2 200",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 abc OK",
            b"HTTP/1.1 099 X",
            b"HTTP/1.1  200 OK",
            b"http/1.1 200 OK",
        ] {
            let got = verdict(line).await;
            assert!(
                matches!(got, Err(ProbeError::BadResponse(_))),
                "{line:?}: {got:?}"
            );
        }
    }
}
