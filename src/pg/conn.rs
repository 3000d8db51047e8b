//! A small safe wrapper over libpq (`pq-sys`, built from source and linked statically).
//!
//! It covers what the bridge needs and no more: connecting (normal or `replication=database`),
//! simple queries, parameterised queries on normal connections, `COPY ... TO STDOUT`, and the
//! CopyBoth sub-protocol of `START_REPLICATION`. Every server error keeps its SQLSTATE so callers
//! can match on the kind of failure rather than on message text.

use std::ffi::{CStr, CString};
use std::ops::{ControlFlow, Deref};
use std::os::fd::RawFd;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pq_sys as pq;

use super::value::{CLIENT_ENCODING, SESSION_OPTIONS};

/// SQLSTATE codes the bridge reacts to.
pub mod sqlstate {
    /// `object_in_use`: e.g. a replication slot active for another PID.
    pub const OBJECT_IN_USE: &str = "55006";
    /// `duplicate_object`: e.g. the replication slot already exists.
    pub const DUPLICATE_OBJECT: &str = "42710";
    /// `undefined_object`: e.g. a missing publication or slot.
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// `insufficient_privilege`.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
}

/// An error reported by the server, with its diagnostic fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    /// Five-character SQLSTATE, e.g. `55006`.
    pub sqlstate: String,
    /// Severity as sent (`ERROR`, `FATAL`, ...).
    pub severity: String,
    /// The primary message.
    pub message: String,
    /// Optional DETAIL line.
    pub detail: Option<String>,
    /// Optional HINT line.
    pub hint: Option<String>,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.sqlstate, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Errors of the PostgreSQL connection layer.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection could not be established (network, authentication, database missing).
    #[error("could not connect to PostgreSQL: {0}")]
    Connect(String),
    /// The server answered a command with an error.
    #[error("PostgreSQL error: {0}")]
    Db(DbError),
    /// The connection broke (server gone, network error, protocol violation).
    #[error("connection to PostgreSQL lost: {0}")]
    ConnectionLost(String),
    /// The server answered with a result the command does not produce.
    #[error("unexpected result for {command:?}: {status}")]
    UnexpectedResult {
        /// The command (first 80 characters) that was sent.
        command: String,
        /// libpq's name of the result status.
        status: String,
    },
    /// A string handed to libpq contained a NUL byte.
    #[error("invalid argument for PostgreSQL: {0} contains a NUL byte")]
    Nul(&'static str),
    /// Waiting on the connection's socket failed.
    #[error("waiting for PostgreSQL: {0}")]
    Io(#[from] std::io::Error),
}

impl PgError {
    /// The SQLSTATE when the server reported one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Db(e) => Some(&e.sqlstate),
            _ => None,
        }
    }

    /// True for failures where reconnecting later may help (as opposed to a refused command).
    pub fn is_connection_problem(&self) -> bool {
        match self {
            PgError::Connect(_) | PgError::ConnectionLost(_) | PgError::Io(_) => true,
            // FATAL errors end the session (e.g. admin shutdown); class 08 is connection exception,
            // class 57 includes shutdown in progress and the admin terminating the backend.
            PgError::Db(e) => {
                e.severity == "FATAL"
                    || e.severity == "PANIC"
                    || e.sqlstate.starts_with("08")
                    || e.sqlstate.starts_with("57P")
            }
            _ => false,
        }
    }
}

/// Whether a connection is a normal SQL session or a logical walsender session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A normal session (extended query protocol allowed).
    Normal,
    /// `replication=database`: replication commands plus simple-protocol SQL.
    Replication,
}

/// Rows of a query, every value in text form (`None` for SQL NULL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows of text values.
    pub rows: Vec<Vec<Option<String>>>,
    /// Command tag, e.g. `SELECT 3` or `COPY 10`.
    pub command_tag: String,
}

impl QueryResult {
    /// The value at row `row`, column named `column`, when present and not NULL.
    pub fn get(&self, row: usize, column: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == column)?;
        self.rows.get(row)?.get(idx)?.as_deref()
    }
}

/// One CopyData message received from the server, in libpq's buffer (freed on drop).
pub struct CopyBuf {
    ptr: NonNull<c_char>,
    len: usize,
}

// The buffer is owned exclusively and freed with PQfreemem, which is thread-safe.
unsafe impl Send for CopyBuf {}

impl Deref for CopyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: libpq returned `len` initialised bytes at `ptr`, alive until PQfreemem.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const u8, self.len) }
    }
}

