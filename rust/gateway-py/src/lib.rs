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

/// Event kinds, first element of every event tuple.
const EV_CONNECT: u8 = 1;
const EV_MESSAGE: u8 = 2;
const EV_CLOSED: u8 = 3;

fn secs(v: f64, key: &str) -> PyResult<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(PyValueError::new_err(format!("{key} must be a non-negative number of seconds")));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Build the engine config from keyword arguments; unknown keys are an error.
fn config_from(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<EngineConfig> {
    let mut c = EngineConfig::default();
    let Some(kw) = kwargs else { return Ok(c) };
    for (k, v) in kw.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "host" => c.host = v.extract()?,
            "port" => c.port = v.extract()?,
            "reuse_port" => c.reuse_port = v.extract()?,
            "backlog" => c.backlog = v.extract()?,
            "workers" => c.workers = v.extract()?,
            "ws_path" => c.ws_path = v.extract()?,
            "health_path" => c.health_path = v.extract()?,
            "static_files" => {
                let m: HashMap<String, (String, Vec<u8>)> = v.extract()?;
                c.static_files = m.into_iter().map(|(p, (t, b))| (p, (t, b.into()))).collect();
            }
            "handshake_timeout" => c.handshake_timeout = secs(v.extract()?, &key)?,
            "auth_timeout" => c.auth_timeout = secs(v.extract()?, &key)?,
            "max_headers" => c.max_headers = v.extract()?,
            "max_header_bytes" => c.max_header_bytes = v.extract()?,
            "max_frame_size" => c.decoder.max_frame = v.extract()?,
            "max_message_size" => c.decoder.max_message = v.extract()?,
            "deflate" => c.deflate.enabled = v.extract()?,
            "deflate_min_size" => c.deflate.min_size = v.extract()?,
            "deflate_level" => c.deflate.level = v.extract()?,
            "deflate_client_max_window_bits" => c.deflate.client_max_window_bits = v.extract()?,
            "idle_timeout" => c.idle_timeout = secs(v.extract()?, &key)?,
            "ping_interval" => c.ping_interval = secs(v.extract()?, &key)?,
            "app_ping" => c.app_ping = v.extract()?,
            "queue_bytes" => c.queue_bytes = v.extract()?,
            "send_buffer" => c.send_buffer = v.extract()?,
            "fanout_chunk" => c.fanout_chunk = v.extract()?,
            "event_queue_cap" => c.event_queue_cap = v.extract()?,
            "close_timeout" => c.close_timeout = secs(v.extract()?, &key)?,
            _ => return Err(PyTypeError::new_err(format!("Engine() got an unexpected keyword argument {key:?}"))),
        }
    }
    if c.decoder.max_frame == 0 || c.decoder.max_message == 0 {
        return Err(PyValueError::new_err("max_frame_size and max_message_size must be positive"));
    }
    if c.deflate.level > 9 {
        return Err(PyValueError::new_err("deflate_level must be 0..9"));
    }
    if !(9..=15).contains(&c.deflate.client_max_window_bits) {
        return Err(PyValueError::new_err("deflate_client_max_window_bits must be 9..15"));
    }
    Ok(c)
}

fn prio(p: u8) -> PyResult<u8> {
    if p > 2 {
        return Err(PyValueError::new_err("priority must be 0 (low), 1 (normal) or 2 (high)"));
    }
    Ok(p)
}

fn close_code(code: u16) -> PyResult<u16> {
    if matches!(code, 1000 | 1001 | 1008 | 1011 | 1012 | 1013 | 3000..=4999) {
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
        let addr = py.detach(|| self.inner.start()).map_err(|e| {
            let cfg = self.inner.config();
            EngineError::new_err(format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port))
        })?;
        Ok((addr.ip().to_string(), addr.port()))
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

    #[pyo3(signature = (conn, data, priority = 2, binary = false))]
    fn send(&self, conn: u64, data: &[u8], priority: u8, binary: bool) -> PyResult<bool> {
        Ok(self.inner.send(conn, data, prio(priority)?, binary))
    }

    #[pyo3(signature = (user, data, priority = 2))]
    fn send_user(&self, user: &str, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.send_user(user, data, prio(priority)?))
    }

    #[pyo3(signature = (room, data, priority = 1))]
    fn publish(&self, room: &str, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.publish(room, data, prio(priority)?))
    }

    #[pyo3(signature = (data, priority = 1))]
    fn broadcast(&self, data: &[u8], priority: u8) -> PyResult<usize> {
        Ok(self.inner.broadcast(data, prio(priority)?))
    }

    /// Returns 1 joined, 0 already a member, -1 no such connection.
    fn join(&self, conn: u64, room: &str) -> i8 {
        match self.inner.join(conn, room) {
            Join::Joined => 1,
            Join::AlreadyMember => 0,
            Join::NoSuchConn => -1,
        }
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

    #[pyo3(signature = (conn, code = 1000, reason = String::new()))]
    fn disconnect(&self, conn: u64, code: u16, reason: String) -> PyResult<bool> {
        Ok(self.inner.disconnect(conn, close_code(code)?, &reason))
    }

    #[pyo3(signature = (user, code = 4003, reason = String::new()))]
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
    #[pyo3(signature = (code = 1012, reason = String::from("restarting"), last = None))]
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
    #[pyo3(signature = (code = 1001, reason = String::from("server stopping"), timeout = 5.0))]
    fn stop(&self, py: Python<'_>, code: u16, reason: String, timeout: f64) -> PyResult<usize> {
        let code = close_code(code)?;
        let t = secs(timeout, "timeout")?;
        Ok(py.detach(|| self.inner.stop(code, &reason, t)))
    }
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
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add("EV_CONNECT", EV_CONNECT)?;
    m.add("EV_MESSAGE", EV_MESSAGE)?;
    m.add("EV_CLOSED", EV_CLOSED)?;
    m.add("PRIO_LOW", 0u8)?;
    m.add("PRIO_NORMAL", 1u8)?;
    m.add("PRIO_HIGH", 2u8)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
