//! `gateway._core`: the only crate that touches Python.
//!
//! The engine runs on its own tokio threads, which never take the GIL. Python drives it with
//! plain method calls and drains events in batches from one eventfd. Conversion between
//! Rust and Python happens here and nowhere else.

use std::collections::HashMap;
use std::time::Duration;

use gateway_core::engine::{raise_nofile_limit, ConnectDecision};
use gateway_core::events::Event;
use gateway_core::hub::{Join, RoomOptions};
use gateway_core::protocol::close;
use gateway_core::protocol::codes::{PRIO_HIGH, PRIO_LOW, PRIO_NORMAL};
use gateway_core::{Engine as CoreEngine, EngineConfig};
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

create_exception!(
    _core,
    EngineError,
    pyo3::exceptions::PyException,
    "The engine could not do what was asked (bind failed, already started, ...)."
);

create_exception!(
    _core,
    TlsError,
    pyo3::exceptions::PyValueError,
    "A certificate or key that cannot be served: args are (config key, message)."
);

fn tls_err(e: gateway_core::tls::TlsError) -> PyErr {
    TlsError::new_err((e.key, e.message))
}

fn cert_dict<'py>(py: Python<'py>, i: &gateway_core::tls::CertInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("not_after", i.not_after)?;
    d.set_item("not_before", i.not_before)?;
    d.set_item("serial", &i.serial)?;
    d.set_item("subject", &i.subject)?;
    d.set_item("chain_len", i.chain_len)?;
    Ok(d)
}

/// Event kinds, first element of every event tuple.
const EV_CONNECT: u8 = 1;
const EV_MESSAGE: u8 = 2;
const EV_CLOSED: u8 = 3;

/// Seconds as a Duration: a conversion, so NaN, infinity and negative values are errors.
fn secs(v: f64, key: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| PyValueError::new_err(format!("{key}: not a number of seconds: {v}")))
}

