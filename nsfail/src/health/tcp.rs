//! TCP connect: healthy when the encoder accepts a connection.

use std::{net::SocketAddr, time::Duration};

use tokio::{net::TcpStream, time::Instant};

use super::{Probe, ProbeError, ProbeFuture};

/// Connect probe of one `(address, port)`; the connection is closed as soon as it is made.
pub struct TcpProbe {
    target: SocketAddr,
}

impl TcpProbe {
    pub fn new(target: SocketAddr) -> Self {
        Self { target }
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let start = Instant::now();
        TcpStream::connect(self.target)
            .await
            .map_err(|source| ProbeError::Io {
                op: "connect",
                source,
            })?;
        Ok(start.elapsed())
    }
}

impl Probe for TcpProbe {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(self.attempt())
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }
}
