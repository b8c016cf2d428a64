//! Health probes of real instances.

use std::time::Duration;

use crate::error::{Error, Result};

/// How an instance's health is probed. One probe per
/// [`Instance::health`](crate::Instance::health) call; the executor repeats
/// it (`health_retries` × `health_interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthProbe {
    /// Healthy when the service runs (process alive, or `systemctl
    /// is-active`). For applications without an HTTP endpoint.
    ServiceActive,
    /// An HTTP GET against the instance's address (feature `http`).
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    Http(HttpProbe),
}

impl Default for HealthProbe {
    /// `GET /health` expecting 200 with the `http` feature, else
    /// [`HealthProbe::ServiceActive`].
    fn default() -> Self {
        #[cfg(feature = "http")]
        {
            HealthProbe::Http(HttpProbe::default())
        }
        #[cfg(not(feature = "http"))]
        {
            HealthProbe::ServiceActive
        }
    }
}

/// An HTTP health probe: `GET http://<address><path>`, healthy when the
/// status is the expected one (and the body contains a given text, if set)
/// within the per-try timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    path: String,
    status: u16,
    timeout: Duration,
    body_contains: Option<String>,
}

impl Default for HttpProbe {
    /// `GET /health`, expecting 200, 2 s per try.
    fn default() -> Self {
        Self {
            path: "/health".into(),
            status: 200,
            timeout: Duration::from_secs(2),
            body_contains: None,
        }
    }
}

impl HttpProbe {
    /// Probes `path` (must start with `/`; printable ASCII without spaces).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `health path` otherwise.
    pub fn new(path: impl Into<String>) -> Result<Self> {
        let path = path.into();
        let ok = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()) && !path.contains('#');
        if !ok {
            return Err(Error::invalid(
                "health path",
                format!("{path:?} is not a URL path; write e.g. /health or /api/status?deep=1"),
            ));
        }
        Ok(Self {
            path,
            ..Self::default()
        })
    }

    /// The status that means healthy (default 200).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `health status` when not in 100–599.
    pub fn expect_status(mut self, status: u16) -> Result<Self> {
        if !(100..=599).contains(&status) {
            return Err(Error::invalid(
                "health status",
                format!("{status} is not an HTTP status; use 100-599, e.g. 200"),
            ));
        }
        self.status = status;
        Ok(self)
    }

    /// How long one try may take (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Also requires the body to contain `text` (e.g. `ok`).
    pub fn body_contains(mut self, text: impl Into<String>) -> Self {
        self.body_contains = Some(text.into());
        self
    }

    /// The path probed.
    pub fn path(&self) -> &str {
        &self.path
    }

    #[cfg(feature = "http")]
    pub(crate) async fn probe(
        &self,
        client: &reqwest::Client,
        address: &crate::names::Address,
    ) -> Result<crate::traits::Health, crate::error::DriverError> {
        use crate::error::DriverError;
        use crate::traits::Health;
        let url = format!("http://{address}{}", self.path);
        let resp = match client.get(&url).timeout(self.timeout).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() || e.is_connect() => {
                return Ok(Health::Unhealthy(format!("GET {url}: {}", error_chain(&e))));
            }
            Err(e) => return Err(DriverError::transient(format!("GET {url}")).with_source(e)),
        };
        let status = resp.status().as_u16();
        let body = match tokio::time::timeout(self.timeout, resp.text()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Ok(Health::Unhealthy(format!("GET {url}: reading the body: {e}"))),
            Err(_) => {
                return Ok(Health::Unhealthy(format!(
                    "GET {url}: the body took over {:?}",
                    self.timeout
                )))
            }
        };
        let excerpt: String = body.chars().take(200).collect();
        if status != self.status {
            return Ok(Health::Unhealthy(format!(
                "GET {url}: status {status}, expected {}; body: {excerpt}",
                self.status
            )));
        }
        if let Some(text) = &self.body_contains {
            if !body.contains(text.as_str()) {
                return Ok(Health::Unhealthy(format!(
                    "GET {url}: body does not contain {text:?}: {excerpt}"
                )));
            }
        }
        Ok(Health::Healthy)
    }
}

#[cfg(feature = "http")]
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_probe_settings_are_refused() {
        for bad in ["health", "/a b", "/a\n", ""] {
            let e = HttpProbe::new(bad).unwrap_err().to_string();
            assert!(e.contains("health path"), "{bad:?}: {e}");
        }
        let e = HttpProbe::default().expect_status(42).unwrap_err().to_string();
        assert!(e.contains("health status"), "{e}");
        assert_eq!(
            HttpProbe::new("/api/status?x=1").unwrap().path(),
            "/api/status?x=1"
        );
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn http_probe_checks_status_and_body() {
        use crate::traits::Health;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = crate::names::Address::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let (status, body) = if req.starts_with("GET /health ") {
                    ("200 OK", "ok")
                } else {
                    ("503 Service Unavailable", "down")
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let client = reqwest::Client::new();
        assert_eq!(
            HttpProbe::default().probe(&client, &addr).await.unwrap(),
            Health::Healthy
        );
        let h = HttpProbe::new("/other")
            .unwrap()
            .probe(&client, &addr)
            .await
            .unwrap();
        assert!(
            matches!(&h, Health::Unhealthy(m) if m.contains("503") && m.contains("down")),
            "{h:?}"
        );
        let h = HttpProbe::default()
            .body_contains("fine")
            .probe(&client, &addr)
            .await
            .unwrap();
        assert!(matches!(&h, Health::Unhealthy(m) if m.contains("fine")), "{h:?}");
        // Nothing listening: unhealthy, not an error.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            crate::names::Address::parse(&l.local_addr().unwrap().to_string()).unwrap()
        };
        let h = HttpProbe::default().probe(&client, &closed).await.unwrap();
        assert!(!h.is_healthy());
    }
}