/// Build the engine config from keyword arguments, each named like its config key
/// (`limits.queue_bytes` -> `limits_queue_bytes`). Only types are converted here (unknown
/// keyword -> TypeError, wrong type -> TypeError, out of the type's range -> ValueError
/// or OverflowError); ranges are checked by `Config.check()` in Python.
fn config_from(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<EngineConfig> {
    let mut c = EngineConfig::default();
    let Some(kw) = kwargs else { return Ok(c) };
    for (k, v) in kw.iter() {
        let key: String = k.extract()?;
        let d = |v: &Bound<'_, PyAny>| -> PyResult<Duration> { secs(v.extract()?, &key) };
        match key.as_str() {
            "server_host" => c.server_host = v.extract()?,
            "server_port" => c.server_port = v.extract()?,
            "server_reuse_port" => c.server_reuse_port = v.extract()?,
            "server_backlog" => c.server_backlog = v.extract()?,
            "server_io_threads" => c.server_io_threads = v.extract()?,
            "server_ws_path" => c.server_ws_path = v.extract()?,
            "server_health_path" => c.server_health_path = v.extract()?,
            "server_proxy_protocol" => c.server_proxy_protocol = v.extract()?,
            "server_trusted_proxies" => c.server_trusted_proxies = v.extract()?,
            "server_tls_cert_file" => c.server_tls_cert_file = v.extract()?,
            "server_tls_key_file" => c.server_tls_key_file = v.extract()?,
            "server_tls_host" => c.server_tls_host = v.extract()?,
            "server_tls_port" => c.server_tls_port = v.extract()?,
            "server_tls_proxy_protocol" => c.server_tls_proxy_protocol = v.extract()?,
            "static_files" => {
                let m: HashMap<String, (String, Vec<u8>)> = v.extract()?;
                c.static_files = m.into_iter().map(|(p, (t, b))| (p, (t, b.into()))).collect();
            }
            "limits_handshake_timeout" => c.limits_handshake_timeout = d(&v)?,
            "auth_deadline" => c.auth_deadline = d(&v)?,
            "limits_max_headers" => c.limits_max_headers = v.extract()?,
            "limits_max_header_bytes" => c.limits_max_header_bytes = v.extract()?,
            "limits_max_frame_bytes" => c.limits_max_frame_bytes = v.extract()?,
            "limits_max_message_bytes" => c.limits_max_message_bytes = v.extract()?,
            "deflate_enabled" => c.deflate_enabled = v.extract()?,
            "deflate_min_size" => c.deflate_min_size = v.extract()?,
            "deflate_level" => c.deflate_level = v.extract()?,
            "deflate_client_max_window_bits" => c.deflate_client_max_window_bits = v.extract()?,
            "heartbeat_idle_timeout" => c.heartbeat_idle_timeout = d(&v)?,
            "heartbeat_interval" => c.heartbeat_interval = d(&v)?,
            "heartbeat_ws_ping" => c.heartbeat_ws_ping = v.extract()?,
            "app_ping" => c.app_ping = v.extract()?,
            "limits_queue_bytes" => c.limits_queue_bytes = v.extract()?,
            "limits_socket_send_buffer" => c.limits_socket_send_buffer = v.extract()?,
            "limits_fanout_chunk" => c.limits_fanout_chunk = v.extract()?,
            "limits_event_queue" => c.limits_event_queue = v.extract()?,
            "limits_event_queue_bytes" => c.limits_event_queue_bytes = v.extract()?,
            "limits_conn_event_bytes" => c.limits_conn_event_bytes = v.extract()?,
            "limits_client_rate" => c.limits_client_rate = v.extract()?,
            "limits_client_burst" => c.limits_client_burst = v.extract()?,
            "limits_max_conns" => c.limits_max_conns = v.extract()?,
            "limits_reserved_fds" => c.limits_reserved_fds = v.extract()?,
            "limits_max_conns_per_ip" => c.limits_max_conns_per_ip = v.extract()?,
            "limits_max_handshakes_per_ip" => c.limits_max_handshakes_per_ip = v.extract()?,
            "limits_max_conns_per_user" => c.limits_max_conns_per_user = v.extract()?,
            "limits_max_rooms_per_conn" => c.limits_max_rooms_per_conn = v.extract()?,
            "limits_max_rooms" => c.limits_max_rooms = v.extract()?,
            "close_timeout" => c.close_timeout = d(&v)?,
            "media_prefix" => c.media_prefix = v.extract()?,
            "media_upstream" => c.media_upstream = v.extract()?,
            "media_secret" => c.media_secret = v.extract()?,
            "media_max_body" => c.media_max_body = v.extract()?,
            "media_timeout" => c.media_timeout = d(&v)?,
            "media_idle_timeout" => c.media_idle_timeout = d(&v)?,
            "media_max_inflight" => c.media_max_inflight = v.extract()?,
            "media_rate" => c.media_rate = v.extract()?,
            "media_node_rate" => c.media_node_rate = v.extract()?,
            _ => return Err(PyTypeError::new_err(format!("Engine() got an unexpected keyword argument {key:?}"))),
        }
    }
    Ok(c)
}

fn prio(p: u8) -> PyResult<u8> {
    if p > PRIO_HIGH {
        return Err(PyValueError::new_err("priority must be 0 (low), 1 (normal) or 2 (high)"));
    }
    Ok(p)
}

fn close_code(code: u16) -> PyResult<u16> {
    if close::server_may_send(code) {
        Ok(code)
    } else {
        Err(PyValueError::new_err(format!(
            "close code {code} may not be sent by a server (use 1000, 1001, 1008, 1011-1013 or 3000-4999)"
        )))
    }
}

/// Convert one event to its tuple form (see `_core.pyi`).
fn event_to_py<'py>(py: Python<'py>, ev: Event) -> PyResult<Bound<'py, PyTuple>> {
    Ok(match ev {
        Event::Connect { conn, peer, path, query, headers, protocols } => {
            (EV_CONNECT, conn, peer, path, query, headers, protocols).into_pyobject(py)?
        }
        Event::Message { conn, data, binary } => {
            (EV_MESSAGE, conn, PyBytes::new(py, &data), binary).into_pyobject(py)?
        }
        Event::Closed { conn, code, reason, rooms, user } => {
            (EV_CLOSED, conn, code, reason, rooms, user).into_pyobject(py)?
        }
    })
}

/// The connection engine. See `gateway/_core.pyi` for the full contract.
#[pyclass(frozen, module = "gateway._core")]
struct Engine {
    inner: CoreEngine,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let cfg = config_from(kwargs)?;
        let inner = CoreEngine::new(cfg).map_err(|e| EngineError::new_err(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Bind and start serving; returns (host, port) actually bound.
    fn start(&self, py: Python<'_>) -> PyResult<(String, u16)> {
        let addr = py.detach(|| self.inner.start()).map_err(|e| EngineError::new_err(e.to_string()))?;
        Ok((addr.ip().to_string(), addr.port()))
    }

    /// (host, port) of the TLS listener once started, or None without TLS.
    #[getter]
    fn tls_address(&self) -> Option<(String, u16)> {
        self.inner.tls_addr().map(|a| (a.ip().to_string(), a.port()))
    }

    /// The certificate served (dict: not_after, not_before, serial, subject, chain_len),
    /// or None without TLS.
    fn tls_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.inner.tls_info().map(|i| cert_dict(py, &i)).transpose()
    }

    /// Re-read the certificate and key files for new connections; returns the new
    /// certificate's info. Raises TlsError(key, message) and keeps the old one on failure.
    fn reload_tls<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = py.detach(|| self.inner.reload_tls()).map_err(tls_err)?;
        cert_dict(py, &info)
    }