impl Drop for CopyBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by PQgetCopyData, freed exactly once.
        unsafe { pq::PQfreemem(self.ptr.as_ptr() as *mut c_void) }
    }
}

impl std::fmt::Debug for CopyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyBuf({} bytes)", self.len)
    }
}

/// What a wait for CopyData produced.
#[derive(Debug)]
pub enum CopyData {
    /// One message.
    Data(CopyBuf),
    /// Nothing arrived within the timeout.
    Timeout,
    /// The server ended the copy (CopyDone) and the command completed.
    Done,
}

/// A connection to PostgreSQL.
pub struct PgConnection {
    raw: NonNull<pq::PGconn>,
    kind: ConnectionKind,
}

// A PGconn may be used from any one thread at a time; &mut self guarantees that.
unsafe impl Send for PgConnection {}

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnection")
            .field("kind", &self.kind)
            .field("server_version", &self.server_version())
            .finish()
    }
}

/// Owned PGresult, cleared on drop.
struct PgResult(NonNull<pq::PGresult>);

impl Drop for PgResult {
    fn drop(&mut self) {
        // SAFETY: result from libpq, cleared exactly once.
        unsafe { pq::PQclear(self.0.as_ptr()) }
    }
}

impl PgResult {
    fn status(&self) -> pq::ExecStatusType {
        // SAFETY: valid result pointer.
        unsafe { pq::PQresultStatus(self.0.as_ptr()) }
    }

    fn field(&self, code: u8) -> Option<String> {
        // SAFETY: valid result; libpq returns NULL or a NUL-terminated string owned by the result.
        let p = unsafe { pq::PQresultErrorField(self.0.as_ptr(), code as c_int) };
        cstr_opt(p)
    }

    fn db_error(&self) -> DbError {
        let message = self.field(pq::PG_DIAG_MESSAGE_PRIMARY).unwrap_or_else(|| {
            // SAFETY: valid result; message owned by the result.
            cstr_opt(unsafe { pq::PQresultErrorMessage(self.0.as_ptr()) })
                .unwrap_or_default()
                .trim()
                .to_string()
        });
        DbError {
            sqlstate: self
                .field(pq::PG_DIAG_SQLSTATE)
                .unwrap_or_else(|| "XX000".into()),
            severity: self
                .field(pq::PG_DIAG_SEVERITY_NONLOCALIZED)
                .or_else(|| self.field(pq::PG_DIAG_SEVERITY))
                .unwrap_or_else(|| "ERROR".into()),
            message,
            detail: self.field(pq::PG_DIAG_MESSAGE_DETAIL),
            hint: self.field(pq::PG_DIAG_MESSAGE_HINT),
        }
    }

    fn to_query_result(&self) -> QueryResult {
        let r = self.0.as_ptr();
        // SAFETY: valid result; indexes within PQntuples/PQnfields; strings owned by the result.
        unsafe {
            let nfields = pq::PQnfields(r).max(0);
            let ntuples = pq::PQntuples(r).max(0);
            let columns = (0..nfields)
                .map(|c| cstr_opt(pq::PQfname(r, c)).unwrap_or_default())
                .collect();
            let rows = (0..ntuples)
                .map(|t| {
                    (0..nfields)
                        .map(|c| {
                            if pq::PQgetisnull(r, t, c) == 1 {
                                None
                            } else {
                                let len = pq::PQgetlength(r, t, c).max(0) as usize;
                                let p = pq::PQgetvalue(r, t, c) as *const u8;
                                let bytes = std::slice::from_raw_parts(p, len);
                                Some(String::from_utf8_lossy(bytes).into_owned())
                            }
                        })
                        .collect()
                })
                .collect();
            let command_tag = cstr_opt(pq::PQcmdStatus(r)).unwrap_or_default();
            QueryResult {
                columns,
                rows,
                command_tag,
            }
        }
    }
}

