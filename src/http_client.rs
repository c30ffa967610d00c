//! The outgoing HTTP client: one keep-alive HTTP/1 pool type shared by Gateway dispatch,
//! the `http` effect provider and the inspection commands.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1 client.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// One request of a command-line tool to a runner's operations API, on a current-thread
/// runtime of its own: the status and the JSON body (a body that is not JSON is an error
/// naming the URL). `token` goes in as a bearer token; `body`, when given, as JSON.
pub fn call_json(
    method: hyper::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut req = hyper::Request::builder().method(method).uri(url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let resp = http_client()
            .request(req.body(Full::new(payload))?)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = serde_json::from_slice(&bytes).map_err(|e| {
            let text: String = String::from_utf8_lossy(&bytes).chars().take(500).collect();
            anyhow::anyhow!("{url} answered {status} with a body that is not JSON ({e}): {text}")
        })?;
        Ok((status, v))
    })
}
