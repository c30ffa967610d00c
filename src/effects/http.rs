//! The HTTP/1.1 client of a shard's thread: hyper's connection API over glommio's TCP, with
//! a keep-alive pool per upstream (host and port). Effect calls and Gateway commands run on
//! the shard that owns them, so HTTP work scales with the shards and never touches the NATS
//! bridge's thread. Owned by one shard's thread (`Rc`, nothing here is `Send`).
//!
//! Connections are opened when no idle one is ready and kept (up to `max_idle` per
//! upstream, the calls a shard may have in flight) after their response was read in full.
//! At most `max_connecting` connection attempts per upstream run at once: a burst of calls
//! opens connections a few at a time and the rest wait for one to come back or for a free
//! attempt, instead of flooding the upstream's accept queue (a SYN dropped there costs the
//! caller a 1 s retransmit; measured in bench/README.md, issue 16).
//! Host names are resolved off the shard's thread and cached; IP literals are not resolved.

use ahash::AHashMap;
use bytes::Bytes;
use futures::channel::oneshot;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Why a request got no answer. Every variant is worth a retry except `BadUrl` and
/// `Unsupported`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad url {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("url {url:?}: scheme {scheme:?} is not supported (http only)")]
    Unsupported { url: String, scheme: String },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {ms} ms")]
    TimedOut { ms: u128 },
    #[error("connection to {upstream} failed: {source}")]
    Transport {
        upstream: String,
        #[source]
        source: hyper::Error,
    },
}

impl HttpError {
    /// Whether the request may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, HttpError::BadUrl { .. } | HttpError::Unsupported { .. })
    }
}

/// A response read in full.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// A keep-alive HTTP/1.1 client for one shard's thread. Cheap to clone (shared pool).
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    upstreams: RefCell<AHashMap<String, Upstream>>,
    addrs: RefCell<AHashMap<String, SocketAddr>>,
    max_idle: usize,
    max_connecting: usize,
    connect_timeout: Duration,
    connections: Cell<u64>,
    connecting_peak: Cell<usize>,
}

/// One upstream's pool.
#[derive(Default)]
struct Upstream {
    idle: Vec<SendRequest<Full<Bytes>>>,
    /// Connection attempts running now.
    connecting: usize,
    /// Calls waiting for a connection to come back or an attempt to end.
    waiters: VecDeque<oneshot::Sender<()>>,
}

impl Upstream {
    /// Tells the longest-waiting call that is still there to look again.
    fn wake_one(&mut self) {
        while let Some(w) = self.waiters.pop_front() {
            if w.send(()).is_ok() {
                return;
            }
        }
    }
}

/// Connection attempts per upstream at once, by default.
pub const MAX_CONNECTING: usize = 16;

impl Client {
    /// `max_idle`: idle connections kept per upstream (size it to the calls in flight).
    pub fn new(max_idle: usize, connect_timeout: Duration) -> Self {
        Self::with_limits(max_idle, MAX_CONNECTING, connect_timeout)
    }

    /// As [`Client::new`], with at most `max_connecting` connection attempts per upstream
    /// at once.
    pub fn with_limits(max_idle: usize, max_connecting: usize, connect_timeout: Duration) -> Self {
        Self {
            inner: Rc::new(Inner {
                upstreams: RefCell::new(AHashMap::new()),
                addrs: RefCell::new(AHashMap::new()),
                max_idle: max_idle.max(1),
                max_connecting: max_connecting.max(1),
                connect_timeout,
                connections: Cell::new(0),
                connecting_peak: Cell::new(0),
            }),
        }
    }

