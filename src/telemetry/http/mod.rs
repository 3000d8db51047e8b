//! The HTTP endpoints: `/metrics`, `/status`, `/health`, `POST /shutdown` and `/streams/*`.
//!
//! A small HTTP/1.1 server on the standard library, bounded in every dimension so that no
//! request can hurt the bridge: one acceptor thread, [`WORKERS`] worker threads fed through a
//! queue of [`QUEUE`] connections (when it is full, new connections get a 503 at once), one
//! request per connection, limits on head and body size (see [`request`]), a deadline for
//! reading the request and a timeout for writing the answer. Nothing here panics on input;
//! a bad request gets a 4xx answer and the pipeline threads never notice.
//!
//! A general-purpose HTTP crate was not used because the bridge needs these guarantees more
//! than features: tiny_http 0.12, for one, allocates a request's whole announced
//! `Content-Length` in one piece when an unread body is dropped, so a single request with a
//! huge `Content-Length` aborts the process; it also reads header lines without a limit and
//! starts a thread per connection.

pub mod auth;
pub mod request;
pub mod response;
pub mod router;
pub mod streams;

use std::io::Read;
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

pub use router::HttpContext;

use response::Response;

/// Threads answering requests.
pub const WORKERS: usize = 4;
/// Accepted connections waiting for a worker; beyond this they get a 503.
pub const QUEUE: usize = 32;
/// Longest wait for one read from a client.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time a client may take to send its whole request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for one write to a client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering, unread input is drained for up to this long (and [`LINGER_BYTES`]) so the
/// client reads the answer instead of a connection reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;
/// How often the acceptor checks for shutdown while no connection comes.
const ACCEPT_POLL_MS: i32 = 200;

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address is in use, not local, or not allowed.
    #[error(
        "cannot listen on {addr} for HTTP (/metrics, /status, /health): {source}; choose another \
         address or port with --http-bind / BRIDGE_HTTP_BIND and --port / BRIDGE_PORT"
    )]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the HTTP threads: {0}")]
    Thread(std::io::Error),
}

impl HttpError {
    /// True when the operator must change the configuration (exit code 2).
    pub fn is_configuration(&self) -> bool {
        matches!(self, HttpError::Bind { .. })
    }
}

/// The running server; stops (and frees the port) when stopped or dropped.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Shutdown,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` and starts the acceptor and the workers.
    pub fn start(addr: SocketAddr, ctx: HttpContext) -> Result<Self, HttpError> {
        let bind_err = |source| HttpError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let ctx = Arc::new(ctx);
        let (tx, rx) = sync_channel::<TcpStream>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = Arc::clone(&rx);
            let ctx = Arc::clone(&ctx);
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || worker(&rx, &ctx))
                .map_err(HttpError::Thread)?;
        }
        let stop = Shutdown::new();
        let acceptor_stop = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                accept_loop(&listener, &tx, &acceptor_stop);
                // Dropping the sender ends the workers once they finish their connection.
                drop(tx);
            })
            .map_err(HttpError::Thread)?;
        log::info!(
            "HTTP endpoints on http://{local} (/metrics /status /health /shutdown /streams/*)"
        );
        Ok(HttpServer {
            addr: local,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and frees the port (within [`ACCEPT_POLL_MS`]); requests being answered
    /// finish on their own.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.trigger();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Waits until `listener` has a connection or `timeout_ms` passed.
fn wait_readable(listener: &TcpListener, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; the fd stays open meanwhile.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

fn accept_loop(
    listener: &TcpListener,
    tx: &std::sync::mpsc::SyncSender<TcpStream>,
    stop: &Shutdown,
) {
    let mut last_error_log: Option<Instant> = None;
    while !stop.is_triggered() {
        wait_readable(listener, ACCEPT_POLL_MS);
        loop {
            match listener.accept() {
                Ok((stream, _)) => match tx.try_send(stream) {
                    Ok(()) => {}
                    Err(TrySendError::Full(stream)) => refuse_busy(stream),
                    Err(TrySendError::Disconnected(_)) => return,
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors: keep serving once it passes.
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        log::warn!("HTTP accept failed: {e}; still listening");
                        last_error_log = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// Every worker is busy and the queue is full: a quick 503 instead of waiting.
fn refuse_busy(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = Response::error(503, "too many concurrent requests; try again")
        .with_header("Retry-After", "1")
        .write_to(&mut stream);
}

fn worker(rx: &Mutex<Receiver<TcpStream>>, ctx: &HttpContext) {
    loop {
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(stream) = next else { return };
        serve(stream, ctx);
    }
}

/// Reads one request, answers it, closes the connection.
fn serve(mut stream: TcpStream, ctx: &HttpContext) {
    let peer = stream.peer_addr().ok();
    // Accepted sockets must block (with timeouts), whatever the listener is.
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(READ_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let response = match request::read_request(&mut stream, deadline) {
        Ok(req) => router::handle(&req, ctx, peer),
        Err(e) => match e.status() {
            Some(status) => {
                log::debug!(
                    "bad HTTP request from {}: {e}",
                    peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                );
                Response::error(status, e.to_string())
            }
            None => return,
        },
    };
    if response.write_to(&mut stream).is_ok() {
        linger_close(stream);
    }
}

/// Half-closes, then drains what the client still sends (bounded), so that closing with
/// unread input does not reset the connection before the client read the answer.
fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown(NetShutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let until = Instant::now() + LINGER;
    let mut buf = [0u8; 8192];
    let mut drained = 0;
    while drained < LINGER_BYTES && Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}
