//! The HTTP server: a small HTTP/1.1 server on the standard library, bounded in every
//! dimension so that no request can hurt the bridge (see the module documentation of
//! [`crate::control`]).

use std::io::{Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

use super::request;
use super::response::Response;
use super::router::{self, HttpContext};

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
/// How long an accepted connection may stay silent before it gets a 408.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most accepted connections waiting for their first byte; more get a 503 at once.
pub const MAX_PENDING: usize = 128;

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
    /// Written to on stop: the acceptor blocks in `poll` on it with the listener, so it
    /// wakes at once instead of checking the signal at intervals.
    wake: UnixStream,
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
        let (wake, woken) = UnixStream::pair().map_err(HttpError::Thread)?;
        let acceptor = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                accept_loop(&listener, &woken, &tx, &acceptor_stop);
                // Dropping the sender ends the workers once they finish their connection.
                drop(tx);
            })
            .map_err(HttpError::Thread)?;
        log::info!(
            "HTTP endpoints on http://{local} (/metrics /status /health /shutdown /streams/* /snapshots/*)"
        );
        Ok(HttpServer {
            addr: local,
            stop,
            wake,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and frees the port; requests being answered finish on their own.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.trigger();
        if let Some(h) = self.acceptor.take() {
            let _ = (&self.wake).write(&[1]);
            let _ = h.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A connection accepted but not yet sending.
struct Pending {
    stream: TcpStream,
    since: Instant,
}

/// Accepts connections and hands each to a worker once it has sent something, so that
/// connections that stay silent (port scans, stalled clients) never occupy a worker: they get
/// a 408 after [`FIRST_BYTE_TIMEOUT`]. At most [`MAX_PENDING`] wait; more get a 503.
fn accept_loop(
    listener: &TcpListener,
    woken: &UnixStream,
    tx: &std::sync::mpsc::SyncSender<TcpStream>,
    stop: &Shutdown,
) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut last_error_log: Option<Instant> = None;
    while !stop.is_triggered() {
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.push(libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(pending.iter().map(|p| libc::pollfd {
            fd: p.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: `fds` holds `fds.len()` valid pollfds for the duration of the call, and
        // every fd in it stays open meanwhile (owned by `listener` and `pending`).
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                poll_timeout(&pending),
            )
        };

        // Connections with input (or closed by the peer) go to the workers.
        let mut i = pending.len();
        while i > 0 {
            i -= 1;
            let ready = fds.get(i + 2).is_some_and(|f| f.revents != 0);
            if ready {
                let p = pending.swap_remove(i);
                match tx.try_send(p.stream) {
                    Ok(()) => {}
                    Err(TrySendError::Full(stream)) => refuse(stream, &busy()),
                    Err(TrySendError::Disconnected(_)) => return,
                }
            } else if pending[i].since.elapsed() >= FIRST_BYTE_TIMEOUT {
                let p = pending.swap_remove(i);
                refuse(
                    p.stream,
                    &Response::error(408, "no request received in time"),
                );
            }
        }

        if fds[0].revents == 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) if pending.len() < MAX_PENDING => pending.push(Pending {
                    stream,
                    since: Instant::now(),
                }),
                Ok((stream, _)) => refuse(stream, &busy()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors: keep serving once it passes.
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        log::warn!("HTTP accept failed: {e}; still listening");
                        last_error_log = Some(Instant::now());
                    }
                    if stop.wait_timeout(Duration::from_millis(100)) {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// How long `poll` may block: until the oldest silent connection is due for its 408, or
/// (none waiting) until a connection or the stop arrives.
fn poll_timeout(pending: &[Pending]) -> libc::c_int {
    match pending.iter().map(|p| p.since).min() {
        None => -1,
        Some(oldest) => {
            let left = FIRST_BYTE_TIMEOUT.saturating_sub(oldest.elapsed());
            // Rounded up, so the connection is due when poll returns.
            left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int
        }
    }
}

fn busy() -> Response {
    Response::error(503, "too many concurrent requests; try again").with_header("Retry-After", "1")
}

/// Answers without reading the request (busy, or silent too long) and closes.
fn refuse(mut stream: TcpStream, response: &Response) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = response.write_to(&mut stream);
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