    #[getter]
    fn fd(&self) -> i32 {
        self.inner.events_fd()
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner.is_running()
    }

    #[getter]
    fn draining(&self) -> bool {
        self.inner.is_draining()
    }

    /// Drain up to `max` events: (events, more). When `more` is true call again soon;
    /// the fd is only signalled when the queue goes from empty to non-empty.
    #[pyo3(signature = (max = 1024))]
    fn poll<'py>(&self, py: Python<'py>, max: usize) -> PyResult<(Bound<'py, PyList>, bool)> {
        let (events, more) = self.inner.drain_events(max);
        let list = PyList::empty(py);
        for ev in events {
            list.append(event_to_py(py, ev)?)?;
        }
        Ok((list, more))
    }

    /// Accept a pending connection. `first` is sent as the first text frame.
    #[pyo3(signature = (conn, user = None, meta = None, protocol = None, first = None))]
    fn accept(
        &self,
        conn: u64,
        user: Option<String>,
        meta: Option<String>,
        protocol: Option<String>,
        first: Option<Vec<u8>>,
    ) -> bool {
        self.inner.decide(conn, ConnectDecision::Accept { user, meta, protocol, first })
    }

    /// Refuse a pending connection with an HTTP status (401, 403, 429, 503, ...).
    #[pyo3(signature = (conn, status = 403, reason = String::from("forbidden")))]
    fn reject(&self, conn: u64, status: u16, reason: String) -> PyResult<bool> {
        if !(400..=599).contains(&status) {
            return Err(PyValueError::new_err("reject status must be 4xx or 5xx"));
        }
        let reason: String = reason.chars().filter(|c| !c.is_control()).take(200).collect();
        Ok(self.inner.decide(conn, ConnectDecision::Reject { status, reason }))
    }

    #[pyo3(signature = (conn, data, priority = PRIO_HIGH, binary = false))]
    fn send(&self, conn: u64, data: &[u8], priority: u8, binary: bool) -> PyResult<bool> {
        Ok(self.inner.send(conn, data, prio(priority)?, binary))
    }

    #[pyo3(signature = (user, data, priority = PRIO_HIGH))]
    fn send_user(&self, user: &str, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.send_user(user, data, prio(priority)?))
    }

    #[pyo3(signature = (room, data, priority = PRIO_NORMAL))]
    fn publish(&self, room: &str, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.publish(room, data, prio(priority)?))
    }

    #[pyo3(signature = (data, priority = PRIO_NORMAL))]
    fn broadcast(&self, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.broadcast(data, prio(priority)?))
    }

    /// Returns 1 joined, 0 already a member, -1 no such (or closing) connection, -2 over
    /// the per-connection room cap (`cap`, default `limits_max_rooms_per_conn`), -3 over
    /// the node's room cap.
    #[pyo3(signature = (conn, room, cap = None))]
    fn join(&self, conn: u64, room: &str, cap: Option<usize>) -> i8 {
        let joined = match cap {
            Some(cap) => self.inner.join_capped(conn, room, cap),
            None => self.inner.join(conn, room),
        };
        match joined {
            Join::Joined => 1,
            Join::AlreadyMember => 0,
            Join::NoSuchConn => -1,
            Join::ConnRoomsFull => -2,
            Join::NodeRoomsFull => -3,
        }
    }

    fn is_member(&self, conn: u64, room: &str) -> bool {
        self.inner.is_member(conn, room)
    }

    fn leave(&self, conn: u64, room: &str) -> bool {
        self.inner.leave(conn, room)
    }

    #[pyo3(signature = (prefix, merge_ms = 0, merge_max = 20))]
    fn set_room_options(&self, prefix: &str, merge_ms: u32, merge_max: u32) {
        self.inner.set_room_options(prefix, RoomOptions { merge_ms, merge_max });
    }

    /// Deliveries to the room's members that backpressure did not queue (since the room
    /// was created on this node).
    fn room_dropped(&self, room: &str) -> u64 {
        self.inner.room_dropped(room)
    }

    fn room_counts(&self, room: &str) -> (usize, usize) {
        self.inner.room_counts(room)
    }

    #[pyo3(signature = (room, offset = 0, limit = 100))]
    fn room_members(&self, room: &str, offset: usize, limit: usize) -> Vec<(u64, Option<String>, Option<String>)> {
        self.inner
            .room_members(room, offset, limit)
            .into_iter()
            .map(|m| (m.conn, m.user.map(|u| u.to_string()), m.meta.map(|u| u.to_string())))
            .collect()
    }

    fn rooms(&self) -> Vec<(String, usize, usize)> {
        self.inner.rooms()
    }

    fn conn_rooms(&self, conn: u64) -> Option<Vec<String>> {
        self.inner.conn_rooms(conn)
    }

    fn user_conns(&self, user: &str) -> Vec<u64> {
        self.inner.user_conns(user)
    }

    #[pyo3(signature = (conn, code = close::NORMAL, reason = String::new()))]
    fn disconnect(&self, conn: u64, code: u16, reason: String) -> PyResult<bool> {
        Ok(self.inner.disconnect(conn, close_code(code)?, &reason))
    }

    #[pyo3(signature = (user, code = close::KICKED, reason = String::new()))]
    fn disconnect_user(&self, user: &str, code: u16, reason: String) -> PyResult<usize> {
        Ok(self.inner.disconnect_user(user, close_code(code)?, &reason))
    }

    fn counters(&self) -> HashMap<&'static str, u64> {
        self.inner.counters().into_iter().collect()
    }

    /// name -> (cumulative [(le, count)] buckets with +Inf last, sum of seconds).
    fn histograms(&self) -> HashMap<&'static str, (gateway_core::engine::Buckets, f64)> {
        self.inner.histograms().into_iter().map(|(n, b, s)| (n, (b, s))).collect()
    }

    #[getter]
    fn connections(&self) -> usize {
        self.inner.connection_count()
    }

    /// Stop accepting and ask every connection to close; returns how many were asked.
    #[pyo3(signature = (code = close::RESTART, reason = String::from("restarting"), last = None))]
    fn drain(&self, code: u16, reason: String, last: Option<Vec<u8>>) -> PyResult<usize> {
        Ok(self.inner.drain(close_code(code)?, &reason, last.as_deref()))
    }

    /// Block (without the GIL) until no connection is left or the timeout passed.
    fn wait_closed(&self, py: Python<'_>, timeout: f64) -> PyResult<usize> {
        let t = secs(timeout, "timeout")?;
        Ok(py.detach(|| self.inner.wait_closed(t)))
    }

    /// Graceful stop: drain, wait up to `timeout`, shut the runtime down. Returns how
    /// many connections had to be dropped.
    #[pyo3(signature = (code = close::GOING_AWAY, reason = String::from("server stopping"), timeout = 5.0))]
    fn stop(&self, py: Python<'_>, code: u16, reason: String, timeout: f64) -> PyResult<usize> {
        let code = close_code(code)?;
        let t = secs(timeout, "timeout")?;
        Ok(py.detach(|| self.inner.stop(code, &reason, t)))
    }
}

/// Check a certificate chain and key as the engine would load them (readable PEM, an
/// unexpired X.509 leaf, a supported key that matches it). Returns the certificate's info;
/// raises TlsError(key, message).
#[pyfunction]
fn check_tls<'py>(py: Python<'py>, cert_file: &str, key_file: &str) -> PyResult<Bound<'py, PyDict>> {
    let (_, info) = gateway_core::tls::load(cert_file, key_file).map_err(tls_err)?;
    cert_dict(py, &info)
}

/// Raise the soft open-files limit to the hard limit; returns (soft, hard).
#[pyfunction]
fn raise_fd_limit() -> (u64, u64) {
    raise_nofile_limit()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(raise_fd_limit, m)?)?;
    m.add_function(wrap_pyfunction!(check_tls, m)?)?;
    m.add("TlsError", m.py().get_type::<TlsError>())?;
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add("EV_CONNECT", EV_CONNECT)?;
    m.add("EV_MESSAGE", EV_MESSAGE)?;
    m.add("EV_CLOSED", EV_CLOSED)?;
    m.add("PRIO_LOW", PRIO_LOW)?;
    m.add("PRIO_NORMAL", PRIO_NORMAL)?;
    m.add("PRIO_HIGH", PRIO_HIGH)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
