//! The HTTP side of the admin endpoints (hyper, HTTP/1.1): one listener per
//! group of endpoints, one task per connection on the admin runtime.

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
use tracing::{debug, info, warn};

use super::{dump, metrics, Shared};

/// A client that sends no complete request head within this is dropped, so
/// idle connections cannot pile up on the admin thread.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
        loop {
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
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.respond(request)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(error) = served {
                    debug!(%error, "admin connection ended with an error");
                }
            });
        }
    }

    fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let method = request.method();
        match (self.endpoints, path) {
            (Endpoints::Metrics, "/metrics") => only(method, &Method::GET, || self.metrics()),
            (Endpoints::Readiness, "/healthz/ready") => {
                only(method, &Method::GET, || match self.shared.readiness() {
                    Ok(()) => text(StatusCode::OK, "ready\n".into()),
                    Err(why) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                })
            }
            (Endpoints::Admin, "/config_dump") => only(method, &Method::GET, || {
                let dump = dump::config_dump(&self.shared);
                match serde_json::to_string_pretty(&dump) {
                    Ok(json) => respond(StatusCode::OK, "application/json", json + "\n"),
                    Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                }
            }),
            (Endpoints::Admin, "/quitquitquit") => only(method, &Method::POST, quit),
            (Endpoints::Admin, "/logging") => only(method, &Method::POST, || {
                self.logging(request.uri().query().unwrap_or(""))
            }),
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

fn only(
    method: &Method,
    allowed: &Method,
    respond: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method == allowed {
        return respond();
    }
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
