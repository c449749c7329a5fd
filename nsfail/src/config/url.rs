//! The `http` health check's URL, parsed once: what the probe connects to and asks for, and
//! the port the encoder's egress policy lets its answers leave from.

use std::net::Ipv6Addr;

/// A parsed `http://HOST[:PORT][/PATH][?QUERY]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Name or address to connect to (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// `HOST[:PORT]` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub target: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("health url {url:?} {why}");
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("does not start with http://"))?;
        if rest.bytes().any(|b| b == b' ' || b.is_ascii_control()) {
            return Err(bad("contains spaces or control characters"));
        }
        let rest = rest.split_once('#').map_or(rest, |(rest, _fragment)| rest);
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let target = if target.starts_with('?') {
            format!("/{target}")
        } else {
            target.to_owned()
        };
        if authority.contains('@') {
            return Err(bad("has user info, which is not supported"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| bad("lacks the ']' closing its IPv6 address"))?;
                if host.parse::<Ipv6Addr>().is_err() {
                    return Err(bad("has an invalid IPv6 address"));
                }
                let port = match after {
                    "" => None,
                    _ => Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("has junk after its IPv6 address"))?,
                    ),
                };
                (host, port)
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad("names no host"));
        }
        let port = match port {
            None | Some("") => 80,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("has an invalid port"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::HttpUrl;

    #[test]
    fn parses_what_the_probe_and_the_policy_need() {
        let u = HttpUrl::parse("http://[fd00::7]:8080/health?x=1#frag").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::7", 8080));
        assert_eq!(u.authority, "[fd00::7]:8080");
        assert_eq!(u.target, "/health?x=1");
        assert_eq!(HttpUrl::parse("http://enc-a").unwrap().port, 80);
        for bad in [
            "https://x/",
            "http://x:0/",
            "http://x:99999/",
            "http://u@x/",
            "http://[::1/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
