//! The management endpoint: GET (and HEAD) only, no forms, no write
//! endpoints. One thread answers requests one after the other (a
//! scrape every few seconds is the load it is built for); the answer is
//! rendered by the side's handler from counters it already keeps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// A rendered answer.
pub struct Page {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Renders the answer for a path, or None for 404.
pub type Handler = Box<dyn Fn(&str) -> Option<Page> + Send + 'static>;

/// The running endpoint; dropping it stops the thread.
pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
}

/// Content type of Prometheus' OpenMetrics text, as prometheus-client writes it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Endpoint {
    /// Binds `listen` (`setting` names the configuration key in errors) and
    /// serves `handler` on the thread `weir-http`.
    pub fn serve(listen: SocketAddr, setting: &str, handler: Handler) -> Result<Endpoint> {
        let server = tiny_http::Server::http(listen).map_err(|e| {
            anyhow::anyhow!(
                "{setting}: cannot listen on {listen}: {e} (another process on that port? choose a free management port)"
            )
        })?;
        let local = server
            .server_addr()
            .to_ip()
            .context("the management endpoint has no IP address")?;
        let server = Arc::new(server);
        let thread = {
            let server = server.clone();
            std::thread::Builder::new()
                .name("weir-http".into())
                .spawn(move || {
                    for request in server.incoming_requests() {
                        answer(request, &handler);
                    }
                })
                .context("starting the management endpoint thread")?
        };
        Ok(Endpoint {
            server,
            thread: Some(thread),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

fn answer(request: tiny_http::Request, handler: &Handler) {
    use tiny_http::{Header, Method, Response};
    let method = request.method().clone();
    if !matches!(method, Method::Get | Method::Head) {
        let allow = Header::from_bytes("Allow", "GET, HEAD").expect("static header");
        let _ = request.respond(
            Response::from_string("read-only: only GET and HEAD\n")
                .with_status_code(405)
                .with_header(allow),
        );
        return;
    }
    let path = request.url().split('?').next().unwrap_or("/").to_string();
    match handler(&path) {
        Some(page) => {
            let header =
                Header::from_bytes("Content-Type", page.content_type).expect("static header");
            let mut response = Response::from_data(page.body).with_header(header);
            if page.content_type.starts_with("text/html") {
                // The page loads nothing and runs nothing: inline CSS and
                // inline SVG only, so a hostile string that escaped the
                // escaping still could not fetch or execute anything.
                for (k, v) in [
                    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; frame-ancestors 'none'"),
                    ("X-Content-Type-Options", "nosniff"),
                    ("Cache-Control", "no-store"),
                ] {
                    response = response.with_header(Header::from_bytes(k, v).expect("static header"));
                }
            }
            let _ = request.respond(response);
        }
        None => {
            let _ = request.respond(Response::from_string("not found\n").with_status_code(404));
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
