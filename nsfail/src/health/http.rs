//! HTTP status: `GET` a `http://` URL with a minimal HTTP/1.1 request; a 2xx status line is
//! healthy. Only the status line is read.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{Probe, ProbeError, ProbeFuture};
use crate::config::HttpUrl;

/// The longest status line accepted; a real one is a few dozen bytes.
const MAX_STATUS_LINE: usize = 1024;

/// Status probe of one URL.
pub struct HttpProbe {
    url: HttpUrl,
    request: String,
}

impl HttpProbe {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self::from_url(HttpUrl::parse(url)?))
    }

    /// The probe of a URL the config has parsed already.
    pub fn from_url(url: HttpUrl) -> Self {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: nsfail\r\nAccept: */*\r\nConnection: \
             close\r\n\r\n",
            url.target, url.authority
        );
        Self { url, request }
    }

    pub fn url(&self) -> &HttpUrl {
        &self.url
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let start = Instant::now();
        let io = |op| move |source| ProbeError::Io { op, source };
        let mut stream = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(io("connect"))?;
        stream
            .write_all(self.request.as_bytes())
            .await
            .map_err(io("send"))?;
        let mut buf = [0u8; MAX_STATUS_LINE];
        let mut filled = 0;
        let line = loop {
            if let Some(end) = buf[..filled].windows(2).position(|w| w == b"\r\n") {
                break &buf[..end];
            }
            if filled == buf.len() {
                return Err(ProbeError::BadResponse(format!(
                    "no status line in the first {MAX_STATUS_LINE} bytes"
                )));
            }
            let n = stream
                .read(&mut buf[filled..])
                .await
                .map_err(io("receive"))?;
            if n == 0 {
                return Err(ProbeError::BadResponse(if filled == 0 {
                    "connection closed without an answer".into()
                } else {
                    "connection closed inside the status line".into()
                }));
            }
            filled += n;
        };
        match status_code(line)? {
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

/// The code of a status line `HTTP/1.x NNN [reason]` (without its CRLF).
fn status_code(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || {
        let shown: String = String::from_utf8_lossy(line).chars().take(60).collect();
        ProbeError::BadResponse(format!("status line {shown:?}"))
    };
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(bad)?;
    let code = match rest {
        [minor, b' ', code @ ..] if minor.is_ascii_digit() => code,
        _ => return Err(bad()),
    };
    match code {
        [a, b, c] | [a, b, c, b' ', ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            let code = [a, b, c]
                .iter()
                .fold(0u16, |n, d| n * 10 + u16::from(**d - b'0'));
            if (100..=599).contains(&code) {
                Ok(code)
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::{HttpUrl, status_code};

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

    #[test]
    fn reads_status_lines() {
        let ok = [
            (&b"HTTP/1.1 200 OK"[..], 200),
            (b"HTTP/1.0 204", 204),
            (b"HTTP/1.1 500 Internal Server Error", 500),
            (b"HTTP/1.1 301 ", 301),
        ];
        for (line, code) in ok {
            assert_eq!(status_code(line).ok(), Some(code), "{line:?}");
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
            assert!(status_code(line).is_err(), "{line:?}");
        }
    }
}