    /// Connections opened so far (a pool that works opens few).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections.get()
    }

    /// The most connection attempts that ran at once to one upstream.
    pub fn connecting_peak(&self) -> usize {
        self.inner.connecting_peak.get()
    }

    /// Sends `req` (an absolute `http://` URL) and reads the whole answer, all within
    /// `timeout`.
    pub async fn request(&self, req: hyper::Request<Full<Bytes>>, timeout: Duration) -> Result<Response, HttpError> {
        let ms = timeout.as_millis();
        let call = self.request_untimed(req);
        let limit = async {
            glommio::timer::sleep(timeout).await;
            Err(HttpError::TimedOut { ms })
        };
        futures_lite::future::or(call, limit).await
    }

    async fn request_untimed(&self, req: hyper::Request<Full<Bytes>>) -> Result<Response, HttpError> {
        let (mut parts, body) = req.into_parts();
        let url = parts.uri.to_string();
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        if scheme != "http" {
            return Err(HttpError::Unsupported { url, scheme: scheme.to_owned() });
        }
        let Some(host) = parts.uri.host().map(str::to_owned) else {
            return Err(HttpError::BadUrl { url, why: "no host".into() });
        };
        let port = parts.uri.port_u16().unwrap_or(80);
        let upstream = format!("{host}:{port}");
        // A connection takes requests in origin form, with a Host header.
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
        parts.uri = path
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| HttpError::BadUrl { url: url.clone(), why: e.to_string() })?;
        if !parts.headers.contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(&upstream)
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        let mut sender = self.sender(&host, port, &upstream).await?;
        // A call that fails or is dropped (its timeout) gives no connection back: it still
        // wakes a waiting call, which may then open one.
        let lease = Lease { client: self, upstream: &upstream };
        let transport = |source| HttpError::Transport { upstream: upstream.clone(), source };
        let resp = sender.send_request(hyper::Request::from_parts(parts, body)).await.map_err(transport)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(transport)?.to_bytes();
        std::mem::forget(lease);
        self.give_back(&upstream, sender);
        Ok(Response { status, body })
    }

    /// An idle connection to the upstream that is ready, or a new one (within the limit of
    /// attempts at once; over it, the call waits for a connection to come back).
    async fn sender(&self, host: &str, port: u16, upstream: &str) -> Result<SendRequest<Full<Bytes>>, HttpError> {
        loop {
            loop {
                let idle = self.inner.upstreams.borrow_mut().get_mut(upstream).and_then(|u| u.idle.pop());
                let Some(mut s) = idle else { break };
                if s.is_closed() {
                    continue;
                }
                // A kept connection may have been closed by the server meanwhile.
                if s.ready().await.is_ok() {
                    return Ok(s);
                }
            }
            let waiting = {
                let mut ups = self.inner.upstreams.borrow_mut();
                let u = ups.entry(upstream.to_owned()).or_default();
                if u.connecting < self.inner.max_connecting {
                    u.connecting += 1;
                    self.inner.connecting_peak.set(self.inner.connecting_peak.get().max(u.connecting));
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    u.waiters.push_back(tx);
                    Some(rx)
                }
            };
            match waiting {
                // Woken by a connection given back or an attempt that ended: look again.
                Some(rx) => {
                    let _ = rx.await;
                }
                None => {
                    // Ends the attempt however it ends, the call's timeout included.
                    let _attempt = Attempt { client: self, upstream };
                    return self.connect(host, port, upstream).await;
                }
            }
        }
    }

    async fn connect(&self, host: &str, port: u16, upstream: &str) -> Result<SendRequest<Full<Bytes>>, HttpError> {
        let addr = self.resolve(host, port).await?;
        let connect = |source| HttpError::Connect { addr, source };
        let stream = glommio::net::TcpStream::connect_timeout(addr, self.inner.connect_timeout)
            .await
            .map_err(|e| connect(io::Error::other(e.to_string())))?;
        stream.set_nodelay(true).map_err(|e| connect(io::Error::other(e.to_string())))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(Io(stream))
            .await
            .map_err(|source| HttpError::Transport { upstream: upstream.to_owned(), source })?;
        self.inner.connections.set(self.inner.connections.get() + 1);
        glommio::spawn_local(async move {
            // Ends when the connection closes (by either side or when every sender is gone).
            let _ = conn.await;
        })
        .detach();
        sender.ready().await.map_err(|source| HttpError::Transport { upstream: upstream.to_owned(), source })?;
        Ok(sender)
    }

    fn give_back(&self, upstream: &str, sender: SendRequest<Full<Bytes>>) {
        let mut ups = self.inner.upstreams.borrow_mut();
        let u = ups.entry(upstream.to_owned()).or_default();
        if !sender.is_closed() && u.idle.len() < self.inner.max_idle {
            u.idle.push(sender);
        }
        u.wake_one();
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, HttpError> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = format!("{host}:{port}");
        if let Some(a) = self.inner.addrs.borrow().get(&key) {
            return Ok(*a);
        }
        // Resolution blocks: it runs on glommio's blocking thread, not the shard's.
        let name = key.clone();
        let found = glommio::executor().spawn_blocking(move || name.to_socket_addrs().map(|mut a| a.next())).await;
        let addr = match found {
            Ok(Some(a)) => a,
            Ok(None) => {
                return Err(HttpError::Resolve { host: host.to_owned(), source: io::Error::other("no addresses") });
            }
            Err(source) => return Err(HttpError::Resolve { host: host.to_owned(), source }),
        };
        self.inner.addrs.borrow_mut().insert(key, addr);
        Ok(addr)
    }
}

/// A connection attempt in progress: ending it (done, failed or dropped with its call)
/// frees its place and wakes a waiting call.
struct Attempt<'a> {
    client: &'a Client,
    upstream: &'a str,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.client.inner.upstreams.borrow_mut().get_mut(self.upstream) {
            u.connecting = u.connecting.saturating_sub(1);
            u.wake_one();
        }
    }
}

/// A connection in use by a call; dropped without being given back (the call failed or was
/// cancelled), it wakes a waiting call.
struct Lease<'a> {
    client: &'a Client,
    upstream: &'a str,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.client.inner.upstreams.borrow_mut().get_mut(self.upstream) {
            u.wake_one();
        }
    }
}