fn cstr_opt(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: libpq hands out NUL-terminated strings.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

fn status_name(status: pq::ExecStatusType) -> String {
    // SAFETY: PQresStatus returns a static string for any status value.
    cstr_opt(unsafe { pq::PQresStatus(status) }).unwrap_or_else(|| format!("{status:?}"))
}

fn command_excerpt(sql: &str) -> String {
    sql.chars().take(80).collect()
}

/// Routes server notices (WARNING, NOTICE) to the log instead of libpq's default stderr print.
extern "C" fn notice_processor(_arg: *mut c_void, message: *const c_char) {
    if let Some(m) = cstr_opt(message) {
        let m = m.trim_end();
        if m.starts_with("WARNING") {
            log::warn!("postgres: {m}");
        } else {
            log::info!("postgres: {m}");
        }
    }
}

/// Text values for libpq as C strings, kept alive while libpq reads the pointer arrays
/// built from them (`PQconnectdbParams`, `PQexecParams`).
struct CStrings(Vec<CString>);

impl CStrings {
    /// `what` names the values in the error when one holds a NUL byte.
    fn new<S: AsRef<str>>(
        items: impl IntoIterator<Item = S>,
        what: &'static str,
    ) -> Result<Self, PgError> {
        items
            .into_iter()
            .map(|s| CString::new(s.as_ref()).map_err(|_| PgError::Nul(what)))
            .collect::<Result<_, _>>()
            .map(CStrings)
    }

    /// The pointers, valid while `self` lives.
    fn pointers(&self) -> Vec<*const c_char> {
        self.0.iter().map(|c| c.as_ptr()).collect()
    }

    /// The pointers followed by a NULL, as `PQconnectdbParams` takes them.
    fn null_terminated(&self) -> Vec<*const c_char> {
        let mut ptrs = self.pointers();
        ptrs.push(std::ptr::null());
        ptrs
    }
}

impl PgConnection {
    /// Connects with the given libpq keywords (host, port, user, password, dbname, ...).
    ///
    /// The session settings that make text output deterministic (UTF8, ISO dates, UTC,
    /// `extra_float_digits=3`) are always added, and `replication=database` for
    /// [`ConnectionKind::Replication`]. Passwords are passed as parameters, never logged.
    pub fn connect<K: AsRef<str>, V: AsRef<str>>(
        params: &[(K, V)],
        kind: ConnectionKind,
    ) -> Result<Self, PgError> {
        let mut pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            // Ours decide these.
            .filter(|(k, _)| !matches!(*k, "options" | "client_encoding" | "replication"))
            .collect();
        pairs.push(("client_encoding", CLIENT_ENCODING));
        pairs.push(("options", SESSION_OPTIONS));
        if kind == ConnectionKind::Replication {
            pairs.push(("replication", "database"));
        }
        let keys = CStrings::new(pairs.iter().map(|p| p.0), "a connection keyword")?;
        let vals = CStrings::new(pairs.iter().map(|p| p.1), "a connection parameter")?;
        let (kp, vp) = (keys.null_terminated(), vals.null_terminated());

        // SAFETY: both arrays are NULL-terminated and outlive the call; expand_dbname = 0 so a
        // dbname is never parsed as a connection string.
        let raw = unsafe { pq::PQconnectdbParams(kp.as_ptr(), vp.as_ptr(), 0) };
        let raw = NonNull::new(raw)
            .ok_or_else(|| PgError::Connect("libpq could not allocate a connection".into()))?;
        let conn = PgConnection { raw, kind };
        // SAFETY: valid connection pointer.
        let ok = unsafe { pq::PQstatus(conn.raw.as_ptr()) } == pq::ConnStatusType::CONNECTION_OK;
        if !ok {
            return Err(PgError::Connect(conn.error_message()));
        }
        // SAFETY: valid connection; the processor is a plain function without state.
        unsafe {
            pq::PQsetNoticeProcessor(
                conn.raw.as_ptr(),
                Some(notice_processor),
                std::ptr::null_mut(),
            );
        }
        Ok(conn)
    }

    /// Normal or replication connection.
    pub fn kind(&self) -> ConnectionKind {
        self.kind
    }

    /// Server version as an integer, e.g. `150018` for 15.18.
    pub fn server_version(&self) -> i32 {
        // SAFETY: valid connection.
        unsafe { pq::PQserverVersion(self.raw.as_ptr()) }
    }

    fn error_message(&self) -> String {
        // SAFETY: valid connection; message owned by it.
        cstr_opt(unsafe { pq::PQerrorMessage(self.raw.as_ptr()) })
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn lost(&self) -> PgError {
        PgError::ConnectionLost(self.error_message())
    }

    /// Turns a NULL result (out of memory or connection failure) into an error.
    fn take_result(&self, r: *mut pq::PGresult) -> Result<PgResult, PgError> {
        NonNull::new(r).map(PgResult).ok_or_else(|| self.lost())
    }

    fn check(
        &self,
        res: &PgResult,
        sql: &str,
        expect: &[pq::ExecStatusType],
    ) -> Result<(), PgError> {
        let status = res.status();
        if expect.contains(&status) {
            return Ok(());
        }
        match status {
            pq::ExecStatusType::PGRES_FATAL_ERROR | pq::ExecStatusType::PGRES_NONFATAL_ERROR => {
                let e = res.db_error();
                // A FATAL without SQLSTATE is libpq's own report of a broken connection.
                if e.sqlstate == "XX000" && res.field(pq::PG_DIAG_SQLSTATE).is_none() {
                    return Err(PgError::ConnectionLost(e.message));
                }
                Err(PgError::Db(e))
            }
            other => Err(PgError::UnexpectedResult {
                command: command_excerpt(sql),
                status: status_name(other),
            }),
        }
    }

    fn exec_raw(&mut self, sql: &str) -> Result<PgResult, PgError> {
        let c = CString::new(sql).map_err(|_| PgError::Nul("an SQL command"))?;
        // SAFETY: valid connection and NUL-terminated command.
        let r = unsafe { pq::PQexec(self.raw.as_ptr(), c.as_ptr()) };
        self.take_result(r)
    }

    /// Runs one or more statements with the simple query protocol and returns the rows of
    /// the last one. Works on replication connections too (replication commands included).
    pub fn query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        let res = self.exec_raw(sql)?;
        self.check(
            &res,
            sql,
            &[
                pq::ExecStatusType::PGRES_TUPLES_OK,
                pq::ExecStatusType::PGRES_COMMAND_OK,
                pq::ExecStatusType::PGRES_EMPTY_QUERY,
            ],
        )?;
        Ok(res.to_query_result())
    }

    /// Runs statements, discarding any rows.
    pub fn execute(&mut self, sql: &str) -> Result<(), PgError> {
        self.query(sql).map(|_| ())
    }

    /// Runs one statement with text parameters (`$1`, `$2`, ...) on a normal connection, so
    /// values never need quoting. Replication connections only allow the simple protocol: use
    /// [`quote_literal`] there.
    pub fn query_params(&mut self, sql: &str, params: &[&str]) -> Result<QueryResult, PgError> {
        if self.kind == ConnectionKind::Replication {
            return Err(PgError::UnexpectedResult {
                command: command_excerpt(sql),
                status: "parameters are not allowed on a replication connection".into(),
            });
        }
        let c = CString::new(sql).map_err(|_| PgError::Nul("an SQL command"))?;
        let values = CStrings::new(params, "a query parameter")?;
        let ptrs = values.pointers();
        // SAFETY: valid connection; params array has `ptrs.len()` NUL-terminated text values;
        // NULL types/lengths/formats mean "infer, text".
        let r = unsafe {
            pq::PQexecParams(
                self.raw.as_ptr(),
                c.as_ptr(),
                ptrs.len() as c_int,
                std::ptr::null(),
                ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        let res = self.take_result(r)?;
        self.check(
            &res,
            sql,
            &[
                pq::ExecStatusType::PGRES_TUPLES_OK,
                pq::ExecStatusType::PGRES_COMMAND_OK,
            ],
        )?;
        Ok(res.to_query_result())
    }

    /// Runs a `COPY ... TO STDOUT` and hands each data row (bytes as the server sent them,
    /// including the trailing newline in text format) to `on_row`, without buffering the
    /// whole result. When `on_row` breaks, the COPY is cancelled and drained. Returns the
    /// number of rows the server reported.
    pub fn copy_out<F>(&mut self, sql: &str, mut on_row: F) -> Result<u64, PgError>
    where
        F: FnMut(&[u8]) -> ControlFlow<()>,
    {
        let res = self.exec_raw(sql)?;
        self.check(&res, sql, &[pq::ExecStatusType::PGRES_COPY_OUT])?;
        drop(res);
        let mut stopped = false;
        while let Some(buf) = self.get_copy_data_blocking()? {
            if !stopped && on_row(&buf).is_break() {
                stopped = true;
                self.cancel();
            }
        }
        let res = self.finish_copy(sql);
        if stopped {
            // The cancel makes the COPY end in an error; the caller asked for the stop.
            return Ok(0);
        }
        let tag = res?.command_tag;
        Ok(tag
            .strip_prefix("COPY ")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Asks the server to cancel the running command (best effort).
    pub fn cancel(&self) {
        // SAFETY: valid connection; the cancel object is freed below.
        unsafe {
            let c = pq::PQgetCancel(self.raw.as_ptr());
            if !c.is_null() {
                let mut errbuf = [0 as c_char; 256];
                pq::PQcancel(c, errbuf.as_mut_ptr(), errbuf.len() as c_int);
                pq::PQfreeCancel(c);
            }
        }
    }

    fn get_copy_data_blocking(&mut self) -> Result<Option<CopyBuf>, PgError> {
        let mut p: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid connection; on success libpq stores a buffer we free via CopyBuf.
        let n = unsafe { pq::PQgetCopyData(self.raw.as_ptr(), &mut p, 0) };
        match n {
            n if n > 0 => Ok(Some(CopyBuf {
                ptr: NonNull::new(p).ok_or_else(|| self.lost())?,
                len: n as usize,
            })),
            -1 => Ok(None),
            _ => Err(self.lost()),
        }
    }

    /// After the end of a COPY: collect the final result(s).
    fn finish_copy(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        let mut last: Option<Result<QueryResult, PgError>> = None;
        loop {
            // SAFETY: valid connection.
            let r = unsafe { pq::PQgetResult(self.raw.as_ptr()) };
            let Some(res) = NonNull::new(r).map(PgResult) else {
                break;
            };
            let outcome = self
                .check(&res, sql, &[pq::ExecStatusType::PGRES_COMMAND_OK])
                .map(|_| res.to_query_result());
            // Keep the first error: later results are follow-ups of it.
            if !matches!(last, Some(Err(_))) {
                last = Some(outcome);
            }
        }
        last.unwrap_or_else(|| Err(self.lost()))
    }

    /// Sends a command that enters CopyBoth mode (`START_REPLICATION ...`).
    pub fn start_copy_both(&mut self, sql: &str) -> Result<(), PgError> {
        let res = self.exec_raw(sql)?;
        self.check(&res, sql, &[pq::ExecStatusType::PGRES_COPY_BOTH])
    }

    /// Waits up to `timeout` for the next CopyData message of a CopyBoth or CopyOut stream.
    pub fn get_copy_data(&mut self, timeout: Duration) -> Result<CopyData, PgError> {
        self.get_copy_data_or_wake(timeout, &[])
    }

    /// [`get_copy_data`](Self::get_copy_data), also ending the wait (with
    /// [`CopyData::Timeout`]) as soon as one of `wake` is readable.
    pub fn get_copy_data_or_wake(
        &mut self,
        timeout: Duration,
        wake: &[RawFd],
    ) -> Result<CopyData, PgError> {
        // A day stands for "no deadline" (a caller's timeout may come from large settings).
        let deadline = Instant::now() + timeout.min(Duration::from_secs(86_400));
        loop {
            let mut p: *mut c_char = std::ptr::null_mut();
            // SAFETY: valid connection; async = 1 never blocks.
            let n = unsafe { pq::PQgetCopyData(self.raw.as_ptr(), &mut p, 1) };
            if n > 0 {
                let ptr = NonNull::new(p).ok_or_else(|| self.lost())?;
                return Ok(CopyData::Data(CopyBuf {
                    ptr,
                    len: n as usize,
                }));
            }
            if n == -1 {
                return self.finish_copy("COPY").map(|_| CopyData::Done);
            }
            if n != 0 {
                return Err(self.lost());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(CopyData::Timeout);
            }
            if !self.wait_readable(deadline - now, wake)? {
                return Ok(CopyData::Timeout);
            }
            // SAFETY: valid connection.
            if unsafe { pq::PQconsumeInput(self.raw.as_ptr()) } == 0 {
                return Err(self.lost());
            }
        }
    }

    /// True when the socket has data to read now (never waits).
    pub fn socket_readable(&self) -> Result<bool, PgError> {
        self.wait_readable(Duration::ZERO, &[])
    }

    /// Waits until the socket is readable; false on timeout or when one of `wake` is
    /// readable first.
    fn wait_readable(&self, timeout: Duration, wake: &[RawFd]) -> Result<bool, PgError> {
        // SAFETY: valid connection.
        let fd = unsafe { pq::PQsocket(self.raw.as_ptr()) };
        if fd < 0 {
            return Err(self.lost());
        }
        let mut fds = [-1; POLL_MAX];
        fds[0] = fd;
        let n = 1 + wake.len().min(POLL_MAX - 1);
        fds[1..n].copy_from_slice(&wake[..n - 1]);
        let readable = poll_readable(&fds[..n], timeout).map_err(PgError::Io)?;
        Ok(readable[0])
    }

    /// Sends one CopyData message (e.g. a standby status update) and flushes it.
    pub fn put_copy_data(&mut self, data: &[u8]) -> Result<(), PgError> {
        // SAFETY: valid connection; data pointer and length describe a live slice.
        let r = unsafe {
            pq::PQputCopyData(
                self.raw.as_ptr(),
                data.as_ptr() as *const c_char,
                data.len() as c_int,
            )
        };
        if r != 1 {
            return Err(self.lost());
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), PgError> {
        // Blocking connection: PQflush returns 0 once everything is sent.
        // SAFETY: valid connection.
        match unsafe { pq::PQflush(self.raw.as_ptr()) } {
            0 => Ok(()),
            _ => Err(self.lost()),
        }
    }

    /// Ends a CopyBoth stream from our side (CopyDone) and drains what the server still
    /// sends until it completes the command, for at most `timeout`.
    pub fn end_copy_both(&mut self, timeout: Duration) -> Result<(), PgError> {
        // SAFETY: valid connection; NULL error message means a normal end.
        if unsafe { pq::PQputCopyEnd(self.raw.as_ptr(), std::ptr::null()) } != 1 {
            return Err(self.lost());
        }
        self.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PgError::ConnectionLost(
                    "server did not finish the replication stream in time".into(),
                ));
            }
            match self.get_copy_data(left)? {
                CopyData::Done => return Ok(()),
                CopyData::Data(_) | CopyData::Timeout => continue,
            }
        }
    }
}

impl Drop for PgConnection {
    fn drop(&mut self) {
        // SAFETY: valid connection, finished exactly once.
        unsafe { pq::PQfinish(self.raw.as_ptr()) }
    }
}

/// Quotes a string as an SQL literal for the simple query protocol (standard_conforming_strings
/// is on in every supported server, so doubling single quotes is enough).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Quotes an identifier (table, slot, publication name) with double quotes.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Most descriptors [`poll_readable`] watches at once.
pub(crate) const POLL_MAX: usize = 4;

/// Waits until one of `fds` (at most [`POLL_MAX`]; the caller keeps them open) is readable,
/// or `timeout` passes; says which are readable. An interrupted wait is started again.
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Duration) -> std::io::Result<[bool; POLL_MAX]> {
    let idle = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut polled = [idle; POLL_MAX];
    let n = fds.len().min(POLL_MAX);
    for (slot, &fd) in polled.iter_mut().zip(&fds[..n]) {
        *slot = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
    }
    // Rounded up: a wait cut to 0 ms would spin until the deadline.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as c_int;
    loop {
        // SAFETY: `n` valid pollfds (the caller keeps the descriptors open).
        let r = unsafe { libc::poll(polled.as_mut_ptr(), n as libc::nfds_t, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(polled.map(|p| p.revents != 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_readable_says_which_descriptor_is_readable_or_times_out() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        let fds = [b.as_raw_fd(), d.as_raw_fd()];
        assert_eq!(
            poll_readable(&fds, Duration::from_millis(1)).unwrap(),
            [false; POLL_MAX]
        );
        a.write_all(b"x").unwrap();
        assert_eq!(
            poll_readable(&fds, Duration::from_secs(30)).unwrap(),
            [true, false, false, false]
        );
        // No descriptor at all: a plain sleep.
        assert_eq!(
            poll_readable(&[], Duration::from_millis(1)).unwrap(),
            [false; POLL_MAX]
        );
    }

    #[test]
    fn quotes_literals_and_identifiers() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(""), "''");
        assert_eq!(quote_literal(r"a\b"), r"'a\b'");
        assert_eq!(quote_ident("My \"T\""), "\"My \"\"T\"\"\"");
    }

    #[test]
    fn connection_problems_are_classified() {
        let db = |sev: &str, code: &str| {
            PgError::Db(DbError {
                sqlstate: code.into(),
                severity: sev.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            })
        };
        assert!(db("FATAL", "57P01").is_connection_problem());
        assert!(db("ERROR", "08006").is_connection_problem());
        assert!(!db("ERROR", "42704").is_connection_problem());
        assert!(!db("ERROR", sqlstate::OBJECT_IN_USE).is_connection_problem());
        assert_eq!(db("ERROR", "42704").sqlstate(), Some("42704"));
    }

    #[test]
    fn refused_connection_is_a_connect_error() {
        // Port 1 on loopback: nothing listens there.
        let err = PgConnection::connect(
            &[
                ("host", "127.0.0.1"),
                ("port", "1"),
                ("connect_timeout", "2"),
            ],
            ConnectionKind::Normal,
        )
        .unwrap_err();
        assert!(matches!(err, PgError::Connect(_)), "{err:?}");
        assert!(err.is_connection_problem());
    }
}
