//! The gateway's connection engine. It owns every client socket: HTTP upgrade, RFC 6455
//! frames, permessage-deflate, rooms, fan-out, backpressure, presence and heartbeats.
//!
//! Nothing here knows about Python. The binding crate (`gateway-py`) drives an [`Engine`]
//! through its methods and drains [`events::Event`]s in batches.

pub mod client_ip;
pub mod config;
pub mod conn;
pub mod engine;
pub mod events;
pub mod hub;
pub mod limits;
mod media;
pub mod metrics;
pub mod protocol;
mod server;
pub mod tls;

pub use config::EngineConfig;
pub use engine::Engine;