/// glommio's TCP stream as hyper's I/O.
struct Io(glommio::net::TcpStream);

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        use futures_lite::AsyncRead;
        // Read into an initialised scratch buffer and copy: no unsafe code for the sake of
        // one small copy per read.
        let mut scratch = [0u8; 16 * 1024];
        let want = buf.remaining().min(scratch.len());
        match Pin::new(&mut self.0).poll_read(cx, &mut scratch[..want]) {
            Poll::Ready(Ok(n)) => {
                buf.put_slice(&scratch[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        use futures_lite::AsyncWrite;
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use futures_lite::AsyncWrite;
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use futures_lite::AsyncWrite;
        Pin::new(&mut self.0).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A tokio HTTP server on its own thread that answers with the request's path and
    /// counts connections.
    fn server() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicU64::new(0));
        let counted = conns.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                            let path = req.uri().path().to_owned();
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            if path.starts_with("/fail") {
                                // No answer: the connection breaks under the call.
                                return Err(std::io::Error::other("dropped"));
                            }
                            let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let text = format!("{path} {host} {}", String::from_utf8_lossy(&body));
                            Ok::<_, std::io::Error>(hyper::Response::new(Full::new(Bytes::from(text))))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        (addr, conns)
    }

    fn post(url: &str, body: &str) -> hyper::Request<Full<Bytes>> {
        hyper::Request::post(url).body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    }

    #[test]
    fn requests_reuse_pooled_connections_and_time_out() {
        let (addr, conns) = server();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        ex.run(async move {
            let client = Client::new(8, Duration::from_secs(2));
            for i in 0..20 {
                let r = client
                    .request(post(&format!("http://{addr}/p/{i}?x=1"), "hello"), Duration::from_secs(5))
                    .await
                    .unwrap();
                assert_eq!(r.status, 200);
                assert_eq!(r.body, Bytes::from(format!("/p/{i} {addr} hello")));
            }
            assert_eq!(client.connections_opened(), 1, "sequential requests did not reuse the connection");
            // Concurrent requests open at most as many connections as run at once.
            let calls: Vec<_> = (0..6)
                .map(|i| {
                    let c = client.clone();
                    glommio::spawn_local(async move {
                        c.request(post(&format!("http://{addr}/c/{i}"), ""), Duration::from_secs(5)).await.unwrap()
                    })
                })
                .collect();
            for c in calls {
                assert_eq!(c.await.status, 200);
            }
            assert!(client.connections_opened() <= 7);
            let opened = client.connections_opened();
            let e = client.request(post(&format!("http://{addr}/slow"), ""), Duration::from_millis(100)).await;
            assert!(matches!(e, Err(HttpError::TimedOut { ms: 100 })), "{e:?}");
            let e = client.request(post("https://example.invalid/x", ""), Duration::from_secs(1)).await;
            assert!(matches!(e, Err(HttpError::Unsupported { .. })), "{e:?}");
            // The pool still serves after a timed-out call.
            let r = client.request(post(&format!("http://{addr}/after"), ""), Duration::from_secs(5)).await.unwrap();
            assert_eq!(r.status, 200);
            assert!(client.connections_opened() <= opened + 1);
        });
        assert!(conns.load(Ordering::SeqCst) <= 9);
    }

    #[test]
    fn a_burst_opens_connections_a_few_at_a_time_and_every_call_is_served() {
        let (addr, conns) = server();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().unwrap();
        ex.run(async move {
            let client = Client::with_limits(64, 3, Duration::from_secs(2));
            // 48 calls at once, a third of them broken by the server: the rest still get a
            // connection (a failed call wakes a waiter like a returned connection does).
            let calls: Vec<_> = (0..48)
                .map(|i| {
                    let c = client.clone();
                    let path = if i % 3 == 0 { format!("/fail/{i}") } else { format!("/ok/{i}") };
                    glommio::spawn_local(async move {
                        (i, c.request(post(&format!("http://{addr}{path}"), ""), Duration::from_secs(10)).await)
                    })
                })
                .collect();
            for c in calls {
                let (i, r) = c.await;
                if i % 3 == 0 {
                    assert!(matches!(r, Err(HttpError::Transport { .. })), "call {i}: {r:?}");
                } else {
                    let r = r.unwrap_or_else(|e| panic!("call {i}: {e}"));
                    assert_eq!(r.body, Bytes::from(format!("/ok/{i} {addr} ")));
                }
            }
            assert!(client.connecting_peak() <= 3, "{} connection attempts at once", client.connecting_peak());
            assert!(client.connecting_peak() >= 2, "the burst never connected in parallel");
            assert!(client.connections_opened() <= 48);
            // A timed-out call frees its place too: the pool still serves.
            let e = client.request(post(&format!("http://{addr}/slow"), ""), Duration::from_millis(50)).await;
            assert!(matches!(e, Err(HttpError::TimedOut { .. })), "{e:?}");
            let r = client.request(post(&format!("http://{addr}/after"), ""), Duration::from_secs(5)).await.unwrap();
            assert_eq!(r.status, 200);
        });
        assert!(conns.load(Ordering::SeqCst) <= 50);
    }
}
