//! Minimal HTTP/1.0 and RESP clients over raw TCP (optionally TLS), so readiness and leader
//! queries do not depend on the drivers under test.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::process::REQUEST_TIMEOUT;
use super::tls::TlsFiles;

/// A response from [`http_get`] / [`http_post_json`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("status {}, body is not JSON: {:?}", self.status, self.body))
    }

    /// `Err` unless the status is 2xx.
    pub fn ok(self) -> Result<Self> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            bail!("HTTP {}: {}", self.status, self.body.trim())
        }
    }
}

/// `GET path` on a loopback HTTP server. Fails after 30 s, since a paused server never
/// answers; callers that poll wrap it in a shorter timeout of their own.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    http_request(addr, "GET", path, None).await
}

/// `POST path` with a JSON body (e.g. the etcd v3 JSON gateway).
pub async fn http_post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<HttpResponse> {
    http_request(addr, "POST", path, Some(body.to_string())).await
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        // HTTP/1.0 without keep-alive: the server closes after the response, so reading to
        // EOF frames it and no chunked decoding is needed.
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        if let Some(b) = &body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = &body {
            req.push_str(b);
        }
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path}: no answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} http://{addr}{path}: malformed response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{method} http://{addr}{path}: bad status line in {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_string(),
    })
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RespValue {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (a reply, not a transport failure).
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$n` bulk string; `None` for the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*n`; `None` for the null array.
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// The reply as text (simple or bulk string), or `Err` describing what it was.
    pub fn as_text(&self) -> Result<String> {
        match self {
            RespValue::Simple(s) => Ok(s.clone()),
            RespValue::Bulk(Some(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => bail!("expected a string reply, got {other:?}"),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One RESP connection to a Redis server, plain or TLS. Each command waits for its reply.
pub struct RespConnection {
    stream: BufReader<Pin<Box<dyn Io>>>,
}

impl std::fmt::Debug for RespConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RespConnection")
    }
}

impl RespConnection {
    /// Connects; with `tls`, verifies the server against the harness CA.
    pub async fn connect(addr: SocketAddr, tls: Option<&TlsFiles>) -> Result<Self> {
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let io: Pin<Box<dyn Io>> = match tls {
            None => Box::pin(tcp),
            Some(files) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(files.ca_cert_der())?;
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let handshake =
                    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
                let stream = tokio::time::timeout(REQUEST_TIMEOUT, handshake)
                    .await
                    .map_err(|_| anyhow!("TLS handshake with {addr}: no answer"))?
                    .with_context(|| format!("TLS handshake with {addr}"))?;
                Box::pin(stream)
            }
        };
        Ok(RespConnection {
            stream: BufReader::new(io),
        })
    }

    /// Sends one command and reads its reply. A `-ERR` reply is `Ok(RespValue::Error)`.
    /// Gives up after 30 s (a paused server holds the reply until resumed).
    pub async fn command<S: AsRef<[u8]>>(&mut self, args: &[S]) -> Result<RespValue> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            let a = a.as_ref();
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        let exchange = async {
            self.stream.get_mut().write_all(&buf).await?;
            self.stream.get_mut().flush().await?;
            self.read_value().await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("no reply within {REQUEST_TIMEOUT:?}"))?
    }

    /// Like [`command`](Self::command), but a `-ERR` reply becomes `Err`.
    pub async fn command_ok<S: AsRef<[u8]>>(&mut self, args: &[S]) -> Result<RespValue> {
        match self.command(args).await? {
            RespValue::Error(e) => bail!("redis replied {e}"),
            v => Ok(v),
        }
    }

    fn read_value(
        &mut self,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<RespValue>> + Send + '_>> {
        Box::pin(async move {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed by server");
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let (kind, rest) = line.split_at(line.len().min(1));
            Ok(match kind {
                "+" => RespValue::Simple(rest.to_string()),
                "-" => RespValue::Error(rest.to_string()),
                ":" => RespValue::Integer(rest.parse()?),
                "$" => {
                    let n: i64 = rest.parse()?;
                    if n < 0 {
                        RespValue::Bulk(None)
                    } else {
                        let mut data = vec![0u8; n as usize + 2];
                        self.stream.read_exact(&mut data).await?;
                        data.truncate(n as usize);
                        RespValue::Bulk(Some(data))
                    }
                }
                "*" => {
                    let n: i64 = rest.parse()?;
                    if n < 0 {
                        RespValue::Array(None)
                    } else {
                        let mut items = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            items.push(self.read_value().await?);
                        }
                        RespValue::Array(Some(items))
                    }
                }
                _ => bail!("unexpected RESP line {line:?}"),
            })
        })
    }
}
