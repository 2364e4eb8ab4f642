//! The HTTP side of the admin endpoints (hyper, HTTP/1.1): one listener per
//! group of endpoints, one task per connection on the admin runtime, at
//! most [`CONNECTIONS_PER_LISTENER`] connections at once per listener, one
//! request each (a kubelet makes a connection per probe anyway).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{dump, metrics, Shared, CONNECTIONS_PER_LISTENER};

/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, however it behaves: one that sends its
/// request and never reads the answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Metrics,
    Readiness,
    Admin,
}

pub struct Server {
    pub endpoints: Endpoints,
    pub shared: Arc<Shared>,
    pub registry: Arc<Registry>,
}

impl Server {
    pub async fn serve(self, listener: TcpListener) {
        let server = Arc::new(self);
        // Taken before accepting: at the cap, further connections wait in
        // the listener's backlog, where they hold no descriptor of sluice's.
        let slots = Arc::new(Semaphore::new(CONNECTIONS_PER_LISTENER));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, say: wait and go on rather than
                    // leave the probes unanswered for good.
                    warn!(%error, endpoints = ?server.endpoints, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = server.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.respond(request).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%error, "admin connection ended with an error"),
                    Err(_) => debug!("admin connection closed: it took too long"),
                }
            });
        }
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let allowed = match (self.endpoints, path) {
            (Endpoints::Metrics, "/metrics")
            | (Endpoints::Readiness, "/healthz/ready")
            | (Endpoints::Admin, "/config_dump") => Method::GET,
            (Endpoints::Admin, "/quitquitquit" | "/logging") => Method::POST,
            _ => return text(StatusCode::NOT_FOUND, self.index()),
        };
        if request.method() != allowed {
            return not_allowed(&allowed);
        }
        match path {
            "/metrics" => self.metrics(),
            "/healthz/ready" => match self.shared.readiness().await {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/config_dump" => {
                let dump = dump::config_dump(&self.shared).await;
                match serde_json::to_string_pretty(&dump) {
                    Ok(json) => respond(StatusCode::OK, "application/json", json + "\n"),
                    Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                }
            }
            "/quitquitquit" => quit(),
            "/logging" => self.logging(request.uri().query().unwrap_or("")),
            _ => text(StatusCode::NOT_FOUND, self.index()),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        match metrics::encode(&self.registry) {
            Ok(body) => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n".into(),
            ),
        }
    }

    fn logging(&self, query: &str) -> Response<Full<Bytes>> {
        let Some(control) = &self.shared.log else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "this sluice cannot change its log level\n".into(),
            );
        };
        let level = form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "level")
            .map(|(_, value)| value.into_owned());
        let Some(level) = level else {
            return text(
                StatusCode::BAD_REQUEST,
                "give the level: POST /logging?level=debug (or a RUST_LOG-style filter)\n".into(),
            );
        };
        match control(&level) {
            Ok(now) => {
                info!(filter = %now, "log filter changed through the admin endpoint");
                text(StatusCode::OK, format!("log filter: {now}\n"))
            }
            Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        }
    }

    fn index(&self) -> String {
        let endpoints = match self.endpoints {
            Endpoints::Metrics => "GET /metrics\n",
            Endpoints::Readiness => "GET /healthz/ready\n",
            Endpoints::Admin => "GET /config_dump\nPOST /quitquitquit\nPOST /logging?level=LEVEL\n",
        };
        format!("not found; this port serves:\n{endpoints}")
    }
}

/// Starts the drain exactly as SIGTERM does: the control thread waits for
/// that signal (every thread has it blocked).
fn quit() -> Response<Full<Bytes>> {
    info!("POST /quitquitquit: draining");
    match nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM) {
        Ok(()) => text(StatusCode::OK, "draining\n".into()),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot signal sluice: {error}\n"),
        ),
    }
}

fn not_allowed(allowed: &Method) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("use {allowed} here\n"),
    );
    if let Ok(allow) = HeaderValue::from_str(allowed.as_str()) {
        response.headers_mut().insert(hyper::header::ALLOW, allow);
    }
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
